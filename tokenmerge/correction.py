"""Value-corrected unmerge: a first-order correction of copying a merged token's output back.

Copy-unmerge gives every token of a merged group the attention output of the group's mean. A
self-attention's output for token ``i`` contains ``i``'s own value with the weight ``p_ii`` it
gives itself; merging replaced that value by the group's mean. The correction adds it back to
every merged-away token:

    y_i += beta * W_o W_v (x_i - mean of i's group)

``W_v`` / ``W_o`` are the value and output projections (without their biases, since only a
difference is projected), ``beta`` one number per sample and site, fitted by least squares on
exact output rows of sampled merged tokens whenever the site makes a new plan (reused with it),
and clamped to ``[0, 1]`` (it stands for an attention weight). Where a model's attention gives
tokens little weight on themselves, the fit drives ``beta`` to 0 and the correction vanishes. The
tokens kept as destinations are left as they are (correcting them too gained little for twice the
work; docs/benchmarks.md).

What the correction needs from the attention - ``W_o W_v`` applied to offsets, and the exact
output rows of sampled queries - comes from a view of the module (``tokenmerge.attention_view``),
so the maths here is the same for every library.

Cost per call with a reused plan: one ``(r, C) x (C, C)`` product with ``beta W_o W_v`` (formed
once per plan) and one ``index_add``, on the plan's own row indices (``Plan.rows``). Per new
plan, also the exact outputs of ``samples`` (16) merged tokens against all keys (in input space
where the keys allow it, see ``QKVView``). A plan used for one call only (a ViT in local mode
plans at every call) applies ``W_o W_v`` to the offsets directly where that is cheaper than
forming the ``C x C`` product.

Gradients: the correction is applied through autograd (the offsets and, when a weight is
trained, the projections themselves) whenever autograd records. ``beta`` is fitted through
autograd too at the call that fits it (a ViT in local mode fits at every call, so its ``beta``
is a function of that call's input); calls that reuse a plan take its ``beta`` as a constant,
like the plan itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .attention_view import NO_CALL, AttentionView, Call, DiffusersAttentionView, corrects
from .observe import unobserved
from .plan import Plan

__all__ = ["ValueCorrection", "corrects"]

_NOT_FITTED = Plan.identity(1)


def _tolerance(dtype: torch.dtype) -> float:
    """How far a view's exact rows may be from the module's own output and still count as the
    same computation (relative): a few rounding errors of the dtype, at least 1e-3."""
    return max(1e-3, 16 * torch.finfo(dtype).eps)


class ValueCorrection:
    """The correction at one self-attention (see the module docstring); a deep copy keeps the
    fitted weight with the copied plan it belongs to.

    Args:
        attention: a view of the attention (``tokenmerge.attention_view``), or a diffusers
            ``Attention`` with a plain processor (``corrects(attention)`` must hold).
        samples: merged tokens per sample whose exact output rows fit ``beta``.
    """

    def __init__(self, attention: nn.Module | AttentionView, samples: int = 16) -> None:
        if not isinstance(attention, AttentionView):
            if not corrects(attention):
                raise TypeError(
                    f"ValueCorrection got a {type(attention).__name__}, which is not a diffusers "
                    "self-attention with a plain processor; pass a view of it instead "
                    "(tokenmerge.attention_view, or tokenmerge.adapters._views.attention_view)"
                )
            attention = DiffusersAttentionView(attention)
        self.view = attention
        self.samples = samples
        self.beta: Tensor | None = None  # (B,): one weight per sample
        #: False (a 0-dim tensor) where a view that verifies itself did not match its module
        self.verified: Tensor | None = None
        self._weighted: Tensor | None = None  # (B, C, C_out): beta * (W_o W_v)^T per sample
        # always a Plan (never None), so torch.compile sees one type here at every call
        self._fitted_for: Plan = _NOT_FITTED

    @property
    def attention(self) -> nn.Module:
        """The attention module corrected."""
        return self.view.module

    def reported(self) -> Tensor | None:
        """The fitted weight averaged over the batch, as ``stats()`` reports it: NaN where the
        view failed its check, None before a fit."""
        if self.beta is None:
            return None
        mean = self.beta.mean()
        return mean if self.verified is None else torch.where(self.verified, mean, torch.nan)

    def _forget(self) -> None:
        self.beta, self.verified, self._weighted = None, None, None
        self._fitted_for = _NOT_FITTED

    def __call__(
        self,
        plan: Plan,
        x: Tensor,
        merged: Tensor,
        y: Tensor,
        observed: Callable = unobserved,
        call: Call = NO_CALL,
        sources: Tensor | None = None,
    ) -> Tensor:
        """``y``, the copy-unmerged output for input ``x`` (``merged``: ``plan.merge(x)``),
        corrected in place (it is ``plan.unmerge``'s fresh tensor); ``beta`` is refitted when
        ``plan`` is not the one it was fitted for. ``call`` holds the call's own arguments
        (text tokens, rotary tables...). ``y`` comes back as it is when the view says the call
        computes something it does not describe (a processor changed after applying, a mask).
        ``sources``: the sources' rows of ``x`` (``Plan.merge_keeping_sources``), when the merge
        kept them.
        A new fit runs through ``observed("fit", ...)`` (the site's ``SitePatch.observed``, so
        observers see it)."""
        view = self.view
        if not view.usable(call):
            self._forget()
            return y
        batch, tokens, channels = y.shape
        fresh = self._fitted_for is not plan or self.beta is None or len(self.beta) != batch
        rows = plan.rows(batch, x.dtype)  # made with the plan by its merge
        src_rows, dst_rows = rows.sources, rows.slots
        width = x.shape[-1]
        if sources is None:
            sources = x.reshape(-1, width).index_select(0, src_rows)
        offsets = (sources - merged.reshape(-1, width).index_select(0, dst_rows)).view(
            batch, -1, width
        )  # (B, r, C)
        tracked = torch.is_grad_enabled() and (
            offsets.requires_grad or y.requires_grad or view.requires_grad()
        )
        beta = self.beta
        if fresh:
            # beta fitted at this call is a function of this call's input: fitted through
            # autograd when it records, or backward would disagree with the forward; kept
            # (detached) with the plan, it is a constant of the calls that reuse the plan
            fitted = offsets if tracked else offsets.detach()
            with torch.set_grad_enabled(tracked):
                beta, weighted, self.verified = observed(
                    "fit", self._fit, plan, x, merged, y, fitted, call
                )
            self.beta = beta.detach().float()
            self._weighted = None if weighted is None else weighted.detach()
            self._fitted_for = plan
        weighted = self._weighted
        if tracked:
            # through autograd: the offsets, the projections and a beta fitted at this call
            correction = self.view.project(offsets, call) * beta.to(offsets.dtype)[:, None, None]
        elif weighted is None and fresh:
            with torch.no_grad():  # the plan's only call so far: W_o W_v on the offsets
                correction = self._projected(offsets, call)
        else:
            if weighted is None:  # the plan is used again: now worth forming the product
                with torch.no_grad():
                    weighted = self._weighted = self._weighted_product(x, call)
            correction = torch.bmm(offsets, weighted)
        flat = y.view(batch * tokens, channels)
        if tracked and fresh:  # out of place: the fit's graph holds y (gather saves its input)
            return flat.index_add(0, src_rows, correction.view(-1, channels)).view_as(y)
        flat.index_add_(0, src_rows, correction.view(-1, channels))
        return y

    def _projected(self, offsets: Tensor, call: Call) -> Tensor:
        """``beta W_o W_v offsets``, the projections applied to the offsets themselves."""
        return self.view.project(offsets, call) * self.beta.to(offsets.dtype)[:, None, None]

    def _product(self, x: Tensor, call: Call) -> Tensor:
        """``(W_o W_v)^T``: row c is ``W_o W_v e_c``, so ``offsets @ product = W_o W_v offsets``."""
        eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
        return self.view.project(eye[None], call)[0]

    def _weighted_product(self, x: Tensor, call: Call) -> Tensor:
        """Each sample's ``beta`` folded into its own copy of the product."""
        product = self._product(x, call)
        return product * self.beta.to(product.dtype)[:, None, None]

    def _fit(
        self, plan: Plan, x: Tensor, merged: Tensor, y: Tensor, offsets: Tensor, call: Call
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Each sample's ``beta``, by least squares on the exact outputs of evenly spread
        merged-away tokens (per sample, so a sample's output never depends on the rest of the
        batch); ``beta W_o W_v`` as a product when forming it costs less than applying the
        projections to this call's offsets; and the view's check where it verifies itself."""
        batch, _, channels = x.shape
        step = max(1, plan.num_merged // self.samples)
        columns = slice(0, step * self.samples, step)
        index = plan.src[:, columns]  # (P, k)
        rows = index.expand(batch, -1)
        exact = self.view.exact_rows(x, index, call, _gather(x, rows))
        residual = (exact - _gather(y, rows)).double()
        # the product is the cheaper route once the offsets outnumber the channels
        product = self._product(x, call) if batch * plan.num_merged >= channels else None
        sampled = offsets[:, columns]
        column = sampled @ product if product is not None else self.view.project(sampled, call)
        column = column.double()
        fit = (column * residual).sum((1, 2)) / (column * column).sum((1, 2)).clamp_min(1e-30)
        beta = fit.clamp(0.0, 1.0)  # float64: the caller keeps it as float32
        verified = None
        if self.view.verify:
            verified = self._matches_module(plan, merged, y, call)
            beta = beta * verified
        weighted = None if product is None else product * beta.to(product.dtype)[:, None, None]
        return beta, weighted, verified

    def _matches_module(self, plan: Plan, merged: Tensor, y: Tensor, call: Call) -> Tensor:
        """Whether the view's exact rows for sampled kept tokens of the merged call are what the
        module returned for them (``y`` at a kept token is its slot's output; the correction
        has not touched it): a 0-dim boolean tensor, read by ``stats()``, never by the call."""
        batch = merged.shape[0]
        step = max(1, plan.num_out // self.samples)
        slots = torch.arange(0, step * self.samples, step, device=merged.device)
        slots = slots[: min(self.samples, plan.num_out)].clamp_max(plan.num_out - 1)[None]
        exact = self.view.exact_rows(merged, slots, call, _gather(merged, slots.expand(batch, -1)))
        kept = plan.kept.gather(1, slots.expand(plan.batch, -1)).expand(batch, -1)
        actual = _gather(y, kept).float()
        error = (exact.float() - actual).norm() / actual.norm().clamp_min(1e-12)
        return error <= _tolerance(merged.dtype)

    def _exact_rows(self, rows: Tensor, x: Tensor) -> Tensor:
        """The attention's output for the queries ``rows (B, k, C)`` against every token of
        ``x``, for a call without further arguments (rows taken at any place: no positions)."""
        index = torch.zeros(1, rows.shape[1], dtype=torch.long, device=rows.device)
        return self.view.exact_rows(x, index, NO_CALL, rows)


def _gather(t: Tensor, rows: Tensor) -> Tensor:
    """Tokens ``rows (B, k)`` of ``t (B, N, C)``: ``(B, k, C)``."""
    return t.gather(1, rows.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
