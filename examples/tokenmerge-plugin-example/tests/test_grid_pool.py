"""The plugin's own tests: tokenmerge's conformance kit, then grid_pool's behaviour.

Entry-point autoloading is turned off and the plugin registered explicitly, so the tests see
exactly the built-ins and grid_pool, whether or not the distribution (with its entry point) is
installed and whatever other plugins the environment has.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from tokenmerge_plugin_example import plugin, strategy
from tokenmerge_plugin_example.strategy import GridPoolStrategy
from torch import nn

import tokenmerge
from tokenmerge.registry import DISABLE_AUTOLOAD_ENV, registry
from tokenmerge.rng import SiteRandom
from tokenmerge.testing import check_adapter, check_strategy


@pytest.fixture(autouse=True)
def grid_pool_registered(monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    registry.reset()
    tokenmerge.extend.register_plugin(plugin, name="example")
    yield
    registry.reset()


class Attention(nn.Module):
    """Single-head self-attention over ``(B, N, C)`` tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v))


class TinyViT(nn.Module):
    """Two residual attention blocks over an 8 x 8 grid of 16-channel tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Attention(16) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyViT().eval()


def run(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(1))
    return model(x)


# ---------------------------------------------------------------------------- conformance kit


@pytest.mark.parametrize("options", [None, {"k": 3}, {"k": 2, "anchor": "center"}])
def test_strategy_conforms(options):
    check_strategy("grid_pool", options)


def test_strategy_class_conforms():
    check_strategy(GridPoolStrategy)


def test_conforms_in_a_model_through_the_generic_adapter():
    check_adapter(
        make_model,
        run,
        adapter="generic",
        strategies=["grid_pool"],
        overrides={"sites": {"include": ["blocks.*"], "min_tokens": 1}},
        compile=True,  # a fixed, random-free plan: torch.compile runs it like eager
    )


# ---------------------------------------------------------------------------- behaviour


def plan(grid, num_merge, **options):
    """A grid_pool plan and where every token went: ``origin`` as the grid, the kept tokens."""
    config = tokenmerge.load_config("grid_pool", **options)
    layout = tokenmerge.extend.TokenLayout(grid)
    n = layout.num_image_tokens
    made = GridPoolStrategy(config).make_plan(
        torch.zeros(1, n, 0), layout, tokenmerge.extend.Site("x"), num_merge, SiteRandom(seed=0)
    )
    return made.origin.view(grid).tolist(), made.kept.flatten().tolist()


def test_full_capacity_pools_every_block_into_its_corner():
    origin, kept = plan((4, 4), 12, k=2)
    assert kept == [0, 2, 8, 10]
    assert origin == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_center_anchor_keeps_the_middle_token():
    origin, kept = plan((3, 3), 8, k=3, anchor="center")
    assert kept == [4]
    _, kept = plan((4, 4), 12, k=2, anchor="center")
    assert kept == [5, 7, 13, 15]


def test_partial_ratio_spreads_over_every_block():
    # 4 merges on four 2 x 2 blocks: the second place (top-right) of each block, not one block
    origin, kept = plan((4, 4), 4, k=2)
    assert [t for t in range(16) if t not in kept] == [1, 3, 9, 11]
    assert origin[0] == [0, 0, 1, 1]


def test_blocks_cut_by_the_edge_and_capacity():
    strategy = GridPoolStrategy(tokenmerge.load_config("grid_pool", k=2))
    site = tokenmerge.extend.Site("x")
    assert strategy.capacity(tokenmerge.extend.TokenLayout((3, 5)), site) == 15 - 6
    assert strategy.capacity(tokenmerge.extend.TokenLayout((1, 7)), site) == 7 - 4  # 1 x 2 blocks
    origin, kept = plan((3, 5), 9, k=2)
    assert kept == [0, 2, 4, 10, 12, 14]
    origin, kept = plan((3, 5), 9, k=2, anchor="center")
    assert kept == [6, 8, 9, 11, 13, 14]  # cut blocks keep their nearest-centre token


def test_deterministic_and_content_blind():
    assert GridPoolStrategy.uses_features is False
    assert plan((8, 8), 20, k=2, seed=0) == plan((8, 8), 20, k=2, seed=123)


def test_ratio_limit_follows_k():
    assert tokenmerge.load_config("grid_pool", k=4, ratio=0.9).ratio_limit() == 1 - 1 / 16
    with pytest.raises(tokenmerge.ConfigError, match="one anchor per 2 x 2 block stays"):
        tokenmerge.load_config("grid_pool", ratio=0.8)
    with pytest.raises(tokenmerge.ConfigError, match="k: Input should be greater than"):
        tokenmerge.load_config("grid_pool", k=1)


def test_docstring_examples():
    assert doctest.testmod(strategy).failed == 0
