"""Tiny DiT-family pipelines (DiT, PixArt-alpha, SD3, SD 3.5, Flux) from ``dit_pipelines``, run
end to end on CPU in seconds: first unpatched (the baseline), then merged at pipeline level with
every registered strategy (``tokenmerge.apply(pipe, ...)`` patches ``pipe.transformer``).

What each attention / MLP really computes on is counted with our own forward pre-hooks on the
projections the module's forward calls (``to_q``, ``add_q_proj``, ``to_k``, ``ff.net[0]``,
``proj_mlp``), not on the hooked modules themselves: a pre-hook on a module sees the merged
tokens or not depending on whether it was registered after or before tokenmerge's, while the
projections run inside the forward, on what the module really computes with.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from diffusers import DiTPipeline, FluxPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline
from dit_pipelines import FACTORIES, TEXT_TOKENS, image_grid, image_tokens, make_sd3, run
from snapshots import counting, hook_count, snapshot, watch_fits
from torch import nn

import tokenmerge
from tokenmerge.api import HANDLE_ATTR

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # DPMSolverMultistepScheduler calls np.array on a torch tensor with copy=False (numpy 2
    # protocol), which torch 2.14 answers with this warning: diffusers, not us
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

NAMES = list(FACTORIES)
# conftest turns entry-point autoloading off before this import: the built-ins only
STRATEGIES = tokenmerge.list_strategies()
#: what the strategies' tests here count is the tokens reaching each module: todo pools keys and
#: values alone by default (every query stays), so it runs merging tokens here
#: (``test_todo_pools_keys_and_values_in_pipelines`` counts its default)
TOKENS = {"todo": {"keys_values": False}}
RATIO = 0.5


class TokenCounter:
    """Records the tokens each attention and MLP of every transformer block computes on, the
    arguments the transformer receives, and how often it is called.

    Keys ``"<block>.<module>"``: ``attn`` / ``attn1`` / ``attn2`` (their queries, ``to_q``),
    ``<attn>.text`` (the text queries of a joint attention, ``add_q_proj``), ``<attn>.keys`` (the
    keys of a cross-attention, ``to_k``), ``ff`` (``ff.net[0]``) and, in Flux single-stream
    blocks, ``proj_mlp``.
    """

    def __init__(self, transformer: nn.Module) -> None:
        self.seen: dict[str, list[int]] = defaultdict(list)
        self.inputs: list[dict] = []
        self._handles = [
            *watch_fits(transformer),
            transformer.register_forward_pre_hook(self._record_input, with_kwargs=True),
        ]
        for blocks in ("transformer_blocks", "single_transformer_blocks"):
            for index, block in enumerate(getattr(transformer, blocks, ())):
                name = f"{blocks}.{index}"
                for attn in ("attn", "attn1", "attn2"):
                    module = getattr(block, attn, None)
                    if module is None:
                        continue
                    self._count(module.to_q, f"{name}.{attn}")
                    if getattr(module, "add_q_proj", None) is not None:
                        self._count(module.add_q_proj, f"{name}.{attn}.text")
                    if getattr(module, "is_cross_attention", False):
                        self._count(module.to_k, f"{name}.{attn}.keys")
                if getattr(block, "ff", None) is not None:
                    self._count(block.ff.net[0], f"{name}.ff")
                if hasattr(block, "proj_mlp"):
                    self._count(block.proj_mlp, f"{name}.proj_mlp")

    def _record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.inputs.append({**dict(enumerate(args)), **kwargs})

    def _count(self, module: nn.Module, key: str) -> None:
        def hook(module: nn.Module, args: tuple) -> None:
            if counting():
                self.seen[key].append(args[0].shape[1])

        self._handles.append(module.register_forward_pre_hook(hook))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> TokenCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hidden_states(call: dict) -> torch.Tensor:
    return call.get("hidden_states", call.get(0))


def merged(n: int, ratio: float = RATIO) -> int:
    """Image tokens left after merging ``int(ratio * n)`` of ``n`` (every grid here is even,
    so no strategy runs out of cells or windows at ratio 0.5)."""
    return n - int(ratio * n)


def expected_tokens(
    pipe, key: str, attn: bool = False, mlp: bool = False, cross_attn: bool = False
) -> int:
    """The tokens the module counted under ``key`` computes on when tokenmerge merges around
    the attention (``attn``), the MLP (``mlp``) and PixArt's cross-attention (``cross_attn``)."""
    n = image_tokens(pipe)
    module = key.split(".")[2]
    if key.endswith((".text", ".keys")):
        return TEXT_TOKENS  # text is never merged, not even as keys
    if module == "attn2" and isinstance(pipe, PixArtAlphaPipeline):
        merging = cross_attn  # PixArt's attn2 is cross-attention (SD 3.5's is self-attention)
    elif module in ("attn", "attn1", "attn2"):
        merging = attn
    else:  # ff, proj_mlp
        merging = mlp
    tokens = merged(n) if merging else n
    # Flux single-stream blocks concatenate the text (first) and the image tokens
    return tokens + TEXT_TOKENS if key.startswith("single_transformer_blocks") else tokens


def block_names(pipe) -> set[str]:
    transformer = pipe.transformer
    return {
        f"{blocks}.{index}"
        for blocks in ("transformer_blocks", "single_transformer_blocks")
        for index in range(len(getattr(transformer, blocks, ())))
    }


# ---------------------------------------------------------------------------- exact removal


def untouched_components(pipe) -> list[nn.Module]:
    return [
        module
        for name, module in pipe.components.items()
        if isinstance(module, nn.Module) and name != "transformer"
    ]


# ---------------------------------------------------------------------------- baseline


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_runs_and_is_deterministic(name: str) -> None:
    make = FACTORIES[name]
    latents = run(make(), steps=2, seed=0)
    assert torch.isfinite(latents).all()
    assert torch.equal(run(make(), steps=2, seed=0), latents)  # fresh pipeline, same seed
    assert not torch.equal(run(make(), steps=2, seed=1), latents)
    pipe = make()
    assert torch.equal(run(pipe, steps=2, seed=0), latents)
    assert torch.equal(run(pipe, steps=2, seed=0), latents)  # no state left between calls


@pytest.mark.parametrize("name", NAMES)
def test_transformer_sees_the_documented_grid_batch_and_steps(name: str) -> None:
    pipe = FACTORIES[name]()
    rows, columns = image_grid(pipe)
    with TokenCounter(pipe.transformer) as counter:
        latents = run(pipe, steps=3, seed=0)
    calls = counter.inputs
    assert len(calls) == 3  # one transformer call per step
    x = hidden_states(calls[0])
    if isinstance(pipe, FluxPipeline):
        # packed tokens; the grid is only in img_ids (row, column per token)
        assert x.shape == (1, rows * columns, 64)
        ids = calls[0]["img_ids"]
        assert (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1) == (rows, columns)
        assert calls[0]["encoder_hidden_states"].shape[:2] == (1, TEXT_TOKENS)
        assert latents.shape == x.shape
    else:
        patch = pipe.transformer.config.patch_size
        assert x.shape[0] == 2  # classifier-free guidance as one batch
        assert (x.shape[-2] // patch, x.shape[-1] // patch) == (rows, columns)
        assert latents.shape == (1, *x.shape[1:])
    if not isinstance(pipe, DiTPipeline):  # DiT runs square grids only
        assert rows != columns
    assert rows >= 8 and columns >= 8
    assert counter.seen  # every family has blocks with attention
    for key, seen in counter.seen.items():
        assert seen == [expected_tokens(pipe, key)] * 3, key


def test_sd35_variant_has_the_image_only_second_attention() -> None:
    sd3, sd35 = FACTORIES["sd3"](), FACTORIES["sd35"]()
    assert isinstance(sd35, StableDiffusion3Pipeline)
    assert [block.attn2 is not None for block in sd35.transformer.transformer_blocks] == [
        True,
        False,
    ]
    assert all(block.attn2 is None for block in sd3.transformer.transformer_blocks)
    with TokenCounter(sd35.transformer) as counter:
        run(sd35, steps=1)
    assert counter.seen["transformer_blocks.0.attn2"] == [image_tokens(sd35)]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "dit"])
def test_run_never_decodes(name: str) -> None:
    """Only DiT's pipeline cannot skip the VAE; the others return latents undecoded."""
    pipe = FACTORIES[name]()

    def refuse(module: nn.Module, args: tuple) -> None:
        raise AssertionError("the VAE decoder ran")

    handle = pipe.vae.decoder.register_forward_pre_hook(refuse)
    try:
        run(pipe, steps=2)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- merging

STEPS = 6  # with retom's default cache_interval of 5: plans at steps 0 and 5, reused at 1-4


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", NAMES)
def test_pipeline_level_apply_merges_at_every_block(name: str, strategy: str) -> None:
    pipe = FACTORIES[name]()
    expected = run(pipe, steps=STEPS)
    before = snapshot(pipe.transformer)
    handle = tokenmerge.apply(
        pipe, strategy, **TOKENS.get(strategy, {}), ratio=RATIO, sites={"min_tokens": 1}
    )
    assert handle.model is pipe.transformer
    assert vars(pipe.transformer)[HANDLE_ATTR] is handle
    assert {site.name for site in handle.sites} == block_names(pipe)  # every block by default
    assert all(hook_count(module) == 0 for module in untouched_components(pipe))

    with TokenCounter(pipe.transformer) as counter:
        latents = run(pipe, steps=STEPS)
    assert latents.shape == expected.shape
    assert torch.isfinite(latents).all()
    assert not torch.equal(latents, expected)
    assert len(counter.inputs) == STEPS
    for key, seen in counter.seen.items():
        assert seen == [expected_tokens(pipe, key, attn=True)] * STEPS, key
    attention = [k for k in counter.seen if k.endswith(("attn", "attn1"))]
    assert len(attention) == len(block_names(pipe))  # really counted at every block

    interval = tokenmerge.load_config(strategy).cache_interval
    computed = math.ceil(STEPS / interval)
    n = image_tokens(pipe)
    stats = handle.stats()
    assert set(stats) == block_names(pipe)
    for site, site_stats in stats.items():
        text = TEXT_TOKENS if site.startswith("single_transformer_blocks") else 0
        assert site_stats.calls == STEPS, site
        assert (site_stats.tokens_in, site_stats.tokens_out) == (n + text, merged(n) + text)
        # what the site reports is what its attention computed on
        assert counter.seen[f"{site}.{'attn1' if name in ('dit', 'pixart') else 'attn'}"][-1] == (
            site_stats.tokens_out
        )
        assert (site_stats.plans_computed, site_stats.plans_reused) == (
            computed,
            STEPS - computed,
        ), site
        assert site_stats.passed_through == 0 and site_stats.skipped is None
        assert site_stats.shortfall == 0

    # a second generation plans afresh and, with the same seed, repeats the first exactly
    assert torch.equal(run(pipe, steps=STEPS), latents)
    for site_stats in handle.stats().values():
        assert site_stats.plans_computed == 2 * computed

    handle.remove()
    assert snapshot(pipe.transformer) == before
    assert hook_count(pipe.transformer) == 0
    assert torch.equal(run(pipe, steps=STEPS), expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", NAMES)
def test_ratio_zero_is_bit_identical(name: str, strategy: str) -> None:
    pipe = FACTORIES[name]()
    expected = run(pipe, steps=3)
    options = dict(sites={"mlp": True, "min_tokens": 1})
    with tokenmerge.apply(
        pipe, strategy, **TOKENS.get(strategy, {}), ratio=0.0, **options
    ) as handle:
        with TokenCounter(pipe.transformer) as counter:
            assert torch.equal(run(pipe, steps=3), expected)
        stats = handle.stats()
    for key, seen in counter.seen.items():
        assert seen == [expected_tokens(pipe, key)] * 3, key
    assert {(s.tokens_in - s.tokens_out, s.calls) for s in stats.values()} == {(0, 3)}
    assert hook_count(pipe.transformer) == 0
    assert torch.equal(run(pipe, steps=3), expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", NAMES)
def test_merge_mlp_merges_around_the_mlp_too(name: str, strategy: str) -> None:
    """Flux single-stream blocks have no ``ff``: their parallel MLP (``proj_mlp``) merges."""
    pipe = FACTORIES[name]()
    expected = run(pipe, steps=2)
    with tokenmerge.apply(
        pipe,
        strategy,
        **TOKENS.get(strategy, {}),
        ratio=RATIO,
        sites={"min_tokens": 1, "mlp": True},
    ) as handle:
        with TokenCounter(pipe.transformer) as counter:
            latents = run(pipe, steps=2)
        stats = handle.stats()
    assert latents.shape == expected.shape and torch.isfinite(latents).all()
    mlps = [key for key in counter.seen if key.endswith((".ff", ".proj_mlp"))]
    assert len(mlps) == len(block_names(pipe))
    for key, seen in counter.seen.items():
        assert seen == [expected_tokens(pipe, key, attn=True, mlp=True)] * 2, key
    assert all(s.passed_through == 0 for s in stats.values())
    assert torch.equal(run(pipe, steps=2), expected)


@pytest.mark.parametrize("name", NAMES)
def test_merge_mlp_alone_leaves_attention_whole(name: str) -> None:
    pipe = FACTORIES[name]()
    options = dict(ratio=RATIO, sites={"min_tokens": 1, "attn": False, "mlp": True})
    with tokenmerge.apply(pipe, "tome", **options):
        with TokenCounter(pipe.transformer) as counter:
            latents = run(pipe, steps=2)
    assert torch.isfinite(latents).all()
    for key, seen in counter.seen.items():
        assert seen == [expected_tokens(pipe, key, mlp=True)] * 2, key


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pixart_cross_attention_merges_its_queries_only(strategy: str) -> None:
    pipe = FACTORIES["pixart"]()
    options = dict(ratio=RATIO, sites={"min_tokens": 1, "cross_attn": True})
    with tokenmerge.apply(pipe, strategy, **TOKENS.get(strategy, {}), **options) as handle:
        with TokenCounter(pipe.transformer) as counter:
            latents = run(pipe, steps=2)  # the text tokens carry a padding mask
        stats = handle.stats()
    assert torch.isfinite(latents).all()
    assert counter.seen["transformer_blocks.0.attn2"] == [merged(image_tokens(pipe))] * 2
    for key, seen in counter.seen.items():
        assert seen == [expected_tokens(pipe, key, attn=True, cross_attn=True)] * 2, key
    assert all(s.passed_through == 0 for s in stats.values())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_flux_true_cfg_merges_both_calls_of_each_step(strategy: str) -> None:
    """With ``true_cfg_scale > 1`` Flux calls the transformer twice per step (conditional, then
    negative), each with batch 1: both merge, and plans are still reused across steps."""
    pipe = FACTORIES["flux"]()
    expected = run(pipe, steps=STEPS, true_cfg_scale=2.0)
    with tokenmerge.apply(
        pipe, strategy, **TOKENS.get(strategy, {}), ratio=RATIO, sites={"min_tokens": 1}
    ) as handle:
        with TokenCounter(pipe.transformer) as counter:
            latents = run(pipe, steps=STEPS, true_cfg_scale=2.0)
        stats = handle.stats()
    assert latents.shape == expected.shape and torch.isfinite(latents).all()
    assert not torch.equal(latents, expected)
    assert len(counter.inputs) == 2 * STEPS
    for key, seen in counter.seen.items():
        assert seen == [expected_tokens(pipe, key, attn=True)] * 2 * STEPS, key
    interval = tokenmerge.load_config(strategy).cache_interval
    for site_stats in stats.values():
        assert site_stats.calls == 2 * STEPS
        assert site_stats.plans_computed + site_stats.plans_reused == 2 * STEPS
        if interval > 1:
            assert site_stats.plans_reused > 0
    assert torch.equal(run(pipe, steps=STEPS, true_cfg_scale=2.0), expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sd35_skip_layer_guidance_merges_both_passes(strategy: str) -> None:
    """SD 3.5's skip-layer guidance runs a second, batch-1 call per step without the skipped
    blocks: every call that reaches a block merges there, whatever the batch."""
    pipe = make_sd3(dual_attention=True, layers=3)
    slg = dict(
        skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0
    )
    expected = run(pipe, steps=3, **slg)
    with tokenmerge.apply(
        pipe, strategy, **TOKENS.get(strategy, {}), ratio=RATIO, sites={"min_tokens": 1}
    ) as handle:
        with TokenCounter(pipe.transformer) as counter:
            latents = run(pipe, steps=3, **slg)
        stats = handle.stats()
    assert latents.shape == expected.shape and torch.isfinite(latents).all()
    # guidance batch, then (from the second step: ``i > 0 * steps``) the skip-layer pass
    assert [len(hidden_states(call)) for call in counter.inputs] == [2, 2, 1, 2, 1]
    for key, seen in counter.seen.items():
        calls = 3 if key.startswith("transformer_blocks.1.") else 5  # block 1 is skipped
        assert seen == [expected_tokens(pipe, key, attn=True)] * calls, key
    assert [stats[f"transformer_blocks.{i}"].calls for i in range(3)] == [5, 3, 5]
    assert torch.equal(run(pipe, steps=3, **slg), expected)


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_todo_pools_keys_and_values_in_pipelines(name: str) -> None:
    pipe = FACTORIES[name]()
    expected = run(pipe, steps=STEPS)
    with tokenmerge.apply(pipe, "todo", sites={"min_tokens": 1}) as handle:
        with TokenCounter(pipe.transformer) as counter:
            latents = run(pipe, steps=STEPS)
        stats = handle.stats()
    assert latents.shape == expected.shape and torch.isfinite(latents).all()
    assert not torch.equal(latents, expected)
    n = image_tokens(pipe)
    for key, seen in counter.seen.items():
        assert seen == [expected_tokens(pipe, key)] * STEPS, key  # every query stays
    for site_stats in stats.values():
        assert site_stats.keys_values and site_stats.passed_through == 0
        assert (site_stats.tokens_in, site_stats.tokens_out) == (n, n // 4)


def test_flux_pipeline_steps_are_placed_without_reading_the_device(monkeypatch) -> None:
    """FLUX.1's pipeline passes ``timestep / 1000``, a tensor of its own; tokenmerge places the
    step by the pipeline's current one (a view of its schedule) and never reads a value."""
    import tokenmerge.state

    reads = []
    read = tokenmerge.state.timestep_value
    monkeypatch.setattr(tokenmerge.state, "timestep_value", lambda t: reads.append(t) or read(t))
    pipe = FACTORIES["flux"]()
    handle = tokenmerge.apply(pipe, "retom", ratio=RATIO, sites={"min_tokens": 1})
    run(pipe, steps=STEPS)
    assert reads == []
    assert all(s.plans_reused > 0 for s in handle.stats().values())  # steps were told apart
    transformer = FACTORIES["flux"]().transformer  # applied to the model alone: values are read
    tokenmerge.apply(transformer, "retom", ratio=RATIO, sites={"min_tokens": 1})
    pipe.transformer = transformer
    run(pipe, steps=STEPS)
    assert len(reads) == STEPS
