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
#: extra kernels per merged module call of a call that makes its plans (the similarity, the
#: plan's rows, the merge and unmerge), on a grid whose shared tables exist: tomesd 0.1.3 makes
#: its plans in 30 per site on the UNet; ToMe's own matching and merge are 18 per ViT block.
#: retom's window scope (its default where positions are rotary: FLUX.1, Wan) adds three: the
#: sources' windows, their comparison with every token's and the mask
PLANNING_BUDGET = {"tome": 53, "random": 42, "retom-uncorrected": 55, "retom": 51}
#: with the value correction (retom, where the attention allows it), whose fit runs the exact
#: attention of sampled tokens
CORRECTED_PLANNING_BUDGET = 130
#: progressive mode (ViT-B/16 layout, ToMe's r=13 per block): extra kernels per block
PROGRESSIVE_BUDGET = {"tome": 43, "random": 65, "retom": 64}
SCHEDULE = torch.tensor([999.0, 979.0, 959.0, 939.0])
#: the strategies measured, by name: (strategy, config overrides)
VARIANTS = {
    "tome": ("tome", {}),
    "random": ("random", {}),
    "retom-uncorrected": ("retom", {"value_correction": False}),
    "retom": ("retom", {}),
}

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
        # the first plans also make what every later plan of the grid shares
        _, first = count_kernels(call, 0)
        _, planning = count_kernels(call, 0)  # a new generation: planned again
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
        "first": first,
        "planning": planning,
        "cached": cached,
    }


def extra_per_merged_call(seen: dict[str, Any], step: str) -> tuple[float, dict]:
    """Extra kernels per merged module call of the call ``step``, and the extra ops by name."""
    extra = (seen[step].kernels - seen["unmerged"].kernels) / seen["merges"]
    return extra, dict(seen[step].ops - seen["unmerged"].ops)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kernels_per_merged_call_stay_within_budget(family, variant):
    strategy, overrides = VARIANTS[variant]
    seen = counts(family, strategy, **overrides)
    extra, added = extra_per_merged_call(seen, "cached")
    budget = CORRECTED_BUDGET if seen["corrected"] else CACHED_BUDGET
    assert extra <= budget, f"reusing: {extra:.1f} kernels per merged call > {budget}: {added}"
    extra, added = extra_per_merged_call(seen, "planning")
    budget = CORRECTED_PLANNING_BUDGET if seen["corrected"] else PLANNING_BUDGET[variant]
    assert extra <= budget, f"planning: {extra:.1f} kernels per merged call > {budget}: {added}"


@pytest.mark.parametrize("strategy", sorted(PROGRESSIVE_BUDGET))
def test_progressive_merging_costs_a_bounded_number_of_kernels_per_block(strategy):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", embed_dim=64, num_heads=2).eval()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        vit(pixels)
        _, unmerged = count_kernels(vit, pixels)
        handle = tokenmerge.apply(vit, strategy, r=13)
        vit(pixels)
        output, merged = count_kernels(vit, pixels)
    assert all(s.tokens_out == s.tokens_in - 13 for s in handle.stats().values())
    handle.remove()
    assert output.shape == (2, 1000) and merged.syncs == []
    extra = (merged.kernels - unmerged.kernels) / len(vit.blocks)
    budget = PROGRESSIVE_BUDGET[strategy]
    assert extra <= budget, f"{extra:.1f} kernels per block > {budget}"


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("strategy", ["tome", "random", "retom"])
def test_no_host_sync_in_a_forward(family, strategy):
    seen = counts(family, strategy)
    assert seen["unmerged"].syncs == []
    assert seen["cached"].syncs == []
    assert seen["planning"].syncs == []
    # FLUX.1 reads its grid from img_ids once per ids tensor (a pipeline makes one per
    # generation), at its first plans
    assert len(seen["first"].syncs) == (1 if family == "flux" else 0), seen["first"].syncs


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
