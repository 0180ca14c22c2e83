"""Proportional attention at local-mode sites (``tokenmerge.proportional``), and ReToM's
detail destinations (``ReToMConfig.destinations``)."""

from __future__ import annotations

import pytest
import torch
from transformer_models import make_dit
from vit_models import make_vit, pixels

import tokenmerge
from tokenmerge.plan import Plan
from tokenmerge.proportional import SizeBias
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout


def _blocky_pixels(size: int, block: int, batch: int = 2, channels: int = 3) -> torch.Tensor:
    """Images constant over ``block x block`` pixel squares."""
    coarse = torch.randn(batch, channels, size // block, size // block, generator=_gen())
    return coarse.repeat_interleave(block, -1).repeat_interleave(block, -2)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_size_bias_shapes_and_values() -> None:
    plan = Plan.from_assignment(torch.tensor([[1, 3]]), torch.tensor([[0, 0]]), 5)
    merged = torch.zeros(2, plan.num_out, 4)
    sdpa = SizeBias("attn_mask", "sdpa")(plan, merged, {"other": 1})
    assert sdpa["other"] == 1 and sdpa["attn_mask"].shape == (1, 1, 1, 3)
    assert torch.allclose(sdpa["attn_mask"].flatten(), torch.tensor([3.0, 1.0, 1.0]).log())
    diffusers = SizeBias("attention_mask", "diffusers")(plan, merged, {})
    assert diffusers["attention_mask"].shape == (2, 1, 3)  # one row per sample
    text = SizeBias("attention_mask", "sdpa", context="encoder_hidden_states")
    out = text(plan, merged, {"encoder_hidden_states": torch.zeros(2, 4, 8)})
    assert out["attention_mask"].shape == (1, 1, 1, 7)
    assert torch.equal(out["attention_mask"][..., :4], torch.zeros(1, 1, 1, 4))


def test_log_counts_made_with_the_plan_and_kept_by_its_transforms() -> None:
    plan = Plan.from_assignment(torch.tensor([[1]]), torch.tensor([[0]]), 3)
    assert plan.slot_log_sizes() is plan.log_counts
    for other in (plan.with_prefix(2), plan.repeat(3), plan.to("cpu")):
        assert torch.equal(other.slot_log_sizes(), other.counts.log())


@pytest.mark.parametrize("strategy", ["tome", "retom"])
def test_timm_local_merge_of_identical_tokens_is_exact_with_proportional_attention(
    strategy: str,
) -> None:
    """Tokens identical within every 2 x 2 cell: merging them and weighting each merged key by
    its size gives the unmerged attention exactly; without the weights it does not."""
    vit = make_vit(img_size=64, patch_size=8, depth=2).eval()
    with torch.no_grad():
        vit.pos_embed.zero_()
    images = _blocky_pixels(64, 16)
    with torch.no_grad():
        reference = vit(images)
    errors = {}
    for proportional in (False, True):
        config = tokenmerge.load_config(
            strategy, ratio=0.5, local_proportional_attention=proportional, sites={"min_tokens": 1}
        )
        with tokenmerge.apply(vit, config, adapter_options={"mode": "local"}) as handle:
            with torch.no_grad():
                out = vit(images)
            assert all(s.tokens_out < s.tokens_in for s in handle.stats().values())
        errors[proportional] = float((out - reference).abs().max())
    assert errors[True] < 1e-4 < errors[False]


def test_diffusers_attention_takes_the_size_bias() -> None:
    """The DiT's self-attention with identical tokens per cell: exact with the size bias."""
    dit = make_dit().eval()
    with torch.no_grad():
        dit.pos_embed.pos_embed.zero_()
    patch = dit.config.patch_size
    size = dit.config.sample_size
    latents = _blocky_pixels(size, 2 * patch, channels=dit.config.in_channels)
    call = dict(timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))
    with torch.no_grad():
        reference = dit(latents, **call).sample
    errors = {}
    for proportional in (False, True):
        config = tokenmerge.load_config(
            "tome", ratio=0.5, local_proportional_attention=proportional, sites={"min_tokens": 1}
        )
        with tokenmerge.apply(dit, config):
            with torch.no_grad():
                errors[proportional] = float((dit(latents, **call).sample - reference).abs().max())
    assert errors[True] < 1e-4 < errors[False]


def test_ratio_zero_with_proportional_attention_is_bit_identical() -> None:
    vit = make_vit().eval()
    images = pixels()
    with torch.no_grad():
        reference = vit(images)
    config = tokenmerge.load_config("retom", ratio=0.0, local_proportional_attention=True)
    with tokenmerge.apply(vit, config, adapter_options={"mode": "local"}):
        with torch.no_grad():
            assert torch.equal(vit(images), reference)


def _detail_plan(features: torch.Tensor, ratio: float, **fields) -> Plan:
    strategy = tokenmerge.get_strategy("retom", ratio=ratio, window_size=4, **fields)
    layout = TokenLayout((8, 8))
    site = Site("s", mode="local")
    num_merge = int(ratio * 64)
    return strategy.make_plan(features, layout, site, num_merge, SiteRandom(seed=0))


def test_detail_destinations_take_merges_where_the_content_is_plain() -> None:
    """Left half of an 8 x 8 grid plain (one feature), right half detailed (random features):
    the tokens that merge come from the plain half, and every one merges into its most similar
    token that stays."""
    generator = _gen()
    features = torch.randn(1, 8, 8, 16, generator=generator)
    features[:, :, :4] = torch.randn(16, generator=generator)
    features = torch.nn.functional.normalize(features.view(1, 64, 16), dim=-1)
    plan = _detail_plan(features, 0.4)
    assert plan.num_merged == 25
    columns = plan.src[0] % 8
    assert bool((columns < 4).all())  # 32 plain tokens, each the same: they merge first
    kept = set(plan.kept[0].tolist())
    dst_tokens = plan.kept[0][plan.dst[0]]
    assert all(int(t) in kept for t in dst_tokens)
    similarity = features[0, plan.src[0]] @ features[0, plan.kept[0]].T
    best = similarity.max(dim=-1).values
    chosen = similarity.gather(1, plan.dst[0].unsqueeze(1)).squeeze(1)
    assert torch.allclose(chosen, best)


def test_representative_destinations_keep_one_token_per_window() -> None:
    features = torch.nn.functional.normalize(torch.randn(1, 64, 16, generator=_gen()), dim=-1)
    plan = _detail_plan(features, 15 / 16, destinations="representatives", scope="window")
    # at capacity one token per 4 x 4 window stays, and every source joins its own window's
    src_window = (plan.src[0] // 8 // 4) * 2 + (plan.src[0] % 8) // 4
    dst_token = plan.kept[0][plan.dst[0]]
    dst_window = (dst_token // 8 // 4) * 2 + (dst_token % 8) // 4
    assert plan.num_out == 4 and torch.equal(src_window, dst_window)
