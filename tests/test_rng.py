"""The sites' random stream (``tokenmerge.rng``): reproducible, and uniform enough to pick cells'
destinations and rank tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenmerge.rng import SiteRandom

#: chi-square quantiles at 0.9999 (a correct stream fails one seed in 10,000): 3 and 15 degrees
#: of freedom
CHI2_LIMIT = {4: 21.11, 16: 44.26}


def chi_square(values: Tensor, bins: int) -> float:
    counts = torch.bincount(values.flatten(), minlength=bins).double()
    expected = values.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_same_seed_same_draws_and_each_draw_continues_the_stream():
    first, second = SiteRandom(11), SiteRandom(11)
    a, b = first.bits((64,), "cpu"), first.bits((64,), "cpu")
    assert torch.equal(a, second.bits((64,), "cpu"))
    assert not torch.equal(a, b)
    first.reset()
    assert torch.equal(first.bits((64,), "cpu"), a)


def test_bits_are_uniform_and_draws_independent():
    """Over 64 draws of 1024 numbers: every bit is set half the time, the two lowest bits (what
    picks one place of a 2 x 2 cell) and the four highest are uniform, and a number says
    nothing about the same element's number in the next draw."""
    for seed in (0, 7, 2**31 + 5):
        rng = SiteRandom(seed)
        draws = torch.stack([rng.bits((1024,), "cpu") for _ in range(64)])
        assert draws.min() >= 0 and draws.max() < 2**32
        set_bits = torch.stack([(draws >> bit) & 1 for bit in range(32)]).double()
        # 65,536 numbers per bit: a standard deviation of 0.002
        assert (set_bits.mean(dim=(1, 2)) - 0.5).abs().max() < 0.01, seed
        assert chi_square(draws % 4, 4) < CHI2_LIMIT[4], seed
        assert chi_square(draws >> 28, 16) < CHI2_LIMIT[16], seed
        pairs = (draws[:-1] % 4) * 4 + draws[1:] % 4
        assert chi_square(pairs, 16) < CHI2_LIMIT[16], seed


def test_integers_and_uniform_stay_in_range():
    rng = SiteRandom(3)
    assert rng.integers(9, (4096,), "cpu").unique().tolist() == list(range(9))
    uniform = rng.uniform((4096,), "cpu")
    assert uniform.dtype == torch.float32 and 0 <= uniform.min() and uniform.max() < 1
