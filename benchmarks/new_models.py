"""CPU speed and output error of merging on mid-size builds of newer model classes: a
Flux-shaped transformer, a Wan 2.1-shaped video transformer and Dinov2-base, each against the
same model unmerged in the same run.

Weights are random (nothing is downloaded), so the speed figures carry over to trained models of
the same shapes and the error figures do not: they only show that merging runs and changes the
output by a bounded amount. Quality is measured on trained models (docs/quality.md).

- ``flux``: FLUX.1's layout at half its width (12 heads of 128, 2 double- and 4 single-stream
  blocks), 512 px (32 x 32 = 1024 image tokens), 64 text tokens, batch 1.
- ``wan``: Wan 2.1 1.3B's block (12 heads of 128, MLP 8960), 4 of its 30 blocks, 9 frames at
  320 x 576 px (3 latent frames of 20 x 36 tokens = 2160 tokens), 64 text tokens, batch 1.
- ``dinov2``: Dinov2-base (12 blocks of 768), 224 px (16 x 16 patches and a class token),
  batch 8, progressive merging (ToMe's way); its error is that of the pooled class token.

Each diffusion timing is a run of 4 denoising steps (timesteps 999, 979, 959, 939 in the model's
scale, the same noise and text), as a sampler calls the model, so the plans a strategy caches
across steps are reused as in a generation; the figure is the time per step. Configurations
alternate inside each round; each figure is the median over the rounds with its min-max.

Run: ``python benchmarks/new_models.py [--rounds 5] [--models flux wan dinov2]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import tokenmerge
from tokenmerge_bench.fidelity import relative_error

RATIO = 0.5
CONFIGS: dict[str, dict[str, Any]] = {
    "retom": dict(config="retom", ratio=RATIO),
    "tome": dict(config="tome", ratio=RATIO),
    "todo": dict(config="todo", ratio=RATIO),
    "retom, attn + mlp": dict(config="retom", ratio=RATIO, sites={"mlp": True}),
}
#: video: the same, and consecutive latent frames planned together (tokens may merge across
#: frames)
VIDEO_CONFIGS: dict[str, dict[str, Any]] = {
    **CONFIGS,
    "tome, frames_span 3": dict(config="tome", ratio=RATIO, adapter_options={"frames_span": 3}),
}
VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "tome r=8": dict(config="tome", r=8),
    "retom r=8": dict(config="retom", r=8),
}


def _flux() -> tuple[nn.Module, dict[str, Tensor]]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
        attention_head_dim=128, num_attention_heads=12, joint_attention_dim=1024,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    inputs = dict(
        hidden_states=torch.randn(1, 1024, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 64, 1024, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=ids,
        txt_ids=torch.zeros(64, 3),
    )
    return model, inputs


def _wan() -> tuple[nn.Module, dict[str, Tensor]]:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=4,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 3, 40, 72, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 64, 4096, generator=g),
    )
    return model, inputs


def _dinov2() -> tuple[nn.Module, dict[str, Tensor]]:
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(image_size=224, patch_size=14))
    g = torch.Generator().manual_seed(0)
    return model, dict(pixel_values=torch.randn(8, 3, 224, 224, generator=g))


MODELS: dict[str, tuple[Callable[[], tuple[nn.Module, dict]], dict[str, dict[str, Any]]]] = {
    "flux": (_flux, CONFIGS),
    "wan": (_wan, VIDEO_CONFIGS),
    "dinov2": (_dinov2, VIT_CONFIGS),
}


def _output(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    out = model(**inputs)
    if isinstance(out, tuple):
        return out[0]
    for name in ("sample", "pooler_output"):  # diffusers; a transformers encoder's summary
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out[0]


#: the denoising steps of one timing (FLUX.1 takes the timestep over 1000)
STEPS = torch.tensor([999.0, 979.0, 959.0, 939.0])


def _timed(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[float, Tensor]:
    """Seconds per model call, and the output of the last call."""
    given = inputs.get("timestep")
    schedule = [None] if given is None else STEPS / 1000 if given.max() <= 1 else STEPS
    start = time.perf_counter()
    with torch.no_grad():
        for t in schedule:
            step = inputs if t is None else {**inputs, "timestep": t.expand_as(given)}
            out = _output(model, step)
    return (time.perf_counter() - start) / len(schedule), out


def measure(name: str, rounds: int) -> list[str]:
    build, configs = MODELS[name]
    torch.manual_seed(0)
    model, inputs = build()
    model.eval()
    _timed(model, inputs)  # warm-up
    times: dict[str, list[float]] = {"none": [], **{label: [] for label in configs}}
    errors: dict[str, float] = {}
    merged: dict[str, str] = {}
    reference = None
    for round_ in range(rounds):
        for label in times:
            handle = None
            if label != "none":
                options = dict(configs[label])
                handle = tokenmerge.apply(model, options.pop("config"), **options)
            seconds, out = _timed(model, inputs)
            times[label].append(seconds)
            if label == "none":
                reference = out
            elif round_ == 0:
                errors[label] = relative_error(out, reference)
                stats = handle.stats().values()
                merged[label] = ", ".join(
                    sorted({f"{s.tokens_in} -> {s.tokens_out}" for s in stats})[:2]
                )
            if handle is not None:
                handle.remove()
        print(f"  {name}: round {round_ + 1} of {rounds}", file=sys.stderr)
    base = statistics.median(times["none"])
    lines = [
        f"| {name} | none | {base:.2f} s ({min(times['none']):.2f}-{max(times['none']):.2f}) "
        "| x1.00 | | |"
    ]
    for label in configs:
        values = times[label]
        median = statistics.median(values)
        lines.append(
            f"| {name} | {label} | {median:.2f} s ({min(values):.2f}-{max(values):.2f}) | "
            f"x{base / median:.2f} | {errors[label]:.3f} | {merged[label]} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
    print("| model | configuration | per call | speed-up | output error | tokens (site) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        for line in measure(name, args.rounds):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
