"""Progress of the bench's commands on stderr, so the tables and JSON on stdout stay clean."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """Progress on stderr, so the table and JSON on stdout stay clean: a line when each phase
    starts, with the seconds since the run began, and a tqdm bar over the model calls once
    their number is known (``start``). Disabled: silent."""

    def __init__(self, enabled: bool, name: str = "bench") -> None:
        self.enabled, self.name = enabled, name
        self.started = time.perf_counter()
        self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def phase(self, text: str) -> None:
        """Say that a phase starts (and name it on the bar)."""
        if not self.enabled:
            return
        line = f"{self.name} [{time.perf_counter() - self.started:5.1f} s] {text}"
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)
        else:
            self.bar.set_description(text.split(":")[0])
            self.bar.write(line, file=sys.stderr)

    def start(self, total: int, unit: str = "call") -> None:
        """A bar over ``total`` model calls (none without tqdm, a dependency of this package)."""
        if not self.enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, unit=unit, desc=self.name, leave=False, file=sys.stderr)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            self.phase("done")
