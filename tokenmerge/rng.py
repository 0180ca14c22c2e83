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

from .windows import made_once

__all__ = ["SiteRandom"]

_MASK32 = 0xFFFFFFFF
_DRAW_STEP = 0x85EBCA77
_ELEMENT_STEP = 0x9E3779B1


@made_once
def _spread(count: int, device: torch.device) -> Tensor:
    """``(count,)`` every element's place in a draw's hash input."""
    return torch.arange(count, dtype=torch.int64, device=device) * _ELEMENT_STEP


def _hash32(x: Tensor) -> Tensor:
    """32 well-mixed bits (int64, 0 .. 2**32 - 1) of every int64 in ``x``.

    lowbias32's xor-shifts and multipliers, on the whole int64 words: products wrap modulo
    2**64 and their high bits are shifted down into the low ones, so no mask is needed between
    the steps (each would be a kernel per draw); only the result is cut to 32 bits.
    """
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return (x ^ (x >> 16)) & _MASK32


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
        # the key is a tensor: under torch.compile it is a graph input, so sites with different
        # seeds share one graph and advancing it is a traced in-place update (a Python int
        # would be baked into the graph and force a recompile per value)
        self._seed = seed & _MASK32
        self.key = torch.tensor(self._seed, dtype=torch.int64)  # seed + draws * _DRAW_STEP
        #: whether the stream was drawn from since it (re)started: a stream never drawn from
        #: (a strategy that draws nothing) is not reset, one op fewer per site and call
        self._drawn = False

    def reset(self) -> None:
        """Start the stream over (same seed, same draws)."""
        if self._drawn:
            self.key.fill_(self._seed)
            self._drawn = False

    def bits(self, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        """32 random bits per element of ``shape`` (int64); each call continues the stream."""
        count = 1
        for size in shape:
            count *= size
        # draws and elements are spread by two odd constants: the (draw, element) pairs that
        # would hash the same input lie billions of elements apart
        mixed = _spread(count, torch.device(device)) + self.key.to(device)
        self.key.add_(_DRAW_STEP)  # after the read: on the CPU .to() is the key itself
        self._drawn = True
        return _hash32(mixed).view(shape)

    def uniform(self, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        """Float32 draws in [0, 1) of ``shape``; each call continues the stream."""
        return (self.bits(shape, device) >> 8).to(torch.float32).mul_(2.0**-24)

    def integers(self, high: int, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        """Int64 draws in ``[0, high)`` of ``shape`` (the bias of the modulo is below
        ``high / 2**32``)."""
        return self.bits(shape, device) % high
