"""``tokenmerge bench`` on image classifiers (vision transformers): throughput and fidelity.

Every configuration (no merging, each strategy variant) gets its own copy of the model's
modules sharing one set of weights, so they run side by side in one process:

1. **Timed rounds**: one batch of photographs per round; configurations alternate in a rotating
   order and the first round only warms up. Throughput = batch / median seconds; speedup =
   median seconds without merging / median with.
2. **Fidelity** on the same photographs: the cosine similarity of every image's final features
   (the pre-logits: the pooled class token, or the average of the tokens for average-pooling
   models) to the unmerged model's, and how often the top-1 class agrees.

The reference classifier (``--model reference-vit``, trained here) is measured on its held-out
crops instead: the timed batch is the first ``batch`` of them, and fidelity covers all 494, with
held-out top-1 accuracy against their labels next to the agreement.

Merging is ToMe's setting unless asked otherwise: ``r`` tokens merged per block (13 for the
ViT-B presets), for every strategy, so every strategy ends each block with the same number of
tokens. The photographs are crops of the bundled ones (``tokenmerge_bench.photos``) at several
scales and places, flipped every other time, resized to the model's input size and normalised as
it expects.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmerge import __version__
from tokenmerge.api import Handle, apply
from tokenmerge.errors import InputError, UnsupportedModelError
from tokenmerge_bench.photos import PHOTOS, load_photo

from .presets import CLASSIFIER_LIBRARIES, PRESETS, get_preset
from .progress import Progress
from .runner import _machine, load_bench_model, sharing_weights
from .timing import spread, synchronizer, timed
from .variants import parse_variants

__all__ = [
    "ClassifierResult",
    "ClassifierRow",
    "ClassifierSettings",
    "format_classifier_report",
    "is_classifier_source",
    "photo_batch",
    "run_classifier_bench",
]

#: ImageNet normalisation, timm's and transformers' ViT default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_classifier_source(model: str) -> bool:
    """Whether ``--model`` names a classifier: a timm / transformers preset, or a local folder
    saved by timm or transformers (not diffusers)."""
    if model in PRESETS:
        return get_preset(model).library in CLASSIFIER_LIBRARIES
    config = Path(model) / "config.json"
    if not config.is_file() or (Path(model) / "model_index.json").exists():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return "_class_name" not in data and ("architecture" in data or "model_type" in data)


@dataclass
class ClassifierSettings:
    """What one classifier run measures.

    Example:
        >>> settings = ClassifierSettings(
        ...     model="tiny-vit", strategies=["tome"], rounds=1, batch=2
        ... )
        >>> result = run_classifier_bench(settings, progress=False)
        >>> [row.label for row in result.rows], result.rows[1].tokens
        (['none', 'tome r=12'], '65->17')
    """

    model: str = "vit-b-16"
    # strategy variants, NAME[:KEY=VALUE[,KEY=VALUE...]] (see tokenmerge_bench.variants)
    strategies: list[str] = field(default_factory=lambda: ["tome", "retom", "random"])
    # tokens merged per block, one row per value (None: the preset's, ToMe's setting); ignored
    # when ratios are set
    r: int | list[int] | None = None
    ratios: list[float] | None = None
    batch: int = 32
    rounds: int = 5
    size: int | None = None
    attention: Literal["similarity", "as-loaded"] | None = None
    similarity_scale: float = 3.0
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    # run every configuration through torch.compile (the warm-up round compiles)
    compile: bool = False


@dataclass
class ClassifierRow:
    """One configuration's figures."""

    label: str
    kind: Literal["baseline", "tokenmerge"]
    strategy: str
    variant: str
    config: dict[str, Any] | None
    tokens: str  # tokens entering the first block -> leaving the last merging block
    seconds: float  # median seconds per batch
    images_per_second: float
    speedup: float
    seconds_samples: list[float]
    seconds_min: float  # the fastest and slowest timed round: the spread around the median
    seconds_max: float
    cosine: float | None  # mean cosine similarity of the final features to the unmerged ones
    cosine_min: float | None
    top1_agreement: float | None  # share of images whose top-1 class is the unmerged one's
    held_out_top1: float | None = None  # reference classifier: accuracy on its held-out crops


@dataclass
class ClassifierResult:
    """Everything one classifier run measured (``to_json`` gives the JSON)."""

    tokenmerge_version: str
    model: dict[str, Any]
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[ClassifierRow]
    run_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def photo_batch(
    batch: int,
    size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Tensor:
    """``batch`` distinct natural images ``(batch, 3, size, size)``, normalised: crops of the
    bundled photographs at several scales and places, every other one flipped.

    Example:
        >>> photo_batch(4, 32).shape
        torch.Size([4, 3, 32, 32])
    """
    images = []
    for index in range(batch):
        photo = load_photo(PHOTOS[index % len(PHOTOS)]).float() / 255.0
        round_ = index // len(PHOTOS)
        side = int(256 * (1.0 - 0.08 * (round_ % 6)))  # 100 % down to 60 % of the photo
        spare = 256 - side
        top = (round_ * 37) % (spare + 1)
        left = (round_ * 53) % (spare + 1)
        crop = photo[:, top : top + side, left : left + side]
        if round_ % 2:
            crop = crop.flip(-1)
        images.append(F.interpolate(crop[None], size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False)[0])  # fmt: skip
    pixels = torch.stack(images)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _forward(model: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
    """The final features (pre-logits) and the logits (None for a model without a head)."""
    if hasattr(model, "forward_head"):  # timm
        features = model.forward_head(model.forward_features(pixels), pre_logits=True)
        return features, model.get_classifier()(features)
    output = model(pixel_values=pixels)
    logits = getattr(output, "logits", None)
    pooled = getattr(output, "pooler_output", None)
    features = pooled if pooled is not None else output.last_hidden_state[:, 0]
    return features, logits


def _own_code(function: Any, index: int) -> Any:
    """A copy of ``function`` with a code object of its own. torch.compile caches graphs per
    code object and, by default, does not guard on module hooks: the configurations, copies of
    one model that differ only in their hooks, would otherwise all run the first one's graph
    (turning the hook guards on instead crashed torch 2.11's dynamo)."""
    code = function.__code__.replace(co_name=f"{function.__name__}_{index}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__)


def _load(settings: ClassifierSettings, device: torch.device, dtype: torch.dtype) -> tuple:
    """The model, its description, and the ``r`` of the preset (ToMe's 13 for a checkpoint)."""
    model, info, _ = load_bench_model(settings, device, dtype)
    r = get_preset(settings.model).default_r if settings.model in PRESETS else 13
    return model, info, r


def _input_size(model: nn.Module, settings: ClassifierSettings) -> int:
    if settings.size is not None:
        return settings.size
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm
    if img_size is not None:
        return int(img_size[-1])
    image_size = getattr(getattr(model, "config", None), "image_size", None)
    if image_size is None:
        vision = getattr(getattr(model, "config", None), "vision_config", None)
        image_size = getattr(vision, "image_size", None)
    if image_size is None:
        raise UnsupportedModelError(
            f"cannot tell the input size of {type(model).__name__}; pass --size"
        )
    return int(image_size)


def _check_input_size(model: nn.Module, size: int) -> None:
    """Raise ``InputError`` for a ``--size`` the classifier cannot take: not a whole number of
    patches, or another size than the one a fixed position table was made for."""
    embed = getattr(model, "patch_embed", None)  # timm
    if embed is not None:
        patch = int(embed.patch_size[-1])
        fixed = getattr(embed, "strict_img_size", False) and embed.img_size is not None
        native = int(embed.img_size[-1]) if embed.img_size is not None else None
    else:  # transformers: interpolating the position table is not what the bench measures
        config = getattr(model, "config", None)
        config = getattr(config, "vision_config", config)
        patch = int(getattr(config, "patch_size", 1))
        native = getattr(config, "image_size", None)
        fixed = native is not None
    name = type(model).__name__
    if fixed and size != native:
        raise InputError(
            f"--size {size}: {name} takes {native} x {native} px images only (its position "
            f"table is made for that size); leave --size out, or give --size {native}"
        )
    if size % patch or size < patch:
        raise InputError(
            f"--size {size}: {name} cuts images into {patch} x {patch} px patches, so the size "
            f"must be a multiple of {patch}; e.g. --size {max(patch, size - size % patch)}"
        )


def run_classifier_bench(settings: ClassifierSettings, progress: bool = True) -> ClassifierResult:
    """Run the classifier benchmark ``settings`` describe (see the module docstring)."""
    started = time.perf_counter()
    with Progress(progress) as bar:
        return _run_classifier_bench(settings, started, bar)


def _run_classifier_bench(
    settings: ClassifierSettings, started: float, bar: Progress
) -> ClassifierResult:
    device = torch.device(settings.device)
    dtype = getattr(torch, settings.dtype)
    bar.phase(f"building the model ({settings.model}, {settings.dtype} on {settings.device})")
    model, info, default_r = _load(settings, device, dtype)
    bar.phase("preparing the images and the configurations")
    size = _input_size(model, settings)
    reference = get_preset(settings.model).reference if settings.model in PRESETS else None
    if settings.size is not None and reference != "classifier":  # that one has its own rule
        _check_input_size(model, size)
    labels = None
    if reference == "classifier":
        from tokenmerge_bench.reference.data import (
            CLASSIFIER_CROP,
            classifier_held_out,
            load_photo_set,
        )

        if size != CLASSIFIER_CROP:
            raise UnsupportedModelError(
                f"the reference classifier is measured on its {CLASSIFIER_CROP} px held-out "
                f"crops, not at {size} px; leave --size out"
            )
        crops, labels = classifier_held_out(load_photo_set())
        crops = crops.to(device, dtype)
        pixels = crops[: settings.batch]
        info["input"] = (
            f"timing: {len(pixels)} held-out crops of {size} x {size} px; fidelity and "
            f"accuracy: all {len(crops)} held-out crops"
        )
    else:
        pixels = photo_batch(settings.batch, size).to(device, dtype)
        crops = pixels
        info["input"] = f"{settings.batch} photographs of {size} x {size} px"
    entries = [("none", "baseline", "none", "none", model, None)]
    rs = settings.r if isinstance(settings.r, list) else [settings.r]
    rs = [default_r if r is None else r for r in rs]
    ratios = settings.ratios or [0.0]
    for r in rs if settings.ratios is None else [None]:
        overrides = dict(settings.overrides)
        if r is not None:
            overrides.setdefault("r", r)
        for variant in parse_variants(settings.strategies, ratios, overrides):
            for ratio in ratios:
                config = variant.config(ratio, overrides)
                clone = sharing_weights(model)
                handle = apply(clone, config)
                label = variant.name + (f" {ratio:g}" if config.r is None else f" r={config.r}")
                entries.append((label, "tokenmerge", variant.strategy, variant.name, clone, handle))
    calls = {}
    for index, (label, *_, clone, _handle) in enumerate(entries):
        if settings.compile:
            calls[label] = torch.compile(functools.partial(_own_code(_forward, index), clone))
        else:
            calls[label] = functools.partial(_forward, clone)
    sync = synchronizer(device)
    bar.start((settings.rounds + 2) * len(entries))
    seconds: dict[str, list[float]] = {entry[0]: [] for entry in entries}
    outputs: dict[str, tuple[Tensor, Tensor | None]] = {}
    with torch.no_grad():
        for index in range(settings.rounds + 1):  # round 0 warms up
            if index <= 1:
                bar.phase(
                    f"timed rounds: {settings.rounds} of {len(entries)} configurations"
                    if index
                    else f"warm-up: 1 round of {len(entries)} configurations"
                    + (", compiling each" if settings.compile else "")
                )
            shift = index % len(entries)
            for label, *_ in entries[shift:] + entries[:shift]:
                elapsed, _ = timed(functools.partial(calls[label], pixels), sync)
                if index:
                    seconds[label].append(elapsed)
                bar.tick()
        bar.phase(f"fidelity: {len(crops)} images, {len(entries)} configurations")
        for label, *_ in entries:
            parts = [
                calls[label](crops[start : start + settings.batch])
                for start in range(0, len(crops), settings.batch)
            ]
            outputs[label] = _joined(parts)
            bar.tick()
    base_seconds = statistics.median(seconds["none"])
    base_features, base_logits = outputs["none"]
    rows = []
    for label, kind, strategy, variant, _clone, handle in entries:
        median = statistics.median(seconds[label])
        features, logits = outputs[label]
        cosine = F.cosine_similarity(features.float(), base_features.float(), dim=-1)
        agreement = None
        if logits is not None and base_logits is not None:
            agreement = (logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item()
        merged = handle is not None
        rows.append(
            ClassifierRow(
                label=label,
                kind=kind,
                strategy=strategy,
                variant=variant,
                config=handle.config.model_dump(mode="json") if merged else None,
                tokens=_tokens(handle) if merged else "-",
                seconds=median,
                images_per_second=settings.batch / median,
                speedup=base_seconds / median,
                seconds_samples=seconds[label],
                seconds_min=min(seconds[label]),
                seconds_max=max(seconds[label]),
                cosine=cosine.mean().item() if merged else None,
                cosine_min=cosine.min().item() if merged else None,
                top1_agreement=agreement if merged else None,
                held_out_top1=(
                    None
                    if labels is None
                    else float((logits.argmax(-1).cpu() == labels).float().mean())
                ),
            )
        )
    return ClassifierResult(
        tokenmerge_version=__version__,
        model=info,
        machine=_machine(device),
        settings={**asdict(settings), "size": size, "r": rs if settings.ratios is None else None},
        rows=rows,
        run_seconds=time.perf_counter() - started,
    )


def _joined(parts: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
    """Features and logits of several batches, concatenated."""
    features = torch.cat([part[0] for part in parts])
    logits = None if parts[0][1] is None else torch.cat([part[1] for part in parts])
    return features, logits


def _tokens(handle: Handle) -> str:
    stats = list(handle.stats().values())
    return f"{stats[0].tokens_in}->{stats[-1].tokens_out}"


def format_classifier_report(result: ClassifierResult) -> str:
    """The text table ``tokenmerge bench`` prints for a classifier."""
    model, machine, settings = result.model, result.machine, result.settings
    lines = [
        f"tokenmerge {result.tokenmerge_version} bench: {model['description']}",
        f"  model: {model['class']} ({model['source']}); {model['attention']}",
        f"  input: {model['input']}; {machine['device']} {settings['dtype']}, torch "
        f"{machine['torch']}, {machine['threads']} threads; {settings['rounds']} timed rounds "
        f"(medians, min-max in brackets){'; torch.compile' if settings.get('compile') else ''}",
    ]
    if model.get("notes"):
        lines.append(f"  notes: {model['notes']}")
    lines.append("")
    accuracy = result.rows[0].held_out_top1 is not None
    # a column as wide as the longest label (variants such as 'retom+scope="window" r=8')
    width = max(22, 2 + max(len(row.label) for row in result.rows))
    times = [spread(row.seconds, row.seconds_min, row.seconds_max) for row in result.rows]
    time_width = 2 + max(len("s/batch (min-max)"), *(len(cell) for cell in times))
    header = (
        f"{'config':<{width}}{'tokens':>10}{'s/batch (min-max)':>{time_width}}{'img/s':>9}"
        f"{'speedup':>9}"
        f"{'cos mean':>10}{'cos min':>10}{'top-1 agr':>11}"
    ) + (f"{'held-out top-1':>16}" if accuracy else "")
    lines += [header, "-" * len(header)]
    for row, time_cell in zip(result.rows, times, strict=True):
        cells = [
            f"{row.label:<{width}}",
            f"{row.tokens:>10}",
            f"{time_cell:>{time_width}}",
            f"{row.images_per_second:>9.1f}",
            f"{'x' + format(row.speedup, '.3f'):>9}",
            f"{_number(row.cosine, '.6f'):>10}",
            f"{_number(row.cosine_min, '.6f'):>10}",
            f"{_number(row.top1_agreement, '.3f'):>11}",
        ]
        if accuracy:
            cells.append(f"{_number(row.held_out_top1, '.3f'):>16}")
        lines.append("".join(cells))
    lines.append("")
    lines.append(f"run time {result.run_seconds:.0f} s")
    return "\n".join(lines)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
