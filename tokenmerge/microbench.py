"""Strategy micro-benchmark on tokens made from the bundled photograph.

For every strategy and ratio it measures, at one attention site of Stable Diffusion 1.5's full
resolution level (a 64 x 64 grid, 320 channels, batch 2):

- plan / merge / unmerge time (the framework's real path: feature normalisation included);
- self-attention time on the merged tokens against the unmerged baseline, and the site's net
  speedup ``attn(N) / (plan + merge + attn(N - r) + unmerge)``;
- fidelity: the photograph cut into 4 x 4-pixel patches (the same 64 x 64 grid), each patch a
  token, merged and unmerged with a plan made on those tokens, and the PSNR of the rebuilt image.

Configurations are timed in alternation, ``--repeats`` times each; the table shows medians.
Run it as ``python -m tokenmerge.microbench`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import load_config
from .patch import SitePatch
from .photos import load_photo, patch_tokens, tokens_to_image
from .registry import list_strategies, registry
from .site import Site, TokenLayout
from .state import StepState

__all__ = ["BenchRow", "main", "run"]

PATCH = 4
CHANNELS = 320
HEADS = 8
SITE = Site("down_blocks.0.attentions.0.transformer_blocks.0", stage="down", level=1)


@dataclass
class BenchRow:
    """Medians (milliseconds) and fidelity of one strategy at one ratio."""

    strategy: str
    ratio: float
    tokens_in: int
    tokens_out: int
    plan_ms: float
    merge_ms: float
    unmerge_ms: float
    attn_ms: float
    site_speedup: float
    psnr_db: float
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)


def _progress(total: int, enabled: bool) -> Callable[[], None]:
    """A progress bar (tqdm when installed, else a plain counter on stderr)."""
    if not enabled:
        return lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        done = [0]

        def tick() -> None:
            done[0] += 1
            if done[0] == total or done[0] % max(1, total // 20) == 0:
                print(f"\r  {done[0]}/{total} timed runs", end="", file=sys.stderr, flush=True)
            if done[0] == total:
                print(file=sys.stderr)

        return tick
    bar = tqdm(total=total, desc="timing", unit="run", leave=False)

    def tick() -> None:
        bar.update()
        if bar.n == bar.total:
            bar.close()

    return tick


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def measure(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000.0

    return measure


def _attention(x: Tensor) -> Tensor:
    batch, tokens, channels = x.shape
    heads = x.view(batch, tokens, HEADS, channels // HEADS).transpose(1, 2)
    return F.scaled_dot_product_attention(heads, heads, heads).transpose(1, 2).reshape_as(x)


def _time_site(
    patch: SitePatch, x: Tensor, measure: Callable[[Callable[[], object]], float]
) -> dict[str, float]:
    """One timed pass through a site: plan, merge, attention on the merged tokens, unmerge."""
    box: dict[str, object] = {}
    return {
        "plan": measure(lambda: box.setdefault("plan", patch.make_plan(x))),
        "merge": measure(lambda: box.setdefault("x", box["plan"].merge(x))),
        "attn": measure(lambda: box.setdefault("y", _attention(box["x"]))),
        "unmerge": measure(lambda: box["plan"].unmerge(box["y"])),
    }


def _psnr(reference: Tensor, rebuilt: Tensor) -> float:
    mse = F.mse_loss(rebuilt.clamp(0, 1), reference).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _patch(strategy: str, ratio: float, layout: TokenLayout) -> SitePatch:
    config = load_config(strategy, ratio=ratio, min_tokens=1)
    instance = registry.strategy(strategy)(config)
    return SitePatch(SITE, instance, config, StepState(), lambda site, x: layout)


def _inputs(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Pixel tokens of the photograph (fidelity) and a batch of 2 wide tokens made from it."""
    photo = load_photo()
    pixels, grid = patch_tokens(photo, PATCH)
    mirrored, _ = patch_tokens(photo.flip(-1), PATCH)
    projection = torch.randn(
        pixels.shape[-1], CHANNELS, generator=torch.Generator().manual_seed(0)
    ) / math.sqrt(pixels.shape[-1])
    wide = torch.cat([pixels, mirrored]) @ projection
    return pixels.to(device), wide.to(device=device, dtype=dtype), grid


def run(
    strategies: Iterable[str] | None = None,
    ratios: Iterable[float] = (0.25, 0.5, 0.75),
    repeats: int = 15,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
) -> list[BenchRow]:
    """Time and score every strategy at every ratio; returns one row per pair.

    Example:
        >>> rows = run(["random"], ratios=[0.5], repeats=1, progress=False)
        >>> rows[0].tokens_out, rows[0].psnr_db > 20
        (2048, True)
    """
    torch_device = torch.device(device)
    pixels, wide, grid = _inputs(torch_device, getattr(torch, dtype))
    layout = TokenLayout(grid)
    measure = _timer(torch_device)
    names = list(strategies or list_strategies())
    configs = [(name, float(ratio)) for name in names for ratio in ratios]
    patches = {key: _patch(*key, layout) for key in configs}
    samples: dict[tuple[str, float], dict[str, list[float]]] = {
        key: {"plan": [], "merge": [], "unmerge": [], "attn": []} for key in configs
    }
    baseline: list[float] = []
    tick = _progress((repeats + 1) * (len(configs) + 1), progress)
    for repeat in range(repeats + 1):  # the first round warms up and is not recorded
        elapsed = measure(lambda: _attention(wide))
        if repeat:
            baseline.append(elapsed)
        tick()
        for key in configs:
            times = _time_site(patches[key], wide, measure)
            if repeat:
                for name, value in times.items():
                    samples[key][name].append(value)
            tick()
    attn_full = statistics.median(baseline)
    rows = []
    for key in configs:
        name, ratio = key
        fidelity_plan = _patch(name, ratio, layout).make_plan(pixels)
        rebuilt = fidelity_plan.unmerge(fidelity_plan.merge(pixels))
        median = {part: statistics.median(values) for part, values in samples[key].items()}
        spent = median["plan"] + median["merge"] + median["attn"] + median["unmerge"]
        rows.append(
            BenchRow(
                strategy=name,
                ratio=ratio,
                tokens_in=wide.shape[1],
                tokens_out=fidelity_plan.num_out,
                plan_ms=median["plan"],
                merge_ms=median["merge"],
                unmerge_ms=median["unmerge"],
                attn_ms=median["attn"],
                site_speedup=attn_full / spent,
                psnr_db=_psnr(
                    tokens_to_image(pixels.cpu(), grid, PATCH),
                    tokens_to_image(rebuilt.cpu(), grid, PATCH),
                ),
                samples=samples[key],
            )
        )
    rows.append(
        BenchRow("none", 0.0, wide.shape[1], wide.shape[1], 0, 0, 0, attn_full, 1.0, math.inf)
    )
    return rows


def format_table(rows: list[BenchRow]) -> str:
    """The rows as an aligned text table."""
    header = (
        "strategy", "ratio", "tokens", "plan ms", "merge ms", "unmerge ms", "attn ms",
        "site speedup", "PSNR dB",
    )  # fmt: skip
    body = [
        (
            row.strategy,
            f"{row.ratio:.2f}",
            f"{row.tokens_in}->{row.tokens_out}",
            f"{row.plan_ms:.2f}",
            f"{row.merge_ms:.2f}",
            f"{row.unmerge_ms:.2f}",
            f"{row.attn_ms:.2f}",
            f"x{row.site_speedup:.2f}",
            "inf" if math.isinf(row.psnr_db) else f"{row.psnr_db:.2f}",
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(line, widths, strict=True))
             for line in [header, *body]]  # fmt: skip
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenmerge.microbench",
        description=(
            "Time plan / merge / unmerge of every strategy on tokens made from the bundled "
            "photograph (a 64 x 64 grid, SD 1.5's full-resolution attention level), with the "
            "attention they save and the PSNR of the merged-then-unmerged photograph."
        ),
    )
    parser.add_argument("--strategies", nargs="+", help="strategy names (default: all registered)")
    parser.add_argument(
        "--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75], help="default 0.25 0.5 0.75"
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed runs per configuration (default 15)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
        help="dtype of the timed tokens (default float32)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    for name in args.strategies or []:
        registry.strategy(name)  # unknown names fail here, listing the known ones
    rows = run(
        args.strategies, args.ratios, args.repeats, args.device, args.dtype, not args.no_progress
    )
    threads = torch.get_num_threads()
    print(
        f"tokenmerge micro-benchmark: batch 2, {rows[0].tokens_in} tokens x {CHANNELS} channels, "
        f"{args.device} {args.dtype}, torch {torch.__version__}, {threads} threads, "
        f"{platform.machine()}; medians of {args.repeats} alternating runs"
    )
    print(format_table(rows))
    print(
        "site speedup = attention on all tokens / (plan + merge + attention on the rest + "
        "unmerge); PSNR: the photograph's 4x4-pixel patches merged and unmerged."
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(row) for row in rows], handle, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
