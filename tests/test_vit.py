"""The vision-transformer adapters (``timm_vit``, ``transformers_vit``) and progressive mode.

Tiny random-weight models of every supported family (``tests/vit_models.py``): exactness at
ratio 0 and after removal for every strategy and mode, token counts per block against the
schedule (counted by our own hooks), prefix tokens never merged, proportional attention and
EVA's rotary rows checked against a direct computation, exact pooling of duplicated tokens,
dynamic input sizes, the Hugging Face outputs, dtypes, batches, torch.compile and the errors.

Hooks this file registers on a patched model are registered after ``apply``: tokenmerge's
pre-hooks run before them (so they see what the module really receives) and tokenmerge's
forward hooks are prepended (so a later forward hook sees the block output already merged).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from snapshots import hook_count, snapshot
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter
from vit_models import (
    BATCH,
    DEPTH,
    FAMILIES,
    IMG,
    make_clip,
    make_clip_text,
    make_clip_vision_projection,
    make_dynamic,
    make_vit,
    outputs,
    pixels,
    text_ids,
    vision_module,
)

import tokenmerge
import tokenmerge.adapters as adapters_package
from tokenmerge import ConfigError, UnsupportedModelError
from tokenmerge.adapters._vit import PROGRESSIVE_RATIO
from tokenmerge.errors import RatioWarning
from tokenmerge.extend import Plan, TokenLayout
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site
from tokenmerge.windows import grown_window, window_labels
from tokenmerge_bench.presets import get_preset

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # these tests merge hard on purpose (ratio 0.5 on three blocks), so that merging shows; the
    # warning itself is tested below, with pytest.warns
    pytest.mark.filterwarnings("ignore::tokenmerge.errors.RatioWarning"),
]

STRATEGIES = ["tome", "retom", "random"]
MODES = ["progressive", "local"]


# ---------------------------------------------------------------------------- helpers


def assert_equal(got: tuple[Tensor, ...], expected: tuple[Tensor, ...], what: str) -> None:
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape, f"{what}: output {i} is {tuple(g.shape)}, not {tuple(e.shape)}"
        assert torch.equal(g, e), f"{what}: output {i} differs by {(g - e).abs().max().item()}"


class PlanRecorder:
    """Records every plan each site of a handle makes, call by call."""

    def __init__(self, handle: tokenmerge.Handle) -> None:
        self.plans: dict[str, list[Plan]] = {p.site.name: [] for p in handle.patches}
        for patch in handle.patches:
            patch.make_plan = self._wrap(patch.make_plan, self.plans[patch.site.name])

    @staticmethod
    def _wrap(make_plan: Callable, found: list[Plan]) -> Callable:
        def recording(x: Tensor) -> Plan | None:
            plan = make_plan(x)
            if plan is not None:
                found.append(plan)
            return plan

        return recording

    def last(self) -> list[Plan]:
        return [plans[-1] for plans in self.plans.values()]


class Recorder:
    """Forward pre-hooks (registered now, so after tokenmerge's) recording what modules get."""

    def __init__(self, modules: list[nn.Module], what: Callable[[tuple, dict], Any]) -> None:
        self.seen: list[list[Any]] = [[] for _ in modules]
        self.handles = [
            module.register_forward_pre_hook(self._hook(i, what), with_kwargs=True)
            for i, module in enumerate(modules)
        ]

    def _hook(self, index: int, what: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.seen[index].append(what(args, kwargs))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def tokens_of(args: tuple, kwargs: dict) -> int:
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return x.shape[1]


def expected_counts(
    num_prefix: int, image_tokens: int, r: int | list[int] | None, ratio: float | None
) -> list[tuple[int, int]]:
    """``(tokens_in, tokens_out)`` of every block in progressive mode (no shortfall)."""
    counts = []
    n = image_tokens
    for block in range(DEPTH):
        wanted = int(ratio * n) if r is None else (r if isinstance(r, int) else r[block])
        counts.append((num_prefix + n, num_prefix + n - wanted))
        n -= wanted
    return counts


# ---------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_mode_matrix(family: str, mode: str, strategy: str) -> None:
    """Ratio 0 and r=0 are bit-identical; merging keeps shapes, stays finite, changes the output;
    removal restores outputs, hooks and attributes exactly."""
    fam = FAMILIES[family]
    model = fam.build()
    hooks, before = hook_count(model), snapshot(model)
    plain = fam.run(model)
    for zero in ({"ratio": 0.0}, {"r": 0}):
        with tokenmerge.apply(model, strategy, adapter_options={"mode": mode}, **zero) as handle:
            assert handle.adapter.name == fam.adapter
            assert_equal(fam.run(model), plain, f"{zero}, first call")
            assert_equal(fam.run(model), plain, f"{zero}, second call")
            assert all(s.tokens_in == s.tokens_out for s in handle.stats().values())
        assert hook_count(model) == hooks
    handle = tokenmerge.apply(model, strategy, adapter_options={"mode": mode}, ratio=0.25)
    assert hook_count(model) > hooks
    merged = fam.run(model)
    stats = handle.stats()
    assert len(stats) == DEPTH
    for name, s in stats.items():
        assert s.calls == 1 and s.passed_through == 0, (name, s)
        assert s.tokens_out < s.tokens_in, (name, s)
    assert [m.shape for m in merged] == [p.shape for p in plain]
    assert all(bool(m.isfinite().all()) for m in merged)
    assert any(not torch.equal(m, p) for m, p in zip(merged, plain, strict=True))
    handle.remove()
    assert hook_count(model) == hooks
    assert snapshot(model) == before
    assert_equal(fam.run(model), plain, "after remove()")


# ---------------------------------------------------------------------------- token counts

SCHEDULES = {
    "r-int": {"r": 8},
    "r-list": {"r": [12, 0, 6]},
    "r-decreasing": {"r": list(tokenmerge.r_schedule(8, DEPTH, "decreasing"))},
    "ratio": {"ratio": 0.25},
}


@pytest.mark.parametrize("family", ["vit", "registers", "hf_vit_classifier"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_token_counts_follow_the_schedule(family: str, strategy: str, schedule: str) -> None:
    fam = FAMILIES[family]
    model = fam.build()
    config = SCHEDULES[schedule]
    assert tokenmerge.r_schedule(8, DEPTH, "decreasing") == (16, 8, 0)
    expected = expected_counts(
        fam.num_prefix, fam.image_tokens, config.get("r"), config.get("ratio")
    )
    with tokenmerge.apply(model, strategy, **config) as handle:
        blocks = fam.blocks(model)
        mlps = [block.mlp for block in blocks]
        seen_blocks, seen_mlps = Recorder(blocks, tokens_of), Recorder(mlps, tokens_of)
        output = fam.run(model)
        stats = list(handle.stats().values())
    assert [(s.tokens_in, s.tokens_out) for s in stats] == expected
    assert all(s.shortfall == 0 and s.passed_through == 0 for s in stats)
    # what the blocks and their MLPs really received (merge_at="mlp": the MLP runs merged)
    assert seen_blocks.seen == [[tokens_in] for tokens_in, _ in expected]
    assert seen_mlps.seen == [[tokens_out] for _, tokens_out in expected]
    assert output[0].shape[0] == BATCH


def test_token_counts_in_local_mode() -> None:
    """Local mode: every block receives the whole token set; the attention runs merged."""
    fam = FAMILIES["vit"]
    model = fam.build()
    with tokenmerge.apply(model, "tome", adapter_options={"mode": "local"}, r=[8, 16, 4]) as handle:
        blocks = fam.blocks(model)
        seen_blocks = Recorder(blocks, tokens_of)
        seen_attn = Recorder([b.attn for b in blocks], tokens_of)
        seen_mlp = Recorder([b.mlp for b in blocks], tokens_of)
        fam.run(model)
        stats = [(s.tokens_in, s.tokens_out) for s in handle.stats().values()]
    assert stats == [(65, 57), (65, 49), (65, 61)]
    assert seen_blocks.seen == [[65]] * DEPTH
    assert seen_attn.seen == [[57], [49], [61]]
    assert seen_mlp.seen == [[65]] * DEPTH  # merge_mlp is off


def test_full_token_set_after_the_last_block() -> None:
    """The block stack's output is restored to every token (timm's final norm sees them all)."""
    fam = FAMILIES["registers"]
    model = fam.build()
    with tokenmerge.apply(model, "tome", ratio=0.5):
        seen = Recorder([model.norm], tokens_of)
        with torch.no_grad():
            features = model.forward_features(fam.inputs())
    assert seen.seen == [[fam.tokens]]
    assert features.shape == (BATCH, fam.tokens, 32)


# ---------------------------------------------------------------------------- prefix tokens


@pytest.mark.parametrize(
    "family",
    ["vit", "deit_distilled", "registers", "registers_avg", "eva02", "hf_vit", "hf_deit",
     "dinov2_registers", "siglip_vision"],
)  # fmt: skip
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prefix_tokens_never_merge(family: str, strategy: str) -> None:
    fam = FAMILIES[family]
    p = fam.num_prefix
    model = fam.build()
    with tokenmerge.apply(model, strategy, ratio=0.5) as handle:
        recorder = PlanRecorder(handle)
        fam.run(model)
        plans = recorder.last()
    assert len(plans) == DEPTH
    for plan in plans:
        assert not plan.is_identity
        prefix = torch.arange(p).expand(plan.batch, -1)
        assert torch.equal(plan.kept[:, :p], prefix)  # kept, in front, in order
        assert torch.equal(plan.origin[:, :p], prefix)  # nothing merged into them
        assert bool((plan.src >= p).all())  # never a source
        assert bool((plan.dst >= p).all())  # never a destination slot


def test_progressive_sites_keep_their_last_plan() -> None:
    """``SitePatch.last_plan`` (what ``tokenmerge visualize`` draws) is the plan of the latest
    merged call in progressive mode too."""
    fam = FAMILIES["vit"]
    model = fam.build()
    with tokenmerge.apply(model, "tome", r=8) as handle:
        recorder = PlanRecorder(handle)
        fam.run(model)
        for patch, plan in zip(handle.patches, recorder.last(), strict=True):
            assert patch.last_plan is not None, f"{patch.site.name}: no last_plan"
            assert torch.equal(patch.last_plan.kept, plan.kept)
            assert torch.equal(patch.last_plan.src, plan.src)


# ---------------------------------------------------------------------------- proportional attn


def timm_attention_by_hand(block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
    """``x`` plus the attention branch of a timm ``Block``, computed step by step, with
    ``bias (B, N)`` added to every query's logits."""
    attn = block.attn
    batch, n, channels = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, channels)
    return x + block.ls1(attn.proj(attn.norm(a)))


def timm_block_by_hand(block: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
    """A timm ``Block`` computed step by step (see ``timm_attention_by_hand``)."""
    x = timm_attention_by_hand(block, x, bias)
    return x + block.ls2(block.mlp(block.norm2(x)))


def merge_by_hand(x: Tensor, plan: Plan, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Every slot of ``plan``: the size-weighted mean of the tokens mapped to it (``x (B, N,
    C)``, ``sizes (B, N)``); and the slots' sizes."""
    batch, _, channels = x.shape
    origin = plan.origin.expand(batch, -1)
    total = x.new_zeros(batch, plan.num_out, channels)
    total = total.scatter_add(1, origin[..., None].expand(-1, -1, channels), x * sizes[..., None])
    slot_sizes = sizes.new_zeros(batch, plan.num_out).scatter_add(1, origin, sizes)
    return total / slot_sizes[..., None], slot_sizes


def _block_one_call(proportional: bool) -> tuple[Tensor, Tensor, dict, Plan, nn.Module, Tensor]:
    """Merge 16 tokens at block 0 of a tiny ViT; block 1 merges nothing (so its output, seen by
    a later forward hook, is its own). Returns block 1's input, output and keyword arguments,
    block 0's plan, the model (unpatched again) and its output."""
    model = make_vit(qk_norm=True)
    block = model.blocks[1]
    captured: dict[str, Any] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["input"], captured["kwargs"] = args[0], dict(kwargs)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        captured["output"] = output

    with tokenmerge.apply(
        model, "tome", r=[16, 0, 0], adapter_options={"proportional_attention": proportional}
    ) as h:
        recorder = PlanRecorder(h)
        hooks = [
            block.register_forward_pre_hook(before, with_kwargs=True),
            block.register_forward_hook(after, with_kwargs=True),
        ]
        with torch.no_grad():
            logits = model(pixels())
        plan = recorder.plans["blocks.0"][-1]
    for hook in hooks:
        hook.remove()
    assert hook_count(model) == 0
    return captured["input"], captured["output"], captured["kwargs"], plan, model, logits


def test_proportional_attention_matches_a_direct_computation() -> None:
    x, got, kwargs, plan, model, merged_logits = _block_one_call(proportional=True)
    assert x.shape == (BATCH, 65 - 16, 32)
    sizes = plan.merge_sizes(torch.ones(BATCH, 65))
    assert torch.equal(sizes.sum(1), torch.full((BATCH,), 65.0))
    assert torch.equal(sizes, plan.counts.expand(BATCH, -1))
    assert float(sizes.max()) > 1 and torch.equal(sizes[:, 0], torch.ones(BATCH))
    bias = sizes.log()
    mask = kwargs["attn_mask"]
    assert mask.shape == (BATCH, 1, 1, 49)
    torch.testing.assert_close(mask[:, 0, 0], bias, atol=0, rtol=0)
    with torch.no_grad():
        expected = timm_block_by_hand(model.blocks[1], x, bias)
        unweighted = timm_block_by_hand(model.blocks[1], x, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - unweighted).abs().max() > 1e-3  # the sizes mattered

    x_off, got_off, kwargs_off, plan_off, _, logits_off = _block_one_call(proportional=False)
    assert torch.equal(plan_off.src, plan.src)
    assert "attn_mask" not in kwargs_off
    with torch.no_grad():
        expected_off = timm_block_by_hand(model.blocks[1], x_off, None)
    torch.testing.assert_close(got_off, expected_off, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_off, got, atol=1e-4)
    assert not torch.equal(logits_off, merged_logits)


@pytest.mark.parametrize("merge_at", ["mlp", "block"])
def test_progressive_stack_matches_a_direct_computation(merge_at: str) -> None:
    """Three blocks merging 16, 8 and 0 tokens, recomputed from block 1's input: size-weighted
    merges, log(size) in the logits, sizes adding up, and the copies restored at the end."""
    model = make_vit(qk_norm=True)
    blocks = list(model.blocks)
    captured: dict[str, Any] = {}

    def output_of_last(module: nn.Module, args: tuple, output: Tensor) -> None:
        captured["output"] = output

    options = {"adapter_options": {"merge_at": merge_at}}
    with tokenmerge.apply(model, "tome", r=[16, 8, 0], **options) as handle:
        recorder = PlanRecorder(handle)
        seen = Recorder(blocks, lambda args, kwargs: (args[0], kwargs.get("attn_mask")))
        hook = blocks[-1].register_forward_hook(output_of_last)
        with torch.no_grad():
            model(pixels())
        plans = recorder.last()
    hook.remove()
    seen.remove()
    (x0, mask0), (x1, mask1), (x2, mask2) = (calls[0] for calls in seen.seen)
    assert (x0.shape[1], x1.shape[1], x2.shape[1]) == (65, 49, 41)
    assert mask0 is None
    sizes1 = merge_by_hand(x0, plans[0], torch.ones(BATCH, 65))[1]
    torch.testing.assert_close(mask1[:, 0, 0], sizes1.log(), atol=0, rtol=0)
    with torch.no_grad():
        h = timm_attention_by_hand(blocks[1], x1, sizes1.log())
        mlp = blocks[1].mlp
        if merge_at == "block":  # the MLP runs on all 49 tokens, the block output merges
            expected, sizes2 = merge_by_hand(
                h + blocks[1].ls2(mlp(blocks[1].norm2(h))), plans[1], sizes1
            )
        else:  # the MLP runs on the merged tokens: merge(h) + mlp(merge(norm(h)))
            merged, sizes2 = merge_by_hand(h, plans[1], sizes1)
            normed = merge_by_hand(blocks[1].norm2(h), plans[1], sizes1)[0]
            expected = merged + blocks[1].ls2(mlp(normed))
        torch.testing.assert_close(x2, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mask2[:, 0, 0], sizes2.log(), atol=1e-6, rtol=0)
        last = timm_block_by_hand(blocks[2], x2, sizes2.log())
    # every original token gets a copy of the token it ended in
    origin = plans[1].origin.expand(BATCH, -1).gather(1, plans[0].origin.expand(BATCH, -1))
    restored = last.gather(1, origin[..., None].expand(-1, -1, last.shape[-1]))
    assert captured["output"].shape == (BATCH, 65, 32)
    torch.testing.assert_close(captured["output"], restored, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["vit", "eva02", "hf_vit", "clip"])
def test_no_mask_is_passed_at_ratio_zero(family: str) -> None:
    fam = FAMILIES[family]
    model = fam.build()

    def mask_of(args: tuple, kwargs: dict) -> Any:
        if fam.adapter == "transformers_vit":
            return args[1] if len(args) > 1 else kwargs.get("attention_mask")
        return kwargs.get("attn_mask")

    with tokenmerge.apply(model, "tome", ratio=0.0):
        seen = Recorder(fam.blocks(model), mask_of)
        fam.run(model)
        fam.run(model)
    seen.remove()
    assert seen.seen == [[None, None]] * DEPTH
    with tokenmerge.apply(model, "tome", ratio=0.25):  # and one is, once tokens have merged
        seen = Recorder(fam.blocks(model), mask_of)
        fam.run(model)
    assert seen.seen[0] == [None]
    assert all(isinstance(s[0], Tensor) for s in seen.seen[1:])


def test_hf_mask_is_the_log_of_the_sizes() -> None:
    fam = FAMILIES["hf_vit"]
    model = fam.build()
    with tokenmerge.apply(model, "retom", r=[20, 10, 0]) as handle:
        recorder = PlanRecorder(handle)
        seen = Recorder(fam.blocks(model), lambda args, kwargs: args[1])
        fam.run(model)
    plans = recorder.last()
    sizes = plans[0].merge_sizes(torch.ones(BATCH, 65))
    torch.testing.assert_close(seen.seen[1][0][:, 0, 0], sizes.log(), atol=0, rtol=0)
    sizes = plans[1].merge_sizes(sizes)
    torch.testing.assert_close(seen.seen[2][0][:, 0, 0], sizes.log(), atol=0, rtol=0)


# ---------------------------------------------------------------------------- duplicated tokens


def two_color_image(split: int | None) -> Tensor:
    """Constant colour, or two colours: columns ``[0, split)`` one, the rest another."""
    x = torch.empty(BATCH, 3, IMG, IMG)
    x[:] = torch.tensor([0.7, -0.3, 0.1])[:, None, None]
    if split is not None:
        x[..., split:] = torch.tensor([-0.5, 0.9, 0.4])[:, None, None]
    return x


@pytest.mark.parametrize("pool", ["avg", "token"])
@pytest.mark.parametrize("split", [None, 48], ids=["constant", "three-quarters"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merging_duplicates_keeps_the_pooled_output(pool: str, split: int | None, strategy: str):
    """Without position embeddings, patches of one colour are identical tokens in every block.
    Merging them with sizes tracked (proportional attention, copies restored) changes nothing;
    with groups of uneven sizes (48 and 16 patches), unweighted attention would."""
    model = make_vit(pos_embed="none", global_pool=pool)
    x = two_color_image(split)
    with torch.no_grad():
        plain, plain_features = model(x), model.forward_features(x)
    results = {}
    for proportional in (True, False):
        with tokenmerge.apply(
            model, strategy, r=8, adapter_options={"proportional_attention": proportional}
        ) as h:
            with torch.no_grad():
                results[proportional] = model(x), model.forward_features(x)
            assert [s.tokens_out for s in h.stats().values()] == [57, 49, 41]
    logits, features = results[True]
    torch.testing.assert_close(features, plain_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
    # the check can fail: the same merges without the sizes in the attention move the features
    assert not torch.allclose(results[False][1], plain_features, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- EVA rotary rows


@pytest.mark.parametrize("family", ["vit", "eva02", "hf_vit"])
def test_sites_say_where_positions_are_rotary(family: str) -> None:
    """EVA's blocks take ``rope=``: its sites are rotary, and retom's default scope keeps a
    token's merges in its window there (``scope="auto"``); plain ViTs add their positions."""
    model = FAMILIES[family].build()
    with tokenmerge.apply(model, "retom") as handle:
        assert [site.rotary for site in handle.sites] == [family == "eva02"] * DEPTH
        scopes = {handle.config.scope_at(site) for site in handle.sites}
    assert scopes == {"window" if family == "eva02" else "global"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eva_rotary_rows_follow_the_tokens(mode: str, strategy: str) -> None:
    """Every attention call gets the rotary rows of exactly the image tokens it computes on."""
    fam = FAMILIES["eva02"]
    model = fam.build()
    plain = fam.run(model)
    with tokenmerge.apply(model, strategy, adapter_options={"mode": mode}, ratio=0.0):
        assert_equal(fam.run(model), plain, "ratio 0")
    with tokenmerge.apply(model, strategy, adapter_options={"mode": mode}, ratio=0.25) as handle:
        recorder = PlanRecorder(handle)
        seen = Recorder(
            [b.attn for b in model.blocks], lambda args, kwargs: (args[0], kwargs["rope"])
        )
        merged = fam.run(model)
        plans = recorder.last()
    assert not torch.equal(merged[0], plain[0])
    with torch.no_grad():
        full = model.rope.get_embed()  # (N, D): the whole grid's table
    assert full.shape[0] == fam.image_tokens
    positions = torch.arange(fam.image_tokens)[None]  # original index of every present token
    for k in range(DEPTH):
        x, rope = seen.seen[k][0]
        n = x.shape[1] - 1
        assert rope.shape[-2] == n, (k, tuple(rope.shape), n)
        kept = plans[k].kept[:, 1:] - 1  # image tokens this block's plan keeps
        if mode == "local":  # the rows of the tokens the attention computes on
            assert torch.equal(rope.squeeze(1), full[kept]), k
        elif k == 0:  # nothing merged yet: the table as the model passes it
            assert torch.equal(rope, full)
        else:  # the rows of the tokens still present, followed through the earlier plans
            assert torch.equal(rope.squeeze(1), full[positions]), k
        if mode == "progressive":
            positions = positions.expand(kept.shape[0], -1).gather(1, kept)


# ---------------------------------------------------------------------------- input sizes


@pytest.mark.parametrize("mode", MODES)
def test_dynamic_img_size_follows_the_grid(mode: str) -> None:
    model = make_dynamic()
    with tokenmerge.apply(model, "tome", adapter_options={"mode": mode}, ratio=0.25) as handle:
        seen = Recorder(list(model.blocks), tokens_of)
        for height, width in ((64, 64), (48, 80), (64, 64)):
            x = pixels(BATCH, height, width=width)
            with torch.no_grad():
                logits = model(x)
            assert logits.shape == (BATCH, 10)
            assert bool(logits.isfinite().all())
            n = (height // 8) * (width // 8)
            stats = [(s.tokens_in, s.tokens_out) for s in handle.stats().values()]
            if mode == "progressive":
                expected = expected_counts(1, n, None, 0.25)
                assert [s[-1] for s in seen.seen] == [tokens_in for tokens_in, _ in expected]
            else:
                expected = [(1 + n, 1 + n - int(0.25 * n))] * DEPTH
                assert [s[-1] for s in seen.seen] == [1 + n] * DEPTH
            assert stats == expected, (height, width)
            assert all(s.passed_through == 0 for s in handle.stats().values())


# ---------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("family", ["hf_vit", "hf_vit_classifier", "clip_vision"])
def test_hf_hidden_states_and_pooler(family: str) -> None:
    fam = FAMILIES[family]
    model = fam.build()
    with torch.no_grad():
        plain = fam.call(model, fam.inputs(), output_hidden_states=True)
    with tokenmerge.apply(model, "tome", ratio=0.25) as handle:
        with torch.no_grad():
            out = fam.call(model, fam.inputs(), output_hidden_states=True)
        stats = list(handle.stats().values())
    hidden = out.hidden_states
    assert len(hidden) == DEPTH + 1 == len(plain.hidden_states)
    assert hidden[0].shape == (BATCH, 65, 32)
    assert hidden[-1].shape == (BATCH, 65, 32)  # restored after the last layer
    # in between, what each layer handed the next (49 and 37 merged tokens), restored to every
    # patch (tests/test_input_errors.py checks the values)
    assert [s.tokens_out for s in stats[:-1]] == [49, 37]
    assert [h.shape for h in hidden[1:-1]] == [(BATCH, 65, 32)] * 2
    for key in ("last_hidden_state", "pooler_output", "logits"):
        if key in plain:
            assert out[key].shape == plain[key].shape, key
            assert bool(out[key].isfinite().all())


def test_site_names() -> None:
    names = {}
    for family in ("vit", "eva02", "hf_vit", "hf_vit_classifier", "clip_vision", "clip"):
        with tokenmerge.apply(FAMILIES[family].build(), "tome") as handle:
            names[family] = [s.name for s in handle.sites]
            assert [s.block_index for s in handle.sites] == list(range(DEPTH))
            assert [s.stage for s in handle.sites] == ["first", "middle", "last"]
            assert {s.mode for s in handle.sites} == {"progressive"}
    assert names["vit"] == names["eva02"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert names["hf_vit"] == ["layers.0", "layers.1", "layers.2"]
    assert names["hf_vit_classifier"] == ["vit.layers.0", "vit.layers.1", "vit.layers.2"]
    # a CLIPModel is patched in its vision tower, named from there
    assert names["clip"] == names["clip_vision"] == [f"encoder.layers.{i}" for i in range(DEPTH)]


def test_clip_model_text_tower_untouched() -> None:
    model = make_clip()
    x, ids = pixels(), text_ids()
    text_before = snapshot(model.text_model)
    assert hook_count(model.text_model) == 0
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=x)
        plain_text = model.get_text_features(input_ids=ids)
    with tokenmerge.apply(model, "retom", ratio=0.25) as handle:
        assert handle.model is model.vision_model
        assert hook_count(model.text_model) == 0
        assert snapshot(model.text_model) == text_before
        assert hook_count(model) == hook_count(model.vision_model) > 0
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=x)
            text = model.get_text_features(input_ids=ids)
        assert all(s.tokens_out < s.tokens_in for s in handle.stats().values())
    assert torch.equal(out.text_embeds, plain.text_embeds)
    assert_equal(outputs(text), outputs(plain_text), "text features")
    assert not torch.equal(out.image_embeds, plain.image_embeds)
    assert out.logits_per_image.shape == plain.logits_per_image.shape


def test_remove_finds_the_patch_of_a_clip_model() -> None:
    """``tokenmerge.remove(model)`` on the model that was passed to ``apply``, although the patch
    lives on its vision tower."""
    model = make_clip()
    handle = tokenmerge.apply(model, "tome", ratio=0.25)
    with pytest.raises(tokenmerge.AlreadyAppliedError):
        tokenmerge.apply(model, "tome")
    assert tokenmerge.remove(model) is True
    assert handle.removed and hook_count(model) == 0
    assert tokenmerge.remove(model) is False


def test_clip_vision_with_projection_is_supported() -> None:
    model = make_clip_vision_projection()
    with torch.no_grad():
        plain = model(pixel_values=pixels())
    with tokenmerge.apply(model, "tome", ratio=0.25) as handle:
        assert handle.adapter.name == "transformers_vit"
        names = [s.name for s in handle.sites]
        assert [n.endswith(f"encoder.layers.{i}") for i, n in enumerate(names)] == [True] * DEPTH
        with torch.no_grad():
            out = model(pixel_values=pixels())
        assert [s.tokens_out for s in handle.stats().values()] == [49, 37, 28]
    assert out.image_embeds.shape == plain.image_embeds.shape
    assert out.last_hidden_state.shape == plain.last_hidden_state.shape


# ---------------------------------------------------------------------------- merge point


@pytest.mark.parametrize("family", ["vit", "eva02", "hf_vit"])
def test_merge_at_mlp_or_block(family: str) -> None:
    fam = FAMILIES[family]
    model = fam.build()
    n = fam.tokens
    results = {}
    for merge_at, mlp_tokens in (("mlp", n - 8), ("block", n)):
        with tokenmerge.apply(model, "tome", r=8, adapter_options={"merge_at": merge_at}):
            blocks = fam.blocks(model)
            seen_mlp = Recorder([b.mlp for b in blocks], tokens_of)
            seen_block = Recorder(blocks, tokens_of)
            results[merge_at] = fam.run(model)
        seen_mlp.remove()
        seen_block.remove()
        assert seen_mlp.seen[0] == [mlp_tokens], merge_at
        assert seen_block.seen == [[n], [n - 8], [n - 16]], merge_at  # the block output merged
        assert seen_mlp.seen[1:] == (
            [[n - 16], [n - 24]] if merge_at == "mlp" else [[n - 8], [n - 16]]
        )
        assert all(bool(t.isfinite().all()) for t in results[merge_at])
    assert [t.shape for t in results["mlp"]] == [t.shape for t in results["block"]]
    assert any(not torch.equal(a, b) for a, b in zip(results["mlp"], results["block"], strict=True))


# ---------------------------------------------------------------------------- dtypes, batches


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["vit", "eva02", "hf_vit_classifier", "clip"])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_on_cpu(dtype: torch.dtype, family: str, mode: str) -> None:
    fam = FAMILIES[family]
    model = fam.build().to(dtype)
    x = fam.inputs().to(dtype)
    plain = fam.run(model, x)
    with tokenmerge.apply(model, "tome", adapter_options={"mode": mode}, ratio=0.0):
        assert_equal(fam.run(model, x), plain, "ratio 0")
    with tokenmerge.apply(model, "tome", adapter_options={"mode": mode}, ratio=0.25) as handle:
        merged = fam.run(model, x)
        assert all(s.tokens_out < s.tokens_in for s in handle.stats().values())
    for m, p in zip(merged, plain, strict=True):
        assert (m.shape, m.dtype) == (p.shape, p.dtype)
        assert bool(m.isfinite().all())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", ["deit_distilled", "eva02", "hf_vit_classifier"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batches(batch: int, family: str, mode: str, strategy: str) -> None:
    """Every sample is merged as it would be alone (plans per sample, or content-blind)."""
    fam = FAMILIES[family]
    model = fam.build()
    x = fam.inputs(batch=batch)
    with tokenmerge.apply(model, strategy, adapter_options={"mode": mode}, ratio=0.25) as handle:
        together = fam.run(model, x)
        stats = [(s.tokens_in, s.tokens_out) for s in handle.stats().values()]
        alone = [fam.run(model, x[i : i + 1]) for i in range(batch)]
    if mode == "progressive":
        assert stats == expected_counts(fam.num_prefix, fam.image_tokens, None, 0.25)
    for i in range(batch):
        for t, a in zip(together, alone[i], strict=True):
            assert t.shape[0] == batch and bool(t.isfinite().all())
            torch.testing.assert_close(t[i : i + 1], a, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def test_no_graph_break_in_our_hooks(fresh_dynamo) -> None:
    model = make_vit()
    x = pixels()
    with tokenmerge.apply(model, "tome", ratio=0.25) as handle:
        with torch.no_grad():
            explained = dynamo.explain(model)(x)
        assert all(s.tokens_out < s.tokens_in for s in handle.stats().values())
    assert explained.graph_count >= 1
    assert explained.graph_break_count <= 1  # at most the root hook (compiler.disable'd)
    ours = (str(Path(tokenmerge.__file__).parent), str(Path(adapters_package.__file__).parent))
    root_hook = str(Path(tokenmerge.__file__).parent / "api.py")
    for reason in explained.break_reasons:
        where = [f.filename for f in reason.user_stack if f.filename.startswith(ours)]
        assert all(name == root_hook for name in where), reason


@pytest.mark.parametrize(("family", "strategy"), [("vit", "tome"), ("eva02", "retom")])
def test_regional_fullgraph_compile(fresh_dynamo, family: str, strategy: str) -> None:
    """Every block compiled with fullgraph=True (a graph break raises) and our hooks inside."""
    fam = FAMILIES[family]
    eager, compiled = fam.build(), fam.build()
    tokenmerge.apply(eager, strategy, ratio=0.25)
    handle = tokenmerge.apply(compiled, strategy, ratio=0.25)
    counter = CompileCounter()
    for block in compiled.blocks:
        block.compile(fullgraph=True, backend=counter)
    for seed in (1, 2):
        x = fam.inputs(seed=seed)
        torch.testing.assert_close(fam.run(compiled, x), fam.run(eager, x), atol=1e-5, rtol=1e-5)
    assert counter.frame_count > 0
    assert all(s.tokens_out < s.tokens_in for s in handle.stats().values())


def test_compiled_model_sees_a_later_patch_with_hook_guards(fresh_dynamo) -> None:
    """torch.compile skips guards on module hooks by default (a model compiled before
    ``apply`` keeps its unpatched graph, as the docs say); with the guards on it recompiles."""
    model = make_vit(depth=2)
    x = pixels()
    with torch.no_grad(), dynamo.config.patch(skip_nnmodule_hook_guards=False):
        compiled = torch.compile(model, backend="eager")
        plain = compiled(x)
        with tokenmerge.apply(model, "tome", ratio=0.25):
            merged, eager = compiled(x), model(x)
        after = compiled(x)
    torch.testing.assert_close(merged, eager)
    assert not torch.equal(merged, plain)
    torch.testing.assert_close(after, plain)


def test_inductor_matches_eager(fresh_dynamo) -> None:
    model = make_vit(depth=2)
    x = pixels()
    handle = tokenmerge.apply(model, "tome", ratio=0.25)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert [(s.calls, s.tokens_out) for s in handle.stats().values()] == [(2, 49), (2, 37)]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- errors


def test_unsupported_models_are_named() -> None:
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(UnsupportedModelError) as info:
        tokenmerge.apply(resnet, "tome")
    assert "ResNet" in str(info.value)
    assert "VisionTransformer" in str(info.value) and "Eva" in str(info.value)
    with pytest.raises(UnsupportedModelError, match="VisionTransformer.*Eva"):
        tokenmerge.apply(resnet, "tome", adapter="timm_vit")
    text = make_clip_text()
    with pytest.raises(UnsupportedModelError) as info:
        tokenmerge.apply(text, "tome")
    message = str(info.value)
    assert "CLIPTextModel" in message
    for name in ("ViTModel", "ViTForImageClassification", "CLIPVisionModel", "CLIPModel"):
        assert name in message, name
    with pytest.raises(UnsupportedModelError, match="ViTModel"):
        tokenmerge.apply(text, "tome", adapter="transformers_vit")
    with pytest.raises(UnsupportedModelError):
        tokenmerge.apply(make_vit(), "tome", adapter="transformers_vit")
    assert hook_count(resnet) == hook_count(text) == 0


def test_windowed_encoders_are_not_claimed() -> None:
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                        num_heads=[2, 2], window_size=4)  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="SwinModel is not supported"):
        tokenmerge.apply(SwinModel(config), "tome")


def test_config_errors() -> None:
    model = make_vit()
    with pytest.raises(ConfigError) as info:
        tokenmerge.apply(model, "tome", ratio=0.6)
    assert "50 %" in str(info.value) and "0.5" in str(info.value)
    assert "adapter_options={'mode': 'local'}" in str(info.value)
    with pytest.raises(ConfigError, match="progressive"):
        tokenmerge.apply(model, "tome", ratio={"first": 0.3, "*": 0.7})
    with pytest.raises(ConfigError, match=r"adapter_options=\{'mode': 'local'\}"):
        tokenmerge.apply(model, "tome", sites={"mlp": True})
    with pytest.raises(ConfigError, match="merge_at: Input should be 'mlp' or 'block'"):
        tokenmerge.apply(model, "tome", adapter_options={"merge_at": "x"})
    with pytest.raises(ConfigError, match="merge_att: unknown option.*did you mean 'merge_at'"):
        tokenmerge.apply(model, "tome", adapter_options={"merge_att": "mlp"})
    assert hook_count(model) == 0 and tokenmerge.remove(model) is False
    # what is allowed: 0.5 in progressive mode, more in local mode, r overriding the ratio
    local = {"adapter_options": {"mode": "local"}}
    for allowed in ({"ratio": 0.5}, {"ratio": 0.6, **local}, {"ratio": 0.6, "r": 4}):
        with tokenmerge.apply(model, "tome", **allowed):
            model(pixels())
    unet = get_preset("tiny-unet").build()
    with pytest.raises(ConfigError) as info:
        tokenmerge.apply(unet, "tome", adapter_options={"mode": "progressive"})
    assert "'diffusers_unet' (the adapter chosen for UNet2DConditionModel) takes no options" in str(
        info.value
    )
    assert "{'mode': 'progressive'}" in str(info.value)


# ---------------------------------------------------------------------------- local mode


def test_local_mode_keeps_the_token_grid_and_plans_every_call() -> None:
    model = make_vit()
    x1, x2 = pixels(seed=1), pixels(seed=2)
    with torch.no_grad():
        plain_final, plain_inter = model.forward_intermediates(x1)
    with tokenmerge.apply(
        model,
        "tome",
        sites={"mlp": True},
        adapter_options={"mode": "local"},
        ratio=0.5,
    ) as handle:
        with torch.no_grad():
            final, inter = model.forward_intermediates(x1)
        assert final.shape == plain_final.shape
        assert [t.shape for t in inter] == [t.shape for t in plain_inter]
        assert [t.shape for t in inter] == [(BATCH, 32, 8, 8)] * DEPTH
        assert not torch.equal(final, plain_final)
        first = [p.last_plan for p in handle.patches]
        stats = handle.stats().values()
        assert [(s.plans_computed, s.plans_reused) for s in stats] == [(1, 0)] * DEPTH
        with torch.no_grad():
            model.forward_features(x2)
        second = [p.last_plan for p in handle.patches]
        stats = handle.stats().values()
        assert [(s.plans_computed, s.plans_reused) for s in stats] == [(2, 0)] * DEPTH
        assert all(s.tokens_in == 65 and s.tokens_out == 33 for s in stats)
    assert all(a is not b for a, b in zip(first, second, strict=True))
    assert any(not torch.equal(a.src, b.src) for a, b in zip(first, second, strict=True))


def test_progressive_mode_refuses_forward_intermediates() -> None:
    """Merged tokens would reshape into a wrong grid without an error: refuse instead."""
    model = make_vit()
    before = dict(vars(model))
    with tokenmerge.apply(model, "tome", ratio=0.25):
        with pytest.raises(
            tokenmerge.TokenMergeError, match=r"adapter_options=\{'mode': 'local'\}"
        ):
            model.forward_intermediates(pixels())
        with torch.no_grad():  # the other entry points still work
            assert model.forward_features(pixels()).shape == (BATCH, 65, 32)
    assert vars(model) == before
    with torch.no_grad():
        assert [t.shape for t in model.forward_intermediates(pixels())[1]] == [
            (BATCH, 32, 8, 8)
        ] * DEPTH


# ---------------------------------------------------------------------------- windows


@pytest.mark.parametrize("strategy", ["retom", "random"])
@pytest.mark.parametrize("num_merge, size", [(8, (2, 2)), (30, (4, 4)), (38, (8, 8))])
def test_progressive_windows_over_original_positions(strategy: str, num_merge: int, size):
    """Merges stay within windows over the tokens' original grid positions; the windows grow
    (2 x 2 -> 4 x 4 -> 8 x 8) when the tokens left cannot fill the merge otherwise."""
    grid = (8, 8)
    g = torch.Generator().manual_seed(3)
    rows = 2 if strategy == "retom" else 1  # random's plans are shared by the batch
    positions = torch.stack([torch.randperm(64, generator=g)[:40].sort().values for _ in range(2)])
    positions = positions[:rows]
    features = F.normalize(torch.randn(rows, 40, 8, generator=g), dim=-1)
    layout = TokenLayout(grid, 0, positions=positions)
    # retom as the first wave had it: merges into representatives inside windows grown from 2
    first_wave = {"scope": "window", "destinations": "representatives", "window_size": 2}
    options = first_wave if strategy == "retom" else {}
    strategy_obj = tokenmerge.get_strategy(strategy, **options)
    site = Site("blocks.0", mode="progressive")
    assert strategy_obj.capacity(layout, site) == 39
    plan = strategy_obj.make_plan(features, layout, site, num_merge, SiteRandom(0))
    assert plan.num_merged == num_merge and plan.num_tokens == 40
    assert grown_window(grid, (2, 2), 40, num_merge) == size
    labels, count = window_labels(positions.expand(plan.batch, -1), grid, size)
    dst_token = plan.kept.gather(1, plan.dst)
    assert torch.equal(labels.gather(1, plan.src), labels.gather(1, dst_token))
    # every window that held a token still holds one
    for row in range(plan.batch):
        assert set(labels[row, plan.kept[row]].tolist()) == set(labels[row].tolist())
    if size != (2, 2):  # the grown windows were needed: some merge crosses a 2 x 2 window
        small, _ = window_labels(positions.expand(plan.batch, -1), grid, (2, 2))
        assert not torch.equal(small.gather(1, plan.src), small.gather(1, dst_token))


def test_every_family_is_built_as_described() -> None:
    """The tiny models are what their names say (guards the factories)."""
    for name, fam in FAMILIES.items():
        model = fam.build()
        assert not model.training, name
        assert len(fam.blocks(model)) == DEPTH, name
        if fam.adapter == "timm_vit":
            assert model.num_prefix_tokens == fam.num_prefix, name
            assert model.patch_embed.grid_size == fam.grid, name
        else:  # the embeddings put num_prefix tokens in front of the grid's patches
            with torch.no_grad():
                embedded = vision_module(model).embeddings(fam.inputs())
            if isinstance(embedded, tuple):  # ViTMAE: tokens, mask, ids_restore
                embedded = embedded[0]
            assert embedded.shape[1] == fam.tokens, name
    assert type(FAMILIES["eva02"].build()).__name__ == "Eva"
    assert FAMILIES["eva02"].build().rope is not None
    assert FAMILIES["deit3"].build().blocks[0].ls1.gamma.shape == (32,)
    assert type(FAMILIES["deit_distilled"].build()).__name__ == "VisionTransformerDistilled"
    assert FAMILIES["dynamic"].build().dynamic_img_size
    assert isinstance(FAMILIES["qk_norm"].build().blocks[0].attn.k_norm, nn.LayerNorm)


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["vit", "registers_avg", "eva02", "hf_vit_classifier"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_progressive_matches_the_cpu(family: str, strategy: str, dtype: torch.dtype) -> None:
    """On the GPU in each dtype: ratio 0 bit-identical to the unpatched model, merging keeps the
    shapes, and (in float32) the merged output matches the CPU's."""
    fam = FAMILIES[family]
    cpu_model = fam.build()
    cuda_model = fam.build().to("cuda", dtype)
    images = fam.inputs()
    plain = fam.run(cuda_model, images.to("cuda", dtype))
    with tokenmerge.apply(cuda_model, strategy, ratio=0.0):
        assert_equal(fam.run(cuda_model, images.to("cuda", dtype)), plain, "ratio 0 on CUDA")
    with tokenmerge.apply(cuda_model, strategy, r=8) as handle:
        merged = fam.run(cuda_model, images.to("cuda", dtype))
        assert all(s.tokens_out == s.tokens_in - 8 for s in handle.stats().values())
    assert [t.shape for t in merged] == [t.shape for t in plain]
    assert all(bool(t.isfinite().all()) for t in merged)
    if dtype == torch.float32:
        with tokenmerge.apply(cpu_model, strategy, r=8):
            expected = fam.run(cpu_model, images)
        for got, want in zip(merged, expected, strict=True):
            torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------- default ratio


@pytest.mark.parametrize("strategy", ["tome", "retom", "random"])
def test_progressive_mode_without_ratio_or_r_merges_the_measured_default(strategy):
    """Not the config's 0.5, which halves the tokens at every block: 15 % of the tokens reaching
    each block, what kept both reference classifiers' top-1 within a point (docs/vision.md)."""
    model = FAMILIES["vit"].build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RatioWarning)
        with tokenmerge.apply(model, strategy) as handle:
            FAMILIES["vit"].run(model)
            stats = list(handle.stats().values())
    assert handle.config.ratio == PROGRESSIVE_RATIO == 0.15
    assert [s.ratio for s in stats] == [0.15] * DEPTH
    tokens = [s.tokens_out - 1 for s in stats]  # image tokens after each block (1 class token)
    assert tokens == [55, 47, 40]  # 64 -> int(0.15 * n) fewer at each block


def test_the_default_ratio_leaves_given_values_and_local_mode_alone():
    model = FAMILIES["vit"].build()
    for given, ratio in (({"ratio": 0.2}, 0.2), ({"r": 4}, 0.5), ({"ratio": 0.0}, 0.0)):
        with tokenmerge.apply(model, "tome", **given) as handle:
            assert handle.config.ratio == ratio
    with tokenmerge.apply(model, "tome", adapter_options={"mode": "local"}) as handle:
        assert handle.config.ratio == 0.5  # local mode unmerges after every block: no compounding


def test_a_ratio_above_what_classifiers_take_warns_naming_the_default():
    model = FAMILIES["vit"].build()
    with pytest.warns(RatioWarning, match="leaving about 12% .* the default 0.15") as caught:
        handle = tokenmerge.apply(model, "tome", ratio=0.5)
    handle.remove()
    assert caught[0].filename == __file__  # points at the user's call
    for quiet in ({"ratio": 0.25}, {"r": 16}, {"ratio": 0.5, "adapter_options": {"mode": "local"}}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RatioWarning)
            tokenmerge.apply(model, "tome", **quiet).remove()
