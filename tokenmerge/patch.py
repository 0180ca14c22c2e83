"""The run-time side of one site: planning, the plan cache, statistics and the local-mode hooks.

Data path at a site in local mode: the pre-hook of a target sub-module receives
``hidden_states (B, N, C)`` -> the adapter gives the token layout -> the plan (cached, or made by
the strategy) -> ``plan.merge(x)`` -> the sub-module's own forward on ``N - r`` tokens ->
``plan.unmerge(y)`` in the forward hook -> back into the residual stream.
"""

from __future__ import annotations

import copy
import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .attention_view import Call
from .calls import PerThread
from .config import MergeConfig
from .correction import ValueCorrection
from .errors import InputError, InvalidPlanError, ShortfallWarning
from .observe import Observer, Part
from .plan import Plan
from .plan_check import capacity_problem, checks_values, plan_problem
from .proportional import SizeBias
from .rng import SiteRandom
from .site import Site, SiteStats, TokenLayout
from .state import StepState
from .strategy import Strategy

__all__ = ["SitePatch"]

#: the SiteStats fields counted in the hot path, and their places in ``SitePatch._counts``
_COUNTERS = ("calls", "plans_computed", "plans_reused", "passed_through")
_CALLS, _COMPUTED, _REUSED, _PASSED = range(len(_COUNTERS))

#: the pass-through reason of a call on a batch of size 0
EMPTY_BATCH = "an empty batch (batch size 0)"

LayoutFn = Callable[[Site, Tensor], "TokenLayout | None"]
#: ``(args, kwargs) -> reason`` a target call must be passed through untouched, or None
Guard = Callable[[tuple, dict], "str | None"]
#: ``(plan, kwargs) -> kwargs`` of a merged call (positional tables reduced to the kept rows...)
Adjust = Callable[[Plan, dict], dict]
#: ``(module, hidden_states, args, kwargs)`` of a call about to be merged: raises ``InputError``
#: to refuse it (an argument that cannot follow the merge)
Check = Callable[[nn.Module, Tensor, tuple, dict], None]

T = TypeVar("T")


#: calls of one site within one model call that get a cached plan of their own (a block run
#: more often plans at each further call)
MAX_SITE_CALLS = 8


@dataclass
class _CachedPlan:
    key: tuple  # (batch, tokens, device, dtype) the plan was made for
    plan: Plan
    layout: TokenLayout  # the token layout it was made on


class _SiteCall:
    """One thread's state at a site (``tokenmerge.calls``): its plans, its random stream and
    where the model call under way is.

    A site may run more than once in one model call (a block looped over, a module called
    twice): each of its calls in the model call is numbered (``index``) and has a cached plan of
    its own, made on its own input; within one site call, the targets share one plan. A target
    that runs again starts the next site call - except in a backward pass, where it is gradient
    checkpointing re-running a forward (``replaying``): the site calls are re-run last first,
    each with the plan it had.
    """

    def __init__(self, seed: int) -> None:
        self.random = SiteRandom(seed)
        self.plans: list[_CachedPlan | None] = [None] * MAX_SITE_CALLS
        self.index = -1  # the site call under way (-1: none yet in this model call)
        self.seen = 0  # bit mask of the targets that ran in it
        self.current: _CachedPlan | None = None  # its plan
        self.last: _CachedPlan | None = None  # the plan of the latest merged call
        self.layout: TokenLayout | None = None  # make_plan's, for the cache entry
        #: what the plan is made from when set (the block input); see ``SitePatch.metric``
        self.metric: Tensor | None = None
        self.replaying = False

    def restart(self) -> None:
        """A new model call: its first site call comes next."""
        self.index = -1
        self.seen = 0
        self.current = None
        self.metric = None  # a forward that raised mid-block left its input here
        self.replaying = False

    def next_site_call(self) -> None:
        self.index = min(self.index + 1, MAX_SITE_CALLS)
        self.seen = 0
        self.current = self.plans[self.index] if self.index < MAX_SITE_CALLS else None
        self.replaying = False

    def replay(self) -> None:
        """A backward pass re-runs a site call (gradient checkpointing), the last one first."""
        if self.replaying:
            self.index = max(self.index - 1, 0)
            if self.index < MAX_SITE_CALLS:
                self.current = self.plans[self.index]
        self.replaying = True
        self.seen = 0

    def keep(self, entry: _CachedPlan) -> None:
        self.current = self.last = entry
        if 0 <= self.index < MAX_SITE_CALLS:
            self.plans[self.index] = entry

    def drop_plans(self) -> None:
        self.plans = [None] * MAX_SITE_CALLS
        self.current = self.last = None


class SitePatch:
    """Planning and hooks for one site. Adapters create one per selected site.

    Args:
        site: the site's description.
        strategy: the strategy instance (shared by all sites of one patch).
        config: the merge config.
        state: the step state of the thread that applied the patch (each call's own decisions
            reach the site through ``begin_call``).
        layout: callable ``(site, hidden_states) -> TokenLayout | None``, the adapter's
            knowledge of how tokens are laid out at this call (None: unknown, the call passes
            through unmerged). Must be a bound method or another object that ``copy.deepcopy``
            copies along with the model (not a closure over the model).
    """

    def __init__(
        self,
        site: Site,
        strategy: Strategy,
        config: MergeConfig,
        state: StepState,
        layout: LayoutFn,
    ) -> None:
        self.site = site
        self.strategy = strategy
        self.config = config
        self.state = state
        self.layout = layout
        self.ratio = config.ratio_for(site)
        # values written by the hot path. Eager calls count in Python ints (no kernel); compiled
        # ones in a tensor, where counting is a traced in-place add rather than a guard on the
        # value of a Python int (a recompile per call)
        self._info = SiteStats(name=site.name, ratio=self.ratio)
        self._counts = [0] * len(_COUNTERS)
        self._compiled_counts = torch.zeros(len(_COUNTERS), dtype=torch.int64)
        # per thread: the plan cache, one private random stream per site (restarted at every
        # generation) and the call under way; copy.deepcopy copies the copying thread's, so a
        # copy taken mid-generation goes on exactly as the original would
        seed = config.seed * 1_000_003 + zlib.crc32(site.name.encode())
        self.calls = PerThread(partial(_SiteCall, seed))
        self._targets = 0  # targets attached so far (each gets a bit of ``_SiteCall.seen``)
        #: whether fresh plans get the value checks (one host read each; tokenmerge.plan_check)
        self._check_values = checks_values(type(strategy))
        self._warned_shortfall = False
        self._corrections: list[ValueCorrection] = []  # of this site's attention targets
        #: called around each part of the work (``Handle.observe``); None: nothing observes
        self.observer: Observer | None = None

    def __getstate__(self) -> dict[str, Any]:
        # an observer watches this patch, not its copies: a deep copy starts unobserved
        return {**self.__dict__, "observer": None}

    @property
    def metric(self) -> Tensor | None:
        """What the calling thread's plan is made from when set (e.g. the block input, as
        tomesd does); adapters set it in a pre-hook of the block and clear it after (see
        ``watch_block_input``). Hooks that run under ``torch.compile`` set
        ``calls.value.metric`` instead (a property setter is not traced there)."""
        return self.calls.value.metric

    @metric.setter
    def metric(self, value: Tensor | None) -> None:
        self.calls.value.metric = value

    def observed(self, part: Part, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, inside the observer's ``around(part, site)`` when one is
        attached (``tokenmerge.observe``). Adapters that merge or unmerge in their own hooks
        call ``plan.merge`` / ``plan.unmerge`` through it."""
        observer = self.observer
        if observer is None:  # the one check the hot path pays
            return fn(*args, **kwargs)
        with observer.around(part, self.site):
            return fn(*args, **kwargs)

    # ------------------------------------------------------------------ planning
    @property
    def stats(self) -> SiteStats:
        """What happened at this site so far (a snapshot)."""
        compiled = self._compiled_counts.tolist()
        counts = [a + b for a, b in zip(self._counts, compiled, strict=True)]
        counters = dict(zip(_COUNTERS, counts, strict=True))
        fitted = [w for c in self._corrections if (w := c.reported()) is not None]
        fitted = [w for w in fitted if not w.is_meta]  # a model on the meta device has no values
        # NaN: a correction whose view did not match its module, which corrects nothing
        mean = float(torch.stack(fitted).nanmean()) if fitted else float("nan")
        beta = None if math.isnan(mean) else round(mean, 4)
        return replace(self._info, **counters, value_correction=beta)

    def eager_call_counts(self) -> tuple[int, int]:
        """``(planned, passed_through)``: the eager calls so far that got a plan (merging or
        skipped) and those passed through untouched; a free read (compiled calls count in a
        tensor, read by ``stats``)."""
        return self._counts[_CALLS], self._counts[_PASSED]

    def skip_reasons(self) -> tuple[str | None, str | None]:
        """``(skipped, pass_reason)`` of ``stats``, read without its counters (no device read)."""
        return self._info.skipped, self._info.pass_reason

    @property
    def last_plan(self) -> Plan | None:
        """The plan this site used at its latest merged call in the calling thread: what
        ``tokenmerge visualize`` draws (None before one, and from the start of a call that
        plans afresh until it plans)."""
        last = self.calls.value.last
        return None if last is None else last.plan

    @property
    def last_layout(self) -> TokenLayout | None:
        """The token layout ``last_plan`` was made on (None when there is no such plan)."""
        last = self.calls.value.last
        return None if last is None else last.layout

    def begin_call(self, new_generation: bool, replan: bool = True) -> None:
        """Called by the root hook, outside compiled code, at the start of every model call of
        the calling thread; ``replan``: whether the call's step makes new plans."""
        call = self.calls.value
        call.restart()
        if new_generation:
            call.random.reset()
        # decided here, outside compiled code, so the hot path only asks whether a plan is
        # cached: one graph variant that plans and one that reuses, whatever the step
        if new_generation or replan:
            call.drop_plans()

    def plan_afresh(self, x: Tensor) -> Plan | None:
        """``make_plan``, kept as the site's ``last_plan`` (progressive mode: every call of a
        block plans on the tokens reaching it, nothing is reused)."""
        plan = self.make_plan(x)
        if plan is not None:
            call = self.calls.value
            key = (x.shape[0], x.shape[1], x.device, x.dtype)
            call.current = call.last = _CachedPlan(key, plan, call.layout)
        return plan

    def start_fresh(self) -> None:
        """The next target call plans afresh (a new block call in a model without steps)."""
        call = self.calls.value
        call.drop_plans()  # of every site call: nothing of an earlier input is ever reused
        call.index, call.seen = 0, 0

    def new_target(self) -> int:
        """A bit of its own for a target module of this site (``plan_for``'s ``target``)."""
        bit = 1 << self._targets
        self._targets += 1
        return bit

    def _features(self, image_tokens: Tensor) -> tuple[Tensor, int]:
        """Features the strategy plans on, and how many times the plan repeats over the batch."""
        batch, n, _ = image_tokens.shape
        if not self.strategy.uses_features:
            return image_tokens.new_empty(1, n, 0, dtype=torch.float32), 1
        tokens, repeats = image_tokens.detach(), 1
        if not self.site.shared_plan and self.config.share_cfg_plan and batch % 2 == 0:
            tokens, repeats = tokens[batch // 2 :], 2  # only the half that plans is normalised
        with torch.no_grad():
            # channels made contiguous first: a UNet block input is a channels-strided view of a
            # conv output, which makes the norm and every gather of the plan read memory across
            # rows (rows cut from a longer sequence, behind a class token, are read as they are)
            tokens = tokens.float()
            if tokens.stride(-1) != 1:
                tokens = tokens.contiguous()
            features = F.normalize(tokens, dim=-1)
            if self.site.shared_plan:
                return F.normalize(features.mean(0, keepdim=True), dim=-1), 1
        return features, repeats

    def plan_for(self, x: Tensor, target: int = 1) -> Plan | None:
        """The plan for ``x (B, N, C)`` at this call of target ``target`` (its bit, from
        ``new_target``): cached if still valid, else a new one; None when the adapter knows no
        layout for it (the call then passes through).

        The first target of a site call decides; later targets of the same site call share its
        plan. A target that ran already starts the next site call, which has a cached plan of
        its own (a module called twice in one forward never merges its second input with the
        first one's plan). Only values set by the root hook and the shapes of ``x`` are read.
        """
        call = self.calls.value
        if call.index >= 0 and call.seen & target and torch._C._current_graph_task_id() != -1:
            call.replay()  # checked on a repeat only: no cost, nor graph break, on a forward
        elif call.index < 0 or call.seen & target:
            call.next_site_call()
        first = call.seen == 0 and not call.replaying
        call.seen |= target
        key = (x.shape[0], x.shape[1], x.device, x.dtype)
        cached = call.current
        if cached is not None and cached.key == key:
            if first:
                self._count(cached.plan, x.shape[1], _REUSED)
            call.last = cached
            return cached.plan
        if cached is not None and not first:
            shared = self._behind_more_prefix(cached, x)
            if shared is not None:
                return shared
        plan = self.make_plan(x)
        if plan is not None:
            call.keep(_CachedPlan(key, plan, call.layout))
        return plan

    def _behind_more_prefix(self, cached: _CachedPlan, x: Tensor) -> Plan | None:
        """The site call's plan for a later target given the same image tokens behind more
        protected ones (CogVideoX's MLP takes the text, then the image tokens its attention
        took alone): the plan with the extra tokens kept in front, made once with it."""
        if cached.key[0] != x.shape[0] or cached.key[2:] != (x.device, x.dtype):
            return None
        layout, old = self.layout(self.site, x), cached.layout
        if layout is None or (layout.grid, layout.frames) != (old.grid, old.frames):
            return None
        extra = layout.num_prefix - old.num_prefix
        if extra <= 0 or layout.positions is not None or old.positions is not None:
            return None
        if layout.num_suffix or old.num_suffix:
            return None
        plan = cached.plan
        return plan.derived(("prefix", extra), lambda: plan.with_prefix(extra))

    def make_plan(self, x: Tensor) -> Plan | None:
        """A fresh plan for ``x (B, N, C)``, bypassing the cache (counted in the stats); None
        when the adapter knows no layout for it."""
        return self.observed("plan", self._new_plan, x)

    def _new_plan(self, x: Tensor) -> Plan | None:
        layout = self.layout(self.site, x)
        if layout is None:
            return None
        call = self.calls.value
        call.layout = layout
        prefix, suffix = layout.num_prefix, layout.num_suffix
        n = layout.num_image_tokens
        if prefix + n + suffix != x.shape[1]:
            raise ValueError(
                f"site {self.site.name!r}: the layout says {prefix} prefix + {n} image + "
                f"{suffix} suffix tokens (grid {layout.grid}), but hidden_states has "
                f"{x.shape[1]} tokens"
            )
        min_tokens = self.config.sites.min_tokens or 1
        frames = layout.frames
        frame = layout.frame() if frames > 1 else layout  # what the strategy plans on
        per_frame = n // frames
        # asked per frame: every frame merges alike
        ratio, r = self.ratio, self.config.r
        wanted = int(ratio * per_frame) if r is None else r // frames
        if n < min_tokens or wanted == 0:
            reason = f"{n} image tokens < min_tokens {min_tokens}" if n < min_tokens else None
            plan = Plan.identity(x.shape[1], x.device)
            self._count(plan, x.shape[1], _COMPUTED, skipped=reason)
            return plan
        capacity = self.strategy.capacity(frame, self.site)
        self._reject(capacity_problem(capacity, per_frame), "capacity()")
        num_merge = min(wanted, int(capacity))
        features, repeats = self._features(self._metric_image_tokens(x, prefix, n, call.metric))
        if frames > 1:
            features = features.reshape(features.shape[0] * frames, per_frame, -1)
        with torch.no_grad():
            plan = self.strategy.make_plan(features, frame, self.site, num_merge, call.random)
        rows = features.shape[0]
        self._reject(
            plan_problem(plan, per_frame, rows, num_merge, self._check_values), "make_plan"
        )
        if frames > 1 and plan.batch == 1 < rows:
            plan = plan.repeat(rows)  # a plan shared by every row serves every frame
        plan = plan.per_frame(frames).with_prefix(prefix).with_suffix(suffix)
        if plan.batch not in (1, x.shape[0]):
            plan = plan.repeat(repeats)
        self._count(plan, x.shape[1], _COMPUTED)
        self._info.shortfall = (wanted - num_merge) * frames
        if num_merge < wanted and not self._warned_shortfall:
            self._warned_shortfall = True
            warnings.warn(
                f"site {self.site.name!r}: {self.strategy.name} can merge only {num_merge} of "
                f"the {wanted} tokens that {self._asked()} asks for among {per_frame} tokens on a "
                f"{layout.grid[0]} x {layout.grid[1]} grid{_per_frame(frames)} (its partition "
                "ran out), and merged what it could; stats() shows the shortfall per site. "
                "Lower the ratio or use smaller windows.",
                ShortfallWarning,
                stacklevel=4,  # the caller of make_plan (past observed)
            )
        return plan

    def _reject(self, problem: str | None, what: str) -> None:
        """One ``InvalidPlanError`` naming the strategy and the site, when a fresh plan (or the
        capacity it is made for) breaks the plan contract: a plan used as it is could give one
        sample's tokens another sample's values."""
        if problem is None:
            return
        raise InvalidPlanError(
            f"strategy {self.strategy.name!r} ({type(self.strategy).__qualname__}) at site "
            f"{self.site.name!r}: {what} broke the plan contract: {problem}. Fix the strategy "
            "(see docs/write-a-strategy.md; tokenmerge.testing.check_strategy finds such bugs) "
            "or use another one."
        )

    def _asked(self) -> str:
        return f"ratio {self.ratio}" if self.config.r is None else f"r={self.config.r}"

    def _metric_image_tokens(self, x: Tensor, prefix: int, n: int, metric: Tensor | None) -> Tensor:
        """The image tokens the plan is made from: those of ``metric`` when it fits this call
        (all of ``x``'s tokens, or its ``n`` image tokens alone), else ``x``'s own."""
        if metric is not None and metric.shape[0] == x.shape[0]:
            if metric.shape[1] == x.shape[1]:
                return metric[:, prefix : prefix + n]
            if metric.shape[1] == n:
                return metric
        return x[:, prefix : prefix + n]

    def check_merged_output(self, plan: Plan, y: Tensor, module: nn.Module) -> None:
        """Raise ``InputError`` unless ``y``, the output of ``module`` run on merged tokens, still
        holds the plan's ``num_out`` tokens (a module that adds or drops tokens cannot be
        unmerged). Reads shapes only."""
        if y.dim() == 3 and y.shape[1] == plan.num_out:
            return
        raise InputError(
            f"site {self.site.name!r}: {type(module).__name__} was given {plan.num_out} merged "
            f"tokens and returned {tuple(y.shape)}, not (batch, {plan.num_out}, channels); "
            "merging needs a module that keeps the token count (its output token i belongs to "
            "its input token i). Exclude this module from the sites (sites={'exclude': [...]}) "
            "or merge around a module that keeps the tokens"
        )

    def count_pass_through(self, reason: str) -> None:
        """Record a call left unmerged because the plan cannot handle it."""
        self._tally(_PASSED)
        self._info.pass_reason = reason

    def _tally(self, counter: int) -> None:
        if torch.compiler.is_compiling():
            self._compiled_counts[counter] += 1
        else:
            self._counts[counter] += 1

    def _count(self, plan: Plan, tokens: int, counter: int, skipped: str | None = None) -> None:
        self._tally(_CALLS)
        self._tally(counter)
        self._info.tokens_in = tokens
        self._info.tokens_out = plan.num_out
        if counter == _COMPUTED:
            self._info.skipped = skipped
            self._info.shortfall = 0

    # ------------------------------------------------------------------ hooks
    def watch_block_input(self, block: nn.Module, fresh: bool = False) -> list[RemovableHandle]:
        """Plan on ``block``'s input (its first argument) instead of each target's own input.

        With ``fresh``, every call of the block plans afresh (for models without steps to cache
        plans over, called through any entry point: a ViT's ``forward_features`` does not pass
        the root hook); the block's targets still share one plan per call.

        The reference is dropped when the block returns; if its forward raises, at the patch's
        next call or ``new_generation()`` (no ``always_call`` hook: under ``torch.compile`` it
        would give every block its own graph).
        """
        watcher = _BlockInput(self, fresh)
        return [
            block.register_forward_pre_hook(watcher.before, with_kwargs=True),
            block.register_forward_hook(watcher.after, with_kwargs=True),
        ]

    def attach_local(
        self,
        module: nn.Module,
        arg_name: str = "hidden_states",
        guard: Guard | None = None,
        adjust: Adjust | None = None,
        correction: ValueCorrection | None = None,
        bias: SizeBias | None = None,
        keys_values: str | None = None,
        check: Check | None = None,
        again: str | None = None,
    ) -> list[RemovableHandle]:
        """Merge ``module``'s hidden states before its forward and unmerge its output after.

        The hidden states are the first positional argument or the keyword ``arg_name``; the
        output is a tensor or a tuple / list whose first element is the tensor to unmerge.
        Calls that ``guard`` rejects, or whose hidden states are not ``(B, N, C)``, pass through
        untouched and are counted in ``stats().passed_through``. ``adjust(plan, kwargs)``, when
        given, returns the keyword arguments of a merged call (e.g. a rotary table reduced to
        the kept tokens' rows). ``guard`` and ``adjust`` must be module-level functions or bound
        methods (``copy.deepcopy`` copies the hooks). ``correction``, when given, corrects the
        copy-unmerged output of a self-attention (``tokenmerge.correction``). ``bias``, when
        given, adds each merged slot's log size to the attention logits of a merged call
        (``tokenmerge.proportional``). ``keys_values``, when given, is the keyword by which the
        module takes the tokens its keys and values come from (diffusers attention's
        ``encoder_hidden_states``): the merged tokens go there, the hidden states stay whole
        (every query) and nothing is unmerged (``MergeConfig.keys_values``). ``check``, when
        given, sees every call about to merge and may refuse it with an ``InputError``.
        ``again``, when given, is a keyword by which the module may take the hidden states a
        second time (OmniGen's and Lumina's self-attention pass them as
        ``encoder_hidden_states``): a call passing that very tensor there gets the merged
        tokens there too.
        """
        hook = _LocalHook(
            self,
            arg_name,
            guard,
            adjust,
            correction,
            bias,
            self.new_target(),
            keys_values,
            check,
            again,
        )
        if correction is not None:
            self.report_correction(correction)
        return [
            module.register_forward_pre_hook(hook.before, with_kwargs=True),
            module.register_forward_hook(hook.after, with_kwargs=True),
        ]

    def merges_keys_values(self) -> None:
        """Show in ``stats()`` that the site's self-attention merges keys and values alone."""
        self._info.keys_values = True

    def report_correction(self, correction: ValueCorrection) -> None:
        """Show ``correction``'s fitted weight in this site's ``stats()`` (``attach_local`` does
        it for the corrections it is given; adapters that unmerge in hooks of their own call
        it for theirs)."""
        self._corrections.append(correction)


class _BlockInput:
    """Hands a block's input to its site's planner for the duration of the block's forward."""

    def __init__(self, patch: SitePatch, fresh: bool = False) -> None:
        self.patch = patch
        self.fresh = fresh

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        self.patch.calls.value.metric = x if isinstance(x, Tensor) and x.dim() == 3 else None
        if self.fresh:
            self.patch.start_fresh()

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.patch.calls.value.metric = None  # never keep an activation alive between calls


class _LocalHook:
    """The pair of hooks of one target sub-module (a class, so ``copy.deepcopy`` copies it)."""

    def __init__(
        self,
        patch: SitePatch,
        arg_name: str,
        guard: Guard | None,
        adjust: Adjust | None,
        correction: ValueCorrection | None,
        bias: SizeBias | None = None,
        target: int = 1,
        keys_values: str | None = None,
        check: Check | None = None,
        again: str | None = None,
    ) -> None:
        self.patch = patch
        self.arg_name = arg_name
        self.guard = guard
        self.adjust = adjust
        self.correction = correction
        self.corrections = per_thread_correction(correction)
        self.bias = bias
        self.target = target
        self.keys_values = keys_values
        self.check = check
        self.again = again  # see SitePatch.attach_local
        #: per thread: the call's plan, with its ``(x, merged, call)`` when a correction needs
        #: them
        self.slots = PerThread(list)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "slots": PerThread(list)}

    @property
    def plans(self) -> list[tuple[Plan | None, tuple | None]]:
        """The calling thread's plan slot (empty between calls)."""
        return self.slots.value

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            x = args[0]
        elif self.arg_name in kwargs:
            x = kwargs[self.arg_name]
        else:
            raise TypeError(
                f"site {self.patch.site.name!r}: {type(module).__name__} was called without "
                f"hidden states (no positional argument and no {self.arg_name!r} keyword)"
            )
        reason = self.guard(args, kwargs) if self.guard is not None else None
        if reason is None and (not isinstance(x, Tensor) or x.dim() != 3):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            reason = f"hidden states of shape {shape}, not (batch, tokens, channels)"
        elif reason is None and x.shape[0] == 0:
            reason = EMPTY_BATCH  # nothing to merge: the module sees its input as given
        plan = self.patch.plan_for(x, self.target) if reason is None else None
        if plan is None:
            self.patch.count_pass_through(
                reason or f"no token grid known for {x.shape[1]} tokens at this call"
            )
        # one slot: a forward that raised left its plan here, and this call replaces it
        slot = self.slots.value
        slot.clear()
        if plan is None or plan.is_identity:
            slot.append((plan, None))
            return None
        if self.check is not None:
            self.check(module, x, args, kwargs)
        if self.correction is None:
            merged, sources = self.patch.observed("merge", plan.merge, x), None
        else:
            merged, sources = self.patch.observed("merge", plan.merge_keeping_sources, x)
        if self.keys_values is not None:  # keys and values from the merged tokens: no unmerge
            slot.append((None, None))
            if self.bias is not None:
                kwargs = self.bias(plan, merged, kwargs)
            return args, {**kwargs, self.keys_values: merged}
        # the call's own arguments (the full rotary table, text tokens) for the correction's fit
        inputs = (x, merged, Call(args, kwargs), sources) if self.correction is not None else None
        slot.append((plan, inputs))
        if self.again is not None and kwargs.get(self.again) is x:
            kwargs = {**kwargs, self.again: merged}
        if self.adjust is not None:
            kwargs = self.adjust(plan, kwargs)
        if self.bias is not None:
            kwargs = self.bias(plan, merged, kwargs)
        if args:
            return (merged, *args[1:]), kwargs
        return args, {**kwargs, self.arg_name: merged}

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        slot = self.slots.value
        if not slot:  # the pre-hook raised before planning
            return None
        plan, inputs = slot.pop()  # never kept past the call
        if plan is None or plan.is_identity:
            return None
        if isinstance(output, Tensor):
            return self._unmerged(module, plan, output, inputs)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            unmerged = self._unmerged(module, plan, output[0], inputs)
            return type(output)([unmerged, *output[1:]])
        raise TypeError(
            f"site {self.patch.site.name!r}: cannot unmerge the output of "
            f"{type(module).__name__} ({type(output).__name__}); expected a tensor or a tuple "
            "whose first element is the hidden states"
        )

    def _unmerged(self, module: nn.Module, plan: Plan, y: Tensor, inputs: tuple | None) -> Tensor:
        """``y`` unmerged; an output with more than one feature axis (Lumina-Next's attention
        returns ``(B, tokens, heads, head_dim)``) is unmerged with its features flattened."""
        observed = self.patch.observed
        if y.dim() > 3 and y.shape[1] == plan.num_out and inputs is None:
            flat = observed("unmerge", self._unmerge, plan, y.flatten(2), None)
            return flat.unflatten(2, y.shape[2:])
        self.patch.check_merged_output(plan, y, module)
        return observed("unmerge", self._unmerge, plan, y, inputs)

    def _unmerge(self, plan: Plan, y: Tensor, inputs: tuple | None) -> Tensor:
        unmerged = plan.unmerge(y)
        if inputs is None:
            return unmerged
        x, merged, call, sources = inputs
        correction = self.corrections.value
        out = correction(
            plan, x, merged, unmerged, observed=self.patch.observed, call=call, sources=sources
        )
        report_fit(self.correction, correction)
        return out


class _ThreadCorrection:
    """Makes a thread's own copy of a value correction: its fit belongs to the thread's plan."""

    def __init__(self, template: ValueCorrection) -> None:
        self.template = template

    def __call__(self) -> ValueCorrection:
        correction = copy.copy(self.template)
        correction._forget()
        return correction


def per_thread_correction(correction: ValueCorrection | None) -> PerThread | None:
    """Each thread's copy of ``correction`` (None for None); the copies' fits show in
    ``correction``'s ``reported()`` through ``report_fit``."""
    return None if correction is None else PerThread(_ThreadCorrection(correction))


def report_fit(template: ValueCorrection, used: ValueCorrection) -> None:
    """Show the fit of a thread's copy ``used`` in ``template`` (what ``stats()`` reads).

    Written at every call without reading ``template`` first: under ``torch.compile`` a read
    would guard on whether it held a fit yet, and add a graph variant."""
    template.beta, template.verified = used.beta, used.verified


def _per_frame(frames: int) -> str:
    return f" (in each of {frames} frames)" if frames > 1 else ""
