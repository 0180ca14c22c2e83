"""The diffusers UNet adapter on tiny random ``UNet2DModel``s and a ``DDPMPipeline`` (CPU, seconds).

``UNet2DModel``'s attention is one diffusers ``Attention`` on the feature map that norms, attends,
projects and adds its residual inside the module: the adapter merges the ``group_norm``'s output
and unmerges ``to_out[1]``'s, before the residual (adapters/diffusers_unet.py). What attention
really computes on is seen with our own hooks on ``to_q`` / ``to_k``, which run inside the
module's forward.
"""

from __future__ import annotations

import copy
import math

import diffusers  # noqa: F401  (a test dependency: fail, never skip, when missing)
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from snapshots import Journal, hook_count, snapshot
from torch import Tensor, nn
from unet_models import tiny_unet2d as make_unet

import tokenmerge
from tokenmerge.api import HANDLE_ATTR
from tokenmerge.attention_view import NO_CALL, DiffusersAttentionView
from tokenmerge.errors import ConfigError
from tokenmerge.testing import count_kernels

STRATEGIES = ["tome", "retom", "random", "todo"]
#: the sites of ``make_unet()``: every attention is at level 2 (64 tokens on a 16 x 16 sample)
SITES = {
    "down_blocks.1.attentions.0": "down",
    "mid_block.attentions.0": "mid",
    "up_blocks.0.attentions.0": "up",
    "up_blocks.0.attentions.1": "up",
}
SMALL = {"min_tokens": 1}  # 64 tokens per site: below the default min_tokens (256)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- tiny models


def three_level_unet() -> UNet2DModel:
    """Attention at levels 2 and 4 (and the mid block at 4), none at full resolution."""
    return make_unet(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def sample(batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def run(unet: UNet2DModel, x: Tensor, t: float = 999) -> Tensor:
    with torch.no_grad():
        return unet(x, t).sample


def relative_error(out: Tensor, expected: Tensor) -> float:
    return float((out - expected).norm() / expected.norm())


class TokenCounter:
    """Tokens each site's ``to_q`` (queries) and ``to_k`` (keys) projected, per call."""

    def __init__(self, unet: nn.Module) -> None:
        self.queries: dict[str, list[int]] = {}
        self.keys: dict[str, list[int]] = {}
        self.handles = []
        for name in SITES:
            attention = unet.get_submodule(name)
            for seen, projection in ((self.queries, "to_q"), (self.keys, "to_k")):
                hook = self._recorder(seen.setdefault(name, []))
                self.handles.append(getattr(attention, projection).register_forward_pre_hook(hook))

    @staticmethod
    def _recorder(into: list[int]):
        return lambda module, args: into.append(args[0].shape[1])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------------------- sites


def test_sites_name_stage_and_level_of_every_attention() -> None:
    handle = tokenmerge.apply(make_unet(), "tome", sites=SMALL)
    assert {site.name: site.stage for site in handle.sites} == SITES
    assert {site.level for site in handle.sites} == {2}
    assert all(site.targets == ("attn",) for site in handle.sites)
    handle.remove()


def test_default_sites_are_the_finest_level_with_attention() -> None:
    unet = three_level_unet()
    handle = tokenmerge.apply(unet, "tome", sites=SMALL)
    assert {(s.name, s.level) for s in handle.sites} == {
        ("down_blocks.1.attentions.0", 2),
        ("up_blocks.1.attentions.0", 2),
        ("up_blocks.1.attentions.1", 2),
    }
    handle.remove()
    with tokenmerge.apply(unet, "tome", sites={"levels": (4,), **SMALL}) as handle:
        assert {s.name for s in handle.sites} == {
            "down_blocks.2.attentions.0",
            "mid_block.attentions.0",
            "up_blocks.0.attentions.0",
            "up_blocks.0.attentions.1",
        }


# ---------------------------------------------------------------------------- merging


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_merges_close_to_the_unmerged_output(strategy: str) -> None:
    unet = make_unet()
    x = sample()
    expected = run(unet, x)
    counter = TokenCounter(unet)
    with tokenmerge.apply(unet, strategy, ratio=0.5, sites=SMALL) as handle:
        out = run(unet, x)
        stats = handle.stats()
    counter.remove()
    assert out.shape == expected.shape
    assert not torch.allclose(out, expected, atol=1e-4)
    assert relative_error(out, expected) < 0.15
    keys_values = strategy == "todo"  # todo's keys_values="auto": keys and values only
    for name, site in stats.items():
        assert (site.tokens_in, site.tokens_out, site.calls) == (64, 32, 1)
        assert site.passed_through == 0 and site.keys_values is keys_values
        # the module's own call comes first (retom's value correction projects more after it)
        assert counter.keys[name][0] == 32
        assert counter.queries[name][0] == (64 if keys_values else 32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ratio_zero_is_bit_identical(strategy: str) -> None:
    unet = make_unet()
    x = sample()
    expected = [run(unet, x, t) for t in (999, 979)]
    with tokenmerge.apply(unet, strategy, ratio=0.0, sites=SMALL) as handle:
        for t, out in zip((999, 979), expected, strict=True):
            assert torch.equal(run(unet, x, t), out)
        assert {(s.tokens_in, s.tokens_out) for s in handle.stats().values()} == {(64, 64)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_removal_restores_exactly(strategy: str) -> None:
    unet = make_unet()
    x = sample()
    expected = run(unet, x)
    before = snapshot(unet)
    handle = tokenmerge.apply(unet, strategy, ratio=0.5, sites=SMALL)
    assert hook_count(unet) > 0 and vars(unet)[HANDLE_ATTR] is handle
    assert not torch.equal(run(unet, x), expected)
    handle.remove()
    assert hook_count(unet) == 0 and snapshot(unet) == before
    assert torch.equal(run(unet, x), expected)
    handle.remove()  # a second remove does nothing
    assert snapshot(unet) == before


def attention_by_hand(attention: nn.Module, x: Tensor, plan) -> Tensor:
    """What the attention should return with ``plan``: the group norm of the whole map, merged,
    attended and projected, unmerged, then the residual added (diffusers' AttnProcessor2_0 with
    the merge after the norm and the unmerge before the residual)."""
    batch, channels, height, width = x.shape
    norm = attention.group_norm
    tokens = F.group_norm(x.flatten(2), norm.num_groups, norm.weight, norm.bias, norm.eps)
    merged = plan.merge(tokens.transpose(1, 2))

    def heads(t: Tensor) -> Tensor:
        return t.unflatten(-1, (attention.heads, -1)).transpose(1, 2)

    q, k, v = (heads(p(merged)) for p in (attention.to_q, attention.to_k, attention.to_v))
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    y = plan.unmerge(F.linear(y, attention.to_out[0].weight, attention.to_out[0].bias))
    y = y.transpose(1, 2).reshape(batch, channels, height, width) + x
    return y / attention.rescale_output_factor


def test_merges_after_the_norm_and_unmerges_before_the_residual() -> None:
    unet = make_unet()
    seen = {}
    for name in SITES:
        attention = unet.get_submodule(name)
        attention.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args}))
        attention.register_forward_hook(lambda m, a, out, name=name: seen.update({name + "!": out}))
    with tokenmerge.apply(unet, "tome", ratio=0.5, sites=SMALL) as handle:
        run(unet, sample())
        for patch in handle.patches:
            name = patch.site.name
            plan = patch.last_plan
            assert plan is not None and plan.num_out == 32
            expected = attention_by_hand(unet.get_submodule(name), seen[name][0], plan)
            torch.testing.assert_close(seen[name + "!"], expected, atol=1e-5, rtol=1e-5)


def test_retom_corrects_values_and_leaves_proportional_attention_out() -> None:
    unet = make_unet()
    masks = []
    for name in SITES:
        unet.get_submodule(name).register_forward_pre_hook(
            lambda m, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True
        )
    with tokenmerge.apply(unet, "retom", ratio=0.5, sites=SMALL) as handle:
        assert handle.config.value_correction and handle.config.local_proportional_attention
        run(unet, sample())
        assert all(s.value_correction is not None for s in handle.stats().values())
    assert masks == [None] * 4  # the processor would size a mask by the unmerged tokens


def test_the_value_correction_describes_the_attention_between_the_hooks() -> None:
    """Its view computes the module's output before the residual from the normed tokens, which
    is what the hooks merge and unmerge (``corrects()`` turns such modules down, since around the
    whole module, norm and residual included, it would not hold)."""
    attention = make_unet().get_submodule("down_blocks.1.attentions.0")
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(3))
    norm = attention.group_norm
    tokens = F.group_norm(x.flatten(2), norm.num_groups, norm.weight, norm.bias, norm.eps)
    tokens = tokens.transpose(1, 2)
    index = torch.tensor([[0, 5, 17, 63]])
    with torch.no_grad():
        output = attention(x) * attention.rescale_output_factor - x
        rows = DiffusersAttentionView(attention).exact_rows(
            tokens, index, NO_CALL, tokens[:, index[0]]
        )
    expected = output.flatten(2).transpose(1, 2)[:, index[0]]
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-5)


def test_keys_values_with_proportional_attention_adds_the_size_bias() -> None:
    unet = make_unet()
    x = sample()
    without = run(unet, x)
    with tokenmerge.apply(
        unet, "todo", ratio=0.5, local_proportional_attention=True, sites=SMALL
    ) as handle:
        masks = []
        attention = unet.get_submodule("down_blocks.1.attentions.0")
        attention.register_forward_pre_hook(  # after tokenmerge's: sees the merged call
            lambda m, args, kwargs: masks.append(kwargs), with_kwargs=True
        )
        biased = run(unet, x)
        assert all(s.keys_values for s in handle.stats().values())
        plan = next(p for p in handle.patches if p.site.name == "down_blocks.1.attentions.0")
        sizes = plan.last_plan.slot_log_sizes()  # (1, 32): each key's log size, up to log 3
    kwargs = masks[0]
    assert kwargs["encoder_hidden_states"].shape == (2, 32, 64)
    assert sizes.max() == pytest.approx(math.log(3))
    torch.testing.assert_close(kwargs["attention_mask"], sizes[:, None].expand(2, 1, 32))
    with tokenmerge.apply(unet, "todo", ratio=0.5, sites=SMALL):
        assert not torch.equal(run(unet, x), biased)
    assert torch.equal(run(unet, x), without)


def fuse(unet: UNet2DModel) -> None:
    for name in SITES:
        attention = unet.get_submodule(name)
        attention.fuse_projections()
        attention.set_processor(FusedAttnProcessor2_0())


def test_keys_values_under_a_fused_processor() -> None:
    """The fused processor has no key-value projection for a self-attention: ``"auto"`` merges
    the tokens there, ``True`` is refused at apply."""
    unet = make_unet()
    x = sample()
    expected = run(unet, x)
    fuse(unet)
    torch.testing.assert_close(run(unet, x), expected, atol=1e-5, rtol=1e-5)
    with tokenmerge.apply(unet, "todo", ratio=0.5, sites=SMALL) as handle:
        out = run(unet, x)
        stats = handle.stats().values()
        assert {(s.keys_values, s.tokens_out, s.passed_through) for s in stats} == {(False, 32, 0)}
    assert relative_error(out, expected) < 0.15
    before = snapshot(unet)
    with pytest.raises(ConfigError, match="keys_values=True .* to_kv") as error:
        tokenmerge.apply(unet, "tome", ratio=0.5, keys_values=True, sites=SMALL)
    assert "keys_values='auto'" in str(error.value)
    assert hook_count(unet) == 0 and snapshot(unet) == before


def test_a_deepcopy_of_a_patched_unet_is_patched_the_same() -> None:
    unet = make_unet()
    x = sample()
    handle = tokenmerge.apply(unet, "retom", ratio=0.5, sites=SMALL)
    merged = run(unet, x)
    twin = copy.deepcopy(unet)
    assert torch.equal(run(twin, x), merged)
    handle.remove()
    assert torch.equal(run(twin, x), merged) and not torch.equal(run(unet, x), merged)


# ---------------------------------------------------------------------------- pass-through


class _OwnProcessor(AttnProcessor2_0):
    """A user's processor: it may compute anything, so its calls are never merged."""


def test_calls_that_cannot_merge_pass_through_and_are_counted() -> None:
    # scale_shift: the mid block's attention has no group_norm (diffusers gives it none)
    unet = make_unet(resnet_time_scale_shift="scale_shift")
    assert unet.mid_block.attentions[0].group_norm is None
    masked = unet.get_submodule("down_blocks.1.attentions.0")
    mask = torch.zeros(2, 1, 64)
    masked.register_forward_pre_hook(  # before tokenmerge's: the call arrives with a mask
        lambda m, args, kwargs: (args, {**kwargs, "attention_mask": mask}), with_kwargs=True
    )
    x = sample()
    expected = run(unet, x)
    with tokenmerge.apply(unet, "tome", ratio=0.5, sites=SMALL) as handle:
        out = run(unet, x)
        stats = handle.stats()
        for name in ("mid_block.attentions.0", "down_blocks.1.attentions.0"):
            assert stats[name].passed_through == 1 and stats[name].calls == 0
        assert "group_norm" in stats["mid_block.attentions.0"].pass_reason
        assert "attention mask" in stats["down_blocks.1.attentions.0"].pass_reason
        for name in ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1"):
            assert (stats[name].passed_through, stats[name].tokens_out) == (0, 32)
        assert not torch.equal(out, expected)

        # tokens instead of a feature map, and a processor of the user's
        attention = unet.get_submodule("up_blocks.0.attentions.0")
        tokens = torch.randn(2, 64, attention.query_dim)
        with torch.no_grad():
            attention(tokens)
        site = handle.stats()["up_blocks.0.attentions.0"]
        assert site.passed_through == 1 and "not a (batch, channels, height, width)" in (
            site.pass_reason
        )
        attention.set_processor(_OwnProcessor())
        run(unet, x)
        site = handle.stats()["up_blocks.0.attentions.0"]
        assert site.passed_through == 2 and "_OwnProcessor" in site.pass_reason


# ---------------------------------------------------------------------------- caching


def test_plan_cache_across_denoising_steps() -> None:
    """As for UNet2DConditionModel: one plan per ``cache_interval`` steps, a new generation when
    the timestep goes back up or the batch changes."""
    unet = make_unet()
    x = sample()
    handle = tokenmerge.apply(unet, "retom", ratio=0.5, cache_interval=3, sites=SMALL)
    for t in range(999, 799, -20):  # 10 steps
        run(unet, x, t)
    assert {(s.calls, s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {
        (10, 4, 6)  # planned at steps 0, 3, 6 and 9
    }
    run(unet, x, 999)  # the timestep goes back up: a new generation
    run(unet, x, 979)
    assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(5, 7)}
    run(unet, sample(1), 959)  # another batch size within the interval plans afresh
    assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(6, 7)}
    handle.new_generation()
    with torch.no_grad():
        for t in (999, 979, 959):  # keyword arguments and tensor timesteps drive the steps too
            unet(sample=x, timestep=torch.tensor([t, t]))
    assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(7, 9)}
    handle.remove()


def test_a_cached_plan_is_really_reused() -> None:
    unet = make_unet()
    x0, x1 = sample(seed=0), sample(seed=5)
    with tokenmerge.apply(unet, "tome", ratio=0.5, cache_interval=2, sites=SMALL) as handle:
        run(unet, x0, 999)
        cached = run(unet, x1, 979)  # merges x1 with the plan made on x0
        assert {s.plans_reused for s in handle.stats().values()} == {1}
    with tokenmerge.apply(unet, "tome", ratio=0.5, cache_interval=1, sites=SMALL):
        fresh = run(unet, x1, 979)
    assert not torch.allclose(cached, fresh, atol=1e-4)


def test_class_labels_are_the_conditioning() -> None:
    """A class-conditional UNet2DModel: the labels a generation passes at every step keep its
    plans; labels it has not seen start a new generation."""
    unet = make_unet(num_class_embeds=3)
    x, labels = sample(), torch.tensor([0, 2])
    with tokenmerge.apply(unet, "tome", ratio=0.5, cache_interval=3, sites=SMALL) as handle:
        with torch.no_grad():
            unet(x, 999, labels)
            unet(x, 979, class_labels=labels)
            unet(x, 959, labels)
            assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(1, 2)}
            unet(x, 939, torch.tensor([1, 1]))  # labels the generation has not seen
        assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(2, 2)}


# ---------------------------------------------------------------------------- pipeline


def make_pipeline() -> DDPMPipeline:
    """Attention at 16 x 16 = 256 tokens, the default ``min_tokens``: the defaults merge."""
    unet = make_unet(sample_size=32)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: DDPMPipeline) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(batch_size=2, generator=generator, num_inference_steps=4, output_type="pt")[0]


def test_ddpm_pipeline_end_to_end() -> None:
    pipe = make_pipeline()
    expected = generate(pipe)
    before = snapshot(pipe.unet)
    with tokenmerge.apply(pipe, "retom", ratio=0.0):
        assert torch.equal(generate(pipe), expected)
    handle = tokenmerge.apply(pipe, "retom", ratio=0.5)  # retom's cache_interval: 2
    assert handle.model is pipe.unet and vars(pipe.unet)[HANDLE_ATTR] is handle
    images = generate(pipe)
    assert images.shape == expected.shape == (2, 3, 32, 32)
    assert not torch.equal(images, expected)
    assert relative_error(images, expected) < 0.15
    stats = handle.stats()
    assert set(stats) == set(SITES)
    for site in stats.values():
        assert (site.tokens_in, site.tokens_out) == (256, 128)
        assert (site.calls, site.plans_computed, site.plans_reused) == (4, 2, 2)  # steps 0, 2
    generate(pipe)  # a new generation plans afresh
    assert {(s.plans_computed, s.plans_reused) for s in handle.stats().values()} == {(4, 4)}
    assert tokenmerge.remove(pipe) is True and tokenmerge.remove(pipe) is False
    assert snapshot(pipe.unet) == before and hook_count(pipe.unet) == 0
    assert torch.equal(generate(pipe), expected)


# ---------------------------------------------------------------------------- kernels

#: extra kernels per merged call reusing its plan (tests/test_kernel_budget.py's budgets); with
#: keys_values also the group norm the pre-hook runs itself
BUDGETS = {"tome": 8, "random": 8, "retom-uncorrected": 8, "retom": 12, "todo": 8}
SCHEDULE = torch.tensor([999.0, 979.0, 959.0])


@pytest.mark.parametrize(
    ("strategy", "overrides"),
    [
        ("tome", {}),
        ("random", {}),
        ("retom", {"value_correction": False}),
        ("retom", {}),
        ("todo", {}),
    ],
    ids=["tome", "random", "retom-uncorrected", "retom", "todo"],
)
def test_a_reused_plan_costs_few_kernels_and_no_sync(strategy: str, overrides: dict, request):
    unet = make_unet()
    x = sample()

    def call(step: int) -> Tensor:  # as a pipeline calls it: the timestep a view of a schedule
        return unet(x, SCHEDULE[step]).sample

    with torch.no_grad():
        call(0)
        _, unmerged = count_kernels(call, 0)
        handle = tokenmerge.apply(
            unet, strategy, ratio=0.5, cache_interval=100, sites=SMALL, **overrides
        )
        _, planning = count_kernels(call, 0)
        with handle.observe(Journal()) as journal:
            call(1)  # the first reuse may form what the plan's later calls share
        _, cached = count_kernels(call, 2)
    assert {s.plans_reused for s in handle.stats().values()} == {2}
    handle.remove()
    merges = sum(part == "merge" for part, _ in journal.seen)
    assert merges == len(SITES)
    extra = (cached.kernels - unmerged.kernels) / merges
    budget = BUDGETS[request.node.callspec.id]
    assert extra <= budget, f"{extra:.1f} kernels per merged call > {budget}"
    assert unmerged.syncs == planning.syncs == cached.syncs == []
