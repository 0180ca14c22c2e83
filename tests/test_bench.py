"""The bench machinery: presets, weight sharing, similarity attention, block error, timers."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge.bench.fidelity import BlockErrorProbe, photo_latent, tie_self_attention
from tokenmerge.bench.presets import PRESETS, get_preset
from tokenmerge.bench.runner import sharing_weights
from tokenmerge.bench.timing import OverheadTimers, peak_memory_mb
from tokenmerge.bench.workload import UNetWorkload, make_workload
from tokenmerge.errors import UnknownNameError, UnsupportedModelError
from tokenmerge.patch import SitePatch
from tokenmerge.plan import Plan

CPU = torch.device("cpu")

# parameter counts of the published models (diffusers' configs of the real checkpoints)
PUBLISHED_PARAMETERS = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_presets_have_the_published_architecture(name):
    model = get_preset(name).build_empty()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    assert get_preset(name).notes == ""  # nothing cut: only the weights are random


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_patched_at_its_full_resolution(name):
    model = get_preset(name).build_empty()
    handle = tokenmerge.apply(model, "retom", ratio=0.5)
    assert {site.level for site in handle.sites} == {1 if name != "sdxl" else 2}
    handle.remove()


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="known presets: sd15, sd21, sdxl, tiny-unet"):
        get_preset("sd1.5")


def test_sharing_weights_shares_storage_not_modules():
    model = get_preset("tiny-unet").build()
    clone = sharing_weights(model)
    for (name, p), (_, q) in zip(model.named_parameters(), clone.named_parameters(), strict=True):
        assert p is q, name
    assert clone.conv_in is not model.conv_in
    handle = tokenmerge.apply(clone, "tome", ratio=0.5)
    assert not hasattr(model, "_tokenmerge_handle")  # hooks stay on the clone
    handle.remove()


def test_tie_self_attention_makes_attention_peaked():
    model = get_preset("tiny-unet").build()
    attention = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    x = torch.randn(1, 256, 32)

    @torch.no_grad()
    def entropy() -> float:
        q, k = attention.to_q(x), attention.to_k(x)
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return float(-(weights * weights.clamp_min(1e-12).log()).sum(-1).mean())

    before = entropy()
    assert tie_self_attention(model, scale=3.0) == 4  # 3 + the mid block's; cross-attn untouched
    assert torch.equal(attention.to_q.weight, attention.to_k.weight)
    cross = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert not torch.equal(cross.to_q.weight[:, :32], cross.to_k.weight[:, :32])
    assert entropy() < before - 1.0


def test_photo_latent_keeps_the_photograph_structure():
    latent = photo_latent("astronaut", channels=4, size=32)
    other = photo_latent("coffee", channels=4, size=32)
    assert latent.shape == (4, 32, 32)
    # neighbouring latent pixels are far more alike than distant ones (it is not noise)
    near = (latent[:, :, 1:] - latent[:, :, :-1]).abs().mean()
    assert near < 0.5 * (latent - other).abs().mean()


def _tiny_pair(strategy: str, ratio: float):
    model = get_preset("tiny-unet").build()
    merged = sharing_weights(model)
    handle = tokenmerge.apply(merged, strategy, ratio=ratio)
    workload = make_workload(model, 128, 2, CPU, torch.float32)
    return model, merged, handle, workload


def test_block_error_is_zero_at_ratio_zero_and_positive_when_merging():
    for ratio, check in ((0.0, lambda e: e == 0.0), (0.5, lambda e: e > 0.01)):
        model, merged, handle, workload = _tiny_pair("retom", ratio)
        names = [site.name for site in handle.sites]
        sample = workload.noisy_photo("astronaut", 500)
        hooks = [len(merged.get_submodule(n)._forward_hooks) for n in names]
        with torch.no_grad(), BlockErrorProbe(merged, model, names) as probe:
            workload(merged, sample, 500)
        for name in names:
            assert len(probe.records[name].errors) == 1
            assert check(probe.records[name].errors[0]), (ratio, probe.records[name].errors)
        # the probe leaves no hook behind
        assert [len(merged.get_submodule(n)._forward_hooks) for n in names] == hooks


def test_overhead_timers_count_and_restore():
    _, merged, handle, workload = _tiny_pair("tome", 0.5)
    originals = (SitePatch.make_plan, Plan.merge, Plan.unmerge)
    timers = OverheadTimers(CPU)
    with torch.no_grad(), timers:
        workload(merged, workload.noisy_photo("astronaut", 500), 500)
    assert (SitePatch.make_plan, Plan.merge, Plan.unmerge) == originals
    sites = len(handle.sites)
    assert timers.calls["plan"] == sites  # one plan per site per call
    assert timers.calls["merge"] == timers.calls["unmerge"] == sites  # self-attention only
    assert all(timers.ms[part] > 0 for part in ("plan", "merge", "unmerge"))


def test_peak_memory_on_cpu_counts_what_a_call_allocates():
    def allocate() -> None:
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 20)
        del a, b

    assert 7.5 < peak_memory_mb(allocate, CPU) < 8.5
    assert peak_memory_mb(allocate, torch.device("meta")) is None


def test_workload_sdxl_conditioning_and_size_checks():
    sdxl = get_preset("sdxl").build_empty()
    workload = UNetWorkload(sdxl, 1024, 2, CPU, torch.float32)
    added = workload.kwargs["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 1280) and added["time_ids"].shape == (2, 6)
    assert workload.kwargs["encoder_hidden_states"].shape == (2, 77, 2048)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        UNetWorkload(sdxl, 1020, 1, CPU, torch.float32)
    with pytest.raises(UnsupportedModelError, match="cannot run a Linear yet"):
        make_workload(torch.nn.Linear(2, 2), 64, 1, CPU, torch.float32)


def test_timing_timesteps_are_consecutive_steps_of_a_sampling_run():
    workload = make_workload(get_preset("tiny-unet").build_empty(), 128, 1, CPU, torch.float32)
    steps = workload.timing_timesteps(4)
    assert steps == sorted(steps, reverse=True) and steps[0] - steps[1] == 20
