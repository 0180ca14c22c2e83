"""Step state (``tokenmerge.state``) and the per-site plan cache it drives."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_models import Attention

import tokenmerge
from tokenmerge.state import ScheduleStep, StepState, read_timestep, timestep_value

DIM = 16
TIMESTEPS = [999.0, 900.0, 800.0, 700.0, 600.0, 500.0, 400.0]


# ---------------------------------------------------------------------------- StepState


def test_initial_state() -> None:
    state = StepState()
    assert (state.generation, state.step, state.call, state.timestep) == (0, 0, 0, None)


def test_first_call_starts_a_generation() -> None:
    state = StepState()
    state.begin_call(999.0)
    assert (state.generation, state.step, state.call, state.timestep) == (1, 0, 1, 999.0)


def test_lower_timestep_is_next_step() -> None:
    state = StepState()
    for index, t in enumerate(TIMESTEPS):
        state.begin_call(t)
        assert (state.generation, state.step, state.call, state.timestep) == (
            1,
            index,
            index + 1,
            t,
        )


def test_equal_timestep_is_same_step() -> None:
    state = StepState()
    state.begin_call(999.0)
    state.begin_call(900.0)
    state.begin_call(900.0)
    assert (state.generation, state.step, state.call, state.timestep) == (1, 1, 3, 900.0)
    state.begin_call(800.0)
    assert (state.generation, state.step) == (1, 2)


def test_higher_timestep_starts_new_generation() -> None:
    state = StepState()
    for t in (999.0, 900.0, 800.0):
        state.begin_call(t)
    state.begin_call(850.0)
    assert (state.generation, state.step, state.call, state.timestep) == (2, 0, 4, 850.0)
    state.begin_call(100.0)
    assert (state.generation, state.step) == (2, 1)


def test_none_timestep_is_new_generation_every_call() -> None:
    state = StepState()
    for call in range(1, 4):
        state.begin_call(None)
        assert (state.generation, state.step, state.call, state.timestep) == (call, 0, call, None)
    # a timestep after a call without one also starts a generation, at step 0
    state.begin_call(10.0)
    assert (state.generation, state.step, state.timestep) == (4, 0, 10.0)
    state.begin_call(None)
    assert (state.generation, state.step, state.timestep) == (5, 0, None)


def test_new_generation_resets_step_and_timestep() -> None:
    state = StepState()
    state.begin_call(999.0)
    state.begin_call(900.0)
    state.new_generation()
    assert (state.generation, state.step, state.timestep) == (2, 0, None)
    assert state.call == 2  # calls are not generations
    state.begin_call(800.0)  # no previous timestep: yet another generation
    assert (state.generation, state.step, state.timestep) == (3, 0, 800.0)


def test_zero_and_negative_timesteps_count_steps() -> None:
    state = StepState()
    for index, t in enumerate((1.0, 0.0, -1.0)):
        state.begin_call(t)
        assert (state.generation, state.step) == (1, index)


# ---------------------------------------------------------------------------- timestep_value


@pytest.mark.parametrize(
    ("timestep", "expected"),
    [
        (None, None),
        (999, 999.0),
        (999.5, 999.5),
        (0, 0.0),
        (torch.tensor(7), 7.0),
        (torch.tensor(7.5), 7.5),
        (torch.tensor([3.0]), 3.0),
        (torch.tensor([5.0, 1.0, 2.0]), 5.0),
        (torch.tensor([[4, 9], [1, 2]]), 4.0),
        (torch.tensor(2.5, dtype=torch.float16), 2.5),
        (torch.tensor(2.5, dtype=torch.bfloat16), 2.5),
        (torch.tensor([1.5], dtype=torch.float64), 1.5),
        (torch.tensor([]), None),
        (torch.empty(2, 0), None),
    ],
)
def test_timestep_value(timestep: object, expected: float | None) -> None:
    value = timestep_value(timestep)
    assert value == expected
    if expected is not None:
        assert type(value) is float


def test_timestep_value_of_tensor_requiring_grad() -> None:
    t = torch.tensor([3.0], requires_grad=True)
    assert timestep_value(t) == 3.0


# ---------------------------------------------------------------------------- plan cache


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class TinyDenoiser(nn.Module):
    """Image tokens ``(B, N, C)`` behind one class token, with an optional ``timestep``."""

    num_prefix = 1

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.time_embed = nn.Linear(1, DIM)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.blocks = nn.ModuleList(Block(DIM) for _ in range(depth))

    def forward(self, x: torch.Tensor, timestep: object = None) -> torch.Tensor:
        if timestep is not None:
            t = torch.as_tensor(timestep, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
            x = x + self.time_embed(t)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return x


def make_model() -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser().eval()


def make_input(batch: int = 2, tokens: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, DIM, generator=torch.Generator().manual_seed(seed))


def patch(
    model: nn.Module,
    strategy: str = "retom",
    *,
    grid: tuple[int, int] | None = None,
    timestep_arg: str | int | None = "timestep",
    **overrides: object,
) -> tokenmerge.Handle:
    options: dict[str, object] = {"num_prefix": 1, "timestep_arg": timestep_arg}
    if grid is not None:
        options["grid"] = grid
    overrides.setdefault("ratio", 0.5)
    return tokenmerge.apply(
        model,
        strategy,
        adapter="generic",
        sites={"include": ["blocks.*.attn"], "min_tokens": 1, **overrides.pop("sites", {})},
        adapter_options=options,
        **overrides,
    )


def counts(handle: tokenmerge.Handle) -> list[tuple[int, int]]:
    return [(s.plans_computed, s.plans_reused) for s in handle.stats().values()]


def plans(handle: tokenmerge.Handle) -> list[object]:
    return [p.last_plan for p in handle.patches]


@pytest.mark.parametrize("interval", [1, 2, 3, 5])
def test_cache_interval_reuses_then_recomputes(interval: int) -> None:
    model = make_model()
    handle = patch(model, cache_interval=interval)
    seen = []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            model(make_input(seed=step), timestep=t)
            seen.append(plans(handle))
    for step in range(1, len(TIMESTEPS)):
        for site in range(len(handle.patches)):
            same = seen[step][site] is seen[step - 1][site]
            assert same == (step % interval != 0), (step, site)
    computed = len(range(0, len(TIMESTEPS), interval))
    assert counts(handle) == [(computed, len(TIMESTEPS) - computed)] * 2
    for stats in handle.stats().values():
        assert stats.calls == len(TIMESTEPS)
        assert stats.tokens_out == 17 - 8  # reused plans report the same tokens
    handle.remove()


def test_reused_plan_is_applied_to_new_features() -> None:
    """A reused plan is the step-0 plan, and it is applied to the new step's tokens."""
    model = make_model()
    handle = patch(model, cache_interval=2)
    x0, x1 = make_input(seed=1), make_input(seed=2)
    with torch.no_grad():
        model(x0, timestep=999.0)
        cached = plans(handle)
        y1 = model(x1, timestep=900.0)
        assert plans(handle) == cached
        handle.remove()
        fresh = patch(model, cache_interval=2)
        assert not torch.equal(model(x1, timestep=900.0), y1)  # planned on x1 this time
    fresh.remove()


def test_same_timestep_plans_when_its_step_plans() -> None:
    """A repeated timestep (e.g. the CFG halves as two calls) follows its step's decision: with
    interval 1 each call plans on its own input (as tomesd); on a reuse step it reuses."""
    model = make_model()
    handle = patch(model, cache_interval=1)
    with torch.no_grad():
        model(make_input(seed=1), timestep=999.0)
        first = plans(handle)
        model(make_input(seed=2), timestep=999.0)  # e.g. the other guidance half
        assert all(a is not b for a, b in zip(plans(handle), first, strict=True))
    assert counts(handle) == [(2, 0)] * 2
    handle.remove()
    handle = patch(model, cache_interval=2)
    with torch.no_grad():
        model(make_input(seed=1), timestep=999.0)
        model(make_input(seed=2), timestep=999.0)  # step 0 plans: a new plan again
        model(make_input(seed=3), timestep=900.0)  # step 1: reuse
        model(make_input(seed=4), timestep=900.0)  # still step 1: reuse
    assert counts(handle) == [(2, 2)] * 2
    handle.remove()


def test_timestep_going_up_recomputes() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5)
    with torch.no_grad():
        model(make_input(), timestep=999.0)
        model(make_input(), timestep=900.0)
        before = plans(handle)
        assert counts(handle) == [(1, 1)] * 2
        model(make_input(), timestep=999.0)  # a new generation
    assert all(a is not b for a, b in zip(plans(handle), before, strict=True))
    assert counts(handle) == [(2, 1)] * 2
    assert handle.state.step == 0
    handle.remove()


def test_batch_size_change_recomputes() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5)
    with torch.no_grad():
        model(make_input(batch=2), timestep=999.0)
        before = plans(handle)
        model(make_input(batch=1), timestep=900.0)
    assert all(a is not b for a, b in zip(plans(handle), before, strict=True))
    assert counts(handle) == [(2, 0)] * 2
    handle.remove()


def test_token_count_change_recomputes() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5)  # no grid option: square grids inferred
    with torch.no_grad():
        model(make_input(tokens=16), timestep=999.0)
        before = plans(handle)
        y = model(make_input(tokens=25), timestep=900.0)
    assert y.shape == (2, 26, DIM)
    assert all(a is not b for a, b in zip(plans(handle), before, strict=True))
    assert plans(handle)[0].num_tokens == 26
    assert counts(handle) == [(2, 0)] * 2
    assert handle.stats()["blocks.0.attn"].tokens_out == 26 - 12
    handle.remove()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_change_recomputes(dtype: torch.dtype) -> None:
    model = make_model()
    handle = patch(model, cache_interval=5)
    x = make_input()
    with torch.no_grad():
        model(x, timestep=999.0)
        before = plans(handle)
        model.to(dtype)
        y = model(x.to(dtype), timestep=900.0)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert all(a is not b for a, b in zip(plans(handle), before, strict=True))
    assert counts(handle) == [(2, 0)] * 2
    handle.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_change_recomputes() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5)
    x = make_input()
    with torch.no_grad():
        model(x, timestep=999.0)
        before = plans(handle)
        model.cuda()
        y = model(x.cuda(), timestep=900.0)
    assert y.device.type == "cuda" and torch.isfinite(y).all()
    assert all(a is not b for a, b in zip(plans(handle), before, strict=True))
    assert all(plan.device.type == "cuda" for plan in plans(handle))
    assert counts(handle) == [(2, 0)] * 2
    with torch.no_grad():
        model(x.cuda(), timestep=800.0)
    assert counts(handle) == [(2, 1)] * 2
    handle.remove()


def test_new_generation_forces_recompute() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5)
    with torch.no_grad():
        model(make_input(), timestep=999.0)
        model(make_input(), timestep=900.0)
        before = plans(handle)
        handle.new_generation()
        model(make_input(), timestep=800.0)
    assert all(a is not b for a, b in zip(plans(handle), before, strict=True))
    assert counts(handle) == [(2, 1)] * 2
    handle.remove()


def test_without_timestep_every_call_recomputes() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5)
    seen = []
    with torch.no_grad():
        for _ in range(3):
            model(make_input())
            seen.append(plans(handle))
    assert seen[0][0] is not seen[1][0] and seen[1][0] is not seen[2][0]
    assert counts(handle) == [(3, 0)] * 2
    handle.remove()


def test_without_timestep_arg_every_call_recomputes() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5, timestep_arg=None)
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            model(make_input(), timestep=t)  # the adapter was not told where to look
    assert counts(handle) == [(3, 0)] * 2
    handle.remove()


def test_positional_timestep_arg() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5, timestep_arg=1)
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            model(make_input(), torch.tensor([t, t]))
    assert counts(handle) == [(1, 2)] * 2
    assert handle.state.timestep == TIMESTEPS[2]
    handle.remove()


def test_tensor_timestep_keyword() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5)
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            model(make_input(), timestep=torch.tensor([t, t]))
    assert counts(handle) == [(1, 2)] * 2
    assert handle.state.step == 2 and handle.state.call == 3
    handle.remove()


def test_each_site_has_its_own_plan_within_a_call() -> None:
    model = make_model()
    handle = patch(model, cache_interval=5)
    with torch.no_grad():
        model(make_input(), timestep=999.0)
    first, second = plans(handle)
    assert first is not second
    handle.remove()


# ---------------------------------------------------------------------------- read_timestep


def test_a_step_of_a_schedule_is_placed_without_reading_it():
    schedule = torch.tensor([999.0, 979.0, 959.0, 939.0])
    for index, t in enumerate(schedule):  # as pipelines iterate scheduler.timesteps
        for passed in (t, t.expand(2), t[None]):
            step = read_timestep(passed)
            assert isinstance(step, ScheduleStep) and step.index == index
            assert step.schedule() is schedule
    later = torch.tensor([5.0, 4.0, 3.0])[1:][1]  # a view of a view: placed in the root tensor
    assert read_timestep(later).index == 2


@pytest.mark.parametrize(
    "timestep",
    [
        torch.tensor(999.0),  # made for the call
        torch.tensor([999.0])[0],  # a one-element base is no schedule
        torch.tensor([999.0, 979.0]) / 1000,  # computed from a schedule: a tensor of its own
        torch.tensor([[999.0, 979.0]])[0, 1],  # a 2-D base
    ],
)
def test_anything_else_is_read(timestep):
    assert read_timestep(timestep) == timestep_value(timestep)


def test_schedule_steps_order_a_generation():
    schedule = torch.tensor([999.0, 979.0, 959.0, 939.0, 919.0])
    state = StepState(cache_interval=2)
    started = [state.begin_call(read_timestep(schedule[i])) for i in (0, 1, 1, 2)]
    assert started == [True, False, False, False]
    assert (state.step, state.replan, state.generation) == (2, True, 1)
    assert state.begin_call(read_timestep(schedule[0]))  # back to the start: a new generation
    other = schedule.clone()  # the same values in another schedule tensor: another generation
    assert not state.begin_call(read_timestep(schedule[1]))
    assert state.begin_call(read_timestep(other[2]))
    assert state.begin_call(999.0)  # a number after a place: not comparable, a new generation
    assert not state.begin_call(979)  # numbers, ints included, order as before
    assert state.step == 1


def test_a_state_holding_a_schedule_step_pickles_and_copies():
    import copy
    import pickle

    state = StepState()
    state.begin_call(read_timestep(torch.tensor([2.0, 1.0])[0]))
    assert copy.deepcopy(state).timestep.index == 0
    assert pickle.loads(pickle.dumps(state)).timestep is None  # starts a generation afresh
