"""A strategy's plan is checked once, when it is made: a malformed one from a third-party strategy
is one ``InvalidPlanError`` naming the strategy and the site, never merged with; cached plans and
the built-in strategies' plans cost no host read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pytest
import torch
from pydantic import Field
from torch import nn

import tokenmerge
import tokenmerge.plan_check as plan_check
from tokenmerge import MergeConfig, extend
from tokenmerge.extend import InvalidPlanError, Plan, Strategy
from tokenmerge.patch import SitePatch
from tokenmerge.registry import registry
from tokenmerge.site import Site, TokenLayout
from tokenmerge.state import StepState

N, CHANNELS = 16, 8


class FaultyConfig(MergeConfig):
    """Configuration of ``faulty``."""

    strategy: Literal["faulty"] = Field(default="faulty", description="Always 'faulty'.")

    def ratio_limit(self) -> float:
        return 0.5

    def ratio_limit_reason(self) -> str:
        return "one token of each pair stays"


def pairs(num_merge: int, n: int) -> Plan:
    """The well-formed plan merging token 2k+1 into token 2k, first pairs first."""
    src = torch.arange(num_merge) * 2 + 1
    return Plan.from_assignment(src.unsqueeze(0), (src - 1).unsqueeze(0), n)


def with_fields(**fields) -> Callable[[Plan, int], Plan]:
    """A fault replacing some fields of the plan (a callable value is applied to the field)."""

    def fault(plan: Plan, num_merge: int) -> Plan:
        changes = {
            name: value(getattr(plan, name)) if callable(value) else value
            for name, value in fields.items()
        }
        return plan.replace(**changes)

    return fault


def _twice(src: torch.Tensor) -> torch.Tensor:
    src = src.clone()
    src[0, 1] = src[0, 0]
    return src


def _one_past(origin: torch.Tensor) -> torch.Tensor:
    origin = origin.clone()
    origin[0, -1] = N - 4  # num_out = N - 4 at ratio 0.25: one past the last slot
    return origin


def _negative(src: torch.Tensor) -> torch.Tensor:
    src = src.clone()
    src[0, 0] = -1
    return src


def _out_of_range(src: torch.Tensor) -> torch.Tensor:
    src = src.clone()
    src[0, 0] = N
    return src


#: name -> (fault applied to a well-formed plan, what the error says)
FAULTS = {
    "source-listed-twice": (with_fields(src=_twice), "kept or merged 2 times"),
    "origin-one-past-the-slots": (with_fields(origin=_one_past), "plan.origin holds 0..12"),
    "negative-index": (with_fields(src=_negative), "plan.src holds -1"),
    "index-past-the-tokens": (with_fields(src=_out_of_range), "outside 0..15"),
    "float-indices": (with_fields(src=lambda s: s.float()), "plan.src is torch.float32"),
    "none-field": (with_fields(kept=None), "plan.kept is NoneType, not a tensor"),
    "wrong-num-tokens": (with_fields(num_tokens=N + 1), "over 17 tokens, expected 16"),
    "more-merges-than-asked": (
        lambda plan, num_merge: pairs(num_merge + 1, N),
        "merged 5 tokens; 4 were asked for",
    ),
    "fewer-merges-than-asked": (
        lambda plan, num_merge: pairs(num_merge - 1, N),
        "merged 3 tokens; 4 were asked for",
    ),
    "not-a-plan": (lambda plan, num_merge: None, "expected a tokenmerge.extend.Plan, got NoneType"),
    "three-rows-for-a-batch-of-two": (
        lambda plan, num_merge: plan.repeat(3),
        "3 rows for a batch of 1 (1)",
    ),
    "wrong-dst-count": (with_fields(dst_count=lambda c: c * 2), "dst_count is not the size"),
    "chained-origin": (
        with_fields(origin=lambda o: o.clone().fill_(0)),
        "origin does not map every kept token",
    ),
    "unsorted-kept": (with_fields(kept=lambda k: k.flip(1)), "kept is not strictly ascending"),
}


class FaultyStrategy(Strategy):
    """Pairs, with a fault (set per test) applied to every plan; ignores the features."""

    name = "faulty"
    config_class = FaultyConfig
    uses_features = False
    fault: Callable[[Plan, int], object] | None = None
    capacity_value: object = None

    def capacity(self, layout, site):
        if self.capacity_value is not None:
            return self.capacity_value
        return layout.num_image_tokens // 2

    def make_plan(self, features, layout, site, num_merge, rng):
        plan = pairs(num_merge, layout.num_image_tokens)
        return plan if self.fault is None else type(self).fault(plan, num_merge)


@pytest.fixture(autouse=True)
def faulty(monkeypatch):
    """``faulty`` registered as a third-party strategy; its fault reset after each test."""
    registry.reset()
    extend.register_strategy(FaultyStrategy)
    yield FaultyStrategy
    registry.reset()


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(CHANNELS, CHANNELS), nn.GELU(), nn.Linear(CHANNELS, CHANNELS))


def run_patched(**config) -> torch.Tensor:
    model = tiny_model()
    options = {"sites": {"include": ["2"], "min_tokens": 1}, "adapter": "generic"}
    with tokenmerge.apply(model, "faulty", ratio=0.25, **options, **config):
        return model(torch.randn(2, N, CHANNELS))


@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_malformed_plan_is_one_error_naming_the_strategy_and_the_site(kind, faulty, monkeypatch):
    fault, what = FAULTS[kind]
    monkeypatch.setattr(faulty, "fault", staticmethod(fault))
    with pytest.raises(InvalidPlanError) as info:
        run_patched()
    message = str(info.value)
    assert message.startswith("strategy 'faulty' (FaultyStrategy) at site '2': make_plan"), message
    assert what in message, message
    assert "tokenmerge.testing.check_strategy" in message
    assert isinstance(info.value, tokenmerge.TokenMergeError)


@pytest.mark.parametrize(
    "capacity, what",
    [
        (-1, "capacity() is -1, outside 0..15"),
        (16, "capacity() is 16, outside 0..15"),
        (4.0, "capacity() returned float 4.0, not int"),
        (True, "capacity() returned bool True, not int"),
        (None, None),  # the default: a well-formed strategy
    ],
)
def test_a_bad_capacity_is_one_error_naming_the_strategy_and_the_site(capacity, what, faulty):
    faulty.capacity_value = capacity
    try:
        if what is None:
            assert run_patched().shape == (2, N, CHANNELS)
            return
        with pytest.raises(InvalidPlanError) as info:
            run_patched()
    finally:
        faulty.capacity_value = None
    message = str(info.value)
    assert message.startswith("strategy 'faulty' (FaultyStrategy) at site '2': capacity()")
    assert what in message, message


def _site_patch(strategy: str) -> SitePatch:
    config = tokenmerge.load_config(strategy, ratio=0.25, sites={"min_tokens": 1})
    site = Site("blk", targets=("attn",))
    layout = TokenLayout((4, 4))
    instance = registry.strategy(strategy)(config)
    return SitePatch(site, instance, config, StepState(), lambda s, x: layout)


@pytest.mark.parametrize(("strategy", "reads"), [("faulty", 1), ("tome", 0), ("retom", 0)])
def test_values_are_checked_once_per_fresh_plan_and_only_for_third_party_strategies(
    strategy, reads, monkeypatch
):
    """A third-party plan's indices are read back once, when it is made; a cached plan is not
    checked again; the built-in strategies' plans get the structure checks alone."""
    checked = []
    original = plan_check._value_problem
    monkeypatch.setattr(plan_check, "_value_problem", lambda plan: checked.append(plan) or None)
    patch = _site_patch(strategy)
    x = torch.randn(2, N, CHANNELS)
    patch.begin_call(new_generation=True)
    first = patch.plan_for(x)
    for _ in range(2):  # the next steps of the generation reuse the cached plan: no new check
        patch.begin_call(new_generation=False, replan=False)
        assert patch.plan_for(x) is first
    assert len(checked) == reads
    assert first.num_merged == 4
    if reads:
        assert original(checked[0]) is None  # the real check passes the well-formed plan


def test_checks_values_follows_the_make_plan_that_runs():
    from tokenmerge.strategies.random import RandomStrategy

    class Inherits(RandomStrategy):  # runs tokenmerge's own make_plan
        pass

    class Overrides(RandomStrategy):
        def make_plan(self, *args):
            return super().make_plan(*args)

    assert not plan_check.checks_values(RandomStrategy)
    assert not plan_check.checks_values(Inherits)
    assert plan_check.checks_values(Overrides)
    assert plan_check.checks_values(FaultyStrategy)


def test_an_assignment_out_of_range_is_a_plan_problem_not_a_torch_error():
    # a strategy's from_assignment plan builds its fields only when applied: its sources and
    # destinations are checked first, so the value check never indexes out of range
    for src, dst, name in [([[4]], [[0]], "src holds 4..4"), ([[1]], [[-1]], "dst_token holds")]:
        plan = Plan.from_assignment(torch.tensor(src), torch.tensor(dst), 4)
        problem = plan_check.plan_problem(plan, num_tokens=4, batch=1)
        assert problem is not None and name in problem and "outside 0..3" in problem, problem
    good = Plan.from_assignment(torch.tensor([[1]]), torch.tensor([[0]]), 4)
    assert plan_check.plan_problem(good, num_tokens=4, batch=1) is None
