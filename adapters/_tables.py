"""Per-token positional tables (rotary embeddings) reduced to the rows of some tokens, and
per-pair tables (relative position biases) reduced to their rows and columns: what the ViT
adapters hand a merged call, and what the value correction's EVA view rotates queries by."""

from __future__ import annotations

from torch import Tensor

__all__ = ["gather_pairs", "gather_rows"]


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """Rows ``index (P, n)`` of a per-token table ``(N, D)``, ``(H, N, D)`` or ``(B, H, N, D)``
    (rotary embeddings): ``(P or B, 1 or H, n, D)``, broadcastable over heads."""
    if table.dim() == 2:
        table = table[None, None]
    elif table.dim() == 3:
        table = table[None]
    rows = max(table.shape[0], index.shape[0])
    index = index[:, None, :, None].expand(rows, table.shape[1], -1, table.shape[-1])
    return table.expand(rows, -1, -1, -1).gather(2, index)


def gather_pairs(table: Tensor, index: Tensor) -> Tensor:
    """Rows and columns ``index (P, n)`` of a per-pair table ``(H, N, N)`` or
    ``(B or 1, H, N, N)`` (a relative position bias over the original tokens):
    ``(P or B, H, n, n)``, the bias between the tokens the index names."""
    if table.dim() == 3:
        table = table[None]
    rows = max(table.shape[0], index.shape[0])
    heads, tokens = table.shape[1], table.shape[-1]
    n = index.shape[1]
    index = index.expand(rows, -1)
    picked = table.expand(rows, -1, -1, -1).gather(
        2, index[:, None, :, None].expand(rows, heads, n, tokens)
    )
    return picked.gather(3, index[:, None, None, :].expand(rows, heads, n, n))
