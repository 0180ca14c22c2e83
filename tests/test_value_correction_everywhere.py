"""The value-corrected unmerge on every attention the adapters merge around in local mode.

Each kind of attention (diffusers' plain and joint processors, Flux, timm's ``Attention`` and
``EvaAttention``, transformers' ViT and CLIP attention, and modules the generic adapter only
knows by their projections' names) on a tiny model whose self-attention is similarity-based
(keys tied to queries and scaled, DESIGN.md "Testing"): the correction brings the merged output
closer to the unmerged model's and reports its weight; off, the model is as it was without the
feature; ratio 0 and removal are exact; a call queues no host sync the uncorrected call does not,
and a cached call pays a handful of kernels for it. Then what cannot be corrected (and shows None
in ``stats()``), the views' exact rows against the modules themselves, and gradients against
finite differences.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from snapshots import snapshot
from torch import Tensor, nn
from torch.func import functional_call
from toy_models import Attention
from transformer_models import FAMILIES as TRANSFORMERS
from transformer_models import flux_ids, make_flux, make_sd3
from transformer_models import inputs as transformer_inputs
from vit_models import FAMILIES as VITS

import tokenmerge
import tokenmerge.adapters._views as views
from tokenmerge.adapters._views import FluxBodyView
from tokenmerge.attention_view import NO_CALL, Call
from tokenmerge.correction import ValueCorrection
from tokenmerge.plan import Plan
from tokenmerge.testing import KernelCount, count_kernels
from tokenmerge_bench.fidelity import tie_self_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------------------- toy attention


class NamedAttention(nn.Module):
    """Self-attention with ``to_q`` / ``to_k`` / ``to_v`` / ``to_out`` and ``heads``, of a
    class no view knows (the generic adapter finds it by those names)."""

    def __init__(self, dim: int = 16, heads: int = 2, logits: float = 1.0) -> None:
        super().__init__()
        self.heads = heads
        self.logits = logits  # a module that scales its logits otherwise than the view thinks
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        def split(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        scale = self.logits * q.shape[-1] ** -0.5
        y = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return self.to_out[0](y.transpose(1, 2).flatten(2))


class FusedAttention(nn.Module):
    """Fused-qkv self-attention with ``num_heads`` (as in ViTs), of a class no view knows."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1)
        )
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Stack(nn.Module):
    """Residual blocks of one attention class, the model the generic adapter patches."""

    def __init__(self, attention: Callable[[], nn.Module], depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(attention() for _ in range(depth))

    def forward(self, x: Tensor, t: Any = None) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def _seeded(build: Callable[[], nn.Module], scale: float) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build().eval()
    assert tie_self_attention(model, scale) > 0
    return model


# ---------------------------------------------------------------------------- the kinds


@dataclass(frozen=True)
class Kind:
    """A kind of attention on a tiny model: how to build it (similarity-tied), call it at a
    timestep (ignored by models without one), and patch it."""

    name: str
    build: Callable[[], nn.Module]
    run: Callable[[nn.Module, float], Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    #: plans kept across denoising steps (diffusion models); else one plan per call
    steps: bool = False


def _transformer(family: str) -> Callable[[nn.Module, float], Tensor]:
    kwargs = transformer_inputs(family)

    def run(model: nn.Module, t: float) -> Tensor:
        timestep = kwargs["timestep"]
        step = t / 1000 if family == "flux" else t
        with torch.no_grad():
            return model(**{**kwargs, "timestep": torch.full_like(timestep, step)}).sample

    return run


def _timm_features(family: str) -> Callable[[nn.Module, float], Tensor]:
    images = VITS[family].inputs()

    def run(model: nn.Module, t: float) -> Tensor:
        with torch.no_grad():
            return model.forward_features(images)

    return run


def _hidden_states(family: str) -> Callable[[nn.Module, float], Tensor]:
    images = VITS[family].inputs()

    def run(model: nn.Module, t: float) -> Tensor:
        with torch.no_grad():
            return model(pixel_values=images).last_hidden_state

    return run


TOKENS = torch.randn(2, 1 + 36, 16, generator=torch.Generator().manual_seed(1))


def _tokens(model: nn.Module, t: float) -> Tensor:
    with torch.no_grad():
        return model(TOKENS, t)


def _eva02() -> nn.Module:
    model = VITS["eva02"].build()
    with torch.no_grad():  # EVA's separate query / value biases start at zero: make them count
        for block in model.blocks:
            block.attn.q_bias.normal_(std=0.5)
            block.attn.v_bias.normal_(std=0.5)
    return model


LOCAL = {"adapter_options": {"mode": "local"}}
DIFFUSION = {"sites": {"min_tokens": 1}}
GENERIC = {
    "adapter": "generic",
    "sites": {"include": ["blocks.*"], "min_tokens": 1},
    "adapter_options": {"grid": (6, 6), "num_prefix": 1, "timestep_arg": 1},
}
# timm and transformers initialise their ViTs with small weights: a larger scale makes their
# tied attention as sharp as the diffusers models' at 3
VIT_SCALE = 20.0

KINDS = [
    Kind(name, lambda n=name: _seeded(TRANSFORMERS[n], 3.0), _transformer(name), DIFFUSION, True)
    for name in ("dit", "pixart", "sd3", "flux")
] + [
    Kind(
        "flux-body",  # single-stream blocks merged around attention and MLP together
        lambda: _seeded(TRANSFORMERS["flux"], 3.0),
        _transformer("flux"),
        {"sites": {"mlp": True, "min_tokens": 1}},
        True,
    ),
    Kind("timm-vit", lambda: _seeded(VITS["vit"].build, VIT_SCALE), _timm_features("vit"), LOCAL),
    Kind(
        "timm-qk-norm",
        lambda: _seeded(VITS["qk_norm"].build, VIT_SCALE),
        _timm_features("qk_norm"),
        LOCAL,
    ),
    Kind("timm-eva02", lambda: _seeded(_eva02, VIT_SCALE), _timm_features("eva02"), LOCAL),
    Kind(
        "hf-vit", lambda: _seeded(VITS["hf_vit"].build, VIT_SCALE), _hidden_states("hf_vit"), LOCAL
    ),
    Kind(
        "hf-clip",
        lambda: _seeded(VITS["clip_vision"].build, 3.0),
        _hidden_states("clip_vision"),
        LOCAL,
    ),
    Kind(
        "generic-named", lambda: _seeded(lambda: Stack(NamedAttention), 3.0), _tokens, GENERIC, True
    ),
    Kind(
        "generic-fused", lambda: _seeded(lambda: Stack(FusedAttention), 3.0), _tokens, GENERIC, True
    ),
    Kind(
        "generic-timm",
        lambda: _seeded(lambda: Stack(lambda: timm.layers.Attention(16, num_heads=2)), 3.0),
        _tokens,
        GENERIC,
        True,
    ),
]
KIND_IDS = [kind.name for kind in KINDS]


@pytest.fixture(scope="module", params=KINDS, ids=KIND_IDS)
def kind(request) -> Kind:
    return request.param


def _apply(model: nn.Module, kind: Kind, **config: Any) -> tokenmerge.Handle:
    return tokenmerge.apply(model, **{"config": "retom", "ratio": 0.5, **kind.options, **config})


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------- every kind


@pytest.mark.parametrize("strategy", ["tome", "retom"])
def test_correction_brings_the_output_closer_to_the_unmerged_model(kind, strategy):
    model = kind.build()
    reference = kind.run(model, 500)
    errors, betas = {}, []
    for corrected in (False, True):
        with _apply(model, kind, config=strategy, value_correction=corrected) as handle:
            errors[corrected] = _relative(kind.run(model, 500), reference)
            stats = handle.stats().values()
            assert any(s.tokens_out < s.tokens_in for s in stats)
            betas = [s.value_correction for s in stats]
    assert errors[True] < errors[False], errors
    assert all(beta is not None and 0.0 < beta <= 1.0 for beta in betas), betas


def test_off_leaves_the_model_as_without_the_correction(kind, monkeypatch):
    model = kind.build()
    with _apply(model, kind, value_correction=False) as handle:
        off = kind.run(model, 500)
        assert all(s.value_correction is None for s in handle.stats().values())
    with _apply(model, kind, value_correction=True):
        on = kind.run(model, 500)
    monkeypatch.setattr(views, "attention_view", lambda module: None)  # no view: no correction
    with _apply(model, kind, value_correction=True) as handle:
        assert torch.equal(kind.run(model, 500), off)
        assert all(s.value_correction is None for s in handle.stats().values())
    assert not torch.equal(on, off)


def test_ratio_zero_and_removal_are_exact(kind):
    model = kind.build()
    reference = kind.run(model, 500)
    before = snapshot(model)
    with _apply(model, kind, ratio=0.0, value_correction=True):
        assert torch.equal(kind.run(model, 500), reference)
    handle = _apply(model, kind, value_correction=True, cache_interval=2)
    for t in (500, 400):
        kind.run(model, t)
    handle.remove()
    assert snapshot(model) == before
    assert torch.equal(kind.run(model, 500), reference)


def _dispatched(model: nn.Module, kind: Kind, corrected: bool) -> tuple[KernelCount, KernelCount]:
    """What the first call (a new plan, fitted) and the second (a cached plan where the model
    has steps, a new plan otherwise) dispatched."""
    with _apply(model, kind, value_correction=corrected, cache_interval=2) as handle:
        counts = []
        for t in (500, 400):
            counts.append(count_kernels(kind.run, model, t)[1])
        corrected_sites = [s for s in handle.stats().values() if s.value_correction is not None]
        assert len(corrected_sites) == (len(handle.sites) if corrected else 0)
        if kind.steps:
            assert all(s.plans_reused == 1 for s in handle.stats().values())
    return counts[0], counts[1]


def test_correction_queues_no_host_sync_and_few_kernels_per_cached_call(kind):
    model = kind.build()
    off = _dispatched(model, kind, corrected=False)
    on = _dispatched(model, kind, corrected=True)
    for plain, corrected in zip(off, on, strict=True):
        assert corrected.syncs == plain.syncs
    if kind.steps:
        sites = sum(1 for m in model.modules() if views.attention_view(m) is not None)
        # per corrected site: a row gather and a subtraction (the offsets: the sources' rows
        # come from the merge), bmm, index_add
        assert on[1].kernels - off[1].kernels == 4 * sites, (on[1].kernels, off[1].kernels)


# ---------------------------------------------------------------------------- what is not corrected


def test_where_it_cannot_correct_stats_show_none_and_nothing_warns():
    """Progressive mode keeps tokens merged: nothing is unmerged, nothing to correct. A module
    the generic adapter cannot see into (here an MLP) is merged around without it."""
    cases = [
        (VITS["vit"].build(), {}, lambda m: VITS["vit"].run(m)),
        (
            Stack(lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))),
            GENERIC,
            lambda m: _tokens(m, 500),
        ),
    ]
    for model, options, run in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with tokenmerge.apply(model, "retom", value_correction=True, **options) as handle:
                run(model)
                run(model)
                stats = handle.stats().values()
        assert all(s.value_correction is None for s in stats)
        assert any(s.tokens_out < s.tokens_in for s in stats)
    # nn.MultiheadAttention: the generic adapter merges its first argument only, so keys and
    # values stay unmerged and no token's own value went missing
    assert views.attention_view(nn.MultiheadAttention(16, 2, batch_first=True)) is None


def test_a_view_by_names_that_does_not_match_its_module_corrects_nothing():
    """A module found by its projections' names that computes something else (here logits at
    twice the scale the view assumes) fails the view's check: no correction, stats() shows None,
    and the output is the uncorrected one."""
    model = _seeded(lambda: Stack(lambda: NamedAttention(logits=2.0)), 3.0)
    kind = Kind("mismatched", lambda: model, _tokens, GENERIC)
    with _apply(model, kind, value_correction=False):
        off = _tokens(model, 500)
    with _apply(model, kind, value_correction=True) as handle:
        assert torch.allclose(_tokens(model, 500), off, rtol=0, atol=1e-7)
        assert all(s.value_correction is None for s in handle.stats().values())


def test_library_attention_the_views_turn_down_is_not_guessed_at():
    gated = timm.layers.Attention(16, num_heads=2, gated=True)
    scaled = timm.layers.Attention(16, num_heads=2, scale_norm=True, norm_layer=nn.LayerNorm)
    assert views.attention_view(timm.layers.Attention(16, num_heads=2)) is not None
    assert views.attention_view(gated) is None
    assert views.attention_view(scaled) is None


# ---------------------------------------------------------------------------- exact rows


def _exact_case(name: str) -> tuple[nn.Module, Tensor, Call, Callable[[], Tensor]]:
    """An attention module, an input, the call's arguments and its own output."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 16)
    if name in ("sd3-joint", "sd3-attn2"):
        block = make_sd3().transformer_blocks[0]
        if name == "sd3-attn2":
            return block.attn2, x, Call((x,), {}), lambda: block.attn2(x)
        text = torch.randn(2, 7, 16)
        call = Call((x,), {"encoder_hidden_states": text})
        return block.attn, x, call, lambda: block.attn(x, encoder_hidden_states=text)[0]
    if name.startswith("flux"):
        flux = make_flux()
        text, image = torch.randn(2, 5, 16), torch.randn(2, 48, 16)
        rope = flux.pos_embed(torch.cat([torch.zeros(5, 3), flux_ids(8, 6)]))
        if name.startswith("flux-double"):
            attention = flux.transformer_blocks[0].attn
            if name == "flux-double-fused":
                attention.fuse_projections()
            args = (image, text, None, rope)  # positionally: hidden states, text, mask, rotary
            return attention, image, Call(args, {}), lambda: attention(*args)[0]
        block = flux.single_transformer_blocks[0]
        both = torch.cat([text, image], 1)
        kwargs = {"image_rotary_emb": rope}
        if name == "flux-body":
            view = FluxBodyView(block, views.attention_view(block.attn))

            def body() -> Tensor:
                mlp = block.act_mlp(block.proj_mlp(both))
                return block.proj_out(torch.cat([block.attn(both, **kwargs), mlp], -1))

            return view, both, Call((both,), kwargs), body
        return block.attn, both, Call((both,), kwargs), lambda: block.attn(both, **kwargs)
    model = _eva02()
    attention = model.blocks[0].attn
    x = torch.randn(2, 65, attention.qkv.in_features)
    rope = model.rope.get_embed()
    return attention, x, Call((x,), {"rope": rope}), lambda: attention(x, rope=rope)


@pytest.mark.parametrize(
    "name",
    [
        "sd3-joint",
        "sd3-attn2",
        "flux-double",
        "flux-double-fused",
        "flux-single",
        "flux-body",
        "eva",
    ],
)
def test_exact_rows_are_the_modules_own_output(name):
    """The views that project every key (text tokens, rotary tables, per-head norms) against the
    module: rows of its unmerged output, at positions that carry rotary angles of their own."""
    attention, x, call, own = _exact_case(name)
    view = attention if isinstance(attention, FluxBodyView) else views.attention_view(attention)
    assert view is not None
    index = torch.tensor([[3, 7, 11, 20, 39]]) + (5 if name in ("flux-single", "flux-body") else 0)
    rows = x[:, index[0]]
    with torch.no_grad():
        torch.testing.assert_close(view.exact_rows(x, index, call, rows), own()[:, index[0]])
    # SD 3's image-only attention has no key norm in this config: keys linear in the tokens
    attention_view = getattr(view, "attention", view)
    assert attention_view.input_space(call) == (name == "sd3-attn2")


def test_the_input_space_path_gives_the_projected_one():
    """Where keys are linear in the tokens the rows are computed in input space; they equal the
    rows of every key and value projected."""
    attention = timm.layers.Attention(16, num_heads=2, qkv_bias=True).eval()
    view = views.attention_view(attention)
    x = torch.randn(2, 30, 16)
    index = torch.tensor([[0, 4, 29]])
    with torch.no_grad():
        assert view.input_space(NO_CALL)
        rows = view.exact_rows(x, index, NO_CALL, x[:, index[0]])
        torch.testing.assert_close(rows, attention(x)[:, index[0]], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- gradients


def _cached_double_stack() -> tuple[nn.Module, tokenmerge.Handle]:
    """A float64 stack of timm attention, patched with ``tome`` and the correction, its plan
    made and its weight fitted at a first step and cached for the steps after."""
    model = _seeded(
        lambda: Stack(lambda: timm.layers.Attention(16, num_heads=2, qkv_bias=True), 1), 3.0
    )
    model = model.double()
    options = {**GENERIC, "sites": {"include": ["blocks.*"], "min_tokens": 1}}
    handle = tokenmerge.apply(
        model, "tome", ratio=0.5, value_correction=True, cache_interval=1000, **options
    )
    with torch.no_grad():
        model(TOKENS.double(), 999.0)  # plans and fits
    return model, handle


def test_backward_agrees_with_finite_differences_with_the_correction_on():
    """With the plan cached (and its weight with it) the corrected model is a smooth function
    of its input and weights; backward through it agrees with finite differences - which it
    would not if the correction were applied without gradients."""
    model, handle = _cached_double_stack()
    names = ("blocks.0.qkv.weight", "blocks.0.proj.weight")
    weights = tuple(dict(model.named_parameters())[n].detach().clone() for n in names)

    def corrected(x: Tensor, qkv: Tensor, proj: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, (qkv, proj), strict=True)), (x, 998.0))

    x = TOKENS.double().clone().requires_grad_()
    inputs = (x, *(w.requires_grad_() for w in weights))
    assert torch.autograd.gradcheck(corrected, inputs, fast_mode=True, atol=1e-6)
    stats = handle.stats()["blocks.0"]
    assert stats.value_correction is not None and stats.value_correction > 0.1
    assert stats.plans_computed == 1  # every call above used the one plan
    with torch.no_grad():  # and the forward through autograd is the one without it
        torch.testing.assert_close(corrected(x, *weights), model(x, 998.0))
    handle.remove()


def _dit_denoiser() -> tuple[tokenmerge.Handle, Callable[[Tensor], Tensor]]:
    """A float64 diffusers DiT under retom (value correction on by default), its plans made
    and weights fitted at a first step and cached: the model at the next step, of its latents."""
    model = _seeded(TRANSFORMERS["dit"], 3.0).double()
    kwargs = transformer_inputs("dit")
    handle = tokenmerge.apply(model, "retom", ratio=0.5, cache_interval=1000, **DIFFUSION)
    with torch.no_grad():
        model(
            **{
                **kwargs,
                "hidden_states": kwargs["hidden_states"].double(),
                "timestep": torch.full_like(kwargs["timestep"], 999),
            }
        )

    def denoise(latents: Tensor) -> Tensor:
        return model(
            **{
                **kwargs,
                "hidden_states": latents,
                "timestep": torch.full_like(kwargs["timestep"], 998),
            }
        ).sample

    return handle, denoise


def _timm_vit_every_call() -> tuple[tokenmerge.Handle, Callable[[Tensor], Tensor]]:
    """A float64 timm ViT under retom in local mode: it plans and fits at every call, so the
    weight of each call is a function of that call's input."""
    model = _seeded(VITS["vit"].build, VIT_SCALE).double()
    return tokenmerge.apply(model, "retom", ratio=0.5, **LOCAL), model.forward_features


@pytest.mark.parametrize(
    "build, inputs",
    [
        (_dit_denoiser, lambda: transformer_inputs("dit")["hidden_states"]),
        (_timm_vit_every_call, lambda: VITS["vit"].inputs()),
    ],
    ids=["diffusers-dit-cached", "timm-vit-every-call"],
)
def test_retom_backward_agrees_with_finite_differences(build, inputs):
    """retom's default value correction through autograd, in float64 (a directional finite
    difference: a full gradcheck of a whole model takes minutes): with the plan and weight
    cached from an earlier step (a diffusers DiT) and fitted at the very call (a timm ViT in
    local mode, where a weight fitted without gradients made backward disagree)."""
    handle, run = build()
    x = inputs().double().requires_grad_()
    out = run(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    eps = 1e-6
    with torch.no_grad():  # a central difference of the same scalar along the direction
        ahead, behind = run(x + eps * direction), run(x - eps * direction)
        numeric = ((ahead - behind) * weights).sum() / (2 * eps)
    analytic = (grad * direction).sum()
    # float64 differences are good to ~1e-9 here; a weight fitted without gradients gave 5e-3
    assert float((analytic - numeric).abs() / numeric.abs()) < 1e-7
    stats = list(handle.stats().values())
    assert stats and all(s.tokens_out < s.tokens_in for s in stats)
    assert all(s.value_correction is not None and s.value_correction > 0.1 for s in stats)
    handle.remove()


def test_plans_used_once_apply_the_projections_directly():
    """A plan whose offsets are fewer than the channels applies ``W_o W_v`` to them directly,
    and a second call with it forms the product: both agree with the definition."""
    torch.manual_seed(0)
    attention = NamedAttention(dim=32).eval()
    view = views.attention_view(attention)
    correction = ValueCorrection(view, samples=2)
    plan = Plan.from_assignment(torch.tensor([[1, 3]]), torch.tensor([[0, 2]]), 6)
    x = torch.randn(1, 6, 32)
    merged = plan.merge(x)
    with torch.no_grad():
        copied = plan.unmerge(attention(merged))
        first = correction(plan, x, merged, copied.clone())
        assert correction._weighted is None
        second = correction(plan, x, merged, copied.clone())
        assert correction._weighted is not None
    offsets = (x - plan.unmerge(merged))[:, [1, 3]]
    direction = F.linear(F.linear(offsets, attention.to_v.weight), attention.to_out[0].weight)
    expected = copied.clone()
    expected[:, [1, 3]] += correction.beta[:, None, None] * direction
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


def test_gradcheck_with_the_correction_fitted_at_every_call():
    """``torch.autograd.gradcheck`` in float64 through a merged, value-corrected attention that
    plans and fits its weight at every call (the generic adapter without a timestep): the
    weight's dependence on the input is part of the gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(Attention(8)).double()
    handle = tokenmerge.apply(
        model, "retom", ratio=0.5, adapter="generic", sites={"include": ["0"], "min_tokens": 1}
    )
    x = torch.randn(1, 16, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,))
    stats = handle.stats()["0"]
    assert stats.value_correction not in (None, 0.0)  # the correction ran
    assert stats.plans_computed == stats.calls  # and was fitted at every call
    handle.remove()
