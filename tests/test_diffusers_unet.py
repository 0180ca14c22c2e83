"""The diffusers UNet adapter on tiny random ``UNet2DConditionModel``s (CPU, seconds).

What each attention really sees is counted with our own forward pre-hooks on the projections the
attention forward calls (``attn1.to_q`` / ``to_k``, ``attn2.to_q`` / ``to_k``, ``ff.net[0]``): they
run inside the module's forward, so they see the tokens it computes on whatever the order of the
hooks on the module itself.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import warnings
from collections import defaultdict

import diffusers  # noqa: E402  (a test dependency: fail, never skip, when missing)
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from diffusers.models.transformers.transformer_2d import Transformer2DModel  # noqa: E402
from snapshots import counting, hook_count, snapshot, watch_fits
from torch import nn
from unet_models import tiny_svd_unet

import tokenmerge  # noqa: E402
from tokenmerge import AlreadyAppliedError, NoSitesError, ShortfallWarning  # noqa: E402
from tokenmerge.adapters.diffusers_unet import DiffusersUNetAdapter  # noqa: E402
from tokenmerge.api import HANDLE_ATTR  # noqa: E402
from tokenmerge.errors import NothingMergedWarning  # noqa: E402

STRATEGIES = ["tome", "retom", "random"]
CROSS_DIM = 32
TEXT_TOKENS = 7
CROSS = "CrossAttnDownBlock2D"
CROSS_UP = "CrossAttnUpBlock2D"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- tiny models


def make_unet(
    down: tuple[str, ...] = (CROSS, "DownBlock2D"),
    up: tuple[str, ...] = ("UpBlock2D", CROSS_UP),
    channels: tuple[int, ...] = (32, 64),
    seed: int = 0,
    **extra,
) -> UNet2DConditionModel:
    """A random-weight UNet; default: attention at level 1 (down / up) and in the mid block
    (level 2)."""
    torch.manual_seed(seed)
    options = dict(
        sample_size=16,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    options.update(extra)
    return UNet2DConditionModel(**options).eval()


def flat_unet() -> UNet2DConditionModel:
    """One level, no mid block: three sites (down 0, up 0 x 2) and few modules (fast)."""
    return make_unet(down=(CROSS,), up=(CROSS_UP,), channels=(32,), mid_block_type=None)


def three_level_unet() -> UNet2DConditionModel:
    """Cross-attention blocks at levels 1, 2 and 4, and a mid block at level 4."""
    return make_unet(down=(CROSS,) * 3, up=(CROSS_UP,) * 3, channels=(32, 64, 64))


def sd15_unet() -> UNet2DConditionModel:
    """SD 1.5's UNet config at reduced width."""
    return make_unet(
        down=(CROSS, CROSS, CROSS, "DownBlock2D"),
        up=("UpBlock2D", CROSS_UP, CROSS_UP, CROSS_UP),
        channels=(32, 64, 64, 64),
        layers_per_block=2,
    )


TEXT_EMBED_DIM = 32
TIME_EMBED_DIM = 8


def sdxl_unet(channels: tuple[int, ...] = (32, 64, 64), **extra) -> UNet2DConditionModel:
    """SDXL's layout (no attention at full resolution, 1 / 2 / 10 transformer layers, text-time
    embeddings) at reduced width."""
    options = dict(
        down=("DownBlock2D", CROSS, CROSS),
        up=(CROSS_UP, CROSS_UP, "UpBlock2D"),
        channels=channels,
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TEXT_EMBED_DIM + 6 * TIME_EMBED_DIM,
    )
    options.update(extra)
    return make_unet(**options)


def sdxl_cond(batch: int, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "text_embeds": torch.randn(batch, TEXT_EMBED_DIM, generator=generator),
        "time_ids": torch.randn(batch, 6, generator=generator),
    }


def inputs(
    batch: int = 2,
    latent: tuple[int, int] = (16, 16),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent and text embeddings; every sample of the batch differs (CFG halves differ)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *latent, generator=generator)
    text = torch.randn(batch, TEXT_TOKENS, CROSS_DIM, generator=generator)
    return x.to(dtype), text.to(dtype)


@torch.no_grad()
def run(unet: nn.Module, x: torch.Tensor, text: torch.Tensor, t: float = 999, **kwargs):
    return unet(x, t, text, **kwargs).sample


def level_grid(latent: tuple[int, int], level: int) -> tuple[int, int]:
    """The token grid at a downsample level: every stride-2 conv (padding 1) rounds up."""
    h, w = latent
    for _ in range(int(math.log2(level))):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def merged_count(n: int, ratio: float, capacity: int | None = None) -> int:
    """Tokens after merging ``int(ratio * n)`` of ``n``, or as many as the capacity allows."""
    wanted = int(ratio * n)
    return n - (wanted if capacity is None else min(wanted, capacity))


def capacity(strategy: str, grid: tuple[int, int]) -> int:
    """How many tokens a strategy with 2 x 2 cells / windows can merge on ``grid``."""
    h, w = grid
    if strategy == "tome":  # one destination per whole cell; leftover rows / columns are sources
        return h * w - (h // 2) * (w // 2)
    return h * w - math.ceil(h / 2) * math.ceil(w / 2)  # a cut window is a smaller window


class TokenCounter:
    """Records the tokens every attention / MLP of every ``BasicTransformerBlock`` computes on,
    and the grid every ``Transformer2DModel`` receives."""

    def __init__(self, unet: nn.Module) -> None:
        self.seen: dict[str, list[int]] = defaultdict(list)
        self.grids: dict[str, tuple[int, int]] = {}
        self.blocks: list[str] = []
        self._handles = watch_fits(unet)
        for name, module in unet.named_modules():
            if isinstance(module, Transformer2DModel):
                self._handles.append(module.register_forward_pre_hook(self._grid(name)))
            if isinstance(module, BasicTransformerBlock):
                self.blocks.append(name)
                self._count(module.attn1.to_q, f"{name}.attn1")
                self._count(module.attn1.to_k, f"{name}.attn1.keys")
                if module.attn2 is not None:
                    self._count(module.attn2.to_q, f"{name}.attn2")
                    self._count(module.attn2.to_k, f"{name}.attn2.keys")
                self._count(module.ff.net[0], f"{name}.ff")

    def _grid(self, name: str):
        def hook(module, args):
            self.grids[name] = tuple(args[0].shape[-2:])

        return hook

    def _count(self, module: nn.Module, key: str) -> None:
        def hook(module, args):
            if counting():
                self.seen[key].append(args[0].shape[1])

        self._handles.append(module.register_forward_pre_hook(hook))

    def grid(self, block: str) -> tuple[int, int]:
        return self.grids[block.rsplit(".transformer_blocks.", 1)[0]]

    def tokens(self, block: str) -> int:
        h, w = self.grid(block)
        return h * w

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> TokenCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------- exact removal


def assert_restored(model: nn.Module, before: tuple[dict, list[str]]) -> None:
    assert snapshot(model) == before
    assert hook_count(model) == 0
    assert HANDLE_ATTR not in vars(model)
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert not torch.nn.modules.module._global_forward_hooks


# ---------------------------------------------------------------------------- sites

THREE_LEVEL_CANDIDATES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0", "down", 1),
    ("down_blocks.1.attentions.0.transformer_blocks.0", "down", 2),
    ("down_blocks.2.attentions.0.transformer_blocks.0", "down", 4),
    ("up_blocks.0.attentions.0.transformer_blocks.0", "up", 4),
    ("up_blocks.0.attentions.1.transformer_blocks.0", "up", 4),
    ("up_blocks.1.attentions.0.transformer_blocks.0", "up", 2),
    ("up_blocks.1.attentions.1.transformer_blocks.0", "up", 2),
    ("up_blocks.2.attentions.0.transformer_blocks.0", "up", 1),
    ("up_blocks.2.attentions.1.transformer_blocks.0", "up", 1),
    ("mid_block.attentions.0.transformer_blocks.0", "mid", 4),
]


def site_names(handle: tokenmerge.Handle) -> set[str]:
    return {site.name for site in handle.sites}


def names_at(*levels: int, stages: tuple[str, ...] = ("down", "mid", "up")) -> set[str]:
    return {n for n, s, lv in THREE_LEVEL_CANDIDATES if lv in levels and s in stages}


def test_candidates_name_stage_and_level_of_every_block() -> None:
    unet = three_level_unet()
    found = DiffusersUNetAdapter().candidates(unet)
    described = [(c.site.name, c.site.stage, c.site.level) for c in found]
    assert sorted(described) == sorted(THREE_LEVEL_CANDIDATES)
    assert [c.site.block_index for c in found] == list(range(len(found)))
    for candidate in found:
        assert set(candidate.modules) == {"attn", "cross_attn", "mlp"}
        block = unet.get_submodule(candidate.site.name)
        assert candidate.modules["attn"] is block.attn1
        assert candidate.modules["cross_attn"] is block.attn2
        assert candidate.modules["mlp"] is block.ff
    # the level is the real downsample factor of the grid each block sees (odd latent: ceil)
    latent = (16, 12)
    with TokenCounter(unet) as counter:
        run(unet, *inputs(1, latent))
    for name, _, level in THREE_LEVEL_CANDIDATES:
        assert counter.grid(name) == level_grid(latent, level), name
    assert hook_count(unet) == 0  # finding candidates touches nothing


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        # default: the finest level that has attention; a config that selects sites itself
        # (levels, stages, blocks or include) chooses among all of them
        ({}, names_at(1)),
        ({"sites": {"levels": (1, 2)}}, names_at(1, 2)),
        ({"sites": {"levels": (2, 4)}}, names_at(2, 4)),
        ({"sites": {"levels": (1, 2, 4)}}, names_at(1, 2, 4)),
        ({"sites": {"stages": ("mid",), "levels": (4,)}}, names_at(4, stages=("mid",))),
        ({"sites": {"stages": ("up",)}}, names_at(1, 2, 4, stages=("up",))),
        ({"sites": {"stages": ("mid",)}}, names_at(4, stages=("mid",))),
        ({"sites": {"include": ("mid_block.**",)}}, names_at(4, stages=("mid",))),
        (
            {"sites": {"stages": ("down", "mid"), "levels": (1, 2, 4)}},
            names_at(1, 2, 4, stages=("down", "mid")),
        ),
        ({"sites": {"exclude": ("down_blocks.**",)}}, names_at(1, stages=("up",))),
        (
            {"sites": {"include": ("up_blocks.2.attentions.1.**",)}},
            {"up_blocks.2.attentions.1.transformer_blocks.0"},
        ),
        (
            {"sites": {"include": ("up_blocks.*.attentions.1.**",), "levels": (1, 2, 4)}},
            {f"up_blocks.{i}.attentions.1.transformer_blocks.0" for i in range(3)},
        ),
        (
            {"sites": {"levels": (1, 2, 4), "exclude": ("up_blocks.**", "mid_block.**")}},
            names_at(1, 2, 4, stages=("down",)),
        ),
    ],
    ids=[
        "default",
        "levels-1-2",
        "levels-2-4",
        "all-levels",
        "mid-at-level-4",
        "stage-up",
        "stage-mid",
        "include-mid",
        "down-and-mid",
        "exclude-down",
        "include-one",
        "include-glob",
        "exclude-up-and-mid",
    ],
)
def test_site_selection(filters: dict, expected: set[str]) -> None:
    unet = three_level_unet()
    handle = tokenmerge.apply(unet, "tome", **filters)
    try:
        assert site_names(handle) == expected
        levels = {name: level for name, _, level in THREE_LEVEL_CANDIDATES}
        assert all(site.level == levels[site.name] for site in handle.sites)
        assert all(site.targets == ("attn",) for site in handle.sites)
    finally:
        handle.remove()
    assert hook_count(unet) == 0


def test_no_site_error_lists_candidates_and_close_matches() -> None:
    unet = three_level_unet()
    typo = "down_blocks.0.attention.0.transformer_blocks.0"
    with pytest.raises(NoSitesError) as error:
        tokenmerge.apply(unet, "retom", sites={"include": [typo]})
    message = str(error.value)
    assert typo in message
    assert "close names" in message
    assert "down_blocks.0.attentions.0.transformer_blocks.0" in message
    assert "Candidate sites" in message
    with pytest.raises(NoSitesError, match=r"Levels present: \[1, 2, 4\]") as error:
        tokenmerge.apply(unet, "retom", sites={"levels": (8,)})
    assert "sites={'levels': (8,)}" in str(error.value)
    assert "up_blocks.1.attentions.1.transformer_blocks.0" in str(error.value)
    assert "(10 in all)" in str(error.value)
    assert hook_count(unet) == 0 and HANDLE_ATTR not in vars(unet)


def test_no_site_error_on_a_unet_without_attention() -> None:
    unet = make_unet(
        down=("DownBlock2D", "DownBlock2D"), up=("UpBlock2D", "UpBlock2D"), mid_block_type=None
    )
    with pytest.raises(NoSitesError, match="no candidate site"):
        tokenmerge.apply(unet, "retom")
    assert hook_count(unet) == 0


def test_sites_below_min_tokens_are_skipped_and_shown_in_stats() -> None:
    unet = flat_unet()
    x, text = inputs(2, (8, 8))  # level 1: 64 tokens < the default min_tokens 256
    expected = run(unet, x, text)
    with tokenmerge.apply(unet, "retom") as handle:
        with pytest.warns(NothingMergedWarning, match="64 image tokens < min_tokens 256"):
            assert torch.equal(run(unet, x, text), expected)
        assert torch.equal(run(unet, x, text), expected)  # warned once
        for stats in handle.stats().values():
            assert (stats.tokens_in, stats.tokens_out) == (64, 64)
            assert "min_tokens" in stats.skipped


# ---------------------------------------------------------------------------- real layouts


def assert_only_sites_merged(
    counter: TokenCounter, sites: set[str], ratio: float, calls: int = 1
) -> None:
    """Sites' self-attention (queries and keys) sees the merged count; every other attention,
    every cross-attention and every MLP sees the full count; text keys are never merged."""
    for block in counter.blocks:
        n = counter.tokens(block)
        attn1 = merged_count(n, ratio) if block in sites else n
        assert counter.seen[f"{block}.attn1"] == [attn1] * calls, block
        assert counter.seen[f"{block}.attn1.keys"] == [attn1] * calls, block
        assert counter.seen[f"{block}.attn2"] == [n] * calls, block
        assert counter.seen[f"{block}.attn2.keys"] == [TEXT_TOKENS] * calls, block
        assert counter.seen[f"{block}.ff"] == [n] * calls, block


def test_sd15_layout_merges_exactly_the_level_1_blocks() -> None:
    unet = sd15_unet()
    latent = (32, 32)
    x, text = inputs(2, latent)
    handle = tokenmerge.apply(unet)  # every default: retom, ratio 0.5, default sites
    sites = {
        *(f"down_blocks.0.attentions.{i}.transformer_blocks.0" for i in range(2)),
        *(f"up_blocks.3.attentions.{i}.transformer_blocks.0" for i in range(3)),
    }
    assert site_names(handle) == sites
    assert {(s.stage, s.level) for s in handle.sites} == {("down", 1), ("up", 1)}
    with TokenCounter(unet) as counter:
        run(unet, x, text)
    handle.remove()
    assert len(counter.blocks) == 16  # 3 x 2 down, 1 mid, 3 x 3 up
    levels = {"down_blocks.0": 1, "down_blocks.1": 2, "down_blocks.2": 4, "mid_block": 8}
    levels |= {"up_blocks.1": 4, "up_blocks.2": 2, "up_blocks.3": 1}
    for block in counter.blocks:
        level = levels[block.split(".attentions")[0]]
        assert counter.grid(block) == level_grid(latent, level), block
    assert_only_sites_merged(counter, sites, 0.5)
    for stats in handle.stats().values():
        assert (stats.tokens_in, stats.tokens_out) == (1024, 512)


def test_sdxl_layout_merges_every_transformer_block_at_level_2() -> None:
    unet = sdxl_unet()
    latent = (32, 32)
    x, text = inputs(2, latent)
    cond = sdxl_cond(2)
    handle = tokenmerge.apply(unet)  # every default
    sites = {
        *(
            f"down_blocks.1.attentions.{i}.transformer_blocks.{j}"
            for i in range(2)
            for j in range(2)
        ),
        *(f"up_blocks.1.attentions.{i}.transformer_blocks.{j}" for i in range(3) for j in range(2)),
    }
    assert site_names(handle) == sites
    assert {(s.stage, s.level) for s in handle.sites} == {("down", 2), ("up", 2)}
    with TokenCounter(unet) as counter:
        run(unet, x, text, added_cond_kwargs=cond)
    handle.remove()
    # 2 x 2 at level 2, 2 x 10 at level 4, 10 in the mid block, 3 x 10 at level 4, 3 x 2 at 2
    assert len(counter.blocks) == 4 + 20 + 10 + 30 + 6
    levels = {"down_blocks.1": 2, "down_blocks.2": 4, "mid_block": 4, "up_blocks.0": 4}
    levels["up_blocks.1"] = 2
    for block in counter.blocks:
        level = levels[block.split(".attentions")[0]]
        assert counter.grid(block) == level_grid(latent, level), block
    assert_only_sites_merged(counter, sites, 0.5)
    for stats in handle.stats().values():
        assert (stats.tokens_in, stats.tokens_out) == (256, 128)


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ratio_zero_is_bit_identical(strategy: str) -> None:
    unet = make_unet()
    x, text = inputs(2)
    expected = [run(unet, x, text, t=t) for t in (999, 979)]
    options = dict(
        ratio=0.0, sites={"levels": (1, 2), "cross_attn": True, "mlp": True, "min_tokens": 1}
    )
    with tokenmerge.apply(unet, strategy, **options) as handle:
        assert len(handle.sites) == 4  # down 0, mid, up 1 x 2
        for t, out in zip((999, 979), expected, strict=True):
            assert torch.equal(run(unet, x, text, t=t), out)
        assert {s.tokens_out for s in handle.stats().values()} == {256, 64}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_output_shape_and_exact_removal(strategy: str) -> None:
    unet = make_unet()
    x, text = inputs(2, (16, 12))
    expected = run(unet, x, text)
    before = snapshot(unet)
    assert hook_count(unet) == 0
    handle = tokenmerge.apply(unet, strategy, ratio=0.5, sites={"levels": (1, 2), "min_tokens": 1})
    assert hook_count(unet) > 0 and vars(unet)[HANDLE_ATTR] is handle
    merged = run(unet, x, text)
    assert merged.shape == expected.shape
    assert not torch.allclose(merged, expected, atol=1e-3)
    handle.remove()
    assert_restored(unet, before)
    assert torch.equal(run(unet, x, text), expected)
    handle.remove()  # a second remove does nothing
    assert_restored(unet, before)


def test_targets_attn1_by_default_cross_attention_and_mlp_on_request() -> None:
    unet = make_unet()
    x, text = inputs(2)
    n, half = 256, 128
    site = "down_blocks.0.attentions.0.transformer_blocks.0"
    other = "mid_block.attentions.0.transformer_blocks.0"  # level 2, not a default site
    cases = [
        ({}, ("attn",), half, n, n),
        ({"sites": {"cross_attn": True}}, ("attn", "cross_attn"), half, half, n),
        ({"sites": {"mlp": True}}, ("attn", "mlp"), half, n, half),
        ({"sites": {"attn": False, "mlp": True}}, ("mlp",), n, n, half),
        (
            {"sites": {"cross_attn": True, "mlp": True}},
            ("attn", "cross_attn", "mlp"),
            half,
            half,
            half,
        ),
    ]
    for options, targets, attn1, attn2, ff in cases:
        sites = {"min_tokens": 1, **options.get("sites", {})}
        with tokenmerge.apply(unet, "retom", ratio=0.5, sites=sites) as handle:
            assert all(set(s.targets) == set(targets) for s in handle.sites), options
            with TokenCounter(unet) as counter:
                run(unet, x, text)
        assert counter.seen[f"{site}.attn1"] == [attn1], options
        assert counter.seen[f"{site}.attn2"] == [attn2], options
        assert counter.seen[f"{site}.attn2.keys"] == [TEXT_TOKENS], options  # text never merged
        assert counter.seen[f"{site}.ff"] == [ff], options
        for kind in ("attn1", "attn2", "ff"):
            assert counter.seen[f"{other}.{kind}"] == [64], options
        assert hook_count(unet) == 0


def test_a_deepcopy_of_a_patched_unet_is_patched_the_same_and_independently() -> None:
    unet = flat_unet()
    x, text = inputs(2)
    expected = run(unet, x, text)
    handle = tokenmerge.apply(unet, "tome", ratio=0.5, sites={"min_tokens": 1})
    twin = copy.deepcopy(unet)
    merged = run(unet, x, text)
    assert torch.equal(run(twin, x, text), merged)
    assert tokenmerge.remove(twin) is True
    assert hook_count(twin) == 0 and hook_count(unet) > 0
    assert torch.equal(run(twin, x, text), expected)
    handle.new_generation()  # the same random draws
    assert torch.equal(run(unet, x, text), merged)
    handle.remove()
    assert torch.equal(run(unet, x, text), expected)


def test_apply_twice_is_an_error() -> None:
    unet = flat_unet()
    with tokenmerge.apply(unet, "retom"):
        before = hook_count(unet)
        with pytest.raises(AlreadyAppliedError):
            tokenmerge.apply(unet, "tome")
        assert hook_count(unet) == before
    assert hook_count(unet) == 0


# ---------------------------------------------------------------------------- tomesd parity


@pytest.mark.parametrize(
    ("latent", "seeds", "ratios"),
    [
        ((16, 16), (0, 1), (0.25, 0.5, 0.7)),
        ((32, 24), (2,), (0.3, 0.6)),  # a non-square level-1 grid
        ((30, 17), (3,), (0.5,)),  # and one that 2 x 2 cells do not divide
    ],
)
def test_tome_configured_like_tomesd_reproduces_tomesd(
    latent: tuple[int, int], seeds: tuple[int, ...], ratios: tuple[float, ...]
) -> None:
    import tomesd

    unet = make_unet()  # attention at level 1 and in the mid block (level 2): level 1 merges
    theirs = copy.deepcopy(unet)
    n = latent[0] * latent[1]
    for seed in seeds:
        x, text = inputs(2, latent, seed=seed)
        unmerged = run(unet, x, text, t=500)
        for ratio in ratios:
            # apply_patch removes its previous patch first
            tomesd.apply_patch(theirs, ratio=ratio, max_downsample=1, sx=2, sy=2, use_rand=False)
            expected = run(theirs, x, text, t=500)
            options = dict(
                sx=2, sy=2, random_destinations=False, sites={"min_tokens": 1, "levels": (1,)}
            )
            with tokenmerge.apply(unet, "tome", ratio=ratio, **options) as handle:
                ours = run(unet, x, text, t=500)
                stats = handle.stats()
            assert {(s.tokens_in, s.tokens_out) for s in stats.values()} == {
                (n, merged_count(n, ratio))
            }
            parity = (ours - expected).abs().max().item()
            effect = (ours - unmerged).abs().max().item()
            assert parity < 1e-5, (latent, seed, ratio, parity)
            assert effect > 1e-3 and effect > 100 * parity, (latent, seed, ratio, effect)
    assert hook_count(unet) == 0


def test_tomesd_parity_for_cfg_halves_run_as_separate_calls() -> None:
    """Pipelines that run the two CFG halves as two UNet calls at one timestep: tomesd plans
    each call on its own input, and so must ``tome`` configured like it (``cache_interval`` 1,
    ``share_cfg_plan`` off: "every sample plans on itself")."""
    import tomesd

    unet = flat_unet()
    theirs = copy.deepcopy(unet)
    tomesd.apply_patch(theirs, ratio=0.5, max_downsample=1, sx=2, sy=2, use_rand=False)
    uncond, text_u = inputs(1, seed=0)
    cond, text_c = inputs(1, seed=1)
    options = dict(sx=2, sy=2, random_destinations=False, sites={"min_tokens": 1, "levels": (1,)})
    with tokenmerge.apply(unet, "tome", ratio=0.5, **options) as handle:
        for t in (999, 979):
            for x, text in ((uncond, text_u), (cond, text_c)):
                parity = (run(unet, x, text, t=t) - run(theirs, x, text, t=t)).abs().max()
                assert parity < 1e-5, (t, parity.item())
        assert {s.plans_computed for s in handle.stats().values()} == {4}


# ------------------------------------------------------------------- batches, shapes, dtypes

BATCH_CASES = {
    "cfg": dict(batch=2),
    "cfg-shared-plan": dict(batch=2, share_cfg_plan=True),
    "batch-1": dict(batch=1),
    "batch-3": dict(batch=3),
    "batch-3-shared-plan": dict(batch=3, share_cfg_plan=True),  # odd: no halves to share
    "30x17": dict(batch=2, latent=(30, 17)),
    "30x17-shared-plan": dict(batch=2, latent=(30, 17), share_cfg_plan=True),
    "30x17-capacity": dict(batch=2, latent=(30, 17), ratio=0.74),
    "fp16": dict(batch=2, dtype=torch.float16),
    "bf16": dict(batch=2, dtype=torch.bfloat16),
}
BATCH_MATRIX = [
    *(("cfg", s) for s in STRATEGIES),
    *(("cfg-shared-plan", s) for s in STRATEGIES),
    ("batch-1", "retom"),
    ("batch-3", "tome"),
    ("batch-3", "random"),
    ("batch-3-shared-plan", "retom"),
    ("30x17", "tome"),
    ("30x17", "retom"),
    ("30x17-shared-plan", "tome"),
    ("30x17-capacity", "retom"),  # 377 wanted, 375 windows' worth: a shortfall of 2
    ("30x17-capacity", "tome"),  # 390 cells' worth: no shortfall
    ("fp16", "retom"),
    ("bf16", "tome"),
]


@pytest.mark.parametrize(("case", "strategy"), BATCH_MATRIX)
def test_batches_shapes_and_dtypes(case: str, strategy: str) -> None:
    spec = BATCH_CASES[case]
    batch = spec["batch"]
    latent = spec.get("latent", (16, 16))
    dtype = spec.get("dtype", torch.float32)
    ratio = spec.get("ratio", 0.5)
    share = spec.get("share_cfg_plan", False)
    unet = flat_unet().to(dtype)
    x, text = inputs(batch, latent, dtype=dtype)
    expected = run(unet, x, text)
    before = snapshot(unet)
    config = dict(ratio=ratio, share_cfg_plan=share, sites={"min_tokens": 1})
    if strategy == "retom":
        # the 2 x 2 windows ``capacity`` counts; window scope, because the per-sample check
        # below compares with a batch of one, whose convolutions differ in the last bits, and a
        # global match among near-equal similarities may flip on those, as may the fitted weight
        # of the value correction on these random weights (tests/test_correction.py checks it)
        config.update(window_size=2, scope="window", value_correction=False)
    n = latent[0] * latent[1]
    cap = capacity(strategy, latent)
    short = int(ratio * n) > cap

    def warns():
        return pytest.warns(ShortfallWarning) if short else contextlib.nullcontext()

    with warns():
        handle = tokenmerge.apply(unet, strategy, **config)
        with TokenCounter(unet) as counter:
            merged = run(unet, x, text)
    out = merged_count(n, ratio, cap)
    assert merged.shape == expected.shape and merged.dtype == dtype
    assert merged.isfinite().all()
    assert not torch.equal(merged, expected)
    assert len(handle.sites) == 3
    for name, stats in handle.stats().items():
        assert (stats.tokens_in, stats.tokens_out) == (n, out), name
        assert stats.shortfall == (int(ratio * n) - cap if short else 0)
        assert counter.seen[f"{name}.attn1"] == [out]
        assert counter.grid(name) == latent

    # one plan per site; the two CFG halves share it only when asked to
    stats = handle.stats().values()
    assert [(s.calls, s.plans_computed) for s in stats] == [(1, 1)] * len(handle.sites)
    for plan in (patch.last_plan for patch in handle.patches):
        kept = plan.kept.expand(batch, -1)
        if share and batch % 2 == 0:
            assert torch.equal(kept[: batch // 2], kept[batch // 2 :])
        elif strategy != "random" and batch > 1:
            assert not torch.equal(kept[0], kept[1])  # content-aware: per-sample plans
    if dtype == torch.float32:
        check_per_sample_planning(unet, handle, x, text, merged, strategy, share)

    handle.remove()
    assert_restored(unet, before)
    assert torch.equal(run(unet, x, text), expected)

    # the plainly merged reference: the same UNet patched again from scratch
    with warns(), tokenmerge.apply(unet, strategy, **config):
        again = run(unet, x, text)
    assert (again.float() - merged.float()).abs().max().item() <= 1e-6
    assert_restored(unet, before)
    if case == "cfg":  # ... and a copy patched the same way
        twin = copy.deepcopy(unet)
        with tokenmerge.apply(twin, strategy, **config):
            assert (run(twin, x, text) - merged).abs().max().item() <= 1e-6


def check_per_sample_planning(unet, handle, x, text, merged, strategy, share) -> None:
    """Each sample's output is that of a batch of one (it planned on itself), except with a
    shared CFG plan and an even batch, where the first (unconditional) half merged with the plan
    of the second."""
    batch = x.shape[0]
    shared = share and batch % 2 == 0
    for i in range(batch):
        handle.new_generation()  # the same random draws as the batched call
        solo = run(unet, x[i : i + 1], text[i : i + 1])
        same = torch.allclose(merged[i : i + 1], solo, atol=1e-5, rtol=0)
        if shared and i < batch // 2 and strategy != "random":
            assert not same, i  # planned on the other half
        else:
            assert same, i


def test_1920x1080_stand_in_sdxl_like_unet_on_a_240x135_latent() -> None:
    """A coarse stand-in for SDXL at 1920 x 1080 (latent 240 x 135): a narrow UNet whose
    full-resolution blocks have no attention, so the default sites are at level 2 (a 120 x 68
    grid, 8160 tokens; 135 does not divide by 2)."""
    unet = make_unet(
        down=("DownBlock2D", CROSS, CROSS),
        up=(CROSS_UP, CROSS_UP, "UpBlock2D"),
        channels=(8, 16, 16),
        attention_head_dim=1,
    )
    latent = (240, 135)
    x, text = inputs(1, latent)
    expected = run(unet, x, text)
    before = snapshot(unet)
    handle = tokenmerge.apply(unet)  # every default
    sites = {
        "down_blocks.1.attentions.0.transformer_blocks.0",
        *(f"up_blocks.1.attentions.{i}.transformer_blocks.0" for i in range(2)),
    }
    assert site_names(handle) == sites and {s.level for s in handle.sites} == {2}
    with TokenCounter(unet) as counter:
        merged = run(unet, x, text)
    handle.remove()
    assert merged.shape == expected.shape
    grid = level_grid(latent, 2)
    assert grid == (120, 68)
    n = grid[0] * grid[1]
    for block in counter.blocks:
        assert counter.tokens(block) == (n if block in sites else math.prod(level_grid(latent, 4)))
    assert_only_sites_merged(counter, sites, 0.5)
    assert {(s.tokens_in, s.tokens_out) for s in handle.stats().values()} == {(n, n - n // 2)}
    assert_restored(unet, before)
    assert torch.equal(run(unet, x, text), expected)
    with tokenmerge.apply(unet):
        assert (run(unet, x, text) - merged).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------- step-aware caching


def test_plan_cache_across_denoising_steps() -> None:
    unet = flat_unet()
    x, text = inputs(2)
    handle = tokenmerge.apply(unet, "retom", ratio=0.5, cache_interval=3, sites={"min_tokens": 1})
    timesteps = list(range(999, 799, -20))  # 10 steps
    for t in timesteps:
        run(unet, x, text, t=t)
        assert all(patch.metric is None for patch in handle.patches)  # no activation kept
    for stats in handle.stats().values():
        assert stats.calls == 10
        assert stats.plans_computed == 4  # steps 0, 3, 6, 9
        assert stats.plans_reused == 6
    # the timestep goes back up: a new generation, planned afresh
    run(unet, x, text, t=999)
    assert {s.plans_computed for s in handle.stats().values()} == {5}
    run(unet, x, text, t=979)
    assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(5, 7)}
    # a new batch size within the interval plans afresh
    run(unet, *inputs(1), t=959)
    assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(6, 7)}
    # keyword arguments and tensor timesteps drive the steps as well
    handle.new_generation()
    with torch.no_grad():
        for t in (999, 979, 959):
            unet(sample=x, timestep=torch.tensor([t, t]), encoder_hidden_states=text)
    assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(7, 9)}
    handle.remove()
    assert hook_count(unet) == 0


def test_a_cached_plan_is_really_reused() -> None:
    """Within the interval the plan made at step 0 merges step 1's different input."""
    unet = flat_unet()
    x0, text = inputs(2, seed=0)
    x1, _ = inputs(2, seed=5)
    with tokenmerge.apply(unet, "retom", cache_interval=2, sites={"min_tokens": 1}) as handle:
        run(unet, x0, text, t=999)
        cached = run(unet, x1, text, t=979)  # reuses the plan made on x0
        assert {s.plans_reused for s in handle.stats().values()} == {1}
    with tokenmerge.apply(unet, "retom", cache_interval=1, sites={"min_tokens": 1}):
        fresh = run(unet, x1, text, t=979)  # plans on x1
    assert not torch.allclose(cached, fresh, atol=1e-4)


def test_plans_are_made_from_the_block_input(monkeypatch: pytest.MonkeyPatch) -> None:
    unet = flat_unet()
    x, text = inputs(2)
    handle = tokenmerge.apply(unet, "tome", ratio=0.5, sites={"min_tokens": 1})
    site = handle.sites[0].name
    block_inputs, features = [], []

    def keep_input(module, args, kwargs):
        block_inputs.append(args[0] if args else kwargs["hidden_states"])

    strategy = handle.patches[0].strategy
    original = strategy.make_plan

    def spy(feats, layout, site_, num_merge, generator):
        if site_.name == site:
            features.append(feats)
        return original(feats, layout, site_, num_merge, generator)

    monkeypatch.setattr(strategy, "make_plan", spy)
    hook = unet.get_submodule(site).register_forward_pre_hook(keep_input, with_kwargs=True)
    run(unet, x, text)
    hook.remove()
    handle.remove()
    assert len(block_inputs) == 1 and len(features) == 1
    expected = F.normalize(block_inputs[0].float(), dim=-1)
    torch.testing.assert_close(features[0], expected, atol=1e-6, rtol=0)
    assert all(patch.metric is None for patch in handle.patches)


def test_an_exception_inside_a_site_keeps_no_activation_and_the_patch_working() -> None:
    """A forward that raises inside a site (an out-of-memory error, say) must not leave a stale
    plan that the next call would unmerge with, and keeps the block input alive only until the
    next call or ``new_generation()`` (the hooks skip ``always_call``: it would give every
    block its own compiled graph)."""
    unet = flat_unet()
    x, text = inputs(2)
    expected_unmerged = run(unet, x, text)
    before = snapshot(unet)
    with tokenmerge.apply(unet, "retom", sites={"min_tokens": 1}):
        expected = run(unet, x, text)
    handle = tokenmerge.apply(unet, "retom", sites={"min_tokens": 1})

    def fail(module, args):
        raise RuntimeError("simulated out of memory")

    failing = unet.get_submodule(SITE).attn1.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="simulated"):
        run(unet, x, text)
    failing.remove()
    handle.new_generation()
    assert all(patch.metric is None for patch in handle.patches)
    assert torch.equal(run(unet, x, text), expected)
    assert all(patch.metric is None for patch in handle.patches)
    handle.remove()
    assert_restored(unet, before)
    assert torch.equal(run(unet, x, text), expected_unmerged)


def test_gradient_checkpointing_recomputes_with_the_same_plan() -> None:
    """The backward pass re-runs checkpointed blocks: they must merge exactly as in the forward
    (same plan), so gradients equal those of the merged model without checkpointing."""
    unet = flat_unet().train()
    x, text = inputs(2, (8, 8))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet.zero_grad()
        out = unet(x, 500, text).sample
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in unet.parameters()]

    with tokenmerge.apply(unet, "tome", ratio=0.5, sites={"min_tokens": 1}) as handle:
        out, grads = loss_and_grads()
        unet.enable_gradient_checkpointing()
        handle.new_generation()  # the same random draws
        out_ckpt, grads_ckpt = loss_and_grads()
        stats = handle.stats()
    assert unet.down_blocks[0].attentions[0].gradient_checkpointing
    assert torch.equal(out, out_ckpt)
    for grad, grad_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(grad_ckpt, grad, atol=1e-6, rtol=1e-5)
    assert {(s.calls, s.plans_computed) for s in stats.values()} == {(2, 2)}
    with torch.no_grad():
        unmerged = unet(x, 500, text).sample
    assert not torch.allclose(unmerged, out, atol=1e-4)


# ---------------------------------------------------------------------------- pass-through


SITE = "down_blocks.0.attentions.0.transformer_blocks.0"


def test_self_attention_with_a_mask_passes_through() -> None:
    unet = flat_unet()
    x, text = inputs(2)
    attn1 = unet.get_submodule(SITE).attn1
    hidden = torch.randn(2, 256, 32)
    mask = torch.zeros(2, 1, 256)
    mask[:, :, ::3] = -10000.0
    with torch.no_grad():
        expected = attn1(hidden, attention_mask=mask)
        plain = attn1(hidden)
    with tokenmerge.apply(unet, "retom", sites={"min_tokens": 1}) as handle:
        run(unet, x, text)  # the grid is known
        with torch.no_grad():
            assert not torch.allclose(attn1(hidden), plain, atol=1e-4)  # unmasked: merged
            assert torch.equal(attn1(hidden, attention_mask=mask), expected)
        stats = handle.stats()[SITE]
    assert stats.passed_through == 1
    assert "attention mask" in stats.pass_reason


def test_cross_attention_mask_with_a_row_per_query_passes_through() -> None:
    unet = flat_unet()
    x, text = inputs(2)
    attn2 = unet.get_submodule(SITE).attn2
    hidden = torch.randn(2, 256, 32)
    per_query = torch.zeros(2, 256, TEXT_TOKENS)
    per_query[:, ::2, -2:] = -10000.0
    per_key = torch.zeros(2, 1, TEXT_TOKENS)
    per_key[:, :, -2:] = -10000.0
    with torch.no_grad():
        expected = attn2(hidden, encoder_hidden_states=text, attention_mask=per_query)
        plain = attn2(hidden, encoder_hidden_states=text, attention_mask=per_key)
    unmerged = run(unet, x, text, encoder_attention_mask=torch.ones(2, TEXT_TOKENS))
    with tokenmerge.apply(unet, "retom", sites={"cross_attn": True, "min_tokens": 1}) as handle:
        # a text mask through the UNet is one row for every query: merged as usual
        mask = torch.ones(2, TEXT_TOKENS)
        mask[:, -2:] = 0
        merged = run(unet, x, text, encoder_attention_mask=mask)
        assert merged.shape == unmerged.shape
        assert handle.stats()[SITE].passed_through == 0
        with TokenCounter(unet) as counter:
            with torch.no_grad():
                out = attn2(hidden, encoder_hidden_states=text, attention_mask=per_key)
                assert not torch.allclose(out, plain, atol=1e-4)  # merged
                masked = attn2(hidden, encoder_hidden_states=text, attention_mask=per_query)
        assert torch.equal(masked, expected)
        stats = handle.stats()[SITE]
    assert counter.seen[f"{SITE}.attn2"] == [128, 256]
    assert stats.passed_through == 1
    assert "row per query" in stats.pass_reason


def test_four_dimensional_hidden_states_pass_through() -> None:
    unet = flat_unet()
    x, text = inputs(2)
    attn1 = unet.get_submodule(SITE).attn1
    image = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        expected = attn1(image)
    with tokenmerge.apply(unet, "tome", sites={"min_tokens": 1}) as handle:
        run(unet, x, text)
        with torch.no_grad():
            out = attn1(image)
        stats = handle.stats()[SITE]
    assert out.shape == image.shape and torch.equal(out, expected)
    assert stats.passed_through == 1
    assert "(2, 32, 16, 16)" in stats.pass_reason


def test_chunked_mlp_passes_through() -> None:
    """UNet2DConditionModel has no ``enable_forward_chunking`` in diffusers 0.42 (its video
    siblings do): set every block's chunking the way those call it."""
    unet = flat_unet()
    x, text = inputs(2)
    with tokenmerge.apply(unet, "retom", ratio=0.5, sites={"min_tokens": 1}):
        reference = run(unet, x, text)  # attention merged, MLP not
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            module.set_chunk_feed_forward(64, dim=1)
    with tokenmerge.apply(unet, "retom", ratio=0.5, sites={"min_tokens": 1, "mlp": True}) as handle:
        with TokenCounter(unet) as counter:
            out = run(unet, x, text)
        stats = handle.stats()
    assert counter.seen[f"{SITE}.attn1"] == [128]
    assert counter.seen[f"{SITE}.ff"] == [64] * 4  # 256 unmerged tokens, in chunks of 64
    for name, site_stats in stats.items():
        assert site_stats.passed_through == 4, name
        assert "chunk" in site_stats.pass_reason
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert hook_count(unet) == 0


# ---------------------------------------------------------------------------- memory


def _tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch aliases warns
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_apply_remove_cycles_and_forwards_leave_memory_flat() -> None:
    unet = flat_unet()
    x, text = inputs(1, (8, 8))
    expected = run(unet, x, text)
    before = snapshot(unet)
    for _ in range(20):  # warm caches (glob regexes, signatures)
        tokenmerge.apply(unet, "retom", sites={"min_tokens": 1}).remove()
    tensors, objects = _tensor_count(), len(gc.get_objects())
    for _ in range(1000):
        tokenmerge.apply(unet, "retom", ratio=0.5, sites={"min_tokens": 1}).remove()
    assert_restored(unet, before)
    # no growth: the count covers every live tensor of the process, and objects left by earlier
    # tests may be freed meanwhile (seen once: 126 fewer), so only an increase is a leak
    assert _tensor_count() <= tensors
    assert len(gc.get_objects()) - objects < 50  # not one object per cycle

    handle = tokenmerge.apply(unet, "retom", ratio=0.5, sites={"min_tokens": 1}, cache_interval=2)
    for t in (999, 979, 959):
        run(unet, x, text, t=t)
    tensors = _tensor_count()
    for i in range(1000):
        run(unet, x, text, t=999 - 20 * (i % 10))  # 100 generations of 10 steps
    assert _tensor_count() <= tensors
    stats = handle.stats()[SITE]
    assert stats.plans_computed == 2 + 100 * 5 and stats.plans_reused == 1 + 100 * 5
    handle.remove()
    assert_restored(unet, before)
    assert torch.equal(run(unet, x, text), expected)


# ---------------------------------------------------------------------------- pipeline


def make_pipeline():
    """A StableDiffusionPipeline from tiny random components. No tokenizer files can be
    downloaded: the prompts are given as embeddings and the tokenizer is None."""
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    ).eval()
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=CROSS_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=77,
            projection_dim=CROSS_DIM,
        )
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=flat_unet(),  # 32 px images: 16 x 16 latents, 256 tokens at level 1
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_level_apply_patches_only_the_unet() -> None:
    pipe = make_pipeline()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, TEXT_TOKENS, CROSS_DIM, generator=generator)
    negative = torch.randn(1, TEXT_TOKENS, CROSS_DIM, generator=generator)
    latents = torch.randn(1, 4, 16, 16, generator=generator)

    def generate():
        with torch.no_grad():
            return pipe(
                prompt_embeds=prompt,
                negative_prompt_embeds=negative,
                num_inference_steps=4,
                guidance_scale=7.5,
                latents=latents,
                output_type="latent",  # the VAE is left alone: no need to decode
            ).images

    expected = generate()
    before = snapshot(pipe.unet)
    handle = tokenmerge.apply(pipe, "retom", ratio=0.5, cache_interval=2)
    assert handle.model is pipe.unet and vars(pipe.unet)[HANDLE_ATTR] is handle
    assert hook_count(pipe.text_encoder) == 0 and hook_count(pipe.vae) == 0
    batches = []
    batch_hook = pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(len(args[0])))
    with TokenCounter(pipe.unet) as counter:
        images = generate()
    batch_hook.remove()
    assert batches == [2] * 4  # classifier-free guidance: one batch of 2 per step
    assert images.shape == expected.shape == (1, 4, 16, 16)
    assert not torch.equal(images, expected)
    stats = handle.stats()
    assert len(stats) == 3
    for name, site_stats in stats.items():
        assert site_stats.calls == 4
        assert (site_stats.plans_computed, site_stats.plans_reused) == (2, 2)  # steps 0 and 2
        assert (site_stats.tokens_in, site_stats.tokens_out) == (256, 128)
        assert counter.seen[f"{name}.attn1"] == [128] * 4
    generate()  # a new generation plans afresh
    assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(4, 4)}
    with pytest.raises(AlreadyAppliedError):
        tokenmerge.apply(pipe, "tome")
    assert tokenmerge.remove(pipe) is True
    assert tokenmerge.remove(pipe) is False
    assert_restored(pipe.unet, before)
    assert torch.equal(generate(), expected)


def test_sdxl_pipeline_merges_at_level_2_and_reuses_plans_across_steps() -> None:
    """A StableDiffusionXLPipeline from a tiny random SDXL-layout UNet. No tokenizer or text
    encoder files can be downloaded: prompts, pooled and negative embeddings are passed in."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = sdxl_unet(sample_size=32)
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
    generator = torch.Generator().manual_seed(0)

    def embeds(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    arguments = dict(
        prompt_embeds=embeds(1, TEXT_TOKENS, CROSS_DIM),
        pooled_prompt_embeds=embeds(1, TEXT_EMBED_DIM),
        negative_prompt_embeds=embeds(1, TEXT_TOKENS, CROSS_DIM),
        negative_pooled_prompt_embeds=embeds(1, TEXT_EMBED_DIM),
        latents=embeds(1, 4, 32, 32),
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=5.0,
        output_type="latent",
    )

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return pipe(**arguments).images

    expected = generate()
    before = snapshot(unet)
    handle = tokenmerge.apply(pipe, "retom", ratio=0.5, cache_interval=2, sites={"min_tokens": 1})
    assert handle.model is unet
    assert {site.level for site in handle.sites} == {2}  # SDXL: no attention at level 1
    assert {site.name.split(".attentions")[0] for site in handle.sites} == {
        "down_blocks.1",
        "up_blocks.1",
    }
    with TokenCounter(unet) as counter:
        images = generate()
    assert images.shape == expected.shape and not torch.equal(images, expected)
    for name, stats in handle.stats().items():
        assert (stats.tokens_in, stats.tokens_out) == (256, 128)  # 16 x 16 grid at level 2
        assert (stats.plans_computed, stats.plans_reused) == (2, 2)  # steps 0 and 2 plan
        assert counter.seen[f"{name}.attn1"] == [128] * 4
    assert tokenmerge.remove(pipe) is True
    assert_restored(unet, before)
    assert torch.equal(generate(), expected)


def test_changed_diffusers_signature_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    def forward(self, x, mask=None):  # not (hidden_states, ...) any more
        return x

    monkeypatch.setattr(BasicTransformerBlock, "forward", forward)
    with pytest.raises(tokenmerge.UnsupportedModelError) as error:
        tokenmerge.apply(flat_unet(), "retom")
    message = str(error.value)
    assert f"diffusers {diffusers.__version__}" in message and "BasicTransformerBlock" in message


def test_video_unet_is_not_taken_for_an_image_unet() -> None:
    """Temporal attention is never treated as a spatial grid: a video UNet is refused clearly
    rather than merged along time."""
    from diffusers import UNet3DConditionModel

    video = UNet3DConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    )
    with pytest.raises(tokenmerge.UnsupportedModelError, match="is not supported") as error:
        tokenmerge.apply(video, "retom")
    assert "UNet3DConditionModel" in str(error.value)
    assert "adapter 'diffusers_unet' supports diffusers UNet2DConditionModel" in str(error.value)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in video.modules())


def test_stable_video_diffusion_merges_its_spatial_attention_frame_by_frame() -> None:
    unet = tiny_svd_unet()
    g = torch.Generator().manual_seed(0)
    frames = 3
    sample = torch.randn(2, frames, 4, 16, 16, generator=g)
    image = torch.randn(2, 1, 32, generator=g)
    added = torch.tensor([[6.0, 127.0, 0.02]]).repeat(2, 1)

    def call() -> torch.Tensor:
        with torch.no_grad():
            return unet(sample, 999, image, added).sample

    plain = call()
    with tokenmerge.apply(unet, "tome", ratio=0.0, sites={"min_tokens": 1}):
        assert torch.equal(call(), plain)
    seen: dict[str, set[int]] = defaultdict(set)
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: seen[name].add(args[0].shape[1])
        )
        for name, module in unet.named_modules()
        if name.endswith(("attn1", "attn2")) and "temporal_transformer_blocks" in name
    ]
    handle = tokenmerge.apply(unet, "tome", ratio=0.5, sites={"min_tokens": 1})
    merged = call()
    names = [site.name for site in handle.sites]
    plans = [patch.last_plan for patch in handle.patches]
    stats = handle.stats()
    handle.remove()
    for hook in hooks:
        hook.remove()
    assert names and all(".transformer_blocks." in name for name in names)
    assert not any("temporal" in name for name in names)
    assert all((s.tokens_in, s.tokens_out) == (256, 128) for s in stats.values())
    # a plan row per frame of each sample (the frames are the spatial blocks' batch)
    assert all(plan.batch == 2 * frames and not plan.is_identity for plan in plans)
    assert seen and all(lengths == {frames} for lengths in seen.values())  # frames whole
    assert merged.shape == plain.shape and not torch.equal(merged, plain)
    assert torch.equal(call(), plain)
