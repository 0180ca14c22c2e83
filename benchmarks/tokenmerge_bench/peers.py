"""Peers measured side by side with tokenmerge's strategies: tomesd (when installed).

tomesd is never vendored: it is imported from its own installation and applied with its own
``apply_patch``. Its planning, merge and unmerge are timed in the instrumented run by wrapping
its ``compute_merge`` for that run only.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["PEERS", "TomesdPeer", "peer_available"]


def peer_available(name: str) -> bool:
    """True when the peer's package is installed."""
    return importlib.util.find_spec(name) is not None


class TomesdPeer:
    """tomesd 0.1.x applied to a diffusers UNet at one ratio (its defaults otherwise: merging
    the self-attention of the full-resolution level, 2 x 2 cells, random destinations)."""

    name = "tomesd"
    #: what it can patch, in words (for the error on any other model)
    scope = "tomesd patches only diffusers UNet2DConditionModel denoisers (SD 1.x / 2.x / XL)"

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True for a diffusers UNet. tomesd looks for the UNet's attention blocks and judges a
        block's resolution against the latent: on DiT-style transformers it merges nothing (it
        takes the patch size for a downsample) or fails (PixArt)."""
        return any(cls.__name__ == "UNet2DConditionModel" for cls in type(model).__mro__)

    def apply(self, model: nn.Module) -> None:
        import tomesd

        tomesd.apply_patch(model, ratio=self.ratio)
        self._max_downsample = model._tome_info["args"]["max_downsample"]

    @staticmethod
    def remove(model: nn.Module) -> None:
        import tomesd

        tomesd.remove_patch(model)

    @staticmethod
    def blocks(model: nn.Module) -> list[nn.Module]:
        """The transformer blocks tomesd patched (it swaps their class for one of its own)."""
        return [m for m in model.modules() if type(m).__name__.startswith("ToMe")]

    def merged(self, tokens: int, latent_tokens: int) -> bool:
        """Whether tomesd merges in a block seeing ``tokens`` (its own rule)."""
        downsample = int(math.ceil(math.sqrt(latent_tokens // tokens)))
        return downsample <= self._max_downsample and self.ratio > 0

    @staticmethod
    @contextmanager
    def instrumented(add: Callable[[str, float], None], sync: Callable[[], None]) -> Iterator[None]:
        """Time tomesd's planning (``compute_merge``) and the merge / unmerge functions it
        returns, adding milliseconds to ``add(part, ms)``."""
        import tomesd.patch

        original = tomesd.patch.compute_merge

        def timed(fn: Callable, part: str) -> Callable:
            def run(x: Any, *args: Any, **kwargs: Any) -> Any:
                sync()
                start = time.perf_counter()
                out = fn(x, *args, **kwargs)
                sync()
                add(part, (time.perf_counter() - start) * 1000.0)
                return out

            return run

        def compute_merge(*args: Any, **kwargs: Any) -> tuple:
            sync()
            start = time.perf_counter()
            functions = original(*args, **kwargs)
            sync()
            add("plan", (time.perf_counter() - start) * 1000.0)
            merges, unmerges = functions[:3], functions[3:]
            return (
                *(timed(fn, "merge") for fn in merges),
                *(timed(fn, "unmerge") for fn in unmerges),
            )

        tomesd.patch.compute_merge = compute_merge
        try:
            yield
        finally:
            tomesd.patch.compute_merge = original


#: peer name -> its class (constructed with the ratio)
PEERS = {"tomesd": TomesdPeer}
