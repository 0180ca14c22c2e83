"""ToMe: bipartite soft matching (Bolya et al., 2023), with tomesd's 2-D cells for grids.

Tokens split into destinations (B) and sources (A). Every A token finds its most similar B token
(cosine similarity of the features); the ``r`` A tokens with the best matches merge into them.

- ``cells`` (tomesd's partition, local mode): one destination per ``sy x sx`` cell, at a random
  place in the cell (the site's private random stream, shared over the batch) or at its
  top-left; rows and columns left over where the grid does not divide are sources only.
- ``alternate`` (ToMe's partition for sequences): even tokens are A, odd tokens are B.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenmerge.errors import ConfigError
from tokenmerge.plan import Plan
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout
from tokenmerge.strategies.cells import CellConfig
from tokenmerge.strategy import Strategy, pick_top
from tokenmerge.windows import clamp_window, made_once

__all__ = ["ToMeConfig", "ToMeStrategy"]


class ToMeConfig(CellConfig):
    """Configuration of ``tome``.

    Example:
        >>> import tokenmerge
        >>> tokenmerge.load_config("tome", ratio=0.5, sx=2, sy=2).random_destinations
        True
    """

    strategy: Literal["tome"] = Field(default="tome", description="Always 'tome'.")
    random_destinations: bool = Field(
        default=True,
        description=(
            "Pick each cell's destination at random (from the site's private random stream, shared "
            "over the batch) rather than the top-left token. Default on, as tomesd's use_rand."
        ),
    )
    partition: Literal["auto", "cells", "alternate"] = Field(
        default="auto",
        description=(
            "'cells': tomesd's 2-D cells; 'alternate': ToMe's even / odd split (at most half "
            "merge). Default 'auto': cells at local-mode sites over a whole grid, alternate "
            "elsewhere."
        ),
    )

    def ratio_limit(self) -> float:
        return 0.5 if self.partition == "alternate" else super().ratio_limit()

    def ratio_limit_reason(self) -> str:
        if self.partition == "alternate":
            return "the alternating partition merges at most half the tokens"
        return super().ratio_limit_reason()


def _make_cell_tokens(
    grid: tuple[int, int], cell: tuple[int, int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(cells, sy * sx)`` tokens of every whole cell, and the tokens of none (the rows and
    columns left over where the grid does not divide)."""
    (h, w), (sy, sx) = grid, cell
    rows, cols = h // sy, w // sx
    tokens = torch.arange(h * w, device=device).view(h, w)
    whole = tokens[: rows * sy, : cols * sx].reshape(rows, sy, cols, sx).transpose(1, 2)
    # the columns right of the cells, then the rows below them (slices: no data-dependent mask)
    leftover = torch.cat(
        [tokens[: rows * sy, cols * sx :].flatten(), tokens[rows * sy :].flatten()]
    )
    return whole.reshape(rows * cols, sy * sx), leftover


_cell_tokens = made_once(_make_cell_tokens)


@made_once
def _other_places(places: int, device: torch.device) -> Tensor:
    """``(places, places - 1)``: row ``d`` lists every place of a cell but ``d``, in order."""
    place = torch.arange(places, device=device)
    other = place[: places - 1].unsqueeze(0)
    return other + (other >= place.unsqueeze(1))  # j, or j + 1 from the destination on


class ToMeStrategy(Strategy):
    """ToMe: bipartite soft matching, on tomesd's 2-D cells or ToMe's alternating partition.

    Details in the module docstring.
    """

    name = "tome"
    config_class = ToMeConfig

    def _uses_cells(self, site: Site, layout: TokenLayout) -> bool:
        # cells tile the whole grid in order; tokens that are a subset of it (merged ones in
        # progressive mode, ViTMAE's kept patches) take the alternating partition
        whole = layout.positions is None
        if self.config.partition == "auto":
            return site.mode == "local" and whole
        if self.config.partition == "cells" and not whole:
            raise ConfigError(
                f"site {site.name!r}: tome's partition='cells' tiles the whole token grid in "
                f"order, but this site's {layout.num_image_tokens} image tokens are a subset of "
                f"the {layout.grid[0]} x {layout.grid[1]} grid (merged in an earlier block, or "
                "patches a model dropped, as ViTMAE does); use partition='auto' or 'alternate'"
            )
        return self.config.partition == "cells"

    def _cells(self, grid: tuple[int, int]) -> tuple[int, int, int, int]:
        sy, sx = clamp_window(grid, (self.config.sy, self.config.sx))
        return sy, sx, grid[0] // sy, grid[1] // sx

    def capacity(self, layout: TokenLayout, site: Site) -> int:
        n = layout.num_image_tokens
        if not self._uses_cells(site, layout):
            return n // 2  # ToMe's cap: at most half the tokens, and none of a single token
        sy, sx, rows, cols = self._cells(layout.grid)
        return n - rows * cols if sy * sx > 1 else 0

    def _cell_partition(
        self, grid: tuple[int, int], device: torch.device, rng: SiteRandom
    ) -> tuple[Tensor, Tensor]:
        """Token indices of the destinations (one per whole cell) and of the sources."""
        sy, sx, rows, cols = self._cells(grid)
        cells, leftover = _cell_tokens(tuple(grid), (sy, sx), torch.device(device))
        if self.config.random_destinations:
            place = rng.integers(sy * sx, (rows * cols,), device)
        else:
            place = torch.zeros(rows * cols, dtype=torch.long, device=device)
        dst = cells.gather(1, place.unsqueeze(1)).squeeze(1)
        # every other place of each cell, from a table of them per destination place
        others = cells.gather(1, _other_places(sy * sx, torch.device(device))[place]).flatten()
        return dst, (torch.cat([others, leftover]) if leftover.numel() else others)

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
        if num_merge == 0 or n < 2:
            return Plan.identity(n, device)
        if not self._uses_cells(site, layout):
            # ToMe's partition: even tokens (sources) against odd ones, as strided views
            similarity = features[:, 0::2] @ features[:, 1::2].transpose(1, 2)
            best, match = similarity.max(dim=-1)
            chosen = pick_top(best, num_merge)
            return Plan.from_assignment(chosen * 2, match.gather(1, chosen) * 2 + 1, n)
        dst_idx, src_idx = self._cell_partition(layout.grid, device, rng)
        if dst_idx.numel() == 0:
            return Plan.identity(n, device)
        # the sources' features against the destinations' only: comparing every token and
        # blocking the destinations' own matches would save building the sources' index, for a
        # third more products (2 x 2 cells), which costs more than it saves (docs/benchmarks.md)
        similarity = features[:, src_idx] @ features[:, dst_idx].transpose(1, 2)
        best, match = similarity.max(dim=-1)
        chosen = pick_top(best, num_merge)
        src = src_idx.expand(features.shape[0], -1).gather(1, chosen)
        return Plan.from_assignment(src, dst_idx[match.gather(1, chosen)], n)
