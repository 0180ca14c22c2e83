"""Kernels and host syncs per merged site, counted on the meta device: the bench's GPU cost.

An eager forward on a GPU is launch-bound at the sizes people run, so its time follows the
number of kernels the host queues, and each host sync stops the queue. Both are properties of
the code, the same on every device, so the bench counts them (``tokenmerge.testing
.count_kernels``) on the meta device: the preset's own architecture and token counts, no
weights, no arithmetic - a full SD 1.5 forward in about a second.

For every configuration, four consecutive steps of the bench's timing schedule are counted: the
steps that plan and the steps that reuse their plans (with the config's own ``cache_interval``)
are averaged separately, as extra kernels per merged site over the unmerged model's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenmerge.api import apply
from tokenmerge.testing import count_kernels

from .peers import PEERS
from .presets import PRESETS, get_preset
from .workload import make_workload

__all__ = ["KernelFigures", "count_entry_kernels", "STEPS"]

#: consecutive steps counted per configuration (the first plans)
STEPS = 4


@dataclass(frozen=True)
class KernelFigures:
    """Extra kernels per merged site at the steps that plan and at those that reuse a plan
    (None: no such step among those counted), and the most host syncs of one forward."""

    planning: float | None
    reusing: float | None
    syncs: int


def count_entry_kernels(
    settings: Any, configs: dict[str, Any], peers: dict[str, float], size: int
) -> dict[str, KernelFigures] | None:
    """``KernelFigures`` of every configuration (``configs``: label -> merge config; ``peers``:
    label -> peer ratio), or None where the model is no built-in preset (a local checkpoint's
    architecture is not rebuilt without its weights)."""
    if settings.model not in PRESETS:
        return None
    device, dtype = torch.device("meta"), getattr(torch, settings.dtype)
    # nn.Module.to, not diffusers' override, which warns about modules kept in float32
    model = nn.Module.to(get_preset(settings.model).build_empty(), dtype=dtype)
    reference = get_preset(settings.model).reference
    workload = make_workload(
        model, size, settings.batch, device, dtype, settings.seed, reference=reference
    )
    timesteps = workload.timing_timesteps(STEPS)
    sample = workload.noisy_photo(settings.photos[0], timesteps[0])

    def forwards() -> list[Any]:
        return [count_kernels(workload, model, sample, t)[1] for t in timesteps]

    with torch.no_grad():
        workload(model, sample, timesteps[0])  # the workload's own first-call set-up
        unmerged = forwards()
        figures = {"none": KernelFigures(None, None, max(len(c.syncs) for c in unmerged))}
        for label, config in configs.items():
            figures[label] = _config_figures(config, model, workload, sample, unmerged)
        for label, ratio in peers.items():
            figures[label] = _peer_figures(label, ratio, model, workload, sample, unmerged)
    return figures


def _config_figures(
    config: Any, model: nn.Module, workload: Any, sample: Any, unmerged: list
) -> KernelFigures | None:
    handle = apply(model, config)
    try:
        counts, planned = [], []
        for t in workload.timing_timesteps(STEPS):
            before = sum(s.plans_computed for s in handle.stats().values())
            counts.append(count_kernels(workload, model, sample, t)[1])
            planned.append(sum(s.plans_computed for s in handle.stats().values()) > before)
        merged = sum(1 for s in handle.stats().values() if s.tokens_out < s.tokens_in)
    except NotImplementedError:  # reads a value a meta tensor has not (FLUX.1's grid from ids)
        return None
    finally:
        handle.remove()
    return _figures(counts, unmerged, planned, merged)


def _figures(counts: list, unmerged: list, planned: list[bool], sites: int) -> KernelFigures:
    syncs = max(len(c.syncs) for c in counts)
    if sites == 0:  # nothing merged: no figure per merged site
        return KernelFigures(None, None, syncs)
    extra = [(c.kernels - u.kernels) / sites for c, u in zip(counts, unmerged, strict=True)]
    plan = [e for e, p in zip(extra, planned, strict=True) if p]
    reuse = [e for e, p in zip(extra, planned, strict=True) if not p]
    return KernelFigures(
        planning=statistics.mean(plan) if plan else None,
        reusing=statistics.mean(reuse) if reuse else None,
        syncs=syncs,
    )


def _peer_figures(
    label: str, ratio: float, model: nn.Module, workload: Any, sample: Any, unmerged: list
) -> KernelFigures | None:
    """A peer plans at every step; its merged sites are the patched blocks its own rule merges
    at the tokens they saw."""
    peer = PEERS[label.split()[0]](ratio)
    seen: dict[int, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen[id(module)] = args[0].shape[1]

    peer.apply(model)
    hooks = [block.register_forward_pre_hook(record) for block in peer.blocks(model)]
    try:
        timesteps = workload.timing_timesteps(STEPS)
        counts = [count_kernels(workload, model, sample, t)[1] for t in timesteps]
    except Exception:  # noqa: BLE001 - a peer that cannot run on meta tensors has no figures
        return None
    finally:
        for hook in hooks:
            hook.remove()
        peer.remove(model)
    sites = sum(peer.merged(tokens, workload.tokens) for tokens in seen.values())
    return _figures(counts, unmerged, [True] * len(counts), sites)
