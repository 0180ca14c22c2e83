"""A third-party strategy, ``demo_pairs``: token 2k+1 merges into token 2k."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tokenmerge import MergeConfig
from tokenmerge.extend import Plan, Strategy, hookimpl


class DemoPairsConfig(MergeConfig):
    """Configuration of ``demo_pairs``."""

    strategy: Literal["demo_pairs"] = Field(
        default="demo_pairs", description="Always 'demo_pairs'."
    )

    def ratio_limit(self) -> float:
        return 0.5

    def ratio_limit_reason(self) -> str:
        return "one token of each pair stays"


class DemoPairsStrategy(Strategy):
    """Merges odd tokens into their even left neighbour, first pairs first."""

    name = "demo_pairs"
    config_class = DemoPairsConfig
    uses_features = False

    def capacity(self, layout, site):
        return layout.num_image_tokens // 2

    def make_plan(self, features, layout, site, num_merge, generator):
        n = layout.num_image_tokens
        if num_merge == 0:
            return Plan.identity(n, features.device)
        src = torch.arange(num_merge, device=features.device) * 2 + 1
        return Plan.from_assignment(src.unsqueeze(0), (src - 1).unsqueeze(0), n)


@hookimpl
def tokenmerge_register_strategies(register):
    register(DemoPairsStrategy)
