"""The cases the strategy checks run: grids, batches, ratios, seeds and sites, and the framework's
side of planning (a ``SitePatch`` as ``apply`` builds one) to drive a strategy through.

Every strategy check takes a ``StrategyTrial`` (the strategy class and its options, named in
every failure) and loops over its ``cases()``, each run inside ``trial.failing(check, case)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokenmerge.config import MergeConfig
from tokenmerge.errors import ShortfallWarning
from tokenmerge.patch import SitePatch
from tokenmerge.plan import Plan
from tokenmerge.registry import registry
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout
from tokenmerge.state import StepState
from tokenmerge.strategy import Strategy

from ._scaffold import failing_as, require

#: grids of the strategy checks: one token, a row, odd, square, and larger odd ones
GRIDS = ((1, 1), (1, 2), (1, 6), (2, 3), (4, 4), (7, 5), (9, 7))
#: one, odd, even (a classifier-free guidance doubled batch)
BATCHES = (1, 3, 4)
SEEDS = (0, 1, 12345)
CHANNELS = 8
#: the kinds of site adapters describe: plain, UNet stages, progressive, batch-shared plans
SITES = (
    Site("blocks.0"),
    Site("down_blocks.0.attentions.0", stage="down", level=1),
    Site("mid_block.attentions.0", stage="mid", level=4),
    Site("blocks.1", mode="progressive"),
    Site("transformer_blocks.0", shared_plan=True),
)


@dataclass(frozen=True)
class Case:
    """One grid, batch, ratio, seed, site and number of prefix tokens."""

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
        x = torch.randn(self.batch, self.num_prefix + self.n, CHANNELS, generator=gen)
        image = torch.arange(self.n)
        copies = image[image % 3 == 1] + self.num_prefix
        x[:, copies] = x[:, copies - 1]
        return x


@dataclass(frozen=True)
class StrategyTrial:
    """A strategy class with the options it is checked with.

    Attributes:
        cls: the ``Strategy`` subclass.
        options: config fields for it (None: its defaults).
    """

    cls: type[Strategy]
    options: dict | None = None

    @classmethod
    def of(cls, strategy: str | type[Strategy], options: dict | None = None) -> StrategyTrial:
        """The trial of a registered strategy's name or of a ``Strategy`` subclass."""
        if isinstance(strategy, str):
            return cls(registry.strategy(strategy), options)
        if not (isinstance(strategy, type) and issubclass(strategy, Strategy)):
            raise TypeError(f"expected a strategy name or a Strategy subclass, got {strategy!r}")
        return cls(strategy, options)

    @property
    def subject(self) -> str:
        name = getattr(self.cls, "name", self.cls.__qualname__)
        return f"strategy {name!r}" + (f" with {self.options}" if self.options else "")

    def failing(self, check: str, case: Case | None = None) -> AbstractContextManager[None]:
        """Anything raised inside becomes a failure of ``check`` on this strategy and case."""
        return failing_as(check, self.subject, case.describe() if case is not None else "")

    def config(self, **fields: Any) -> MergeConfig:
        data = {"strategy": self.cls.name, **(self.options or {}), **fields}
        return self.cls.config_class.model_validate(data)

    def ratios(self) -> list[float]:
        """0, small, half and just under the strategy's limit (those the config allows)."""
        limit = self.config().ratio_limit()
        below = math.nextafter(limit, 0.0)
        return sorted({r for r in (0.0, 0.1, 0.5, below) if 0.0 <= r <= limit})

    def cases(self, merging: bool | None = None) -> Iterator[Case]:
        """Every grid x batch x ratio; seeds, sites and prefix tokens cycle through theirs.

        Args:
            merging: True: only the cases whose ratio asks for a token; False: only those whose
                ratio asks for none; None: all.
        """
        index = 0
        ratios = self.ratios()
        for grid in GRIDS:
            for batch in BATCHES:
                for ratio in ratios:
                    site = SITES[index % len(SITES)]
                    seed = SEEDS[index % len(SEEDS)]
                    case = Case(grid, batch, ratio, seed, site, (index // len(SITES)) % 2)
                    index += 1
                    if merging is None or merging == bool(case.wanted):
                        yield case

    def site_patch(self, case: Case, **fields: Any) -> SitePatch:
        """A site's runtime as ``apply`` builds it, with the layout of ``case``."""
        fields = {"ratio": case.ratio, "seed": case.seed, "sites": {"min_tokens": 1}, **fields}
        config = self.config(**fields).for_site(case.site)
        layout = case.layout
        return SitePatch(case.site, self.cls(config), config, StepState(), lambda s, x: layout)


def framework_plan(patch: SitePatch, x: Tensor) -> Plan:
    """The plan the site makes for ``x`` (a shortfall is not a failure here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShortfallWarning)
        plan = patch.make_plan(x)
    require(plan is not None, "the site made no plan")
    return plan


def plan_features(patch: SitePatch, x: Tensor, case: Case) -> Tensor:
    """The features the framework hands the strategy for ``x``."""
    found, _ = patch._features(x[:, case.num_prefix :])
    return found


def strategy_plan(patch: SitePatch, features: Tensor, case: Case, num_merge: int) -> Plan:
    """The strategy's own plan (no prefix, no repeat), checked to leave its inputs alone."""
    before = features.clone()
    with torch.no_grad():
        plan = patch.strategy.make_plan(
            features, case.layout, case.site, num_merge, SiteRandom(case.seed)
        )
    require(isinstance(plan, Plan), f"make_plan returned {type(plan).__name__}, not a Plan")
    require(torch.equal(features, before), "make_plan changed its features in place")
    return plan


def same_plan(first: Plan, second: Plan, what: str) -> None:
    require(first.num_tokens == second.num_tokens, f"{what}: different token counts")
    for field in ("kept", "src", "dst", "origin", "dst_count"):
        a, b = getattr(first, field), getattr(second, field)
        require(a.shape == b.shape and torch.equal(a, b), f"{what}: plan.{field} differs")


def row_slice(plan: Plan, batch: int, start: int, stop: int | None = None) -> Plan:
    """Rows ``start:stop`` of ``plan`` made for ``batch`` samples (a 1-row plan serves all)."""
    if plan.batch == 1:
        plan = plan.repeat(batch)
    rows = slice(start, stop)
    log_counts = plan.log_counts
    return plan.replace(
        kept=plan.kept[rows],
        src=plan.src[rows],
        dst=plan.dst[rows],
        origin=plan.origin[rows],
        dst_count=plan.dst_count[rows],
        log_counts=None if log_counts is None else log_counts[rows],
    )
