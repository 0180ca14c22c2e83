"""The strategy checks: what every strategy must guarantee, checked through the framework's path.

Strategy checks drive plans through the framework's real path (a ``SitePatch`` planning for a
``TokenLayout``, features prepared as the framework prepares them), so they fail where the
framework and a strategy disagree, not only where a strategy disagrees with itself. Each runs on
every case of ``StrategyTrial.cases`` (see ``check_strategy``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
from pydantic import ValidationError
from torch import Tensor

from tokenmerge.errors import PluginError, ShortfallWarning
from tokenmerge.load import load_config
from tokenmerge.plan import Plan
from tokenmerge.registry import registry
from tokenmerge.strategy import Strategy

from ._cases import (
    CHANNELS,
    StrategyTrial,
    framework_plan,
    plan_features,
    row_slice,
    same_plan,
    strategy_plan,
)
from ._scaffold import require, run_all
from .plans import check_plan


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
        >>> options = {"window_size": {"mid": 4, "*": 2}}
        >>> check_config_class_validates(ReToMStrategy, options)
    """
    trial, check = StrategyTrial.of(strategy_class, options), "config_class_validates"
    with trial.failing(check):
        try:
            name = trial.cls.validate_class()
        except PluginError as error:
            raise AssertionError(str(error)) from None
        config_class = trial.cls.config_class
        settings = config_class.model_config
        require(settings.get("frozen") is True, f"{config_class.__name__} is not frozen=True")
        require(
            settings.get("extra") == "forbid",
            f"{config_class.__name__} does not forbid extra fields: extra is "
            f"{settings.get('extra')!r}",
        )
        undescribed = [f for f, info in config_class.model_fields.items() if not info.description]
        require(not undescribed, f"fields without a description: {undescribed}")
        config = trial.config()
        require(config.strategy == name, f"config.strategy is {config.strategy!r}, not {name!r}")
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
                trial.config(**bad)
            except ValidationError:
                pass
            else:
                raise AssertionError(f"{config_class.__name__} accepted {why}")
        limit = config.ratio_limit()
        require(0.0 < limit < 1.0, f"ratio_limit() is {limit!r}, outside (0, 1)")
        trial.config(ratio=limit)
        if limit + 1e-6 < 1.0:
            try:
                trial.config(ratio=limit + 1e-6)
            except ValidationError:
                pass
            else:
                raise AssertionError(f"a ratio above ratio_limit() {limit!r} was accepted")
        try:
            require(hash(config) == hash(trial.config()), "equal configs hash differently")
        except TypeError as error:
            raise AssertionError(f"the config is not hashable: {error}") from None
        text = config.model_dump_json()
        require(
            config_class.model_validate_json(text) == config,
            f"the config does not survive a JSON round trip: {text}",
        )
        if name in registry.strategy_names() and registry.strategy(name) is trial.cls:
            loaded = load_config(text)
            require(
                type(loaded) is config_class and loaded == config,
                f"load_config of its JSON gave {loaded!r}",
            )
        strategy = trial.cls(config)
        require(strategy.config is config, "the strategy does not keep its config as .config")


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
    trial, check = StrategyTrial.of(strategy_class, options), "plans_are_well_formed"
    for case in trial.cases():
        with trial.failing(check, case):
            patch = trial.site_patch(case)
            x = case.tokens()
            p, total = case.num_prefix, case.num_prefix + case.n
            plan = framework_plan(patch, x)
            check_plan(plan, total, case.batch)
            prefix = torch.arange(p).expand(plan.batch, -1)
            require(torch.equal(plan.kept[:, :p], prefix), "a prefix token lost its slot")
            require(torch.equal(plan.origin[:, :p], prefix), "a prefix token was merged")
            merged = plan.merge(x)
            require(
                merged.shape == (case.batch, plan.num_out, CHANNELS) and merged.dtype == x.dtype,
                f"merge gave {tuple(merged.shape)} {merged.dtype}",
            )
            require(plan.unmerge(merged).shape == x.shape, "unmerge did not restore the shape")
            features = plan_features(patch, x, case)
            num_merge = min(case.wanted, patch.strategy.capacity(case.layout, case.site))
            direct = strategy_plan(patch, features, case, num_merge)
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
    trial, check = StrategyTrial.of(strategy_class, options), "ratio_zero_is_identity"
    for case in trial.cases(merging=False):
        with trial.failing(check, case):
            patch = trial.site_patch(case)
            x = case.tokens()
            _is_identity(framework_plan(patch, x), x, "through the framework")
            image = x[:, case.num_prefix :]
            direct = strategy_plan(patch, plan_features(patch, x, case), case, 0)
            _is_identity(direct, image, "make_plan with num_merge=0")


def _is_identity(plan: Plan, x: Tensor, how: str) -> None:
    n = x.shape[1]
    require(plan.is_identity, f"{how}: the plan merges {plan.num_merged} tokens, not 0")
    require(plan.num_tokens == n and plan.num_out == n, f"{how}: not a plan over {n} tokens")
    arange = torch.arange(n).expand(plan.batch, -1)
    require(torch.equal(plan.kept, arange), f"{how}: kept is not 0..{n - 1}")
    require(torch.equal(plan.origin, arange), f"{how}: origin is not 0..{n - 1}")
    require(plan.merge(x) is x and plan.unmerge(x) is x, f"{how}: merge / unmerge copied")


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
    trial, check = StrategyTrial.of(strategy_class, options), "merges_num_merge_up_to_capacity"
    for case in trial.cases():
        with trial.failing(check, case):
            patch = trial.site_patch(case)
            capacity = patch.strategy.capacity(case.layout, case.site)
            require(
                isinstance(capacity, int) and not isinstance(capacity, bool),
                f"capacity() returned {type(capacity).__name__}, not int",
            )
            require(
                0 <= capacity <= case.n - 1,
                f"capacity() is {capacity}, outside 0..{case.n - 1} (at least one token stays)",
            )
            x = case.tokens()
            expected = min(case.wanted, capacity)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ShortfallWarning)
                plan = patch.make_plan(x)
            require(plan is not None, "the site made no plan")
            require(
                plan.num_merged == expected,
                f"the site merged {plan.num_merged} tokens; ratio {case.ratio!r} of {case.n} "
                f"asks for {case.wanted}, capacity {capacity}: expected {expected}",
            )
            stats = patch.stats
            require(stats.tokens_out == x.shape[1] - expected, "stats().tokens_out is wrong")
            require(stats.shortfall == case.wanted - expected, "stats().shortfall is wrong")
            warned = [w for w in caught if issubclass(w.category, ShortfallWarning)]
            require(
                len(warned) == (1 if expected < case.wanted else 0),
                f"{len(warned)} ShortfallWarnings for a shortfall of {case.wanted - expected}",
            )
            features = plan_features(patch, x, case)
            for num_merge in sorted({0, 1, capacity // 2, capacity}):
                if num_merge > capacity:
                    continue
                direct = strategy_plan(patch, features, case, num_merge)
                require(
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
    trial, check = StrategyTrial.of(strategy_class, options), "identical_tokens_merge_exactly"
    for case in trial.cases():
        with trial.failing(check, case):
            patch = trial.site_patch(case)
            plan = framework_plan(patch, case.tokens())
            gen = torch.Generator().manual_seed(case.seed)
            total = case.num_prefix + case.n
            z = torch.randn(case.batch, plan.num_out, CHANNELS, generator=gen)
            x = plan.unmerge(z)
            require(torch.equal(plan.merge(x), z), "tokens identical within each slot changed")
            require(torch.equal(plan.unmerge(plan.merge(x)), x), "merge -> unmerge is not exact")
            sizes = torch.randint(1, 5, (case.batch, total), generator=gen).float()
            require(torch.equal(plan.merge(x, sizes), z), "size-weighted merge is not exact")
            merged_sizes = plan.merge_sizes(sizes)
            require(torch.equal(merged_sizes.sum(1), sizes.sum(1)), "merge_sizes changed the total")
            ones = torch.ones(case.batch, total)
            require(
                torch.equal(plan.merge_sizes(ones), plan.counts.expand(case.batch, -1)),
                "merge_sizes of ones is not the slot sizes",
            )
            for fill in ("constant", "zero"):
                x = case.tokens()
                token = x[:1, case.num_prefix : case.num_prefix + 1].clone()
                value = token if fill == "constant" else 0.0
                x[:, case.num_prefix :] = value
                same = framework_plan(trial.site_patch(case), x)
                check_plan(same, total, case.batch)
                merged = same.merge(x)
                require(
                    bool((merged[:, case.num_prefix :] == x[:1, -1:]).all()),
                    f"{fill} image tokens did not merge to themselves",
                )
                require(torch.equal(same.unmerge(merged), x), f"{fill} tokens did not round-trip")


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
    trial, check = StrategyTrial.of(strategy_class, options), "same_seed_same_plan"
    for case in trial.cases(merging=True):
        with trial.failing(check, case):
            x = case.tokens()
            patch = trial.site_patch(case)
            first = framework_plan(patch, x)
            other = framework_plan(trial.site_patch(case), x.clone())
            same_plan(first, other, "two sites with the same seed")
            patch.begin_call(new_generation=True)
            same_plan(first, framework_plan(patch, x), "a site after a new generation")
            features = plan_features(patch, x, case)
            num_merge = first.num_merged
            same_plan(
                strategy_plan(patch, features, case, num_merge),
                strategy_plan(patch, features.clone(), case, num_merge),
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
    trial, check = StrategyTrial.of(strategy_class, options), "no_global_rng_state_consumed"
    for case in trial.cases():
        with trial.failing(check, case):
            x = case.tokens()
            state, initial = torch.random.get_rng_state(), torch.random.initial_seed()
            patch = trial.site_patch(case)
            plan = framework_plan(patch, x)
            strategy_plan(patch, plan_features(patch, x, case), case, plan.num_merged)
            require(
                torch.equal(torch.random.get_rng_state(), state),
                "planning changed the global RNG state (use the SiteRandom handed to make_plan)",
            )
            require(torch.random.initial_seed() == initial, "planning re-seeded the global RNG")


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
    trial, check = StrategyTrial.of(strategy_class, options), "plan_batch_is_one_or_the_batch"
    for case in trial.cases(merging=True):
        with trial.failing(check, case):
            x = case.tokens()
            patch = trial.site_patch(case)
            plan = framework_plan(patch, x)
            require(plan.batch in (1, case.batch), f"{plan.batch} rows for batch {case.batch}")
            if case.batch == 1 or case.site.shared_plan:
                require(plan.batch == 1, f"{plan.batch} rows where one plan serves the batch")
            require(plan.unmerge(plan.merge(x)).shape == x.shape, "merge -> unmerge changed shape")
            features = plan_features(patch, x, case)
            direct = strategy_plan(patch, features, case, plan.num_merged)
            require(
                direct.batch in (1, features.shape[0]),
                f"make_plan gave {direct.batch} rows for features of {features.shape[0]} rows",
            )
            for doubled in (2, 4):  # CFG: [uncond, cond] halves
                cfg = dataclasses.replace(case, batch=doubled)
                x = cfg.tokens(salt=1)
                shared = trial.site_patch(cfg, share_cfg_plan=True)
                plan = framework_plan(shared, x)
                require(
                    plan.batch in (1, doubled),
                    f"share_cfg_plan: {plan.batch} rows for batch {doubled}",
                )
                half = doubled // 2
                first, second = row_slice(plan, doubled, 0, half), row_slice(plan, doubled, half)
                same_plan(first, second, f"share_cfg_plan, batch {doubled}: the two halves")
                if case.site.shared_plan:  # planned on the whole batch's mean features
                    continue
                alone = framework_plan(trial.site_patch(cfg), x[half:])
                same_plan(
                    second,
                    row_slice(alone, half, 0),
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
    trial, check = StrategyTrial.of(strategy_class, options), "content_blind_gets_empty_features"
    with trial.failing(check):
        uses = trial.cls.uses_features
        require(isinstance(uses, bool), f"uses_features is {uses!r}, not a bool")
    if trial.cls.uses_features:
        return
    for case in trial.cases():
        with trial.failing(check, case):
            patch = trial.site_patch(case)
            x = case.tokens()
            features = plan_features(patch, x, case)
            require(features.shape == (1, case.n, 0), f"handed {tuple(features.shape)}")
            plan = framework_plan(patch, x)
            require(plan.batch == 1, f"a content-blind plan has {plan.batch} rows, not 1")
            other = framework_plan(trial.site_patch(case), case.tokens(7))
            same_plan(plan, other, "plans for different tokens")
            direct = strategy_plan(patch, torch.empty(1, case.n, 0), case, plan.num_merged)
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
    trial = StrategyTrial.of(strategy, options)
    run_all(
        [lambda check=check: check(trial.cls, options) for check in STRATEGY_CHECKS.values()],
        trial.subject,
    )
