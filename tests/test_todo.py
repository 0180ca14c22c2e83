"""``todo`` (keys and values pooled over grid cells) and ``keys_values`` for every strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformer_models import FAMILIES, inputs
from unet_models import tiny_unet
from vit_models import FAMILIES as VIT_FAMILIES

import tokenmerge
from tokenmerge.errors import ConfigError, NothingMergedWarning
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout
from tokenmerge.testing import count_kernels

SCHEDULE = torch.tensor([999.0, 979.0, 959.0])
SITE = Site("blk", stage="down", level=1)


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=generator), torch.randn(
        2, 7, 32, generator=generator
    )


def plan(grid: tuple[int, int], ratio: float, **options):
    strategy = tokenmerge.get_strategy(tokenmerge.load_config("todo", ratio=ratio, **options))
    layout = TokenLayout(grid)
    n = grid[0] * grid[1]
    features = torch.empty(1, n, 0)
    return strategy.make_plan(features, layout, SITE, int(ratio * n), SiteRandom(0))


def test_full_pooling_averages_every_2x2_cell():
    p = plan((4, 6), 0.75)
    x = torch.arange(24.0).view(1, 24, 1)
    pooled = F.avg_pool2d(x.view(1, 1, 4, 6), 2).flatten()
    assert torch.equal(p.merge(x).flatten(), pooled)


def test_a_lower_ratio_merges_round_robin_over_the_cells():
    # 3 x 3 grid, 2 x 2 cells: [0 1 3 4] [2 . 5 .] [6 7 . .] [8 . . .]; second places first
    p = plan((3, 3), 4 / 9)
    assert p.src.tolist() == [[1, 7, 3, 5]]
    assert p.kept.tolist() == [[0, 2, 4, 6, 8]]
    assert plan((3, 3), 5 / 9).src.tolist() == [[1, 7, 3, 5, 4]]


def test_unet_self_attention_takes_pooled_keys_and_values():
    unet = tiny_unet()
    x, text = unet_inputs()
    attention = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = {}

    def record(module, args, kwargs, output):
        seen["in"], seen["kv"], seen["out"] = args[0], kwargs["encoder_hidden_states"], output

    hook = attention.register_forward_hook(record, with_kwargs=True)
    handle = tokenmerge.apply(unet, "todo", sites={"min_tokens": 1})
    with torch.no_grad():
        unet(x, SCHEDULE[0], text)
        hidden = seen["in"]  # (2, 256, 32): a 16 x 16 grid
        grid = hidden.transpose(1, 2).reshape(2, 32, 16, 16)
        pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        torch.testing.assert_close(seen["kv"], pooled, rtol=0, atol=1e-6)
        # every query stays: the output is the attention's own, with keys from the pooled tokens
        expected = attention(hidden, encoder_hidden_states=pooled)
    assert seen["out"].shape == hidden.shape
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=1e-6)
    stats = handle.stats()["down_blocks.0.attentions.0.transformer_blocks.0"]
    assert (stats.tokens_in, stats.tokens_out) == (256, 64)
    hook.remove()
    handle.remove()


def test_todo_costs_the_fewest_kernels_at_every_step():
    unet = tiny_unet()
    x, text = unet_inputs()
    with torch.no_grad():
        _, unmerged = count_kernels(lambda: unet(x, SCHEDULE[0], text))
        handle = tokenmerge.apply(unet, "todo", sites={"min_tokens": 1})
        unet(x, SCHEDULE[0], text)  # the first plan of a grid is made once for every call
        for step in (1, 2):
            _, merged = count_kernels(lambda step=step: unet(x, SCHEDULE[step], text))
            per_site = (merged.kernels - unmerged.kernels) / len(handle.sites)
            # the merge itself (5) and the empty features of a content-blind plan (1)
            assert per_site <= 6, dict(merged.ops - unmerged.ops)
            assert merged.syncs == []
    assert all(s.plans_computed == 3 for s in handle.stats().values())  # planned every step


@pytest.mark.parametrize("strategy", ["tome", "retom", "random"])
def test_any_strategy_merges_keys_and_values_alone(strategy):
    unet = tiny_unet()
    x, text = unet_inputs()
    with torch.no_grad():
        plain = unet(x, SCHEDULE[0], text).sample
        handle = tokenmerge.apply(
            unet, strategy, ratio=0.5, keys_values=True, sites={"min_tokens": 1}
        )
        merged = unet(x, SCHEDULE[0], text).sample
        handle.remove()
        assert torch.equal(unet(x, SCHEDULE[0], text).sample, plain)
    assert merged.shape == plain.shape and not torch.equal(merged, plain)
    # no value correction without an unmerge
    assert all(s.value_correction is None for s in handle.stats().values())


def test_dit_and_pixart_pool_keys_and_values():
    for family in ("dit", "pixart"):
        model = FAMILIES[family]()
        handle = tokenmerge.apply(model, "todo", sites={"min_tokens": 1})
        with torch.no_grad():
            model(**inputs(family))
        assert {(s.tokens_in, s.tokens_out) for s in handle.stats().values()} in (
            {(64, 16)},
            {(48, 12)},
        )


def test_auto_merges_the_tokens_where_keys_and_values_cannot_go_alone():
    model = FAMILIES["flux"]()
    handle = tokenmerge.apply(model, "todo", sites={"min_tokens": 1})
    with torch.no_grad():
        model(**inputs("flux"))
    stats = handle.stats().values()
    assert all(not s.keys_values and s.tokens_out < s.tokens_in for s in stats)
    unet = tiny_unet()
    handle = tokenmerge.apply(unet, "todo", sites={"min_tokens": 1})
    assert all(s.keys_values for s in handle.stats().values())


def test_keys_values_true_is_refused_where_attention_cannot_take_them():
    with pytest.raises(ConfigError, match="'diffusers_flux' adapter") as raised:
        tokenmerge.apply(FAMILIES["flux"](), "todo", keys_values=True, sites={"min_tokens": 1})
    assert "keys_values='auto'" in str(raised.value)
    with pytest.raises(ConfigError, match="JointAttnProcessor2_0"):
        tokenmerge.apply(FAMILIES["sd3"](), "tome", keys_values=True, sites={"min_tokens": 1})


def test_todo_pools_progressively_on_a_vit():
    family = VIT_FAMILIES["vit"]
    model = family.build()
    handle = tokenmerge.apply(model, "todo", ratio=0.25)
    family.run(model)
    tokens = [(s.tokens_in, s.tokens_out) for s in handle.stats().values()]
    assert tokens == [(65, 49), (49, 37), (37, 28)]  # the class token and 64 patches, then fewer


def test_the_ratio_is_capped_by_the_cells():
    with pytest.raises(ConfigError, match="0.75"):
        tokenmerge.load_config("todo", ratio=0.8)
    assert tokenmerge.load_config("todo", ratio=0.85, sx=3, sy=3).ratio == 0.85


def test_fused_qkv_projections_never_take_merged_keys_and_values() -> None:
    """A self-attention fused by fuse_qkv_projections has to_qkv, no to_kv: its processor
    cannot take keys and values from encoder_hidden_states. Fused before apply, todo merges
    its tokens there instead; fused after apply, the calls pass through with the reason (it
    crashed inside diffusers before)."""
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    unet = tiny_unet()
    unet.fuse_qkv_projections()
    with torch.no_grad(), tokenmerge.apply(unet, "todo", ratio=0.5, sites={"min_tokens": 1}) as h:
        unet(x, 999, text)
        stats = h.stats().values()
        assert all(s.tokens_out < s.tokens_in and s.passed_through == 0 for s in stats)
    with pytest.raises(ConfigError, match="no to_kv"):
        tokenmerge.apply(unet, "todo", keys_values=True, sites={"min_tokens": 1})
    unet = tiny_unet()
    with tokenmerge.apply(unet, "todo", ratio=0.5, sites={"min_tokens": 1}) as h:
        unet.fuse_qkv_projections()
        with torch.no_grad(), pytest.warns(NothingMergedWarning, match="no to_kv"):
            unet(x, 999, text)
        assert all(s.passed_through == 1 for s in h.stats().values())
