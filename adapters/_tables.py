"""Per-token positional tables (rotary embeddings) reduced to the rows of some tokens: what the
ViT adapters hand a merged call, and what the value correction's EVA view rotates queries by."""

from __future__ import annotations

from torch import Tensor

__all__ = ["gather_rows"]


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
