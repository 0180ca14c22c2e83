"""The bench machinery: presets, workloads, weight sharing, similarity attention, block error,
timers, strategy variants, and whole runs on the tiny presets."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tokenmerge
from tokenmerge.errors import (
    ConfigError,
    UnknownNameError,
    UnknownStrategyError,
    UnsupportedModelError,
)
from tokenmerge_bench.fidelity import BlockErrorProbe, photo_latent, tie_self_attention
from tokenmerge_bench.presets import get_preset
from tokenmerge_bench.runner import BenchSettings, run_bench, sharing_weights
from tokenmerge_bench.timing import OverheadTimers, peak_memory_mb, without_profiler_chatter
from tokenmerge_bench.variants import StrategyVariant, parse_variant, parse_variants
from tokenmerge_bench.workload import (
    DiTWorkload,
    FluxWorkload,
    PixArtWorkload,
    SD3Workload,
    UNetWorkload,
    make_workload,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
UNETS = ["sd15", "sd21", "sdxl", "tiny-unet"]
TINY_TRANSFORMERS = ["tiny-dit", "tiny-pixart", "tiny-sd3", "tiny-flux"]

# parameter counts of the published models as diffusers builds them from the real checkpoints'
# configs (stabilityai/..., facebook/DiT-XL-2-512, PixArt-alpha/PixArt-XL-2-512x512,
# stabilityai/stable-diffusion-3-medium-diffusers)
PUBLISHED_PARAMETERS = {
    "sd15": 859_520_964,
    "sd21": 865_910_724,
    "sdxl": 2_567_463_684,
    "dit-xl-2": 749_826_464,
    "pixart-alpha-512": 610_856_096,
    "sd3-medium": 2_028_328_000,
}


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_presets_have_the_published_architecture(name):
    model = get_preset(name).build_empty()
    assert _parameters(model) == PUBLISHED_PARAMETERS[name]
    assert get_preset(name).notes == ""  # nothing cut: only the weights are random


def test_dit_xl_2_matches_the_papers_parameter_count():
    # DiT's 675,129,632 counts one timestep / class embedder and its fixed 256 px sin-cos
    # position table (a frozen parameter there, a buffer in diffusers); diffusers gives every
    # block its own copy of the embedder (the checkpoint conversion copies the same weights)
    model = get_preset("dit-xl-2").build_empty()
    copies = sum(_parameters(block.norm1.emb) for block in model.transformer_blocks[1:])
    position_table_256px = (256 // 8 // 2) ** 2 * 1152
    assert _parameters(model) - copies + position_table_256px == 675_129_632


@pytest.mark.parametrize(
    ("name", "billions"), [("pixart-alpha-512", 0.6), ("sd3-medium", 2.0), ("sdxl", 2.6)]
)
def test_presets_match_the_rounded_published_sizes(name, billions):
    assert round(_parameters(get_preset(name).build_empty()) / 1e9, 1) == billions


def test_flux_dev_cut_keeps_the_width_and_says_what_was_cut():
    preset = get_preset("flux-dev-cut")
    full = {**preset.config, "num_layers": 19, "num_single_layers": 38}
    with torch.device("meta"):
        real = type(preset.build_empty())(**full)
    assert _parameters(real) == 11_901_408_320  # FLUX.1-dev as published (11.9B)
    cut = preset.build_empty()
    assert (len(cut.transformer_blocks), len(cut.single_transformer_blocks)) == (2, 4)
    assert cut.inner_dim == real.inner_dim == 3072
    assert "depth cut" in preset.notes and "2 of" in preset.notes and "4 of" in preset.notes
    assert "cut" in preset.description


@pytest.mark.parametrize("name", UNETS)
def test_every_unet_preset_is_patched_at_its_full_resolution(name):
    model = get_preset(name).build_empty()
    handle = tokenmerge.apply(model, "retom", ratio=0.5)
    assert {site.level for site in handle.sites} == {1 if name != "sdxl" else 2}
    handle.remove()


@pytest.mark.parametrize(
    "name", ["dit-xl-2", "pixart-alpha-512", "sd3-medium", "flux-dev-cut", *TINY_TRANSFORMERS]
)
def test_every_transformer_preset_is_patched_at_its_blocks(name):
    preset = get_preset(name)
    model = preset.build_empty()
    workload = make_workload(model, preset.default_size, 1, CPU, torch.float32)
    handle = tokenmerge.apply(model, "retom", ratio=0.5)
    assert [site.name for site in handle.sites] == workload.block_names(model)
    handle.remove()


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-vit", *TINY_TRANSFORMERS])
def test_tiny_presets_are_tiny(name):
    # built in milliseconds (a size bound, not a timed assertion: the machine is shared)
    assert _parameters(get_preset(name).build()) < 1_000_000
    assert get_preset(name).notes.startswith("not a real model")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
        UnknownNameError, match="known presets: deit-s-16, dit-xl-2, flux-dev-cut, "
    ):
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


@pytest.mark.parametrize("strategy", ["tome", "retom"])  # retom: value correction, fitted
def test_overhead_timers_count_and_detach(strategy):
    _, merged, handle, workload = _tiny_pair(strategy, 0.5)
    sample = workload.noisy_photo("astronaut", 500)
    with torch.no_grad(), handle.observe(OverheadTimers(CPU)) as timers:
        workload(merged, sample, 500)
    sites = len(handle.sites)
    assert timers.calls["plan"] == sites  # one plan per site per call
    # self-attention only; the correction and its fit are part of the one unmerge per site
    assert dict(timers.calls) == {"plan": sites, "merge": sites, "unmerge": sites}
    assert all(timers.ms[part] > 0 for part in ("plan", "merge", "unmerge"))
    assert all(patch.observer is None for patch in handle.patches)  # detached on exit
    with torch.no_grad():
        workload(merged, sample, 500)
    assert dict(timers.calls) == {"plan": sites, "merge": sites, "unmerge": sites}


def test_peak_memory_on_cpu_counts_what_a_call_allocates():
    def allocate() -> None:
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 20)
        del a, b

    assert 7.5 < peak_memory_mb(allocate, CPU) < 8.5
    assert peak_memory_mb(allocate, torch.device("meta")) is None


def test_peak_memory_on_cpu_leaves_no_profiler_lines_on_stderr(capfd):
    # the profiler writes its start / stop markers (and, on a CUDA build without a GPU, a failed
    # device query) straight to file descriptor 2, which would land in the bench's report
    peak_memory_mb(lambda: torch.ones(256, 256) @ torch.ones(256, 256), torch.device("cpu"))
    assert capfd.readouterr().err == ""


def test_a_profiled_call_freeing_older_memory_leaves_stderr_clean():
    # c10 notes (once per process, so in a process of its own) a block freed during the
    # profile that was allocated before it: what the bench's instrumented runs do
    script = (
        "import torch\n"
        "from tokenmerge_bench.timing import peak_memory_mb\n"
        "keep = []\n"
        "def call():\n"
        "    keep.clear()\n"
        "    keep.append(torch.ones(1024, 1024) + 1)\n"
        "for _ in range(3):\n"
        "    peak_memory_mb(call, torch.device('cpu'))\n"
        "    keep.append(torch.ones(512, 512) * 2)\n"
        "print('done')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "done" and done.stderr == ""


def test_only_the_profilers_own_lines_are_dropped(capfd):
    chatter = [
        "USDT:2026-12-07 03:56:41 12491:12491 SyncActivityProfilerHandler.cpp:39] profiler_start",
        "USDT:2026-12-07 03:56:41 12491:12491 SyncActivityProfilerHandler.cpp:46] profiler_stop",
        "ERROR:2026-12-07 03:56:41 12491:12491 DeviceProperties.cpp:56] gpuGetDeviceCount "
        "failed with code 35",
        "[W1207 05:46:02.717777663 CPUAllocator.cpp:245] Memory block of unknown size was "
        "allocated before the profiling started, profiler results will not include the "
        "deallocation event",
    ]
    kept = [
        "ERROR:2026-12-07 03:56:41 12491:12491 Other.cpp:1] something else went wrong",
        "a line of the program's own",
    ]
    with without_profiler_chatter():
        for line in [chatter[0], kept[0], chatter[1], chatter[2], kept[1], chatter[3]]:
            os.write(2, (line + "\n").encode())
    assert capfd.readouterr().err.splitlines() == kept


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


# ---------------------------------------------------------------------------------- workloads
def _workload(name: str, batch: int = 2):
    preset = get_preset(name)
    model = preset.build()
    return model, make_workload(model, preset.default_size, batch, CPU, torch.float32)


def _captured_call(model: nn.Module, workload, sample, timestep) -> tuple[torch.Tensor, dict]:
    """The prediction, and the keyword arguments the model's forward received."""
    seen: dict = {}

    def capture(module, args, kwargs):
        seen.update(kwargs)

    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            prediction = workload(model, sample, timestep)
    finally:
        handle.remove()
    return prediction, seen


@pytest.mark.parametrize(
    ("name", "cls"),
    [("tiny-unet", UNetWorkload), ("tiny-dit", DiTWorkload), ("tiny-pixart", PixArtWorkload),
     ("tiny-sd3", SD3Workload), ("tiny-flux", FluxWorkload)],
)  # fmt: skip
def test_make_workload_picks_the_family(name, cls):
    assert type(_workload(name)[1]) is cls


def test_ddpm_transformers_take_class_labels_or_text_and_predict_noise_only():
    for name in ("tiny-dit", "tiny-pixart"):
        model, workload = _workload(name)
        sample = workload.noisy_photo("astronaut", 500)
        assert sample.shape == (2, 4, 32, 32)
        prediction, kwargs = _captured_call(model, workload, sample, 500)
        # out_channels 8 = noise + learned variance: only the noise half comes back
        assert prediction.shape == sample.shape
        assert kwargs["timestep"].tolist() == [500, 500]
        if name == "tiny-dit":
            labels = kwargs["class_labels"]
            assert labels.shape == (2,) and 0 <= int(labels.min()) and int(labels.max()) < 1000
        else:
            assert kwargs["encoder_hidden_states"].shape == (2, 120, 48)
            assert kwargs["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}


def test_pixart_1024_gets_resolution_conditioning():
    model = get_preset("tiny-pixart").build_empty()
    model.use_additional_conditions = True  # as PixArt-XL-2-1024-MS (sample_size 128)
    conditions = PixArtWorkload(model, 256, 2, CPU, torch.float32).kwargs["added_cond_kwargs"]
    assert conditions["resolution"].tolist() == [[256.0, 256.0]] * 2
    assert conditions["aspect_ratio"].tolist() == [[1.0]] * 2


def test_ddpm_transformers_noise_with_linear_betas():
    _, workload = _workload("tiny-dit", batch=1)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = float(torch.cumprod(1 - betas, 0)[700])
    clean = photo_latent("astronaut", 4, 32)[None]
    expected = math.sqrt(alpha_bar) * clean + math.sqrt(1 - alpha_bar) * workload.noise()
    assert torch.allclose(workload.noisy_photo("astronaut", 700), expected, atol=1e-5)
    steps = workload.timing_timesteps(3)
    assert steps == [980, 960, 940]  # a 50-step run


def test_sd3_is_flow_matching_with_the_timestep_unscaled():
    model, workload = _workload("tiny-sd3")
    clean = photo_latent("astronaut", 16, 32)[None].expand(2, -1, -1, -1)
    assert torch.allclose(
        workload.noisy_photo("astronaut", 300), 0.7 * clean + 0.3 * workload.noise(), atol=1e-6
    )
    sample = workload.noisy_photo("astronaut", 300)
    prediction, kwargs = _captured_call(model, workload, sample, 300.0)
    assert prediction.shape == sample.shape == (2, 16, 32, 32)
    assert kwargs["timestep"].tolist() == [300.0, 300.0]
    assert kwargs["encoder_hidden_states"].shape == (2, 77 + 256, 32)  # CLIP + T5 tokens
    assert kwargs["pooled_projections"].shape == (2, 32)
    steps = workload.timing_timesteps(28)
    assert len(set(steps)) == 28 and steps == sorted(steps, reverse=True)  # a 28-step run
    # SD3's shift of 3 (s -> 3 s / (1 + 2 s)) over 28 evenly spaced sigmas from 1 down to the
    # smallest training sigma (itself shifted: 0.001 -> 0.002994), as its pipeline walks them
    s = 1 - (1 - 3 * 0.001 / (1 + 2 * 0.001)) / 27
    assert steps[1] == pytest.approx(1000 * 3 * s / (1 + 2 * s), rel=1e-5)


def test_flux_packs_latents_and_passes_the_timestep_over_1000():
    model, workload = _workload("tiny-flux")
    latent = photo_latent("astronaut", 16, 32)
    packed = workload.clean_photo("astronaut")
    assert packed.shape == (2, 256, 64)
    # token (row 3, column 5) holds the 2 x 2 pixels at (6..7, 10..11) of all 16 channels
    assert torch.equal(packed[0, 3 * 16 + 5], latent[:, 6:8, 10:12].reshape(-1))
    ids = workload.kwargs["img_ids"]
    assert ids.shape == (256, 3) and ids[3 * 16 + 5].tolist() == [0.0, 3.0, 5.0]
    assert workload.kwargs["txt_ids"].shape == (512, 3) and not workload.kwargs["txt_ids"].any()
    sample = workload.noisy_photo("astronaut", 600)
    assert torch.allclose(sample, 0.4 * packed + 0.6 * workload.noise(), atol=1e-6)
    prediction, kwargs = _captured_call(model, workload, sample, 600.0)
    assert prediction.shape == sample.shape
    assert kwargs["timestep"].tolist() == pytest.approx([0.6, 0.6])  # Flux multiplies by 1000
    assert kwargs["guidance"].tolist() == [3.5, 3.5]
    assert kwargs["pooled_projections"].shape == (2, 32)
    # the resolution-dependent shift: mu = 0.5 at 256 tokens, sigma' = e^mu / (e^mu + 1/s - 1)
    steps = workload.timing_timesteps(28)
    s, mu = 1 - (1 - 1 / 28) / 27, 0.5
    assert steps[0] == 1000.0 and len(set(steps)) == 28
    assert steps[1] == pytest.approx(1000 * math.exp(mu) / (math.exp(mu) + 1 / s - 1), rel=1e-4)


def test_flow_matching_trajectories_run_euler():
    for name in ("tiny-sd3", "tiny-flux"):
        model, workload = _workload(name, batch=1)
        calls = []
        with torch.no_grad():
            final = workload.trajectory(model, 3, before_step=calls.append)
        assert calls == [0, 1, 2] and final.shape == workload.noise().shape
        assert torch.isfinite(final).all()
        assert workload.sampler.startswith("Euler")


def test_workload_size_checks():
    dit = get_preset("tiny-dit").build_empty()
    with pytest.raises(ValueError, match="not a multiple of 16"):
        make_workload(dit, 264, 1, CPU, torch.float32)  # 33 latent pixels: half a patch
    sd3 = get_preset("sd3-medium").build_empty()
    with pytest.raises(ValueError, match="at most 3072 px"):
        make_workload(sd3, 3200, 1, CPU, torch.float32)
    fill = get_preset("tiny-flux").build_empty()
    fill.register_to_config(in_channels=384)  # FLUX.1-Fill: image conditioning in the input
    with pytest.raises(UnsupportedModelError, match="Fill"):
        make_workload(fill, 256, 1, CPU, torch.float32)


# ---------------------------------------------------------------------------------- fidelity
def test_tie_self_attention_ties_normalised_queries_and_keys():
    flux = get_preset("tiny-flux").build()
    assert tie_self_attention(flux, scale=3.0) == 4  # 2 double- and 2 single-stream blocks
    attention = flux.single_transformer_blocks[0].attn
    assert torch.equal(attention.to_q.weight, attention.to_k.weight)
    # normalisation would undo a scaled projection: the norm weight carries the scale
    assert torch.equal(attention.norm_q.weight, torch.full((16,), 3.0))
    assert torch.equal(attention.norm_k.weight, attention.norm_q.weight)
    sd3 = get_preset("tiny-sd3").build()
    assert tie_self_attention(sd3, scale=2.0) == 3  # joint attention x 2 + SD 3.5's attn2
    pixart = get_preset("tiny-pixart").build()
    assert tie_self_attention(pixart, scale=2.0) == 2  # attn1 only, never the cross-attention


class _TwoStream(nn.Module):
    """A block returning (text, image) like SD3's and Flux's, with equal shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.text, self.image = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, hidden_states, encoder_hidden_states):
        return self.text(encoder_hidden_states), hidden_states + self.image(hidden_states)


def test_block_error_reads_the_image_stream():
    exact = nn.Sequential(_TwoStream())
    merged = sharing_weights(exact)
    # the "merged" block's image output is off by a known amount; its text output is exact
    merged[0].register_forward_hook(lambda m, a, k, out: (out[0], out[1] + 0.5), with_kwargs=True)
    x, text = torch.randn(1, 4, 8), torch.randn(1, 4, 8)  # text shaped like the image
    with torch.no_grad(), BlockErrorProbe(merged, exact, ["0"]) as probe:
        merged[0](hidden_states=x, encoder_hidden_states=text)
    with torch.no_grad():
        change = exact[0].image(x).double().norm()
    assert probe.records["0"].errors == [pytest.approx(float(0.5 * 32**0.5 / change))]
    assert probe.records["0"].tokens == [4]


@pytest.mark.parametrize("name", TINY_TRANSFORMERS)
def test_block_error_on_transformer_blocks(name):
    for ratio in (0.0, 0.5):
        model, workload = _workload(name)
        merged = sharing_weights(model)
        handle = tokenmerge.apply(merged, "tome", ratio=ratio)
        names = [site.name for site in handle.sites]
        with torch.no_grad(), BlockErrorProbe(merged, model, names) as probe:
            workload(merged, workload.noisy_photo("astronaut", 500), 500)
        errors = [probe.records[n].errors[0] for n in names]
        if ratio == 0.0:
            assert errors == [0.0] * len(names)
        else:
            assert all(error > 0.001 for error in errors), errors
        assert {probe.records[n].tokens[0] for n in names} == {256}


# ---------------------------------------------------------------------------------- variants
def test_parse_variant_reads_json_fields():
    assert parse_variant("retom") == StrategyVariant("retom", {})
    variant = parse_variant("retom:sites.mlp=true,sites.levels=[1,2],scope=global")
    assert variant.fields == {"sites.mlp": True, "sites.levels": [1, 2], "scope": "global"}
    assert variant.name == 'retom+sites.mlp+sites.levels=[1,2]+scope="global"'
    assert parse_variant("tome:sites.attn=false").label(0.5) == "tome-sites.attn 0.5"
    config = variant.config(0.5)
    assert (config.sites.mlp, config.sites.levels, config.scope) == (True, (1, 2), "global")


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (":sites.mlp=true", ConfigError, "names no strategy"),
        ("retom:", ConfigError, "sets no field"),
        ("retom:sites.mlp", ConfigError, "is not KEY=VALUE"),
        ("retom:sites.mlp=true,sites.mlp=false", ConfigError, "sets 'sites.mlp' twice"),
        ("retom:ratio=0.3", ConfigError, "give ratios with --ratios"),
        ("retomm", UnknownStrategyError, "did you mean 'retom'"),
        ("retom:sites.mlpp=true", ConfigError, "did you mean 'mlp'"),
        ("retom:cache_interval=0", ConfigError, "greater than or equal to 1"),
    ],
)
def test_bad_variants_are_refused_with_the_reason(spec, error, message):
    with pytest.raises(error, match=message):
        parse_variants([spec], [0.5], {})


def test_variants_take_their_validated_spelling_and_must_differ():
    variants = parse_variants(["retom", "retom:sites.mlp=yes"], [0.5], {})
    assert [v.name for v in variants] == ["retom", "retom+sites.mlp"]
    for twins in (["retom:sites.mlp=true", "retom:sites.mlp=1"], ["tome", "tome:sites.mlp=false"]):
        with pytest.raises(ConfigError, match="configure the same merging"):
            parse_variants(twins, [0.5], {})
    # a variant's own fields win over --set
    config = variants[1].config(0.3, {"cache_interval": 2, "sites.mlp": False})
    assert (config.sites.mlp, config.cache_interval, config.ratio) == (True, 2, 0.3)


# ---------------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("name", TINY_TRANSFORMERS)
def test_bench_runs_every_transformer_family(name):
    settings = BenchSettings(
        model=name, strategies=["tome", "retom", "retom:sites.mlp=true"], rounds=1,
        timesteps=[500], trajectory_steps=2, peers=None,
    )  # fmt: skip
    result = run_bench(settings, progress=False)
    rows = {row.label: row for row in result.rows}
    assert list(rows) == ["none", "tome 0.5", "retom 0.5", "retom+sites.mlp 0.5"]  # no tomesd
    blocks = 4 if name == "tiny-flux" else 2  # every block is a site
    for label in ("tome 0.5", "retom 0.5", "retom+sites.mlp 0.5"):
        row = rows[label]
        assert row.speedup > 0 and row.tokens == "256->128"
        assert row.block_error > 0 and row.output_error > 0 and row.trajectory_error > 0
        assert row.merged_blocks == blocks
        assert row.overhead_ms["plan"] > 0 and row.overhead_ms["merge"] > 0
    assert rows["retom+sites.mlp 0.5"].variant == "retom+sites.mlp"
    assert rows["retom+sites.mlp 0.5"].config["sites"]["mlp"] is True
    assert rows["retom 0.5"].config["sites"]["mlp"] is False
    assert rows["none"].config is None and rows["none"].variant == "none"
    sampler = "DDIM" if name in ("tiny-dit", "tiny-pixart") else "Euler (flow matching)"
    assert result.model["sampler"] == sampler


def test_bench_refuses_tomesd_on_a_transformer():
    settings = BenchSettings(model="tiny-dit", strategies=["tome"], rounds=1, timesteps=[500],
                             trajectory_steps=1, peers=["tomesd"])  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="tomesd patches only diffusers UNet"):
        run_bench(settings, progress=False)
