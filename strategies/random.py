"""Random: the content-blind baseline, the cheapest plan and the floor for quality.

One destination per ``sy x sx`` cell (cells cut by the grid's edge are smaller), chosen at random;
``r`` of the other tokens chosen uniformly at random, each merged into its own cell's destination.
The plan ignores the features, so one plan serves the whole batch. In progressive mode (ViTs)
the cells lie over the tokens' original grid positions and grow as ReToM's windows do.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenmerge.plan import Plan
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout
from tokenmerge.strategies.cells import CellConfig
from tokenmerge.strategy import Strategy, merge_into_representatives, pick_top
from tokenmerge.windows import (
    best_per_window,
    grown_window,
    num_windows,
    shared_window_partition,
    window_labels,
)

__all__ = ["RandomConfig", "RandomStrategy"]


class RandomConfig(CellConfig):
    """Configuration of ``random``.

    Example:
        >>> import tokenmerge
        >>> tokenmerge.load_config("random", ratio=0.5).sx
        2
    """

    strategy: Literal["random"] = Field(default="random", description="Always 'random'.")


class RandomStrategy(Strategy):
    """Random: content-blind merging, the cheapest plan and the floor for quality.

    Details in the module docstring.
    """

    name = "random"
    config_class = RandomConfig
    uses_features = False

    def _cell(self) -> tuple[int, int]:
        return self.config.sy, self.config.sx

    def capacity(self, layout: TokenLayout, site: Site) -> int:
        if layout.positions is not None:
            return layout.num_image_tokens - 1  # cells grow until one is left
        return layout.num_image_tokens - num_windows(layout.grid, self._cell())

    def make_plan(
        self,
        features: Tensor,
        layout: TokenLayout,
        site: Site,
        num_merge: int,
        rng: SiteRandom,
    ) -> Plan:
        n = layout.num_image_tokens
        device = features.device
        if num_merge == 0:
            return Plan.identity(n, device)
        if layout.positions is not None:
            return self._progressive_plan(layout, num_merge, rng)
        cells = shared_window_partition(layout.grid, self._cell(), device)
        # one draw serves both choices: its low 16 bits pick each cell's destination, all 32
        # bits rank the other tokens (the halves of the hash are independent); -1 is ineligible
        bits = rng.bits(cells.shape, device)
        low = bits & 0xFFFF
        if cells.numel() > n:  # padding slots, where the grid did not divide
            valid = cells >= 0
            low, bits = torch.where(valid, low, -1), torch.where(valid, bits, -1)
        dst_slot = low.argmax(dim=1, keepdim=True)
        rank = bits.scatter_(1, dst_slot, -1)
        chosen = pick_top(rank.flatten(), num_merge)
        src = cells.flatten()[chosen]
        dst = cells.gather(1, dst_slot).squeeze(1)[chosen // cells.shape[1]]
        return Plan.from_assignment(src.unsqueeze(0), dst.unsqueeze(0), n)

    def _progressive_plan(self, layout: TokenLayout, num_merge: int, rng: SiteRandom) -> Plan:
        """Cells over the original grid positions of the tokens still present (one row: the
        plans are shared by the batch, so every sample holds the same positions)."""
        positions = layout.positions[:1]
        n = positions.shape[1]
        device = positions.device
        size = grown_window(layout.grid, self._cell(), n, num_merge)
        labels, count = window_labels(positions, layout.grid, size)
        bits = rng.bits((1, n), device)  # one draw for both choices, as on a grid
        dst_of = best_per_window((bits & 0xFFFF).float(), labels, count).gather(1, labels)
        return merge_into_representatives(dst_of, (bits >> 8).float(), num_merge)
