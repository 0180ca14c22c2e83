"""Never silently wrong (issue 23, items 6, 10 and 11): Hugging Face hidden states restored, raw
errors turned into clear ones (empty batches pass through), and compiled models patched through
their original with a warning instead of an error pointing at the wrong fix."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_api import make_input, make_model, patch
from test_diffusers_unet import flat_unet, make_pipeline
from torch import Tensor, nn
from vit_models import FAMILIES, pixels

import tokenmerge
from tokenmerge.errors import CompiledModelWarning, ConfigError, InputError, TokenMergeError
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HF_FAMILIES = ["hf_vit", "hf_vit_classifier", "clip_vision", "clip_vision_projection", "clip"]


# ---------------------------------------------------------------------------- item 6


def _hidden_states(name: str, output: Any) -> tuple:
    if name == "clip":
        return output.vision_model_output.hidden_states
    return output.hidden_states


def _call(name: str, model: nn.Module, images: Tensor, **kwargs: Any) -> Any:
    with torch.no_grad():
        return FAMILIES[name].call(model, images, output_hidden_states=True, **kwargs)


def _layer_inputs(name: str, model: nn.Module) -> tuple[list[Tensor], list]:
    """What each layer really receives (recorded by pre-hooks registered after the patch's)."""
    seen: list[Tensor] = []
    handles = [
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        for block in FAMILIES[name].blocks(model)
    ]
    return seen, handles


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_hf_output_hidden_states_are_restored_to_the_full_token_set(name: str) -> None:
    family = FAMILIES[name]
    model = family.build()
    images = pixels()
    plain = _hidden_states(name, _call(name, model, images))
    with tokenmerge.apply(model, "tome", r=8):
        seen, handles = _layer_inputs(name, model)
        output = _call(name, model, images)
        for handle in handles:
            handle.remove()
    states = _hidden_states(name, output)
    assert len(states) == len(plain) == len(seen) + 1
    assert [tuple(s.shape) for s in states] == [tuple(s.shape) for s in plain]
    assert torch.equal(states[0], plain[0])  # the embeddings: nothing merged yet
    merged_layers = 0
    for state, merged in zip(states[1:], seen[1:], strict=False):
        merged_layers += merged.shape[1] < family.tokens
        for restored_rows, merged_rows in zip(state, merged, strict=True):
            # every patch holds a copy of the token it was merged into, and every merged token
            # is somewhere; the class token stays first
            assert torch.equal(restored_rows.unique(dim=0), merged_rows.unique(dim=0))
            assert torch.equal(restored_rows[0], merged_rows[0])
    assert merged_layers == len(seen) - 1  # every layer after the first saw merged tokens
    assert torch.equal(states[-1], output_last(name, output))


def output_last(name: str, output: Any) -> Tensor:
    return (output.vision_model_output if name == "clip" else output).hidden_states[-1]


def test_hf_hidden_states_restored_with_return_dict_false_and_kept_at_r_zero() -> None:
    model = FAMILIES["clip_vision"].build()
    images = pixels()
    plain = _call("clip_vision", model, images).hidden_states
    with tokenmerge.apply(model, "tome", r=8):
        as_tuple = _call("clip_vision", model, images, return_dict=False)
    states = next(v for v in as_tuple if isinstance(v, tuple))
    assert [s.shape for s in states] == [s.shape for s in plain]
    with tokenmerge.apply(model, "tome", r=0):
        same = _call("clip_vision", model, images).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(same, plain, strict=True))


# ---------------------------------------------------------------------------- item 10


def test_an_empty_batch_passes_through_the_generic_adapter() -> None:
    model = make_model()
    x = make_input(batch=0)
    expected = model(x)
    handle = patch(model, "tome")
    out = model(x)
    assert out.shape == expected.shape == (0, 17, 16)
    assert handle.stats()["blocks.0.attn"].pass_reason == "an empty batch (batch size 0)"
    assert model(make_input()).shape == (2, 17, 16)  # and the next batch merges
    assert handle.stats()["blocks.0.attn"].tokens_out < 17
    handle.remove()


@pytest.mark.parametrize("name", ["vit", "registers"])
def test_an_empty_batch_passes_through_a_timm_vit(name: str) -> None:
    family = FAMILIES[name]
    model = family.build()
    expected = family.run(model, family.inputs(batch=0))
    with tokenmerge.apply(model, "tome", r=8):
        out = family.run(model, family.inputs(batch=0))
    assert [o.shape for o in out] == [o.shape for o in expected]


def test_an_empty_batch_fails_in_a_unet_exactly_as_without_the_patch() -> None:
    unet = flat_unet()
    args = (torch.randn(0, 4, 16, 16), 999)
    kwargs = {"encoder_hidden_states": torch.randn(0, 7, unet.config.cross_attention_dim)}
    with pytest.raises(RuntimeError) as plain:
        unet(*args, **kwargs)
    with tokenmerge.apply(unet, "tome", ratio=0.5, sites={"min_tokens": 1}):
        with pytest.raises(RuntimeError) as patched:
            unet(*args, **kwargs)
    assert str(patched.value) == str(plain.value)  # diffusers' own error, not the patch's
    assert "attention_processor" in patched.traceback[-1].path.name + str(
        patched.traceback[-1].path
    )


def test_generic_num_prefix_above_the_token_count_is_a_clear_error() -> None:
    model = make_model(num_prefix=0)
    handle = tokenmerge.apply(
        model, "tome", adapter="generic", sites={"include": ["blocks.*.attn"]},
        adapter_options={"num_prefix": 40},
    )  # fmt: skip
    with pytest.raises(InputError) as info, torch.no_grad():
        model(make_input())
    message = str(info.value)
    assert "blocks.0.attn" in message and "40" in message and "16 tokens" in message
    assert "adapter_options['num_prefix']" in message
    handle.remove()


class _DropsAToken(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, :-1]


def test_a_module_that_changes_the_token_count_is_named() -> None:
    model = nn.Sequential(nn.Linear(8, 8), _DropsAToken())
    handle = tokenmerge.apply(
        model, "tome", ratio=0.5, adapter="generic", sites={"include": ["1"], "min_tokens": 1}
    )
    with pytest.raises(InputError) as info, torch.no_grad():
        model(torch.randn(2, 16, 8))
    message = str(info.value)
    assert "site '1'" in message and "_DropsAToken" in message
    assert "8 merged tokens" in message and "(2, 7, 8)" in message and "exclude" in message
    handle.remove()
    assert model(torch.randn(2, 16, 8)).shape == (2, 15, 8)


@pytest.mark.parametrize("timestep", [{"t": 1}, "999", [999]])
def test_timestep_arg_pointing_at_a_non_number_is_a_clear_error(timestep: Any) -> None:
    model = make_model()
    handle = patch(model, "tome")  # timestep_arg="timestep"
    with pytest.raises(InputError) as info, torch.no_grad():
        model(make_input(), timestep=timestep)
    message = str(info.value)
    assert "timestep_arg" in message and "'timestep'" in message
    assert type(timestep).__name__ in message and "a number or a tensor" in message
    assert model(make_input(), timestep=torch.tensor([999.0])).shape == (2, 17, 16)
    handle.remove()


@pytest.mark.parametrize("strategy", ["tome", "retom", "random"])
@pytest.mark.parametrize(
    ("features", "grid", "num_merge", "expected"),
    [
        ((16, 8), (4, 4), 4, "features must be a (P, n, C) tensor"),
        ((1, 20, 8), (4, 4), 4, "holds 16 image tokens but features has 20"),
        ((1, 16, 8), (4, 4), 16, "num_merge must be an integer from 0 to"),
        ((1, 16, 8), (4, 4), -1, "num_merge must be an integer from 0 to"),
        ((1, 16, 8), (4, 4), 2.0, "num_merge must be an integer from 0 to"),
    ],
)
def test_make_plan_refuses_what_it_cannot_plan(
    strategy: str, features: tuple, grid: tuple, num_merge: Any, expected: str
) -> None:
    planner = tokenmerge.get_strategy(strategy)
    with pytest.raises(InputError) as info:
        planner.make_plan(
            torch.randn(*features), TokenLayout(grid), Site("blk", stage="down"), num_merge,
            SiteRandom(0),
        )  # fmt: skip
    assert expected in str(info.value) and f"strategy {strategy!r}" in str(info.value)


def test_make_plan_still_plans_up_to_capacity() -> None:
    planner = tokenmerge.get_strategy("tome")
    layout, site = TokenLayout((4, 4)), Site("blk", stage="down")
    capacity = planner.capacity(layout, site)
    features = torch.nn.functional.normalize(torch.randn(1, 16, 8), dim=-1)
    plan = planner.make_plan(features, layout, site, capacity, SiteRandom(0))
    assert plan.num_out == 16 - capacity


# ---------------------------------------------------------------------------- item 11


def _generic(model: nn.Module, **options: Any) -> dict[str, Any]:
    return dict(
        adapter="generic",
        sites={"include": ["blocks.*.attn"], "min_tokens": 1},
        adapter_options={"num_prefix": 1, "grid": (4, 4), **options},
    )


def test_apply_to_a_compiled_model_patches_its_original_and_warns() -> None:
    model = make_model()
    x = make_input()
    with torch.no_grad():
        plain = model(x)
        compiled = torch.compile(model, backend="eager")
        with pytest.warns(CompiledModelWarning, match=r"compile again after apply"):
            handle = tokenmerge.apply(compiled, "tome", ratio=0.5, **_generic(model))
        assert handle.model is model  # the original is patched
        merged = model(x)
        assert not torch.equal(merged, plain)
        # compiled after the patch (its first call): the graph runs the hooks
        assert torch.allclose(compiled(x), merged, atol=1e-6)
        assert tokenmerge.remove(compiled)
        assert torch.equal(model(x), plain)


def test_apply_to_a_pipeline_with_a_compiled_unet_patches_the_unet_and_warns() -> None:
    pipe = make_pipeline()
    unet = pipe.unet
    pipe.unet = torch.compile(unet, backend="eager")
    with pytest.warns(CompiledModelWarning, match=r"StableDiffusionPipeline\.unet is compiled"):
        handle = tokenmerge.apply(pipe, "tome", ratio=0.5, sites={"min_tokens": 1})
    assert handle.model is unet and handle.adapter.name == "diffusers_unet"
    assert pipe.unet._orig_mod is unet  # the user's pipeline keeps its compiled module
    assert "_tokenmerge_handle" in vars(unet)
    assert tokenmerge.remove(pipe)
    assert "_tokenmerge_handle" not in vars(unet)


def test_a_compiled_model_no_adapter_supports_never_suggests_the_wrong_fix() -> None:
    model = torch.compile(nn.Linear(4, 4), backend="eager")
    with pytest.warns(CompiledModelWarning):
        with pytest.raises(TokenMergeError) as info:
            tokenmerge.apply(model, "tome")
    assert "OptimizedModule" not in str(info.value)
    assert "Linear" in str(info.value)


def test_adapter_options_of_another_adapter_name_the_adapter_chosen() -> None:
    unet = flat_unet()
    with pytest.raises(ConfigError) as info:
        tokenmerge.apply(unet, "tome", adapter_options={"grid": (4, 4)})
    message = str(info.value)
    assert "'diffusers_unet'" in message and "UNet2DConditionModel" in message
    assert "takes no options" in message and "diffusers_dit" not in message
    assert "_tokenmerge_handle" not in vars(unet)
