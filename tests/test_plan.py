"""Tests of ``tokenmerge.plan.Plan``: merge / unmerge, sizes, transforms, autograd, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokenmerge.plan import Plan

FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=12, deadline=None)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------- helpers


@st.composite
def assignments(draw, max_tokens: int = 12, max_rows: int = 3, rows: int | None = None):
    """``(src, dst_token, n)``: per row, distinct sources, each merged into a non-source token."""
    n = draw(st.integers(1, max_tokens))
    num_rows = rows if rows is not None else draw(st.integers(1, max_rows))
    r = draw(st.integers(0, n - 1))
    # How many distinct destinations the sources may use: 1 makes one big group.
    spread = draw(st.integers(1, max(1, n - r)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    src_rows, dst_rows = [], []
    for _ in range(num_rows):
        perm = torch.randperm(n, generator=gen)
        targets = perm[r : r + spread]
        src_rows.append(perm[:r])
        dst_rows.append(targets[torch.randint(len(targets), (r,), generator=gen)])
    return torch.stack(src_rows), torch.stack(dst_rows), n


def group_of(src: torch.Tensor, dst_token: torch.Tensor, n: int) -> torch.Tensor:
    """``(P, n)``: the token whose slot each token ends in (itself for kept tokens)."""
    owner = torch.arange(n).expand(src.shape[0], -1).clone()
    owner.scatter_(1, src, dst_token)
    return owner


def build(assignment):
    """The plan of an assignment, and the assignment cut to the plan's rows.

    An assignment that merges nothing gives the one-row identity plan.
    """
    src, dst_token, n = assignment
    plan = Plan.from_assignment(src, dst_token, n)
    return plan, src[: plan.batch], dst_token[: plan.batch], n


def row_plan(src, dst_token, n, row):
    return Plan.from_assignment(src[row : row + 1], dst_token[row : row + 1], n)


def reference_merge(x, src, dst_token, n, sizes=None):
    """Size-weighted mean of every group, computed by hand in float64."""
    batch = x.shape[0]
    out = []
    for b in range(batch):
        p = b if src.shape[0] > 1 else 0
        sources = src[p].tolist()
        kept = sorted(set(range(n)) - set(sources))
        groups = {k: [k] for k in kept}
        for s, d in zip(sources, dst_token[p].tolist(), strict=True):
            groups[d].append(s)
        weight = sizes[b].double() if sizes is not None else torch.ones(n, dtype=torch.float64)
        slots = []
        for k in kept:
            members = groups[k]
            total = sum(weight[j] for j in members)
            slots.append(sum(weight[j] * x[b, j].double() for j in members) / total)
        out.append(torch.stack(slots))
    return torch.stack(out)


def batch_for(plan_rows: int, draw_batch: int) -> int:
    return draw_batch if plan_rows == 1 else plan_rows


# ---------------------------------------------------------------------------- exactness


@FAST
@given(
    assignment=assignments(),
    dtype=st.sampled_from(DTYPES),
    batch=st.integers(1, 4),
    scale=st.floats(1e-3, 1e3),
    with_sizes=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_unmerge_of_identical_groups_is_exact(
    assignment, dtype, batch, scale, with_sizes, seed
):
    plan, src, dst_token, n = build(assignment)
    batch = batch_for(plan.batch, batch)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, n, 5, generator=gen) * scale).to(dtype)
    owner = group_of(src, dst_token, n).expand(batch, -1)
    x = x.gather(1, owner.unsqueeze(-1).expand(-1, -1, 5))  # every group holds one value
    sizes = torch.rand(batch, n, generator=gen) * 4 + 0.25 if with_sizes else None
    merged = plan.merge(x, sizes=sizes)
    assert merged.dtype == dtype
    assert torch.equal(
        merged, x.gather(1, plan.kept.expand(batch, -1).unsqueeze(-1).expand(-1, -1, 5))
    )
    restored = plan.unmerge(merged)
    assert restored.dtype == dtype
    assert torch.equal(restored, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_tokens_exact_with_awkward_weights(dtype):
    # three sources into one destination (weights 1/4, not exact in binary for 1/3 groups)
    plan = Plan.from_assignment(torch.tensor([[0, 2, 3, 5]]), torch.tensor([[1, 1, 4, 1]]), 6)
    value = torch.tensor([0.1, -7.3, 1e-3, 123.456], dtype=dtype)
    other = torch.tensor([3.3, 2.2, -1.1, 0.7], dtype=dtype)
    x = torch.stack([value, value, value, other, other, value]).unsqueeze(0)
    sizes = torch.tensor([[3.0, 1.0, 7.0, 2.0, 5.0, 1.0]])
    for s in (None, sizes):
        assert torch.equal(plan.unmerge(plan.merge(x, sizes=s)), x)


# ---------------------------------------------------------------------------- sizes and counts


@FAST
@given(assignment=assignments(), batch=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_sizes_and_counts_add_up(assignment, batch, seed):
    plan, src, dst_token, n = build(assignment)
    batch = batch_for(plan.batch, batch)
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (batch, n), generator=gen).double()
    merged_sizes = plan.merge_sizes(sizes)
    assert merged_sizes.shape == (batch, plan.num_out)
    torch.testing.assert_close(merged_sizes.sum(1), sizes.sum(1), rtol=0, atol=0)
    counts = plan.counts
    assert counts.shape == (plan.batch, plan.num_out)
    assert torch.equal(counts.sum(1), torch.full((plan.batch,), float(n)))
    assert bool((counts >= 1).all())
    # counts == sizes after merging all-ones sizes, and == 1 + sources per slot by hand
    assert torch.equal(plan.merge_sizes(torch.ones(plan.batch, n)), counts)
    for p in range(plan.batch):
        kept = plan.kept[p].tolist()
        by_hand = [1 + dst_token[p].tolist().count(k) for k in kept]
        assert counts[p].tolist() == by_hand
    # src_weight is 1 / tokens in the destination slot
    torch.testing.assert_close(plan.src_weight, counts.gather(1, plan.dst).reciprocal())


@FAST
@given(
    assignment=assignments(),
    batch=st.integers(1, 3),
    with_sizes=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_is_size_weighted_mean(assignment, batch, with_sizes, seed):
    plan, src, dst_token, n = build(assignment)
    batch = batch_for(plan.batch, batch)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, generator=gen, dtype=torch.float64)
    sizes = torch.rand(batch, n, generator=gen, dtype=torch.float64) * 5 + 0.5
    sizes = sizes if with_sizes else None
    expected = reference_merge(x, src, dst_token, n, sizes)
    torch.testing.assert_close(plan.merge(x, sizes=sizes), expected)
    # unmerge hands every token its slot's value
    owner = group_of(src, dst_token, n)
    restored = plan.unmerge(expected)
    for b in range(batch):
        p = b if plan.batch > 1 else 0
        slot_of = {k: i for i, k in enumerate(plan.kept[p].tolist())}
        for j in range(n):
            assert torch.equal(restored[b, j], expected[b, slot_of[owner[p, j].item()]])


def test_size_weighted_mean_by_hand():
    # tokens 1 and 3 merge into 0, token 4 into 2
    plan = Plan.from_assignment(torch.tensor([[1, 3, 4]]), torch.tensor([[0, 0, 2]]), 5)
    x = torch.tensor([[[1.0], [2.0], [10.0], [4.0], [30.0]]], dtype=torch.float64)
    sizes = torch.tensor([[2.0, 1.0, 1.0, 3.0, 1.0]], dtype=torch.float64)
    merged = plan.merge(x, sizes=sizes)
    torch.testing.assert_close(
        merged.flatten(),
        torch.tensor([(2 * 1 + 2 + 3 * 4) / 6, (10 + 30) / 2], dtype=torch.float64),
    )
    torch.testing.assert_close(
        plan.merge(x).flatten(), torch.tensor([(1 + 2 + 4) / 3, 20.0], dtype=torch.float64)
    )
    assert plan.merge_sizes(sizes).tolist() == [[6.0, 2.0]]
    assert plan.counts.tolist() == [[3.0, 2.0]]
    assert plan.unmerge(merged).flatten().tolist() == [merged[0, 0, 0].item()] * 2 + [
        20.0,
        merged[0, 0, 0].item(),
        20.0,
    ]


# ---------------------------------------------------------------------------- identity


@pytest.mark.parametrize("n", [1, 5, 16])
def test_identity_plan_returns_the_same_object(n):
    plan = Plan.identity(n)
    assert plan.is_identity and plan.num_out == n and plan.num_merged == 0
    x = torch.randn(3, n, 4)
    sizes = torch.rand(3, n)
    assert plan.merge(x) is x
    assert plan.merge(x, sizes=sizes) is x
    assert plan.unmerge(x) is x
    assert plan.merge_sizes(sizes) is sizes
    assert plan.gather_kept(x) is x
    assert plan.with_prefix(0) is plan
    assert plan.repeat(1) is plan
    empty = torch.empty(2, 0, dtype=torch.long)
    from_empty = Plan.from_assignment(empty, empty, n)
    assert from_empty.is_identity
    assert from_empty.merge(x) is x and from_empty.unmerge(x) is x
    # with protected prefix tokens it stays the identity
    prefixed = plan.with_prefix(2)
    y = torch.randn(2, n + 2, 4)
    assert prefixed.is_identity and prefixed.merge(y) is y and prefixed.unmerge(y) is y


# ---------------------------------------------------------------------------- indices and order


def check_plan_indices(plan: Plan, n: int) -> None:
    """Every index tensor in range and consistent with the others."""
    m = plan.num_out
    r = plan.num_merged
    assert plan.num_tokens == n
    assert m + r == n
    for name in ("kept", "src", "dst", "origin"):
        assert getattr(plan, name).dtype == torch.long, name
    assert plan.kept.shape == (plan.batch, m)
    assert plan.src.shape == plan.dst.shape == plan.src_weight.shape == (plan.batch, r)
    assert plan.origin.shape == (plan.batch, n)
    for p in range(plan.batch):
        kept, src = plan.kept[p].tolist(), plan.src[p].tolist()
        assert all(0 <= k < n for k in kept + src)
        assert kept == sorted(set(kept)), "kept tokens must be ascending and distinct"
        assert len(set(src)) == r, "sources must be distinct"
        assert set(kept).isdisjoint(src) and set(kept) | set(src) == set(range(n))
        assert all(0 <= d < m for d in plan.dst[p].tolist())
        assert all(0 <= o < m for o in plan.origin[p].tolist())
    assert torch.equal(plan.origin.gather(1, plan.kept), torch.arange(m).expand(plan.batch, -1))
    assert torch.equal(plan.origin.gather(1, plan.src), plan.dst)


@FAST
@given(assignment=assignments(max_tokens=15))
def test_from_assignment_indices_in_range_and_token_order_kept(assignment):
    plan, src, dst_token, n = build(assignment)
    check_plan_indices(plan, n)
    for p in range(plan.batch):
        assert plan.kept[p].tolist() == sorted(set(range(n)) - set(src[p].tolist()))
        # each source's slot keeps exactly the destination token it was assigned to
        assert torch.equal(plan.kept[p][plan.dst[p]], dst_token[p])
    # slots come out in token order: merging positions gives ascending positions
    positions = torch.arange(n, dtype=torch.float64).view(1, n, 1).expand(plan.batch, -1, -1)
    kept_pos = plan.gather_kept(positions)
    assert torch.equal(kept_pos.squeeze(-1), plan.kept.double())


@pytest.mark.parametrize("grid", [(7, 5), (3, 3), (1, 9), (9, 1), (5, 7)])
def test_indices_in_range_on_odd_grids(grid):
    n = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(n)
    # merge every token of the bottom row / right column of each 2x2 cell into its top-left
    src, dst = [], []
    for i in range(grid[0]):
        for j in range(grid[1]):
            top, left = i - i % 2, j - j % 2
            if (i, j) != (top, left):
                src.append(i * grid[1] + j)
                dst.append(top * grid[1] + left)
    order = torch.randperm(len(src), generator=gen)
    src_t = torch.tensor(src)[order].unsqueeze(0)
    dst_t = torch.tensor(dst)[order].unsqueeze(0)
    plan = Plan.from_assignment(src_t, dst_t, n)
    check_plan_indices(plan, n)
    x = torch.randn(2, n, 3)
    assert plan.unmerge(plan.merge(x)).shape == x.shape


# ---------------------------------------------------------------------------- transforms


@FAST
@given(
    assignment=assignments(),
    prefix=st.integers(1, 3),
    batch=st.integers(1, 3),
    with_sizes=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_with_prefix_leaves_prefix_tokens_untouched(assignment, prefix, batch, with_sizes, seed):
    plan, src, dst_token, n = build(assignment)
    prefixed = plan.with_prefix(prefix)
    batch = batch_for(plan.batch, batch)
    check_plan_indices(prefixed, n + prefix)
    assert prefixed.num_merged == plan.num_merged
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, prefix + n, 4, generator=gen)
    sizes = torch.rand(batch, prefix + n, generator=gen) + 0.5 if with_sizes else None
    merged = prefixed.merge(x, sizes=sizes)
    assert torch.equal(merged[:, :prefix], x[:, :prefix])
    image_sizes = sizes[:, prefix:] if sizes is not None else None
    torch.testing.assert_close(merged[:, prefix:], plan.merge(x[:, prefix:], sizes=image_sizes))
    if sizes is not None:
        merged_sizes = prefixed.merge_sizes(sizes)
        assert torch.equal(merged_sizes[:, :prefix], sizes[:, :prefix])
    y = torch.randn(batch, prefix + plan.num_out, 4, generator=gen)
    restored = prefixed.unmerge(y)
    assert torch.equal(restored[:, :prefix], y[:, :prefix])
    assert torch.equal(restored[:, prefix:], plan.unmerge(y[:, prefix:]))


@FAST
@given(
    assignment=assignments(),
    prefix=st.integers(0, 2),
    suffix=st.integers(1, 3),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_with_suffix_leaves_suffix_tokens_untouched(assignment, prefix, suffix, batch, seed):
    # HiDream's single-stream blocks: image tokens first, text behind, protected
    plan, src, dst_token, n = build(assignment)
    wrapped = plan.with_prefix(prefix).with_suffix(suffix)
    assert plan.with_suffix(0) is plan
    batch = batch_for(plan.batch, batch)
    total = prefix + n + suffix
    check_plan_indices(wrapped, total)
    assert wrapped.num_merged == plan.num_merged and wrapped.num_out == total - plan.num_merged
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, total, 4, generator=gen)
    merged = wrapped.merge(x)
    assert torch.equal(merged[:, :prefix], x[:, :prefix])
    assert torch.equal(merged[:, merged.shape[1] - suffix :], x[:, total - suffix :])
    image = slice(prefix, prefix + n)
    torch.testing.assert_close(
        merged[:, prefix : merged.shape[1] - suffix], plan.merge(x[:, image])
    )
    y = torch.randn(batch, wrapped.num_out, 4, generator=gen)
    restored = wrapped.unmerge(y)
    assert torch.equal(restored[:, total - suffix :], y[:, y.shape[1] - suffix :])
    assert torch.equal(restored[:, image], plan.unmerge(y[:, prefix : y.shape[1] - suffix]))
    if wrapped.log_counts is not None:
        tail = wrapped.log_counts[:, wrapped.num_out - suffix :]
        assert torch.equal(tail, torch.zeros_like(tail))


@FAST
@given(assignment=assignments(rows=1), batch=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_batch_shared_plan_applies_to_any_batch(assignment, batch, seed):
    plan, src, dst_token, n = build(assignment)
    assert plan.batch == 1
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, generator=gen)
    sizes = torch.rand(batch, n, generator=gen) + 0.5
    merged = plan.merge(x)
    merged_sized = plan.merge(x, sizes=sizes)
    restored = plan.unmerge(merged)
    for b in range(batch):
        torch.testing.assert_close(merged[b], plan.merge(x[b : b + 1])[0])
        torch.testing.assert_close(
            merged_sized[b], plan.merge(x[b : b + 1], sizes=sizes[b : b + 1])[0]
        )
        assert torch.equal(restored[b], plan.unmerge(merged[b : b + 1])[0])


@FAST
@given(assignment=assignments(), times=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_repeat_stacks_the_plan(assignment, times, seed):
    plan, src, dst_token, n = build(assignment)
    repeated = plan.repeat(times)
    assert repeated.batch == plan.batch * times
    assert repeated.num_tokens == n and repeated.num_out == plan.num_out
    for name in ("kept", "src", "dst", "origin", "src_weight"):
        assert torch.equal(getattr(repeated, name), getattr(plan, name).repeat(times, 1)), name
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(plan.batch * times, n, 3, generator=gen)
    merged = repeated.merge(x)
    for chunk in range(times):
        part = slice(chunk * plan.batch, (chunk + 1) * plan.batch)
        torch.testing.assert_close(merged[part], plan.merge(x[part]))
        assert torch.equal(repeated.unmerge(merged)[part], plan.unmerge(merged[part]))


@FAST
@given(assignment=assignments(rows=3), seed=st.integers(0, 2**31 - 1))
def test_per_sample_plan_applies_each_row_to_its_sample(assignment, seed):
    plan, src, dst_token, n = build(assignment)
    assert plan.batch == (1 if plan.is_identity else 3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, 4, generator=gen)
    sizes = torch.rand(3, n, generator=gen) + 0.5
    merged = plan.merge(x, sizes=sizes)
    restored = plan.unmerge(merged)
    for b in range(3):
        single = row_plan(src, dst_token, n, b)
        torch.testing.assert_close(merged[b], single.merge(x[b : b + 1], sizes=sizes[b : b + 1])[0])
        assert torch.equal(restored[b], single.unmerge(merged[b : b + 1])[0])


def test_per_sample_plans_differ_per_sample():
    # sample 0 merges token 1 into 0; sample 1 merges token 2 into 3
    plan = Plan.from_assignment(torch.tensor([[1], [2]]), torch.tensor([[0], [3]]), 4)
    x = torch.tensor([[1.0, 3.0, 5.0, 7.0]] * 2).unsqueeze(-1)
    assert plan.merge(x).squeeze(-1).tolist() == [[2.0, 5.0, 7.0], [1.0, 3.0, 6.0]]
    assert plan.unmerge(plan.merge(x)).squeeze(-1).tolist() == [
        [2.0, 2.0, 5.0, 7.0],
        [1.0, 3.0, 6.0, 6.0],
    ]
    assert plan.kept.tolist() == [[0, 2, 3], [0, 1, 3]]


# ---------------------------------------------------------------------------- autograd


@SLOW
@given(
    assignment=assignments(max_tokens=6, max_rows=2),
    batch=st.integers(1, 2),
    with_sizes=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gradcheck_merge_and_unmerge(assignment, batch, with_sizes, seed):
    plan, src, dst_token, n = build(assignment)
    batch = batch_for(plan.batch, batch)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    if with_sizes:
        sizes = torch.rand(batch, n, generator=gen, dtype=torch.float64) + 0.5
        sizes.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, s: plan.merge(a, sizes=s), (x, sizes))
        assert torch.autograd.gradcheck(plan.merge_sizes, (sizes,))
    else:
        assert torch.autograd.gradcheck(plan.merge, (x,))
    y = torch.randn(batch, plan.num_out, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(plan.unmerge, (y,))


@FAST
@given(assignment=assignments(), with_sizes=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_gradients_reach_every_token(assignment, with_sizes, seed):
    plan, src, dst_token, n = build(assignment)
    batch = plan.batch
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    sizes = torch.rand(batch, n, generator=gen, dtype=torch.float64) + 0.5 if with_sizes else None
    plan.merge(x, sizes=sizes).sum().backward()
    assert x.grad is not None
    # d(sum of slots)/dx_j is token j's share of its slot's mean
    weight = sizes if sizes is not None else torch.ones(batch, n, dtype=torch.float64)
    share = weight / plan.merge_sizes(weight).gather(1, plan.origin)
    torch.testing.assert_close(x.grad, share.unsqueeze(-1).expand(-1, -1, 3))
    assert bool((x.grad != 0).all())
    y = torch.randn(batch, plan.num_out, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    plan.unmerge(y).sum().backward()
    torch.testing.assert_close(y.grad, plan.counts.double().unsqueeze(-1).expand(-1, -1, 3))


# ---------------------------------------------------------------------------- errors


def _plan_2x5() -> Plan:
    return Plan.from_assignment(torch.tensor([[1, 3], [0, 4]]), torch.tensor([[0, 2], [2, 2]]), 5)


@pytest.mark.parametrize(
    "shape",
    [(2, 5), (2, 4, 3), (2, 6, 3), (5, 3), (2, 5, 3, 1)],
    ids=["2d", "too-few-tokens", "too-many-tokens", "no-batch", "4d"],
)
def test_merge_rejects_wrong_shapes(shape):
    plan = _plan_2x5()
    with pytest.raises(ValueError, match=r"expects \(batch, 5, channels\)"):
        plan.merge(torch.randn(shape))
    with pytest.raises(ValueError, match=r"expects \(batch, 5, channels\)"):
        Plan.identity(5).merge(torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 3), (2, 2, 3)])
def test_unmerge_rejects_wrong_shapes(shape):
    with pytest.raises(ValueError, match=r"expects \(batch, 3, channels\)"):
        _plan_2x5().unmerge(torch.randn(shape))


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_wrong_batch_raises(batch):
    plan = _plan_2x5()
    with pytest.raises(ValueError, match="made for batch 2"):
        plan.merge(torch.randn(batch, 5, 3))
    with pytest.raises(ValueError, match="made for batch 2"):
        plan.unmerge(torch.randn(batch, 3, 3))
    with pytest.raises(ValueError, match="made for batch 2"):
        plan.with_prefix(1).merge(torch.randn(batch, 6, 3))


def test_from_assignment_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(P, r\)"):
        Plan.from_assignment(torch.tensor([[1, 2]]), torch.tensor([[0]]), 4)
    with pytest.raises(ValueError, match=r"\(P, r\)"):
        Plan.from_assignment(torch.tensor([1, 2]), torch.tensor([0, 0]), 4)


@pytest.mark.parametrize(
    "shape",
    [(2, 6), (3, 5), (1, 5), (2, 5, 1)],
    ids=["too-many-tokens", "too-many-rows", "one-row", "3d"],
)
def test_merge_rejects_sizes_of_the_wrong_shape(shape):
    """``sizes`` must be ``(B, N)``; anything else is a clear ValueError, never silently used."""
    plan = _plan_2x5()
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="sizes"):
        plan.merge(x, sizes=torch.ones(shape))


@pytest.mark.parametrize(
    "shape",
    [(2, 6), (3, 5), (1, 5), (2, 5, 1)],
    ids=["too-many-tokens", "too-many-rows", "one-row", "3d"],
)
def test_merge_sizes_rejects_sizes_of_the_wrong_shape(shape):
    """``merge_sizes`` takes ``(B, N)`` too: a clear ValueError, never silently truncated."""
    with pytest.raises(ValueError, match="sizes"):
        _plan_2x5().merge_sizes(torch.ones(shape))


@FAST
@given(assignment=assignments(rows=3, max_tokens=8), seed=st.integers(0, 2**31 - 1))
def test_per_frame_plan_merges_each_frame_on_its_own(assignment, seed):
    # rows are the frames of one sample: the frames laid end to end merge as each row does
    plan, src, dst_token, n = build(assignment)
    if plan.is_identity:
        return
    frames = plan.per_frame(3)
    assert frames.batch == 1 and frames.num_tokens == 3 * n
    assert frames.num_out == 3 * plan.num_out and frames.num_merged == 3 * plan.num_merged
    check_plan_indices(frames, 3 * n)
    # no token merges into another frame's
    assert torch.equal(frames.src // n, frames.kept.gather(1, frames.dst) // n)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3 * n, 4, generator=gen)
    merged = frames.merge(x)
    restored = frames.unmerge(merged)
    m = plan.num_out
    for f in range(3):
        single = row_plan(src, dst_token, n, f)
        part = x[:, f * n : (f + 1) * n]
        torch.testing.assert_close(merged[:, f * m : (f + 1) * m], single.merge(part))
        torch.testing.assert_close(
            restored[:, f * n : (f + 1) * n], single.unmerge(single.merge(part))
        )
    torch.testing.assert_close(frames.slot_log_sizes(), frames.counts.log())


@FAST
@given(
    assignment=assignments(max_tokens=8, max_rows=4),
    layout=st.lists(
        st.sampled_from(["frames", "prefix", "suffix", "repeat"]), min_size=1, max_size=4
    ),
    sizes=st.integers(1, 3),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
@example(  # a shared plan repeated, then cut into frames; prefix behind the frames
    assignment=(torch.tensor([[1, 3]]), torch.tensor([[0, 2]]), 5),
    layout=["repeat", "frames", "prefix", "repeat"],
    sizes=2,
    batch=1,
    seed=0,
)
def test_a_plan_placed_before_it_is_applied_equals_one_placed_field_by_field(
    assignment, layout, sizes, batch, seed
):
    """``from_assignment`` plans note ``per_frame`` / ``with_prefix`` / ``with_suffix`` /
    ``repeat`` and build their rows once, in the final layout; plans built field by field
    transform their fields at once. Both must be the same plan, field by field and applied."""
    plan, *_ = build(assignment)
    by_fields = plan.replace()  # the same plan, built field by field
    for step in layout:
        if step == "frames" and plan.batch % 2 == 0:
            plan, by_fields = plan.per_frame(2), by_fields.per_frame(2)
        elif step == "prefix":
            plan, by_fields = plan.with_prefix(sizes), by_fields.with_prefix(sizes)
        elif step == "suffix":
            plan, by_fields = plan.with_suffix(sizes), by_fields.with_suffix(sizes)
        elif step == "repeat":
            plan, by_fields = plan.repeat(sizes), by_fields.repeat(sizes)
    assert (plan.num_tokens, plan.num_out, plan.batch) == (
        by_fields.num_tokens,
        by_fields.num_out,
        by_fields.batch,
    )
    samples = batch_for(plan.batch, batch)
    x = torch.randn(samples, plan.num_tokens, 3, generator=torch.Generator().manual_seed(seed))
    merged = plan.merge(x)  # applied first: the fields below come from the rows it built
    torch.testing.assert_close(merged, by_fields.merge(x))
    torch.testing.assert_close(plan.unmerge(merged), by_fields.unmerge(merged))
    for name in ("kept", "src", "dst", "origin", "dst_count"):
        assert torch.equal(getattr(plan, name), getattr(by_fields, name)), name
    torch.testing.assert_close(plan.slot_log_sizes(), by_fields.slot_log_sizes())
    torch.testing.assert_close(plan.counts, by_fields.counts)
