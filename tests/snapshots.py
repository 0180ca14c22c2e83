"""What exact removal is checked against: every module's class, ``vars()`` and hooks."""

from __future__ import annotations

from torch import nn

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def hook_count(model: nn.Module) -> int:
    return sum(len(getattr(m, d, {})) for m in model.modules() for d in _HOOK_DICTS)


def snapshot(model: nn.Module) -> tuple[dict, list[str]]:
    """Class and ``vars()`` of every module (keys, and the identity of every value: no attribute
    is replaced, e.g. no attention processor), and the state-dict keys."""
    modules = {
        name: (type(m), sorted((key, id(value)) for key, value in vars(m).items()))
        for name, m in model.named_modules()
    }
    return modules, list(model.state_dict())


#: > 0 while a value correction fits its weight (tests/conftest.py wraps ValueCorrection._fit)
FITTING = [0]


def counting() -> bool:
    """False during a value correction's fit, whose exact-row attention call is not one of the
    model's own calls: hooks that count what the model's modules compute skip it."""
    return FITTING[0] == 0
