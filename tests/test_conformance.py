"""The conformance matrix, built from the registries: the plugin authoring kit on everything.

Every registered strategy x every check of ``tokenmerge.testing.STRATEGY_CHECKS``, and every
available registered adapter x its tiny models x every strategy x every check of
``ADAPTER_CHECKS`` - the same code a plugin runs from its own tests. A newly registered adapter
fails ``test_every_adapter_has_tiny_models`` until it gets tiny models in ``TINY_MODELS``.

The second half checks the kit itself: deliberately broken strategies and adapters must fail
the check that is about them, with a message naming the check, the plugin and what was wrong.
"""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import pytest
import torch
from diffusers_zoo import ZOO, output_of
from hierarchical_models import FAMILIES as HIERARCHICAL
from hierarchical_models import build as build_hierarchical
from hierarchical_models import runner as run_hierarchical
from pydantic import ConfigDict, Field
from timm_more_models import make_beit_both, make_naflexvit
from torch import nn
from toy_models import Attention
from transformer_models import FAMILIES, inputs
from unet_models import tiny_svd_unet, tiny_unet2d
from vit_models import FAMILIES as VIT_FAMILIES
from vit_models import pixels

import tokenmerge
from tokenmerge.adapters.generic import GenericAdapter
from tokenmerge.extend import AdapterSpec, Plan
from tokenmerge.registry import registry
from tokenmerge.strategies.random import RandomConfig, RandomStrategy
from tokenmerge.strategies.tome import ToMeConfig, ToMeStrategy
from tokenmerge.testing import (
    ADAPTER_CHECKS,
    STRATEGY_CHECKS,
    check_adapter,
    check_plan,
    check_strategy,
)
from tokenmerge_bench.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STRATEGIES = tokenmerge.list_strategies()
ADAPTERS = tokenmerge.list_adapters()


# ---------------------------------------------------------------------------- tiny models

DIM = 16


class ToyStack(nn.Module):
    """A class token, then two residual blocks of the toy attention module."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.blocks = nn.ModuleList(Attention(DIM) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = x + block(x)
        return x


def toy_stack() -> ToyStack:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ToyStack().eval()


TOY_INPUT = torch.randn(2, 15, DIM, generator=torch.Generator().manual_seed(1))


def run_toy(model: nn.Module) -> torch.Tensor:
    return model(TOY_INPUT)


def tiny_unet() -> nn.Module:
    return get_preset("tiny-unet").build()


_UNET_GEN = torch.Generator().manual_seed(1)
UNET_SAMPLE = torch.randn(2, 4, 16, 16, generator=_UNET_GEN)
UNET_TEXT = torch.randn(2, 7, 32, generator=_UNET_GEN)


def run_unet(model: nn.Module) -> Any:
    return model(UNET_SAMPLE, 999, encoder_hidden_states=UNET_TEXT)


UNET2D_SAMPLE = torch.randn(2, 3, 16, 16, generator=_UNET_GEN)


def run_unet2d(model: nn.Module) -> Any:
    return model(UNET2D_SAMPLE, 999)


SVD_SAMPLE = torch.randn(2, 3, 4, 16, 16, generator=_UNET_GEN)  # 3 frames
SVD_IMAGE = torch.randn(2, 1, 32, generator=_UNET_GEN)
SVD_ADDED = torch.tensor([[6.0, 127.0, 0.02]]).repeat(2, 1)  # fps, motion bucket, noise aug


def run_svd(model: nn.Module) -> Any:
    return model(SVD_SAMPLE, 999, SVD_IMAGE, SVD_ADDED)


def run_transformer(family: str) -> Callable[[nn.Module], Any]:
    kwargs = inputs(family)
    return lambda model: model(**kwargs)


def run_zoo(name: str) -> Callable[[nn.Module], Any]:
    kwargs = ZOO[name].inputs(2)
    return lambda model: output_of(model, kwargs)


ZOO_OVERRIDES = {"sites": {"min_tokens": 1, "mlp": True}}


def run_vit(family: str) -> Callable[[nn.Module], Any]:
    return VIT_FAMILIES[family].run


def run_timm(model: nn.Module) -> Any:
    return model(pixels())


def vit_model(family: str) -> Callable[[], nn.Module]:
    return VIT_FAMILIES[family].build


@dataclass(frozen=True)
class TinyModel:
    """A model an adapter is checked on: how to build it, run it and patch it."""

    name: str
    factory: Callable[[], nn.Module]
    run: Callable[[nn.Module], Any]
    overrides: dict[str, Any] = field(default_factory=dict)


#: every registered adapter needs at least one entry here
TINY_MODELS: dict[str, list[TinyModel]] = {
    "generic": [
        TinyModel(
            "toy-attention-cls-3x5",
            toy_stack,
            run_toy,
            {
                "adapter_options": {"grid": (3, 5), "num_prefix": 1},
                "sites": {"include": ["blocks.*"], "min_tokens": 1},
            },
        )
    ],
    "diffusers_unet": [
        TinyModel("tiny-unet", tiny_unet, run_unet, {"sites": {"min_tokens": 1}}),
        TinyModel("tiny-unet2d", tiny_unet2d, run_unet2d, {"sites": {"min_tokens": 1}}),
        TinyModel("tiny-svd", tiny_svd_unet, run_svd, {"sites": {"min_tokens": 1}}),
    ],
    "diffusers_dit": [
        TinyModel(
            f"tiny-{family}",
            FAMILIES[family],
            run_transformer(family),
            {"sites": {"min_tokens": 1}},
        )
        for family in ("dit", "pixart", "sd3")
    ],
    "diffusers_flux": [
        TinyModel(
            "tiny-flux", FAMILIES["flux"], run_transformer("flux"), {"sites": {"min_tokens": 1}}
        ),
        TinyModel("tiny-chroma", ZOO["chroma"].build, run_zoo("chroma"), ZOO_OVERRIDES),
    ],
    "diffusers_transformer": [
        TinyModel(f"tiny-{name}", ZOO[name].build, run_zoo(name), ZOO_OVERRIDES)
        for name in (
            "sana",
            "qwen_image",
            "hunyuan_dit",
            "cogview3plus",
            "cogview4",
            "auraflow",
            "wan",
            "hunyuan_video",
            "ltx",
            "cogvideox",
            "mochi",
            "allegro",
            "omnigen",
            "lumina_next",
            "lumina2",
            "hidream",
        )
    ],
    # progressive mode (the default) merges at most half of a block's tokens: the checks' 0.5
    "timm_vit": [
        TinyModel("tiny-vit", vit_model("vit"), run_vit("vit")),
        TinyModel(
            "tiny-vit-registers-local",
            vit_model("registers"),
            run_vit("registers"),
            {"adapter_options": {"mode": "local"}},
        ),
        TinyModel("tiny-eva02", vit_model("eva02"), run_vit("eva02")),
        TinyModel("tiny-timm-beit", make_beit_both, run_timm),
        TinyModel("tiny-naflexvit", make_naflexvit, run_timm),
    ],
    "timm_hierarchical": [
        TinyModel(
            f"tiny-{family}",
            partial(build_hierarchical, HIERARCHICAL[family]),
            run_hierarchical(HIERARCHICAL[family]),
        )
        for family in ("swin", "coatnet")
    ],  # fmt: skip
    "transformers_vit": [
        TinyModel(
            "tiny-vit-classifier", vit_model("hf_vit_classifier"), run_vit("hf_vit_classifier")
        ),
        TinyModel("tiny-clip", vit_model("clip"), run_vit("clip")),
        *(
            TinyModel(f"tiny-{family}", vit_model(family), run_vit(family))
            for family in (
                "hf_deit",
                "dinov2",
                "dinov2_registers",
                "siglip_vision",
                "hf_beit",
                "data2vec_vision",
                "vit_mae",
            )
        ),
    ],
}


# ---------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize(
    "strategy, check",
    [pytest.param(s, c, id=f"{s}-{c}") for s in STRATEGIES for c in STRATEGY_CHECKS],
)
def test_strategy_conformance(strategy: str, check: str) -> None:
    STRATEGY_CHECKS[check](registry.strategy(strategy), None)


#: the check that takes nine tenths of the matrix's time (a compile per case): every strategy on
#: each adapter's first model, the default strategy on its others (their hooks are the same code)
COMPILE_CHECK = "works_under_torch_compile"


def _adapter_cases() -> list:
    return [
        pytest.param(
            adapter, model, strategy, check, id=f"{adapter}-{model.name}-{strategy}-{check}"
        )
        for adapter in tokenmerge.list_adapters(available=True)
        for index, model in enumerate(TINY_MODELS.get(adapter, []))
        for strategy in STRATEGIES
        for check in ADAPTER_CHECKS
        if check != COMPILE_CHECK or index == 0 or strategy == "retom"
    ]


@pytest.mark.parametrize("adapter, model, strategy, check", _adapter_cases())
def test_adapter_conformance(adapter: str, model: TinyModel, strategy: str, check: str) -> None:
    ADAPTER_CHECKS[check](model.factory, model.run, strategy, adapter, model.overrides)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_adapter_has_tiny_models(adapter: str) -> None:
    assert TINY_MODELS.get(adapter), (
        f"add tiny models for adapter {adapter!r} to the conformance matrix (TINY_MODELS in "
        "tests/test_conformance.py): the matrix runs every adapter on its tiny models"
    )


def test_tiny_models_belong_to_registered_adapters() -> None:
    stale = sorted(set(TINY_MODELS) - set(ADAPTERS))
    assert not stale, f"tiny models for adapters nobody registers: {stale}"


def test_the_matrix_covers_every_strategy_and_adapter() -> None:
    """Guards the parametrisation above against silently running nothing."""
    assert {"tome", "retom", "random"} <= set(STRATEGIES)
    assert {"generic", "diffusers_unet", "diffusers_dit", "diffusers_flux"} <= set(
        tokenmerge.list_adapters(available=True)
    )
    cases = _adapter_cases()
    adapters = tokenmerge.list_adapters(available=True)
    assert {case.values[0] for case in cases} == set(adapters)
    models = sum(len(TINY_MODELS[a]) for a in adapters)
    # every check but the compile one on every model and strategy; the compile check with every
    # strategy on each adapter's first model, with retom on the others
    compiled = len(adapters) * len(STRATEGIES) + (models - len(adapters))
    assert len(cases) == models * len(STRATEGIES) * (len(ADAPTER_CHECKS) - 1) + compiled


def test_the_kit_needs_torch_only() -> None:
    code = (
        "import sys, tokenmerge.testing\n"
        "heavy = {'pytest', 'hypothesis', 'diffusers', 'timm', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------- the kit catches
# Broken strategies are checked as classes, never registered; each is "broken" with a config
# whose literal says so.


class BrokenConfig(RandomConfig):
    strategy: Literal["broken"] = Field(default="broken", description="Always 'broken'.")


class BrokenToMeConfig(ToMeConfig):
    strategy: Literal["broken"] = Field(default="broken", description="Always 'broken'.")


class BlindBase(RandomStrategy):
    name = "broken"
    config_class = BrokenConfig


class SeeingBase(ToMeStrategy):
    name = "broken"
    config_class = BrokenToMeConfig


class GlobalRng(BlindBase):
    """Draws its destinations from the global RNG."""

    def make_plan(self, features, layout, site, num_merge, rng):
        n = layout.num_image_tokens
        if num_merge == 0:
            return Plan.identity(n)
        order = torch.randperm(n)
        return Plan.from_assignment(
            order[1 : num_merge + 1][None], order[:1].expand(1, num_merge), n
        )


class OneShort(SeeingBase):
    def make_plan(self, features, layout, site, num_merge, rng):
        return super().make_plan(features, layout, site, max(num_merge - 1, 0), rng)


class ClaimsTooMuch(BlindBase):
    def capacity(self, layout, site):
        return layout.num_image_tokens


class Unsorted(BlindBase):
    def make_plan(self, features, layout, site, num_merge, rng):
        plan = super().make_plan(features, layout, site, num_merge, rng)
        return plan.replace(kept=plan.kept.flip(1))


class MutatesFeatures(SeeingBase):
    def make_plan(self, features, layout, site, num_merge, rng):
        features.mul_(-1.0)
        return super().make_plan(features, layout, site, num_merge, rng)


class Stateful(BlindBase):
    """Remembers its calls: the second plan differs from the first."""

    def make_plan(self, features, layout, site, num_merge, rng):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > 1:
            rng.uniform((1,), features.device)  # one draw off the stream
        return super().make_plan(features, layout, site, num_merge, rng)


class RowsPerFeatureBatchOfTwo(SeeingBase):
    def make_plan(self, features, layout, site, num_merge, rng):
        plan = super().make_plan(features, layout, site, num_merge, rng)
        return plan.repeat(2) if plan.batch == 1 and not plan.is_identity else plan


class NotBlind(BlindBase):
    """Says it is content-blind, yet wants features with channels."""

    def make_plan(self, features, layout, site, num_merge, rng):
        assert features.shape[-1] > 0, "no channels"
        return super().make_plan(features, layout, site, num_merge, rng)


class MutableConfig(BrokenConfig):
    model_config = ConfigDict(frozen=False, extra="forbid")


class MutableConfigStrategy(BlindBase):
    config_class = MutableConfig


class UndescribedConfig(BrokenConfig):
    flavour: int = 1


class UndescribedStrategy(BlindBase):
    config_class = UndescribedConfig


@pytest.mark.parametrize(
    "strategy_class, check, what",
    [
        (GlobalRng, "no_global_rng_state_consumed", "global RNG state"),
        (GlobalRng, "same_seed_same_plan", "plan."),
        (OneShort, "merges_num_merge_up_to_capacity", "merged"),
        (ClaimsTooMuch, "merges_num_merge_up_to_capacity", "capacity() is"),
        (Unsorted, "plans_are_well_formed", "kept is not strictly ascending"),
        (MutatesFeatures, "plans_are_well_formed", "changed its features in place"),
        (Stateful, "same_seed_same_plan", "a site after a new generation"),
        (RowsPerFeatureBatchOfTwo, "plan_batch_is_one_or_the_batch", "rows"),
        (NotBlind, "content_blind_gets_empty_features", "no channels"),
        (MutableConfigStrategy, "config_class_validates", "not frozen"),
        (UndescribedStrategy, "config_class_validates", "['flavour']"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else v,
)
def test_kit_catches_a_broken_strategy(strategy_class, check: str, what: str) -> None:
    with pytest.raises(AssertionError) as info:
        STRATEGY_CHECKS[check](strategy_class, None)
    message = str(info.value)
    assert message.startswith(f"{check}: strategy 'broken'"), message
    assert what in message, message
    assert "grid" in message or check == "config_class_validates", message  # names the case


def test_check_strategy_lists_every_failed_check() -> None:
    with pytest.raises(AssertionError) as info:
        check_strategy(GlobalRng)
    message = str(info.value)
    assert message.startswith("4 checks failed for strategy 'broken':"), message
    failed = [line.split(":")[0] for line in message.splitlines()[1:]]
    assert failed == [
        "- same_seed_same_plan",
        "- no_global_rng_state_consumed",
        "- plan_batch_is_one_or_the_batch",  # its CFG halves differ
        "- content_blind_gets_empty_features",  # its plans differ for different tokens
    ]


def test_check_strategy_takes_a_class_and_options() -> None:
    check_strategy(registry.strategy("tome"), {"sx": 3, "sy": 1, "random_destinations": False})


def test_check_plan_names_what_is_wrong() -> None:
    plan = Plan.from_assignment(torch.tensor([[1, 3]]), torch.tensor([[0, 2]]), 4)
    check_plan(plan, 4, 3, 2)
    with pytest.raises(AssertionError, match="2 rows for a batch of 3"):
        check_plan(plan.repeat(2), 4, 3)
    with pytest.raises(AssertionError, match="over 4 tokens, expected 5"):
        check_plan(plan, 5, 1)
    chained = Plan(plan.kept, plan.src, plan.dst, plan.origin.clone().fill_(0), plan.dst_count, 4)
    with pytest.raises(AssertionError, match="origin does not map"):
        check_plan(chained, 4, 1)
    twice = Plan(plan.kept, torch.tensor([[1, 1]]), plan.dst, plan.origin, plan.dst_count, 4)
    with pytest.raises(AssertionError, match="token 1 is kept or merged 2 times"):
        check_plan(twice, 4, 1)


class LeakyAdapter(GenericAdapter):
    """Leaves a hook behind on every site."""

    name = "leaky"

    def attach(self, patch, modules):
        for module in modules.values():
            module.register_forward_hook(_no_op)
        return super().attach(patch, modules)


class LitteringAdapter(GenericAdapter):
    """Leaves an attribute behind on every site."""

    name = "littering"

    def attach(self, patch, modules):
        for module in modules.values():
            module.litter = True
        return super().attach(patch, modules)


class PassThroughAdapter(GenericAdapter):
    """Knows no layout: every call passes through unmerged."""

    name = "pass-through"

    def layout(self, site, hidden_states):
        return None


def _no_op(*args: object) -> None:
    return None


BROKEN_ADAPTERS = {
    "leaky": LeakyAdapter,
    "littering": LitteringAdapter,
    "pass-through": PassThroughAdapter,
}


@pytest.fixture
def broken_adapters(monkeypatch: pytest.MonkeyPatch):
    module = types.ModuleType("_tokenmerge_test_broken_adapters")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for name, cls in BROKEN_ADAPTERS.items():
        setattr(module, cls.__name__, cls)
        tokenmerge.extend.register_adapter(
            AdapterSpec(name=name, target=f"{module.__name__}:{cls.__name__}")
        )
    yield
    for name in BROKEN_ADAPTERS:
        tokenmerge.extend.unregister_plugin(f"adapter:{name}")


TOY_OVERRIDES = TINY_MODELS["generic"][0].overrides


@pytest.mark.parametrize(
    "adapter, check, what",
    [
        ("leaky", "remove_restores_exactly", "blocks.0._forward_hooks holds"),
        ("leaky", "context_manager_restores_exactly", "blocks.0._forward_hooks holds"),
        ("littering", "remove_restores_exactly", "vars() of blocks.0: added ['litter']"),
        # the generic adapter (which this one extends) warns first: NothingMergedWarning
        ("pass-through", "tokens_merge", "'blocks.0' merged nothing in this forward"),
        ("pass-through", "works_under_torch_compile", "merged nothing in this forward"),
    ],
)
def test_kit_catches_a_broken_adapter(broken_adapters, adapter: str, check: str, what: str):
    with pytest.raises(AssertionError) as info:
        ADAPTER_CHECKS[check](toy_stack, run_toy, "tome", adapter, TOY_OVERRIDES)
    message = str(info.value)
    assert message.startswith(f"{check}: adapter {adapter!r}, strategy 'tome', model ToyStack")
    assert what in message, message


def test_check_adapter_lists_failures_of_every_strategy(broken_adapters) -> None:
    with pytest.raises(AssertionError) as info:
        check_adapter(toy_stack, run_toy, adapter="leaky", overrides=TOY_OVERRIDES)
    message = str(info.value)
    strategies = tokenmerge.list_strategies()
    assert message.startswith(f"{2 * len(strategies)} checks failed for adapter 'leaky':"), message
    for strategy in strategies:
        assert f"- remove_restores_exactly: adapter 'leaky', strategy {strategy!r}" in message


def test_kit_catches_an_output_that_changes_at_ratio_zero() -> None:
    calls = []

    def run_counting(model: nn.Module) -> torch.Tensor:  # a model whose output drifts
        calls.append(1)
        return model(TOY_INPUT) + len(calls)

    with pytest.raises(AssertionError, match="first call at ratio 0: output differs"):
        ADAPTER_CHECKS["ratio_zero_is_bit_identical"](
            toy_stack, run_counting, "tome", "generic", TOY_OVERRIDES
        )


def test_run_may_return_any_structure_of_tensors() -> None:
    def run_structured(model: nn.Module) -> dict:
        y = model(TOY_INPUT)
        return {"out": (y, [y[:, 0]]), "note": "ignored"}

    check_adapter(
        toy_stack, run_structured, adapter="generic", strategies=["retom"], overrides=TOY_OVERRIDES
    )
    with pytest.raises(AssertionError, match="returned no tensor"):
        ADAPTER_CHECKS["tokens_merge"](toy_stack, lambda m: None, "tome", "generic", TOY_OVERRIDES)
