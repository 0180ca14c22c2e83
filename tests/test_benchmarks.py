"""pytest-benchmark timings of the hot path: planning, merge and unmerge at SD 1.5's largest site.

They run once as smoke tests in the normal suite (``--benchmark-disable`` in pyproject.toml); time
them with ``make test ARGS="tests/test_benchmarks.py --benchmark-enable"``. Speed is never asserted
here: compare the reported figures, taken in the same run.
"""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge.patch import SitePatch
from tokenmerge.photos import load_photo, patch_tokens
from tokenmerge.site import Site, TokenLayout
from tokenmerge.state import StepState

GRID = (64, 64)
SITE = Site("bench", stage="down", level=1)


@pytest.fixture(scope="module")
def tokens():
    pixels, grid = patch_tokens(load_photo(), 4)
    assert grid == GRID
    projection = torch.randn(48, 320, generator=torch.Generator().manual_seed(0))
    return torch.cat([pixels, pixels.flip(1)]) @ projection


def _patch(name: str, ratio: float) -> SitePatch:
    config = tokenmerge.load_config(name, ratio=ratio, min_tokens=1)
    strategy = tokenmerge.get_strategy(config)
    return SitePatch(SITE, strategy, config, StepState(), lambda site, x: TokenLayout(GRID))


@pytest.mark.parametrize("name", ["tome", "retom", "random"])
def test_bench_plan(benchmark, tokens, name):
    patch = _patch(name, 0.5)
    plan = benchmark(patch.make_plan, tokens)
    assert plan.num_out == tokens.shape[1] // 2


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_bench_merge(benchmark, tokens, ratio):
    plan = _patch("retom", ratio).make_plan(tokens)
    merged = benchmark(plan.merge, tokens)
    assert merged.shape[1] == tokens.shape[1] - int(ratio * tokens.shape[1])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_bench_unmerge(benchmark, tokens, ratio):
    plan = _patch("retom", ratio).make_plan(tokens)
    merged = plan.merge(tokens)
    restored = benchmark(plan.unmerge, merged)
    assert restored.shape == tokens.shape
