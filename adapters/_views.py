"""Which attention modules the value correction corrects, and the view of each.

``attention_view(module)`` finds a view (``tokenmerge.attention_view``) for the attention the
adapters merge around in local mode, by class, among the libraries already imported (none is
imported here):

- diffusers ``Attention`` with a plain processor (UNets, DiT, PixArt): ``DiffusersAttentionView``;
  with SD3's ``JointAttnProcessor2_0``: ``JointAttentionView`` (the text tokens are attended to
  after the image tokens; SD 3.5's image-only ``attn2`` is the same view without them). Any other
  processor (IP-Adapter, PAG, fused joint, a user's) computes something else: no view.
- diffusers ``FluxAttention`` with ``FluxAttnProcessor``: ``FluxAttentionView`` (per-head RMS norms,
  rotary table over text then image tokens, text tokens first in double-stream blocks; the
  single-stream attention's output is taken before the block's shared output projection). A
  single-stream block merged around its whole body: ``FluxBodyView`` (``body_correction``).
- timm ``Attention`` (fused ``qkv``, ``q_norm`` / ``k_norm``): ``TimmAttentionView``; timm
  ``EvaAttention`` (fused or separate projections, separate q / v biases, rotary embeddings
  behind the prefix tokens): ``EvaAttentionView``. Not with a norm or a gate between the
  attention product and the output projection (``scale_norm``, ``gated``): the output is then
  not linear in the values.
- transformers ``ViTAttention`` / ``CLIPAttention`` (what the ViT adapter merges around):
  ``TransformersAttentionView``.
- any other module with a head count and recognisable projections (``to_q`` / ``to_k`` / ``to_v``
  / ``to_out``, ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` or ``out_proj``, ``qkv`` /
  ``proj``): a view built from those names that checks itself at every fit against what the
  module returned (``AttentionView.verify``); where they differ the site corrects nothing and
  ``stats()`` shows None.
- ``torch.nn.MultiheadAttention`` and everything else: no view. (The generic adapter merges the
  first argument only; an ``nn.MultiheadAttention`` attends with unmerged keys and values, so no
  token's own value went missing.)
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from tokenmerge.adapters._tables import gather_rows
from tokenmerge.attention_view import (
    AttentionView,
    Call,
    DiffusersAttentionView,
    FusedProjections,
    NamedProjections,
    QKVView,
    corrects,
    diffusers_self_attention,
    heads_first,
    linear_part,
    processor_name,
)
from tokenmerge.correction import ValueCorrection
from tokenmerge.patch import SitePatch

__all__ = [
    "EvaAttentionView",
    "FluxAttentionView",
    "FluxBodyView",
    "JointAttentionView",
    "TimmAttentionView",
    "TransformersAttentionView",
    "attention_view",
    "body_correction",
    "value_correction",
]


def _loaded(module: str, name: str) -> type | None:
    """Class ``name`` of ``module`` when that module is already imported (a model built from
    it imported it), else None."""
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


def _is(module: nn.Module, where: str, name: str) -> bool:
    cls = _loaded(where, name)
    return cls is not None and isinstance(module, cls)


# ---------------------------------------------------------------------------- diffusers


class JointAttentionView(DiffusersAttentionView):
    """SD3's joint attention (``JointAttnProcessor2_0``) on its image stream: the image tokens'
    queries attend to the image tokens and, when the call passes them, to the text tokens
    (``add_k_proj`` / ``add_v_proj``, ``norm_added_k``), which come after them."""

    processors = frozenset({"JointAttnProcessor2_0"})

    @staticmethod
    def scale_of(attention: nn.Module) -> float | None:
        return None  # the processor leaves the scale to scaled_dot_product_attention

    def usable(self, call: Call) -> bool:
        return (
            processor_name(self.module) in self.processors and call.get("attention_mask", 2) is None
        )

    def input_space(self, call: Call) -> bool:
        return self.norm_k is None and call.get("encoder_hidden_states", 1) is None

    def keys_values(self, x: Tensor, call: Call) -> tuple[Tensor, Tensor]:
        key, value = super().keys_values(x, call)
        text = call.get("encoder_hidden_states", 1)
        if text is None:
            return key, value
        attention = self.module
        text_key = heads_first(attention.add_k_proj(text), self.heads)
        text_value = heads_first(attention.add_v_proj(text), self.heads)
        if getattr(attention, "norm_added_k", None) is not None:
            text_key = attention.norm_added_k(text_key)
        return torch.cat([key, text_key], dim=2), torch.cat([value, text_value], dim=2)


class FluxAttentionView(QKVView):
    """Flux's attention (``FluxAttention`` with ``FluxAttnProcessor``).

    Queries and keys are RMS-normalised per head and rotated by the call's rotary table, which
    covers the text tokens and then the image tokens. In a double-stream block the call brings
    the text tokens (``encoder_hidden_states``, projected by ``add_*_proj``), attended to before
    the image tokens, and the image output goes through ``to_out``; in a single-stream block the
    tokens are text and image already, and the output is taken before any projection (the block
    projects it together with its MLP), so ``W_o`` is the identity there.
    """

    def __init__(self, attention: nn.Module) -> None:
        super().__init__(attention, attention.heads, None, "norm_q", "norm_k")

    def usable(self, call: Call) -> bool:
        table = call.get("image_rotary_emb", 3)
        return (
            processor_name(self.module) == "FluxAttnProcessor"
            and call.get("attention_mask", 2) is None
            and call.kwargs.get("ip_hidden_states") is None
            and (table is None or _rotary_pair(table))
        )

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attention = self.module
        if attention.fused_projections:
            query, key, value = attention.to_qkv(x).chunk(3, dim=-1)
            return query, key, value
        return attention.to_q(x), attention.to_k(x), attention.to_v(x)

    def query(self, x: Tensor) -> Tensor:
        return self.qkv(x)[0]

    def out(self, o: Tensor, call: Call) -> Tensor:
        return o if self._text(call) is None else self.module.to_out[0](o)

    def input_space(self, call: Call) -> bool:
        return False  # keys are normalised per head and rotated

    def _text(self, call: Call) -> Tensor | None:
        text = call.get("encoder_hidden_states", 1)
        return text if getattr(self.module, "added_kv_proj_dim", None) is not None else None

    def queries(self, rows: Tensor, index: Tensor, call: Call) -> Tensor:
        query = super().queries(rows, index, call)
        table = call.get("image_rotary_emb", 3)
        if table is None:
            return query
        text = self._text(call)
        positions = index + (text.shape[1] if text is not None else 0)
        return _rotate_rows(query, table, positions)

    def keys_values(self, x: Tensor, call: Call) -> tuple[Tensor, Tensor]:
        key, value = super().keys_values(x, call)
        text = self._text(call)
        if text is not None:
            attention = self.module
            if attention.fused_projections:
                _, text_key, text_value = attention.to_added_qkv(text).chunk(3, dim=-1)
            else:
                text_key, text_value = attention.add_k_proj(text), attention.add_v_proj(text)
            text_key = attention.norm_added_k(heads_first(text_key, self.heads))
            key = torch.cat([text_key, key], dim=2)
            value = torch.cat([heads_first(text_value, self.heads), value], dim=2)
        table = call.get("image_rotary_emb", 3)
        if table is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            key = apply_rotary_emb(key, tuple(table), sequence_dim=2)
        return key, value


class FluxBodyView(AttentionView):
    """A Flux single-stream block's body merged as one (attention and MLP both merged): the
    attention (``FluxAttentionView``, its output taken before any projection) and the parallel
    MLP run on the same normalised tokens, and ``proj_out`` projects both together.

    ``W_o`` is the attention's columns of ``proj_out``; the exact rows are the body's output
    (attention and MLP) for the sampled tokens. The MLP's share of the copy's error is not linear
    in the offsets and stays: the fit of ``beta`` sees it as noise.

    Args:
        block: the ``FluxSingleTransformerBlock``.
        attention: the view of its attention.
    """

    def __init__(self, block: nn.Module, attention: FluxAttentionView) -> None:
        super().__init__(block)
        self.attention = attention

    def usable(self, call: Call) -> bool:
        return self.attention.usable(call)

    def project(self, offsets: Tensor, call: Call) -> Tensor:
        values = self.attention.project(offsets, call)
        mlp = values.new_zeros(*values.shape[:-1], self.module.mlp_hidden_dim)
        return linear_part(self.module.proj_out, torch.cat([values, mlp], dim=-1))

    def exact_rows(self, x: Tensor, index: Tensor, call: Call, rows: Tensor) -> Tensor:
        block = self.module
        attended = self.attention.exact_rows(x, index, call, rows)
        return block.proj_out(torch.cat([attended, block.act_mlp(block.proj_mlp(rows))], dim=-1))


def _rotary_pair(table: Any) -> bool:
    """Whether ``table`` is one unbatched ``(cos, sin)`` pair of ``(tokens, dim)`` tables."""
    return (
        isinstance(table, (tuple, list))
        and len(table) == 2
        and all(isinstance(t, Tensor) and t.dim() == 2 for t in table)
    )


def _rotate_rows(query: Tensor, table: tuple[Tensor, Tensor], positions: Tensor) -> Tensor:
    """Queries ``(B, H, k, d)`` rotated by the rows ``positions (P, k)`` of a Flux table."""
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = table
    if positions.shape[0] == 1:  # Flux plans are shared by the batch
        rows = positions[0].to(cos.device)
        return apply_rotary_emb(query, (cos[rows], sin[rows]), sequence_dim=2)
    return torch.cat(
        [
            apply_rotary_emb(query[i : i + 1], (cos[p], sin[p]), sequence_dim=2)
            for i, p in enumerate(positions.to(cos.device))
        ]
    )


def _diffusers_view(module: nn.Module) -> AttentionView | None:
    if _is(module, "diffusers.models.attention_processor", "Attention"):
        if corrects(module):
            return DiffusersAttentionView(module)
        joint = processor_name(module) in JointAttentionView.processors
        return JointAttentionView(module) if joint and diffusers_self_attention(module) else None
    if _is(module, "diffusers.models.transformers.transformer_flux", "FluxAttention"):
        return FluxAttentionView(module) if processor_name(module) == "FluxAttnProcessor" else None
    return None


# ---------------------------------------------------------------------------- timm


def _linear_output(attention: nn.Module) -> bool:
    """No norm or gate between a timm attention's product and its output projection."""
    return isinstance(getattr(attention, "norm", nn.Identity()), nn.Identity) and (
        getattr(attention, "gate", None) is None
    )


class TimmAttentionView(FusedProjections):
    """timm's ``Attention``: fused ``qkv``, optional ``q_norm`` / ``k_norm``, ``proj``."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__(
            attention,
            "qkv",
            "proj",
            attention.num_heads,
            scale=attention.scale,
            norm_q="q_norm",
            norm_k="k_norm",
        )

    def usable(self, call: Call) -> bool:
        return call.get("attn_mask", 1) is None and not call.get("is_causal", 2)


class EvaAttentionView(QKVView):
    """timm's ``EvaAttention``: a fused ``qkv`` weight with separate query / value biases (or
    separate projections), optional ``q_norm`` / ``k_norm``, and the block's rotary embedding
    ``rope=`` applied to every token behind the ``num_prefix_tokens`` prefix tokens."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__(attention, attention.num_heads, attention.scale, "q_norm", "k_norm")

    def usable(self, call: Call) -> bool:
        rope = call.get("rope", 1)
        return (
            call.get("attn_mask", 2) is None
            and not call.get("is_causal", 3)
            and (rope is None or isinstance(rope, Tensor))
        )

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attention = self.module
        if attention.qkv is None:
            return attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        if attention.q_bias is None:
            fused = attention.qkv(x)
        else:
            bias = torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
            if attention.qkv_bias_separate:
                fused = attention.qkv(x) + bias
            else:
                fused = nn.functional.linear(x, attention.qkv.weight, bias)
        query, key, value = fused.chunk(3, dim=-1)
        return query, key, value

    def query(self, x: Tensor) -> Tensor:
        return self.qkv(x)[0]

    def out(self, o: Tensor, call: Call) -> Tensor:
        return self.module.proj(o)

    def input_space(self, call: Call) -> bool:
        return self.norm_k is None and call.get("rope", 1) is None

    def _rotate(self, t: Tensor, rope: Tensor) -> Tensor:
        from timm.layers import apply_rot_embed_cat

        return apply_rot_embed_cat(t, rope, half=getattr(self.module, "rotate_half", False))

    def queries(self, rows: Tensor, index: Tensor, call: Call) -> Tensor:
        query = super().queries(rows, index, call)
        rope = call.get("rope", 1)
        if rope is None:
            return query
        positions = index - self.module.num_prefix_tokens  # prefix tokens are not rotated
        rotated = self._rotate(query, gather_rows(rope, positions.clamp_min(0)))
        return torch.where((positions >= 0)[:, None, :, None], rotated, query).type_as(query)

    def keys_values(self, x: Tensor, call: Call) -> tuple[Tensor, Tensor]:
        key, value = super().keys_values(x, call)
        rope = call.get("rope", 1)
        if rope is not None:
            prefix = self.module.num_prefix_tokens
            rotated = self._rotate(key[:, :, prefix:], rope)
            key = torch.cat([key[:, :, :prefix], rotated], dim=2).type_as(value)
        return key, value


def _timm_view(module: nn.Module) -> AttentionView | None:
    if _is(module, "timm.layers.attention", "Attention"):
        return TimmAttentionView(module) if _linear_output(module) else None
    if _is(module, "timm.models.eva", "EvaAttention"):
        return EvaAttentionView(module) if _linear_output(module) else None
    return None


# ---------------------------------------------------------------------------- transformers

#: the transformers attention classes the ViT adapter merges around: (module, class name)
_TRANSFORMERS = (
    ("transformers.models.vit.modeling_vit", "ViTAttention"),
    ("transformers.models.clip.modeling_clip", "CLIPAttention"),
)


class TransformersAttentionView(NamedProjections):
    """A transformers vision self-attention (``ViTAttention``, ``CLIPAttention``): ``q_proj`` /
    ``k_proj`` / ``v_proj``, ``o_proj`` or ``out_proj``, any attention back-end (all compute the
    same scaled dot-product attention)."""

    def __init__(self, attention: nn.Module) -> None:
        out = "o_proj" if hasattr(attention, "o_proj") else "out_proj"
        heads = getattr(attention, "num_attention_heads", None) or attention.num_heads
        scale = getattr(attention, "scaling", None) or getattr(attention, "scale", None)
        super().__init__(attention, "q_proj", "k_proj", "v_proj", out, heads, scale=scale)

    def usable(self, call: Call) -> bool:
        return call.get("attention_mask", 1) is None and not getattr(
            self.module, "is_causal", False
        )


def _transformers_view(module: nn.Module) -> AttentionView | None:
    if any(_is(module, where, name) for where, name in _TRANSFORMERS):
        return TransformersAttentionView(module)
    return None


# ---------------------------------------------------------------------------- by attribute names


def _number(module: nn.Module, names: tuple[str, ...], kind: type) -> Any:
    """The first of the attributes ``names`` set on ``module`` itself that is a ``kind`` (not
    a bool), or None (read from ``vars()``: no ``__getattr__`` of a model class runs)."""
    for name in names:
        value = vars(module).get(name)
        if isinstance(value, kind) and not isinstance(value, bool):
            return value
    return None


def _named_view(module: nn.Module) -> AttentionView | None:
    """A self-checking view of a module of an unknown class, from its attribute names."""
    children = dict(module.named_children())
    out = next((n for n in ("to_out", "o_proj", "out_proj", "proj") if n in children), None)
    if out == "to_out" and isinstance(children[out], (nn.ModuleList, nn.Sequential)):
        out = "to_out.0"
    if {"to_q", "to_k", "to_v"} <= children.keys():
        names, norms = ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")
    elif {"q_proj", "k_proj", "v_proj"} <= children.keys():
        names, norms = ("q_proj", "k_proj", "v_proj"), ("q_norm", "k_norm")
    elif "qkv" in children:
        names, norms = ("qkv",), ("q_norm", "k_norm")
    else:
        return None
    heads = _number(module, ("heads", "num_heads", "num_attention_heads", "n_heads"), int)
    if out is None or heads is None or heads < 1:
        return None
    options: dict[str, Any] = dict(
        heads=heads,
        scale=_number(module, ("scale", "scaling"), float),
        norm_q=norms[0],
        norm_k=norms[1],
        verify=True,
    )
    if len(names) == 1:
        return FusedProjections(module, *names, out, **options)
    return NamedProjections(module, *names, out, **options)


def attention_view(module: nn.Module) -> AttentionView | None:
    """The view of ``module`` the value correction works through, or None where it cannot
    correct it (see the module docstring for which modules get which view).

    Example:
        >>> import timm
        >>> from tokenmerge.adapters._views import attention_view
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
        >>> type(attention_view(vit.blocks[0].attn)).__name__
        'TimmAttentionView'
        >>> attention_view(vit.blocks[0].mlp) is None
        True
    """
    for find in (_diffusers_view, _timm_view, _transformers_view):
        view = find(module)
        if view is not None:
            return view
    # a library class the views above turned down (its processor, norm or gate): no guessing
    return None if _known(module) else _named_view(module)


def _known(module: nn.Module) -> bool:
    """Whether ``module`` is one of the attention classes a specific view knows (and may have
    turned down for its processor, norm or gate)."""
    return any(
        _is(module, where, name)
        for where, name in (
            ("diffusers.models.attention_processor", "Attention"),
            ("diffusers.models.transformers.transformer_flux", "FluxAttention"),
            ("timm.layers.attention", "Attention"),
            ("timm.models.eva", "EvaAttention"),
            # BEiT's: q / v biases and a relative position bias no view models
            ("timm.models.beit", "Attention"),
            *_TRANSFORMERS,
        )
    )


def body_correction(patch: SitePatch, block: nn.Module) -> ValueCorrection | None:
    """The value-corrected unmerge around a Flux single-stream block's body (``FluxBodyView``),
    when the config asks for it and the block's attention has a view."""
    attention = value_correction(patch, "attn", block.attn)
    if attention is None or not isinstance(attention.view, FluxAttentionView):
        return None
    return ValueCorrection(FluxBodyView(block, attention.view))


def value_correction(patch: SitePatch, kind: str, module: nn.Module) -> ValueCorrection | None:
    """The value-corrected unmerge for a target merged around in local mode, when the config
    asks for it and the target is a self-attention with a view (``attention_view``)."""
    if kind != "attn" or not patch.config.value_correction:
        return None
    view = attention_view(module)
    return None if view is None else ValueCorrection(view)
