"""Observers (``Handle.observe``): what each kind of site reports, attaching and detaching, and
that observing costs a patched model no tensor op."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from snapshots import Journal
from torch.utils._python_dispatch import TorchDispatchMode
from transformer_models import inputs as transformer_inputs
from transformer_models import make_flux
from vit_models import FAMILIES as VIT_FAMILIES

import tokenmerge
from tokenmerge.observe import Observation, Observer, Part
from tokenmerge.site import Site
from tokenmerge_bench.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET_SAMPLE = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
UNET_TEXT = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))


class Nesting(Observer):
    """Records ``+part`` when a part begins and ``-part`` when it ends, per site."""

    def __init__(self) -> None:
        self.events: dict[str, list[str]] = {}

    @contextmanager
    def around(self, part: Part, site: Site) -> Iterator[None]:
        events = self.events.setdefault(site.name, [])
        events.append(f"+{part}")
        yield
        events.append(f"-{part}")


class OpCount(TorchDispatchMode):
    """Counts the tensor ops dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def unet_call(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(UNET_SAMPLE, 999, encoder_hidden_states=UNET_TEXT).sample


def test_local_sites_report_plan_merge_and_unmerge_with_the_fit_inside():
    unet = get_preset("tiny-unet").build()
    handle = tokenmerge.apply(unet, "retom", ratio=0.5)  # retom corrects values in a UNet
    with handle.observe(Nesting()) as nesting:
        unet_call(unet)
        unet_call(unet)  # the same timestep again: a new generation, planned afresh
    fitted = ["+plan", "-plan", "+merge", "-merge", "+unmerge", "+fit", "-fit", "-unmerge"]
    assert nesting.events == {site.name: fitted * 2 for site in handle.sites}
    handle.remove()


def test_a_reused_plan_is_not_planned_again():
    unet = get_preset("tiny-unet").build()
    handle = tokenmerge.apply(unet, "tome", ratio=0.5, cache_interval=2)
    with handle.observe(Journal()) as journal, torch.no_grad():
        for step in (999, 980):
            unet(UNET_SAMPLE, step, encoder_hidden_states=UNET_TEXT)
    parts = Counter(part for part, _ in journal.seen)
    sites = len(handle.sites)
    assert parts == {"plan": sites, "merge": 2 * sites, "unmerge": 2 * sites}
    assert all(s.plans_reused == 1 for s in handle.stats().values())
    handle.remove()


def test_progressive_sites_report_their_merges():
    family = VIT_FAMILIES["vit"]
    model = family.build()
    handle = tokenmerge.apply(model, "tome", ratio=0.25)
    assert {site.mode for site in handle.sites} == {"progressive"}
    with handle.observe(Journal()) as journal:
        family.run(model)
    for site in handle.sites:
        # planned at the MLP, merged there and copied back, then the block output merged
        seen = [part for part, name in journal.seen if name == site.name]
        assert seen == ["plan", "merge", "unmerge", "merge"], site.name
    handle.remove()


def test_flux_single_stream_blocks_report_their_merges():
    flux = make_flux()
    handle = tokenmerge.apply(flux, "tome", ratio=0.5, sites={"mlp": True, "min_tokens": 1})
    with handle.observe(Journal()) as journal, torch.no_grad():
        flux(**transformer_inputs("flux"))
    single = [site.name for site in handle.sites if site.name.startswith("single")]
    assert single
    for name in single:
        assert [part for part, site in journal.seen if site == name] == [
            "plan",
            "merge",
            "unmerge",
        ]
    handle.remove()


def test_observing_queues_no_tensor_op():
    unet = get_preset("tiny-unet").build()
    handle = tokenmerge.apply(unet, "retom", ratio=0.5)
    unet_call(unet)  # a first call queues a few ops once
    counts = []
    for observer in (None, Observer(), None):
        observation = handle.observe(observer) if observer is not None else None
        with OpCount() as count:
            unet_call(unet)
        counts.append(count.ops)
        if observation is not None:
            observation.remove()
    assert counts[0] > 0 and counts == [counts[0]] * 3
    handle.remove()


def test_several_observers_in_any_order():
    model = get_preset("tiny-unet").build()
    handle = tokenmerge.apply(model, "tome", ratio=0.5)
    first, second = Journal(), Journal()
    one, two = handle.observe(first), handle.observe(second)
    unet_call(model)
    assert first.seen == second.seen and first.seen
    one.remove()
    one.remove()  # a second remove does nothing
    assert one.removed and not two.removed
    unet_call(model)
    assert len(second.seen) == 2 * len(first.seen)
    two.remove()
    assert all(patch.observer is None for patch in handle.patches)
    unet_call(model)
    assert len(second.seen) == 2 * len(first.seen)
    handle.remove()


def test_one_observer_attached_twice_is_called_twice_until_each_is_removed():
    model = get_preset("tiny-unet").build()
    handle = tokenmerge.apply(model, "tome", ratio=0.5)
    journal = Journal()
    one, _two = handle.observe(journal), handle.observe(journal)
    unet_call(model)
    twice = len(journal.seen)
    one.remove()
    unet_call(model)
    assert len(journal.seen) == twice + twice // 2
    handle.remove()


def test_a_copy_of_an_observed_model_is_not_observed():
    model = get_preset("tiny-unet").build()
    handle = tokenmerge.apply(model, "tome", ratio=0.5)
    with handle.observe(Journal()) as journal:
        twin = copy.deepcopy(model)
        unet_call(twin)
        assert journal.seen == []
        unet_call(model)
        assert journal.seen
    assert tokenmerge.remove(twin) and tokenmerge.remove(model)


def test_an_observer_without_around_is_refused():
    model = get_preset("tiny-unet").build()
    with tokenmerge.apply(model, "tome") as handle:
        with pytest.raises(TypeError, match=r"around\(part, site\).*subclass"):
            handle.observe(object())
        assert isinstance(handle.observe(Observer()), Observation)
