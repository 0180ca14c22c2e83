"""ToDo: token downsampling (Smith et al., 2024), keys and values pooled over grid cells.

"ToDo: Token Downsampling for Efficient Generation of High-Resolution Images" keeps every query
and averages the keys and values over ``sy x sx`` cells of the token grid: attention then costs
``N x N / (sy * sx)`` instead of ``N x N``, no output is copied back, and the plan depends on
nothing but the grid, so it is the cheapest of all (made once per grid, a handful of kernels per
call). ``todo`` sets ``keys_values="auto"``: keys and values where the self-attention takes
them from an argument of their own (diffusers UNets, DiT, PixArt), the tokens themselves
elsewhere (a content-blind pooling; ``stats()`` says which per site).

Each cell (cells cut by the grid's edge are smaller) keeps its top-left token as the
destination. A ratio below full pooling (``1 - 1 / (sx * sy)``; 0.75 with the default 2 x 2)
merges the other places round-robin: the second place of every cell first, then the third...,
so the cells shrink evenly. In progressive mode (ViTs) the cells lie over the tokens' original
grid positions and grow as ReToM's windows do, each keeping its first token.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenmerge.config import Ratio
from tokenmerge.plan import Plan
from tokenmerge.rng import SiteRandom
from tokenmerge.selectors import PerSite
from tokenmerge.site import Site, TokenLayout
from tokenmerge.strategies.cells import CellConfig
from tokenmerge.strategy import Strategy, merge_into_representatives
from tokenmerge.windows import (
    best_per_window,
    clamp_window,
    grown_window,
    made_once,
    num_windows,
    window_labels,
    window_partition,
)

__all__ = ["ToDoConfig", "ToDoStrategy"]


class ToDoConfig(CellConfig):
    """Configuration of ``todo``.

    Example:
        >>> import tokenmerge
        >>> config = tokenmerge.load_config("todo")
        >>> config.ratio, config.keys_values, (config.sy, config.sx)
        (0.75, 'auto', (2, 2))
    """

    strategy: Literal["todo"] = Field(default="todo", description="Always 'todo'.")
    ratio: PerSite[Ratio] = Field(
        default=3 / 4,
        description=(
            "Fraction of the keys and values (or tokens) pooled away at each site, at most "
            "1 - 1 / (sx * sy): every cell pooled to one. Default 3 / 4 (2 x 2 cells)."
        ),
    )
    keys_values: bool | Literal["auto"] = Field(
        default="auto",
        description=(
            "Pool only the keys and values of self-attention, keeping every query (ToDo); "
            "'auto': where it can, the tokens elsewhere. Default 'auto'."
        ),
    )


class ToDoStrategy(Strategy):
    """ToDo: keys and values pooled over grid cells. Details in the module docstring."""

    name = "todo"
    config_class = ToDoConfig
    uses_features = False

    def _cell(self, grid: tuple[int, int]) -> tuple[int, int]:
        return clamp_window(grid, (self.config.sy, self.config.sx))

    def capacity(self, layout: TokenLayout, site: Site) -> int:
        if layout.positions is not None:
            return layout.num_image_tokens - 1  # cells grow until one is left
        return layout.num_image_tokens - num_windows(layout.grid, self._cell(layout.grid))

    def make_plan(
        self,
        features: Tensor,
        layout: TokenLayout,
        site: Site,
        num_merge: int,
        rng: SiteRandom,
    ) -> Plan:
        n = layout.num_image_tokens
        if num_merge == 0:
            return Plan.identity(n, features.device)
        if layout.positions is not None:
            return _progressive_plan(layout, self._cell(layout.grid), num_merge)
        return _pooling_plan(layout.grid, self._cell(layout.grid), num_merge, features.device)


def _progressive_plan(layout: TokenLayout, cell: tuple[int, int], num_merge: int) -> Plan:
    """Cells over the original grid positions of the tokens still present (one row: every
    sample holds the same positions); the first token of each stays, the others merge
    round-robin by their place in their cell."""
    positions = layout.positions[:1]
    n = positions.shape[1]
    size = clamp_window(layout.grid, grown_window(layout.grid, cell, n, num_merge))
    labels, count = window_labels(positions, layout.grid, size)
    width = layout.grid[1]
    place = (positions // width % size[0]) * size[1] + positions % width % size[1]
    # earlier places merge first; within a place, the earlier cell (a tie-break below 1)
    score = -(place + positions / (layout.grid[0] * width)).float()
    first = best_per_window(-positions.float(), labels, count).gather(1, labels)
    return merge_into_representatives(first, score, num_merge)


def _make_pooling_plan(
    grid: tuple[int, int], cell: tuple[int, int], num_merge: int, device: torch.device
) -> Plan:
    """The plan merging the first ``num_merge`` tokens of ``_make_pooling_order``."""
    sources, destinations = _make_pooling_order(grid, cell, device)
    n = grid[0] * grid[1]
    return Plan.from_assignment(sources[None, :num_merge], destinations[None, :num_merge], n)


_shared_pooling_plan = made_once(_make_pooling_plan)


def _pooling_plan(
    grid: tuple[int, int], cell: tuple[int, int], num_merge: int, device: torch.device
) -> Plan:
    """The same for every call on the grid, so its tensors are made once and shared, with the
    row indices they keep (``Plan.rows``). Each call gets a plan object of its own all the same:
    what is fitted to a plan (the value correction) is fitted to the call that made it."""
    return _shared_pooling_plan(tuple(grid), tuple(cell), num_merge, torch.device(device)).another()


def _make_pooling_order(
    grid: tuple[int, int], cell: tuple[int, int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Every token but the cells' top-left ones, round-robin over the cells (the second place of
    every cell, then the third...), and each one's top-left token."""
    cells = window_partition(grid, cell, device)  # (windows, places), -1 past the grid's edge
    places = cells[:, 1:].t().flatten()  # place by place, cell by cell
    tops = cells[:, :1].expand(-1, cells.shape[1] - 1).t().flatten()
    # places past the edge go last (a stable sort keeps the order of the rest); their number is
    # known without reading them
    order = torch.sort(places < 0, stable=True).indices
    count = grid[0] * grid[1] - cells.shape[0]
    return places[order[:count]], tops[order[:count]]
