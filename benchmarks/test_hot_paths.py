"""pytest-benchmark timings of the hot paths: planning, merge, unmerge and one attention site.

For every registered strategy, at ratio 0.5, on 32 x 32, 64 x 64 and 96 x 96 grids (1024, 4096
and 9216 tokens; 320 channels, batch 2, SD 1.5's full-resolution width) of tokens made from the
bundled photograph:

- ``plan``: ``SitePatch.make_plan``, the framework's real path (feature normalisation included);
- ``merge`` / ``unmerge``: ``Plan.merge`` and ``Plan.unmerge`` with that plan;
- ``site``: one self-attention site (q / k / v and output projections, SDPA, 8 heads) run whole:
  without merging, and with each strategy (plan + merge + attention + unmerge).

Each benchmark group holds one operation at one token count (``site 4096`` holds none, random,
retom and tome), so the report compares like with like. Speed is never asserted; each test checks
shapes and token counts. Not part of the default test run (``testpaths`` is ``tests``); run
``make hotpaths`` or ``pytest benchmarks --benchmark-enable``, and ``--benchmark-disable`` runs
every function once as a smoke test.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokenmerge
from tokenmerge.patch import SitePatch
from tokenmerge.plan import Plan
from tokenmerge.site import Site, TokenLayout
from tokenmerge.state import StepState
from tokenmerge_bench.photos import photo_tokens

SIDES = (32, 64, 96)  # grid sides: 1024, 4096 and 9216 tokens
PATCH = 4  # pixels per patch side: the photograph is resized to side * PATCH pixels
CHANNELS = 320
HEADS = 8
BATCH = 2
RATIO = 0.5
SITE = Site("down_blocks.0.attentions.0.transformer_blocks.0", stage="down", level=1)
STRATEGIES = tokenmerge.list_strategies()


def _grids(operation: str) -> list:
    """One parameter per grid side, in the benchmark group ``"<operation> <tokens>"``."""
    return [
        pytest.param(
            side,
            id=str(side * side),
            marks=pytest.mark.benchmark(group=f"{operation} {side * side}"),
        )
        for side in SIDES
    ]


@functools.cache
def _tokens(side: int) -> Tensor:
    """``(2, side^2, 320)`` tokens of the photograph and its mirror image (``photo_tokens``)."""
    return photo_tokens(side, CHANNELS, PATCH)


def _patch(strategy: str, side: int) -> SitePatch:
    config = tokenmerge.load_config(strategy, ratio=RATIO, sites={"min_tokens": 1})
    layout = TokenLayout((side, side))
    return SitePatch(
        SITE, tokenmerge.get_strategy(config), config, StepState(), lambda site, x: layout
    )


def _plan(strategy: str, side: int) -> Plan:
    plan = _patch(strategy, side).make_plan(_tokens(side))
    assert plan is not None
    return plan


class _SelfAttention(nn.Module):
    """A diffusers-style self-attention: q / k / v projections, SDPA, output projection."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.to_qkv = nn.Linear(CHANNELS, 3 * CHANNELS, bias=False)
        self.to_out = nn.Linear(CHANNELS, CHANNELS)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        qkv = self.to_qkv(x).view(batch, tokens, 3, HEADS, CHANNELS // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(y.transpose(1, 2).reshape(batch, tokens, CHANNELS))


@pytest.fixture(scope="module")
def attention() -> _SelfAttention:
    return _SelfAttention().eval()


def _site(patch: SitePatch | None, attention: _SelfAttention, x: Tensor) -> tuple[Tensor, int]:
    """The whole site: plan, merge, attention on the merged tokens, unmerge. Returns the output
    and the number of tokens the attention saw."""
    with torch.no_grad():
        if patch is None:
            return attention(x), x.shape[1]
        plan = patch.make_plan(x)
        merged = plan.merge(x)
        return plan.unmerge(attention(merged)), merged.shape[1]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("side", _grids("plan"))
def test_plan(benchmark, strategy, side):
    x = _tokens(side)
    patch = _patch(strategy, side)
    plan = benchmark(patch.make_plan, x)
    n = side * side
    assert plan.num_tokens == n
    assert plan.num_out == n - int(RATIO * n)
    assert plan.batch in (1, BATCH)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("side", _grids("merge"))
def test_merge(benchmark, strategy, side):
    x = _tokens(side)
    plan = _plan(strategy, side)
    merged = benchmark(plan.merge, x)
    assert merged.shape == (BATCH, side * side - int(RATIO * side * side), CHANNELS)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("side", _grids("unmerge"))
def test_unmerge(benchmark, strategy, side):
    x = _tokens(side)
    plan = _plan(strategy, side)
    merged = plan.merge(x)
    restored = benchmark(plan.unmerge, merged)
    assert restored.shape == x.shape
    # every token of a slot now holds the slot's value, so merging again is exact
    torch.testing.assert_close(plan.merge(restored), merged, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["none", *STRATEGIES])
@pytest.mark.parametrize("side", _grids("site"))
def test_site(benchmark, attention, strategy, side):
    x = _tokens(side)
    patch = None if strategy == "none" else _patch(strategy, side)
    out, attended = benchmark(_site, patch, attention, x)
    n = side * side
    assert out.shape == x.shape
    assert attended == (n if patch is None else n - int(RATIO * n))
    assert torch.isfinite(out).all()
