"""torch.compile with the UNet adapter: graph breaks, recompiles and compiled-vs-eager outputs.

Criteria (issue 3): regional compile of the transformer blocks with ``fullgraph=True`` shows no
graph break with plan caching on; whole-model compile breaks at most at the root step hook; a
10-step loop recompiles at most twice after its first step; compiled outputs equal the eager
merged outputs within 1e-4. The graph checks use the ``eager`` backend (or dynamo's own
counters) to stay fast; one test runs inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
from diffusers import UNet2DConditionModel  # noqa: E402
from torch._dynamo.testing import CompileCounter
from unet_models import tiny_unet as make_unet

import tokenmerge

STRATEGIES = ["tome", "retom", "random"]
#: a generation of 20 steps: a whole generation recompiles at most twice after its first step
TIMESTEPS = torch.linspace(999, 0, 20).round()


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=generator), torch.randn(
        2, 7, 32, generator=generator
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def merge(unet: UNet2DConditionModel, strategy: str) -> tokenmerge.Handle:
    return tokenmerge.apply(unet, strategy, ratio=0.5, sites={"min_tokens": 1}, cache_interval=3)


def compile_blocks(unet: UNet2DConditionModel, backend) -> int:
    """Regional compile: every BasicTransformerBlock, with fullgraph=True."""
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        block.compile(fullgraph=True, backend=backend)
    return len(blocks)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_regional_fullgraph_compile(strategy, inputs):
    x, text = inputs
    eager, compiled = make_unet(), make_unet()
    merge(eager, strategy)
    handle = merge(compiled, strategy)
    counter = CompileCounter()
    blocks = compile_blocks(compiled, counter)  # fullgraph=True: any graph break raises
    frames_after_step = []
    with torch.no_grad():
        for t in TIMESTEPS:
            expected = eager(x, t, text).sample
            got = compiled(x, t, text).sample
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
            frames_after_step.append(counter.frame_count)
    stats = next(iter(handle.stats().values()))
    assert (stats.plans_computed, stats.plans_reused) == (7, 13)  # caching was on
    # after the first step, the loop compiles at most two more graph variants (the planning and
    # the reusing step), whatever the number of steps
    assert frames_after_step[-1] - frames_after_step[0] <= 2, frames_after_step
    # the three merged blocks share their graphs: the total is the cache variants plus the one
    # unmerged block of another width, however many merged blocks there are (a graph per block
    # would exceed dynamo's recompile limit on SD 1.5 and fail under fullgraph=True)
    assert blocks == 4
    assert counter.frame_count <= 4, counter.frame_count


@pytest.mark.parametrize("strategy", ["tome", "retom"])
def test_whole_model_compile(strategy, inputs):
    x, text = inputs
    eager, compiled = make_unet(), make_unet()
    merge(eager, strategy)
    handle = merge(compiled, strategy)
    with torch.no_grad():
        explained = dynamo.explain(compiled)(x, TIMESTEPS[0], text)
    assert explained.graph_break_count <= 1
    for reason in explained.break_reasons:
        where = reason.user_stack[-1].filename if reason.user_stack else ""
        assert where.endswith("tokenmerge/api.py"), reason  # the root step hook
    dynamo.reset()
    handle.new_generation()  # explain ran a real forward: start the loop from scratch, as eager
    counter = CompileCounter()
    model = torch.compile(compiled, backend=counter)
    frames = []
    with torch.no_grad():
        for t in TIMESTEPS:
            torch.testing.assert_close(
                model(x, t, text).sample, eager(x, t, text).sample, atol=1e-4, rtol=0
            )
            frames.append(counter.frame_count)
    assert frames[-1] - frames[0] <= 2, frames


def test_inductor_matches_eager(inputs):
    x, text = inputs
    eager = make_unet()
    merge(eager, "retom")
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, "inductor")
    with torch.no_grad():
        for t in TIMESTEPS[:4]:
            torch.testing.assert_close(
                compiled(x, t, text).sample, eager(x, t, text).sample, atol=1e-4, rtol=0
            )


def test_removal_after_compile_restores_the_model(inputs):
    x, text = inputs
    unet = make_unet()
    with torch.no_grad():
        plain = unet(x, TIMESTEPS[0], text).sample
    handle = merge(unet, "tome")
    compile_blocks(unet, "eager")
    with torch.no_grad():
        merged = unet(x, TIMESTEPS[0], text).sample
        handle.remove()
        restored = unet(x, TIMESTEPS[0], text).sample
    assert not torch.equal(merged, plain)
    torch.testing.assert_close(restored, plain, atol=1e-5, rtol=0)


def test_apply_after_regional_compile_warns_that_hooks_are_not_guarded(inputs):
    """torch.compile does not guard on hooks by default: blocks compiled before apply would run
    their hook-less graphs, silently unmerged. With the guards on, applying later just works."""
    x, text = inputs
    unet = make_unet()
    compile_blocks(unet, "eager")
    with torch.no_grad():
        unet(x, TIMESTEPS[0], text)
    with pytest.warns(tokenmerge.errors.CompiledModelWarning, match="skip_nnmodule_hook_guards"):
        handle = tokenmerge.apply(unet, "tome", ratio=0.5, sites={"min_tokens": 1})
    with torch.no_grad():
        unet(x, TIMESTEPS[1], text)
    assert next(iter(handle.stats().values())).calls == 0  # what the warning is about
    handle.remove()

    dynamo.reset()
    # set and restored by hand: monkeypatch deletes dynamo's config entries on undo
    saved, dynamo.config.skip_nnmodule_hook_guards = dynamo.config.skip_nnmodule_hook_guards, False
    try:
        unet = make_unet()
        compile_blocks(unet, "eager")
        with torch.no_grad():
            unet(x, TIMESTEPS[0], text)
        handle = tokenmerge.apply(unet, "tome", ratio=0.5, sites={"min_tokens": 1})  # no warning
        with torch.no_grad():
            unet(x, TIMESTEPS[1], text)
        assert next(iter(handle.stats().values())).calls == 1
    finally:
        dynamo.config.skip_nnmodule_hook_guards = saved
