"""``tokenmerge compare``: the same prompts and seeds, unmerged and merged, side by side.

For every (prompt, seed) the unmerged model generates first, then each strategy at each ratio,
from the same starting noise; the images go into one grid (a row per prompt and seed, a column
per configuration), and each configuration gets its seconds per image and its distance to the
unmerged images: PSNR and SSIM (scikit-image, no weights needed), and LPIPS where the ``lpips``
package and its AlexNet weights are on disk already (nothing is downloaded). Pipelines also get
the CLIP score of every image against its prompt (how well the image still shows what was asked,
unmerged included) where a CLIP model is on disk; the digit denoisers report how many of their
digits the bundled judge recognises.

Two kinds of model:

- a diffusers text-to-image pipeline saved with ``save_pretrained`` (a local folder): prompts are
  text;
- a built-in digit denoiser (``digit-dit``, ``digit-flux``): prompts are the digits 0-9.
"""

from __future__ import annotations

import contextlib
import html
import importlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tokenmerge
from tokenmerge.errors import ConfigError, NothingMergedWarning

from .progress import Progress
from .variants import StrategyVariant

__all__ = ["CompareSettings", "DIGIT_MODELS", "compare"]

#: the built-in models compare can generate with (no download, no folder)
DIGIT_MODELS = ("digit-dit", "digit-flux")
#: what a reader sees when LPIPS cannot run, and how to turn it on
LPIPS_OFF = (
    "LPIPS: off (needs the lpips package and AlexNet's torchvision weights on disk: pip install "
    "lpips, then run it once where it can download, or copy alexnet-owt-7be5be79.pth into "
    "torch.hub.get_dir()/checkpoints)"
)
#: the CLIP model the score uses by default (the one torchmetrics' CLIPScore defaults to)
CLIP_MODEL = "openai/clip-vit-base-patch32"


@dataclass(frozen=True)
class CompareSettings:
    """What ``compare`` generates.

    Args:
        model: a digit model name (``DIGIT_MODELS``) or the folder of a diffusers pipeline.
        prompts: text prompts (pipelines) or digits ``"0"``..``"9"`` (digit models).
        seeds: one image per prompt and seed.
        variants: the strategies (with their fields), each run at every ratio.
        ratios: the ratios.
        steps: denoising steps per image.
        size: image size in px for pipelines (None: the pipeline's default).
        guidance: classifier-free guidance scale (None: the model's default).
        device: torch device.
        dtype: model dtype name (``float32``, ``float16``, ``bfloat16``).
        overrides: config fields every variant gets.
        clip_model: the CLIP model of the CLIP score (a Hugging Face name in the local cache, or
            a folder saved with ``save_pretrained``); pipelines only.
    """

    model: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    variants: tuple[StrategyVariant, ...]
    ratios: tuple[float, ...]
    steps: int = 20
    size: int | None = None
    guidance: float | None = None
    device: str = "cpu"
    dtype: str = "float32"
    overrides: dict[str, Any] = field(default_factory=dict)
    clip_model: str = CLIP_MODEL


@dataclass
class Column:
    """One configuration's images and figures (the first column is the unmerged model)."""

    label: str
    config: dict[str, Any] | None
    images: list[np.ndarray] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    lpips: list[float] = field(default_factory=list)
    clip_score: list[float] = field(default_factory=list)
    recognised: list[bool] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Medians of the timings with their spread, means of the image metrics."""
        seconds = self.seconds
        summary: dict[str, Any] = {
            "label": self.label,
            "config": self.config,
            "seconds_per_image": statistics.median(seconds),
            "seconds_min": min(seconds),
            "seconds_max": max(seconds),
        }
        for name in ("psnr", "ssim", "lpips", "clip_score"):
            values = getattr(self, name)
            finite = [v for v in values if math.isfinite(v)]
            # PSNR is infinite for an image equal to the unmerged one: the mean of the others
            summary[name] = statistics.fmean(finite) if finite else (math.inf if values else None)
        if self.recognised:
            summary["recognised"] = statistics.fmean(self.recognised)
        return summary


class _Generator:
    """Makes one image ``(H, W, 3)`` in [0, 1] for a prompt and a seed, and says what to patch."""

    target: Any

    def image(self, prompt: str, seed: int) -> np.ndarray:
        raise NotImplementedError

    def recognised(self, prompt: str, image: np.ndarray) -> bool | None:
        return None


class _PipelineGenerator(_Generator):
    def __init__(self, settings: CompareSettings, progress: bool) -> None:
        from .loading import load_model

        dtype = getattr(torch, settings.dtype)
        with _library_bars(progress):
            loaded = load_model(settings.model, dtype=dtype)
        if loaded.pipeline is None:
            raise ConfigError(
                f"--model {settings.model}: compare needs a whole diffusers pipeline (a folder "
                f"with model_index.json), not {loaded.description}"
            )
        self.target = loaded.pipeline.to(settings.device)
        self.target.set_progress_bar_config(disable=True)
        self.settings = settings

    def image(self, prompt: str, seed: int) -> np.ndarray:
        settings = self.settings
        options: dict[str, Any] = {"num_inference_steps": settings.steps, "output_type": "np"}
        if settings.size is not None:
            options.update(height=settings.size, width=settings.size)
        if settings.guidance is not None:
            options["guidance_scale"] = settings.guidance
        generator = torch.Generator(settings.device).manual_seed(seed)
        with torch.no_grad():
            images = self.target(prompt, generator=generator, **options).images
        return np.clip(np.asarray(images[0], dtype=np.float32), 0.0, 1.0)


@contextlib.contextmanager
def _library_bars(shown: bool) -> Iterator[None]:
    """diffusers' and transformers' loading bars, on or off for the duration."""
    if shown:
        yield
        return
    loggers = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:  # transformers only where the pipeline has a text encoder of its own
            loggers.append(importlib.import_module(name))
        except ImportError:
            continue
    for logger in loggers:
        logger.disable_progress_bar()
    try:
        yield
    finally:
        for logger in loggers:
            logger.enable_progress_bar()


class _DigitGenerator(_Generator):
    #: digits are 28 px: shown 4 times larger, pixel for pixel
    UPSCALE = 4

    def __init__(self, settings: CompareSettings) -> None:
        from .reference.models import load_reference

        bad = [p for p in settings.prompts if p not in [str(d) for d in range(10)]]
        if bad:
            raise ConfigError(
                f"--prompt {bad[0]!r}: the digit models take the digits 0-9 as prompts"
            )
        self.target = load_reference(
            settings.model, settings.device, getattr(torch, settings.dtype)
        )
        self.settings = settings

    def image(self, prompt: str, seed: int) -> np.ndarray:
        from .reference.digits import SIDE, sample

        settings = self.settings
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, 1, SIDE, SIDE, generator=generator)
        labels = torch.tensor([int(prompt)])
        dtype = next(self.target.parameters()).dtype
        with torch.no_grad():
            digit = sample(
                self.target,
                labels.to(settings.device),
                noise.to(settings.device, dtype),
                steps=settings.steps,
                **({} if settings.guidance is None else {"guidance": settings.guidance}),
            )
        gray = ((digit.float().clamp(-1, 1) + 1) / 2)[0, 0].cpu().numpy()
        gray = gray.repeat(self.UPSCALE, 0).repeat(self.UPSCALE, 1)
        return np.stack([gray] * 3, -1)

    def recognised(self, prompt: str, image: np.ndarray) -> bool:
        from .reference.digits import judge_digits

        gray = torch.from_numpy(image[:: self.UPSCALE, :: self.UPSCALE, 0].copy())
        return bool(judge_digits(gray[None, None] * 2 - 1)[0] == int(prompt))


def _generator(settings: CompareSettings, progress: bool) -> _Generator:
    if settings.model in DIGIT_MODELS:
        return _DigitGenerator(settings)
    return _PipelineGenerator(settings, progress)


def _lpips_metric() -> Callable[[np.ndarray, np.ndarray], float] | None:
    """LPIPS (AlexNet) when the package and its weights are on disk, else None."""
    try:
        import lpips
    except ImportError:
        return None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not weights.is_file():
        return None
    metric = lpips.LPIPS(net="alex", verbose=False).eval()

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        def tensor(image: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1

        with torch.no_grad():
            return float(metric(tensor(a), tensor(b)))

    return distance


def _clip_score_metric(name: str) -> tuple[Callable[[np.ndarray, str], float] | None, str]:
    """CLIP score (100 x the cosine of image and prompt embeddings, at least 0) with the CLIP
    model ``name`` when it is on disk, else None; and a note saying which model, or how to get
    it."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):  # not in the cache, no such folder, or not a valid name
        return None, (
            f"CLIP score: off ({name} is not on disk: run once where it can download, e.g. "
            f"CLIPModel.from_pretrained({name!r}) and CLIPProcessor.from_pretrained({name!r}), "
            "or give a saved folder with --clip-model PATH)"
        )

    def score(image: np.ndarray, prompt: str) -> float:
        pixels = (np.asarray(image) * 255).round().astype(np.uint8)
        inputs = processor(text=[prompt], images=[pixels], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
        image_embeds = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        text_embeds = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return max(100.0 * float((image_embeds * text_embeds).sum()), 0.0)

    return score, f"CLIP score: {name}"


def _psnr_ssim(reference: np.ndarray, image: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if np.array_equal(reference, image):
        return math.inf, 1.0
    psnr = peak_signal_noise_ratio(reference, image, data_range=1.0)
    # 7 x 7 windows need images of at least 7 px a side; tiny test images use what they have
    side = min(7, *reference.shape[:2]) | 1
    ssim = structural_similarity(reference, image, data_range=1.0, channel_axis=-1, win_size=side)
    return float(psnr), float(ssim)


def _timed(device: str, fn: Callable[..., np.ndarray], *args: Any) -> tuple[np.ndarray, float]:
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    synchronize()
    start = time.perf_counter()
    image = fn(*args)
    synchronize()
    return image, time.perf_counter() - start


def _configurations(settings: CompareSettings) -> Iterator[tuple[str, Any]]:
    overrides = settings.overrides
    if settings.model in DIGIT_MODELS:
        # 196 image tokens, under the diffusion adapters' default threshold of 256
        overrides = {"sites.min_tokens": 1, **overrides}
    for variant in settings.variants:
        for ratio in settings.ratios:
            yield variant.label(ratio), variant.config(ratio, overrides)


def compare(
    settings: CompareSettings, progress: bool = True
) -> tuple[list[Column], list[str], list[str]]:
    """Generate every image and measure it.

    Returns:
        The columns (unmerged first), the row labels (``prompt / seed``) and notes for the
        reader (a metric that was off, and how to turn it on).

    Raises:
        ConfigError: a bad prompt for a digit model, or a folder without a pipeline.
        ModelLoadError: the folder cannot be loaded.
    """
    with Progress(progress, "compare") as bar:
        return _compare(settings, progress, bar)


def _compare(
    settings: CompareSettings, progress: bool, bar: Progress
) -> tuple[list[Column], list[str], list[str]]:
    configs = list(_configurations(settings))  # every config validates before the model loads
    bar.phase(f"loading the model ({settings.model}, {settings.dtype} on {settings.device})")
    generator = _generator(settings, progress)
    lpips_distance = _lpips_metric()
    notes = [] if lpips_distance is not None else [LPIPS_OFF]
    clip_score = None
    if settings.model in DIGIT_MODELS:
        notes.append("CLIP score: not for the digit models (their prompts are class labels)")
    else:
        clip_score, note = _clip_score_metric(settings.clip_model)
        notes.append(note)
    columns = [Column("none", None)] + [Column(label, c.model_dump()) for label, c in configs]
    rows = [(prompt, seed) for prompt in settings.prompts for seed in settings.seeds]
    bar.start(len(rows) * len(columns) + 1, unit="image")
    bar.phase("warm-up: one image")
    generator.image(*rows[0])  # warm-up: the first call pays for allocations and caches
    bar.tick()
    bar.phase(f"generating: {len(rows)} image(s) x {len(columns)} configurations, timed")
    for prompt, seed in rows:
        reference = None
        for column, (_, config) in zip(columns, [(None, None), *configs], strict=True):
            handle = None if config is None else tokenmerge.apply(generator.target, config)
            try:
                with warnings.catch_warnings():
                    # reported below as this command's own error, with the option to fix it
                    warnings.simplefilter("ignore", NothingMergedWarning)
                    image, seconds = _timed(settings.device, generator.image, prompt, seed)
            finally:
                if handle is not None:
                    handle.remove()
            if handle is not None and not _merged_anything(handle):
                raise ConfigError(
                    f"{column.label} merged nothing in {settings.model}: every site was "
                    f"skipped or passed through ({_skip_reason(handle)}); lower the threshold "
                    "with --set sites.min_tokens=1 or choose other sites"
                )
            reference = image if reference is None else reference
            psnr, ssim = _psnr_ssim(reference, image)
            column.images.append(image)
            column.seconds.append(seconds)
            column.psnr.append(psnr)
            column.ssim.append(ssim)
            if lpips_distance is not None:
                column.lpips.append(lpips_distance(reference, image))
            if clip_score is not None:
                column.clip_score.append(clip_score(image, prompt))
            judged = generator.recognised(prompt, image)
            if judged is not None:
                column.recognised.append(judged)
            bar.tick()
    return columns, [f"{prompt} / seed {seed}" for prompt, seed in rows], notes


def _merged_anything(handle: tokenmerge.Handle) -> bool:
    return any(s.tokens_out < s.tokens_in for s in handle.stats().values())


def _skip_reason(handle: tokenmerge.Handle) -> str:
    reasons = {s.skipped or s.pass_reason for s in handle.stats().values()} - {None}
    return "; ".join(sorted(reasons)) or "no site merged a token"


# ---------------------------------------------------------------------------- outputs


#: the columns of the text table and the HTML table
HEADER = ("config", "s / image", "min-max", "PSNR dB", "SSIM", "LPIPS", "CLIP", "recognised")


def _cells(column: Column) -> list[str]:
    s = column.summary()
    return [
        s["label"],
        f"{s['seconds_per_image']:.3f}",
        f"{s['seconds_min']:.3f}-{s['seconds_max']:.3f}",
        _number(s["psnr"], ".2f"),
        _number(s["ssim"], ".4f"),
        _number(s["lpips"], ".4f"),
        _number(s["clip_score"], ".2f"),
        _number(s.get("recognised"), ".0%"),
    ]


def format_table(columns: list[Column]) -> str:
    """The per-configuration figures as an aligned text table."""
    rows = [list(HEADER), *(_cells(column) for column in columns)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _number(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, fmt)


def write_outputs(
    settings: CompareSettings,
    columns: list[Column],
    rows: list[str],
    notes: list[str],
    folder: Path,
) -> list[Path]:
    """``grid.png``, ``index.html`` and ``results.json`` in ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    grid, page, data = folder / "grid.png", folder / "index.html", folder / "results.json"
    _write_grid(columns, rows, grid)
    summaries = [column.summary() for column in columns]
    payload = {
        "settings": {
            **asdict(settings),
            "variants": [v.name for v in settings.variants],
        },
        "rows": rows,
        "notes": notes,
        "configurations": summaries,
    }
    data.write_text(json.dumps(_json_value(payload), indent=2, default=str) + "\n")
    page.write_text(_html(settings, columns, notes, grid.name))
    return [grid, page, data]


def _json_value(value: Any) -> Any:
    """What JSON cannot hold: an infinite PSNR (an image equal to the unmerged one) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _write_grid(columns: list[Column], rows: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    size = 2.2
    figure, axes = plt.subplots(
        len(rows), len(columns), figsize=(size * len(columns), size * len(rows) + 0.4),
        squeeze=False,
    )  # fmt: skip
    for c, column in enumerate(columns):
        for r, image in enumerate(column.images):
            axis = axes[r][c]
            axis.imshow(image, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(column.label, fontsize=9)
            if c == 0:
                axis.set_ylabel(rows[r], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _html(settings: CompareSettings, columns: list[Column], notes: list[str], grid: str) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = [
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in _cells(column)) + "</tr>"
        for column in columns
    ]
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    title = f"tokenmerge compare: {html.escape(settings.model)}"
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>{title}</h1>"
        f"<p>{len(settings.prompts)} prompt(s) x {len(settings.seeds)} seed(s), "
        f"{settings.steps} steps, on {html.escape(settings.device)} ({settings.dtype}). "
        "PSNR, SSIM and LPIPS compare each image with the unmerged model's image of the same "
        "prompt and seed; the CLIP score, each image with its prompt.</p>"
        f"<table><tr>{cells}</tr>{''.join(body)}</table>"
        + (f"<ul>{note_items}</ul>" if notes else "")
        + f"<p><img src='{html.escape(grid)}' alt='image grid: a row per prompt and seed, a "
        "column per configuration'></p></body></html>\n"
    )
