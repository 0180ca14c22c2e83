"""Windows (cells) over a token grid: the shared geometry of the grid-based strategies."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

__all__ = [
    "best_per_window",
    "clamp_window",
    "grid_window_labels",
    "made_once",
    "grown_window",
    "num_windows",
    "shared_window_partition",
    "token_indices",
    "window_labels",
    "window_partition",
]


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


def made_once(make: Callable[..., T]) -> Callable[..., T]:
    """``make``, called once per (hashable) arguments and its result shared: for what a plan's
    geometry needs at every planning call of a grid (a few kernels per call otherwise). Callers
    never modify the result. Compiled code makes its own: the cache's Python is not traced."""
    cached = functools.lru_cache(maxsize=128)(make)

    @functools.wraps(make)
    def shared(*args: Any) -> T:
        return make(*args) if torch.compiler.is_compiling() else cached(*args)

    return shared


_shared_partition = made_once(window_partition)


def shared_window_partition(
    grid: tuple[int, int], size: tuple[int, int], device: torch.device | str | None = None
) -> Tensor:
    """``window_partition``, made once per grid, size and device and shared: never modify it."""
    return _shared_partition(tuple(grid), tuple(size), torch.device(device or "cpu"))


# ---------------------------------------------------------------------------- progressive mode
# Tokens no longer form a grid once merged; each keeps the grid position of its destination, so
# windows are taken over those original positions and identified by a label per token.


def grown_window(
    grid: tuple[int, int], size: tuple[int, int], num_tokens: int, num_merge: int
) -> tuple[int, int]:
    """``size``, doubled as often as needed for ``num_merge`` of ``num_tokens`` tokens to merge.

    Every window keeps one token, so at most ``num_tokens - windows`` can merge. Doubling keeps
    the windows nested (a window of side ``2s`` is four of side ``s``) and merges never cross a
    window, so no window ever empties and the count of windows is exact without a look at
    the data.

    Example:
        >>> # 49 windows of 2 x 2 leave room for 4 merges, not 13
        >>> grown_window((14, 14), (2, 2), 53, 13)
        (4, 4)
    """
    sy, sx = size
    while num_windows(grid, (sy, sx)) > num_tokens - num_merge and (sy < grid[0] or sx < grid[1]):
        sy, sx = sy * 2, sx * 2
    return sy, sx


def window_labels(
    positions: Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> tuple[Tensor, int]:
    """The window of every token from its grid position: ``(P, n)`` labels, and the window count.

    Example:
        >>> window_labels(torch.tensor([[0, 2, 4, 5]]), (2, 3), (2, 2))[0].tolist()
        [[0, 1, 0, 1]]
    """
    sy, sx = clamp_window(grid, size)
    table = _label_table(tuple(grid), (sy, sx), positions.device)
    return table[positions], num_windows(grid, (sy, sx))


def grid_window_labels(
    grid: tuple[int, int], size: tuple[int, int], device: torch.device
) -> Tensor:
    """``window_labels`` of a whole grid's tokens in row-major order, ``(1, H * W)``, made once
    per grid, size and device and shared: never modify it.

    Example:
        >>> grid_window_labels((2, 3), (2, 2), torch.device("cpu")).tolist()
        [[0, 0, 1, 0, 0, 1]]
    """
    table = _label_table(tuple(grid), clamp_window(grid, size), torch.device(device))
    return table.unsqueeze(0)


@made_once
def _label_table(grid: tuple[int, int], size: tuple[int, int], device: torch.device) -> Tensor:
    """``(H * W,)`` window of every grid position, made once: one lookup per call instead of
    the arithmetic."""
    (h, w), (sy, sx) = grid, size
    positions = torch.arange(h * w, device=device)
    return (positions // w // sy) * math.ceil(w / sx) + (positions % w) // sx


@made_once
def token_indices(n: int, device: torch.device) -> Tensor:
    """``(1, n)``: ``0 .. n - 1``, made once per size and device and shared: never modify it."""
    return torch.arange(n, device=device).unsqueeze(0)


def best_per_window(score: Tensor, labels: Tensor, count: int) -> Tensor:
    """``(P, count)`` index of the highest-scoring token of every window (ties: the first).

    A window with no token gets index ``n`` (one past the end).
    """
    rows, n = score.shape
    top = score.new_full((rows, count), float("-inf"))
    top = top.scatter_reduce(1, labels, score, "amax", include_self=True)
    tokens = token_indices(n, score.device).expand(rows, -1)
    candidate = torch.where(score >= top.gather(1, labels), tokens, n)
    first = torch.full((rows, count), n, dtype=torch.long, device=score.device)
    return first.scatter_reduce(1, labels, candidate, "amin", include_self=True)
