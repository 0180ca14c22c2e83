"""grid_pool: content-blind strided pooling on a fixed lattice.

The grid of image tokens is cut into ``k x k`` blocks (blocks cut by the grid's edge are
smaller). Each block keeps one token, its *anchor* (the top-left token, or the one nearest the
block's centre), and the other tokens of the block merge into it. When the ratio asks for fewer
merges than that, the sources are taken place by place, row-major within the blocks and across
every block in turn - first the second place of every block, then the third... - so merging
spreads evenly over the image instead of eating it from the top.

The plan ignores the features and draws no random numbers: it is the same at every step, for
every sample and every seed, costs next to nothing and caches perfectly. It is the merging
counterpart of strided downsampling, and a deterministic baseline beside the built-in ``random``.
In progressive mode (vision transformers: tokens merged at one block stay merged) the blocks
lie over the tokens' original grid positions and grow until enough tokens can merge; each keeps
its first token.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenmerge import MergeConfig
from tokenmerge.config import MAX_CELL
from tokenmerge.extend import Plan, Site, Strategy, TokenLayout
from tokenmerge.rng import SiteRandom
from tokenmerge.strategy import merge_into_representatives, pick_top
from tokenmerge.windows import (
    best_per_window,
    clamp_window,
    grown_window,
    num_windows,
    window_labels,
    window_partition,
)

__all__ = ["GridPoolConfig", "GridPoolStrategy"]


class GridPoolConfig(MergeConfig):
    """Configuration of ``grid_pool``: the block size and which token of a block stays.

    Example:
        >>> config = GridPoolConfig(k=3, ratio=0.8)
        >>> config.k, round(config.ratio_limit(), 4)
        (3, 0.8889)
    """

    strategy: Literal["grid_pool"] = Field(default="grid_pool", description="Always 'grid_pool'.")
    k: int = Field(
        default=2,
        ge=2,
        le=MAX_CELL,
        description=(
            "Side of the square blocks, in tokens (at least 2). Each block keeps one token, so at "
            "most 1 - 1/k^2 of the tokens merge. Default 2: 2 x 2 pooling, up to 75%."
        ),
    )
    anchor: Literal["corner", "center"] = Field(
        default="corner",
        description=(
            "The token each block keeps: 'corner' (top-left, a strided downsampling's lattice) or "
            "'center' (the one nearest the block's centre). Default 'corner'."
        ),
    )

    def ratio_limit(self) -> float:
        return 1.0 - 1.0 / (self.k * self.k)

    def ratio_limit_reason(self) -> str:
        return f"one anchor per {self.k} x {self.k} block stays"


class GridPoolStrategy(Strategy):
    """Grid pooling: each k x k block merges into one anchor token; content-blind, deterministic.

    Details in the module docstring.
    """

    name = "grid_pool"
    config_class = GridPoolConfig
    uses_features = False  # handed (1, n, 0) features: one plan serves the whole batch

    def _block(self) -> tuple[int, int]:
        return self.config.k, self.config.k

    def capacity(self, layout: TokenLayout, site: Site) -> int:
        if layout.positions is not None:
            return layout.num_image_tokens - 1  # blocks grow until one token is left
        return layout.num_image_tokens - num_windows(layout.grid, self._block())

    def make_plan(
        self, features: Tensor, layout: TokenLayout, site: Site, num_merge: int, rng: SiteRandom
    ) -> Plan:
        n = layout.num_image_tokens
        device = features.device
        if num_merge == 0:
            return Plan.identity(n, device)
        if layout.positions is not None:
            return self._progressive_plan(layout, num_merge)
        # (blocks, places): the token index at each place of each block, -1 off the grid's edge
        blocks = window_partition(layout.grid, self._block(), device)
        num_blocks, num_places = blocks.shape
        anchor = self._anchor_place(blocks, clamp_window(layout.grid, self._block()))
        place = torch.arange(num_places, device=device)
        eligible = (blocks >= 0) & (place != anchor.unsqueeze(1))
        # place-major, block-minor order; the highest score comes first (exact below 2^24 tokens)
        order = place * num_blocks + torch.arange(num_blocks, device=device).unsqueeze(1)
        score = torch.where(eligible, -order.float(), float("-inf"))
        chosen = pick_top(score.flatten(), num_merge)  # num_merge <= capacity: all eligible
        src = blocks.flatten()[chosen]
        dst = blocks.gather(1, anchor.unsqueeze(1)).squeeze(1)[chosen // num_places]
        return Plan.from_assignment(src.unsqueeze(0), dst.unsqueeze(0), n)

    def _progressive_plan(self, layout: TokenLayout, num_merge: int) -> Plan:
        """Blocks over the original positions of the tokens still present (``layout.positions``,
        one row: every sample holds the same); the earliest token of each block stays."""
        positions = layout.positions[:1]
        size = grown_window(layout.grid, self._block(), positions.shape[1], num_merge)
        labels, count = window_labels(positions, layout.grid, size)
        earliest = -positions.float()
        anchor = best_per_window(earliest, labels, count).gather(1, labels)
        return merge_into_representatives(anchor, earliest, num_merge)

    def _anchor_place(self, blocks: Tensor, size: tuple[int, int]) -> Tensor:
        """The place (row-major, within its block) of the token each block keeps."""
        if self.config.anchor == "corner":  # the top-left place is on the grid in every block
            return torch.zeros(blocks.shape[0], dtype=torch.long, device=blocks.device)
        sy, sx = size
        on_grid = (blocks >= 0).view(-1, sy, sx)
        rows = on_grid.any(dim=2).sum(dim=1)  # a block cut by the grid's edge is smaller
        cols = on_grid.any(dim=1).sum(dim=1)
        row = torch.clamp(rows - 1, max=sy // 2)
        col = torch.clamp(cols - 1, max=sx // 2)
        return row * sx + col
