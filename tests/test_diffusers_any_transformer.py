"""Any diffusers image or video transformer, found by what it is made of
(``adapters/diffusers_transformer.py``), and Chroma through the Flux adapter: tiny random-weight
builds of every class in ``diffusers_zoo`` and whole generations of tiny pipelines."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from diffusers_zoo import ZOO, output_of
from tiny_transformer_pipelines import TINY_PIPELINES, generate
from torch import Tensor, nn

import tokenmerge
from tokenmerge.adapters.diffusers_transformer import (
    Keywords,
    is_attention,
    reduce_tables,
    token_axes,
)
from tokenmerge.errors import NothingMergedWarning, TokenMergeWarning
from tokenmerge.plan import Plan

#: the adapter ``apply`` chooses for each zoo model
ADAPTER = {name: "diffusers_transformer" for name in ZOO} | {
    "flux": "diffusers_flux",
    "chroma": "diffusers_flux",
    "sd3": "diffusers_dit",
}
MERGING = list(ZOO)
SITES = {"min_tokens": 1, "mlp": True}


def _plain(name: str) -> tuple[nn.Module, dict[str, Any], Tensor]:
    entry = ZOO[name]
    model, kwargs = entry.build(), entry.inputs(2)
    with torch.no_grad():
        return model, kwargs, output_of(model, kwargs)


def _run(model: nn.Module, kwargs: dict[str, Any]) -> Tensor:
    with torch.no_grad():
        return output_of(model, kwargs)


@pytest.mark.parametrize("name", MERGING)
def test_merges_and_is_exact_at_ratio_zero_and_after_removal(name: str) -> None:
    model, kwargs, plain = _plain(name)
    with tokenmerge.apply(model, "tome", ratio=0.0, sites=SITES):
        assert torch.equal(_run(model, kwargs), plain)
    handle = tokenmerge.apply(model, "retom", ratio=0.5, sites=SITES)
    assert handle.adapter.name == ADAPTER[name]
    merged = _run(model, kwargs)
    stats = handle.stats()
    handle.remove()
    assert merged.shape == plain.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, plain)
    assert any(site.tokens_out < site.tokens_in for site in stats.values()), stats
    assert torch.equal(_run(model, kwargs), plain)


@pytest.mark.parametrize("name", MERGING)
def test_sites_are_rotary_where_the_blocks_take_a_rotary_table(name: str) -> None:
    """``Site.rotary`` (retom's window scope under ``scope="auto"``) is read from the blocks'
    signatures: checked here against the tables the blocks really receive."""
    model, kwargs, _ = _plain(name)
    received: dict[str, bool] = {}

    def record(module: nn.Module, args: tuple, block_kwargs: dict) -> None:
        given = inspect.signature(module.forward).bind(*args, **block_kwargs).arguments
        names = [n for n, v in given.items() if v is not None]
        received[module_names[module]] = any(
            "rotary" in n or "rope" in n or n == "freqs_cis" for n in names
        )

    with tokenmerge.apply(model, "retom", ratio=0.5, sites=SITES) as handle:
        module_names = {model.get_submodule(s.name): s.name for s in handle.sites}
        hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in module_names]
        _run(model, kwargs)
        for hook in hooks:
            hook.remove()
        rotary = {s.name: s.rotary for s in handle.sites}
    assert rotary == received, name


@pytest.mark.parametrize("name", ["wan", "qwen_image", "ltx", "allegro", "hunyuan_video"])
@pytest.mark.parametrize("strategy", ["tome", "todo", "random"])
def test_every_strategy_merges(name: str, strategy: str) -> None:
    model, kwargs, plain = _plain(name)
    with tokenmerge.apply(model, strategy, ratio=0.5, sites=SITES, seed=0) as handle:
        out = _run(model, kwargs)
        merged = [s for s in handle.stats().values() if s.tokens_out < s.tokens_in]
    assert out.shape == plain.shape and torch.isfinite(out).all() and merged


@pytest.mark.parametrize("name", MERGING)
def test_no_argument_of_a_merged_call_keeps_the_full_token_count(name: str) -> None:
    # rotary tables, positions and masks follow the merged tokens: none is left whole
    model, kwargs, _ = _plain(name)
    seen: list[str] = []
    handle = tokenmerge.apply(model, "tome", ratio=0.5, sites=SITES, seed=0)
    grid = ZOO[name].grid
    tokens = grid[0] * grid[1] * grid[2]

    def spy(module: nn.Module, args: tuple, call: dict) -> None:
        x = args[0] if args else call.get("hidden_states")
        if not isinstance(x, Tensor) or x.shape[1] >= tokens:
            return  # not merged
        for key, value in call.items():
            for part in _tensors(value):
                if key != "encoder_hidden_states" and tokens in part.shape:
                    seen.append(f"{type(module).__name__}.{key} {tuple(part.shape)}")

    hooks = [
        module.register_forward_pre_hook(spy, with_kwargs=True)
        for module in model.modules()
        if is_attention(module)
    ]
    _run(model, kwargs)
    for hook in hooks:
        hook.remove()
    handle.remove()
    assert not seen, seen


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for part in value for t in _tensors(part)]
    return []


@pytest.mark.parametrize("name", ["wan", "ltx", "hunyuan_video", "cogvideox", "mochi", "allegro"])
def test_video_tokens_merge_within_their_frame(name: str) -> None:
    model, kwargs, _ = _plain(name)
    frames, rows, cols = ZOO[name].grid
    per_frame = rows * cols
    with tokenmerge.apply(model, "tome", ratio=0.5, sites=SITES, seed=0) as handle:
        _run(model, kwargs)
        plans = [site.last_plan for site in handle.patches if site.last_plan is not None]
    assert plans
    for plan in plans:
        assert plan.num_tokens == frames * per_frame
        destination = plan.kept.gather(1, plan.dst)
        assert torch.equal(plan.src // per_frame, destination // per_frame)
        # every frame merges alike
        assert torch.equal(
            torch.bincount(plan.kept[0] // per_frame, minlength=frames),
            torch.full((frames,), plan.num_out // frames),
        )


def test_frames_span_plans_consecutive_frames_together() -> None:
    """frames_span=3 on Wan's 3 latent frames: one plan over the three, where ToMe's matching
    merges tokens into other frames' (a static scene's repeats); rotary rows still follow."""
    model, kwargs, plain = _plain("wan")
    frames, rows, cols = ZOO["wan"].grid
    per_frame = rows * cols
    options = {"frames_span": 3}
    with tokenmerge.apply(
        model, "tome", ratio=0.5, sites=SITES, seed=0, adapter_options=options
    ) as handle:
        out = _run(model, kwargs)
        plans = [site.last_plan for site in handle.patches if site.last_plan is not None]
    assert out.shape == plain.shape and torch.isfinite(out).all()
    across = 0
    for plan in plans:
        destination = plan.kept.gather(1, plan.dst)
        across += int((plan.src // per_frame != destination // per_frame).sum())
    assert across > 0
    with tokenmerge.apply(model, "tome", ratio=0.0, sites=SITES, adapter_options=options):
        assert torch.equal(_run(model, kwargs), plain)


def test_a_frames_span_that_does_not_divide_the_frames_warns_and_takes_a_divisor() -> None:
    model, kwargs, _ = _plain("wan")
    frames, rows, cols = ZOO["wan"].grid  # 3 frames: a span of 2 falls to 1
    options = {"frames_span": 2}
    with tokenmerge.apply(
        model, "tome", ratio=0.5, sites=SITES, seed=0, adapter_options=options
    ) as handle:
        with pytest.warns(TokenMergeWarning, match="groups of 1 frame"):
            _run(model, kwargs)
        plans = [site.last_plan for site in handle.patches if site.last_plan is not None]
    for plan in plans:
        destination = plan.kept.gather(1, plan.dst)
        assert torch.equal(plan.src // (rows * cols), destination // (rows * cols))
    with pytest.raises(tokenmerge.ConfigError, match="frames_span"):
        tokenmerge.apply(model, "tome", adapter_options={"frames_span": 0})


def test_wan_rotary_rows_give_each_kept_token_its_own_position() -> None:
    # merging pairs of identical tokens and attending among the kept ones with the reduced
    # table is Wan's own attention over all tokens with the merged-away ones masked out as keys
    model, kwargs, _ = _plain("wan")
    latents = kwargs["hidden_states"][:1]
    attention = model.blocks[0].attn1
    with torch.no_grad():
        table = model.rope(latents)
        tokens = table[0].shape[1]
        x = torch.randn(
            1, tokens, model.config.num_attention_heads * model.config.attention_head_dim
        )
        src = torch.arange(1, tokens, 3)
        dst = src - 1
        x[:, src] = x[:, dst]
        plan = Plan.from_assignment(src[None], dst[None], tokens)
        reduced = reduce_tables(plan, {"rotary_emb": table})["rotary_emb"]
        merged = attention(plan.merge(x), None, None, reduced)
        visible = torch.ones(tokens, dtype=torch.bool)
        visible[src] = False
        reference = attention(x, None, visible[None, None, None, :], table)[:, plan.kept[0]]
        torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-5)
        # the test can fail: the first rows of the table are not the kept tokens' positions
        first = tuple(part[:, : plan.num_out] for part in table)
        wrong = attention(plan.merge(x), None, None, first)
        assert not torch.allclose(wrong, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "shape", "tokens", "axes"),
    [
        ("rotary_emb", (1, 64, 1, 16), 64, [1]),  # Wan's cos / sin
        ("image_rotary_emb", (64, 8), 64, [0]),  # Qwen-Image's image frequencies
        ("image_rotary_emb", (6, 8), 64, []),  # and its text frequencies
        ("image_rotary_emb", (2, 64, 16), 64, [1]),  # LTX's batched tables
        ("rotary_emb", (64, 64), 64, [0]),  # features as many as the tokens
        ("attention_mask", (2, 1, 64, 64), 64, [2, 3]),
        ("attention_mask", (2, 64), 64, [1]),
        ("grid", (1, 64), 64, [1]),  # Allegro's integer positions (float: features)
    ],
)
def test_token_axes(name: str, shape: tuple, tokens: int, axes: list[int]) -> None:
    dtype = torch.long if name == "grid" else torch.float32
    assert token_axes(name, torch.zeros(shape, dtype=dtype), tokens) == axes


def test_token_axes_ambiguous() -> None:
    assert token_axes("rotary_emb", torch.zeros(64, 64, 8), 64) is None


def test_chroma_attention_mask_follows_the_merged_tokens() -> None:
    # masked text tokens stay invisible when the image merges: the output does not depend on
    # what they hold, as without merging
    model, kwargs, _ = _plain("chroma")
    text = kwargs["encoder_hidden_states"]
    mask = torch.ones(text.shape[0], text.shape[1] + 64, dtype=torch.bool)
    mask[1, 3 : text.shape[1]] = False
    changed = text.clone()
    changed[1, 3:] = torch.randn_like(changed[1, 3:])
    masked = {**kwargs, "attention_mask": mask}
    for strategy in ("retom", "todo"):
        with tokenmerge.apply(model, strategy, ratio=0.5, sites=SITES, seed=0) as handle:
            out = _run(model, masked)
            out_changed = _run(model, {**masked, "encoder_hidden_states": changed})
            assert all(s.passed_through == 0 for s in handle.stats().values())
        assert torch.equal(out[1], out_changed[1]), strategy
        assert not torch.equal(out[0], _run(model, masked)[0])  # it merged


@pytest.mark.parametrize("name", list(TINY_PIPELINES))
def test_whole_generation_of_a_tiny_pipeline(name: str) -> None:
    entry = TINY_PIPELINES[name]
    pipe = entry.build()
    plain = generate(pipe, entry.call(pipe, 0))
    with tokenmerge.apply(pipe, "tome", ratio=0.0, sites=SITES):
        assert torch.equal(generate(pipe, entry.call(pipe, 0)), plain)
    handle = tokenmerge.apply(pipe, "retom", ratio=0.5, sites=SITES)
    merged = generate(pipe, entry.call(pipe, 0))
    stats = handle.stats()
    handle.remove()
    frames, rows, cols = entry.image_tokens
    assert merged.shape == plain.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, plain)
    assert frames * rows * cols in {site.tokens_in for site in stats.values()}
    assert any(site.tokens_out < site.tokens_in for site in stats.values())
    assert sum(site.plans_reused for site in stats.values()) > 0  # planned across steps
    assert torch.equal(generate(pipe, entry.call(pipe, 0)), plain)


def test_a_module_run_on_text_as_long_as_the_image_passes_through() -> None:
    # CogView4 puts its text through the image's ff too: with 64 text tokens and 64 image
    # tokens the two calls cannot be told apart, so neither merges (none with the image's plan)
    model, kwargs, _ = _plain("cogview4")
    text = torch.randn(2, 64, kwargs["encoder_hidden_states"].shape[-1])
    long_text = {**kwargs, "encoder_hidden_states": text}
    plain = _run(model, long_text)
    sites = {"attn": False, "mlp": True, "min_tokens": 1}
    with tokenmerge.apply(model, "tome", ratio=0.5, sites=sites) as handle:
        with pytest.warns(NothingMergedWarning, match="text is as long as the image"):
            out = _run(model, long_text)
        assert all(s.tokens_out == s.tokens_in for s in handle.stats().values())
        merged = _run(model, kwargs)  # 6 text tokens: the image's ff merges, the text's not
        assert any(s.tokens_out < s.tokens_in for s in handle.stats().values())
    assert torch.equal(out, plain) and not torch.equal(merged, _run(model, kwargs))


def test_targets_get_their_tokens_first_and_the_rest_by_name() -> None:
    model, _, _ = _plain("wan")
    attention = model.blocks[0].attn1
    keywords = Keywords(attention)
    x, table = torch.zeros(1, 4, 24), (torch.zeros(1, 4, 1, 12),) * 2
    args, kwargs = keywords(attention, (x, None, None, table), {})
    assert args == (x,) and kwargs["rotary_emb"] is table and kwargs["attention_mask"] is None
    args, kwargs = keywords(attention, (), {"hidden_states": x, "rotary_emb": table})
    assert args == (x,) and kwargs == {"rotary_emb": table}
    assert keywords(attention, (x,), {"rotary_emb": table}) is None  # nothing to move


def test_hunyuan_video_text_padding_mask_follows_the_merged_tokens() -> None:
    # the model masks text padding over image then text tokens; the merged attention keeps
    # masking it: what the padded text holds changes nothing, merged or not
    model, kwargs, _ = _plain("hunyuan_video")
    mask = kwargs["encoder_attention_mask"].clone()
    mask[1, 3:] = 0
    changed = kwargs["encoder_hidden_states"].clone()
    changed[1, 3:] = torch.randn_like(changed[1, 3:])
    padded = {**kwargs, "encoder_attention_mask": mask}
    assert torch.equal(
        _run(model, padded)[1], _run(model, {**padded, "encoder_hidden_states": changed})[1]
    )
    with tokenmerge.apply(model, "retom", ratio=0.5, sites=SITES) as handle:
        out = _run(model, padded)
        out_changed = _run(model, {**padded, "encoder_hidden_states": changed})
        stats = handle.stats().values()
    assert all(s.passed_through == 0 and s.tokens_out < s.tokens_in for s in stats)
    assert torch.equal(out[1], out_changed[1])


def test_attention_scaled_by_its_length_keeps_its_scale() -> None:
    # Lumina's proportional attention scales the logits by sqrt(log(L) / log(base)) for L
    # query tokens: a merged call gets the base that keeps the whole call's scale
    model, kwargs, _ = _plain("lumina_next")
    scaled = {**kwargs, "cross_attention_kwargs": {"base_sequence_length": 16}}
    plain = _run(model, scaled)
    seen: list[tuple[int, float]] = []

    def spy(module: nn.Module, args: tuple, call: dict) -> None:
        if call.get("key_rotary_emb") is not None:  # self-attention: scaled
            length = (args[0] if args else call["hidden_states"]).shape[1]
            seen.append((length, call["base_sequence_length"]))

    with tokenmerge.apply(model, "tome", ratio=0.5, sites=SITES) as handle:
        for module in model.modules():
            if is_attention(module):
                module.register_forward_pre_hook(spy, with_kwargs=True)
        out = _run(model, scaled)
        stats = handle.stats().values()
    assert all(s.passed_through == 0 and s.tokens_out < s.tokens_in for s in stats)
    whole = ZOO["lumina_next"].grid[1] * ZOO["lumina_next"].grid[2]
    assert seen and all(length < whole for length, _ in seen)
    for length, base in seen:
        assert math.log(length, base) == pytest.approx(math.log(whole, 16), rel=1e-12)
    assert out.shape == plain.shape and not torch.equal(out, plain)


@pytest.mark.parametrize("name", ["cogvideox", "cogview3plus"])
def test_an_mlp_given_text_then_image_shares_its_attention_plan(name: str) -> None:
    # the block's attention takes the image tokens alone and its MLP the text then the image
    # tokens: the MLP merges with the attention's plan, the text kept in front, so the site
    # plans once and reuses the plan at every later step
    model, kwargs, _ = _plain(name)
    seen: list[int] = []
    grid = ZOO[name].grid
    tokens, text = grid[0] * grid[1] * grid[2], kwargs["encoder_hidden_states"].shape[1]
    with tokenmerge.apply(model, "tome", ratio=0.5, sites=SITES, cache_interval=100) as handle:
        for block in model.transformer_blocks:  # after the merge hooks: sees merged tokens
            block.ff.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        for step in (900, 800, 700):
            _run(model, {**kwargs, "timestep": torch.full_like(kwargs["timestep"], step)})
        stats = handle.stats().values()
    assert all(s.plans_computed == 1 and s.plans_reused == 2 for s in stats), list(stats)
    assert all(s.passed_through == 0 for s in stats)
    assert set(seen) == {text + tokens - tokens // 2}  # the text whole, half the image


def test_hidream_text_behind_the_image_keeps_its_rotary_rows() -> None:
    """HiDream's single-stream blocks take image then text tokens in one sequence, and both
    kinds of block one rotary table over image then text: the image rows follow the merged
    tokens (a subset of the image's, in order), the text rows all stay, last."""
    model, kwargs, _ = _plain("hidream")
    grid = ZOO["hidream"].grid
    image = grid[0] * grid[1] * grid[2]
    tables: dict[str, list[Tensor]] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, call: dict) -> None:
            tables.setdefault(name, []).append(call["image_rotary_emb"])

        return hook

    double, single = (
        m.block.attn1 for m in (model.double_stream_blocks[0], model.single_stream_blocks[0])
    )

    def spy() -> list:
        return [
            attention.register_forward_pre_hook(keep(name), with_kwargs=True)
            for name, attention in (("double", double), ("single", single))
        ]

    hooks = spy()
    _run(model, kwargs)
    for hook in hooks:
        hook.remove()
    with tokenmerge.apply(model, "retom", ratio=0.5, sites=SITES) as handle:
        spy()  # after apply: sees the calls as merged
        _run(model, kwargs)
        assert all(s.tokens_out < s.tokens_in for s in handle.stats().values())
    for name in ("double", "single"):
        full, cut = tables[name]
        text = full.shape[1] - image
        assert cut.shape[1] == full.shape[1] - image // 2, name
        assert torch.equal(cut[:, -text:], full[:, -text:]), name
        rows = full[0, :image].flatten(1)
        found = [int((rows == row).all(1).nonzero()[0]) for row in cut[0, :-text].flatten(1)]
        assert found == sorted(set(found)), name  # distinct image rows, in token order


def test_lumina2_main_layers_merge_unless_captions_differ_in_length() -> None:
    """Lumina2's main layers take each caption then the image in one sequence: with captions of
    one length (no padding mask) the image part merges, the caption protected in front; with
    captions of different lengths each image starts elsewhere, and those calls pass through."""
    model, kwargs, plain = _plain("lumina2")
    main = {"layers.0", "layers.1"}
    with tokenmerge.apply(model, "retom", ratio=0.5, sites=SITES) as handle:
        _run(model, kwargs)
        stats = handle.stats()
        assert all(stats[name].tokens_out < stats[name].tokens_in for name in main)
    shorter = kwargs["encoder_attention_mask"].clone()
    shorter[0, -2:] = False  # the first caption two tokens shorter: a padding mask
    padded = {**kwargs, "encoder_attention_mask": shorter}
    expected = _run(model, padded)
    with tokenmerge.apply(model, "retom", ratio=0.5, sites=SITES) as handle:
        out = _run(model, padded)
        stats = handle.stats()
    for name in main:
        assert stats[name].tokens_out == stats[name].tokens_in
        assert "padding mask" in str(stats[name].pass_reason)
    assert stats["noise_refiner.0"].tokens_out < stats["noise_refiner.0"].tokens_in
    assert out.shape == expected.shape and not torch.equal(out, expected)
