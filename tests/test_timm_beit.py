"""timm BEiT (relative position biases, shared or per layer) and NaFlexViT (image calls merge,
NaFlex dict calls are refused) with the ``timm_vit`` adapter, in progressive and local mode."""

from __future__ import annotations

import pytest
import torch
from snapshots import snapshot
from timm_more_models import (
    SHAPES,
    make_beit,
    make_beit_both,
    make_beit_shared,
    make_naflexvit,
    make_naflexvit_rope,
)
from torch import Tensor, nn
from vit_models import pixels

import tokenmerge
from tokenmerge.adapters import _vit as vit_base
from tokenmerge.adapters import timm_vit
from tokenmerge.adapters.timm_vit import PairBiasOfTokens, TimmViTAdapter
from tokenmerge.errors import TokenMergeError

BEITS = [make_beit, make_beit_shared, make_beit_both]
NAFLEX = [make_naflexvit, make_naflexvit_rope]
MODELS = BEITS + NAFLEX
MODES = ["progressive", "local"]
STRATEGIES = ["tome", "retom", "random"]


def _ids(builders: list) -> list[str]:
    return [b.__name__.removeprefix("make_") for b in builders]


def _apply(model: nn.Module, strategy: str, r: int, mode: str) -> tokenmerge.Handle:
    return tokenmerge.apply(model, strategy, r=r, adapter_options={"mode": mode})


def _pooled(model: nn.Module, images: Tensor) -> Tensor:
    """Pooled features (pre-logits): the merged tokens restored, then pooled as the model does."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def _relative(y: Tensor, ref: Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return pixels()


@pytest.mark.parametrize("build", MODELS, ids=_ids(MODELS))
def test_supported_with_its_prefix(build) -> None:
    model = build()
    assert TimmViTAdapter.supports(model)
    assert TimmViTAdapter.refusal(model) is None
    prefix, _, _ = SHAPES[build]
    with tokenmerge.apply(model, "tome", r=2) as handle:
        assert handle.adapter.name == "timm_vit"
        assert handle.adapter._num_prefix == prefix
        assert len(handle.sites) == len(model.blocks)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("build", MODELS, ids=_ids(MODELS))
@torch.no_grad()
def test_merges_close_to_unmerged(build, strategy, mode, images) -> None:
    model = build()
    ref = _pooled(model, images)
    logits, features = model(images), model.forward_features(images)
    with _apply(model, strategy, 2, mode) as handle:
        y = _pooled(model, images)
        assert model(images).shape == logits.shape
        assert model.forward_features(images).shape == features.shape
        stats = list(handle.stats().values())
    assert y.shape == ref.shape
    assert all(s.tokens_out < s.tokens_in for s in stats)
    assert stats[-1].tokens_out == stats[0].tokens_in - (
        2 * len(stats) if mode == "progressive" else 2
    )
    assert _relative(y, ref) < 0.01


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", MODELS, ids=_ids(MODELS))
@torch.no_grad()
def test_r0_bit_identical_and_remove_restores(build, mode, images) -> None:
    model = build()
    ref = model(images)
    before = snapshot(model)
    with _apply(model, "tome", 0, mode):
        assert torch.equal(model(images), ref)
    handle = _apply(model, "retom", 4, mode)
    assert not torch.equal(model(images), ref)
    handle.remove()
    assert snapshot(model) == before
    assert torch.equal(model(images), ref)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", BEITS, ids=_ids(BEITS))
@torch.no_grad()
def test_unfused_attention_path(build, mode, images) -> None:
    """The logits path (``fused_attn`` off) adds the same cut biases as the SDPA mask."""
    fused, unfused = build(), build()
    for block in unfused.blocks:
        block.attn.fused_attn = False
    with _apply(fused, "tome", 4, mode), _apply(unfused, "tome", 4, mode):
        torch.testing.assert_close(unfused(images), fused(images), rtol=1e-4, atol=1e-5)


def _wrong_cut(bias: Tensor, index: Tensor) -> Tensor:
    """The first ``n`` rows and columns: what a cut ignoring which tokens merged would give."""
    n = index.shape[-1]
    return bias[..., :n, :n].expand(index.shape[0], *bias.shape[-3:-2], n, n)


@pytest.mark.parametrize("build", BEITS, ids=_ids(BEITS))
@torch.no_grad()
def test_local_biases_follow_the_kept_tokens(build, images, monkeypatch) -> None:
    """Local mode: with strong position biases, the image tokens' features stay far closer to
    the unmerged ones with the biases cut to the kept tokens than cut to the first tokens."""
    model = build(bias_scale=4.0)
    ref = model.forward_features(images)[:, 1:]
    with _apply(model, "tome", 4, "local"):
        right = _relative(model.forward_features(images)[:, 1:], ref)
    # both cuts: the model-wide bias (adapters._vit) and the per-layer one (timm_vit)
    monkeypatch.setattr(timm_vit, "gather_pairs", _wrong_cut)
    monkeypatch.setattr(vit_base, "gather_pairs", _wrong_cut)
    with _apply(model, "tome", 4, "local"):
        wrong = _relative(model.forward_features(images)[:, 1:], ref)
    assert right < wrong / 2


@pytest.mark.parametrize("build", BEITS, ids=_ids(BEITS))
@torch.no_grad()
def test_progressive_biases_are_those_of_the_present_tokens(build, images, monkeypatch) -> None:
    """Progressive mode: every attention call gets the shared and the per-layer bias between
    the original tokens its tokens stand for (a merged token at its destination's place)."""
    model = build()
    layer_biases = []
    stand_in = PairBiasOfTokens.__call__

    def recording(self: PairBiasOfTokens) -> Tensor:
        layer_biases.append(stand_in(self))
        return layer_biases[-1]

    monkeypatch.setattr(PairBiasOfTokens, "__call__", recording)
    calls = []
    options = {"proportional_attention": False}
    with tokenmerge.apply(model, "tome", r=4, adapter_options=options) as handle:
        track = handle.adapter.carry.track

        def seen(module: nn.Module, args: tuple, kwargs: dict) -> None:
            index = track.token_index() if track.merged else None
            calls.append((module, index, kwargs.get("shared_rel_pos_bias")))

        hooks = [b.attn.register_forward_pre_hook(seen, with_kwargs=True) for b in model.blocks]
        model(images)
        for hook in hooks:
            hook.remove()
    assert sum(index is not None for _, index, _ in calls) == len(model.blocks) - 1
    tables = model.blocks[0].attn.relative_position_bias_table is not None
    assert len(layer_biases) == (len(calls) if tables else 0)
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    for number, (attn, index, given) in enumerate(calls):
        expected_layer = type(attn)._get_rel_pos_bias(attn)[0] if tables else None
        for sample in range(images.shape[0]):
            cut = slice(None) if index is None else index[min(sample, index.shape[0] - 1)]
            if tables:
                got = layer_biases[number]
                got = got[min(sample, got.shape[0] - 1)]
                assert torch.equal(got, expected_layer[:, cut][:, :, cut])
            if shared is not None:
                got = given if given.dim() == 3 else given[min(sample, given.shape[0] - 1)]
                assert torch.equal(got, shared[:, cut][:, :, cut])


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_per_layer_bias_stand_in(mode, images) -> None:
    """While applied, each BEiT attention with a bias table holds the stand-in for its method
    (and nothing else in ``vars()``); removal deletes it."""
    model = make_beit()
    with _apply(model, "tome", 2, mode):
        for block in model.blocks:
            assert isinstance(vars(block.attn)["_get_rel_pos_bias"], PairBiasOfTokens)
        model(images)
    assert all("_get_rel_pos_bias" not in vars(b.attn) for b in model.blocks)
    shared = make_beit_shared()
    with _apply(shared, "tome", 2, mode):
        assert all("_get_rel_pos_bias" not in vars(b.attn) for b in shared.blocks)


@pytest.mark.parametrize("build", [make_beit_both, make_naflexvit], ids=["beit", "naflexvit"])
@torch.no_grad()
def test_forward_intermediates(build, images) -> None:
    model = build()
    with _apply(model, "tome", 2, "progressive"), pytest.raises(TokenMergeError, match="local"):
        model.forward_intermediates(images, intermediates_only=True)
    maps = model.forward_intermediates(images, intermediates_only=True)
    with _apply(model, "tome", 2, "local"):
        merged = model.forward_intermediates(images, intermediates_only=True)
    assert [m.shape for m in merged] == [m.shape for m in maps]


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_naflex_dict_call_is_refused(mode, images) -> None:
    """A NaFlex call (patches, ``patch_valid``, ``patch_coord``; linear patch embedding only)
    raises before any block runs; image calls before and after it merge as usual, and the
    unpatched model takes it."""
    model = make_naflexvit()
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij"), -1)
    batch = {
        "patches": torch.randn(2, 24, 8 * 8 * 3),
        "patch_coord": torch.cat([grid.reshape(20, 2), torch.zeros(4, 2, dtype=torch.long)])
        .unsqueeze(0)
        .expand(2, -1, -1),
        "patch_valid": torch.arange(24).expand(2, -1) < 20,
    }
    ref = model(images)
    unpatched = model(batch)
    with _apply(model, "tome", 2, mode) as handle:
        merged = model(images)
        with pytest.raises(TokenMergeError, match="NaFlex mode"):
            model(batch)
        assert torch.equal(model(images), merged)
        assert all(s.calls == 2 for s in handle.stats().values())
    assert torch.equal(model(images), ref)
    assert torch.equal(model(batch), unpatched)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", [make_beit_both, make_naflexvit_rope], ids=["beit", "naflex"])
def test_compiles(build, mode, images) -> None:
    """The patched model traces under ``torch.compile`` (the eager backend: dynamo's tracing of
    the hooks and of the bias stand-in is what could break) and gives the eager outputs."""
    model = build()
    with torch.no_grad(), _apply(model, "tome", 2, mode):
        eager = model(images)
        compiled = torch.compile(model, backend="eager")(images)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
