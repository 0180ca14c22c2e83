"""Merge plans: the index tensors that define one merge, and the merge / unmerge primitives.

A plan maps ``N`` tokens onto ``M = N - r`` slots. Each slot keeps one real token (its
*destination*: a ToMe destination or a ReToM representative); each of the ``r`` merged-away
*sources* is averaged into the slot of its destination. Everything here is pure tensor code: no
module is touched, no value is read back to the host, and the same plan can be applied to any
tensor of the same ``(batch, tokens)`` layout (that is what makes caching possible).

Shapes: ``kept (P, M)``, ``src (P, r)``, ``dst (P, r)``, ``origin (P, N)``, where ``P`` is the
batch size of a per-sample plan or 1 for a plan shared by the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

__all__ = ["Plan", "PlanRows"]

T = TypeVar("T")
_MISSING = object()


def _flat_index(index: Tensor, batch: int, tokens: int) -> Tensor:
    """``(P, K)`` token index -> ``(batch * K,)`` row index into ``x.reshape(batch * tokens, C)``.

    Whole-row ``index_select`` / ``index_add`` are an order of magnitude faster on the CPU than
    ``gather`` / ``scatter_add`` with an index expanded over the channels.
    """
    return (index.expand(batch, -1) + _offsets(batch, tokens, index.device)).flatten()


def _offsets(batch: int, tokens: int, device: torch.device) -> Tensor:
    """``(batch, 1)``: the first row of every sample in ``x.reshape(batch * tokens, C)``."""
    return torch.arange(0, batch * tokens, tokens, device=device).unsqueeze(1)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x (B, N, C)``, ``index (P, K)`` -> ``(B, K, C)``: the indexed tokens of every sample."""
    batch, tokens, channels = x.shape
    flat = _flat_index(index, batch, tokens)
    return x.reshape(batch * tokens, channels).index_select(0, flat).view(batch, -1, channels)


class PlanRows(NamedTuple):
    """A plan's indices as rows of ``x.reshape(batch * tokens, channels)`` for one batch size,
    and the sources' shares in one dtype: what merge and unmerge index with.

    Made once per plan, batch and dtype (``Plan.rows``) and reused by every call the plan
    serves: the index arithmetic would otherwise be a handful of kernels per call.

    Attributes:
        kept: ``(B * M,)`` row of the token each slot keeps.
        pairs: ``(2 * B * r,)`` rows of the sources, then of their destination tokens.
        slots: ``(B * r,)`` row, among the merged tokens, of each source's slot.
        origin: ``(B * N,)`` row, among the merged tokens, of every token's slot.
        weight: ``(B * r, 1)`` each source's share of its slot's mean when every token has
            size 1 (local mode).
    """

    kept: Tensor
    pairs: Tensor
    slots: Tensor
    origin: Tensor
    weight: Tensor

    @property
    def sources(self) -> Tensor:
        """``(B * r,)`` rows of the sources."""
        return self.pairs[: self.slots.shape[0]]


@dataclass(frozen=True, eq=False)
class Plan:
    """One merge of ``num_tokens`` tokens into ``num_tokens - num_merged`` slots.

    Attributes:
        kept: ``(P, M)`` index of the token each slot keeps, ascending (token order is kept).
        src: ``(P, r)`` index of each merged-away source token.
        dst: ``(P, r)`` slot (``0 .. M-1``) each source merges into.
        origin: ``(P, N)`` slot of every token (its own for kept tokens, its destination's for
            sources): unmerge is a single gather along it.
        dst_count: ``(P, r)`` float32 count of the tokens in each source's slot; ``1 / count`` is
            the source's share of the slot's mean when every token has size 1 (local mode), taken
            in the input's dtype at merge time.
        num_tokens: ``N``.
        log_counts: ``(P, M)`` float32 log of how many tokens each slot stands for, made with
            the plan (``from_assignment``) because every merged attention call with
            proportional attention adds it to its logits (``tokenmerge.proportional``); None
            in plans built field by field, where ``slot_log_sizes`` computes it.

    Example:
        >>> import torch
        >>> src, dst = torch.tensor([[1, 3]]), torch.tensor([[0, 2]])
        >>> plan = Plan.from_assignment(src, dst, 4)
        >>> x = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
        >>> plan.merge(x).flatten().tolist()
        [2.0, 6.0]
        >>> plan.unmerge(plan.merge(x)).flatten().tolist()
        [2.0, 2.0, 6.0, 6.0]
    """

    kept: Tensor
    src: Tensor
    dst: Tensor
    origin: Tensor
    dst_count: Tensor
    num_tokens: int
    log_counts: Tensor | None = None
    #: what calls derive from the plan (``PlanRows`` by batch and dtype...), made once
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def identity(cls, num_tokens: int, device: torch.device | str | None = None) -> Plan:
        """The plan that merges nothing: ``merge`` and ``unmerge`` return their input object."""
        arange = torch.arange(num_tokens, device=device).unsqueeze(0)
        empty = torch.empty(1, 0, dtype=torch.long, device=device)
        return cls(
            kept=arange,
            src=empty,
            dst=empty,
            origin=arange,
            dst_count=torch.empty(1, 0, device=device),
            num_tokens=num_tokens,
        )

    @classmethod
    def from_assignment(cls, src: Tensor, dst_token: Tensor, num_tokens: int) -> Plan:
        """Build a plan from source tokens and the token each one merges into.

        Args:
            src: ``(P, r)`` distinct token indices to merge away (per row).
            dst_token: ``(P, r)`` token index of each source's destination. Destinations must
                not themselves be sources (a merge never chains).
            num_tokens: ``N``, the sequence length the plan applies to.

        Returns:
            The plan; it keeps the tokens that are not sources, in their original order.
        """
        if src.shape != dst_token.shape or src.dim() != 2:
            raise ValueError(
                f"src and dst_token must both be (P, r); got {tuple(src.shape)} and "
                f"{tuple(dst_token.shape)}"
            )
        rows, num_merged = src.shape
        if num_merged == 0:
            return cls.identity(num_tokens, src.device)
        num_out = num_tokens - num_merged
        device = src.device
        is_src = torch.zeros(rows, num_tokens, dtype=torch.bool, device=device)
        is_src.scatter_(1, src, True)
        # a stable sort puts the kept tokens first, in token order
        kept = torch.sort(is_src, dim=1, stable=True).indices[:, :num_out].contiguous()
        # slot of every kept token: how many kept tokens precede it
        slot = torch.cumsum(~is_src, dim=1) - 1
        dst = slot.gather(1, dst_token)
        origin = slot.scatter(1, src, dst)
        counts = torch.ones(rows, num_out, device=device).scatter_add_(
            1, dst, torch.ones(rows, num_merged, device=device)
        )
        return cls(
            kept=kept,
            src=src,
            dst=dst,
            origin=origin,
            dst_count=counts.gather(1, dst),
            num_tokens=num_tokens,
            log_counts=counts.log(),
        )

    # ------------------------------------------------------------------ properties
    @property
    def num_merged(self) -> int:
        """``r``: how many tokens merge away."""
        return self.src.shape[1]

    @property
    def num_out(self) -> int:
        """``M = N - r``: tokens after the merge."""
        return self.kept.shape[1]

    @property
    def is_identity(self) -> bool:
        """True when the plan merges nothing."""
        return self.num_merged == 0

    @property
    def batch(self) -> int:
        """Rows of the plan: the batch size, or 1 for a plan shared by the whole batch."""
        return self.kept.shape[0]

    @property
    def device(self) -> torch.device:
        return self.kept.device

    @property
    def src_weight(self) -> Tensor:
        """``(P, r)`` float32 share of each source in its slot's mean (local mode)."""
        return self.dst_count.reciprocal()

    @property
    def counts(self) -> Tensor:
        """``(P, M)`` how many original tokens each slot stands for (local mode)."""
        ones = torch.ones(self.origin.shape, device=self.device)
        return torch.zeros(self.kept.shape, device=self.device).scatter_add(1, self.origin, ones)

    def slot_log_sizes(self) -> Tensor:
        """``(P, M)`` float32 ``log`` of ``counts``: ``log_counts`` when the plan carries it."""
        return self.log_counts if self.log_counts is not None else self.counts.log()

    # ------------------------------------------------------------------ transforms
    def with_prefix(self, num_prefix: int) -> Plan:
        """The same plan behind ``num_prefix`` protected tokens that always stay, unmerged."""
        if num_prefix == 0:
            return self
        rows = self.batch
        prefix = torch.arange(num_prefix, device=self.device).expand(rows, -1)
        return Plan(
            kept=torch.cat([prefix, self.kept + num_prefix], dim=1),
            src=self.src + num_prefix,
            dst=self.dst + num_prefix,
            origin=torch.cat([prefix, self.origin + num_prefix], dim=1),
            dst_count=self.dst_count,
            num_tokens=self.num_tokens + num_prefix,
            log_counts=None
            if self.log_counts is None
            else torch.cat([self.log_counts.new_zeros(rows, num_prefix), self.log_counts], 1),
        )

    def with_suffix(self, num_suffix: int) -> Plan:
        """The same plan before ``num_suffix`` protected tokens that always stay, unmerged."""
        if num_suffix == 0:
            return self
        rows = self.batch
        suffix = torch.arange(num_suffix, device=self.device).expand(rows, -1)
        return Plan(
            kept=torch.cat([self.kept, suffix + self.num_tokens], dim=1),
            src=self.src,
            dst=self.dst,
            origin=torch.cat([self.origin, suffix + self.num_out], dim=1),
            dst_count=self.dst_count,
            num_tokens=self.num_tokens + num_suffix,
            log_counts=None
            if self.log_counts is None
            else torch.cat([self.log_counts, self.log_counts.new_zeros(rows, num_suffix)], 1),
        )

    def per_frame(self, frames: int) -> Plan:
        """One plan over ``frames`` frames laid end to end, from this plan's rows, one row per
        frame (row ``p * frames + f`` is frame ``f`` of sample ``p``): every frame keeps its
        own tokens, and no token merges into another frame."""
        if frames == 1:
            return self
        rows = self.batch // frames
        n, m, r = self.num_tokens, self.num_out, self.num_merged
        frame = torch.arange(frames, device=self.device).view(1, frames, 1)

        def shifted(index: Tensor, step: int) -> Tensor:
            width = index.shape[1]
            return (index.reshape(rows, frames, width) + frame * step).reshape(rows, -1)

        return Plan(
            kept=shifted(self.kept, n),
            src=shifted(self.src, n),
            dst=shifted(self.dst, m),
            origin=shifted(self.origin, m),
            dst_count=self.dst_count.reshape(rows, frames * r),
            num_tokens=frames * n,
            log_counts=None
            if self.log_counts is None
            else self.log_counts.reshape(rows, frames * m),
        )

    def repeat(self, times: int) -> Plan:
        """Stack the plan ``times`` times along the batch (e.g. both classifier-free halves)."""
        if times == 1:
            return self
        return Plan(
            kept=self.kept.repeat(times, 1),
            src=self.src.repeat(times, 1),
            dst=self.dst.repeat(times, 1),
            origin=self.origin.repeat(times, 1),
            dst_count=self.dst_count.repeat(times, 1),
            num_tokens=self.num_tokens,
            log_counts=None if self.log_counts is None else self.log_counts.repeat(times, 1),
        )

    def to(self, device: torch.device | str) -> Plan:
        """The plan with its index tensors on ``device``."""
        return Plan(
            kept=self.kept.to(device),
            src=self.src.to(device),
            dst=self.dst.to(device),
            origin=self.origin.to(device),
            dst_count=self.dst_count.to(device),
            num_tokens=self.num_tokens,
            log_counts=None if self.log_counts is None else self.log_counts.to(device),
        )

    def derived(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, made at the first call with ``key`` and kept with the plan: what every
        call the plan serves would otherwise recompute from it (an adapter's rotary rows of
        the kept tokens, a proportional-attention bias), a few kernels per call saved.

        Example:
            >>> plan = Plan.identity(3)
            >>> double = plan.derived("double", lambda: plan.kept * 2)
            >>> plan.derived("double", None) is double  # made once, then kept
            True
        """
        value = self._derived.get(key, _MISSING)
        if value is _MISSING:
            value = self._derived[key] = make()
        return value

    def rows(self, batch: int, dtype: torch.dtype) -> PlanRows:
        """The plan's ``PlanRows`` for a batch of ``batch`` samples in ``dtype``, made once."""
        key = ("rows", batch, dtype)
        rows = self._derived.get(key)
        if rows is None:
            inputs = _offsets(batch, self.num_tokens, self.device)
            outputs = _offsets(batch, self.num_out, self.device)
            destinations = self.kept.gather(1, self.dst)
            # sources and destinations in one (2, batch, r) index: one kernel for both
            pairs = torch.stack([self.src.expand(batch, -1), destinations.expand(batch, -1)])
            weight = self.dst_count.to(dtype).expand(batch, -1).reciprocal()
            rows = self._derived[key] = PlanRows(
                kept=(self.kept + inputs).flatten(),
                pairs=(pairs + inputs).flatten(),
                slots=(self.dst + outputs).flatten(),
                origin=(self.origin + outputs).flatten(),
                weight=weight.reshape(-1, 1),
            )
        return rows

    # ------------------------------------------------------------------ application
    def _check(self, x: Tensor, tokens: int) -> int:
        if x.dim() != 3 or x.shape[1] != tokens:
            raise ValueError(
                f"the plan expects (batch, {tokens}, channels) tokens; got {tuple(x.shape)}"
            )
        if self.batch not in (1, x.shape[0]):
            raise ValueError(
                f"the plan was made for batch {self.batch}; got batch {x.shape[0]} "
                "(use a batch-shared plan or Plan.repeat)"
            )
        return x.shape[0]

    def merge(self, x: Tensor, sizes: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
        """Average every source into its destination slot: ``(B, N, C) -> (B, M, C)``.

        The mean is size-weighted: with ``sizes`` (``(B, N)``, how many patches each token
        already stands for, progressive mode) a token of size 3 weighs three times as much.
        The slot value is computed as ``x_dst + sum_s w_s (x_s - x_dst)`` so identical tokens
        merge back to exactly themselves. ``weight`` (``(B, r)``, from ``size_weights``) saves
        recomputing the size weights when one plan merges several tensors.

        Example:
            >>> import torch
            >>> plan = Plan.from_assignment(torch.tensor([[1]]), torch.tensor([[0]]), 3)
            >>> plan.merge(torch.tensor([[[0.0], [4.0], [9.0]]]),
            ...            sizes=torch.tensor([[3.0, 1.0, 1.0]])).flatten().tolist()
            [1.0, 9.0]
        """
        return self.merge_keeping_sources(x, sizes, weight)[0]

    def merge_keeping_sources(
        self, x: Tensor, sizes: Tensor | None = None, weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``merge``, and the sources' rows of ``x`` it read, ``(B * r, C)`` (the value
        correction needs them again; ``x`` itself for an identity plan)."""
        if self.is_identity:
            self._check(x, self.num_tokens)
            return x, x
        batch = self._check(x, self.num_tokens)
        channels = x.shape[-1]
        rows = self.rows(batch, x.dtype)
        if sizes is not None and weight is None:
            self._check_sizes(sizes, batch)
            weight = self.size_weights(sizes)[0]
        weight = rows.weight if weight is None else weight.reshape(-1, 1).to(x.dtype)
        flat = x.reshape(batch * self.num_tokens, channels)
        merged = flat.index_select(0, rows.kept)
        pairs = flat.index_select(0, rows.pairs).view(2, -1, channels)
        delta = torch.sub(pairs[0], pairs[1]).mul_(weight)
        # in place: merged is index_select's fresh tensor, and delta was taken from x
        merged.index_add_(0, rows.slots, delta)
        return merged.view(batch, self.num_out, channels), pairs[0]

    def _check_sizes(self, sizes: Tensor, batch: int | None = None) -> None:
        expected = (batch if batch is not None else sizes.shape[0], self.num_tokens)
        if sizes.dim() != 2 or tuple(sizes.shape) != expected or self.batch not in (1, expected[0]):
            raise ValueError(
                f"sizes must be (batch, {self.num_tokens}) for this plan"
                + (f" with batch {batch}" if batch is not None else "")
                + f" (plan batch {self.batch}); got {tuple(sizes.shape)}"
            )

    def size_weights(self, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Each source's share of its slot's mean, ``(B, r)``, and the sizes after the merge,
        ``(B, M)``, for tokens of ``sizes`` ``(B, N)``."""
        merged = self.merge_sizes(sizes)
        batch = sizes.shape[0]
        src_size = sizes.gather(1, self.src.expand(batch, -1))
        return src_size / merged.gather(1, self.dst.expand(batch, -1)), merged

    def merge_sizes(self, sizes: Tensor) -> Tensor:
        """Sizes after the merge: ``(B, N) -> (B, M)``; a slot's size is the sum of its tokens'."""
        self._check_sizes(sizes)
        batch = sizes.shape[0]
        if self.is_identity:
            return sizes
        slot = torch.zeros(batch, self.num_out, dtype=sizes.dtype, device=sizes.device)
        return slot.scatter_add(1, self.origin.expand(batch, -1), sizes)

    def unmerge(self, y: Tensor) -> Tensor:
        """Copy each slot's value back to every token merged into it: ``(B, M, C) -> (B, N, C)``."""
        if self.is_identity:
            self._check(y, self.num_tokens)
            return y
        batch = self._check(y, self.num_out)
        channels = y.shape[-1]
        rows = self.rows(batch, y.dtype)
        flat = y.reshape(batch * self.num_out, channels)
        return flat.index_select(0, rows.origin).view(batch, self.num_tokens, channels)

    def kept_without_prefix(self, num_prefix: int) -> Tensor:
        """``(P, M - num_prefix)`` index, among the tokens after the ``num_prefix`` protected
        ones, of every such token a plan made ``with_prefix(num_prefix)`` keeps."""
        return self.kept[:, num_prefix:] - num_prefix

    def gather_kept(self, values: Tensor) -> Tensor:
        """Rows of a per-token tensor ``(B or 1, N, ...)`` that the slots keep (e.g. positions)."""
        if self.is_identity:
            return values
        index = self.kept
        if values.shape[0] != index.shape[0]:
            index = index.expand(values.shape[0], -1)
        extra = values.shape[2:]
        index = index.reshape(*index.shape, *([1] * len(extra))).expand(*index.shape, *extra)
        return values.gather(1, index)
