"""The ``timm_hierarchical`` adapter: token merging around the token-wise MLPs of timm's
hierarchical / windowed models (Swin v1 / v2 / v2-cr, MaxViT, CoAtNet, MaxxViT, LeViT, SAM,
EfficientViT-MSRA), and the refusal of those whose MLP mixes tokens (PVT-v2, EfficientViT).

Tiny seeded random builds, fp32 on CPU. timm initialises some layers to zero or near zero (LeViT's
and EfficientViT-MSRA's last BatchNorm of each MLP, Swin-v2's post-norms, layer scales), which
would hide what merging changes; ``build`` draws those at random too (the fidelity figures are
random weights, not trained ones).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from hierarchical_models import CLASSES, FAMILIES, REFUSED, build, pixels, runner
from torch import nn

import tokenmerge
from tokenmerge import ConfigError, UnsupportedModelError
from tokenmerge.errors import NothingMergedWarning
from tokenmerge.testing import check_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADAPTER = "timm_hierarchical"


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def vars_snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's ``vars()``: containers copied (hook dicts included), tensors cloned."""
    out = {}
    for name, module in model.named_modules():
        values = {}
        for key, value in vars(module).items():
            if isinstance(value, dict):
                value = {k: v.clone() if torch.is_tensor(v) else v for k, v in value.items()}
            values[key] = value
        out[name] = values
    return out


def same_vars(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name, values in before.items():
        assert values.keys() == after[name].keys(), name
        for key, value in values.items():
            other = after[name][key]
            if isinstance(value, dict):
                assert value.keys() == other.keys(), (name, key)
                for k, v in value.items():
                    w = other[k]
                    assert torch.equal(v, w) if torch.is_tensor(v) else v is w, (name, key, k)
            elif torch.is_tensor(value):
                assert torch.equal(value, other), (name, key)
            else:
                assert value is other or value == other, (name, key)


# ---------------------------------------------------------------------------- supported classes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_conformance_checks(family: str) -> None:
    """The plugin kit's checks: ratio 0 bit-identical, shapes kept, tokens merge, remove and
    the context manager restore exactly, a second apply raises, the global RNG is untouched."""
    tiny = FAMILIES[family]
    check_adapter(
        lambda: build(tiny), runner(tiny), adapter=ADAPTER, strategies=["tome", "retom", "random"]
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merges_every_mlp_and_keeps_the_output_shape(family: str) -> None:
    tiny = FAMILIES[family]
    model, x = build(tiny), pixels(tiny)
    with torch.no_grad():
        expected = model(x)
        with tokenmerge.apply(model, "tome", ratio=0.5) as handle:
            got = model(x)
    assert handle.adapter.name == ADAPTER
    assert got.shape == expected.shape
    stats = handle.stats()
    assert stats and all(s.calls == 1 and s.tokens_out < s.tokens_in for s in stats.values())
    assert all(site.targets == ("mlp",) for site in handle.sites)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ratio_zero_bit_identical_and_remove_restores_vars(family: str) -> None:
    tiny = FAMILIES[family]
    model, x = build(tiny), pixels(tiny)
    with torch.no_grad():
        expected = model(x)
        before = vars_snapshot(model)  # after a call: LeViT fills its attention-bias cache then
        with tokenmerge.apply(model, "retom", ratio=0.0):
            assert torch.equal(model(x), expected)
        same_vars(before, vars_snapshot(model))
        handle = tokenmerge.apply(model, "tome", ratio=0.5)
        assert not torch.equal(model(x), expected)
        handle.remove()
        same_vars(before, vars_snapshot(model))
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("strategy", ["tome", "retom"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_error_is_small_and_grows_with_the_ratio(family: str, strategy: str) -> None:
    """On the features before the head (the logits of a random head hide most of it). Random
    weights: LeViT's tokens come out nearly identical (mean cosine 0.995), so its errors are
    near float noise; the others' are 0.001 to 0.21 at ratio 0.25."""
    tiny = FAMILIES[family]
    model, x = build(tiny), pixels(tiny)
    errors = {}
    with torch.no_grad():
        expected = model.forward_features(x)
        for ratio in (0.25, 0.5):
            with tokenmerge.apply(model, strategy, ratio=ratio):
                errors[ratio] = relative_error(model.forward_features(x), expected)
    assert 0 < errors[0.25] < errors[0.5], errors
    assert errors[0.25] < 0.25, errors


def test_every_supported_class_is_covered() -> None:
    from tokenmerge.adapters.timm_hierarchical import _model_classes

    assert {c.__name__ for c in _model_classes()} == set(CLASSES)
    for name, family in CLASSES.items():
        assert any(c.__name__ == name for c in type(build(FAMILIES[family])).__mro__)


#: per family: the classes of the modules that are sites / of their MLPs
OWNERS = {
    "swin": {"SwinTransformerBlock/Mlp"},
    "swinv2": {"SwinTransformerV2Block/Mlp"},
    "swinv2_cr": {"SwinTransformerV2CrBlock/Mlp"},
    "maxvit": {"PartitionAttentionCl/Mlp"},
    "maxvit_nchw": {"PartitionAttention2d/ConvMlp"},
    "maxvit_parallel": {"ParallelPartitionAttention/Mlp"},
    "maxxvitv2": {"ConvNeXtBlock/ConvMlp", "PartitionAttentionCl/Mlp"},
    "coatnet": {"TransformerBlock2d/ConvMlp"},
    "levit": {"LevitBlock/LevitMlp", "LevitDownsample/LevitMlp"},
    "levit_conv": {"LevitBlock/LevitMlp", "LevitDownsample/LevitMlp"},
    "sam": {"Block/Mlp"},
    "efficientvit_msra": {"ResidualDrop/ConvMlp"},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sites_are_the_modules_owning_an_mlp(family: str) -> None:
    model = build(FAMILIES[family])
    modules = dict(model.named_modules())
    with tokenmerge.apply(model, "tome") as handle:
        found = {
            f"{type(modules[s.name]).__name__}/{type(handle.adapter._found[s.name].mlp).__name__}"
            for s in handle.sites
        }
    assert found == OWNERS[family]


def test_sites_levels_and_stages() -> None:
    """One site per module owning an MLP, level 2 ** stage: Swin's blocks, MaxViT's partition
    units (not its MBConv blocks), LeViT's blocks and attention-downsamples."""
    handle = tokenmerge.apply(build(FAMILIES["swin"]), "tome")
    assert [(s.name, s.level, s.stage) for s in handle.sites] == [
        ("layers.0.blocks.0", 1, "first"),
        ("layers.0.blocks.1", 1, "first"),
        ("layers.1.blocks.0", 2, "middle"),
        ("layers.1.blocks.1", 2, "last"),
    ]
    handle.remove()
    with tokenmerge.apply(build(FAMILIES["maxvit"]), "tome") as handle:
        assert [s.name for s in handle.sites] == [
            "stages.0.blocks.0.attn_block",
            "stages.0.blocks.0.attn_grid",
            "stages.1.blocks.0.attn_block",
            "stages.1.blocks.0.attn_grid",
        ]
    with tokenmerge.apply(build(FAMILIES["levit"]), "tome", sites={"levels": (2,)}) as handle:
        assert [s.name for s in handle.sites] == [
            "stages.1.downsample",
            "stages.1.blocks.0",
            "stages.1.blocks.1",
        ]


def test_merged_tokens_are_copied_back() -> None:
    """Unmerging copies a merged token's MLP output to every token it stands for: in a Swin
    block the MLP's output at ratio 0.5 takes at most half as many distinct rows as tokens."""
    tiny = FAMILIES["swin"]
    model, x = build(tiny), pixels(tiny, batch=1)
    outputs = []
    mlp = model.layers[0].blocks[0].mlp
    with tokenmerge.apply(model, "tome", ratio=0.5), torch.no_grad():
        hook = mlp.register_forward_hook(lambda m, a, y: outputs.append(y))
        model(x)
        hook.remove()
    (y,) = outputs
    assert y.shape == (1, 196, 16)
    assert torch.unique(y[0], dim=0).shape[0] == 98


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "sites", [{"attn": True}, {"cross_attn": True}, {"attn": True, "mlp": True}]
)
def test_attention_asked_for_is_a_config_error(sites: dict) -> None:
    model = build(FAMILIES["swin"])
    with pytest.raises(ConfigError, match="windowed.*relative position biases.*sites={'mlp'"):
        tokenmerge.apply(model, "tome", sites=sites)
    assert tokenmerge.remove(model) is False


@pytest.mark.parametrize("sites", [None, {"mlp": True}, {"attn": False, "mlp": True}])
def test_the_mlp_is_the_default_and_the_named_target(sites: dict | None) -> None:
    tiny = FAMILIES["swin"]
    model, x = build(tiny), pixels(tiny)
    overrides = {} if sites is None else {"sites": sites}
    with tokenmerge.apply(model, "tome", ratio=0.5, **overrides) as handle, torch.no_grad():
        model(x)
    assert len(handle.sites) == 4
    assert all(s.tokens_out < s.tokens_in for s in handle.stats().values())


def test_a_dumped_config_applies() -> None:
    """A config dumped and loaded back has every field set, sites.attn at its default too: that
    is no request for attention."""
    config = tokenmerge.load_config(tokenmerge.load_config("tome"), ratio=0.25)
    assert "attn" in config.sites.model_fields_set
    with tokenmerge.apply(build(FAMILIES["swin"]), config) as handle:
        assert len(handle.sites) == 4


@pytest.mark.parametrize("klass", list(REFUSED))
def test_models_without_a_token_wise_mlp_are_refused(klass: str) -> None:
    tiny, layer = REFUSED[klass]
    model = build(tiny)
    assert type(model).__name__ == klass
    with pytest.raises(UnsupportedModelError, match=f"not supported.*{layer}.*token") as error:
        tokenmerge.apply(model, "tome")
    assert "timm_vit" not in str(error.value)  # the hierarchical adapter answers first
    assert tokenmerge.remove(model) is False


def test_an_mlp_that_mixes_tokens_is_refused() -> None:
    """A block whose MLP was swapped for one that norms over the grid cannot merge."""
    from timm.layers import GlobalResponseNormMlp

    model = build(FAMILIES["swin"])
    model.layers[1].blocks[0].mlp = GlobalResponseNormMlp(32, 64)
    with pytest.raises(UnsupportedModelError, match="layers.1.blocks.0.mlp.*GlobalResponseNorm"):
        tokenmerge.apply(model, "tome")
    assert tokenmerge.remove(model) is False


def test_training_batchnorm_passes_through() -> None:
    """LeViT's MLP BatchNorm mixes tokens in training mode (batch statistics): no merging, and
    the patch says so."""
    tiny = FAMILIES["levit"]
    model, x = build(tiny).train(), pixels(tiny)
    with torch.no_grad():
        expected = model(x)
        with tokenmerge.apply(model, "tome", ratio=0.5) as handle:
            with pytest.warns(NothingMergedWarning, match="batch statistics"):
                got = model(x)
    assert torch.equal(got, expected)
    assert all(s.passed_through == 1 and s.calls == 0 for s in handle.stats().values())


def test_compiles() -> None:
    """Under ``torch.compile`` the patched model matches eager (one family, one strategy: the
    conformance matrix runs the rest)."""
    from tokenmerge.testing import ADAPTER_CHECKS

    tiny = FAMILIES["coatnet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dynamo's own, on hooks
        ADAPTER_CHECKS["works_under_torch_compile"](
            lambda: build(tiny), runner(tiny), "tome", ADAPTER
        )


def test_channels_first_and_channels_last_merge_alike() -> None:
    """MaxViT's NCHW partition attention (1 x 1 ConvMlp on (B, C, H, W)) and its channels-last
    one (Mlp on (B, H, W, C)) get the same weights from the same seed: merged, they still
    agree, so both layouts gather and scatter the same tokens."""
    tiny = FAMILIES["maxvit"]
    x = pixels(tiny)
    outputs = []
    for family in ("maxvit", "maxvit_nchw"):
        model = build(FAMILIES[family])
        with torch.no_grad(), tokenmerge.apply(model, "tome", ratio=0.5):
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
