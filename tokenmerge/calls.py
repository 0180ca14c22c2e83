"""Per-thread call state: what one forward of a patched model keeps between its hooks.

A patched model may be called from several threads at once (a server's request threads sharing
one model). Everything a call writes and reads back later - the step state, each site's plan
cache and block input, the token grid, progressive mode's token record, the plan between a
pre-hook and its forward hook - lives in a ``PerThread`` holder, so each thread sees its own,
exactly as if it were alone on the model. What is shared by all threads: the weights, the
configuration and the statistics.

Holders are read as ``holder.value`` (one attribute read of a ``threading.local``) and the value,
a plain object, is changed in place. ``torch.compile`` traces that; it drops assignments to the
``threading.local`` itself, so ``holder.value = ...`` happens only outside compiled code (here,
at construction and when a copy is restored).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["CallValues", "PerThread"]


class PerThread(threading.local):
    """``value``: one object per thread, made by ``factory()`` the first time the thread reads it.

    ``copy.deepcopy`` and pickling keep the value of the thread that copies (so a copy taken
    mid-generation goes on as the original would in that thread); other threads of the copy
    start afresh.

    Example:
        >>> import threading
        >>> holder = PerThread(list)
        >>> holder.value.append("main")
        >>> seen = []
        >>> worker = threading.Thread(target=lambda: seen.append(list(holder.value)))
        >>> worker.start(); worker.join()
        >>> seen, holder.value
        ([[]], ['main'])
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        # threading.local runs __init__ with these arguments again in every new thread
        self.factory = factory
        self.value = factory()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restored, (self.factory, self.value))


def _restored(factory: Callable[[], Any], value: Any) -> PerThread:
    holder = PerThread(factory)
    holder.value = value
    return holder


class CallValues:
    """A plain bag of attributes, the value of a ``PerThread`` holding a few fields.

    Example:
        >>> values = CallValues(grid=None)
        >>> values.grid = (4, 4)
        >>> values.grid
        (4, 4)
    """

    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"CallValues({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
