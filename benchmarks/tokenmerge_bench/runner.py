"""``tokenmerge bench``: speed, merge overhead, memory and fidelity of strategies in one run.

Every configuration (no merging, each strategy variant at each ratio, each peer) gets its own
copy of the model's modules sharing one set of weights, so they run side by side in one process:

1. **Timed rounds**: each round is one denoising step (consecutive timesteps of the family's
   sampling run - 50 steps for UNets, DiT and PixArt, 28 for SD3 and FLUX.1 - so plan caches
   work as in a generation); configurations alternate, in a rotating order, and the first round
   only warms up. Speedup = median seconds without merging / median with.
2. **Fidelity** on noised latents of photographs, plans made afresh for every input: the block
   error (every merged transformer block against the exact block run on the same input,
   ``||y_merged - y_exact|| / ||y_exact - x||``) and the model output's error against the
   unmerged model's.
3. **Instrumented run**: a short sampling trajectory (DDIM, or Euler for flow matching) from one
   seed with timers around planning, merge and unmerge (never inside the timed rounds), judging
   plan caching over steps: its final latent is compared with the unmerged trajectory's. Peak
   memory is taken on one more call.
4. **Kernels** per merged site, at steps that plan and steps that reuse a plan, and host syncs
   per forward: counted on the meta device (``tokenmerge_bench.kernels``), the launch cost a
   GPU pays in eager mode.
5. **Held-out loss** (the reference denoiser, ``--model reference-denoiser``, only): the
   noise-prediction loss on images it never saw, at the 50 timesteps of a DDIM generation in one
   sweep (plans cached as in a generation), against the unmerged model's; with ``samples`` set,
   the trajectories' final images are saved as a grid, one row per configuration under the
   unmerged row.
"""

from __future__ import annotations

import copy
import functools
import itertools
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from tokenmerge import __version__
from tokenmerge.api import Handle, apply
from tokenmerge.errors import UnsupportedModelError

from .fidelity import BlockErrorProbe, relative_error, tie_self_attention
from .kernels import count_entry_kernels
from .peers import PEERS, TomesdPeer, peer_available
from .presets import PRESETS, get_preset
from .progress import Progress
from .timing import PARTS, OverheadTimers, peak_memory_mb, synchronizer, timed
from .variants import parse_variants
from .workload import Workload, default_size, make_workload

__all__ = ["BenchResult", "BenchRow", "BenchSettings", "run_bench", "sharing_weights"]

Attention = Literal["similarity", "as-loaded"]


@dataclass
class BenchSettings:
    """What one ``tokenmerge bench`` run measures (the command's options).

    Example:
        >>> settings = BenchSettings(model="tiny-unet", strategies=["retom"], rounds=1,
        ...                          timesteps=[500], trajectory_steps=2, peers=[])
        >>> result = run_bench(settings, progress=False)
        >>> [row.label for row in result.rows]
        ['none', 'retom 0.5']
        >>> result.rows[1].block_error > 0, result.rows[1].speedup > 0
        (True, True)
    """

    model: str = "sd15"
    # strategy variants, NAME[:KEY=VALUE[,KEY=VALUE...]] (see tokenmerge_bench.variants)
    strategies: list[str] = field(default_factory=lambda: ["retom", "tome", "random"])
    ratios: list[float] = field(default_factory=lambda: [0.5])
    peers: list[str] | None = None  # None: every installed peer that supports the model
    size: int | None = None  # None: the preset's size
    batch: int = 1
    rounds: int = 3
    # None: the workload's own (astronaut; for a reference denoiser, the photographs it never saw)
    photos: list[str] | None = None
    timesteps: list[int] = field(default_factory=lambda: [900, 500, 100])
    trajectory_steps: int = 4
    samples: str | None = None  # reference denoiser: PNG grid of the trajectories' images
    attention: Attention | None = None  # None: similarity for presets, as loaded for a path
    similarity_scale: float = 3.0
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    #: run every configuration through torch.compile (eager baseline compiled too)
    compile: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchRow:
    """One configuration's figures (``None``: not measured / not applicable)."""

    label: str
    kind: Literal["baseline", "tokenmerge", "peer"]
    strategy: str
    variant: str  # the strategy with its variant's fields, e.g. "retom+merge_mlp"
    ratio: float
    config: dict[str, Any] | None  # the whole merge config (tokenmerge rows only)
    seconds: float  # median seconds per forward over the timed rounds
    speedup: float  # baseline median / this median
    seconds_samples: list[float]
    seconds_min: float  # the fastest and slowest timed round: the spread around the median
    seconds_max: float
    overhead_ms: dict[str, float] | None  # per forward, from the instrumented run
    overhead_percent: float | None  # plan + merge + unmerge, share of the median forward
    peak_memory_mb: float | None
    block_error: float | None  # mean over merged blocks and fidelity inputs
    output_error: float | None  # mean over fidelity inputs
    trajectory_error: float | None  # final latent of the trajectory
    held_out_loss: dict[str, float] | None  # reference denoiser: loss per timestep
    held_out_loss_increase: float | None  # % over the unmerged model's, per timestep, averaged
    merged_blocks: int  # blocks that merged at a fidelity call
    tokens: str  # tokens in -> out at the first merged site
    #: extra kernels per merged site at steps that plan / reuse a plan, and the most host syncs
    #: of one forward (``tokenmerge_bench.kernels``; None: not counted)
    kernels_planning: float | None = None
    kernels_reusing: float | None = None
    syncs: int | None = None


@dataclass
class BenchResult:
    """Everything one run measured, with what it ran on (``asdict`` gives the JSON)."""

    tokenmerge_version: str
    model: dict[str, Any]
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[BenchRow]
    run_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers (no new memory):
    each configuration gets its own hooks on its own modules, all of them the same weights."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@dataclass
class _Entry:
    label: str
    kind: Literal["baseline", "tokenmerge", "peer"]
    strategy: str
    variant: str
    ratio: float
    model: nn.Module
    handle: Handle | None = None
    peer: TomesdPeer | None = None
    #: what the timed rounds call: the model, or its compiled form (``--compile``)
    call: Any = None

    def __post_init__(self) -> None:
        if self.call is None:
            self.call = self.model

    def new_generation(self) -> None:
        if self.handle is not None:
            self.handle.new_generation()

    def probed_blocks(self, workload: Workload) -> list[str]:
        if self.handle is not None:
            return [site.name for site in self.handle.sites]
        return workload.block_names(self.model)

    def merged(self, name: str, tokens: int, workload: Workload) -> bool:
        """Whether the block merged at the call just made."""
        if self.handle is not None:
            stats = self.handle.stats()[name]
            return stats.tokens_out < stats.tokens_in
        return self.peer is not None and self.peer.merged(tokens, workload.tokens)

    def instrumented(self, timers: OverheadTimers) -> Any:
        if self.kind == "tokenmerge":
            return self.handle.observe(timers)
        if self.peer is not None:
            return self.peer.instrumented(timers.add, timers.sync)
        return nullcontext()


def load_bench_model(settings: Any, device: torch.device, dtype: torch.dtype) -> tuple:
    """The model, its description (the attention weights used included) and its image size.

    ``settings`` is a ``BenchSettings`` or anything with its ``model``, ``seed``, ``attention``,
    ``similarity_scale`` and ``size`` fields (the classifier bench's settings).
    """
    if settings.model in PRESETS:
        preset = get_preset(settings.model)
        model = preset.build(device, dtype, seed=settings.seed)
        info = {
            "name": preset.name,
            "description": preset.description,
            "source": "preset: the published configuration with random weights",
            "notes": preset.notes,
        }
        default_attention, size = "similarity", preset.default_size
        if preset.reference is not None:
            info["source"] = "preset: trained here on bundled photographs (its own weights)"
            default_attention = "as-loaded"
    else:
        from .loading import load_model

        loaded = load_model(settings.model, dtype=dtype)
        model = loaded.model.to(device).eval()
        info = {
            "name": settings.model,
            "description": loaded.description,
            "source": "local checkpoint: its own weights",
            "notes": "",
        }
        default_attention = "as-loaded"
        size = default_size(model)
    attention = settings.attention or default_attention
    if attention == "similarity":
        tied = tie_self_attention(model, settings.similarity_scale)
        info["attention"] = (
            f"similarity-based self-attention: the key projection tied to the query projection, "
            f"both scaled by {settings.similarity_scale:g} ({tied} self-attention modules)"
        )
    else:
        info["attention"] = "the model's own weights"
    info["class"] = type(model).__name__
    return model, info, settings.size or size


def _entries(model: nn.Module, settings: BenchSettings, peers: list[str]) -> list[_Entry]:
    entries = [_Entry("none", "baseline", "none", "none", 0.0, model)]
    variants = parse_variants(settings.strategies, settings.ratios, settings.overrides)
    for variant, ratio in itertools.product(variants, settings.ratios):
        clone = sharing_weights(model)
        handle = apply(clone, variant.config(ratio, settings.overrides))
        entries.append(
            _Entry(
                variant.label(ratio),
                "tokenmerge",
                variant.strategy,
                variant.name,
                ratio,
                clone,
                handle,
            )
        )
    for name, ratio in itertools.product(peers, settings.ratios):
        peer = PEERS[name](ratio)
        clone = sharing_weights(model)
        peer.apply(clone)
        entries.append(_Entry(f"{name} {ratio:g}", "peer", name, name, ratio, clone, peer=peer))
    return entries


def _peers(settings: BenchSettings, model: nn.Module) -> list[str]:
    """The peers to run: those asked for (each must support the model), or with None every
    installed peer that supports it."""
    if settings.peers is None:
        return [name for name in PEERS if PEERS[name].supports(model) and peer_available(name)]
    for name in settings.peers:
        if not PEERS[name].supports(model):
            raise UnsupportedModelError(
                f"the {name} peer cannot run on a {type(model).__name__}: {PEERS[name].scope}; "
                "leave it out (--peer none, or --peer auto, which adds peers only where they "
                "apply)"
            )
    return list(settings.peers)


def run_bench(settings: BenchSettings, progress: bool = True) -> BenchResult:
    """Run the benchmark ``settings`` describe; see the module docstring for what it measures."""
    started = time.perf_counter()
    with Progress(progress) as bar:
        return _run_bench(settings, started, bar)


def _run_bench(settings: BenchSettings, started: float, bar: Progress) -> BenchResult:
    device = torch.device(settings.device)
    dtype = getattr(torch, settings.dtype)
    bar.phase(f"building the model ({settings.model}, {settings.dtype} on {settings.device})")
    model, model_info, size = load_bench_model(settings, device, dtype)
    reference = get_preset(settings.model).reference if settings.model in PRESETS else None
    bar.phase("preparing the inputs and the configurations")
    workload = make_workload(
        model, size, settings.batch, device, dtype, settings.seed, reference=reference
    )
    settings = replace(settings, photos=list(settings.photos or workload.default_photos))
    held_out = getattr(workload, "held_out", None)
    if settings.samples is not None and held_out is None:
        raise UnsupportedModelError(
            "samples (--samples) are saved for the reference denoiser only "
            "(--model reference-denoiser), whose inputs are pixels; leave it out"
        )
    model_info["input"] = workload.describe()
    model_info["sampler"] = workload.sampler
    entries = _entries(model, settings, _peers(settings, model))
    baseline = entries[0]
    compiling = _compiling(entries) if settings.compile else nullcontext()
    sync = synchronizer(device)
    calls_per_entry = (
        settings.rounds
        + 1
        + len(settings.photos) * len(settings.timesteps)
        + settings.trajectory_steps
        + 1
        + (1 if held_out is not None else 0)
    )
    bar.start(calls_per_entry * len(entries))
    with torch.no_grad(), compiling:
        seconds = _timed_rounds(entries, workload, settings, sync, bar)
        fidelity = _fidelity(entries, workload, settings, bar)
        instrumented, finals = _instrumented(entries, workload, settings, device, bar)
        losses = _held_out_losses(entries, workload, bar) if held_out is not None else {}
        bar.phase(f"kernel counts: {len(entries)} configurations on the meta device")
        kernels = _kernels(entries, settings, workload.size)
    if settings.samples is not None:
        bar.phase(f"writing the samples to {settings.samples}")
        from .report import write_sample_grid

        write_sample_grid(
            [workload.to_images(finals[entry.label]) for entry in entries],
            [entry.label for entry in entries],
            settings.samples,
        )
    base = statistics.median(seconds[baseline.label])
    rows = []
    for entry in entries:
        median = statistics.median(seconds[entry.label])
        overhead, memory, trajectory = instrumented[entry.label]
        merged_fidelity = fidelity.get(entry.label, {})
        rows.append(
            BenchRow(
                label=entry.label,
                kind=entry.kind,
                strategy=entry.strategy,
                variant=entry.variant,
                ratio=entry.ratio,
                config=(
                    None if entry.handle is None else entry.handle.config.model_dump(mode="json")
                ),
                seconds=median,
                speedup=base / median,
                seconds_samples=seconds[entry.label],
                seconds_min=min(seconds[entry.label]),
                seconds_max=max(seconds[entry.label]),
                overhead_ms=overhead,
                overhead_percent=(
                    None if overhead is None else 100.0 * sum(overhead.values()) / 1000 / median
                ),
                peak_memory_mb=memory,
                block_error=merged_fidelity.get("block_error"),
                output_error=merged_fidelity.get("output_error"),
                trajectory_error=trajectory,
                held_out_loss=losses.get(entry.label),
                held_out_loss_increase=_increase(losses, entry.label, baseline.label),
                merged_blocks=merged_fidelity.get("merged_blocks", 0),
                tokens=merged_fidelity.get("tokens", "-"),
                **_kernel_fields(kernels, entry.label),
            )
        )
    settings_info = asdict(settings)
    settings_info.update(size=size, peers=[e.strategy for e in entries if e.kind == "peer"])
    return BenchResult(
        tokenmerge_version=__version__,
        model=model_info,
        machine=_machine(device),
        settings=settings_info,
        rows=rows,
        run_seconds=time.perf_counter() - started,
    )


def _kernels(entries: list[_Entry], settings: BenchSettings, size: int) -> dict | None:
    """Kernel figures of every configuration, counted on the meta device (None: not a preset)."""
    configs = {e.label: e.handle.config for e in entries if e.kind == "tokenmerge"}
    peers = {e.label: e.ratio for e in entries if e.kind == "peer"}
    return count_entry_kernels(settings, configs, peers, size)


def _kernel_fields(kernels: dict | None, label: str) -> dict[str, Any]:
    figures = None if kernels is None else kernels.get(label)
    if figures is None:
        return {}
    return {
        "kernels_planning": figures.planning,
        "kernels_reusing": figures.reusing,
        "syncs": figures.syncs,
    }


def _timed_rounds(
    entries: list[_Entry],
    workload: Workload,
    settings: BenchSettings,
    sync: Callable[[], None],
    bar: Progress,
) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {entry.label: [] for entry in entries}
    # compiled: a warm-up round per graph variant a configuration compiles (a step that plans
    # and one that reuses its plan)
    warmup = 1 + max(_cache_interval(e) for e in entries) if settings.compile else 1
    timesteps = workload.timing_timesteps(settings.rounds + warmup)
    for entry in entries:
        entry.new_generation()
    for index, timestep in enumerate(timesteps):
        if index == 0:
            bar.phase(
                f"warm-up: {warmup} round(s) of {len(entries)} configurations"
                + (", compiling each" if settings.compile else "")
            )
        elif index == warmup:
            bar.phase(f"timed rounds: {settings.rounds} of {len(entries)} configurations")
        sample = workload.noisy_photo(settings.photos[0], timestep)
        shift = index % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            call = functools.partial(workload, entry.call, sample, timestep)
            elapsed, _ = timed(call, sync)
            if index >= warmup:
                seconds[entry.label].append(elapsed)
            if index < settings.rounds + 1:  # the bar counts one warm-up round
                bar.tick()
    return seconds


def _cache_interval(entry: _Entry) -> int:
    return 1 if entry.handle is None else min(entry.handle.config.cache_interval, 2)


@contextmanager
def _compiling(entries: list[_Entry]) -> Iterator[None]:
    """Every configuration called through ``torch.compile``, for the timed rounds.

    The configurations are copies of one model that differ in their hooks, and torch.compile
    does not check hooks by default: each would run the first one's graphs. With the hook
    guards on, each compiles its own (and more graphs per function are allowed for them)."""
    import torch._dynamo as dynamo

    saved = dynamo.config.skip_nnmodule_hook_guards, dynamo.config.recompile_limit
    dynamo.config.skip_nnmodule_hook_guards = False
    dynamo.config.recompile_limit = max(saved[1], 8 * len(entries))
    for entry in entries:
        entry.call = torch.compile(entry.model)
    try:
        yield
    finally:
        for entry in entries:
            entry.call = entry.model
        dynamo.config.skip_nnmodule_hook_guards, dynamo.config.recompile_limit = saved


def _fidelity(
    entries: list[_Entry], workload: Workload, settings: BenchSettings, bar: Progress
) -> dict[str, dict[str, Any]]:
    baseline, merged_entries = entries[0], entries[1:]
    results: dict[str, dict[str, Any]] = {}
    inputs = list(itertools.product(settings.photos, settings.timesteps))
    bar.phase(f"fidelity: {len(inputs)} input(s), {len(entries)} configurations")
    references = []
    for photo, timestep in inputs:
        sample = workload.noisy_photo(photo, timestep)
        references.append((sample, timestep, workload(baseline.model, sample, timestep)))
        bar.tick()
    for entry in merged_entries:
        block_errors, output_errors, merged_names, tokens = [], [], set(), "-"
        for sample, timestep, reference in references:
            entry.new_generation()  # fidelity of one call; caching is judged by the trajectory
            names = entry.probed_blocks(workload)
            with BlockErrorProbe(entry.model, baseline.model, names) as probe:
                output = workload(entry.model, sample, timestep)
            output_errors.append(relative_error(output, reference))
            for name, record in probe.records.items():
                for error, count in zip(record.errors, record.tokens, strict=True):
                    if entry.merged(name, count, workload):
                        block_errors.append(error)
                        merged_names.add(name)
            if entry.handle is not None and tokens == "-":
                tokens = _tokens(entry.handle)
            bar.tick()
        results[entry.label] = {
            "block_error": statistics.fmean(block_errors) if block_errors else None,
            "output_error": statistics.fmean(output_errors),
            "merged_blocks": len(merged_names),
            "tokens": tokens if entry.handle is not None else _peer_tokens(entry, workload),
        }
    return results


def _tokens(handle: Handle) -> str:
    for stats in handle.stats().values():
        if stats.tokens_out < stats.tokens_in:
            return f"{stats.tokens_in}->{stats.tokens_out}"
    return "-"


def _peer_tokens(entry: _Entry, workload: Workload) -> str:
    tokens = workload.tokens
    return f"{tokens}->{tokens - int(tokens * entry.ratio)}"


def _instrumented(
    entries: list[_Entry],
    workload: Workload,
    settings: BenchSettings,
    device: torch.device,
    bar: Progress,
) -> dict[str, tuple[dict[str, float] | None, float | None, float | None]]:
    bar.phase(
        f"instrumented run: peak memory and a {settings.trajectory_steps}-step trajectory with "
        f"timers, {len(entries)} configurations"
    )
    sample = workload.noisy_photo(settings.photos[0], settings.timesteps[0])
    results, finals = {}, {}
    reference = None
    for entry in entries:
        entry.new_generation()
        memory = peak_memory_mb(
            lambda e=entry: workload(e.model, sample, settings.timesteps[0]), device
        )
        bar.tick()
        entry.new_generation()
        timers = OverheadTimers(device)
        with entry.instrumented(timers):
            final = workload.trajectory(
                entry.model, settings.trajectory_steps, before_step=lambda index: bar.tick()
            )
        steps = max(settings.trajectory_steps, 1)
        overhead = None
        if entry.kind != "baseline":
            overhead = {part: timers.ms.get(part, 0.0) / steps for part in PARTS}
        if reference is None:  # the baseline comes first
            reference, trajectory_error = final, None
        else:
            trajectory_error = relative_error(final, reference)
        results[entry.label] = (overhead, memory, trajectory_error)
        finals[entry.label] = final
    return results, finals


def _held_out_losses(
    entries: list[_Entry], workload: Workload, bar: Progress
) -> dict[str, dict[str, float]]:
    """Every configuration's noise-prediction loss on the held-out images at each timestep of
    one sweep (``tokenmerge_bench.reference.metrics.denoising_losses``)."""
    from tokenmerge_bench.reference.metrics import denoising_losses

    bar.phase(f"held-out loss: 50 timesteps of held-out images, {len(entries)} configurations")
    images = workload.held_out()
    results = {}
    for entry in entries:
        entry.new_generation()
        losses = denoising_losses(entry.model, images, seed=workload.seed)
        results[entry.label] = {str(t): loss for t, loss in losses.items()}
        bar.tick()
    return results


def _increase(losses: dict[str, dict[str, float]], label: str, baseline: str) -> float | None:
    """The held-out loss over the sweep, % above the unmerged model's (per timestep, averaged:
    ``tokenmerge_bench.reference.metrics.loss_increase``)."""
    from tokenmerge_bench.reference.metrics import loss_increase

    return loss_increase(losses[label], losses[baseline]) if label in losses else None


def _machine(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
