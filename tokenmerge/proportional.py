"""Proportional attention at local-mode sites: a merged slot weighs as much as its tokens.

Merging averages a group of tokens into one slot, so the attention that runs on the merged
tokens sees one key where there were ``n`` similar ones, and gives the group about ``1 / n`` of
the weight it had. Adding ``log n`` to every query's logit for that key restores it: ``n
exp(q . k) = exp(q . k + log n)``. ToMe does this in progressive mode; here it is done for the
merge-attend-unmerge of local mode, through the additive attention mask the attention module
already takes, so no attention code is replaced.

The per-slot ``log n`` is made with the plan (``Plan.log_counts``), and the bias with it
(``Plan.derived``), for every call that plan serves.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .plan import Plan

__all__ = ["SizeBias"]


def _slot_bias(plan: Plan, context: int, dtype: torch.dtype) -> Tensor:
    """``(P, context + M)``: 0 for the ``context`` tokens in front, each slot's log size after."""
    bias = plan.slot_log_sizes().to(dtype)
    if context:
        bias = torch.cat([bias.new_zeros(bias.shape[0], context), bias], dim=1)
    return bias


class SizeBias:
    """Adds each slot's ``log`` size to a merged attention call's keyword arguments.

    Args:
        keyword: the keyword the attention takes an additive float mask by (diffusers
            ``attention_mask``, timm ``attn_mask``).
        form: ``"diffusers"``: a ``(batch, 1, keys)`` mask, which diffusers' processors spread
            over the heads themselves; ``"sdpa"``: a ``(batch or 1, 1, 1, keys)`` mask that
            broadcasts in ``scaled_dot_product_attention``.
        context: a keyword whose tokens the attention puts before the merged ones among its keys
            (Flux's double-stream ``encoder_hidden_states``); they get a bias of 0.

    Example:
        >>> import torch
        >>> src, dst = torch.tensor([[1, 2]]), torch.tensor([[0, 0]])
        >>> plan = Plan.from_assignment(src, dst, 4)
        >>> bias = SizeBias("attn_mask", "sdpa")
        >>> mask = bias(plan, torch.zeros(1, 2, 8), {})["attn_mask"]
        >>> mask.flatten().tolist()  # log 3, log 1
        [1.0986123085021973, 0.0]
    """

    def __init__(
        self, keyword: str, form: Literal["diffusers", "sdpa"], context: str | None = None
    ) -> None:
        self.keyword = keyword
        self.form = form
        self.context = context

    def __call__(self, plan: Plan, merged: Tensor, kwargs: dict) -> dict:
        """``kwargs`` of the call on ``merged`` (``(B, M, C)``) with the mask added."""
        context = kwargs.get(self.context) if self.context is not None else None
        width = context.shape[1] if isinstance(context, Tensor) else 0
        key = ("size bias", width, merged.dtype)
        bias = plan.derived(key, lambda: _slot_bias(plan, width, merged.dtype))  # (P, keys)
        if self.form == "diffusers":
            mask = bias.unsqueeze(1).expand(merged.shape[0], 1, -1)
        else:
            mask = bias[:, None, None, :]
        given = kwargs.get(self.keyword)
        if isinstance(given, Tensor):  # the call's own mask (already over the merged keys)
            mask = _combined(given, mask)
        return {**kwargs, self.keyword: mask}


def _combined(given: Tensor, bias: Tensor) -> Tensor:
    """The call's own mask with the size bias added: a boolean mask (True: attend) becomes
    additive, its masked keys the dtype's lowest value (not -inf: a query with every key
    masked then gets finite logits, as the model's own masked rows do in most kernels)."""
    if given.dtype == torch.bool:
        return bias.masked_fill(~given, torch.finfo(bias.dtype).min)
    return given.to(bias.dtype) + bias
