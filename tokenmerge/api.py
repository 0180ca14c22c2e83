"""``apply`` / ``remove`` and the ``Handle`` they work with."""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace as replace_fields
from functools import partial
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.hooks import RemovableHandle

from .adapter import Adapter, AdapterOptions, SiteCandidate
from .calls import PerThread
from .config import MergeConfig
from .errors import (
    AlreadyAppliedError,
    CompiledModelWarning,
    ConfigError,
    NoSitesError,
    UnsupportedModelError,
    close_matches,
)
from .load import format_validation_error, load_config
from .nothing_merged import NothingMergedWatch
from .observe import Observation, Observer
from .patch import SitePatch
from .registry import AdapterSpec, registry
from .selector_check import check_selectors
from .site import GLOB_RULE, Site, SiteStats
from .state import StepState, read_timestep
from .strategy import Strategy

__all__ = ["Handle", "apply", "get_strategy", "remove"]

HANDLE_ATTR = "_tokenmerge_handle"


class _RootHook:
    """Native pre-hook on the patched root: one call of the model = one ``begin_call``.

    It never runs inside a compiled graph (it reads the timestep and keeps Python counters):
    a whole-model ``torch.compile`` breaks the graph here, once, and nowhere else.
    The step state is the calling thread's (``tokenmerge.calls``).
    """

    #: ``_begin_call`` under ``torch.compiler.disable``, made at the first apply rather than by a
    #: decorator: the decorator imports torch._dynamo, 0.9 s that ``import tokenmerge`` would pay.
    #: A class attribute, as the decorator made it, so copies and pickles of a hook carry none.
    _begin: Callable[[_RootHook, tuple, dict], None] | None = None

    def __init__(self, states: PerThread, adapter: Adapter, patches: list[SitePatch]) -> None:
        self.states = states
        self.adapter = adapter
        self.patches = patches
        #: raised by ``Handle.new_generation``; a thread whose state saw an older one starts a
        #: new generation at its next call
        self.epoch = 0
        if _RootHook._begin is None:
            _RootHook._begin = torch.compiler.disable(_RootHook._begin_call)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._begin(args, kwargs)

    def _begin_call(self, args: tuple, kwargs: dict) -> None:
        state: StepState = self.states.value
        timestep = read_timestep(self.adapter.timestep(args, kwargs))
        if state.epoch != self.epoch:
            state.new_generation()
            state.epoch = self.epoch
        new_generation = state.begin_call(
            timestep, _sample_shape(args, kwargs), self.adapter.conditioning(args, kwargs)
        )
        for patch in self.patches:
            patch.begin_call(new_generation, state.replan)


def _sample_shape(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The shape of a root call's first tensor argument (its sample), or None."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    return None


class Handle:
    """A patch applied to a model: remove it, use it as a context manager, read its statistics.

    Example:
        >>> import torch, tokenmerge
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> with tokenmerge.apply(model, "tome", ratio=0.5, adapter="generic",
        ...                       sites={"include": ["0"], "min_tokens": 1}) as handle:
        ...     y = model(torch.randn(2, 64, 8))
        ...     handle.stats()["0"].tokens_out
        32
        >>> hasattr(model, "_tokenmerge_handle")
        False
    """

    def __init__(
        self,
        root: nn.Module,
        config: MergeConfig,
        adapter: Adapter,
        root_hook: _RootHook,
        patches: list[SitePatch],
        removables: list[RemovableHandle],
    ) -> None:
        self.model = root
        self.config = config
        self.adapter = adapter
        self._root_hook = root_hook
        self.patches = patches
        self._removables = removables
        self.removed = False

    @property
    def state(self) -> StepState:
        """The step state of the calling thread (each thread calling the model has its own)."""
        return self._root_hook.states.value

    @property
    def sites(self) -> list[Site]:
        """The sites this patch touched, in model order."""
        return [patch.site for patch in self.patches]

    def stats(self) -> dict[str, SiteStats]:
        """Per-site statistics (copies): tokens in / out, plans computed / reused, shortfall."""
        return {p.site.name: p.stats for p in self.patches}

    def observe(self, observer: Observer) -> Observation:
        """Run every site's plan, merge, unmerge and value-correction fit inside
        ``observer.around(part, site)`` until the returned ``Observation`` is removed (or its
        ``with`` block, which gives the observer, ends); see ``tokenmerge.observe``.

        Example:
            >>> import collections, contextlib, torch, tokenmerge
            >>> from tokenmerge.observe import Observer
            >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
            >>> handle = tokenmerge.apply(model, "tome", ratio=0.5, adapter="generic",
            ...                           sites={"include": ["0"], "min_tokens": 1})
            >>> class Tally(Observer):  # counts the parts; times, logs... as you need
            ...     def __init__(self):
            ...         self.parts = collections.Counter()
            ...     def around(self, part, site):
            ...         self.parts[part] += 1
            ...         return contextlib.nullcontext()
            >>> with handle.observe(Tally()) as tally:
            ...     for _ in range(2):
            ...         _ = model(torch.randn(2, 64, 8))
            >>> dict(tally.parts)
            {'plan': 2, 'merge': 2, 'unmerge': 2}
            >>> handle.remove()
        """
        return Observation(self.patches, observer)

    def new_generation(self) -> None:
        """Drop every cached plan (call between unrelated inputs): this thread's now, every
        other thread's at its next call of the model."""
        self._root_hook.epoch += 1
        self.state.new_generation()
        self.state.epoch = self._root_hook.epoch
        for patch in self.patches:
            patch.begin_call(new_generation=True)

    def remove(self) -> None:
        """Remove every hook and attribute the patch added; calling it again does nothing."""
        if self.removed:
            return
        for removable in reversed(self._removables):
            removable.remove()
        self.adapter.detach(self.model)
        if self.model.__dict__.get(HANDLE_ATTR) is self:
            del self.model.__dict__[HANDLE_ATTR]
        self.removed = True

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        status = "removed" if self.removed else f"{len(self.patches)} sites"
        return f"<tokenmerge.Handle {self.config.strategy} via {self.adapter.name}: {status}>"


def get_strategy(config: str | dict | MergeConfig = "retom", **overrides: Any) -> Strategy:
    """A strategy instance, for planning on tensors directly.

    Example:
        >>> import tokenmerge
        >>> tokenmerge.get_strategy("tome", ratio=0.25).config.ratio
        0.25
    """
    config = load_config(config, **overrides)
    return registry.strategy(config.strategy)(config)


def _compiled_original(obj: Any) -> nn.Module | None:
    """The module a ``torch.compile``'d module wraps, or None when ``obj`` is not one (no
    ``torch._dynamo`` import: without it no compiled module can exist)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None or not isinstance(obj, eval_frame.OptimizedModule):
        return None
    return obj._orig_mod


def _uncompiled(model: Any) -> Any:
    """``model`` with its compiled modules replaced by the modules they wrap, and a warning.

    A compiled module is patched through its original: hooks on ``_orig_mod`` are what the
    compiled forward runs when it compiles, but torch.compile does not guard on hooks, so a
    graph compiled before the patch goes on running without it. A pipeline whose denoiser is
    compiled is looked at through a shallow copy holding the originals (the copy is only read
    to find the denoiser; the user's pipeline keeps its compiled module).
    """
    original = _compiled_original(model)
    if original is not None:
        found, where = original, f"the model ({type(original).__name__})"
    elif isinstance(model, nn.Module):
        return model
    else:
        compiled = {
            name: inner
            for name, value in getattr(model, "__dict__", {}).items()
            if (inner := _compiled_original(value)) is not None
        }
        if not compiled:
            return model
        found = copy.copy(model)
        found.__dict__.update(compiled)
        where = ", ".join(f"{type(model).__name__}.{name}" for name in compiled)
    warnings.warn(
        f"{where} is compiled (torch.compile); tokenmerge patched the module it wraps "
        "(._orig_mod). A graph compiled before this apply does not see the patch (torch.compile "
        "does not recompile when hooks change) and silently runs unmerged, and one compiled "
        "while it is applied keeps merging after handle.remove(). Apply before compiling, or "
        "compile again after apply and after remove: model = torch.compile(model._orig_mod)",
        CompiledModelWarning,
        stacklevel=3,
    )
    return found


def _warn_regionally_compiled(root: nn.Module) -> None:
    """Warn where modules of ``root`` were compiled in place (``module.compile()``) while
    torch.compile ignores hooks in its guards (its default): a graph such a module compiled
    before this apply, or that another module of the same class compiled, runs without the
    hooks - silently unmerged."""
    compiled = [n for n, m in root.named_modules() if getattr(m, "_compiled_call_impl", None)]
    dynamo = sys.modules.get("torch._dynamo")
    if not compiled or dynamo is None or not dynamo.config.skip_nnmodule_hook_guards:
        return
    warnings.warn(
        f"{len(compiled)} module(s) of {type(root).__name__} are compiled in place "
        f"(module.compile(), e.g. {compiled[0]!r}), and torch.compile does not check hooks "
        "by default: a graph compiled before this apply, or by another copy of the same "
        "module class, goes on running without tokenmerge's hooks, silently unmerged. Apply "
        "before the first compiled call, or set torch._dynamo.config.skip_nnmodule_hook_guards "
        "= False before compiling (then changed hooks recompile)",
        CompiledModelWarning,
        stacklevel=3,
    )


def _options(
    spec: AdapterSpec,
    cls: type[Adapter],
    given: AdapterOptions | dict[str, Any] | None,
    deprecated: dict[str, Any],
    model_name: str,
) -> AdapterOptions:
    """``given`` validated against the adapter's options class, with the options the config
    gave the deprecated way (``mode``, ``proportional_attention``) where the adapter takes them."""
    options_class = cls.options_class
    if isinstance(given, AdapterOptions):
        if not isinstance(given, options_class):
            raise ConfigError(
                f"adapter {spec.name!r} takes {options_class.__name__} options (or a dict of "
                f"them); got {type(given).__name__}"
            )
        if not deprecated:
            return given
        given = given.model_dump(exclude_unset=True)
    elif given is not None and not isinstance(given, dict):
        raise ConfigError(
            f"adapter_options must be a dict or a {options_class.__name__}; got "
            f"{type(given).__name__}"
        )
    data = dict(given or {})
    if data and not options_class.model_fields:
        raise ConfigError(
            f"adapter {spec.name!r} (the adapter chosen for {model_name}) takes no options; got "
            f"adapter_options={data!r}. It finds the grid, prefix tokens and timestep itself: "
            "leave adapter_options out (options such as 'grid' or 'num_prefix' belong to the "
            "generic adapter, adapter='generic')"
        )
    for name, value in deprecated.items():
        if name in data:
            raise ConfigError(
                f"{name} given both ways, on the config and in adapter_options; give it once, in "
                f"adapter_options (the config field {name!r} is deprecated)"
            )
        if name in options_class.model_fields:
            data[name] = value
        elif name == "mode" and value not in ("auto", "local"):
            raise ConfigError(
                f"mode {value!r} is not available with the {spec.name!r} adapter; it merges "
                "locally only (mode 'local' or 'auto')"
            )
    try:
        return options_class.model_validate(data)
    except ValidationError as error:
        title = (
            f"options of adapter {spec.name!r} (the adapter chosen for {model_name}; its options "
            f"are {options_class.__name__})"
        )
        fields = list(options_class.model_fields) or ["(none)"]
        raise ConfigError(format_validation_error(title, error, fields, kind="option")) from None


def _build(cls: type[Adapter], options: AdapterOptions) -> Adapter:
    """The adapter, given its validated options. An adapter without options may define an
    ``__init__`` that takes none: it is built without, and handed the (empty) options after."""
    try:
        inspect.signature(cls).bind(options)
    except TypeError:
        adapter = cls()
        adapter.options = options
        return adapter
    return cls(options)


def _choose_adapter(
    model: Any, name: str | None, options: Any, deprecated: dict[str, Any]
) -> Adapter:
    """The adapter for ``model``: each candidate class is asked (``supports`` is a class-level
    check) and only the chosen one is constructed, so an adapter whose construction fails (a
    changed signature in its library, say) cannot break models it does not handle."""
    if name is not None:
        spec = registry.adapter(name)
        cls = spec.load()
        if not cls.supports(model):
            raise UnsupportedModelError(
                f"adapter {name!r} does not support {type(model).__name__}; "
                f"{spec.description or 'see its documentation'}"
            )
        return _build(cls, _options(spec, cls, options, deprecated, type(model).__name__))
    specs = list(registry.table("adapter").values())
    claimants = [spec for spec in specs if spec.claims and spec.claims_model(model)]
    for spec in claimants:
        reason = spec.unavailable_reason()
        if reason is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} needs the {spec.name!r} adapter, which is "
                f"unavailable: {reason}"
            )
        cls = spec.load()
        if cls.supports(model):
            return _build(cls, _options(spec, cls, options, deprecated, type(model).__name__))
        reason = cls.refusal(model)
        if reason is not None:
            raise UnsupportedModelError(f"{type(model).__name__} is not supported: {reason}")
    if claimants:
        raise UnsupportedModelError(
            f"{type(model).__module__}.{type(model).__name__} is not supported: "
            + "; ".join(f"adapter {s.name!r} supports {s.description}" for s in claimants)
            + ". For another model, pass adapter='generic' with sites={'include': [module-name "
            "globs of the attention modules]} (see the generic adapter's documentation)."
        )
    raise UnsupportedModelError(
        f"no adapter supports {type(model).__module__}.{type(model).__name__}; registered "
        f"adapters: {', '.join(s.name for s in specs)}. For your own model, pass "
        "adapter='generic' with sites={'include': [module-name globs of the attention "
        "modules]} (see the generic adapter's documentation)."
    )


def _select(
    adapter: Adapter, candidates: list[SiteCandidate], config: MergeConfig
) -> list[SiteCandidate]:
    sites = config.sites
    kinds = sites.targets()
    if not kinds:
        raise ConfigError(
            "sites.attn, sites.cross_attn and sites.mlp are all off: nothing would merge; "
            "turn at least one on"
        )
    # the adapter's default applies only when the config selects no sites itself
    pool = candidates if sites.explicit else adapter.default_sites(candidates, config)
    num_blocks = max((c.site.block_index or 0 for c in candidates), default=-1) + 1
    chosen = []
    for candidate in pool:
        if not sites.selects(candidate.site, num_blocks):
            continue
        modules = {kind: m for kind, m in candidate.modules.items() if kind in kinds}
        if modules:
            site = replace_fields(candidate.site, targets=tuple(modules))
            chosen.append(SiteCandidate(site, modules))
    if not chosen:
        raise NoSitesError(_no_sites_message(adapter, candidates, config, kinds))
    _check_not_nested(chosen)
    check_selectors(config, [c.site for c in candidates], [c.site for c in chosen])
    return chosen


def _check_not_nested(chosen: list[SiteCandidate]) -> None:
    """Merging inside a module that already merges would unmerge in the wrong order."""
    names = {c.site.name for c in chosen}
    for inner in sorted(names):
        parts = inner.split(".")
        for depth in range(1, len(parts)):
            outer = ".".join(parts[:depth])
            if outer in names:
                raise ConfigError(
                    f"sites {outer!r} and {inner!r} nest (one contains the other); narrow the "
                    "include globs ('*' stays within one name part, '**' crosses dots) or add "
                    "an exclude"
                )


def _no_sites_message(
    adapter: Adapter, candidates: list[SiteCandidate], config: MergeConfig, kinds: Sequence[str]
) -> str:
    names = [c.site.name for c in candidates]
    filters = config.sites.filters()
    given = "sites=" + repr(filters) if filters else "default sites"
    lines = [
        f"the config selects no site in this model (adapter {adapter.name!r}, {given}, "
        f"merging around {', '.join(kinds)})."
    ]
    if not candidates:
        lines.append("The adapter found no candidate site at all in the model.")
    else:
        levels = sorted({c.site.level for c in candidates if c.site.level is not None})
        stages = sorted({c.site.stage for c in candidates if c.site.stage is not None})
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        lines.append(f"Candidate sites: {shown}.")
        if levels:
            lines.append(f"Levels present: {levels}.")
        if stages:
            lines.append(f"Stages present: {stages}.")
        for pattern in config.sites.include:
            matches = close_matches(pattern, names)
            if matches:
                lines.append(f"include {pattern!r} matches nothing; close names: {matches}.")
    lines.append(f"Fix the filters in sites (include / exclude: {GLOB_RULE}).")
    return " ".join(lines)


def apply(
    model: Any,
    config: str | dict | MergeConfig = "retom",
    *,
    adapter: str | None = None,
    adapter_options: AdapterOptions | dict[str, Any] | None = None,
    replace: bool = False,
    **overrides: Any,
) -> Handle:
    """Patch ``model`` to merge tokens, and return the handle that undoes it.

    Args:
        model: the model (or a pipeline holding it) to patch.
        config: a strategy name, a config dict / JSON text, or a ``MergeConfig``.
        adapter: an adapter name; default: the registered adapter that supports the model.
        adapter_options: the adapter's options, a dict or its options object (the adapter's
            ``options_class``; see its documentation), validated against the chosen adapter.
        replace: if the model is patched already, remove that patch and apply this one (as
            re-running a notebook cell expects). The new config is checked first: a bad one
            raises and leaves the old patch in place.
        **overrides: config fields set on top of ``config`` (``ratio=0.5``,
            ``sites={"mlp": True}``...).

    Raises:
        ConfigError: an invalid config or adapter option.
        UnsupportedModelError: no adapter supports the model, or its library is missing.
        NoSitesError: the config selects no site (the message lists the candidates).
        AlreadyAppliedError: the model is patched already and ``replace`` is False.

    Example:
        >>> import torch, tokenmerge
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
        >>> handle = tokenmerge.apply(model, "retom", ratio=0.5, adapter="generic",
        ...                           sites={"include": ["0"], "min_tokens": 1})
        >>> model(torch.randn(1, 16, 4)).shape
        torch.Size([1, 16, 4])
        >>> [site.name for site in handle.sites]
        ['0']
        >>> handle.remove()
    """
    config = load_config(config, **overrides)
    model = _uncompiled(model)
    chosen_adapter = _choose_adapter(
        model, adapter, adapter_options, config.deprecated_adapter_options
    )
    root = chosen_adapter.root(model)
    _warn_regionally_compiled(root)
    existing = root.__dict__.get(HANDLE_ATTR)
    if existing is not None and not replace:
        raise AlreadyAppliedError(
            f"{type(root).__name__} is already patched ({existing!r}); pass replace=True to "
            "replace that patch, or call handle.remove() / tokenmerge.remove(model) first"
        )
    strategy_class = registry.strategy(config.strategy)
    mode = chosen_adapter.mode
    default_ratio = chosen_adapter.default_ratio
    if default_ratio is not None and config.r is None and "ratio" not in config.model_fields_set:
        config = config.model_copy(update={"ratio": default_ratio})
    if config.keys_values is True and not chosen_adapter.merges_keys_values:
        raise ConfigError(
            "keys_values=True (merge only the keys and values of self-attention) needs "
            "attention that takes its keys and values from an argument of their own; the "
            f"{chosen_adapter.name!r} adapter's has none (diffusers UNets and DiT / PixArt "
            "blocks do). Set keys_values='auto' (where it can, tokens elsewhere) or False"
        )
    chosen_adapter.check_config(config)
    selected = _select(chosen_adapter, chosen_adapter.candidates(root), config)
    if config.sites.min_tokens is None:
        config = config.with_min_tokens(chosen_adapter.default_min_tokens)
    if existing is not None:
        existing.remove()
    states = PerThread(partial(StepState, cache_interval=config.cache_interval))
    patches: list[SitePatch] = []
    root_hook = _RootHook(states, chosen_adapter, patches)
    removables = [root.register_forward_pre_hook(root_hook, with_kwargs=True)]
    try:
        for candidate in selected:
            site = replace_fields(candidate.site, mode=mode)
            site_config = config.for_site(site)
            strategy = strategy_class(site_config)
            layout = chosen_adapter.layout_for(site)
            patch = SitePatch(site, strategy, site_config, states.value, layout)
            removables += chosen_adapter.attach(patch, candidate.modules)
            patches.append(patch)
        removables += chosen_adapter.attach_model(root, patches)
        if not chosen_adapter.watches_sites:
            removables += NothingMergedWatch(patches).attach(root)
    except BaseException:
        for removable in reversed(removables):
            removable.remove()
        raise
    handle = Handle(root, config, chosen_adapter, root_hook, patches, removables)
    root.__dict__[HANDLE_ATTR] = handle
    return handle


def remove(model: Any) -> bool:
    """Remove the tokenmerge patch from ``model`` (or from the modules a pipeline holds).

    Returns True when a patch was removed, False when there was none.

    Example:
        >>> import torch, tokenmerge
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = tokenmerge.apply(model, "tome", adapter="generic",
        ...                      sites={"include": ["0"]})
        >>> tokenmerge.remove(model), tokenmerge.remove(model)
        (True, False)
    """
    found = False
    # a pipeline holds its models as attributes, a model its sub-modules in _modules (a
    # CLIPModel is patched in its vision tower)
    attributes = getattr(model, "__dict__", {})
    children = list(attributes.get("_modules", {}).values())
    holders = [model] + [v for v in [*attributes.values(), *children] if isinstance(v, nn.Module)]
    # a compiled module (or a pipeline's compiled denoiser) was patched through its original
    holders += [original for h in holders if (original := _compiled_original(h)) is not None]
    for holder in holders:
        handle = getattr(holder, "__dict__", {}).get(HANDLE_ATTR)
        if handle is not None:
            handle.remove()
            found = True
    return found
