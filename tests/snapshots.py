"""What exact removal is checked against (every module's class, ``vars()`` and hooks); which
calls token counters count (not the value correction's own); a journal of what sites do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from torch import nn

from tokenmerge.api import HANDLE_ATTR
from tokenmerge.observe import Observation, Observer, Part
from tokenmerge.site import Site

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


class Journal(Observer):
    """Records ``(part, site name)`` as each part of a site's work begins (``handle.observe``)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def around(self, part: Part, site: Site) -> AbstractContextManager[object]:
        self.seen.append((part, site.name))
        return nullcontext()


class _FitWatcher(Observer):
    """Marks the value correction's fits (``counting``) at the sites of the handles it watches."""

    def __init__(self) -> None:
        self.fitting = 0

    @contextmanager
    def around(self, part: Part, site: Site) -> Iterator[None]:
        if part != "fit":
            yield
            return
        self.fitting += 1
        try:
            yield
        finally:
            self.fitting -= 1


_FITS = _FitWatcher()


def watch_fits(model: nn.Module) -> list[Observation]:
    """Watch the fits of the patch on ``model`` (if it has one), so that ``counting`` is False
    during them; ``.remove()`` what it returns when done. Token counters call it on creation,
    after ``tokenmerge.apply``."""
    handle = vars(model).get(HANDLE_ATTR)
    return [] if handle is None else [handle.observe(_FITS)]


def counting() -> bool:
    """False during a watched value correction's fit (``watch_fits``), whose exact-row attention
    call is not one of the model's own calls: hooks that count what the model's modules compute
    skip it."""
    return _FITS.fitting == 0
