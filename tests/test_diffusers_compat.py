"""The diffusers UNet adapter next to the diffusers features that touch the same modules.

Every feature (LoRA, IP-Adapter, fused QKV, accelerate offloading, group offloading, layerwise
casting, attention processors, other diffusers hooks) is checked three ways, with merging at
ratio 0.5 on a tiny UNet (16 x 16 latent: 256 tokens at each of the three default sites):

(a) token counts: pre-hooks of our own on every site's ``attn1`` (registered after tokenmerge's,
    so they see what the attention really gets) record ``hidden_states.shape[1]``; with the
    feature it is still ``N - floor(ratio * N)``, as in the reference model;
(b) output: equal within 1e-6 to the "plainly merged" output, a reference model with the same
    weights and the same feature state, merged the same way, without the mechanism in question;
(c) removal: ``handle.remove()`` gives outputs bit-identical to the un-patched model with the
    feature active, and every module's hook dicts and ``vars()`` keys are back to what the feature
    itself left there.

Features installed before ``apply`` are compared with a snapshot of the same model taken before
``apply`` (hook ids included). Features installed after ``apply`` are compared with a twin that got
the feature and never tokenmerge (hook ids differ between models, so the hooks are compared by
their functions' qualified names).

Not covered here: ``torch.compile`` (its own tests). ``apply_first_block_cache`` does not support
UNets (see ``test_first_block_cache_needs_top_level_transformer_blocks``); pyramid attention
broadcast, which does, stands in as "another diffusers hook".
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import accelerate
import pytest
import torch
from accelerate.hooks import remove_hook_from_module
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.hooks import (
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    apply_first_block_cache,
    apply_pyramid_attention_broadcast,
)
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
)
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import Tensor, nn

import tokenmerge
from tokenmerge.errors import NothingMergedWarning

STRATEGIES = ["tome", "retom", "random"]
RATIO = 0.5
LATENT = (16, 16)
N = LATENT[0] * LATENT[1]
MERGED = N - math.floor(RATIO * N)
CROSS_DIM = 32
TEXT_TOKENS = 7
BATCH = 2
TIMESTEP = 500
#: the default sites of the tiny UNet (level 1: the full-resolution attention blocks)
SITES = (
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.1.transformer_blocks.0",
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_DIM = 24  # the image encoder's embedding size the IP-Adapter projection expects


# ---------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_unet(dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The tiny UNet, with the same weights at every call."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        sample_size=LATENT[0],
    )
    return unet.to(dtype).eval()


@functools.cache
def _inputs(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(BATCH, 4, *LATENT, generator=generator)
    text = torch.randn(BATCH, TEXT_TOKENS, CROSS_DIM, generator=generator)
    return sample.to(dtype), text.to(dtype)


def forward(unet: UNet2DConditionModel, **kwargs: Any) -> Tensor:
    """One UNet call on the fixed inputs, as a fresh generation (so every call plans anew)."""
    handle = unet.__dict__.get("_tokenmerge_handle")
    if handle is not None:
        handle.new_generation()
    sample, text = _inputs(torch.float64 if unet.dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        return unet(sample, TIMESTEP, text, **kwargs).sample


def merge(model: Any, strategy: str, **overrides: Any) -> tokenmerge.Handle:
    sites = {"min_tokens": 1, **overrides.pop("sites", {})}
    handle = tokenmerge.apply(model, strategy, ratio=RATIO, sites=sites, **overrides)
    assert [site.name for site in handle.sites] == list(SITES)
    return handle


@contextlib.contextmanager
def record_tokens(
    unet: nn.Module, targets: tuple[str, ...] = ("attn1",)
) -> Iterator[dict[str, list[int]]]:
    """Token counts each site's attention module really receives, per call."""
    counts: dict[str, list[int]] = {f"{s}.{t}": [] for s in SITES for t in targets}
    handles = []
    for name, calls in counts.items():

        def hook(module: nn.Module, args: tuple, kwargs: dict, calls: list = calls) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            calls.append(x.shape[1])

        handles.append(unet.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def merged_counts(targets: tuple[str, ...] = ("attn1",), calls: int = 1) -> dict[str, list[int]]:
    return {f"{s}.{t}": [MERGED] * calls for s in SITES for t in targets}


def _hook_repr(hook: Any) -> str:
    return getattr(hook, "__qualname__", type(hook).__qualname__)


def snapshot(model: nn.Module, *, ids: bool = True) -> dict[str, tuple]:
    """Per module: class, ``vars()`` keys, and every hook dict (keys with ids, else hook names)."""
    result = {}
    for name, module in model.named_modules():
        hooks = []
        for attr, value in sorted(vars(module).items()):
            if "hooks" in attr and isinstance(value, dict):
                if ids:
                    entries = sorted((key, _hook_repr(v)) for key, v in value.items())
                else:
                    entries = sorted(_hook_repr(v) for v in value.values())
                hooks.append((attr, tuple(entries)))
        result[name] = (type(module).__qualname__, tuple(sorted(vars(module))), tuple(hooks))
    return result


def assert_plain(merged: Tensor, reference: Tensor) -> None:
    torch.testing.assert_close(merged, reference, rtol=0, atol=1e-6)


def changed_twin(change: Callable[[UNet2DConditionModel], Any]) -> tuple[Tensor, dict]:
    """Outputs and snapshot of a fresh UNet given ``change``: what removing a patch applied
    *before* the change must leave behind."""
    twin = make_unet()
    change(twin)
    return forward(twin), snapshot(twin, ids=False)


def check_removed(
    unet: UNet2DConditionModel, handle: Any, when: str, plain: Tensor, before: dict
) -> None:
    """Removal restores the outputs and the module state exactly (the same objects as well
    when the change came before the patch)."""
    handle.remove()
    assert torch.equal(forward(unet), plain)
    assert snapshot(unet, ids=when == "before") == before


def check_merged(
    unet: nn.Module,
    reference: nn.Module,
    targets: tuple[str, ...] = ("attn1",),
    **kwargs: Any,
) -> Tensor:
    """(a) and (b): the same merged token counts as the reference, the same output."""
    with record_tokens(unet, targets) as counts:
        merged = forward(unet, **kwargs)
    with record_tokens(reference, targets) as reference_counts:
        expected = forward(reference, **kwargs)
    assert counts == reference_counts == merged_counts(targets)
    assert_plain(merged, expected)
    return merged


# ---------------------------------------------------------------------------- 1. LoRA


@functools.cache
def _lora_weights() -> dict[str, Tensor]:
    """A random LoRA on to_q / to_k / to_v / to_out.0 of every attention, in the peft key format
    diffusers reads (``down_blocks.0...attn1.to_q.lora_A.weight``), with random A and B."""
    source = make_unet(torch.float64)
    source.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(2)
    return {
        key: torch.randn(value.shape, generator=generator, dtype=torch.float64) * 0.2
        for key, value in get_peft_model_state_dict(source).items()
    }


def _pipeline(unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """A pipeline around ``unet`` (no text encoder: nothing to download, and no LoRA for it)."""
    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _with_lora_loader(loader: str) -> tuple[UNet2DConditionModel, Any]:
    unet = make_unet(torch.float64)
    return unet, (unet if loader == "load_lora_adapter" else _pipeline(unet))


def _load_lora(target: Any, loader: str) -> None:
    weights = {key: value.clone() for key, value in _lora_weights().items()}
    if loader == "load_lora_adapter":
        target.load_lora_adapter(weights, prefix=None, adapter_name="random")
    else:
        weights = {f"unet.{key}": value for key, value in weights.items()}
        target.load_lora_weights(weights, adapter_name="random")


@pytest.mark.parametrize("loader", ["load_lora_adapter", "load_lora_weights"])
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora(strategy: str, when: str, loader: str) -> None:
    # float64 throughout: the plain reference has the LoRA fused into the base weights and its
    # peft layers unloaded (plain nn.Linear, no LoRA mechanism at all); fusing reorders the float
    # sums ((W + s B A) x against W x + s B (A x)), which in float32 alone moves this UNet's
    # output by 1.5e-6. In float64 that rounding is ~1e-15, so 1e-6 measures merging only.
    unet, target = _with_lora_loader(loader)
    if when == "before":
        _load_lora(target, loader)
        plain = forward(unet)
        before = snapshot(unet)
    handle = merge(target, strategy)
    if when == "after":
        _load_lora(target, loader)
    assert isinstance(unet.get_submodule(f"{SITES[0]}.attn1.to_q"), BaseTunerLayer)

    reference = make_unet(torch.float64)
    _load_lora(reference, "load_lora_adapter")
    reference.fuse_lora()
    reference.unload_lora()
    assert type(reference.get_submodule(f"{SITES[0]}.attn1.to_q")) is nn.Linear
    merge(reference, strategy)
    check_merged(unet, reference)

    if when == "after":
        twin, twin_target = _with_lora_loader(loader)
        _load_lora(twin_target, loader)
        plain = forward(twin)
        before = snapshot(twin, ids=False)
    handle.remove()
    assert torch.equal(forward(unet), plain)
    assert snapshot(unet, ids=when == "before") == before


# ---------------------------------------------------------------------------- 2. IP-Adapter


def _ip_adapter_weights(unet: UNet2DConditionModel) -> dict[str, dict[str, Tensor]]:
    """Random weights laid out like a real IP-Adapter checkpoint (ip-adapter_sd15): an image
    projection to 4 extra context tokens, and ``to_k_ip`` / ``to_v_ip`` for every cross-attention
    processor, numbered 1, 3, 5... in ``attn_processors`` order as diffusers' loader reads them."""
    generator = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator) * 0.2

    ip_adapter, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            ip_adapter[f"{key_id}.to_k_ip.weight"] = rand(hidden, CROSS_DIM)
            ip_adapter[f"{key_id}.to_v_ip.weight"] = rand(hidden, CROSS_DIM)
            key_id += 2
    image_proj = {
        "proj.weight": rand(4 * CROSS_DIM, CLIP_DIM),
        "proj.bias": rand(4 * CROSS_DIM),
        "norm.weight": 1 + rand(CROSS_DIM),
        "norm.bias": rand(CROSS_DIM),
    }
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _with_ip_adapter(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    unet._load_ip_adapter_weights(_ip_adapter_weights(unet))
    return unet


def _image_embeds() -> dict[str, list[Tensor]]:
    # one IP-Adapter: a list with one (batch, num_images, embedding) tensor
    embeds = torch.randn(BATCH, 1, CLIP_DIM, generator=torch.Generator().manual_seed(4))
    return {"added_cond_kwargs": {"image_embeds": [embeds]}}


@pytest.mark.parametrize("cross", [False, True], ids=["attn", "attn+cross_attn"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ip_adapter_loaded_after_apply(strategy: str, cross: bool) -> None:
    targets = ("attn1", "attn2") if cross else ("attn1",)
    unet = make_unet()
    handle = merge(unet, strategy, sites={"cross_attn": cross})
    _with_ip_adapter(unet)  # re-creates every attention processor under the hooks
    assert isinstance(unet.get_submodule(f"{SITES[0]}.attn2").processor, IPAdapterAttnProcessor2_0)

    # plain reference: the same IP-Adapter already in place when tokenmerge is applied, so no
    # processor is replaced under the hooks
    reference = _with_ip_adapter(make_unet())
    merge(reference, strategy, sites={"cross_attn": cross})
    check_merged(unet, reference, targets, **_image_embeds())

    twin = _with_ip_adapter(make_unet())
    plain = forward(twin, **_image_embeds())
    handle.remove()
    assert torch.equal(forward(unet, **_image_embeds()), plain)
    assert snapshot(unet, ids=False) == snapshot(twin, ids=False)


# ---------------------------------------------------------------------------- 3. fused QKV


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_qkv(strategy: str, when: str) -> None:
    unet = make_unet()
    if when == "before":
        unet.fuse_qkv_projections()
        plain = forward(unet)
        before = snapshot(unet)
    handle = merge(unet, strategy)
    if when == "after":
        unet.fuse_qkv_projections()
    attn = unet.get_submodule(f"{SITES[0]}.attn1")
    assert isinstance(attn.processor, FusedAttnProcessor2_0)

    # plain reference: the unfused UNet, merged
    reference = make_unet()
    merge(reference, strategy)
    check_merged(unet, reference)
    unet.unfuse_qkv_projections()
    assert isinstance(attn.processor, AttnProcessor2_0)
    check_merged(unet, reference)
    unet.fuse_qkv_projections()
    assert isinstance(attn.processor, FusedAttnProcessor2_0)

    if when == "after":
        plain, before = changed_twin(UNet2DConditionModel.fuse_qkv_projections)
    check_removed(unet, handle, when, plain, before)


# ---------------------------------------------------------------------------- 4. accelerate


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_accelerate_cpu_offload(strategy: str, when: str) -> None:
    def offload(unet: UNet2DConditionModel) -> None:
        accelerate.cpu_offload(unet, execution_device=torch.device("cpu"))
        assert unet.get_submodule(f"{SITES[0]}.attn1.to_q").weight.device.type == "meta"

    unet = make_unet()
    if when == "before":
        offload(unet)
        plain = forward(unet)
        before = snapshot(unet)
    handle = merge(unet, strategy)
    if when == "after":
        offload(unet)

    reference = make_unet()  # plain reference: the same UNet, not offloaded
    merge(reference, strategy)
    check_merged(unet, reference)

    if when == "after":
        plain, before = changed_twin(offload)
    check_removed(unet, handle, when, plain, before)
    remove_hook_from_module(unet, recurse=True)


# ---------------------------------------------------------------------------- 5. group offloading


def _group_offload(unet: UNet2DConditionModel, offload_type: str) -> None:
    # CPU -> CPU: diffusers accepts it (the onload and offload copies are then no-ops), which
    # exercises its hooks without an accelerator
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    unet.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        **options,
    )
    assert any("_diffusers_hook" in vars(m) for m in unet.modules())


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_group_offloading(strategy: str, offload_type: str, when: str) -> None:
    unet = make_unet()
    if when == "before":
        _group_offload(unet, offload_type)
        plain = forward(unet)
        before = snapshot(unet)
    handle = merge(unet, strategy)
    if when == "after":
        _group_offload(unet, offload_type)

    reference = make_unet()  # plain reference: the same UNet, not offloaded
    merge(reference, strategy)
    check_merged(unet, reference)

    if when == "after":
        plain, before = changed_twin(lambda model: _group_offload(model, offload_type))
    check_removed(unet, handle, when, plain, before)


# ---------------------------------------------------------------------------- 6. layerwise casting


def _cast_reference(cast: UNet2DConditionModel) -> UNet2DConditionModel:
    """Plain reference: a float32 UNet holding the stored (rounded) weights, with no casting hooks.
    Upcasting a stored weight is exact, so the cast model computes with exactly these weights."""
    reference = make_unet()
    with torch.no_grad():
        for (name, stored), (ref_name, weight) in zip(
            cast.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert name == ref_name
            weight.copy_(stored.to(torch.float32))
    return reference


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.bfloat16], ids=["fp8", "bf16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layerwise_casting(strategy: str, storage: torch.dtype, when: str) -> None:
    def cast(unet: UNet2DConditionModel) -> None:
        unet.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
        assert unet.get_submodule(f"{SITES[0]}.attn1.to_q").weight.dtype == storage

    unet = make_unet()
    if when == "before":
        cast(unet)
        plain = forward(unet)
        before = snapshot(unet)
    handle = merge(unet, strategy)
    if when == "after":
        cast(unet)

    reference = _cast_reference(unet)
    merge(reference, strategy)
    check_merged(unet, reference)

    if when == "after":
        plain, before = changed_twin(cast)
    check_removed(unet, handle, when, plain, before)


# ---------------------------------------------------------------------------- 7. processors


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("processor", [AttnProcessor, AttnProcessor2_0])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attention_processor(strategy: str, processor: type, when: str) -> None:
    # float64: the plain reference is the UNet with its default processor (AttnProcessor2_0,
    # SDPA); AttnProcessor (baddbmm + softmax) differs from it by 1.4e-6 in float32 alone
    unet = make_unet(torch.float64)
    if when == "before":
        unet.set_attn_processor(processor())
        plain = forward(unet)
        before = snapshot(unet)
    handle = merge(unet, strategy)
    if when == "after":  # switching processors under the hooks
        unet.set_attn_processor(processor())
    assert type(unet.get_submodule(f"{SITES[0]}.attn1").processor) is processor

    reference = make_unet(torch.float64)
    merge(reference, strategy)
    check_merged(unet, reference)

    if when == "after":
        twin = make_unet(torch.float64)
        twin.set_attn_processor(processor())
        plain = forward(twin)
        before = snapshot(twin, ids=False)
    handle.remove()
    assert torch.equal(forward(unet), plain)
    assert snapshot(unet, ids=when == "before") == before


# ---------------------------------------------------------------------------- other diffusers hooks


def test_first_block_cache_needs_top_level_transformer_blocks() -> None:
    # diffusers 0.42's apply_first_block_cache looks for a ModuleList named transformer_blocks
    # (or another block-list name) among the model's *direct* children, and takes the first and
    # last block from it; a UNet's blocks sit at down_blocks.i.attentions.j.transformer_blocks,
    # so it finds none and fails (IndexError: pop from empty list). Pyramid attention broadcast,
    # which hooks attention modules by name anywhere in the model, stands in below.
    # When a diffusers release accepts UNets, this fails: then test tokenmerge next to it.
    with pytest.raises(IndexError):
        apply_first_block_cache(make_unet(), FirstBlockCacheConfig(threshold=0.05))


_PAB = "pyramid_attention_broadcast"


def _pab(unet: UNet2DConditionModel, timestep: dict[str, int]) -> None:
    """Pyramid attention broadcast on every self-attention, between timesteps 100 and 800."""
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: timestep["t"],
    )
    apply_pyramid_attention_broadcast(unet, config)
    for site in SITES:  # the same modules tokenmerge hooks
        assert vars(unet.get_submodule(f"{site}.attn1"))["_diffusers_hook"].get_hook(_PAB)


def _remove_pab(unet: UNet2DConditionModel) -> None:
    for module in unet.modules():
        if "_diffusers_hook" in vars(module):
            module._diffusers_hook.remove_hook(_PAB, recurse=False)


def _assert_passed_through_for_pab(handle: tokenmerge.Handle) -> None:
    for name, stats in handle.stats().items():
        assert stats.passed_through >= 1, name
        assert "diffusers hook" in stats.pass_reason, (name, stats.pass_reason)


@pytest.mark.parametrize("first_removed", ["tokenmerge", "pab"])
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pyramid_attention_broadcast_hooks(strategy: str, when: str, first_removed: str) -> None:
    # PAB may replay an attention output stored at an earlier step, made with an earlier plan, so
    # tokenmerge passes every call of a PAB-hooked module through (counted in stats) whichever
    # was applied first. The callback's timestep is outside PAB's range, so PAB runs every
    # attention and the output equals the plain UNet's.
    timestep = {"t": 999}
    unet = make_unet()
    vanilla = snapshot(unet)
    plain = forward(unet)
    if when == "before":
        _pab(unet, timestep)
        before = snapshot(unet)
    handle = merge(unet, strategy)
    if when == "after":
        _pab(unet, timestep)

    with pytest.warns(NothingMergedWarning, match="may replay outputs"):
        assert torch.equal(forward(unet), plain)
    _assert_passed_through_for_pab(handle)

    # what diffusers itself leaves behind: PAB alone, and PAB applied then removed
    twin = make_unet()
    _pab(twin, timestep)
    with_pab = snapshot(twin, ids=False)
    _remove_pab(twin)
    pab_removed = snapshot(twin, ids=False)

    if first_removed == "tokenmerge":
        handle.remove()
        assert torch.equal(forward(unet), plain)
        if when == "before":
            assert snapshot(unet) == before
        assert snapshot(unet, ids=False) == with_pab
        _remove_pab(unet)
    else:
        _remove_pab(unet)
        reference = make_unet()
        merge(reference, strategy)
        check_merged(unet, reference)  # PAB gone: merging resumes
        handle.remove()
    assert torch.equal(forward(unet), plain)
    assert snapshot(unet, ids=False) == pab_removed
    # tokenmerge's hooks are gone; only diffusers' own leftovers differ from the fresh UNet
    leftovers = {"_diffusers_hook", "forward"}
    for name, (cls, keys, hooks) in snapshot(unet).items():
        assert (cls, tuple(k for k in keys if k not in leftovers), hooks) == vanilla[name]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pyramid_attention_broadcast_reuse_is_never_unmerged_with_another_plan(
    strategy: str,
) -> None:
    # PAB computes attention at step 0 and returns its stored output at step 1. Were the hooks
    # merging around PAB's forward, PAB would store a *merged* output that step 1 unmerges with
    # its own plan, handing token i another token's attention output (silently wrong; it was,
    # before the pass-through). Now the PAB-hooked modules pass through: the output equals
    # PAB alone, step for step.
    timestep = {"t": TIMESTEP}
    sample, text = _inputs(torch.float32)
    second = sample + 0.5 * torch.randn(sample.shape, generator=torch.Generator().manual_seed(5))

    def two_steps(unet: UNet2DConditionModel) -> Tensor:
        timestep["t"] = TIMESTEP
        with torch.no_grad():
            unet(sample, TIMESTEP, text)
            timestep["t"] = TIMESTEP - 100
            return unet(second, TIMESTEP - 100, text).sample

    pab_only = make_unet()
    _pab(pab_only, timestep)
    unet = make_unet()
    _pab(unet, timestep)
    handle = merge(unet, strategy, cache_interval=1)
    with pytest.warns(NothingMergedWarning, match="may replay outputs"):
        assert torch.equal(two_steps(unet), two_steps(pab_only))
    _assert_passed_through_for_pab(handle)
    handle.remove()
    _remove_pab(unet)
