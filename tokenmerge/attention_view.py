"""Views of self-attention modules: what the value correction needs, whatever the library.

The value-corrected unmerge (``tokenmerge.correction``) asks two things of the attention it
corrects, and a view answers them for one module:

- ``project(offsets, call)``: ``W_o W_v offsets``, the value projection followed by the output
  projection, both without their biases (only differences of tokens are projected);
- ``exact_rows(x, index, call)``: the module's own output for the query tokens ``index`` against
  every token of ``x`` and whatever else the call attends to (text tokens, rotary positions):
  what it would output for those rows unmerged, the reference the correction's weight is fitted
  on.

``QKVView`` answers both for the usual shape of attention - query, key and value projections,
optional per-head norms of queries and keys, scaled dot-product attention, an output projection -
from a few primitives: ``NamedProjections`` (separate projections, found by attribute name) and
``FusedProjections`` (one ``qkv`` projection) fill them in; the adapters subclass them for what a
library adds (``tokenmerge.adapters._views``: SD3's text tokens, Flux's and EVA's rotary
embeddings). ``DiffusersAttentionView`` covers diffusers' plain attention processors; it lives
here, duck-typed by the processor's class name, so ``ValueCorrection(attention)`` takes such a
module directly.

Views never call the module itself (its hooks would merge again), only its projections and norms.
Nothing here imports a model library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionView",
    "Call",
    "DiffusersAttentionView",
    "FusedProjections",
    "NO_CALL",
    "NamedProjections",
    "QKVView",
    "corrects",
    "heads_first",
    "heads_last",
    "linear_part",
]


class Call(NamedTuple):
    """The arguments of one call of an attention module, as the caller passed them (before the
    merge reduced any positional table to the kept tokens)."""

    args: tuple = ()
    kwargs: dict[str, Any] = {}  # noqa: RUF012 - never mutated, a NamedTuple default

    def get(self, name: str, index: int | None = None) -> Any:
        """The argument ``name`` (keyword), or positional ``index`` (counting the hidden states
        as 0); None when the call did not pass it."""
        if name in self.kwargs:
            return self.kwargs[name]
        if index is not None and len(self.args) > index:
            return self.args[index]
        return None


#: a call with no arguments beyond the hidden states
NO_CALL = Call()


def linear_part(layer: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``layer(x)`` without its bias (the output for a zero row taken off), which also holds for
    LoRA or quantised linear layers."""
    return layer(x) - layer(x.new_zeros(1, x.shape[-1]))


def heads_first(t: Tensor, heads: int) -> Tensor:
    """``(B, n, H d) -> (B, H, n, d)``."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def heads_last(t: Tensor) -> Tensor:
    """``(B, H, n, d) -> (B, n, H d)``."""
    return t.transpose(1, 2).flatten(2)


def _norm(module: nn.Module, name: str | None) -> nn.Module | None:
    """The per-head norm ``module.<name>``, or None where there is none (or an Identity)."""
    norm = getattr(module, name, None) if name else None
    return None if norm is None or isinstance(norm, nn.Identity) else norm


class AttentionView(ABC):
    """What the value correction needs to know about one self-attention module.

    Args:
        module: the attention module.
    """

    #: check, at every fit, that ``exact_rows`` reproduces the module's own output on the merged
    #: tokens, and correct nothing where it does not (views found by attribute names only)
    verify: ClassVar[bool] = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def usable(self, call: Call) -> bool:
        """Whether this call computes what the view describes (Python checks only: it runs at
        every call). Default: always."""
        return True

    def requires_grad(self) -> bool:
        """Whether a weight the correction goes through is trained."""
        return any(p.requires_grad for p in self.module.parameters())

    @abstractmethod
    def project(self, offsets: Tensor, call: Call) -> Tensor:
        """``W_o W_v offsets`` for ``offsets (B, n, C)``: both projections without biases."""

    @abstractmethod
    def exact_rows(self, x: Tensor, index: Tensor, call: Call, rows: Tensor) -> Tensor:
        """The module's output for the queries ``rows (B, k, C)``, the tokens ``index (P, k)``
        of ``x (B, N, C)`` (P is 1 or B), attending to every token of ``x`` and to what else
        ``call`` brings."""


class QKVView(AttentionView):
    """A view of scaled dot-product self-attention built from its primitives.

    Subclasses implement ``qkv``, ``query`` and ``out``, and override ``queries`` /
    ``keys_values`` / ``input_space`` where the call adds tokens or positions.

    Exact rows are computed in input space where the keys are linear in the tokens (no key norm,
    no rotary embedding, no extra tokens): head h's scores are ``(q_h W_k,h) . x_j`` (the key
    bias adds the same number to a row's scores, which the softmax ignores), and its output is
    ``W_v,h`` applied to the attention-weighted mean of ``x`` (the weights sum to 1, so the value
    bias passes through). That costs ``2 k H N C`` multiply-adds instead of ``2 N C^2`` for
    projecting every key and value. Elsewhere every key and value is projected.

    Args:
        module: the attention module.
        heads: the number of heads.
        scale: the logit scale; None for ``1 / sqrt(head_dim)``.
        norm_q: attribute name of a per-head query norm, where it has one (an ``Identity``
            counts as none).
        norm_k: the same for the keys.
        verify: check the view against the module's output at every fit (see
            ``AttentionView.verify``).
    """

    def __init__(
        self,
        module: nn.Module,
        heads: int,
        scale: float | None = None,
        norm_q: str | None = None,
        norm_k: str | None = None,
        verify: bool = False,
    ) -> None:
        super().__init__(module)
        self.heads = heads
        self.scale = scale
        self._norms = (norm_q, norm_k)
        self.verify = verify

    @property
    def norm_q(self) -> Callable[[Tensor], Tensor] | None:
        """The per-head query norm, on ``(B, H, n, d)`` (None: none)."""
        return _norm(self.module, self._norms[0])

    @property
    def norm_k(self) -> Callable[[Tensor], Tensor] | None:
        """The per-head key norm (None: none)."""
        return _norm(self.module, self._norms[1])

    # ------------------------------------------------------------------ primitives
    @abstractmethod
    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of ``x (B, n, C)``, each ``(B, n, H d)``, biases included."""

    @abstractmethod
    def query(self, x: Tensor) -> Tensor:
        """Queries of ``x``, ``(B, n, H d)``."""

    def key(self, x: Tensor) -> Tensor:
        """Keys of ``x``, ``(B, n, H d)``."""
        return self.qkv(x)[1]

    def value(self, x: Tensor) -> Tensor:
        """Values of ``x``, ``(B, n, H d)``."""
        return self.qkv(x)[2]

    @abstractmethod
    def out(self, o: Tensor, call: Call) -> Tensor:
        """The output projection of the attention's result ``o (B, n, H d)``."""

    def out_part(self, o: Tensor, call: Call) -> Tensor:
        """``out`` without its bias."""
        return linear_part(lambda t: self.out(t, call), o)

    def value_part(self, x: Tensor) -> Tensor:
        """``value`` without its bias."""
        return linear_part(self.value, x)

    def input_space(self, call: Call) -> bool:
        """Whether the keys of this call are linear in the tokens (the input-space path)."""
        return self.norm_k is None

    # ------------------------------------------------------------------ the view
    def project(self, offsets: Tensor, call: Call) -> Tensor:
        return self.out_part(self.value_part(offsets), call)

    def queries(self, rows: Tensor, index: Tensor, call: Call) -> Tensor:
        """Queries of ``rows``, the tokens ``index``: ``(B, H, k, d)``, normalised."""
        query = heads_first(self.query(rows), self.heads)
        return query if self.norm_q is None else self.norm_q(query)

    def keys_values(self, x: Tensor, call: Call) -> tuple[Tensor, Tensor]:
        """Every key and value the call attends to, ``(B, H, L, d)`` each."""
        _, key, value = self.qkv(x)
        key, value = heads_first(key, self.heads), heads_first(value, self.heads)
        return (key if self.norm_k is None else self.norm_k(key)), value

    def exact_rows(self, x: Tensor, index: Tensor, call: Call, rows: Tensor) -> Tensor:
        query = self.queries(rows, index, call)
        if self.input_space(call):
            return self._input_space_rows(query, rows, x, call)
        key, value = self.keys_values(x, call)
        out = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
        return self.out(heads_last(out).to(rows.dtype), call)

    def _input_space_rows(self, query: Tensor, rows: Tensor, x: Tensor, call: Call) -> Tensor:
        batch, count, channels = rows.shape
        heads = self.heads
        eye = torch.eye(channels, device=x.device, dtype=x.dtype)
        keys = linear_part(self.key, eye)  # (C, H d): row c is W_k e_c
        per_head = keys.t().reshape(heads, -1, channels)  # (H, d, C): W_k,h
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32  # (gradcheck)
        folded = (query @ per_head).to(wide).reshape(batch, heads * count, channels)
        inputs = x.to(wide)
        scale = self.scale if self.scale is not None else query.shape[-1] ** -0.5
        weights = (folded @ inputs.transpose(1, 2) * scale).softmax(dim=-1)
        means = (weights @ inputs).to(x.dtype)  # (B, H k, C): each head's weighted mean of x
        values = self.value(means).view(batch, heads, count, heads, -1)
        own = values.diagonal(dim1=1, dim2=3)  # (B, k, d, H): head h's values of head h's mean
        out = own.permute(0, 1, 3, 2).reshape(batch, count, -1)
        return self.out(out.to(rows.dtype), call)


class NamedProjections(QKVView):
    """Attention with separate query, key, value and output projections named by attribute.

    Args:
        module: the attention module.
        q: name of its query projection (dotted for a nested one, e.g. ``"to_out.0"``).
        k: of its key projection.
        v: of its value projection.
        out: of its output projection.
        heads: the number of heads.
        **options: ``scale``, ``norm_q``, ``norm_k``, ``verify``, as for ``QKVView``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class SelfAttention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        ...     def forward(self, x):
        ...         split = lambda t: t.unflatten(-1, (2, 4)).transpose(1, 2)
        ...         y = nn.functional.scaled_dot_product_attention(
        ...             split(self.q(x)), split(self.k(x)), split(self.v(x)))
        ...         return self.o(y.transpose(1, 2).flatten(2))
        >>> attention = SelfAttention()
        >>> view = NamedProjections(attention, "q", "k", "v", "o", heads=2)
        >>> x = torch.randn(1, 5, 8)
        >>> rows = view.exact_rows(x, torch.tensor([[1, 3]]), NO_CALL, x[:, [1, 3]])
        >>> torch.allclose(rows, attention(x)[:, [1, 3]], atol=1e-6)
        True
    """

    def __init__(
        self,
        module: nn.Module,
        q: str,
        k: str,
        v: str,
        out: str,
        heads: int,
        **options: Any,
    ) -> None:
        super().__init__(module, heads, **options)
        # names, looked up at every use: a LoRA loaded after applying replaces the projections
        self.names = (q, k, v, out)
        for name in self.names:
            module.get_submodule(name)  # fails now, naming what is missing, not at a call

    def _layer(self, index: int) -> nn.Module:
        return self.module.get_submodule(self.names[index])

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.query(x), self.key(x), self.value(x)

    def query(self, x: Tensor) -> Tensor:
        return self._layer(0)(x)

    def key(self, x: Tensor) -> Tensor:
        return self._layer(1)(x)

    def value(self, x: Tensor) -> Tensor:
        return self._layer(2)(x)

    def out(self, o: Tensor, call: Call) -> Tensor:
        return self._layer(3)(o)


class FusedProjections(QKVView):
    """Attention with one fused ``qkv`` projection (queries, keys, values along its output) and
    an output projection, as in timm's ViTs.

    Args:
        module: the attention module.
        qkv: name of its fused projection.
        out: name of its output projection.
        heads: the number of heads.
        **options: ``scale``, ``norm_q``, ``norm_k``, ``verify``, as for ``QKVView``.
    """

    def __init__(
        self,
        module: nn.Module,
        qkv: str,
        out: str,
        heads: int,
        **options: Any,
    ) -> None:
        super().__init__(module, heads, **options)
        self.names = (qkv, out)  # looked up at every use, as for NamedProjections
        for name in self.names:
            module.get_submodule(name)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        query, key, value = self.module.get_submodule(self.names[0])(x).chunk(3, dim=-1)
        return query, key, value

    def query(self, x: Tensor) -> Tensor:
        return self.qkv(x)[0]

    def out(self, o: Tensor, call: Call) -> Tensor:
        return self.module.get_submodule(self.names[1])(o)


#: diffusers attention processors that compute plain scaled dot-product self-attention of the
#: ``to_q`` / ``to_k`` / ``to_v`` projections (fused ones from the same weights); joint, paired,
#: perturbed or adapter processors compute something else
PLAIN_PROCESSORS = frozenset(
    {
        "AttnProcessor",
        "AttnProcessor2_0",
        "AttnProcessorNPU",
        "FusedAttnProcessor2_0",
        "XFormersAttnProcessor",
    }
)
#: plain processors that take a self-attention's keys and values from ``encoder_hidden_states``
#: through ``to_k`` / ``to_v``; the fused one calls ``to_kv`` there, which a self-attention
#: fused by ``fuse_qkv_projections`` lacks (it has ``to_qkv``)
KEYS_VALUES_PROCESSORS = PLAIN_PROCESSORS - {"FusedAttnProcessor2_0"}


def processor_name(attention: nn.Module) -> str:
    """The class name of a diffusers attention module's processor ("" without one)."""
    processor = getattr(attention, "processor", None)
    return "" if processor is None else type(processor).__name__


def diffusers_self_attention(attention: nn.Module) -> bool:
    """Whether ``attention`` has diffusers' ``to_q`` / ``to_k`` / ``to_v`` / ``to_out``
    projections, is not a cross-attention, and computes nothing around the attention product
    (group or spatial norm, residual connection, output rescaling)."""
    to_out = getattr(attention, "to_out", None)
    return (
        all(
            isinstance(getattr(attention, name, None), nn.Module)
            for name in ("to_q", "to_k", "to_v")
        )
        and isinstance(to_out, nn.ModuleList)
        and len(to_out) > 0
        and not getattr(attention, "is_cross_attention", False)
        and getattr(attention, "group_norm", None) is None
        and getattr(attention, "spatial_norm", None) is None
        and not getattr(attention, "residual_connection", False)
        and getattr(attention, "rescale_output_factor", 1.0) == 1.0
    )


def corrects(attention: nn.Module) -> bool:
    """Whether ``attention`` is a diffusers self-attention with a plain processor that
    ``DiffusersAttentionView`` describes (the adapters find views for other attention kinds
    through ``tokenmerge.adapters._views.attention_view``)."""
    return processor_name(attention) in PLAIN_PROCESSORS and diffusers_self_attention(attention)


class DiffusersAttentionView(NamedProjections):
    """A diffusers ``Attention`` with a plain processor (``corrects(attention)`` must hold).

    The processor is checked at every call: an adapter's or PAG's processor set after applying
    computes something else, and such calls are left uncorrected.
    """

    processors: ClassVar[frozenset[str]] = PLAIN_PROCESSORS

    def __init__(self, attention: nn.Module) -> None:
        super().__init__(
            attention,
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            heads=attention.heads,
            scale=self.scale_of(attention),
            norm_q="norm_q",
            norm_k="norm_k",
        )

    @staticmethod
    def scale_of(attention: nn.Module) -> float | None:
        return attention.scale

    def usable(self, call: Call) -> bool:
        return (
            processor_name(self.module) in self.processors
            and call.get("encoder_hidden_states", 1) is None
            and call.get("attention_mask", 2) is None
        )
