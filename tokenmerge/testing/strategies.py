"""The plugin authoring kit: the conformance checks every strategy and adapter should pass.

The project's own conformance matrix (``tests/test_conformance.py``) runs exactly these checks
on every registered strategy and adapter; a plugin runs them from its own tests. They need torch
only (no pytest, no hypothesis, no model library) and fail by raising ``AssertionError`` with a
message naming the check, the strategy or adapter, the case and what was wrong.

Strategy checks drive plans through the framework's real path (a ``SitePatch`` planning for a
``TokenLayout``, features prepared as the framework prepares them), so they fail where the
framework and a strategy disagree, not only where a strategy disagrees with itself.

Example:
    A strategy plugin checks its strategy by registered name, or by class before registering::

        >>> from tokenmerge.testing import check_strategy
        >>> check_strategy("random")

    An adapter plugin checks its adapter on tiny models of its family, with every registered
    strategy by default (one here); ``run`` calls the model on fixed inputs and returns what it
    returns::

        >>> import torch
        >>> from tokenmerge.testing import check_adapter
        >>> x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
        >>> def tiny_model():
        ...     return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(),
        ...                                torch.nn.Linear(8, 8))
        >>> check_adapter(tiny_model, lambda model: model(x), adapter="generic",
        ...               strategies=["random"], overrides={"include": ["2"], "min_tokens": 1})

    Under pytest, one test per check reports every failing check at once::

        import pytest
        import tokenmerge
        from tokenmerge.testing import ADAPTER_CHECKS, STRATEGY_CHECKS

        @pytest.mark.parametrize("check", STRATEGY_CHECKS)
        def test_my_strategy(check):
            STRATEGY_CHECKS[check](MyStrategy, None)

        @pytest.mark.parametrize("check", ADAPTER_CHECKS)
        @pytest.mark.parametrize("strategy", tokenmerge.list_strategies())
        def test_my_adapter(check, strategy):
            ADAPTER_CHECKS[check](tiny_model, run, strategy, "my_adapter", {"min_tokens": 1})
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from tokenmerge.api import Handle, apply, remove
from tokenmerge.config import MergeConfig, load_config
from tokenmerge.errors import AlreadyAppliedError, PluginError, ShortfallWarning
from tokenmerge.patch import SitePatch
from tokenmerge.plan import Plan
from tokenmerge.registry import registry
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout
from tokenmerge.state import StepState
from tokenmerge.strategy import Strategy

__all__ = [
    "ADAPTER_CHECKS",
    "STRATEGY_CHECKS",
    "check_adapter",
    "check_plan",
    "check_strategy",
]

# ---------------------------------------------------------------------------- failures


class _Failure(AssertionError):
    """A failure already worded with its check, subject and case (not wrapped again)."""


def _require(condition: object, message: str) -> None:
    # not ``assert``: checks must keep working under ``python -O``
    if not condition:
        raise AssertionError(message)


@contextmanager
def _failing_as(check: str, subject: str, case: str = "") -> Iterator[None]:
    """Turn anything raised inside into one ``AssertionError`` naming the check and the case."""
    try:
        yield
    except _Failure:
        raise
    except Exception as error:
        where = f"{check}: {subject}" + (f" ({case})" if case else "")
        if isinstance(error, AssertionError):
            raise _Failure(f"{where}: {error}") from None
        raise _Failure(f"{where}: raised {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------------------- plans


def check_plan(plan: Plan, num_tokens: int, batch: int, num_out: int | None = None) -> None:
    """Check that ``plan`` is a well-formed plan over ``num_tokens`` tokens for ``batch`` samples.

    Its rows are 1 or ``batch``; in every row the kept tokens are ascending, the sources distinct
    and disjoint from them, together they are every token once; each source's destination is a
    kept slot; ``origin`` maps kept tokens to their own slot and sources to their destination's;
    ``dst_count`` and the slot sizes agree and sum to ``num_tokens``.

    Args:
        plan: the plan to check.
        num_tokens: ``N``, the tokens the plan must apply to.
        batch: the batch it is for (its rows must be 1 or this).
        num_out: if given, the number of slots ``M`` it must leave.

    Raises:
        AssertionError: saying what is wrong.

    Example:
        >>> import torch
        >>> plan = Plan.from_assignment(torch.tensor([[1, 3]]), torch.tensor([[0, 2]]), 4)
        >>> check_plan(plan, num_tokens=4, batch=2, num_out=2)
        >>> check_plan(plan, num_tokens=4, batch=2, num_out=3)
        Traceback (most recent call last):
        ...
        AssertionError: the plan leaves 2 tokens, expected 3
    """
    _require(isinstance(plan, Plan), f"expected a tokenmerge.Plan, got {type(plan).__name__}")
    n, rows, m, r = plan.num_tokens, plan.batch, plan.num_out, plan.num_merged
    _require(n == num_tokens, f"the plan is over {n} tokens, expected {num_tokens}")
    _require(rows in (1, batch), f"the plan has {rows} rows for a batch of {batch} (1 or {batch})")
    if num_out is not None:
        _require(m == num_out, f"the plan leaves {m} tokens, expected {num_out}")
    _require(m + r == n, f"{m} kept + {r} merged tokens != {n} tokens")
    shapes = {
        "kept": (rows, m),
        "src": (rows, r),
        "dst": (rows, r),
        "origin": (rows, n),
        "dst_count": (rows, r),
    }
    for field, shape in shapes.items():
        value = getattr(plan, field)
        _require(
            tuple(value.shape) == shape,
            f"plan.{field} has shape {tuple(value.shape)}, expected {shape}",
        )
        _require(
            value.device == plan.device,
            f"plan.{field} is on {value.device}, plan.kept on {plan.device}",
        )
        if field != "dst_count":
            _require(value.dtype == torch.long, f"plan.{field} is {value.dtype}, not torch.long")
    _require(plan.dst_count.is_floating_point(), "plan.dst_count is not floating point")
    for field, high in (("kept", n), ("src", n), ("dst", m), ("origin", m)):
        value = getattr(plan, field)
        if value.numel():
            low, top = int(value.min()), int(value.max())
            _require(
                0 <= low and top < high, f"plan.{field} holds {low}..{top}, outside 0..{high - 1}"
            )
    if m > 1:
        _require(
            bool((plan.kept[:, 1:] > plan.kept[:, :-1]).all()), "kept is not strictly ascending"
        )
    seen = torch.zeros(rows, n, dtype=torch.long, device=plan.device)
    seen.scatter_add_(1, plan.kept, torch.ones_like(plan.kept))
    seen.scatter_add_(1, plan.src, torch.ones_like(plan.src))
    if not bool((seen == 1).all()):
        row, token = (seen != 1).nonzero()[0].tolist()
        times = int(seen[row, token])
        raise AssertionError(
            f"row {row}: token {token} is kept or merged {times} times, not once (sources "
            "must be distinct and disjoint from the kept tokens)"
        )
    slots = torch.arange(m, device=plan.device).expand(rows, -1)
    _require(
        torch.equal(plan.origin.gather(1, plan.kept), slots),
        "origin does not map every kept token to its own slot",
    )
    _require(
        torch.equal(plan.origin.gather(1, plan.src), plan.dst),
        "origin does not map every source to its destination's slot",
    )
    counts = plan.counts
    _require(bool((counts.sum(1) == n).all()), "the slot sizes do not sum to the token count")
    _require(
        torch.equal(plan.dst_count.float(), counts.gather(1, plan.dst)),
        "dst_count is not the size of each source's slot",
    )


# ---------------------------------------------------------------------------- strategy cases

#: grids of the strategy checks: one token, a row, odd, square, and larger odd ones
_GRIDS = ((1, 1), (1, 2), (1, 6), (2, 3), (4, 4), (7, 5), (9, 7))
#: one, odd, even (a classifier-free guidance doubled batch)
_BATCHES = (1, 3, 4)
_SEEDS = (0, 1, 12345)
_CHANNELS = 8
#: the kinds of site adapters describe: plain, UNet stages, progressive, batch-shared plans
_SITES = (
    Site("blocks.0"),
    Site("down_blocks.0.attentions.0", stage="down", level=1),
    Site("mid_block.attentions.0", stage="mid", level=4),
    Site("blocks.1", mode="progressive"),
    Site("transformer_blocks.0", shared_plan=True),
)


@dataclass(frozen=True)
class _Case:
    grid: tuple[int, int]
    batch: int
    ratio: float
    seed: int
    site: Site
    num_prefix: int

    @property
    def n(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.grid, self.num_prefix)

    @property
    def wanted(self) -> int:
        """What the framework asks for before the strategy's capacity caps it."""
        return int(self.ratio * self.n)

    def describe(self) -> str:
        site = self.site
        extra = "".join(
            f", {key} {value!r}"
            for key, value in (("stage", site.stage), ("mode", site.mode))
            if value not in (None, "local")
        )
        if site.shared_plan:
            extra += ", shared plan"
        return (
            f"grid {self.grid[0]} x {self.grid[1]}, batch {self.batch}, ratio {self.ratio!r}, "
            f"seed {self.seed}, site {site.name!r}{extra}, {self.num_prefix} prefix tokens"
        )

    def tokens(self, salt: int = 0) -> Tensor:
        """``(batch, prefix + n, C)`` seeded tokens; every third image token repeats its left
        neighbour, so similarities tie (without touching the global RNG)."""
        h, w = self.grid
        seed = self.seed * 7919 + self.batch * 131 + h * 31 + w + salt * 104729
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.num_prefix + self.n, _CHANNELS, generator=gen)
        image = torch.arange(self.n)
        copies = image[image % 3 == 1] + self.num_prefix
        x[:, copies] = x[:, copies - 1]
        return x


def _resolve(strategy: str | type[Strategy]) -> type[Strategy]:
    if isinstance(strategy, str):
        return registry.strategy(strategy)
    if not (isinstance(strategy, type) and issubclass(strategy, Strategy)):
        raise TypeError(f"expected a strategy name or a Strategy subclass, got {strategy!r}")
    return strategy


def _subject(strategy_class: type[Strategy], options: dict | None) -> str:
    name = getattr(strategy_class, "name", strategy_class.__qualname__)
    return f"strategy {name!r}" + (f" with {options}" if options else "")


def _config(strategy_class: type[Strategy], options: dict | None, **fields: Any) -> MergeConfig:
    data = {"strategy": strategy_class.name, **(options or {}), **fields}
    return strategy_class.config_class.model_validate(data)


def _ratios(strategy_class: type[Strategy], options: dict | None) -> list[float]:
    """0, small, half and just under the strategy's limit (those the config allows)."""
    limit = _config(strategy_class, options).ratio_limit()
    below = math.nextafter(limit, 0.0)
    return sorted({r for r in (0.0, 0.1, 0.5, below) if 0.0 <= r <= limit})


def _cases(strategy_class: type[Strategy], options: dict | None) -> Iterator[_Case]:
    """Every grid x batch x ratio; seeds, sites and prefix tokens cycle through theirs."""
    index = 0
    for grid in _GRIDS:
        for batch in _BATCHES:
            for ratio in _ratios(strategy_class, options):
                site = _SITES[index % len(_SITES)]
                seed = _SEEDS[index % len(_SEEDS)]
                yield _Case(grid, batch, ratio, seed, site, (index // len(_SITES)) % 2)
                index += 1


def _site_patch(
    strategy_class: type[Strategy], options: dict | None, case: _Case, **fields: Any
) -> SitePatch:
    """A site's runtime as ``apply`` builds it, with the layout of ``case``."""
    fields = {"ratio": case.ratio, "seed": case.seed, "min_tokens": 1, **fields}
    config = _config(strategy_class, options, **fields).for_site(case.site)
    layout = case.layout
    return SitePatch(case.site, strategy_class(config), config, StepState(), lambda s, x: layout)


def _framework_plan(patch: SitePatch, x: Tensor) -> Plan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShortfallWarning)
        plan = patch.make_plan(x)
    _require(plan is not None, "the site made no plan")
    return plan


def _features(patch: SitePatch, x: Tensor, case: _Case) -> Tensor:
    """The features the framework hands the strategy for ``x``."""
    features, _ = patch._features(x[:, case.num_prefix :])
    return features


def _strategy_plan(patch: SitePatch, features: Tensor, case: _Case, num_merge: int) -> Plan:
    """The strategy's own plan (no prefix, no repeat), checked to leave its inputs alone."""
    before = features.clone()
    with torch.no_grad():
        plan = patch.strategy.make_plan(
            features, case.layout, case.site, num_merge, SiteRandom(case.seed)
        )
    _require(isinstance(plan, Plan), f"make_plan returned {type(plan).__name__}, not a Plan")
    _require(torch.equal(features, before), "make_plan changed its features in place")
    return plan


def _same_plan(first: Plan, second: Plan, what: str) -> None:
    _require(first.num_tokens == second.num_tokens, f"{what}: different token counts")
    for field in ("kept", "src", "dst", "origin", "dst_count"):
        a, b = getattr(first, field), getattr(second, field)
        _require(a.shape == b.shape and torch.equal(a, b), f"{what}: plan.{field} differs")


def _row_slice(plan: Plan, batch: int, start: int, stop: int | None = None) -> Plan:
    """Rows ``start:stop`` of ``plan`` made for ``batch`` samples (a 1-row plan serves all)."""
    if plan.batch == 1:
        plan = plan.repeat(batch)
    rows = slice(start, stop)
    return dataclasses.replace(
        plan,
        kept=plan.kept[rows],
        src=plan.src[rows],
        dst=plan.dst[rows],
        origin=plan.origin[rows],
        dst_count=plan.dst_count[rows],
    )


# ---------------------------------------------------------------------------- strategy checks


def check_config_class_validates(
    strategy_class: str | type[Strategy], options: dict | None = None
) -> None:
    """The strategy class and its config class are well-formed.

    ``Strategy.validate_class`` passes (a lower-case name; a ``MergeConfig`` subclass whose
    ``strategy`` field is ``Literal[name]`` with that default); the config is frozen and forbids
    extra fields (both declared and enforced); every field has a description; it refuses another
    strategy's name and a ratio above its ``ratio_limit()``, which lies in (0, 1); it round-trips
    through JSON (through the registry's discriminated union when registered); the strategy
    accepts it.

    Args:
        strategy_class: the ``Strategy`` subclass (or a registered strategy's name).
        options: config fields for it (``None``: its defaults).

    Raises:
        AssertionError: naming this check, the strategy and what was wrong.

    Example:
        >>> from tokenmerge.strategies.retom import ReToMStrategy
        >>> check_config_class_validates(ReToMStrategy, {"window_size": {"mid": 4, "*": 2}})
    """
    strategy_class = _resolve(strategy_class)
    check, subject = "config_class_validates", _subject(strategy_class, options)
    with _failing_as(check, subject):
        try:
            name = strategy_class.validate_class()
        except PluginError as error:
            raise AssertionError(str(error)) from None
        config_class = strategy_class.config_class
        settings = config_class.model_config
        _require(settings.get("frozen") is True, f"{config_class.__name__} is not frozen=True")
        _require(
            settings.get("extra") == "forbid",
            f"{config_class.__name__} does not forbid extra fields: extra is "
            f"{settings.get('extra')!r}",
        )
        undescribed = [f for f, info in config_class.model_fields.items() if not info.description]
        _require(not undescribed, f"fields without a description: {undescribed}")
        config = _config(strategy_class, options)
        _require(config.strategy == name, f"config.strategy is {config.strategy!r}, not {name!r}")
        try:
            config.ratio = 0.25
        except (ValidationError, TypeError, AttributeError):
            pass
        else:
            raise AssertionError("assigning config.ratio worked: the config is not frozen")
        for bad, why in (
            ({"_no_such_field": 1}, "an unknown field"),
            ({"strategy": name + "_other"}, f"the strategy name {name + '_other'!r}"),
        ):
            try:
                _config(strategy_class, options, **bad)
            except ValidationError:
                pass
            else:
                raise AssertionError(f"{config_class.__name__} accepted {why}")
        limit = config.ratio_limit()
        _require(0.0 < limit < 1.0, f"ratio_limit() is {limit!r}, outside (0, 1)")
        _config(strategy_class, options, ratio=limit)
        if limit + 1e-6 < 1.0:
            try:
                _config(strategy_class, options, ratio=limit + 1e-6)
            except ValidationError:
                pass
            else:
                raise AssertionError(f"a ratio above ratio_limit() {limit!r} was accepted")
        text = config.model_dump_json()
        _require(
            config_class.model_validate_json(text) == config,
            f"the config does not survive a JSON round trip: {text}",
        )
        if name in registry.strategy_names() and registry.strategy(name) is strategy_class:
            loaded = load_config(text)
            _require(
                type(loaded) is config_class and loaded == config,
                f"load_config of its JSON gave {loaded!r}",
            )
        strategy = strategy_class(config)
        _require(strategy.config is config, "the strategy does not keep its config as .config")


def check_plans_are_well_formed(
    strategy_class: str | type[Strategy], options: dict | None = None
) -> None:
    """Plans are well-formed (see ``check_plan``) on every case, through the framework and direct.

    Through the framework (a ``SitePatch``, protected prefix tokens included) the prefix tokens
    keep their own slots and ``merge`` / ``unmerge`` give the right shapes; called directly on the
    features the framework hands it, ``make_plan`` returns a ``Plan`` and leaves them untouched.

    Args:
        strategy_class: the ``Strategy`` subclass (or a registered strategy's name).
        options: config fields for it (``None``: its defaults).

    Raises:
        AssertionError: naming this check, the strategy, the case and what was wrong.
    """
    strategy_class = _resolve(strategy_class)
    check, subject = "plans_are_well_formed", _subject(strategy_class, options)
    for case in _cases(strategy_class, options):
        with _failing_as(check, subject, case.describe()):
            patch = _site_patch(strategy_class, options, case)
            x = case.tokens()
            p, total = case.num_prefix, case.num_prefix + case.n
            plan = _framework_plan(patch, x)
            check_plan(plan, total, case.batch)
            prefix = torch.arange(p).expand(plan.batch, -1)
            _require(torch.equal(plan.kept[:, :p], prefix), "a prefix token lost its slot")
            _require(torch.equal(plan.origin[:, :p], prefix), "a prefix token was merged")
            merged = plan.merge(x)
            _require(
                merged.shape == (case.batch, plan.num_out, _CHANNELS) and merged.dtype == x.dtype,
                f"merge gave {tuple(merged.shape)} {merged.dtype}",
            )
            _require(plan.unmerge(merged).shape == x.shape, "unmerge did not restore the shape")
            features = _features(patch, x, case)
            num_merge = min(case.wanted, patch.strategy.capacity(case.layout, case.site))
            direct = _strategy_plan(patch, features, case, num_merge)
            check_plan(direct, case.n, features.shape[0], case.n - num_merge)


def check_ratio_zero_is_identity(
    strategy_class: str | type[Strategy], options: dict | None = None
) -> None:
    """Merging nothing gives the identity plan, whose ``merge`` / ``unmerge`` return their input.

    At ratio 0 through the framework; where the ratio asks for no token on a small grid, through
    the framework too (the strategy is then called with ``num_merge=0``); and called directly
    with ``num_merge=0``.

    Args:
        strategy_class: the ``Strategy`` subclass (or a registered strategy's name).
        options: config fields for it (``None``: its defaults).

    Raises:
        AssertionError: naming this check, the strategy, the case and what was wrong.
    """
    strategy_class = _resolve(strategy_class)
    check, subject = "ratio_zero_is_identity", _subject(strategy_class, options)
    for case in _cases(strategy_class, options):
        if case.wanted:
            continue
        with _failing_as(check, subject, case.describe()):
            patch = _site_patch(strategy_class, options, case)
            x = case.tokens()
            _is_identity(_framework_plan(patch, x), x, "through the framework")
            image = x[:, case.num_prefix :]
            direct = _strategy_plan(patch, _features(patch, x, case), case, 0)
            _is_identity(direct, image, "make_plan with num_merge=0")


def _is_identity(plan: Plan, x: Tensor, how: str) -> None:
    n = x.shape[1]
    _require(plan.is_identity, f"{how}: the plan merges {plan.num_merged} tokens, not 0")
    _require(plan.num_tokens == n and plan.num_out == n, f"{how}: not a plan over {n} tokens")
    arange = torch.arange(n).expand(plan.batch, -1)
    _require(torch.equal(plan.kept, arange), f"{how}: kept is not 0..{n - 1}")
    _require(torch.equal(plan.origin, arange), f"{how}: origin is not 0..{n - 1}")
    _require(plan.merge(x) is x and plan.unmerge(x) is x, f"{how}: merge / unmerge copied")


def check_merges_num_merge_up_to_capacity(
    strategy_class: str | type[Strategy], options: dict | None = None
) -> None:
    """A plan merges exactly the tokens asked for, up to the strategy's capacity.

    ``capacity`` is an int in ``0 .. n - 1`` (a token always stays); called with ``num_merge`` of
    0, 1, half and all of it, a plan merges exactly that many; through the framework, a site
    merges ``min(int(ratio * n), capacity)`` and reports the rest as its shortfall, warned once.

    Args:
        strategy_class: the ``Strategy`` subclass (or a registered strategy's name).
        options: config fields for it (``None``: its defaults).

    Raises:
        AssertionError: naming this check, the strategy, the case and what was wrong.
    """
    strategy_class = _resolve(strategy_class)
    check, subject = "merges_num_merge_up_to_capacity", _subject(strategy_class, options)
    for case in _cases(strategy_class, options):
        with _failing_as(check, subject, case.describe()):
            patch = _site_patch(strategy_class, options, case)
            capacity = patch.strategy.capacity(case.layout, case.site)
            _require(
                isinstance(capacity, int) and not isinstance(capacity, bool),
                f"capacity() returned {type(capacity).__name__}, not int",
            )
            _require(
                0 <= capacity <= case.n - 1,
                f"capacity() is {capacity}, outside 0..{case.n - 1} (at least one token stays)",
            )
            x = case.tokens()
            expected = min(case.wanted, capacity)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ShortfallWarning)
                plan = patch.make_plan(x)
            _require(plan is not None, "the site made no plan")
            _require(
                plan.num_merged == expected,
                f"the site merged {plan.num_merged} tokens; ratio {case.ratio!r} of {case.n} "
                f"asks for {case.wanted}, capacity {capacity}: expected {expected}",
            )
            stats = patch.stats
            _require(stats.tokens_out == x.shape[1] - expected, "stats().tokens_out is wrong")
            _require(stats.shortfall == case.wanted - expected, "stats().shortfall is wrong")
            warned = [w for w in caught if issubclass(w.category, ShortfallWarning)]
            _require(
                len(warned) == (1 if expected < case.wanted else 0),
                f"{len(warned)} ShortfallWarnings for a shortfall of {case.wanted - expected}",
            )
            features = _features(patch, x, case)
            for num_merge in sorted({0, 1, capacity // 2, capacity}):
                if num_merge > capacity:
                    continue
                direct = _strategy_plan(patch, features, case, num_merge)
                _require(
                    direct.num_merged == num_merge,
                    f"make_plan(num_merge={num_merge}) merged {direct.num_merged} tokens",
                )
                check_plan(direct, case.n, features.shape[0], case.n - num_merge)


def check_identical_tokens_merge_exactly(
    strategy_class: str | type[Strategy], options: dict | None = None
) -> None:
    """Tokens identical within each slot merge to exactly themselves, and unmerge back exactly.

    For every case's plan: the tokens ``unmerge(z)`` merge to exactly ``z`` (with and without
    token sizes) and the sizes after a merge keep their total. Planning on identical (and on
    all-zero) image tokens gives a well-formed plan that merges and unmerges them exactly.

    Args:
        strategy_class: the ``Strategy`` subclass (or a registered strategy's name).
        options: config fields for it (``None``: its defaults).

    Raises:
        AssertionError: naming this check, the strategy, the case and what was wrong.
    """
    strategy_class = _resolve(strategy_class)
    check, subject = "identical_tokens_merge_exactly", _subject(strategy_class, options)
    for case in _cases(strategy_class, options):
        with _failing_as(check, subject, case.describe()):
            patch = _site_patch(strategy_class, options, case)
            plan = _framework_plan(patch, case.tokens())
            gen = torch.Generator().manual_seed(case.seed)
            total = case.num_prefix + case.n
            z = torch.randn(case.batch, plan.num_out, _CHANNELS, generator=gen)
            x = plan.unmerge(z)
            _require(torch.equal(plan.merge(x), z), "tokens identical within each slot changed")
            _require(torch.equal(plan.unmerge(plan.merge(x)), x), "merge -> unmerge is not exact")
            sizes = torch.randint(1, 5, (case.batch, total), generator=gen).float()
            _require(torch.equal(plan.merge(x, sizes), z), "size-weighted merge is not exact")
            merged_sizes = plan.merge_sizes(sizes)
            _require(
                torch.equal(merged_sizes.sum(1), sizes.sum(1)), "merge_sizes changed the total"
            )
            ones = torch.ones(case.batch, total)
            _require(
                torch.equal(plan.merge_sizes(ones), plan.counts.expand(case.batch, -1)),
                "merge_sizes of ones is not the slot sizes",
            )
            for fill in ("constant", "zero"):
                x = case.tokens()
                token = x[:1, case.num_prefix : case.num_prefix + 1].clone()
                value = token if fill == "constant" else 0.0
                x[:, case.num_prefix :] = value
                same = _framework_plan(_site_patch(strategy_class, options, case), x)
                check_plan(same, total, case.batch)
                merged = same.merge(x)
                _require(
                    bool((merged[:, case.num_prefix :] == x[:1, -1:]).all()),
                    f"{fill} image tokens did not merge to themselves",
                )
                _require(torch.equal(same.unmerge(merged), x), f"{fill} tokens did not round-trip")


def check_same_seed_same_plan(
    strategy_class: str | type[Strategy], options: dict | None = None
) -> None:
    """The same seed, features and site give the same plan, however often it is asked for.

    Two sites with one seed plan alike; a site that starts a new generation (which restarts its
    random stream) plans as it did first; direct calls with equal ``SiteRandom`` streams agree.
    A strategy keeps no state between plans.

    Args:
        strategy_class: the ``Strategy`` subclass (or a registered strategy's name).
        options: config fields for it (``None``: its defaults).

    Raises:
        AssertionError: naming this check, the strategy, the case and what was wrong.
    """
    strategy_class = _resolve(strategy_class)
    check, subject = "same_seed_same_plan", _subject(strategy_class, options)
    for case in _cases(strategy_class, options):
        if not case.wanted:
            continue
        with _failing_as(check, subject, case.describe()):
            x = case.tokens()
            patch = _site_patch(strategy_class, options, case)
            first = _framework_plan(patch, x)
            other = _framework_plan(_site_patch(strategy_class, options, case), x.clone())
            _same_plan(first, other, "two sites with the same seed")
            patch.begin_call(new_generation=True)
            _same_plan(first, _framework_plan(patch, x), "a site after a new generation")
            features = _features(patch, x, case)
            num_merge = first.num_merged
            _same_plan(
                _strategy_plan(patch, features, case, num_merge),
                _strategy_plan(patch, features.clone(), case, num_merge),
                "make_plan with equal SiteRandom streams",
            )


def check_no_global_rng_state_consumed(
    strategy_class: str | type[Strategy], options: dict | None = None
) -> None:
    """Planning never reads nor advances the global RNG (``torch.random.get_rng_state()``).

    Strategies draw from the site's ``SiteRandom`` only: then the same seed gives the same plans
    whatever else the program draws, and a patched model leaves the user's random stream alone.

    Args:
        strategy_class: the ``Strategy`` subclass (or a registered strategy's name).
        options: config fields for it (``None``: its defaults).

    Raises:
        AssertionError: naming this check, the strategy, the case and what was wrong.
    """
    strategy_class = _resolve(strategy_class)
    check, subject = "no_global_rng_state_consumed", _subject(strategy_class, options)
    for case in _cases(strategy_class, options):
        with _failing_as(check, subject, case.describe()):
            x = case.tokens()
            state, initial = torch.random.get_rng_state(), torch.random.initial_seed()
            patch = _site_patch(strategy_class, options, case)
            plan = _framework_plan(patch, x)
            _strategy_plan(patch, _features(patch, x, case), case, plan.num_merged)
            _require(
                torch.equal(torch.random.get_rng_state(), state),
                "planning changed the global RNG state (use the SiteRandom handed to make_plan)",
            )
            _require(torch.random.initial_seed() == initial, "planning re-seeded the global RNG")


def check_plan_batch_is_one_or_the_batch(
    strategy_class: str | type[Strategy], options: dict | None = None
) -> None:
    """A plan has 1 row (shared by the batch) or one per sample, and serves the whole batch.

    For a batch of 1 the plan has 1 row; where the site shares one plan over the batch, 1 row;
    called directly, as many rows as the features or 1. With ``share_cfg_plan`` on a CFG-doubled
    batch both halves get the same plan: the one the second half gets on its own (unless the
    site shares one plan over the batch anyway).

    Args:
        strategy_class: the ``Strategy`` subclass (or a registered strategy's name).
        options: config fields for it (``None``: its defaults).

    Raises:
        AssertionError: naming this check, the strategy, the case and what was wrong.
    """
    strategy_class = _resolve(strategy_class)
    check, subject = "plan_batch_is_one_or_the_batch", _subject(strategy_class, options)
    for case in _cases(strategy_class, options):
        if not case.wanted:
            continue
        with _failing_as(check, subject, case.describe()):
            x = case.tokens()
            patch = _site_patch(strategy_class, options, case)
            plan = _framework_plan(patch, x)
            _require(plan.batch in (1, case.batch), f"{plan.batch} rows for batch {case.batch}")
            if case.batch == 1 or case.site.shared_plan:
                _require(plan.batch == 1, f"{plan.batch} rows where one plan serves the batch")
            _require(plan.unmerge(plan.merge(x)).shape == x.shape, "merge -> unmerge changed shape")
            features = _features(patch, x, case)
            direct = _strategy_plan(patch, features, case, plan.num_merged)
            _require(
                direct.batch in (1, features.shape[0]),
                f"make_plan gave {direct.batch} rows for features of {features.shape[0]} rows",
            )
            for doubled in (2, 4):  # CFG: [uncond, cond] halves
                cfg = dataclasses.replace(case, batch=doubled)
                x = cfg.tokens(salt=1)
                shared = _site_patch(strategy_class, options, cfg, share_cfg_plan=True)
                plan = _framework_plan(shared, x)
                _require(
                    plan.batch in (1, doubled),
                    f"share_cfg_plan: {plan.batch} rows for batch {doubled}",
                )
                half = doubled // 2
                first, second = _row_slice(plan, doubled, 0, half), _row_slice(plan, doubled, half)
                _same_plan(first, second, f"share_cfg_plan, batch {doubled}: the two halves")
                if case.site.shared_plan:  # planned on the whole batch's mean features
                    continue
                alone = _framework_plan(_site_patch(strategy_class, options, cfg), x[half:])
                _same_plan(
                    second,
                    _row_slice(alone, half, 0),
                    f"share_cfg_plan, batch {doubled}: the halves vs the second half alone",
                )


def check_content_blind_gets_empty_features(
    strategy_class: str | type[Strategy], options: dict | None = None
) -> None:
    """A content-blind strategy (``uses_features = False``) plans on ``(1, n, 0)`` features.

    That is what the framework hands it; its plans have one row and do not depend on the
    tokens. A strategy that uses features only needs ``uses_features`` to be a bool.

    Args:
        strategy_class: the ``Strategy`` subclass (or a registered strategy's name).
        options: config fields for it (``None``: its defaults).

    Raises:
        AssertionError: naming this check, the strategy, the case and what was wrong.
    """
    strategy_class = _resolve(strategy_class)
    check, subject = "content_blind_gets_empty_features", _subject(strategy_class, options)
    with _failing_as(check, subject):
        uses = strategy_class.uses_features
        _require(isinstance(uses, bool), f"uses_features is {uses!r}, not a bool")
    if strategy_class.uses_features:
        return
    for case in _cases(strategy_class, options):
        with _failing_as(check, subject, case.describe()):
            patch = _site_patch(strategy_class, options, case)
            x = case.tokens()
            features = _features(patch, x, case)
            _require(features.shape == (1, case.n, 0), f"handed {tuple(features.shape)}")
            plan = _framework_plan(patch, x)
            _require(plan.batch == 1, f"a content-blind plan has {plan.batch} rows, not 1")
            other = _framework_plan(_site_patch(strategy_class, options, case), case.tokens(7))
            _same_plan(plan, other, "plans for different tokens")
            direct = _strategy_plan(patch, torch.empty(1, case.n, 0), case, plan.num_merged)
            check_plan(direct, case.n, 1, plan.num_out - case.num_prefix)


#: every strategy check by name: ``STRATEGY_CHECKS[name](strategy_class, options)``
STRATEGY_CHECKS: dict[str, Callable[..., None]] = {
    "config_class_validates": check_config_class_validates,
    "plans_are_well_formed": check_plans_are_well_formed,
    "ratio_zero_is_identity": check_ratio_zero_is_identity,
    "merges_num_merge_up_to_capacity": check_merges_num_merge_up_to_capacity,
    "identical_tokens_merge_exactly": check_identical_tokens_merge_exactly,
    "same_seed_same_plan": check_same_seed_same_plan,
    "no_global_rng_state_consumed": check_no_global_rng_state_consumed,
    "plan_batch_is_one_or_the_batch": check_plan_batch_is_one_or_the_batch,
    "content_blind_gets_empty_features": check_content_blind_gets_empty_features,
}


def check_strategy(strategy: str | type[Strategy], options: dict | None = None) -> None:
    """Run every strategy check (``STRATEGY_CHECKS``) on a strategy.

    The checks cover a spread of grids (one token, ``1 x n``, odd, square), batches (1, odd,
    even), ratios (0, small, 0.5, just under the strategy's ``ratio_limit()``), seeds and sites.

    Args:
        strategy: a registered strategy's name, or a ``Strategy`` subclass (registered or not).
        options: config fields for the strategy (``None``: its defaults), e.g.
            ``{"partition": "alternate"}``.

    Raises:
        AssertionError: listing every failed check, each naming the strategy, the case and
            what was wrong.

    Example:
        >>> from tokenmerge.testing import check_strategy
        >>> check_strategy("random", {"sx": 4, "sy": 1})
    """
    strategy_class = _resolve(strategy)
    _run_all(
        [lambda check=check: check(strategy_class, options) for check in STRATEGY_CHECKS.values()],
        _subject(strategy_class, options),
    )


def _run_all(calls: Sequence[Callable[[], None]], subject: str) -> None:
    """Run every check; raise one ``AssertionError`` listing all that failed."""
    failures: list[AssertionError] = []
    for call in calls:
        try:
            call()
        except AssertionError as failure:
            failures.append(failure)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        listed = "\n".join(f"- {failure}" for failure in failures)
        raise AssertionError(f"{len(failures)} checks failed for {subject}:\n{listed}") from (
            failures[0]
        )


# ---------------------------------------------------------------------------- adapter helpers


def _tensors(value: Any, path: str = "output") -> list[tuple[str, Tensor]]:
    """Every tensor in ``value`` (a tensor, mapping, sequence or dataclass), with its path."""
    if isinstance(value, Tensor):
        return [(path, value.detach())]
    if isinstance(value, Mapping):
        items = [(f"{path}[{key!r}]", item) for key, item in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    else:
        return []
    return [found for sub, item in items for found in _tensors(item, sub)]


def _outputs(run: Callable[[nn.Module], Any], model: nn.Module) -> list[tuple[str, Tensor]]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ShortfallWarning)  # a shortfall is not a failure here
        found = _tensors(run(model))
    _require(found, "run(model) returned no tensor (return the model's output)")
    return found


def _same_outputs(expected: list, got: list, what: str) -> None:
    _require(
        [p for p, _ in got] == [p for p, _ in expected],
        f"{what}: the output structure changed ({[p for p, _ in got]})",
    )
    for (path, e), (_, g) in zip(expected, got, strict=True):
        _require(
            e.shape == g.shape, f"{what}: {path} has shape {tuple(g.shape)}, not {tuple(e.shape)}"
        )
        _require(e.dtype == g.dtype, f"{what}: {path} is {g.dtype}, not {e.dtype}")
        if not torch.equal(e, g):
            diff = (e.double() - g.double()).abs().max().item() if e.is_floating_point() else "?"
            raise AssertionError(f"{what}: {path} differs (largest difference {diff})")


def _snapshot(model: nn.Module) -> tuple[dict, dict]:
    """Class, ``vars()`` keys and hook keys of every module; the state dict, copied."""
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        hooks = {
            key: list(value)
            for key, value in vars(module).items()
            if "hook" in key and isinstance(value, dict)
        }
        modules[name or "(root)"] = (type(module), sorted(vars(module)), hooks)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return modules, state


def _same_snapshot(before: tuple[dict, dict], after: tuple[dict, dict], what: str) -> None:
    modules, state = before
    now_modules, now_state = after
    _require(list(now_modules) == list(modules), f"{what}: the module tree changed")
    for name, (cls, keys, hooks) in modules.items():
        now_cls, now_keys, now_hooks = now_modules[name]
        _require(now_cls is cls, f"{what}: {name} is a {now_cls.__name__}, was a {cls.__name__}")
        added = sorted(set(now_keys) - set(keys))
        gone = sorted(set(keys) - set(now_keys))
        _require(not added and not gone, f"{what}: vars() of {name}: added {added}, removed {gone}")
        for key, ids in hooks.items():
            _require(
                now_hooks[key] == ids, f"{what}: {name}.{key} holds {now_hooks[key]}, was {ids}"
            )
    _require(list(now_state) == list(state), f"{what}: the state_dict keys changed")
    for key, value in state.items():
        _require(torch.equal(now_state[key], value), f"{what}: state_dict[{key!r}] changed")


def _merge_ratio(strategy: str, overrides: Mapping[str, Any]) -> float:
    """0.5, or the strategy's ratio limit where that is lower."""
    fields = registry.strategy(strategy).config_class.model_fields
    config = {k: v for k, v in overrides.items() if k in fields and k != "ratio"}
    return min(0.5, load_config(strategy, **config).ratio_limit())


def _patch(
    model: nn.Module, strategy: str, adapter: str | None, overrides: Mapping | None, ratio: float
) -> Handle:
    return apply(model, strategy, adapter=adapter, **{**(overrides or {}), "ratio": ratio})


def _merged_somewhere(handle: Handle, what: str) -> None:
    stats = handle.stats()
    reached = {name: s for name, s in stats.items() if s.calls or s.passed_through}
    _require(reached, f"{what}: no site was called (does run(model) reach {sorted(stats)}?)")
    if any(s.calls and s.tokens_out < s.tokens_in for s in reached.values()):
        return
    seen = [
        f"{name} passed {s.passed_through} calls through ({s.pass_reason})"
        if s.passed_through
        else f"{name} {s.tokens_in} -> {s.tokens_out} tokens"
        + (f" (skipped: {s.skipped})" if s.skipped else "")
        for name, s in reached.items()
    ]
    raise AssertionError(f"{what}: no site merged a token: {'; '.join(seen)}")


def _adapter_subject(adapter: str | None, strategy: str, model: nn.Module | None = None) -> str:
    text = f"adapter {adapter or '(chosen by apply)'!r}, strategy {strategy!r}"
    return text + (f", model {type(model).__name__}" if model is not None else "")


# ---------------------------------------------------------------------------- adapter checks


def check_ratio_zero_is_bit_identical(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """At ratio 0 the patched model's outputs are bit-identical to the unpatched model's.

    Run twice (the second call goes through the plan cache); every site that was called reports
    as many tokens out as in.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output (tensors, or a tuple, mapping
            or dataclass holding them: all are compared).
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply`` (``include``, ``min_tokens``,
            ``adapter_options``...); the checks set ``ratio`` themselves.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    model = model_factory()
    with _failing_as("ratio_zero_is_bit_identical", _adapter_subject(adapter, strategy, model)):
        expected = _outputs(run, model)
        handle = _patch(model, strategy, adapter, overrides, 0.0)
        try:
            _same_outputs(expected, _outputs(run, model), "first call at ratio 0")
            _same_outputs(expected, _outputs(run, model), "second call at ratio 0")
            for name, stats in handle.stats().items():
                _require(
                    not stats.calls or stats.tokens_out == stats.tokens_in,
                    f"site {name} went {stats.tokens_in} -> {stats.tokens_out} tokens at ratio 0",
                )
        finally:
            handle.remove()


def check_output_shapes_unchanged(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """At ratio 0.5 the outputs keep their structure, shapes and dtypes, and stay finite.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    model = model_factory()
    with _failing_as("output_shapes_unchanged", _adapter_subject(adapter, strategy, model)):
        expected = _outputs(run, model)
        with _patch(model, strategy, adapter, overrides, _merge_ratio(strategy, overrides or {})):
            got = _outputs(run, model)
        _require([p for p, _ in got] == [p for p, _ in expected], "the output structure changed")
        for (path, e), (_, g) in zip(expected, got, strict=True):
            _require(
                (g.shape, g.dtype, g.device) == (e.shape, e.dtype, e.device),
                f"{path} is {tuple(g.shape)} {g.dtype} on {g.device}, was "
                f"{tuple(e.shape)} {e.dtype} on {e.device}",
            )
            _require(not g.is_floating_point() or bool(g.isfinite().all()), f"{path} not finite")


def check_tokens_merge(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """At ratio 0.5 merging really happens: some site's tokens shrink and the outputs change.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    model = model_factory()
    with _failing_as("tokens_merge", _adapter_subject(adapter, strategy, model)):
        expected = _outputs(run, model)
        ratio = _merge_ratio(strategy, overrides or {})
        with _patch(model, strategy, adapter, overrides, ratio) as handle:
            got = _outputs(run, model)
            _merged_somewhere(handle, f"ratio {ratio}")
        _require(
            any(not torch.equal(e, g) for (_, e), (_, g) in zip(expected, got, strict=True)),
            "the sites merged but every output equals the unpatched model's",
        )


def check_remove_restores_exactly(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """``Handle.remove()`` (and ``tokenmerge.remove``) restore the model exactly.

    After patched calls at ratio 0.5: every module has its class, its ``vars()`` keys and its
    hooks back, the state dict is unchanged, the outputs are bit-identical; removing again does
    nothing; ``tokenmerge.remove(model)`` returns True once, then False, and the handle's own
    ``remove()`` after it does nothing.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    model = model_factory()
    with _failing_as("remove_restores_exactly", _adapter_subject(adapter, strategy, model)):
        before, expected = _snapshot(model), _outputs(run, model)
        ratio = _merge_ratio(strategy, overrides or {})
        handle = _patch(model, strategy, adapter, overrides, ratio)
        _require(not handle.removed, "a fresh handle says it is removed")
        _outputs(run, model)
        _outputs(run, model)
        handle.remove()
        _require(handle.removed, "handle.removed is False after remove()")
        _same_snapshot(before, _snapshot(model), "after handle.remove()")
        _same_outputs(expected, _outputs(run, model), "after handle.remove()")
        handle.remove()
        _same_snapshot(before, _snapshot(model), "after a second handle.remove()")
        _require(remove(model) is False, "tokenmerge.remove found a patch after handle.remove()")
        handle = _patch(model, strategy, adapter, overrides, ratio)
        _outputs(run, model)
        _require(remove(model) is True, "tokenmerge.remove(model) did not find the patch")
        _require(handle.removed, "tokenmerge.remove(model) left the handle unremoved")
        _require(remove(model) is False, "a second tokenmerge.remove(model) found a patch")
        _same_snapshot(before, _snapshot(model), "after tokenmerge.remove(model)")
        _same_outputs(expected, _outputs(run, model), "after tokenmerge.remove(model)")
        handle.remove()
        _same_snapshot(
            before, _snapshot(model), "after handle.remove() following tokenmerge.remove"
        )


def check_context_manager_restores_exactly(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """``with tokenmerge.apply(...) as handle:`` merges inside and restores exactly on exit.

    Also when the body raises: the exception propagates and the model is restored.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """

    class _Boom(Exception):
        pass

    model = model_factory()
    with _failing_as(
        "context_manager_restores_exactly", _adapter_subject(adapter, strategy, model)
    ):
        before, expected = _snapshot(model), _outputs(run, model)
        ratio = _merge_ratio(strategy, overrides or {})
        with _patch(model, strategy, adapter, overrides, ratio) as handle:
            _require(isinstance(handle, Handle), f"__enter__ returned {type(handle).__name__}")
            _outputs(run, model)
            _merged_somewhere(handle, "inside the with block")
        _require(handle.removed, "leaving the with block did not remove the patch")
        _same_snapshot(before, _snapshot(model), "after the with block")
        _same_outputs(expected, _outputs(run, model), "after the with block")
        try:
            with _patch(model, strategy, adapter, overrides, ratio):
                _outputs(run, model)
                raise _Boom
        except _Boom:
            pass
        _same_snapshot(before, _snapshot(model), "after a with block that raised")
        _same_outputs(expected, _outputs(run, model), "after a with block that raised")
        _require(remove(model) is False, "a with block that raised left a patch behind")


def check_second_apply_raises(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """Applying to a patched model raises ``AlreadyAppliedError`` and changes nothing.

    The message says to remove the patch first; the first patch goes on working alike; after
    removing it, applying again works and gives the first patch's outputs (same seed).

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    model = model_factory()
    with _failing_as("second_apply_raises", _adapter_subject(adapter, strategy, model)):
        ratio = _merge_ratio(strategy, overrides or {})
        handle = _patch(model, strategy, adapter, overrides, ratio)
        try:
            first = _outputs(run, model)
            patched = _snapshot(model)
            try:
                second = _patch(model, strategy, adapter, overrides, ratio)
            except AlreadyAppliedError as error:
                _require("remove" in str(error), f"the error does not say how to fix it: {error}")
            else:
                second.remove()
                raise AssertionError("a second apply did not raise AlreadyAppliedError")
            _same_snapshot(patched, _snapshot(model), "after the refused apply")
            handle.new_generation()
            _same_outputs(first, _outputs(run, model), "the first patch after the refused apply")
        finally:
            handle.remove()
        with _patch(model, strategy, adapter, overrides, ratio):
            _same_outputs(first, _outputs(run, model), "applying again after remove()")


def check_global_rng_untouched(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """A patched model draws from the global RNG exactly what the unpatched model draws.

    The global RNG state is restored afterwards.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    model = model_factory()
    with _failing_as("global_rng_untouched", _adapter_subject(adapter, strategy, model)):
        with torch.random.fork_rng(devices=[]):
            start = torch.random.get_rng_state()
            _outputs(run, model)
            plain = torch.random.get_rng_state()
            torch.random.set_rng_state(start)
            with _patch(
                model, strategy, adapter, overrides, _merge_ratio(strategy, overrides or {})
            ):
                _outputs(run, model)
                _require(
                    torch.equal(torch.random.get_rng_state(), plain),
                    "a call of the patched model changed the global RNG state unlike a call of "
                    "the unpatched model (plans must draw from the SiteRandom they are handed)",
                )


def check_works_under_torch_compile(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """``torch.compile(model, backend="eager")`` runs the patched model and matches eager.

    Twice (the second call runs the compiled graphs again), within 1e-4 (float32), each merging;
    removing the patch afterwards still restores the model's outputs exactly. Dynamo's caches
    are reset before and after.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    model = model_factory()
    with _failing_as("works_under_torch_compile", _adapter_subject(adapter, strategy, model)):
        plain = _outputs(run, model)
        torch.compiler.reset()
        handle = _patch(
            model, strategy, adapter, overrides, _merge_ratio(strategy, overrides or {})
        )
        try:
            handle.new_generation()
            eager = _outputs(run, model)
            compiled = torch.compile(model, backend="eager")
            for call in ("first", "second"):
                handle.new_generation()  # the same plans as the eager call
                got = _outputs(run, compiled)
                _merged_somewhere(handle, f"{call} compiled call")
                _require([p for p, _ in got] == [p for p, _ in eager], "the output changed form")
                for (path, e), (_, g) in zip(eager, got, strict=True):
                    tolerance = 1e-4 if e.dtype in (torch.float32, torch.float64) else 1e-2
                    try:
                        torch.testing.assert_close(g, e, atol=tolerance, rtol=tolerance)
                    except AssertionError as error:
                        raise AssertionError(
                            f"{call} compiled call: {path} differs from eager: {error}"
                        ) from None
        finally:
            handle.remove()
            torch.compiler.reset()
        _same_outputs(plain, _outputs(run, model), "after removing the compiled patch")


#: every adapter check by name: ``ADAPTER_CHECKS[name](model_factory, run, strategy, adapter,
#: overrides)``
ADAPTER_CHECKS: dict[str, Callable[..., None]] = {
    "ratio_zero_is_bit_identical": check_ratio_zero_is_bit_identical,
    "output_shapes_unchanged": check_output_shapes_unchanged,
    "tokens_merge": check_tokens_merge,
    "remove_restores_exactly": check_remove_restores_exactly,
    "context_manager_restores_exactly": check_context_manager_restores_exactly,
    "second_apply_raises": check_second_apply_raises,
    "global_rng_untouched": check_global_rng_untouched,
    "works_under_torch_compile": check_works_under_torch_compile,
}


def check_adapter(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    *,
    adapter: str | None = None,
    strategies: Sequence[str] | None = None,
    overrides: dict | None = None,
    compile: bool = False,
) -> None:
    """Run every adapter check (``ADAPTER_CHECKS``) on tiny models, with every strategy.

    Args:
        model_factory: builds a fresh tiny model of the adapter's family (called once per check).
        run: calls the model on fixed inputs and returns its output: a tensor, or a tuple,
            mapping or dataclass holding tensors (every tensor is compared).
        adapter: the adapter's registered name (``None``: the one ``apply`` chooses).
        strategies: strategy names (``None``: every registered strategy).
        overrides: keyword arguments for ``tokenmerge.apply`` (``include``, ``min_tokens``,
            ``adapter_options``...); the checks set ``ratio`` themselves.
        compile: also run ``works_under_torch_compile`` (seconds per strategy).

    Raises:
        AssertionError: listing every failed check, each naming the adapter, the strategy and
            what was wrong.

    Example:
        >>> import torch
        >>> from tokenmerge.testing import check_adapter
        >>> x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
        >>> check_adapter(lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)),
        ...               lambda model: model(x), adapter="generic", strategies=["tome"],
        ...               overrides={"include": ["0"], "min_tokens": 1})
    """
    names = list(strategies) if strategies is not None else registry.strategy_names()
    checks = {
        name: check
        for name, check in ADAPTER_CHECKS.items()
        if compile or name != "works_under_torch_compile"
    }
    calls = [
        lambda check=check, strategy=strategy: check(
            model_factory, run, strategy, adapter, overrides
        )
        for strategy in names
        for check in checks.values()
    ]
    _run_all(calls, f"adapter {adapter or '(chosen by apply)'!r}")
