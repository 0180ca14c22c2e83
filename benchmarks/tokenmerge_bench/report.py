"""The bench's outputs: a terminal table, JSON, and a plot of speedup against block error."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tokenmerge.errors import OutputPathError, TokenMergeError

from .runner import BenchResult, BenchRow
from .timing import spread

__all__ = ["format_report", "write_json", "write_plot", "write_sample_grid"]


def _number(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, fmt)


def _memory(row: BenchRow) -> str:
    if row.peak_memory_mb is None:
        return "n/a"
    return f"{row.peak_memory_mb:.1f}" if row.peak_memory_mb < 10 else f"{row.peak_memory_mb:.0f}"


def _overhead(row: BenchRow) -> str:
    if row.overhead_ms is None:
        return "-"
    parts = row.overhead_ms
    return f"{parts['plan']:.1f}/{parts['merge']:.1f}/{parts['unmerge']:.1f}"


def format_table(rows: list[BenchRow]) -> str:
    """The rows as an aligned text table."""
    header = (
        "config", "tokens", "s/forward (min-max)", "speedup", "plan/merge/unmerge ms", "overhead %",
        "kernels/site plan, reuse", "syncs", "peak MiB", "block err", "output err",
        "trajectory err",
    )  # fmt: skip
    body = [
        (
            row.label,
            row.tokens,
            spread(row.seconds, row.seconds_min, row.seconds_max),
            f"x{row.speedup:.3f}",
            _overhead(row),
            _number(row.overhead_percent, ".2f"),
            _kernels(row),
            _number(row.syncs, "d"),
            _memory(row),
            _number(row.block_error, ".4f"),
            _number(row.output_error, ".4f"),
            _number(row.trajectory_error, ".4f"),
        )
        for row in rows
    ]
    return _aligned(header, body)


#: the held-out loss table's timestep ranges (noisy, middle, nearly clean)
LOSS_RANGES = {"t 980-760": (750, 999), "t 740-360": (350, 749), "t 340-0": (0, 349)}


def _kernels(row: BenchRow) -> str:
    if row.kind == "baseline" or (row.kernels_planning is None and row.kernels_reusing is None):
        return "-"
    return f"{_number(row.kernels_planning, '.1f')}, {_number(row.kernels_reusing, '.1f')}"


def format_loss_table(rows: list[BenchRow]) -> str:
    """The reference denoiser's held-out loss: the unmerged model's (mean per timestep range),
    then each configuration's increase over it (%, per timestep, averaged over the range)."""
    from tokenmerge_bench.reference.metrics import loss_increase

    base = rows[0].held_out_loss

    def mean(bounds: tuple[int, int]) -> str:
        values = [v for t, v in base.items() if bounds[0] <= int(t) <= bounds[1]]
        return f"{sum(values) / len(values):.4f}"

    header = ("config", *LOSS_RANGES, "all timesteps")
    body = [("none (loss)", *(mean(b) for b in LOSS_RANGES.values()), mean((0, 999)))]
    for row in rows[1:]:
        increases = [
            f"{loss_increase(row.held_out_loss, base, *b):+.1f} %" for b in LOSS_RANGES.values()
        ]
        body.append((row.label, *increases, f"{row.held_out_loss_increase:+.1f} %"))
    return _aligned(header, body)


def _aligned(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_report(result: BenchResult) -> str:
    """The header (model, weights, machine), the table and how to read it."""
    model, machine, settings = result.model, result.machine, result.settings
    memory = (
        "peak MiB: torch.cuda.max_memory_allocated (weights included)"
        if machine["device"].startswith("cuda")
        else "peak MiB: what one forward allocates, from the profiler's memory accounting "
        "(activations, not weights)"
    )
    lines = [
        f"tokenmerge {result.tokenmerge_version} bench: {model['description']} "
        f"[{model['class']}], {model['input']}",
        f"  model: {model['source']}" + (f"; {model['notes']}" if model["notes"] else ""),
        f"  attention weights: {model['attention']}",
        f"  machine: {machine['device']} {settings['dtype']}, torch {machine['torch']}, "
        f"{machine['threads']} threads, {machine['processor']}",
        f"  speed: medians (min-max in brackets) of {settings['rounds']} alternating rounds (one "
        "denoising step each, "
        + (
            "every configuration through torch.compile, after warm-up rounds that compile"
            if settings.get("compile")
            else "after a warm-up round"
        )
        + f"); fidelity: photographs {', '.join(settings['photos'])} at "
        f"timesteps {', '.join(str(t) for t in settings['timesteps'])}; trajectory: "
        f"{settings['trajectory_steps']} {model.get('sampler', 'DDIM')} steps",
        "",
        format_table(result.rows),
        "",
        *_loss_section(result.rows),
        "speedup: forward time without merging / with, same run. overhead: planning, merge and "
        "unmerge per forward, from a separate instrumented trajectory run (share of the median "
        "forward).",
        "kernels/site: extra kernels per merged site at a step that plans, and at one that "
        "reuses its plan (-: none did), counted on the meta device: what a GPU queues. syncs: "
        "the most device-to-host reads of one forward.",
        f"{memory}. block err: ||y_merged - y_exact|| / ||y_exact - x|| per merged block, mean. "
        "output / trajectory err: relative to the unmerged model's output / final latent.",
        f"run time: {result.run_seconds:.1f} s",
    ]
    return "\n".join(lines)


def _loss_section(rows: list[BenchRow]) -> list[str]:
    if not rows or rows[0].held_out_loss is None:
        return []
    return [
        "held-out denoising loss (images the model never saw; one sweep of a 50-step "
        "generation's timesteps, 980 to 0, plans cached as in a generation): the unmerged "
        "model's, then the increase with merging (each timestep's ratio, averaged over the range)",
        format_loss_table(rows),
        "",
    ]


def _writable(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a folder; give a file name")
    if not path.parent.exists():
        raise OutputPathError(
            f"cannot write {path}: the folder {path.parent} does not exist; create it first"
        )
    return path


def check_writable(path: str | Path) -> None:
    """Fail before a long run, not after it, when ``path`` cannot be written."""
    path = _writable(path)
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if not existed:
        path.unlink()


def write_json(result: BenchResult | Any, path: str | Path) -> None:
    """The whole result as JSON (settings, machine, model, one object per configuration)."""
    data: dict[str, Any] = result.to_json()
    _writable(path).write_text(json.dumps(data, indent=2) + "\n")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise TokenMergeError(
            "the plot needs matplotlib (a dependency of tokenmerge-bench): pip install "
            "matplotlib, or leave out the option that draws it (--plot, --samples)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_classifier_plot(result: Any, path: str | Path) -> None:
    """A PNG for a classifier run: speedup against the final features' cosine similarity to
    the unmerged model's, one point per configuration."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in result.rows:
        if row.cosine is None:
            continue
        axes.plot([row.cosine], [row.speedup], marker="o", linestyle="", label=row.label)
    xlabel = "cosine similarity of the final features to the unmerged model's (mean)"
    _finish_plot(plt, figure, axes, result, path, xlabel, "")


def write_plot(result: BenchResult, path: str | Path) -> None:
    """A PNG: speedup over no merging against block error, one point per configuration."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    groups: dict[str, list[BenchRow]] = {}
    for row in result.rows:
        if row.kind != "baseline" and row.block_error is not None:
            groups.setdefault(row.variant, []).append(row)
    for variant, rows in groups.items():
        rows.sort(key=lambda row: row.ratio)
        marker = "s" if rows[0].kind == "peer" else "o"
        axes.plot(
            [row.block_error for row in rows],
            [row.speedup for row in rows],
            marker=marker,
            label=variant,
        )
        for row in rows:
            axes.annotate(
                f"{row.ratio:g}",
                (row.block_error, row.speedup),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    _finish_plot(
        plt, figure, axes, result, path, "block error (mean over merged blocks)", "; labels: ratio"
    )


def _finish_plot(
    plt: Any, figure: Any, axes: Any, result: Any, path: str | Path, xlabel: str, note: str
) -> None:
    """The no-merging line, labels, a title naming the model and machine; write the PNG."""
    axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--", label="no merging")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("speedup over no merging")
    model, machine = result.model, result.machine
    weights = "similarity attention" if "similarity" in model["attention"] else "own weights"
    axes.set_title(
        f"{model['name']}, {model['input']}\n{machine['device']} {result.settings['dtype']}, "
        f"{weights}{note}",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(_writable(path), format="png")
    plt.close(figure)


def write_sample_grid(images: list[Any], labels: list[str], path: str) -> None:
    """A PNG grid: one row of images ``(B, 3, H, W)`` in [0, 1] per configuration, labelled."""
    plt = _pyplot()
    rows, columns = len(images), images[0].shape[0]
    figure, axes = plt.subplots(
        rows, columns, figsize=(1.2 * columns + 1.6, 1.2 * rows), squeeze=False
    )
    for row, (batch, label) in enumerate(zip(images, labels, strict=True)):
        for column in range(columns):
            axis = axes[row][column]
            axis.imshow(batch[column].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
