"""Counter-based random numbers for plans: reproducible, private, device-independent, compilable.

Each site draws from its own ``SiteRandom``: numbers are a hash of (seed, draw counter, element
index) computed with integer tensor ops, one hash per number (a planning call draws once, so its
kernels count: ``tokenmerge.testing.count_kernels``). Hence:

- the global RNG (``torch.manual_seed``...) is never read nor advanced;
- the same seed gives the same plan on every device (CPU, CUDA, MPS give identical draws);
- no ``torch.Generator`` is created or consumed, which ``torch.compile`` cannot trace.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SiteRandom"]

_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function (lowbias32) on int64 tensors holding 32-bit values.

    Products stay below 2**64 and wrap in int64; only their low 32 bits are kept.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


class SiteRandom:
    """A stream of uniform draws keyed by a seed; ``reset`` starts the stream over.

    Example:
        >>> rng = SiteRandom(seed=7)
        >>> a = rng.uniform((3,), "cpu")
        >>> rng.reset()
        >>> bool((rng.uniform((3,), "cpu") == a).all())
        True
    """

    def __init__(self, seed: int) -> None:
        # seed and counter are tensors: under torch.compile they are graph inputs, so sites with
        # different seeds share one graph and advancing the counter is a traced in-place update
        # (Python ints would be baked into the graph and force a recompile per value)
        self.seed = torch.tensor(seed & _MASK32, dtype=torch.int64)
        self.draws = torch.zeros((), dtype=torch.int64)

    def reset(self) -> None:
        """Start the stream over (same seed, same draws)."""
        self.draws.zero_()

    def _bits(self, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        """32 random bits per element of ``shape`` (int64); each call continues the stream."""
        count = 1
        for size in shape:
            count *= size
        # draws and elements are spread by two odd constants: the (draw, element) pairs that
        # would hash the same input lie billions of elements apart
        key = (self.draws * 0x85EBCA77 + self.seed).to(device)
        self.draws.add_(1)
        index = torch.arange(count, dtype=torch.int64, device=device)
        return _hash32(index * 0x9E3779B1 + key).view(shape)

    def uniform(self, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        """Float32 draws in [0, 1) of ``shape``; each call continues the stream."""
        return (self._bits(shape, device) >> 8).to(torch.float32).mul_(2.0**-24)

    def integers(self, high: int, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        """Int64 draws in ``[0, high)`` of ``shape`` (the bias of the modulo is below
        ``high / 2**32``)."""
        return self._bits(shape, device) % high
