"""The diffusers Flux adapter: ``FluxTransformer2DModel`` (Flux.1 dev / schnell),
``ChromaTransformer2DModel`` (Chroma: Flux's blocks and attention, pruned modulation) and their
pipelines.

Flux runs image tokens through rotary position embeddings, and its rotary table is one
unbatched ``(text + image tokens, dim)`` pair of cos / sin tables shared by the whole batch. So
every Flux site plans **once for the whole batch** (on the batch-mean features), and each merged
attention call gets the table's rows of the tokens it keeps: every kept token is a real token
(a ToMe destination, a ReToM representative), so its position stays exact.

Sites, in model order:

- **Double-stream blocks** (``transformer_blocks``): image and text have their own weights and
  meet in a joint attention. The image tokens (``hidden_states``) merge around the attention
  and, with ``sites.mlp``, around the image MLP (``ff``); text tokens are never merged.
- **Single-stream blocks** (``single_transformer_blocks``): the block concatenates text and
  image tokens itself, and runs its MLP in parallel with attention on the same normalised
  tokens. With ``sites.attn`` alone, the image part merges around the attention; with
  ``sites.mlp`` alone, around the MLP's input projection; with both, around the whole block
  body: the normalised tokens merge once, attention and the MLP (input and output projections)
  run on the merged tokens, and the body's output is unmerged before the residual add.

Value correction (``value_correction``): at the attention of both kinds of blocks
(``tokenmerge.adapters._views.FluxAttentionView``); around a single-stream block's whole body,
its attention's share of the body's output (``FluxBodyView``): the MLP, merged too, keeps the
copy's error, which is not linear in the merged-away tokens' offsets.

Grid: from ``img_ids`` (``[0, row, col]`` per image token, row-major), read by a pre-hook on the
model; when the ids are not one row-major grid (e.g. Kontext's reference-image tokens), the calls
pass through unmerged, counted in ``stats()``. Stages: ``"first"`` / ``"middle"`` / ``"last"``
third of all blocks (double, then single). Calls with IP-Adapter image tokens pass through
unmerged. An attention mask over the text and image tokens (Chroma's pipeline masks the text
padding) is reduced with the rotary table.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import AdapterOptions, SiteCandidate, forward_parameters
from tokenmerge.adapters._diffusers import (
    GridHook,
    TargetGuard,
    TransformerAdapter,
    check_signatures,
    depth_stage,
    given_arguments,
    parameter_index,
    value_correction,
)
from tokenmerge.adapters._views import body_correction
from tokenmerge.attention_view import Call
from tokenmerge.calls import CallValues, PerThread
from tokenmerge.patch import EMPTY_BATCH, SitePatch, per_thread_correction, report_fit
from tokenmerge.plan import Plan
from tokenmerge.proportional import SizeBias
from tokenmerge.site import Site
from tokenmerge.windows import token_indices

__all__ = ["DiffusersFluxAdapter"]


def _classes() -> tuple[type, type, type, type]:
    from diffusers.models.transformers.transformer_flux import (
        FluxAttention,
        FluxSingleTransformerBlock,
        FluxTransformer2DModel,
        FluxTransformerBlock,
    )

    return FluxTransformer2DModel, FluxTransformerBlock, FluxSingleTransformerBlock, FluxAttention


def _chroma() -> tuple[type, type, type]:
    from diffusers.models.transformers.transformer_chroma import (
        ChromaSingleTransformerBlock,
        ChromaTransformer2DModel,
        ChromaTransformerBlock,
    )

    return ChromaTransformer2DModel, ChromaTransformerBlock, ChromaSingleTransformerBlock


def _check_signatures() -> None:
    from diffusers.models.attention import FeedForward

    model, double, single, attention = _classes()
    chroma, chroma_double, chroma_single = _chroma()
    check_signatures(
        {
            model: (
                "hidden_states",
                "encoder_hidden_states",
                "pooled_projections",
                "timestep",
                "img_ids",
            ),
            double: ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb"),
            single: ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb"),
            chroma: ("hidden_states", "encoder_hidden_states", "timestep", "img_ids"),
            chroma_double: ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb"),
            chroma_single: ("hidden_states", "temb", "image_rotary_emb", "attention_mask"),
            attention: ("hidden_states", "encoder_hidden_states", "attention_mask"),
            FeedForward: ("hidden_states",),
        },
        "Flux",
    )


def _block_kind(block: nn.Module) -> str | None:
    """``"double"`` or ``"single"``: a Flux-built block (FLUX.1's or Chroma's) by what it is
    made of, a ``FluxAttention`` with the text stream's MLP beside it, or the single-stream
    body (norm, attention and MLP input projection side by side, one output projection)."""
    if not isinstance(getattr(block, "attn", None), _classes()[3]):
        return None
    if hasattr(block, "ff") and hasattr(block, "ff_context"):
        return "double"
    if all(hasattr(block, name) for name in ("norm", "proj_mlp", "proj_out")):
        return "single"
    return None


class IdsGrid(GridHook):
    """Pre-hook of the Flux model: the image-token grid of this call, from ``img_ids``.

    Reading the ids' values synchronises with the device, so the grid is cached for as long as
    the same ids tensor comes back (a pipeline passes one for the whole generation). Serves as
    every site's layout: the tokens beyond the grid are the text tokens, which come first.
    """

    text_first = True

    def __init__(self, index: int | None) -> None:
        super().__init__()
        self.index = index  # position of img_ids when passed positionally

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("img_ids")
        if ids is None and self.index is not None and len(args) > self.index:
            ids = args[self.index]
        self._read(ids)

    @torch.compiler.disable
    def _read(self, ids: Any) -> None:
        call = self.calls.value  # the calling thread's grid and the ids it was read from
        if not isinstance(ids, Tensor):
            call.grid, call.key = None, None
            return
        # the same tensor object, unchanged since (a weak reference: an address can be reused
        # by the ids of another grid once these are freed, with the same shape: 8 x 6 and 6 x 8)
        known = call.key is not None and call.key[0]() is ids and call.key[1] == ids._version
        if not known:
            call.key = (weakref.ref(ids), ids._version)
            call.grid = _grid_of(ids)


def _grid_of(ids: Tensor) -> tuple[int, int] | None:
    """``(h, w)`` when ``ids`` (``(N, 3)``, or batched) enumerate one grid row by row."""
    if ids.dim() == 3:
        ids = ids[0]
    if ids.dim() != 2 or ids.shape[1] != 3 or ids.shape[0] == 0:
        return None
    n = ids.shape[0]
    ids = ids.long()
    size = ids[:, 1:].amax(0) + 1  # height, width
    token = torch.arange(n, device=ids.device)
    width = size[1].clamp_min(1)  # ids with negative columns: no grid, and no division by 0
    expected = torch.stack([torch.zeros_like(token), token // width, token % width], dim=1)
    fits = (ids == expected).all() & (size.prod() == n)
    # one read: the host waits for the device once per ids tensor
    height, width, grid = torch.cat([size, fits.long()[None]]).tolist()
    return (height, width) if grid else None


def gather_rotary(plan: Plan, kwargs: dict) -> dict:
    """The call's keyword arguments with the rotary table, and the attention mask where there
    is one (Chroma's, over text then image tokens on both axes), reduced to the rows of the
    tokens the batch-shared ``plan`` keeps (text rows, which come first and never merge, all
    kept)."""
    table = kwargs.get("image_rotary_emb")
    if table is None:
        return kwargs
    first = table[0] if isinstance(table, (tuple, list)) else table
    length = first.shape[0]  # text and image tokens
    extra = length - plan.num_tokens  # text tokens not in the merged tensor
    key = ("rotary rows", extra, first.device)
    rows = plan.derived(key, lambda: _rotary_rows(plan, extra).to(first.device))
    if isinstance(table, (tuple, list)):
        table = type(table)(part.index_select(0, rows) for part in table)
    else:
        table = table.index_select(0, rows)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor):
        for axis in range(mask.dim()):
            if mask.shape[axis] == length:
                mask = mask.index_select(axis, rows)
        return {**kwargs, "image_rotary_emb": table, "attention_mask": mask}
    return {**kwargs, "image_rotary_emb": table}


def _rotary_rows(plan: Plan, extra: int) -> Tensor:
    """The rotary table's rows of the ``extra`` text tokens and of the tokens ``plan`` keeps."""
    rows = plan.kept[0]
    if extra:
        rows = torch.cat([token_indices(extra, rows.device)[0], rows + extra])
    return rows


class RotaryGuard(TargetGuard):
    """A ``TargetGuard`` that also passes through what the rotary gathering cannot handle; an
    attention mask over the table's text and image tokens is reduced with the table."""

    def __call__(self, args: tuple, kwargs: dict) -> str | None:
        reason = self.replaying_hook()
        if reason is not None:
            return reason
        if kwargs.get("ip_hidden_states") is not None:
            return "IP-Adapter image tokens (their output is per image token, not unmerged)"
        table = kwargs.get("image_rotary_emb")
        parts = table if isinstance(table, (tuple, list)) else [table]
        if table is not None and not all(isinstance(t, Tensor) and t.dim() == 2 for t in parts):
            return "a rotary table that is not one unbatched (tokens, dim) table"
        if len(args) > 2 and args[2] is not None:
            return "an attention mask passed by position"
        mask = kwargs.get("attention_mask")
        if mask is not None and (table is None or parts[0].shape[0] not in mask.shape):
            return "an attention mask that does not run over the rotary table's tokens"
        return None


def _size_bias(patch: SitePatch, context: str | None = None) -> SizeBias | None:
    """Proportional attention through Flux's ``attention_mask``, which its processor hands to
    the attention product as an additive mask, when the config asks for it."""
    if not patch.config.local_proportional_attention:
        return None
    return SizeBias("attention_mask", "sdpa", context=context)


class SingleBlockBody:
    """Merges a single-stream block's body: the normalised tokens merge at the norm's output,
    attention (with its rotary rows gathered) and the parallel MLP run merged, and the output
    projection's result is unmerged (and value-corrected, when asked) before the block's
    residual add."""

    def __init__(self, patch: SitePatch, block: nn.Module) -> None:
        self.patch = patch
        self.guard = RotaryGuard(block.attn, "attn", block, watched=(block.norm, block.proj_out))
        self.bias = _size_bias(patch)
        self.correction = body_correction(patch, block)
        self.corrections = per_thread_correction(self.correction)
        if self.correction is not None:
            patch.report_correction(self.correction)
        # per thread (tokenmerge.calls): the plan of the call under way, why it passes through
        # if it does, and the merged call's input, merged input and attention arguments, for the
        # correction
        self.calls = PerThread(_body_call)
        self.arguments = forward_parameters(type(block))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "calls": PerThread(_body_call)}

    def attach(self, block: nn.Module) -> list[RemovableHandle]:
        return [
            block.register_forward_pre_hook(self.begin, with_kwargs=True),
            block.norm.register_forward_hook(self.merge),
            block.attn.register_forward_pre_hook(self.rotary, with_kwargs=True),
            block.proj_out.register_forward_hook(self.unmerge),
        ]

    def begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # the guard reads the attention's arguments, which only the block sees before the merge
        given = given_arguments(self.arguments, args, kwargs)
        attention = {**(given.get("joint_attention_kwargs") or {}), **given}
        mask = attention.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:  # the block makes it (B, 1, L, L)
            attention["attention_mask"] = mask[:, None, None, :]
        reason = self.guard((), attention)
        self.calls.value.reason = reason

    def merge(self, module: nn.Module, args: tuple, output: Any) -> Any:
        call = self.calls.value
        call.plan, call.inputs = None, None
        x = output[0]
        if call.reason is not None:
            self.patch.count_pass_through(call.reason)
            return None
        if x.shape[0] == 0:
            self.patch.count_pass_through(EMPTY_BATCH)
            return None
        plan = self.patch.plan_for(x)
        if plan is None:
            self.patch.count_pass_through(f"no token grid known for {x.shape[1]} tokens")
            return None
        if plan.is_identity:
            return None
        call.plan = plan
        if self.correction is None:
            merged = self.patch.observed("merge", plan.merge, x)
            call.inputs = None
        else:
            merged, sources = self.patch.observed("merge", plan.merge_keeping_sources, x)
            call.inputs = (x, merged, None, sources)
        return (merged, *output[1:])

    def rotary(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.calls.value
        if call.plan is None:
            return None
        if call.inputs is not None:  # the attention's own arguments: its full rotary table
            x, merged, _, sources = call.inputs
            call.inputs = (x, merged, Call(args, kwargs), sources)
        kwargs = gather_rotary(call.plan, kwargs)
        if self.bias is not None:
            kwargs = self.bias(call.plan, args[0] if args else kwargs["hidden_states"], kwargs)
        return args, kwargs

    def unmerge(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        call = self.calls.value
        plan, call.plan = call.plan, None
        inputs, call.inputs = call.inputs, None
        if plan is None:
            return None
        self.patch.check_merged_output(plan, output, module)
        return self.patch.observed("unmerge", self._unmerge, plan, output, inputs)

    def _unmerge(self, plan: Plan, y: Tensor, inputs: tuple | None) -> Tensor:
        """``inputs``: ``(x, merged, the attention's Call or None, the sources' rows)``."""
        unmerged = plan.unmerge(y)
        if inputs is None or inputs[2] is None:
            return unmerged
        x, merged, call, sources = inputs
        correction = self.corrections.value
        out = correction(
            plan, x, merged, unmerged, observed=self.patch.observed, call=call, sources=sources
        )
        report_fit(self.correction, correction)
        return out


def _body_call() -> CallValues:
    return CallValues(plan=None, reason=None, inputs=None)


class DiffusersFluxAdapter(TransformerAdapter):
    """Merging in diffusers ``FluxTransformer2DModel``s and the pipelines that hold one.

    Example:
        >>> import torch, tokenmerge
        >>> from diffusers import FluxTransformer2DModel
        >>> flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1,
        ...     num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        ...     joint_attention_dim=16, pooled_projection_dim=8,
        ...     axes_dims_rope=(2, 2, 4))
        >>> handle = tokenmerge.apply(flux, "tome", ratio=0.5,
        ...                           sites={"mlp": True, "min_tokens": 1})
        >>> [site.name for site in handle.sites]
        ['transformer_blocks.0', 'single_transformer_blocks.0']
        >>> rows, cols = torch.meshgrid(torch.arange(8), torch.arange(6), indexing="ij")
        >>> ids = torch.stack([torch.zeros_like(rows), rows, cols], -1)
        >>> img_ids = ids.reshape(-1, 3)
        >>> out = flux(torch.randn(1, 48, 4),
        ...            encoder_hidden_states=torch.randn(1, 5, 16),
        ...            pooled_projections=torch.randn(1, 8),
        ...            timestep=torch.tensor([1.0]),
        ...            img_ids=img_ids, txt_ids=torch.zeros(5, 3)).sample
        >>> out.shape, handle.stats()["single_transformer_blocks.0"].tokens_out
        (torch.Size([1, 48, 4]), 29)
        >>> handle.remove()
    """

    name = "diffusers_flux"

    def __init__(self, options: AdapterOptions | None = None) -> None:
        _check_signatures()
        super().__init__(options)

    @staticmethod
    def model_classes() -> tuple[type, ...]:
        return _classes()[0], _chroma()[0]

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        self.watch_root(root, IdsGrid(parameter_index(type(root), "img_ids")))
        named = [(f"transformer_blocks.{i}", b) for i, b in enumerate(root.transformer_blocks)]
        named += [
            (f"single_transformer_blocks.{i}", b)
            for i, b in enumerate(root.single_transformer_blocks)
        ]
        found = []
        for index, (name, block) in enumerate(named):
            kind = _block_kind(block)
            if kind == "double":
                modules = {"attn": block.attn, "mlp": block.ff}
            elif kind == "single":
                modules = {"attn": block.attn, "mlp": block.proj_mlp}
            else:
                continue
            stage = depth_stage(index, len(named))
            site = Site(name, stage=stage, block_index=index, shared_plan=True, rotary=True)
            self._blocks[name] = block
            found.append(SiteCandidate(site, modules))
        return found

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        block, handles = self.attach_block(patch)
        single = _block_kind(block) == "single"
        if single and set(modules) == {"attn", "mlp"}:
            return handles + SingleBlockBody(patch, block).attach(block)
        for kind, module in modules.items():
            if kind == "attn":
                guard = RotaryGuard(module, kind, block)
                # double-stream attention puts its own text tokens before the merged image ones
                bias = _size_bias(patch, context=None if single else "encoder_hidden_states")
                correction = value_correction(patch, kind, module)
                handles += patch.attach_local(
                    module, guard=guard, adjust=gather_rotary, correction=correction, bias=bias
                )
            else:
                handles += patch.attach_local(module, guard=TargetGuard(module, kind, block))
        return handles
