"""Windows (cells) over a token grid: the shared geometry of the grid-based strategies."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["clamp_window", "num_windows", "window_partition"]


def clamp_window(grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """A window no larger than the grid, so a 1 x N grid still gets 1 x s windows."""
    return min(size[0], grid[0]), min(size[1], grid[1])


def num_windows(grid: tuple[int, int], size: tuple[int, int]) -> int:
    """Windows of ``size`` over ``grid``, windows cut by the grid's edge included."""
    sy, sx = clamp_window(grid, size)
    return math.ceil(grid[0] / sy) * math.ceil(grid[1] / sx)


def window_partition(
    grid: tuple[int, int], size: tuple[int, int], device: torch.device | str | None = None
) -> Tensor:
    """Token indices of every window: ``(num_windows, sy * sx)``, ``-1`` where the grid ended.

    Windows tile the row-major grid from the top-left; a window cut by the right or bottom edge
    is a smaller window (its missing places are ``-1``), not a special case.

    Example:
        >>> window_partition((2, 3), (2, 2)).tolist()
        [[0, 1, 3, 4], [2, -1, 5, -1]]
    """
    h, w = grid
    sy, sx = clamp_window(grid, size)
    rows, cols = math.ceil(h / sy), math.ceil(w / sx)
    index = torch.full((rows * sy, cols * sx), -1, dtype=torch.long, device=device)
    index[:h, :w] = torch.arange(h * w, device=device).view(h, w)
    return index.view(rows, sy, cols, sx).permute(0, 2, 1, 3).reshape(rows * cols, sy * sx)
