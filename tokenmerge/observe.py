"""Observers: watch the parts of a patch's work at every site, without touching any class.

``Handle.observe(observer)`` attaches an ``Observer`` to every site of a patch: from then on each
part of the work a site does runs inside ``observer.around(part, site)``, until the returned
``Observation`` is removed (or its ``with`` block ends). The parts:

- ``"plan"``: a site makes a fresh plan (the adapter's layout, the features, the strategy); a
  call that reuses a cached plan makes none;
- ``"merge"``: tokens merged in front of a target module (or at a progressive block);
- ``"unmerge"``: a target's output copied back to every token, the value correction included;
- ``"fit"``: the value correction fitting its weight for a new plan (inside an ``"unmerge"``).

What it is for: timing the merge overhead (the bench's ``OverheadTimers``), counting, or telling
the correction's own attention calls from the model's in a test. With no observer attached a
site pays one ``is None`` check per part and queues no extra tensor op. Attaching one to a
``torch.compile``-d model recompiles its graphs on the next call, and an observer's Python code
breaks them where it runs: observe instrumented runs, not the runs you time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Literal, Protocol, TypeVar

from .site import Site

__all__ = ["Observation", "Observer", "Part", "unobserved"]

#: the parts of a site's work an observer is called around
Part = Literal["plan", "merge", "unmerge", "fit"]

T = TypeVar("T")


class Observer:
    """Watches the parts of a patch's work; subclass it and override ``around``.

    Example:
        >>> import torch, tokenmerge
        >>> from contextlib import contextmanager
        >>> from tokenmerge.observe import Observer
        >>> class Journal(Observer):
        ...     def __init__(self):
        ...         self.seen = []
        ...     @contextmanager
        ...     def around(self, part, site):
        ...         self.seen.append((part, site.name))
        ...         yield
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> handle = tokenmerge.apply(model, "tome", ratio=0.5, adapter="generic",
        ...                           sites={"include": ["0"], "min_tokens": 1})
        >>> with handle.observe(Journal()) as journal:
        ...     _ = model(torch.randn(2, 64, 8))
        >>> journal.seen
        [('plan', '0'), ('merge', '0'), ('unmerge', '0')]
        >>> handle.remove()
    """

    def around(self, part: Part, site: Site) -> AbstractContextManager[object]:
        """A context the site runs ``part`` of its work in (default: one that does nothing).

        Args:
            part: ``"plan"``, ``"merge"``, ``"unmerge"`` or ``"fit"`` (see ``tokenmerge.observe``).
            site: the site doing it.
        """
        return nullcontext()


class _Observed(Protocol):
    """What an observer is attached to: a site's runtime (``SitePatch``)."""

    observer: Observer | None


class _Several(Observer):
    """Several observers of one site, entered in the order they were attached."""

    def __init__(self, observers: tuple[Observer, ...]) -> None:
        self.observers = observers

    @contextmanager
    def around(self, part: Part, site: Site) -> Iterator[None]:
        with ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(observer.around(part, site))
            yield


def _attached(target: _Observed) -> tuple[Observer, ...]:
    current = target.observer
    if current is None:
        return ()
    return current.observers if isinstance(current, _Several) else (current,)


def _attach(target: _Observed, observers: tuple[Observer, ...]) -> None:
    # None when there is none, so the hot path asks one ``is None`` and nothing more
    if not observers:
        target.observer = None
    else:
        target.observer = observers[0] if len(observers) == 1 else _Several(observers)


class Observation:
    """An observer attached to a patch's sites (what ``Handle.observe`` returns).

    ``remove()`` detaches it (a second call does nothing); as a context manager it gives the
    observer and detaches it on exit.

    Args:
        targets: the sites' runtimes (``handle.patches``).
        observer: the observer to attach.
    """

    def __init__(self, targets: Sequence[_Observed], observer: Observer) -> None:
        if not callable(getattr(observer, "around", None)):
            raise TypeError(
                f"an observer needs an around(part, site) method returning a context manager; "
                f"got {type(observer).__name__} (subclass tokenmerge.observe.Observer)"
            )
        self.observer = observer
        self._targets = list(targets)
        self.removed = False
        for target in self._targets:
            _attach(target, (*_attached(target), observer))

    def remove(self) -> None:
        """Detach the observer from every site; calling it again does nothing."""
        if self.removed:
            return
        for target in self._targets:
            observers = list(_attached(target))
            if self.observer in observers:
                observers.remove(self.observer)  # one attachment: the same observer may hold two
            _attach(target, tuple(observers))
        self.removed = True

    def __enter__(self) -> Any:
        return self.observer

    def __exit__(self, *exc: object) -> None:
        self.remove()


def unobserved(part: Part, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``: the stand-in for ``SitePatch.observed`` where nothing observes."""
    return fn(*args, **kwargs)
