"""``check_plan``: the invariants every plan holds, whoever made it."""

from __future__ import annotations

import torch

from tokenmerge.plan import Plan

from ._scaffold import require


def check_plan(plan: Plan, num_tokens: int, batch: int, num_out: int | None = None) -> None:
    """Check that ``plan`` is a well-formed plan over ``num_tokens`` tokens for ``batch`` samples.

    Its rows are 1 or ``batch``; in every row the kept tokens are ascending, the sources distinct
    and disjoint from them, together they are every token once; each source's destination is a
    kept slot; ``origin`` maps kept tokens to their own slot and sources to their destination's;
    ``dst_count`` and the slot sizes agree and sum to ``num_tokens``.

    Args:
        plan: the plan to check.
        num_tokens: ``N``, the tokens the plan must apply to.
        batch: the batch it is for (its rows must be 1 or this).
        num_out: if given, the number of slots ``M`` it must leave.

    Raises:
        AssertionError: saying what is wrong.

    Example:
        >>> import torch
        >>> plan = Plan.from_assignment(torch.tensor([[1, 3]]), torch.tensor([[0, 2]]), 4)
        >>> check_plan(plan, num_tokens=4, batch=2, num_out=2)
        >>> check_plan(plan, num_tokens=4, batch=2, num_out=3)
        Traceback (most recent call last):
        ...
        AssertionError: the plan leaves 2 tokens, expected 3
    """
    require(isinstance(plan, Plan), f"expected a tokenmerge.extend.Plan, got {type(plan).__name__}")
    n, rows, m, r = plan.num_tokens, plan.batch, plan.num_out, plan.num_merged
    require(n == num_tokens, f"the plan is over {n} tokens, expected {num_tokens}")
    require(rows in (1, batch), f"the plan has {rows} rows for a batch of {batch} (1 or {batch})")
    if num_out is not None:
        require(m == num_out, f"the plan leaves {m} tokens, expected {num_out}")
    require(m + r == n, f"{m} kept + {r} merged tokens != {n} tokens")
    shapes = {
        "kept": (rows, m),
        "src": (rows, r),
        "dst": (rows, r),
        "origin": (rows, n),
        "dst_count": (rows, r),
    }
    for field, shape in shapes.items():
        value = getattr(plan, field)
        require(
            tuple(value.shape) == shape,
            f"plan.{field} has shape {tuple(value.shape)}, expected {shape}",
        )
        require(
            value.device == plan.device,
            f"plan.{field} is on {value.device}, plan.kept on {plan.device}",
        )
        if field != "dst_count":
            require(value.dtype == torch.long, f"plan.{field} is {value.dtype}, not torch.long")
    require(plan.dst_count.is_floating_point(), "plan.dst_count is not floating point")
    for field, high in (("kept", n), ("src", n), ("dst", m), ("origin", m)):
        value = getattr(plan, field)
        if value.numel():
            low, top = int(value.min()), int(value.max())
            require(
                0 <= low and top < high, f"plan.{field} holds {low}..{top}, outside 0..{high - 1}"
            )
    if m > 1:
        require(
            bool((plan.kept[:, 1:] > plan.kept[:, :-1]).all()), "kept is not strictly ascending"
        )
    seen = torch.zeros(rows, n, dtype=torch.long, device=plan.device)
    seen.scatter_add_(1, plan.kept, torch.ones_like(plan.kept))
    seen.scatter_add_(1, plan.src, torch.ones_like(plan.src))
    if not bool((seen == 1).all()):
        row, token = (seen != 1).nonzero()[0].tolist()
        times = int(seen[row, token])
        raise AssertionError(
            f"row {row}: token {token} is kept or merged {times} times, not once (sources "
            "must be distinct and disjoint from the kept tokens)"
        )
    slots = torch.arange(m, device=plan.device).expand(rows, -1)
    require(
        torch.equal(plan.origin.gather(1, plan.kept), slots),
        "origin does not map every kept token to its own slot",
    )
    require(
        torch.equal(plan.origin.gather(1, plan.src), plan.dst),
        "origin does not map every source to its destination's slot",
    )
    counts = plan.counts
    require(bool((counts.sum(1) == n).all()), "the slot sizes do not sum to the token count")
    require(
        torch.equal(plan.dst_count.float(), counts.gather(1, plan.dst)),
        "dst_count is not the size of each source's slot",
    )
