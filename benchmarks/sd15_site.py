"""One SD 1.5 full-resolution self-attention site, timed part by part: tomesd against tokenmerge.

The site is a diffusers ``Attention`` (320 channels, 8 heads, SDPA processor) with similarity-based
weights (key projection tied to the query projection, scaled by 3), on tokens made from the
bundled photograph at 32 x 32, 64 x 64 and 96 x 96 (1024, 4096 and 9216 tokens: SD 1.5 at 256,
512 and 768 px), batch 2, ratio 0.5. Configurations, each run as a denoising loop would run it
(one call per step for 10 steps, plans made every step or once per ``cache_interval`` steps):

- ``none``: the attention alone;
- ``tomesd``: tomesd 0.1.3's own ``bipartite_soft_matching_random2d`` planned every step, its
  merge / unmerge functions (needs ``pip install tomesd``);
- ``tome``: tokenmerge's ``tome`` (tomesd's algorithm), planned every step;
- ``retom (first wave)``: ``retom`` with the first wave's defaults (2 x 2 windows, window scope,
  merged into the representatives, no value correction), a plan per 5 steps;
- ``retom``: ``retom`` with today's defaults (at this site 6 x 6 windows, the global scope,
  the detail destinations, the value correction), a plan per 2 steps.

Parts (milliseconds per call, plans amortised over the steps that reuse them): ``plan``,
``merge``, ``attention`` (on the merged tokens), ``unmerge`` (the copy back), ``correct`` (the
value correction, its refit at each new plan included), and ``total`` for the whole site.
Configurations alternate inside each round; medians over rounds.

Run: ``python benchmarks/sd15_site.py [--rounds 7] [--sides 32 64 96] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor

import tokenmerge
from tokenmerge.correction import ValueCorrection
from tokenmerge.patch import SitePatch
from tokenmerge.site import Site, TokenLayout
from tokenmerge.state import StepState
from tokenmerge_bench.fidelity import tie_self_attention
from tokenmerge_bench.photos import photo_tokens

CHANNELS, HEADS, BATCH, RATIO, STEPS = 320, 8, 2, 0.5, 10
SITE = Site("down_blocks.0.attentions.0.transformer_blocks.0", stage="down", level=1)
CONFIGS = {
    "tome": dict(config="tome", cache_interval=1),
    "retom (first wave)": dict(
        config="retom",
        window_size=2,
        scope="window",
        destinations="representatives",
        cache_interval=5,
        local_proportional_attention=False,
        value_correction=False,
    ),
    "retom": dict(config="retom"),
}


def tokens(side: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(2, side^2, 320)`` unit-variance tokens of the photograph and its mirror image."""
    x = photo_tokens(side, CHANNELS)
    return ((x - x.mean()) / x.std()).to(device, dtype)


def attention(device: torch.device, dtype: torch.dtype) -> Attention:
    torch.manual_seed(0)
    module = Attention(CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS, out_bias=True)
    module.set_processor(AttnProcessor2_0())
    tie_self_attention(module, 3.0)
    return module.eval().to(device, dtype)


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.ms: dict[str, float] = defaultdict(float)

    def __call__(self, part: str, fn: Callable, *args: object, **kwargs: object) -> object:
        self.sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        self.ms[part] += (time.perf_counter() - start) * 1000.0
        return out


def run_ours(name: str, attn: Attention, x: Tensor, steps: int, timer: Timer) -> None:
    options = dict(CONFIGS[name])
    config = tokenmerge.load_config(
        options.pop("config"), ratio=RATIO, sites={"min_tokens": 1}, **options
    )
    layout = TokenLayout((int(math.isqrt(x.shape[1])),) * 2)
    strategy = tokenmerge.get_strategy(config)
    patch = SitePatch(SITE, strategy, config, StepState(), lambda site, hidden: layout)
    correction = ValueCorrection(attn) if config.value_correction else None
    plan = None
    for step in range(steps):
        if step % config.cache_interval == 0:
            plan = timer("plan", patch.make_plan, x)
        merged = timer("merge", plan.merge, x)
        y = timer("attention", attn, merged)
        out = timer("unmerge", plan.unmerge, y)
        if correction is not None:
            timer("correct", correction, plan, x, merged, out)


def run_tomesd(attn: Attention, x: Tensor, steps: int, timer: Timer) -> None:
    from tomesd.merge import bipartite_soft_matching_random2d

    side = int(math.isqrt(x.shape[1]))
    generator = torch.Generator(device=x.device).manual_seed(0)
    for _ in range(steps):
        r = int(x.shape[1] * RATIO)
        merge, unmerge = timer(
            "plan", bipartite_soft_matching_random2d, x, side, side, 2, 2, r, generator=generator
        )
        merged = timer("merge", merge, x)
        y = timer("attention", attn, merged)
        timer("unmerge", unmerge, y)


def run_none(attn: Attention, x: Tensor, steps: int, timer: Timer) -> None:
    for _ in range(steps):
        timer("attention", attn, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 96])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    attn = attention(device, dtype)
    names = ["none", "tomesd", *CONFIGS]
    parts = ["plan", "merge", "attention", "unmerge", "correct", "total"]
    print(f"SD 1.5 level-1 self-attention site, batch {BATCH}, ratio {RATIO}, {device} {dtype}, ")
    print(f"{torch.get_num_threads()} threads; ms per call, medians of {args.rounds} rounds")
    for side in args.sides:
        x = tokens(side, device, dtype)
        samples: dict[str, dict[str, list[float]]] = {n: defaultdict(list) for n in names}
        with torch.no_grad():
            for round_index in range(args.rounds + 1):  # the first round warms up
                for name in names:
                    timer = Timer(device)
                    if name == "none":
                        run_none(attn, x, STEPS, timer)
                    elif name == "tomesd":
                        run_tomesd(attn, x, STEPS, timer)
                    else:
                        run_ours(name, attn, x, STEPS, timer)
                    if round_index:
                        for part in parts[:-1]:
                            samples[name][part].append(timer.ms.get(part, 0.0) / STEPS)
                        samples[name]["total"].append(sum(timer.ms.values()) / STEPS)
        print(f"\n{side * side} tokens")
        print(f"{'config':>16} " + " ".join(f"{p:>9}" for p in parts))
        for name in names:
            cells = [statistics.median(samples[name][p]) for p in parts]
            print(f"{name:>16} " + " ".join(f"{c:9.2f}" for c in cells))


if __name__ == "__main__":
    main()
