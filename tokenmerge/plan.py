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
from dataclasses import dataclass
from dataclasses import replace as _replace_dataclass
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

from .windows import made_once

__all__ = ["Plan", "PlanRows"]

T = TypeVar("T")
_MISSING = object()


def _flat_index(index: Tensor, batch: int, tokens: int) -> Tensor:
    """``(P, K)`` token index -> ``(batch * K,)`` row index into ``x.reshape(batch * tokens, C)``.

    Whole-row ``index_select`` / ``index_add`` are an order of magnitude faster on the CPU than
    ``gather`` / ``scatter_add`` with an index expanded over the channels.
    """
    return (index.expand(batch, -1) + _offsets(batch, tokens, index.device)).flatten()


@made_once
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

    @property
    def destinations(self) -> Tensor:
        """``(B * r,)`` rows of each source's destination token."""
        return self.pairs[self.slots.shape[0] :]


@dataclass(frozen=True)
class _Assignment:
    """A plan as a strategy made it, and the layout it was placed in since: ``src`` and
    ``dst_token`` ``(Q, r)`` over ``tokens`` image tokens per row; the rows, repeated
    ``repeats`` times along the batch, are ``frames`` consecutive frames of each sample,
    behind ``prefix`` and before ``suffix`` protected tokens."""

    src: Tensor
    dst_token: Tensor
    tokens: int
    frames: int = 1
    prefix: int = 0
    suffix: int = 0
    repeats: int = 1

    @property
    def samples(self) -> int:
        return self.src.shape[0] * self.repeats // self.frames

    @property
    def merged(self) -> int:
        return self.frames * self.src.shape[1]

    @property
    def total(self) -> int:
        return self.prefix + self.frames * self.tokens + self.suffix


@made_once
def _starts(
    rows: int, frames: int, total: int, prefix: int, tokens: int, device: torch.device
) -> Tensor:
    """``(rows, 1)``: the flat row of every assignment row's first image token."""
    row = torch.arange(rows, device=device)
    return ((row // frames) * total + prefix + (row % frames) * tokens).unsqueeze(1)


@made_once
def _one(device: torch.device) -> Tensor:
    return torch.ones(1, dtype=torch.long, device=device)


def _built_rows(a: _Assignment) -> tuple[PlanRows, Tensor]:
    """The ``PlanRows`` (float32 weights) of an assignment for its own batch, and the size of
    every kept row's slot ``(batch * total,)`` (int64; what it holds at the sources' rows means
    nothing): the whole plan in one pass over flat rows, with no index per sample to offset
    afterwards."""
    batch, total, merged = a.samples, a.total, a.merged
    count = batch * merged
    pairs = torch.stack([a.src, a.dst_token])  # sources and destinations: one index for both
    if a.repeats > 1:
        pairs = pairs.repeat(1, a.repeats, 1)
    starts = _starts(pairs.shape[1], a.frames, total, a.prefix, a.tokens, pairs.device)
    pairs = (pairs + starts).view(-1)
    sources, destinations = pairs[:count], pairs[count:]
    keep = torch.ones(batch * total, dtype=torch.long, device=pairs.device)
    keep.index_fill_(0, sources, 0)
    # a stable sort puts the kept rows first, sample after sample, in token order
    kept = keep.sort(descending=True, stable=True).indices[: batch * (total - merged)]
    slot = keep.cumsum(0).sub_(1)  # of every kept row: how many kept rows precede it
    slots = slot.index_select(0, destinations)
    origin = slot.index_copy_(0, sources, slots)  # slot is not needed any more
    # keep (1 at every kept row) becomes the kept rows' slot sizes: 1 + the sources they take
    sizes = keep.index_add_(0, destinations, _one(pairs.device).expand(count))
    weight = sizes.index_select(0, destinations).reciprocal().float().unsqueeze(1)
    return PlanRows(kept=kept, pairs=pairs, slots=slots, origin=origin, weight=weight), sizes


#: the fields a plan built field by field is given, in ``Plan._given`` order
_GIVEN = ("kept", "src", "dst", "origin", "dst_count", "log_counts")


def _field_property(name: str) -> property:
    """A plan's field ``name``: the one it was given, or made from its rows when first read."""
    return property(lambda plan: plan._field(name), doc=f"The plan's ``{name}`` (see ``Plan``).")


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
        log_counts: ``(P, M)`` float32 log of how many tokens each slot stands for, which
            every merged attention call with proportional attention adds to its logits
            (``tokenmerge.proportional``); None in plans built field by field, where
            ``slot_log_sizes`` computes it.

    A plan made by ``from_assignment`` computes its merge rows (``rows``) in one pass when
    first applied, and each attribute above only when first read: merging and unmerging
    never need them.

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

    FIELDS = ("kept", "src", "dst", "origin", "dst_count", "num_tokens", "log_counts")

    def __init__(
        self,
        kept: Tensor,
        src: Tensor,
        dst: Tensor,
        origin: Tensor,
        dst_count: Tensor,
        num_tokens: int,
        log_counts: Tensor | None = None,
    ) -> None:
        self._given = (kept, src, dst, origin, dst_count, log_counts)
        self.num_tokens = num_tokens
        self._assignment: _Assignment | None = None
        #: what calls derive from the plan (``PlanRows`` by batch and dtype...), made once
        self._derived: dict = {}

    @classmethod
    def _assigned(cls, assignment: _Assignment) -> Plan:
        plan = cls.__new__(cls)
        plan._given = None
        plan.num_tokens = assignment.total
        plan._assignment = assignment
        plan._derived = {}
        return plan

    def __repr__(self) -> str:
        return (
            f"Plan(num_tokens={self.num_tokens}, num_merged={self.num_merged}, batch={self.batch})"
        )

    def another(self) -> Plan:
        """A plan object of its own with this plan's tensors and what was derived from them
        (what is fitted to a plan object, the value correction, is not shared)."""
        other = Plan.__new__(Plan)
        other.__dict__.update(self.__dict__)
        return other

    def replace(self, **fields: object) -> Plan:
        """A plan built field by field from this one's fields, some of them replaced."""
        return Plan(**{name: getattr(self, name) for name in self.FIELDS} | fields)

    # ------------------------------------------------------------------ fields
    def _field(self, name: str) -> Tensor | None:
        if self._given is not None:
            return self._given[_GIVEN.index(name)]
        return self.derived(("field", name), lambda: self._field_of_rows(name))

    def _field_of_rows(self, name: str) -> Tensor:
        a = self._assignment
        rows, _ = self._built()
        batch, total, out = a.samples, a.total, a.total - a.merged
        # the first samples of the build: the plan's own, or those of a plan shared by a batch
        first = {
            "kept": (rows.kept[: batch * out], out, total),
            "src": (rows.sources[: batch * a.merged], a.merged, total),
            "dst": (rows.slots[: batch * a.merged], a.merged, out),
            "origin": (rows.origin[: batch * total], total, out),
        }
        if name in first:
            flat, width, step = first[name]
            field = flat.view(batch, width)
            # a one-row plan's rows are its tokens; other rows are offset by their sample's
            return field if batch == 1 else field - _offsets(batch, step, self.device)
        sizes = self._slot_sizes()
        if name == "dst_count":
            return sizes.index_select(0, first["dst"][0]).float().view(batch, -1)
        # log_counts: the log of an int64 tensor is float32
        return sizes[: batch * out].log().float().view(batch, out)

    kept = _field_property("kept")
    src = _field_property("src")
    dst = _field_property("dst")
    origin = _field_property("origin")
    dst_count = _field_property("dst_count")
    log_counts = _field_property("log_counts")

    def _built(self) -> tuple[PlanRows, Tensor]:
        """An assigned plan's rows (float32) and slot sizes for its own batch; for a plan
        shared by the batch, those of the first batch it was applied to will do (its fields
        are the first sample's)."""
        builds = self._derived.get("builds")
        if builds and self.batch not in builds and self.batch == 1:
            return next(iter(builds.values()))
        return self._build(self.batch)

    def _slot_sizes(self) -> Tensor:
        """``(batch * M,)`` int64 size of every slot of an assigned plan's own build (made
        only when read: merging needs the sources' weights alone)."""

        def make() -> Tensor:
            rows, sizes = self._built()
            return sizes.index_select(0, rows.kept)

        return self.derived("slot sizes", make)

    def _build(self, batch: int) -> tuple[PlanRows, Tensor]:
        """An assigned plan's rows and row sizes for ``batch`` samples, made once per batch."""
        builds = self._derived.setdefault("builds", {})
        if batch not in builds:
            a = self._assignment
            if batch != self.batch:  # a plan shared by the batch: built for it whole
                a = _replace_dataclass(a, repeats=a.repeats * batch)
            builds[batch] = _built_rows(a)
        return builds[batch]

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
        if src.shape[1] == 0:
            return cls.identity(num_tokens, src.device)
        return cls._assigned(_Assignment(src, dst_token, num_tokens))

    # ------------------------------------------------------------------ properties
    @property
    def num_merged(self) -> int:
        """``r``: how many tokens merge away."""
        if self._assignment is not None:
            return self._assignment.merged
        return self.src.shape[1]

    @property
    def num_out(self) -> int:
        """``M = N - r``: tokens after the merge."""
        return self.num_tokens - self.num_merged

    @property
    def is_identity(self) -> bool:
        """True when the plan merges nothing."""
        return self.num_merged == 0

    @property
    def batch(self) -> int:
        """Rows of the plan: the batch size, or 1 for a plan shared by the whole batch."""
        if self._assignment is not None:
            return self._assignment.samples
        return self.kept.shape[0]

    @property
    def device(self) -> torch.device:
        if self._assignment is not None:
            return self._assignment.src.device
        return self.kept.device

    @property
    def src_weight(self) -> Tensor:
        """``(P, r)`` float32 share of each source in its slot's mean (local mode)."""
        return self.dst_count.reciprocal()

    @property
    def counts(self) -> Tensor:
        """``(P, M)`` how many original tokens each slot stands for (local mode)."""
        if self._assignment is not None:
            sizes = self._slot_sizes()[: self.batch * self.num_out]
            return sizes.float().view(self.batch, self.num_out)
        ones = torch.ones(self.origin.shape, device=self.device)
        return torch.zeros(self.kept.shape, device=self.device).scatter_add(1, self.origin, ones)

    def slot_log_sizes(self) -> Tensor:
        """``(P, M)`` float32 ``log`` of ``counts``: ``log_counts`` when the plan carries it."""
        log_counts = self.log_counts
        return log_counts if log_counts is not None else self.counts.log()

    # ------------------------------------------------------------------ transforms
    # On a plan made by ``from_assignment`` these only note the layout: its rows are made once,
    # in the final layout, when it is first applied.
    def _placed(self, **layout: int) -> Plan:
        return Plan._assigned(_replace_dataclass(self._assignment, **layout))

    def with_prefix(self, num_prefix: int) -> Plan:
        """The same plan behind ``num_prefix`` protected tokens that always stay, unmerged."""
        if num_prefix == 0:
            return self
        if self._assignment is not None:
            return self._placed(prefix=self._assignment.prefix + num_prefix)
        rows = self.batch
        prefix = torch.arange(num_prefix, device=self.device).expand(rows, -1)
        log_counts = self.log_counts
        return Plan(
            kept=torch.cat([prefix, self.kept + num_prefix], dim=1),
            src=self.src + num_prefix,
            dst=self.dst + num_prefix,
            origin=torch.cat([prefix, self.origin + num_prefix], dim=1),
            dst_count=self.dst_count,
            num_tokens=self.num_tokens + num_prefix,
            log_counts=None
            if log_counts is None
            else torch.cat([log_counts.new_zeros(rows, num_prefix), log_counts], 1),
        )

    def with_suffix(self, num_suffix: int) -> Plan:
        """The same plan before ``num_suffix`` protected tokens that always stay, unmerged."""
        if num_suffix == 0:
            return self
        if self._assignment is not None:
            return self._placed(suffix=self._assignment.suffix + num_suffix)
        rows = self.batch
        suffix = torch.arange(num_suffix, device=self.device).expand(rows, -1)
        log_counts = self.log_counts
        return Plan(
            kept=torch.cat([self.kept, suffix + self.num_tokens], dim=1),
            src=self.src,
            dst=self.dst,
            origin=torch.cat([self.origin, suffix + self.num_out], dim=1),
            dst_count=self.dst_count,
            num_tokens=self.num_tokens + num_suffix,
            log_counts=None
            if log_counts is None
            else torch.cat([log_counts, log_counts.new_zeros(rows, num_suffix)], 1),
        )

    def per_frame(self, frames: int) -> Plan:
        """One plan over ``frames`` frames laid end to end, from this plan's rows, one row per
        frame (row ``p * frames + f`` is frame ``f`` of sample ``p``): every frame keeps its
        own tokens, and no token merges into another frame."""
        if frames == 1:
            return self
        a = self._assignment
        if (
            a is not None
            and (a.frames, a.prefix, a.suffix) == (1, 0, 0)
            and a.src.shape[0] * a.repeats % frames == 0
        ):
            return self._placed(frames=frames)
        rows = self.batch // frames
        n, m, r = self.num_tokens, self.num_out, self.num_merged
        frame = torch.arange(frames, device=self.device).view(1, frames, 1)

        def shifted(index: Tensor, step: int) -> Tensor:
            width = index.shape[1]
            return (index.reshape(rows, frames, width) + frame * step).reshape(rows, -1)

        log_counts = self.log_counts
        return Plan(
            kept=shifted(self.kept, n),
            src=shifted(self.src, n),
            dst=shifted(self.dst, m),
            origin=shifted(self.origin, m),
            dst_count=self.dst_count.reshape(rows, frames * r),
            num_tokens=frames * n,
            log_counts=None if log_counts is None else log_counts.reshape(rows, frames * m),
        )

    def repeat(self, times: int) -> Plan:
        """Stack the plan ``times`` times along the batch (e.g. both classifier-free halves)."""
        if times == 1:
            return self
        if self._assignment is not None:
            return self._placed(repeats=self._assignment.repeats * times)
        log_counts = self.log_counts
        return Plan(
            kept=self.kept.repeat(times, 1),
            src=self.src.repeat(times, 1),
            dst=self.dst.repeat(times, 1),
            origin=self.origin.repeat(times, 1),
            dst_count=self.dst_count.repeat(times, 1),
            num_tokens=self.num_tokens,
            log_counts=None if log_counts is None else log_counts.repeat(times, 1),
        )

    def to(self, device: torch.device | str) -> Plan:
        """The plan with its index tensors on ``device``."""
        a = self._assignment
        if a is not None:
            moved = _replace_dataclass(a, src=a.src.to(device), dst_token=a.dst_token.to(device))
            return Plan._assigned(moved)
        log_counts = self.log_counts
        return Plan(
            kept=self.kept.to(device),
            src=self.src.to(device),
            dst=self.dst.to(device),
            origin=self.origin.to(device),
            dst_count=self.dst_count.to(device),
            num_tokens=self.num_tokens,
            log_counts=None if log_counts is None else log_counts.to(device),
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
            rows = self._derived[key] = self._make_rows(batch, dtype)
        return rows

    def _make_rows(self, batch: int, dtype: torch.dtype) -> PlanRows:
        a = self._assignment
        if a is not None:
            own, sizes = self._build(batch)
            if dtype == torch.float32:
                return own
            # the reciprocal in the dtype itself: exact where the dtype is (float64)
            weight = sizes.index_select(0, own.destinations).to(dtype).reciprocal_().unsqueeze(1)
            return own._replace(weight=weight)
        inputs = _offsets(batch, self.num_tokens, self.device)
        outputs = _offsets(batch, self.num_out, self.device)
        destinations = self.kept.gather(1, self.dst)
        # sources and destinations in one (2, batch, r) index: one kernel for both
        pairs = torch.stack([self.src.expand(batch, -1), destinations.expand(batch, -1)])
        weight = self.dst_count.to(dtype).expand(batch, -1).reciprocal()
        return PlanRows(
            kept=(self.kept + inputs).flatten(),
            pairs=(pairs + inputs).flatten(),
            slots=(self.dst + outputs).flatten(),
            origin=(self.origin + outputs).flatten(),
            weight=weight.reshape(-1, 1),
        )

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
        if self.is_identity:
            return sizes.new_empty(sizes.shape[0], 0), merged
        rows = self.rows(sizes.shape[0], torch.float32)
        src_size = sizes.reshape(-1).index_select(0, rows.sources)
        share = src_size / merged.reshape(-1).index_select(0, rows.slots)
        return share.view(sizes.shape[0], -1), merged

    def merge_sizes(self, sizes: Tensor) -> Tensor:
        """Sizes after the merge: ``(B, N) -> (B, M)``; a slot's size is the sum of its tokens'."""
        self._check_sizes(sizes)
        batch = sizes.shape[0]
        if self.is_identity:
            return sizes
        rows = self.rows(batch, torch.float32)
        slot = torch.zeros(batch * self.num_out, dtype=sizes.dtype, device=sizes.device)
        return slot.index_add_(0, rows.origin, sizes.reshape(-1)).view(batch, self.num_out)

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
