"""The ``tokenmerge bench``, ``compare`` and ``visualize`` commands: a command plugin.

Registered with the core's ``tokenmerge`` command through the ``tokenmerge_register_commands``
hook (entry-point group ``tokenmerge.commands``, see this distribution's pyproject.toml). This
module only parses and checks arguments, so ``tokenmerge --help`` stays cheap: it imports no
torch (nor the registry, diffusers, matplotlib...) at import time or in the ``configure``
functions; the checks and the bench's machinery are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenmerge.cli import Command, Listing, UsageError
from tokenmerge.hookspecs import hookimpl

# without torch (tests/test_cli.py checks it): names for --help. The registry, the configs and
# the runners are imported by the command that runs.
from .photos import PHOTOS
from .presets import PRESETS

__all__ = ["tokenmerge_register_commands"]


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio {text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"ratio {value:g} is out of range: a ratio is the fraction of tokens merged, "
            "0 <= ratio < 1 (e.g. 0.5)"
        )
    return value


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


_positive = _whole_number(1)
_non_negative = _whole_number(0)


def _timestep(text: str) -> int:
    value = _non_negative(text)
    if value >= 1000:
        raise argparse.ArgumentTypeError(
            f"timestep {value} is out of range: the models are trained on timesteps 0..999"
        )
    return value


#: config fields that have options of their own: ``--set`` refuses them rather than let one
#: of the two win silently
_OWN_OPTION = {
    "ratio": "--ratios (every strategy runs at each ratio given)",
    "strategy": "--strategies",
}


def _setting(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"--set {text!r} is not KEY=VALUE (e.g. --set cache_interval=1)"
        )
    if key.strip() in _OWN_OPTION:
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: {key.strip()} has an option of its own; give it with "
            f"{_OWN_OPTION[key.strip()]}, e.g. {_own_option_example(key.strip(), raw)}"
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word is a string
    return key, value


def _own_option_example(key: str, raw: str) -> str:
    return f"--ratios {raw or '0.5'}" if key == "ratio" else f"--strategies {raw or 'tome'}"


def _scale(text: str) -> float:
    """An argparse type: a finite positive number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite positive number (e.g. 3: the tied query / key "
            "projections are scaled by it)"
        )
    return value


def _path(text: str) -> str:
    """An argparse type: a file path, never empty (an empty one would write nothing)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty; give a file name (e.g. results.json)")
    return text


def _check_device(name: str) -> None:
    """``--device`` names a torch device this machine has (torch imported at run time only)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(
            f"--device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "meta":
        raise UsageError("--device meta holds no data and cannot run a model; use cpu or cuda")
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if device.type == "mps":
        backend = torch.backends.mps
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise UsageError(
            f"--device {name}: no {device.type} device is available on this machine "
            f"(torch.{'backends.mps' if device.type == 'mps' else device.type}.is_available() "
            "is False); use --device cpu"
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise UsageError(
            f"--device {name}: this machine has {count()} {device.type} device(s), numbered "
            f"from 0; use --device {device.type}:0"
        )


def _add_common_model_options(parser: argparse.ArgumentParser, presets: dict[str, Any]) -> None:
    parser.add_argument(
        "--model",
        default="sd15",
        help=f"a preset ({', '.join(presets)}; default sd15) or the path of a local diffusers "
        "checkpoint (a pipeline or model folder saved with save_pretrained)",
    )
    parser.add_argument("--size", type=_positive, help="image size in px (default: the model's)")
    parser.add_argument(
        "--attention",
        choices=["similarity", "as-loaded"],
        help="self-attention weights: 'similarity' ties each key projection to its query "
        "projection (random weights attend almost uniformly, hiding what merging loses); "
        "default: similarity for presets, as-loaded for checkpoints",
    )
    parser.add_argument(
        "--similarity-scale",
        type=_scale,
        default=3.0,
        help="scale of the tied projections (default 3: about 2.5 nats of attention entropy "
        "on SD 1.5)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
        help="model dtype (default float32)",
    )  # fmt: skip
    parser.add_argument("--seed", type=_non_negative, default=0, help="seed (default 0)")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a merge-config field for every strategy, e.g. --set cache_interval=1 "
        "--set 'sites.levels=[1,2]' (values are JSON; a dotted key sets a field of sites; "
        "repeatable)",
    )


def _configure_bench(bench: argparse.ArgumentParser) -> None:
    _add_common_model_options(bench, PRESETS)
    bench.add_argument(
        "--strategies", nargs="+", default=None, metavar="NAME[:KEY=VALUE,...]",
        help="strategies, each optionally with config fields of its own, one row per variant "
        "and ratio: e.g. tome retom retom:sites.mlp=true (values are JSON, applied on top of "
        "--set; default: every registered strategy)",
    )  # fmt: skip
    bench.add_argument(
        "--ratios", nargs="+", type=_ratio, default=None, metavar="R",
        help="ratios, 0 <= r < 1 (default 0.5; for a classifier the default is ToMe's r "
        "tokens per block, see --r)",
    )  # fmt: skip
    bench.add_argument(
        "--peer",
        choices=["auto", "tomesd", "none"],
        default="auto",
        help="peers run side by side: 'auto' (default) adds tomesd when it is installed and "
        "the model is a UNet; 'tomesd' requires it (and a UNet); 'none' runs tokenmerge only",
    )
    bench.add_argument(
        "--batch", type=_positive, default=None,
        help="batch size (default 1; 32 for a classifier)",
    )  # fmt: skip
    bench.add_argument(
        "--rounds", type=_positive, default=None,
        help="timed rounds per configuration (default 3; 5 for a classifier)",
    )  # fmt: skip
    bench.add_argument(
        "--r", type=_non_negative, nargs="+", default=None, dest="r",
        help="classifiers (ViTs): tokens merged per block by every strategy (one row per value "
        "given), so all end each "
        "block with the same token count (default: the preset's, 13 for ViT-B/16 as ToMe)",
    )  # fmt: skip
    bench.add_argument(
        "--photos", nargs="+", default=None, metavar="NAME",
        help=f"photographs the fidelity inputs are made from ({', '.join(PHOTOS)}; default "
        f"{PHOTOS[0]}; the reference denoiser takes the names of its own set and defaults to "
        "the three it never saw)",
    )  # fmt: skip
    bench.add_argument(
        "--timesteps", nargs="+", type=_timestep, default=None, metavar="T",
        help="diffusion timesteps the photographs are noised to, 0..999 (for the "
        "flow-matching SD3 and FLUX.1: noise level t / 1000; default 900 500 100)",
    )  # fmt: skip
    bench.add_argument(
        "--trajectory-steps", type=_positive, default=None,
        help="steps of the sampling trajectory (DDIM, or Euler for flow-matching models; "
        "default 4, 20 for the reference denoiser)",
    )  # fmt: skip
    bench.add_argument(
        "--samples", metavar="PATH", type=_path,
        help="reference denoiser: save the trajectories' final images here as a PNG grid, a "
        "row per configuration under the unmerged one (use --batch for more samples)",
    )  # fmt: skip
    bench.add_argument("--json", metavar="PATH", type=_path, help="write the results as JSON here")
    bench.add_argument(
        "--plot",
        metavar="PATH",
        type=_path,
        help="draw speedup against block error (a classifier: against the cosine) as a PNG "
        "here; without it no plot is drawn (the bench writes no file unless asked)",
    )
    # the old way to skip the plot, now the default: accepted, and does nothing
    bench.add_argument("--no-plot", action="store_true", help=argparse.SUPPRESS)
    bench.add_argument(
        "--compile", action="store_true",
        help="run every configuration through torch.compile, no merging included (warm-up "
        "rounds compile; diffusion models: the timed rounds only, fidelity runs eager); on a "
        "GPU this removes the hooks' host overhead",
    )  # fmt: skip
    bench.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress on stderr (each phase's start with the elapsed seconds, and a bar)",
    )


def _configure_visualize(visualize: argparse.ArgumentParser) -> None:
    _add_common_model_options(visualize, _denoisers())
    visualize.add_argument(
        "--strategies", nargs="+", default=None, metavar="NAME",
        help="strategies (default: every registered one)",
    )  # fmt: skip
    visualize.add_argument("--ratio", type=_ratio, default=0.5, help="ratio (default 0.5)")
    visualize.add_argument(
        "--photo", choices=PHOTOS, default=PHOTOS[0], help=f"photograph (default {PHOTOS[0]})"
    )
    visualize.add_argument(
        "--site", help="the site to draw (default: the first site the adapter selects)"
    )
    visualize.add_argument(
        "--timestep", type=_non_negative, default=500, help="noise timestep (default 500)"
    )
    visualize.add_argument(
        "--output", "-o", type=_path, default="tokenmerge-merges.png", metavar="PATH",
        help="the PNG to write, the command's product (default: tokenmerge-merges.png in the "
        "current folder)",
    )  # fmt: skip


def _check_strategies(names: Sequence[str] | None) -> list[str]:
    from tokenmerge.registry import list_strategies, registry

    if names is None:  # the built-ins in the order the report reads best, then plugins
        known = list_strategies()
        first = [name for name in ("retom", "tome", "random") if name in known]
        return first + [name for name in known if name not in first]
    for name in names:
        registry.strategy(name)  # unknown names raise, listing the known ones
    return list(names)


def _check_configs(strategies: list[str], ratios: list[float], overrides: dict) -> None:
    """Every (strategy, ratio) validates before anything long starts."""
    from tokenmerge.load import load_config

    from .variants import nested

    for strategy in strategies:
        for ratio in ratios:
            load_config(strategy, ratio=ratio, **nested(overrides))


def _check_peer(peer: str, model: str) -> None:
    """``--peer tomesd`` needs tomesd installed and, for a preset, a UNet (a checkpoint's class
    is checked once it is loaded)."""
    from .peers import PEERS, peer_available

    if peer not in PEERS:
        return
    if not peer_available(peer):
        raise UsageError(f"--peer {peer}: {peer} is not installed; pip install tomesd==0.1.3")
    preset = PRESETS.get(model)
    if preset is not None and preset.model_class != "UNet2DConditionModel":
        raise UsageError(
            f"--peer {peer}: {PEERS[peer].scope}, and preset {model!r} is a "
            f"{preset.model_class}; use --peer none (or auto, which adds peers only where they "
            "apply)"
        )


def _denoisers() -> dict[str, Any]:
    """The presets ``visualize`` draws on: the denoisers (it refuses the classifiers)."""
    return {name: preset for name, preset in PRESETS.items() if not preset.classifier}


def _check_model(model: str, presets: dict[str, Any] = PRESETS) -> None:
    """``--model`` is one of ``presets`` or an existing path."""
    if model in presets or Path(model).exists():
        return
    if model in PRESETS:  # a preset this command does not take
        raise UsageError(
            f"--model {model}: an image classifier, and tokenmerge visualize draws on denoisers; "
            f"give one of {', '.join(presets)} (tokenmerge bench --model {model} measures it)"
        )
    if "/" in model or "\\" in model or model.startswith("."):
        raise UsageError(
            f"--model {model}: no such file or folder; give a preset "
            f"({', '.join(presets)}) or the folder of a local checkpoint"
        )
    from tokenmerge.errors import unknown_name_message

    raise UsageError(
        unknown_name_message(
            "preset", model, presets, hint="Or pass --model PATH to a local checkpoint."
        )
    )


#: bench options that only diffusion models take, with their defaults there
_DIFFUSION_ONLY = {
    "photos": None,  # the workload's: astronaut, or the reference denoiser's held-out ones
    "timesteps": [900, 500, 100],
    "trajectory_steps": 4,
    "samples": None,
}


def _run_bench(args: argparse.Namespace) -> int:
    from . import report
    from .classify import is_classifier_source
    from .presets import get_preset
    from .runner import BenchSettings, run_bench
    from .variants import parse_variants

    if is_classifier_source(args.model):
        return _run_classifier_bench(args)
    if args.r is not None:
        raise UsageError(
            "--r sets tokens per block for classifiers (ViTs); for a diffusion model give "
            "--ratios, or --set r=N to merge N tokens at every site"
        )
    reference = get_preset(args.model).reference if args.model in PRESETS else None
    if reference == "denoiser" and args.trajectory_steps is None:
        args.trajectory_steps = 20  # enough steps for the samples to be images
    for name, default in _DIFFUSION_ONLY.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    _check_photos(args.photos, reference)
    if args.samples and reference != "denoiser":
        raise UsageError(
            "--samples saves images of the reference denoiser only (--model reference-denoiser), "
            "whose inputs are pixels; leave it out"
        )
    args.ratios = args.ratios or [0.5]
    args.batch = args.batch or 1
    args.rounds = args.rounds or 3
    overrides = dict(args.overrides)
    if args.strategies is None:
        strategies = _check_strategies(None)
        _check_configs(strategies, args.ratios, overrides)
    else:
        strategies = list(args.strategies)
        parse_variants(strategies, args.ratios, overrides)  # raises on a bad spec, one line
    _check_model(args.model)
    _check_peer(args.peer, args.model)
    _check_device(args.device)
    for path in [args.json, args.plot]:
        if path:
            report.check_writable(path)
    settings = BenchSettings(
        model=args.model,
        strategies=strategies,
        ratios=list(args.ratios),
        peers={"auto": None, "none": [], "tomesd": ["tomesd"]}[args.peer],
        size=args.size,
        batch=args.batch,
        rounds=args.rounds,
        photos=list(args.photos) if args.photos else None,
        timesteps=list(args.timesteps),
        trajectory_steps=args.trajectory_steps,
        samples=args.samples,
        attention=args.attention,
        similarity_scale=args.similarity_scale,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        overrides=overrides,
        compile=args.compile,
    )
    result = run_bench(settings, progress=not args.no_progress)
    return _write_results(args, result, report.format_report, report.write_plot)


def _write_results(args: argparse.Namespace, result: Any, format_report: Any, plot: Any) -> int:
    """Print the table, then write the JSON and the plot where asked."""
    from . import report

    print(format_report(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _check_photos(photos: list[str] | None, reference: str | None) -> None:
    from .reference.data import REFERENCE_PHOTOS

    allowed = [name for name, _ in REFERENCE_PHOTOS] if reference == "denoiser" else PHOTOS
    unknown = [name for name in photos or [] if name not in allowed]
    if unknown:
        raise UsageError(
            f"unknown photograph {unknown[0]!r} for this model; --photos takes {', '.join(allowed)}"
        )


def _run_classifier_bench(args: argparse.Namespace) -> int:
    from . import report
    from .classify import (
        ClassifierSettings,
        format_classifier_report,
        run_classifier_bench,
    )
    from .variants import parse_variants

    given = [f"--{n.replace('_', '-')}" for n in _DIFFUSION_ONLY if getattr(args, n) is not None]
    if args.peer == "tomesd":
        given.append("--peer tomesd")
    if given:
        raise UsageError(
            f"{', '.join(given)} apply to diffusion models only; {args.model} is an image "
            "classifier (its bench times batches of photographs and compares final features)"
        )
    overrides = dict(args.overrides)
    strategies = list(args.strategies) if args.strategies else _check_strategies(None)
    if args.ratios is not None:
        parse_variants(strategies, args.ratios, overrides)  # raises on a bad spec, one line
    _check_device(args.device)
    for path in [args.json, args.plot]:
        if path:
            report.check_writable(path)
    settings = ClassifierSettings(
        model=args.model,
        strategies=strategies,
        r=args.r,
        ratios=list(args.ratios) if args.ratios else None,
        batch=args.batch or 32,
        rounds=args.rounds or 5,
        size=args.size,
        attention=args.attention,
        similarity_scale=args.similarity_scale,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        overrides=overrides,
        compile=args.compile,
    )
    result = run_classifier_bench(settings, progress=not args.no_progress)
    return _write_results(args, result, format_classifier_report, report.write_classifier_plot)


def _run_visualize(args: argparse.Namespace) -> int:
    from .report import check_writable
    from .visualize import visualize

    strategies = _check_strategies(args.strategies)
    overrides = dict(args.overrides)
    _check_configs(strategies, [args.ratio], overrides)
    _check_model(args.model, _denoisers())
    _check_device(args.device)
    check_writable(args.output)
    summary = visualize(
        model=args.model,
        strategies=strategies,
        ratio=args.ratio,
        photo=args.photo,
        site=args.site,
        timestep=args.timestep,
        output=args.output,
        size=args.size,
        attention=args.attention,
        similarity_scale=args.similarity_scale,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        overrides=overrides,
    )
    print(summary)
    print(f"wrote {args.output}")
    return 0


#: prompts when none are given: two scenes for pipelines, two digits for the digit models
_DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a red apple on a wooden table")
_DEFAULT_DIGITS = ("3", "7")


def _configure_compare(compare: argparse.ArgumentParser) -> None:
    compare.add_argument(
        "--model", default="digit-dit",
        help="the folder of a diffusers text-to-image pipeline (saved with save_pretrained), "
        "or a built-in digit denoiser: digit-dit or digit-flux (default digit-dit)",
    )  # fmt: skip
    compare.add_argument(
        "--prompt", dest="prompts", action="append", metavar="TEXT",
        help="a prompt (repeatable); the digit models take the digits 0-9 (default: two "
        "scenes, or the digits 3 and 7)",
    )  # fmt: skip
    compare.add_argument(
        "--seeds", nargs="+", type=_non_negative, default=[0, 1],
        help="one image per prompt and seed (default 0 1)",
    )  # fmt: skip
    compare.add_argument(
        "--strategies", nargs="+", default=["retom", "tome"], metavar="NAME[:KEY=VALUE,...]",
        help="strategies, each optionally with config fields of its own (default retom tome)",
    )  # fmt: skip
    compare.add_argument(
        "--ratios", nargs="+", type=_ratio, default=[0.5], metavar="R",
        help="ratios, 0 <= r < 1 (default 0.5)",
    )  # fmt: skip
    compare.add_argument(
        "--steps", type=_positive, default=20, help="denoising steps per image (default 20)"
    )
    compare.add_argument("--size", type=_positive, help="image size in px (pipelines)")
    compare.add_argument("--guidance", type=float, help="guidance scale (default: the model's own)")
    compare.add_argument("--device", default="cpu", help="torch device (default cpu)")
    compare.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
        help="model dtype (default float32)",
    )  # fmt: skip
    compare.add_argument(
        "--set", dest="overrides", type=_setting, action="append", default=[],
        metavar="KEY=VALUE", help="a merge-config field for every strategy (repeatable)",
    )  # fmt: skip
    compare.add_argument(
        "--output", "-o", type=_path, default="tokenmerge-compare", metavar="FOLDER",
        help="the folder the command's product goes to, created if missing: grid.png, "
        "index.html and results.json (default: tokenmerge-compare in the current folder)",
    )  # fmt: skip
    compare.add_argument(
        "--clip-model", metavar="NAME_OR_PATH",
        help="the CLIP model of the CLIP score, from disk only: a Hugging Face name in the local "
        "cache or a folder saved with save_pretrained (default openai/clip-vit-base-patch32; "
        "pipelines only)",
    )  # fmt: skip
    compare.add_argument(
        "--no-progress", action="store_true", help="no progress on stderr"
    )  # fmt: skip


def _run_compare(args: argparse.Namespace) -> int:
    from .compare import DIGIT_MODELS, CompareSettings, compare, format_table, write_outputs
    from .variants import parse_variants

    if args.model not in DIGIT_MODELS and not Path(args.model).is_dir():
        raise UsageError(
            f"--model {args.model}: not a folder; give the folder of a diffusers pipeline "
            f"(saved with save_pretrained) or one of {', '.join(DIGIT_MODELS)}"
        )
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance {args.guidance}: must be a finite number")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output}: is a file; give a folder (it is created)")
    overrides = dict(args.overrides)
    variants = parse_variants(list(args.strategies), list(args.ratios), overrides)
    default = _DEFAULT_DIGITS if args.model in DIGIT_MODELS else _DEFAULT_PROMPTS
    settings = CompareSettings(
        model=args.model,
        prompts=tuple(args.prompts or default),
        seeds=tuple(args.seeds),
        variants=tuple(variants),
        ratios=tuple(args.ratios),
        steps=args.steps,
        size=args.size,
        guidance=args.guidance,
        device=args.device,
        dtype=args.dtype,
        overrides=overrides,
        **({"clip_model": args.clip_model} if args.clip_model else {}),
    )
    columns, rows, notes = compare(settings, progress=not args.no_progress)
    print(format_table(columns))
    for note in notes:
        print(note)
    for path in write_outputs(settings, columns, rows, notes, output):
        print(f"wrote {path}")
    return 0


def _presets() -> Listing:
    return Listing(
        key="presets",
        title="bench presets (random weights from the published configs)",
        items=[
            {"name": p.name, "description": p.description, "notes": p.notes}
            for p in PRESETS.values()
        ],
    )


@hookimpl
def tokenmerge_register_commands(register: Callable[[Command], None]) -> None:
    """``tokenmerge bench`` (with the presets in ``tokenmerge list``), ``tokenmerge compare``
    and ``tokenmerge visualize``.

    Example:
        >>> found = []
        >>> tokenmerge_register_commands(found.append)
        >>> [command.name for command in found]
        ['bench', 'compare', 'visualize']
    """
    register(
        Command(
            name="bench",
            help="speed, overhead, memory and fidelity of strategies on a model",
            description="Time a model without merging and with each strategy at each ratio (and "
            "each peer) in one run, alternating configurations; report speedups, merge "
            "overhead, peak memory and fidelity (block error, output error, a short denoising "
            "trajectory) on noised latents of photographs.",
            configure=_configure_bench,
            run=_run_bench,
            listing=_presets,
        )
    )
    register(
        Command(
            name="compare",
            help="images unmerged and merged, side by side, with PSNR / SSIM and timings",
            description="Generate the same prompts and seeds with the unmerged model and with "
            "each strategy at each ratio; write an image grid (grid.png), a page with the grid "
            "and a table (index.html) and the figures (results.json): seconds per image, PSNR "
            "and SSIM against the unmerged images, LPIPS where its weights are on disk.",
            configure=_configure_compare,
            run=_run_compare,
        )
    )
    register(
        Command(
            name="visualize",
            help="draw which tokens each strategy merges, on a photograph",
            description="Run the model on a noised photograph with each strategy, take the plan "
            "a site made, and draw it over the photograph (destinations, and ReToM's windows) "
            "next to the photograph merged and unmerged with that plan, with its PSNR.",
            configure=_configure_visualize,
            run=_run_visualize,
        )
    )
