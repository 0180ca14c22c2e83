"""Merging strategies on learned attention: ``python benchmarks/learned_attention.py``.

Measures every strategy variant at every ratio on the digit reference models (trained here on
MNIST digits: ``tokenmerge_bench.reference.digits``) with ``tokenmerge_bench.reference.
digit_fidelity``: the denoisers' one-step and whole-sampling-run errors against the unmerged
model, the classifier's top-1 disagreement. Prints a table per model with each variant's error
as a multiple of ``tome``'s at the same ratio, and writes everything as JSON with ``--out``.

Example::

    python benchmarks/learned_attention.py --models digit-dit --ratios 0.5 \\
        --strategies tome random retom retom:scope=global

The denoisers' sites are ``--set`` for every variant (default: every self-attention, however
few tokens it has: ``sites.min_tokens=1``); the classifier merges in local mode.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from tokenmerge_bench.reference.digit_fidelity import ClassifierProbe, DenoiserProbe
from tokenmerge_bench.reference.models import build_reference, load_reference
from tokenmerge_bench.variants import nested, parse_variant, parse_variants

MODELS = ("digit-flux", "digit-dit", "digit-vit")
#: the metric each model's targets are set in (issue 25): errors of the same runs
METRICS = {
    "digit-flux": ("one_step_0.25", "one_step_0.5", "one_step_0.75", "final"),
    "digit-dit": ("one_step_0.25", "one_step_0.5", "one_step_0.75", "final"),
    "digit-vit": ("disagreement", "kl"),
}


def _load(kind: str, checkpoint: str | None) -> torch.nn.Module:
    if checkpoint is None:
        return load_reference(kind)
    model = build_reference(kind)
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    model.load_state_dict(state.get("model", state))
    return model.eval()


def _table(kind: str, rows: list[dict[str, Any]]) -> str:
    metrics = METRICS[kind]
    tome = {row["ratio"]: row for row in rows if row["variant"] == "tome"}
    lines = [
        f"### {kind}",
        "",
        "| variant | ratio | " + " | ".join(metrics) + " | vs tome (geo. mean) |",
        "| --- | --- | " + " | ".join("---" for _ in metrics) + " | --- |",
    ]
    for row in rows:
        base = tome.get(row["ratio"])
        cells = []
        logs = []
        for metric in metrics:
            value = row[metric]
            cell = f"{value:.4f}"
            if base is not None and base[metric] > 0 and value > 0:
                cell += f" ({value / base[metric]:.2f}x)"
                logs.append(math.log(value / base[metric]))
            cells.append(cell)
        mean = f"{math.exp(sum(logs) / len(logs)):.2f}x" if logs else "-"
        extra = f", recognised {row['recognised']:.2f}" if "recognised" in row else ""
        row_cells = " | ".join(cells)
        lines.append(f"| {row['variant']}{extra} | {row['ratio']} | {row_cells} | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/learned_attention.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--strategies", nargs="+", default=["tome", "random", "retom"], metavar="VARIANT"
    )
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="a config field for every variant (default: sites.min_tokens=1)",
    )  # fmt: skip
    parser.add_argument("--per-class", type=int, default=5, help="sampled digits per class")
    parser.add_argument("--checkpoint", nargs="*", default=[], metavar="KIND=PATH")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", help="write every figure as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    fields = parse_variant("set:" + ",".join(args.set)).fields if args.set else {}
    overrides = nested({"sites.min_tokens": 1, **fields})
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    report: dict[str, Any] = {}
    for kind in args.models:
        options = {"adapter_options": {"mode": "local"}} if kind == "digit-vit" else {}
        variants = parse_variants(args.strategies, args.ratios, overrides)
        model = _load(kind, checkpoints.get(kind))
        probe = (
            ClassifierProbe(model)
            if kind == "digit-vit"
            else DenoiserProbe(model, per_class=args.per_class)
        )
        rows = []
        jobs = [(v, r) for v in variants for r in args.ratios]
        for variant, ratio in tqdm(jobs, desc=kind):
            config = variant.config(ratio, overrides)
            errors = probe.errors(config, **options)
            rows.append({"variant": variant.name, "ratio": ratio, **errors})
        unmerged = (
            {"accuracy": probe.accuracy_unmerged()} if kind == "digit-vit"
            else {"recognised": probe.recognised_unmerged()}
        )  # fmt: skip
        report[kind] = {"unmerged": unmerged, "rows": rows}
        print(_table(kind, rows))
        print(f"unmerged: {unmerged}\n", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
