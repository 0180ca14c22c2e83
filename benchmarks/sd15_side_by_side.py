"""Side-by-side speed on the SD 1.5 UNet architecture: no merging, tomesd, tome, retom.

Random weights (no download), 512 px (a 64 x 64 latent), batch 2 (classifier-free guidance), fp32.
Configurations alternate within every round and each round is one denoising step (the timestep
goes down), so plan caching works as in a real generation; the table shows medians and the
speedup over no merging measured in the same run. Needs ``pip install tomesd`` for the peer.

    python benchmarks/sd15_side_by_side.py --rounds 3 --size 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

import tokenmerge


def sd15_unet() -> UNet2DConditionModel:
    """The SD 1.5 UNet architecture (its published config), with random weights."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels")
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    unet = sd15_unet()
    latent = args.size // 8
    x = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))

    def sharing_weights() -> UNet2DConditionModel:
        # its own modules (for its own hooks), the same weight storage: no extra memory
        with torch.device("meta"):
            clone = UNet2DConditionModel.from_config(unet.config)
        clone.load_state_dict(unet.state_dict(), assign=True)
        return clone.eval()

    import tomesd

    models = {"none": unet}
    models[f"tomesd {args.ratio}"] = sharing_weights()
    tomesd.apply_patch(models[f"tomesd {args.ratio}"], ratio=args.ratio)
    for name in ("tome", "retom"):
        models[f"{name} {args.ratio}"] = sharing_weights()
        tokenmerge.apply(models[f"{name} {args.ratio}"], name, ratio=args.ratio)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for step in range(args.rounds + 1):  # round 0 warms up
            timestep = 999 - 20 * step  # one denoising step per round: plan caches work
            for name in names[step % len(names) :] + names[: step % len(names)]:
                start = time.perf_counter()
                models[name](x, timestep, text)
                elapsed = time.perf_counter() - start
                if step:
                    times[name].append(elapsed)
                print(f"step {step} {name}: {elapsed:.2f} s", flush=True)
    base = statistics.median(times["none"])
    print(
        f"\nSD 1.5 UNet (random weights), {args.size} px, batch 2, fp32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"medians of {args.rounds} alternating steps"
    )
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:>12}: {median:6.2f} s per forward   x{base / median:.3f}")


if __name__ == "__main__":
    main()
