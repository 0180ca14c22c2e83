"""Kernel and host-sync budgets of the merge path (issue 21).

An eager forward on a GPU is launch-bound at the sizes people run: its time follows the kernels
the host queues, and a device-to-host read stops the queue. Both counts are properties of the
code, the same on every device, so they are asserted here on the CPU with
``tokenmerge.testing.count_kernels`` (timings never are).

Every model is called as a diffusers pipeline calls it: the timestep is a view of one schedule
tensor (``for t in scheduler.timesteps``), which tokenmerge places without reading the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers_zoo import ZOO, output_of
from snapshots import Journal
from torch import Tensor, nn
from transformer_models import FAMILIES, inputs
from unet_models import tiny_unet

import tokenmerge
from tokenmerge.testing import count_kernels

#: extra kernels per merged call of a module (self-attention, MLP) that reuses its plan: the
#: merge, the unmerge and what the module's own call adds for the merged tokens
CACHED_BUDGET = 8
#: the same with the value correction, which adds one product and one scatter
CORRECTED_BUDGET = 12
SCHEDULE = torch.tensor([999.0, 979.0, 959.0, 939.0])

Call = Callable[[int], Tensor]


def unet_model() -> tuple[nn.Module, Call]:
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 7, 32, generator=generator)
    return unet, lambda step: unet(x, SCHEDULE[step], encoder_hidden_states=text).sample


def transformer_model(family: str) -> tuple[nn.Module, Call]:
    model = FAMILIES[family]()
    kwargs = inputs(family)
    # Flux takes the schedule over 1000 (its pipeline divides); the steps are views of it too
    schedule = SCHEDULE / 1000 if family == "flux" else SCHEDULE
    if family in ("dit", "pixart"):
        schedule = schedule.long()
    batch = kwargs["hidden_states"].shape[0]

    def call(step: int) -> Tensor:
        return model(**{**kwargs, "timestep": schedule[step].expand(batch)}).sample

    return model, call


def zoo_model(name: str) -> tuple[nn.Module, Call]:
    """A model of the diffusers transformer adapter, its timestep from the schedule in the
    scale and dtype its tiny build's call uses (0-1 for flow matching)."""
    entry = ZOO[name]
    model, kwargs = entry.build(), entry.inputs(2)
    given = kwargs["timestep"]
    schedule = SCHEDULE / 1000 if given.max() <= 1 else SCHEDULE
    schedule = schedule.to(given.dtype)

    def call(step: int) -> Tensor:
        return output_of(model, {**kwargs, "timestep": schedule[step].expand(given.shape[0])})

    return model, call


MODELS: dict[str, Callable[[], tuple[nn.Module, Call]]] = {
    "unet": unet_model,
    **{family: (lambda family=family: transformer_model(family)) for family in FAMILIES},
    **{name: (lambda name=name: zoo_model(name)) for name in ("wan", "qwen_image", "sana")},
}


def counts(family: str, strategy: str, **overrides: Any) -> dict[str, Any]:
    """Kernels and syncs of an unmerged call, the planning call and a call reusing the plans."""
    model, call = MODELS[family]()
    with torch.no_grad():
        call(0)
        _, unmerged = count_kernels(call, 0)
        handle = tokenmerge.apply(
            model,
            strategy,
            ratio=0.5,
            cache_interval=100,
            sites={"min_tokens": 1},
            **overrides,
        )
        _, planning = count_kernels(call, 0)
        # the first reuse may form what the plan's later calls share
        with handle.observe(Journal()) as journal:
            call(1)
        _, cached = count_kernels(call, 2)
    stats = handle.stats().values()
    merged = [s for s in stats if s.tokens_out < s.tokens_in]
    assert merged and all(s.plans_reused == 2 for s in merged)
    handle.remove()
    return {
        "sites": len(merged),
        "merges": sum(part == "merge" for part, _ in journal.seen),
        "corrected": any(s.value_correction is not None for s in merged),
        "unmerged": unmerged,
        "planning": planning,
        "cached": cached,
    }


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize(
    ("strategy", "overrides"),
    [
        ("tome", {}),
        ("random", {}),
        ("retom", {"value_correction": False}),
        ("retom", {}),
    ],
    ids=["tome", "random", "retom-uncorrected", "retom"],
)
def test_a_reused_plan_costs_few_kernels_per_site(family, strategy, overrides):
    seen = counts(family, strategy, **overrides)
    extra = (seen["cached"].kernels - seen["unmerged"].kernels) / seen["merges"]
    budget = CORRECTED_BUDGET if seen["corrected"] else CACHED_BUDGET
    added = seen["cached"].ops - seen["unmerged"].ops
    assert extra <= budget, f"{extra:.1f} kernels per merged call > {budget}: {dict(added)}"


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("strategy", ["tome", "random", "retom"])
def test_no_host_sync_in_a_forward(family, strategy):
    seen = counts(family, strategy)
    assert seen["unmerged"].syncs == []
    assert seen["cached"].syncs == []
    if family == "flux":
        # the grid is read from img_ids once per ids tensor (a pipeline makes one per generation)
        assert len(seen["planning"].syncs) == 1, seen["planning"].syncs
    else:
        assert seen["planning"].syncs == []


def test_count_kernels_counts_kernels_and_syncs():
    x = torch.ones(4)
    result, seen = count_kernels(lambda: (x * 2).view(2, 2).sum().item())
    assert result == 8.0
    assert seen.kernels == 3  # mul, sum, the read (the view launches nothing)
    assert seen.syncs == ["_local_scalar_dense"]
    assert seen.ops == {"mul": 1, "sum": 1, "_local_scalar_dense": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["tome", "random", "retom", "todo"])
def test_merging_adds_no_cuda_sync(strategy):
    """On a GPU, with torch's sync debugging on: the merged model's forwards (planning and
    reusing) make exactly the synchronising calls the unmerged model's make."""
    import warnings

    unet, call = unet_model()
    unet.cuda()
    schedule = SCHEDULE.cuda()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator).cuda()
    text = torch.randn(2, 7, 32, generator=generator).cuda()

    def syncs() -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.no_grad():
                    for step in range(3):
                        unet(x, schedule[step], encoder_hidden_states=text)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    unmerged = syncs()
    handle = tokenmerge.apply(unet, strategy, cache_interval=2, sites={"min_tokens": 1})
    assert syncs() == unmerged
    handle.remove()
