"""What is wrong with a plan, if anything: the framework's check of every fresh plan.

A plan that lists a source twice, or points a token at a slot that does not exist, does not
fail where it is used: its flat row indices reach into the next sample of the batch, so tokens
come back holding another sample's values. So every plan a strategy makes is checked once, when
it is made (never when a cached plan is reused), before anything merges with it.

Two depths of checking:

- **structure** (every strategy): a ``Plan`` whose index tensors are ``int64`` and whose
  dtypes, devices, shapes, row count, ``num_tokens`` and merge count agree with what was asked.
  These read only shapes and dtypes, no tensor values: no host sync, nothing for
  ``torch.compile`` to break on.
- **values** (strategies whose ``make_plan`` is not tokenmerge's own): every index in range,
  sources distinct and disjoint from the kept tokens, kept tokens ascending, ``origin`` and
  ``dst`` agreeing, ``dst_count`` the size of each source's slot. That reads one boolean tensor
  back to the host per fresh plan (a sync on a GPU). The built-in strategies are held to the same
  rules by the conformance suite in CI (``tokenmerge.testing.check_strategy``), so their plans
  skip it.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from .plan import Plan

__all__ = ["capacity_problem", "checks_values", "plan_problem"]

_INDEX_FIELDS = ("kept", "src", "dst", "origin")


def checks_values(strategy_class: type) -> bool:
    """Whether the plans of ``strategy_class`` get the value checks: true unless the
    ``make_plan`` it runs is tokenmerge's own (a subclass of a built-in that overrides it is
    checked).

    Example:
        >>> import tokenmerge
        >>> from tokenmerge.registry import registry
        >>> checks_values(registry.strategy("tome"))
        False
    """
    method = getattr(strategy_class, "make_plan", None)
    return not getattr(method, "__module__", "").startswith("tokenmerge.")


def capacity_problem(capacity: Any, num_tokens: int) -> str | None:
    """What is wrong with a strategy's ``capacity()`` for ``num_tokens`` image tokens: it must
    be an int in ``0 .. num_tokens - 1`` (at least one token stays).

    Example:
        >>> capacity_problem(3, 16) is None
        True
        >>> capacity_problem(-1, 16)
        'capacity() is -1, outside 0..15 (at least one token stays)'
    """
    if not isinstance(capacity, numbers.Integral) or isinstance(capacity, bool):
        return f"capacity() returned {type(capacity).__name__} {capacity!r}, not int"
    if not 0 <= capacity <= num_tokens - 1:
        return f"capacity() is {capacity}, outside 0..{num_tokens - 1} (at least one token stays)"
    return None


def plan_problem(
    plan: Any,
    num_tokens: int,
    batch: int,
    num_merge: int | None = None,
    values: bool = True,
) -> str | None:
    """What is wrong with ``plan`` as a plan over ``num_tokens`` tokens for ``batch`` samples,
    or None when nothing is.

    Args:
        plan: what a strategy returned.
        num_tokens: ``N``, the tokens it must apply to.
        batch: the batch it is for (its rows must be 1 or this).
        num_merge: if given, how many tokens it must merge.
        values: check the index values too (one host read), not only the structure.

    Example:
        >>> import torch
        >>> src, dst = torch.tensor([[1, 3]]), torch.tensor([[0, 2]])
        >>> plan = Plan.from_assignment(src, dst, 4)
        >>> plan_problem(plan, num_tokens=4, batch=2, num_merge=2) is None
        True
        >>> twice = Plan(plan.kept, torch.tensor([[1, 1]]), plan.dst, plan.origin,
        ...              plan.dst_count, 4)
        >>> print(plan_problem(twice, num_tokens=4, batch=1))
        row 0: token 1 is kept or merged 2 times, not once (sources must be ...)
    """
    problem = _structure_problem(plan, num_tokens, batch, num_merge)
    if problem is None and values:
        problem = _value_problem(plan)
    return problem


def _structure_problem(plan: Any, num_tokens: int, batch: int, num_merge: int | None) -> str | None:
    if not isinstance(plan, Plan):
        return f"expected a tokenmerge.extend.Plan, got {type(plan).__name__}"
    n = plan.num_tokens
    if not isinstance(n, int) or isinstance(n, bool):
        return f"plan.num_tokens is {type(n).__name__} {n!r}, not int"
    if n != num_tokens:
        return f"the plan is over {n} tokens, expected {num_tokens}"
    assignment = plan._assignment  # noqa: SLF001 (a plan made by from_assignment)
    if assignment is not None:
        return _assignment_problem(plan, assignment, batch, num_merge)
    for field in (*_INDEX_FIELDS, "dst_count"):
        value = getattr(plan, field)
        if not isinstance(value, Tensor):
            return f"plan.{field} is {type(value).__name__}, not a tensor"
        if value.dim() != 2:
            return f"plan.{field} has shape {tuple(value.shape)}, not (rows, count)"
        if field == "dst_count":
            if not value.is_floating_point():
                return f"plan.dst_count is {value.dtype}, not floating point"
        elif value.dtype != torch.long:
            return f"plan.{field} is {value.dtype}, not torch.long (token indices)"
    problem = _size_problem(plan, batch, num_merge)
    if problem is not None:
        return problem
    rows, m, r = plan.batch, plan.num_out, plan.num_merged
    n = plan.num_tokens
    shapes = {"kept": (rows, m), "src": (rows, r), "dst": (rows, r), "origin": (rows, n)}
    shapes["dst_count"] = (rows, r)
    if plan.log_counts is not None:
        shapes["log_counts"] = (rows, m)
    for field, shape in shapes.items():
        value = getattr(plan, field)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            return f"plan.{field} has shape {found}, expected {shape}"
        if value.device != plan.device:
            return f"plan.{field} is on {value.device}, plan.kept on {plan.device}"
    return None


def _size_problem(plan: Plan, batch: int, num_merge: int | None) -> str | None:
    rows, m, r, n = plan.batch, plan.num_out, plan.num_merged, plan.num_tokens
    if rows not in (1, batch):
        allowed = "1" if batch == 1 else f"1 or {batch}"
        return f"the plan has {rows} rows for a batch of {batch} ({allowed})"
    if num_merge is not None and r != num_merge:
        return f"the plan merged {r} tokens; {num_merge} were asked for (num_merge)"
    if m + r != n:
        return f"{m} kept + {r} merged tokens != {n} tokens"
    return None


def _assignment_problem(
    plan: Plan, assignment: Any, batch: int, num_merge: int | None
) -> str | None:
    """The structure of a plan made by ``from_assignment``: its fields follow from ``src``
    and ``dst_token`` when it is applied, so those are what is checked (no field is made)."""
    for name in ("src", "dst_token"):
        value = getattr(assignment, name)
        if value.dtype != torch.long:
            return f"from_assignment's {name} is {value.dtype}, not torch.long (token indices)"
        if value.device != plan.device:
            return f"from_assignment's {name} is on {value.device}, src on {plan.device}"
    return _size_problem(plan, batch, num_merge)


def _value_problem(plan: Plan) -> str | None:
    """The index checks, read back together (one host sync); the details of a failure are
    worked out after, on the error path."""
    assignment = plan._assignment  # noqa: SLF001
    if assignment is not None:
        # the fields are made from these: an index out of range would fail there, in torch
        for name in ("src", "dst_token"):
            value, high = getattr(assignment, name), assignment.tokens
            low, top = torch.stack([value.min(), value.max()]).tolist()
            if low < 0 or top >= high:
                return f"from_assignment's {name} holds {low}..{top}, outside 0..{high - 1}"
    n, m, rows = plan.num_tokens, plan.num_out, plan.batch
    highs = {"kept": n, "src": n, "dst": m, "origin": m}
    # clamped copies keep every later check in bounds whatever the plan holds
    safe = {f: getattr(plan, f).clamp(0, max(high - 1, 0)) for f, high in highs.items()}
    flags = [
        ((getattr(plan, f) >= 0) & (getattr(plan, f) < high)).all() for f, high in highs.items()
    ]
    ascending = (safe["kept"][:, 1:] > safe["kept"][:, :-1]).all()
    seen = torch.zeros(rows, n, dtype=torch.long, device=plan.device)
    seen.scatter_add_(1, safe["kept"], torch.ones_like(safe["kept"]))
    seen.scatter_add_(1, safe["src"], torch.ones_like(safe["src"]))
    slots = torch.arange(m, device=plan.device).expand(rows, -1)
    counts = torch.zeros(rows, m, device=plan.device).scatter_add_(
        1, safe["origin"], torch.ones(rows, n, device=plan.device)
    )
    sizes = plan.dst_count.float()
    flags += [
        ascending,
        (seen == 1).all(),
        (safe["origin"].gather(1, safe["kept"]) == slots).all(),
        (safe["origin"].gather(1, safe["src"]) == plan.dst).all(),
        (sizes == counts.gather(1, safe["dst"])).all(),
    ]
    if plan.log_counts is not None:
        flags.append(torch.isclose(plan.log_counts.float(), counts.log()).all())
    passed = torch.stack(flags).tolist()  # the one host read of a checked plan
    if all(passed):
        return None
    failed = passed.index(False)
    if failed < len(highs):
        field, high = list(highs.items())[failed]
        value = getattr(plan, field)
        low, top = int(value.min()), int(value.max())
        return f"plan.{field} holds {low}..{top}, outside 0..{high - 1}"
    if failed == len(highs) + 1:
        row, token = (seen != 1).nonzero()[0].tolist()
        return (
            f"row {row}: token {token} is kept or merged {int(seen[row, token])} times, not once "
            "(sources must be distinct and disjoint from the kept tokens)"
        )
    return [
        "kept is not strictly ascending",
        "",
        "origin does not map every kept token to its own slot",
        "origin does not map every source to its destination's slot",
        "dst_count is not the size of each source's slot",
        "log_counts is not the log of each slot's size",
    ][failed - len(highs)]
