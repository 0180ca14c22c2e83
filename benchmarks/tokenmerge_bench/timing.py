"""Timers for the bench: whole forwards, the merge overhead of an instrumented run, peak memory.

The overhead timers observe a handle (``Handle.observe``) for an instrumented run only
(synchronising the device around each part, which slows it), so they never sit inside the timed
runs that speedups come from.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tokenmerge.observe import Observer, Part
from tokenmerge.site import Site

__all__ = ["OverheadTimers", "peak_memory_mb", "spread", "synchronizer", "timed"]

PARTS = ("plan", "merge", "unmerge")


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    """Seconds ``fn()`` took (device work included) and its result."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def spread(median: float, low: float, high: float, spec: str = ".3f") -> str:
    """A median with the spread of its samples, for the tables: ``median (min-max)``.

    Example:
        >>> spread(1.234, 1.2, 1.31, ".2f")
        '1.23 (1.20-1.31)'
    """
    return f"{median:{spec}} ({low:{spec}}-{high:{spec}})"


class OverheadTimers(Observer):
    """Milliseconds spent planning, merging and unmerging (value correction included) at the
    sites of the handles it observes.

    An observer (``tokenmerge.observe``): attach it with ``handle.observe(timers)``. Each part
    is timed with the device synchronised around it, which slows the run: observe an
    instrumented run, never the timed ones. A part inside another (the value correction's fit
    inside an unmerge) counts as the outer one, once.

    Example:
        >>> import tokenmerge
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> handle = tokenmerge.apply(model, "tome", ratio=0.5, adapter="generic",
        ...                           sites={"include": ["0"], "min_tokens": 1})
        >>> with handle.observe(OverheadTimers(torch.device("cpu"))) as timers:
        ...     _ = model(torch.randn(2, 64, 8))
        >>> sorted(timers.calls.items())
        [('merge', 1), ('plan', 1), ('unmerge', 1)]
    """

    def __init__(self, device: torch.device) -> None:
        self.sync = synchronizer(device)
        self.ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth = 0

    def add(self, part: str, ms: float) -> None:
        self.ms[part] += ms
        self.calls[part] += 1

    @contextmanager
    def around(self, part: Part, site: Site) -> Iterator[None]:
        if self._depth:  # a part inside another (never double-count)
            yield
            return
        self._depth += 1
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
        self.sync()
        # the value correction is part of unmerging
        self.add("unmerge" if part == "fit" else part, (time.perf_counter() - start) * 1000.0)


#: what the profiler (kineto, C++) writes straight to file descriptor 2 around a CPU-only
#: profile: its start / stop markers and stage lines, on a CUDA build without a GPU its failed
#: device query, and c10's note (once per process) when the profiled call frees memory
#: allocated before the profile began. Only these lines are dropped; anything else written
#: meanwhile is kept.
PROFILER_CHATTER = re.compile(
    r"(USDT|STAGE|ERROR|WARNING):\S+ \S+ \d+:\d+ \w+\.cpp:\d+\] "
    r"(profiler_start|profiler_stop|gpuGetDeviceCount failed with code \d+|Completed Stage: .*"
    r"|CPU trace is empty!|No Valid Trace Events \(CPU/GPU\) found\. Outputting empty trace\.)"
    r"|\[W\d{4} [\d:.]+ (\d+ )?CPUAllocator\.cpp:\d+\] Memory block of unknown size was "
    r"allocated before the profiling started, profiler results will not include the "
    r"deallocation event"
)


@contextmanager
def without_profiler_chatter() -> Iterator[None]:
    """Drop the profiler's own lines (``PROFILER_CHATTER``) from file descriptor 2 while the
    block runs, and pass every other line through when it ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if not PROFILER_CHATTER.fullmatch(line.rstrip("\n"))]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one call of ``fn``, in MiB, or None where it cannot be measured.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (weights included). CPU: the peak of
    the allocations the profiler records during the call (what the call itself allocates:
    activations and workspaces, not the weights that were already there). Never process RSS.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # the whole profile: c10 notes the call's freeing of older memory while it runs
    with without_profiler_chatter(), profiler:
        fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20
