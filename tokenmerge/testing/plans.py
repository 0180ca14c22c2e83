"""``check_plan``: the invariants every plan holds, whoever made it."""

from __future__ import annotations

from tokenmerge.plan import Plan
from tokenmerge.plan_check import plan_problem

from ._scaffold import require


def check_plan(plan: Plan, num_tokens: int, batch: int, num_out: int | None = None) -> None:
    """Check that ``plan`` is a well-formed plan over ``num_tokens`` tokens for ``batch`` samples.

    Its rows are 1 or ``batch``; in every row the kept tokens are ascending, the sources distinct
    and disjoint from them, together they are every token once; each source's destination is a
    kept slot; ``origin`` maps kept tokens to their own slot and sources to their destination's;
    ``dst_count`` and the slot sizes agree and sum to ``num_tokens``. The framework checks
    every fresh plan a third-party strategy makes the same way (``tokenmerge.plan_check``).

    Args:
        plan: the plan to check.
        num_tokens: ``N``, the tokens the plan must apply to.
        batch: the batch it is for (its rows must be 1 or this).
        num_out: if given, the number of slots ``M`` it must leave.

    Raises:
        AssertionError: saying what is wrong.

    Example:
        >>> import torch
        >>> src, dst = torch.tensor([[1, 3]]), torch.tensor([[0, 2]])
        >>> plan = Plan.from_assignment(src, dst, 4)
        >>> check_plan(plan, num_tokens=4, batch=2, num_out=2)
        >>> check_plan(plan, num_tokens=4, batch=2, num_out=3)
        Traceback (most recent call last):
        ...
        AssertionError: the plan merged 2 tokens; 1 were asked for (num_merge)
    """
    num_merge = None if num_out is None else num_tokens - num_out
    problem = plan_problem(plan, num_tokens, batch, num_merge)
    require(problem is None, str(problem))
