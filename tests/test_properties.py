"""Property-based checks of the whole patch life cycle: ``apply``, forwards, ``remove``.

Hypothesis draws the configs, selectors, grids, batch sizes, dtypes and call orders; every case
checks the invariants a user relies on, whatever they asked for:

- output shapes never change;
- at ratio 0, and after ``remove``, the model is bit-identical to the unpatched one;
- a merged forward equals an independent reference: each site's plan (read back from the patch)
  applied by a one-hot matrix product, nothing shared with ``Plan.merge`` / ``Plan.unmerge``;
- every failure is a ``TokenMergeError``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from toy_models import Attention
from transformer_models import FAMILIES, run
from transformer_models import inputs as transformer_inputs
from vit_models import make_vit, pixels

import tokenmerge
from tokenmerge import AlreadyAppliedError, ShortfallWarning, TokenMergeError
from tokenmerge.plan import Plan
from tokenmerge_bench.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STRATEGIES = ("tome", "retom", "random")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
#: how far a merged forward may drift from the reference merge: summation order only
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}
CHANNELS = 8
PROPERTIES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Residual(nn.Module):
    """``x + tanh(W x)``: a token-wise block, so a merged call is exactly
    ``unmerge(block(merge(x)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(CHANNELS, CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


def toy_model(kinds: list[str], dtype: torch.dtype, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [Residual() if kind == "mlp" else Attention(CHANNELS) for kind in kinds]
    return nn.Sequential(*layers).to(dtype).eval()


def reference_merge(plan: Plan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's merge as a one-hot product: slot j is the mean of the tokens whose origin is j.

    Returns the merged tokens and the one-hot ``(B, N, M)`` assignment for the unmerge.
    """
    origin = plan.origin.expand(x.shape[0], -1)
    onehot = F.one_hot(origin, plan.num_out).to(torch.float64)
    summed = onehot.transpose(1, 2) @ x.to(torch.float64)
    merged = summed / onehot.sum(1).unsqueeze(-1)
    return merged.to(x.dtype), onehot


def reference_forward(
    model: nn.Sequential, plans: dict[str, Plan], x: torch.Tensor
) -> torch.Tensor:
    for name, layer in model.named_children():
        if name not in plans:
            x = layer(x)
            continue
        merged, onehot = reference_merge(plans[name], x)
        x = (onehot @ layer(merged).to(torch.float64)).to(x.dtype)
    return x


def hooks(model: nn.Module) -> list[int]:
    """How many hooks each module has (a removed patch leaves none behind)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks")
    return [len(getattr(module, kind)) for module in model.modules() for kind in kinds]


@contextlib.contextmanager
def shortfalls_reported(handle: tokenmerge.Handle) -> Iterator[None]:
    """A ``ShortfallWarning`` is documented behaviour (a partition that cannot give up as many
    tokens as asked); it must name a site whose ``stats()`` then show the shortfall."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShortfallWarning)
        yield
    shortfall = {name for name, s in handle.stats().items() if s.shortfall > 0}
    for warning in caught:
        assert issubclass(warning.category, ShortfallWarning), warning.message
        assert any(f"site {name!r}" in str(warning.message) for name in shortfall)


@st.composite
def generic_cases(draw: st.DrawFn) -> dict:
    depth = draw(st.integers(1, 4))
    kinds = draw(st.lists(st.sampled_from(["mlp", "attn"]), min_size=depth, max_size=depth))
    names = [str(i) for i in range(depth)]
    include = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return {
        "kinds": kinds,
        "include": include,
        "grid": (height, width),
        "prefix": draw(st.integers(0, 2)),
        "batch": draw(st.integers(0, 3)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "strategy": draw(st.sampled_from(STRATEGIES)),
        "ratio": draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75])),
        "seed": draw(st.integers(0, 2**16)),
        # forwards on fresh inputs, or a new generation in between
        "calls": draw(st.lists(st.sampled_from(["forward", "new_generation"]), max_size=3)),
    }


def _inputs(case: dict, seed: int) -> torch.Tensor:
    height, width = case["grid"]
    generator = torch.Generator().manual_seed(seed)
    tokens = case["prefix"] + height * width
    x = torch.randn(case["batch"], tokens, CHANNELS, generator=generator)
    return x.to(case["dtype"])


def _apply(model: nn.Module, case: dict) -> tokenmerge.Handle:
    return tokenmerge.apply(
        model,
        case["strategy"],
        ratio=case["ratio"],
        value_correction=False,
        adapter="generic",
        sites={"include": case["include"], "min_tokens": 1},
        adapter_options={"grid": case["grid"], "num_prefix": case["prefix"]},
    )


@PROPERTIES
@given(case=generic_cases())
def test_generic_forward_matches_a_reference_merge_and_removal_restores(case):
    model = toy_model(case["kinds"], case["dtype"], case["seed"])
    original = copy.deepcopy(model)
    handle = _apply(model, case)
    for step, call in enumerate(["forward", *case["calls"], "forward"]):
        if call == "new_generation":
            handle.new_generation()
            continue
        x = _inputs(case, case["seed"] + step)
        with torch.no_grad(), shortfalls_reported(handle):
            y = model(x)
            expected = original(x)
            assert y.shape == expected.shape and y.dtype == expected.dtype
            plans = {p.site.name: p.last_plan for p in handle.patches if p.last_plan is not None}
            if case["ratio"] == 0:
                assert torch.equal(y, expected)
                assert all(plan.is_identity for plan in plans.values())
                continue
            if case["batch"] == 0:  # a documented pass-through: the module sees its input
                assert torch.equal(y, expected)
                assert all(s.passed_through > 0 for s in handle.stats().values())
                continue
            for plan in plans.values():
                assert plan.num_tokens == x.shape[1]
                # prefix tokens stay themselves, in their own slots
                prefix = torch.arange(case["prefix"])
                assert torch.equal(plan.origin[:, : case["prefix"]], prefix.expand(plan.batch, -1))
            reference = reference_forward(original, plans, x)
            tolerance = TOLERANCE[case["dtype"]]
            torch.testing.assert_close(y, reference, rtol=tolerance, atol=tolerance)
    handle.remove()
    x = _inputs(case, case["seed"] + 99)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    assert hooks(model) == hooks(original)


# ---------------------------------------------------------------------------- bad input


BAD_OPTIONS = st.one_of(
    st.fixed_dictionaries({"ratio": st.sampled_from([-0.1, 1.5, float("nan"), "half", None])}),
    st.fixed_dictionaries({"cache_interval": st.sampled_from([0, -1, 2.5, "2"])}),
    st.fixed_dictionaries({"sites": st.sampled_from([{"include": ["nope"]}, {"min_tokens": -1}])}),
    st.fixed_dictionaries({"strategy": st.sampled_from(["tme", "", "ToMe!"])}),
    st.fixed_dictionaries({"adapter_options": st.sampled_from([{"grid": (0, 3)}, {"nope": 1}])}),
    st.fixed_dictionaries({"adapter": st.sampled_from(["nope", "diffusers-unet"])}),
)


@PROPERTIES
@given(bad=BAD_OPTIONS, case=generic_cases())
def test_bad_options_raise_a_tokenmerge_error_and_leave_the_model_untouched(bad, case):
    model = toy_model(case["kinds"], case["dtype"], case["seed"])
    original = copy.deepcopy(model)
    options = {
        "ratio": 0.5,
        "adapter": "generic",
        "sites": {"include": case["include"], "min_tokens": 1},
        "adapter_options": {"grid": case["grid"], "num_prefix": case["prefix"]},
    }
    options.update(bad)
    strategy = options.pop("strategy", case["strategy"])
    with pytest.raises(TokenMergeError):
        tokenmerge.apply(model, strategy, **options)
    x = _inputs(case, case["seed"])
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    assert not hasattr(model, "_tokenmerge_handle")


# ---------------------------------------------------------------------------- diffusers UNet


@functools.cache
def _unet() -> nn.Module:
    """Attention at level 1 and in the mid block, at a width that runs in milliseconds."""
    return get_preset("tiny-unet").build()


@st.composite
def unet_cases(draw: st.DrawFn) -> dict:
    ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
    if draw(st.booleans()):
        ratio = {"down": ratio, "*": draw(st.sampled_from([0.0, 0.3, 0.6]))}
    steps = draw(st.lists(st.integers(0, 999), min_size=1, max_size=4))
    return {
        "strategy": draw(st.sampled_from(STRATEGIES)),
        "ratio": ratio,
        "cache_interval": draw(st.integers(1, 3)),
        "mlp": draw(st.booleans()),
        "batch": draw(st.integers(1, 2)),
        "size": draw(st.sampled_from([(16, 16), (12, 20)])),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        # timesteps as a sampler would give them, with restarts where they rise
        "timesteps": steps,
    }


def _unet_inputs(case: dict, step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    batch, (height, width), dtype = case["batch"], case["size"], case["dtype"]
    return {
        "sample": torch.randn(batch, 4, height, width, generator=generator).to(dtype),
        "timestep": torch.tensor(case["timesteps"][step]),
        "encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator).to(dtype),
    }


#: one fixed call for the call-order property
UNET_CALL = {"batch": 2, "size": (16, 16), "dtype": torch.float32, "timesteps": [500]}


def _is_zero(ratio: float | dict) -> bool:
    return all(v == 0 for v in ratio.values()) if isinstance(ratio, dict) else ratio == 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=unet_cases())
def test_unet_shapes_ratio_zero_and_removal(case):
    original = copy.deepcopy(_unet()).to(case["dtype"])
    model = copy.deepcopy(original)
    handle = tokenmerge.apply(
        model,
        case["strategy"],
        ratio=case["ratio"],
        cache_interval=case["cache_interval"],
        sites={"mlp": case["mlp"], "min_tokens": 1},
    )
    with torch.no_grad():
        for step in range(len(case["timesteps"])):
            kwargs = _unet_inputs(case, step)
            with shortfalls_reported(handle):
                y = model(**kwargs).sample
            expected = original(**kwargs).sample
            assert y.shape == expected.shape and y.dtype == expected.dtype
            assert torch.isfinite(y.float()).all()
            if _is_zero(case["ratio"]):
                assert torch.equal(y, expected)
        merged = [s for s in handle.stats().values() if s.tokens_out < s.tokens_in]
        assert bool(merged) != _is_zero(case["ratio"])
        handle.remove()
        kwargs = _unet_inputs(case, 0)
        assert torch.equal(model(**kwargs).sample, original(**kwargs).sample)
    assert hooks(model) == hooks(original)


# ---------------------------------------------------------------------------- timm ViT


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strategy=st.sampled_from(STRATEGIES),
    r=st.integers(0, 12),
    batch=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_vit_shapes_r_zero_and_removal(strategy, r, batch, dtype):
    original = make_vit().to(dtype)
    model = copy.deepcopy(original)
    handle = tokenmerge.apply(model, strategy, r=r)
    x = pixels(batch).to(dtype)
    with torch.no_grad():
        with shortfalls_reported(handle):
            y = model(x)
        expected = original(x)
        assert y.shape == expected.shape and y.dtype == expected.dtype
        if r == 0:
            assert torch.equal(y, expected)
        tokens_out = [s.tokens_out for s in handle.stats().values()]
        assert (sum(tokens_out) < sum(s.tokens_in for s in handle.stats().values())) == (r > 0)
        handle.remove()
        assert torch.equal(model(x), original(x))
    assert hooks(model) == hooks(original)


# -------------------------------------------------------------------- diffusers transformers


@functools.cache
def _transformer(family: str) -> nn.Module:
    return FAMILIES[family]()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    strategy=st.sampled_from(STRATEGIES),
    ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    batch=st.integers(1, 2),
    grid=st.sampled_from([(4, 4), (6, 4), (8, 6)]),
    mlp=st.booleans(),
)
def test_transformer_shapes_ratio_zero_and_removal(family, strategy, ratio, batch, grid, mlp):
    original = _transformer(family)
    model = copy.deepcopy(original)
    handle = tokenmerge.apply(model, strategy, ratio=ratio, sites={"mlp": mlp, "min_tokens": 1})
    kwargs = transformer_inputs(family, batch, grid)
    with shortfalls_reported(handle):
        y = run(model, kwargs)
    expected = run(original, kwargs)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert torch.isfinite(y).all()
    if ratio == 0:
        assert torch.equal(y, expected)
    else:
        assert any(s.tokens_out < s.tokens_in for s in handle.stats().values())
    handle.remove()
    assert torch.equal(run(model, kwargs), expected)
    assert hooks(model) == hooks(original)


# ---------------------------------------------------------------------------- call orders

ACTIONS = ("apply", "apply_again", "forward", "new_generation", "remove", "remove_again")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=6))
def test_any_call_order_behaves(actions):
    """apply / forward / new_generation / remove in any order: a second ``apply`` raises
    ``AlreadyAppliedError`` and changes nothing, ``remove`` is idempotent, and the model computes
    exactly the unpatched result whenever no patch is on it."""
    original = _unet()
    model = copy.deepcopy(original)
    handle = None
    kwargs = _unet_inputs(UNET_CALL, 0)
    for action in actions:
        patched = handle is not None and not handle.removed
        if action in ("apply", "apply_again"):
            if patched:
                with pytest.raises(AlreadyAppliedError):
                    tokenmerge.apply(model, "retom", ratio=0.5, sites={"min_tokens": 1})
            else:
                handle = tokenmerge.apply(model, "retom", ratio=0.5, sites={"min_tokens": 1})
        elif action == "forward":
            with torch.no_grad():
                y, expected = model(**kwargs).sample, original(**kwargs).sample
            assert y.shape == expected.shape
            assert torch.equal(y, expected) != patched
        elif action == "new_generation" and handle is not None:
            handle.new_generation()
        elif action.startswith("remove") and handle is not None:
            handle.remove()
            assert tokenmerge.remove(model) is False
            assert hooks(model) == hooks(original)
