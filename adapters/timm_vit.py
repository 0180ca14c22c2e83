"""timm vision transformers: ``VisionTransformer`` (ViT, DeiT, DeiT-3, registers, ``qk_norm``,
``dynamic_img_size``), ``Eva`` (EVA, EVA-02 with rotary embeddings), ``Beit`` (BEiT, BEiT-2:
relative position biases) and ``NaFlexVit`` (called on image tensors).

Native hooks only, on the blocks and their sub-modules (ToMe's class-swapping patch is broken on
DeiT-3, ``qk_norm``, register tokens and EVA in today's timm):

- keys: the output of ``attn.k_norm`` (an ``Identity`` without ``qk_norm``), ``(B, H, N, d)``,
  averaged over heads. It fires on EVA too, where the fused q / k / v projection is computed by
  ``F.linear`` on ``attn.qkv.weight`` and no hook on ``attn.qkv`` would. BEiT's attention has no
  ``k_norm`` and calls ``F.linear`` too: its keys, averaged over heads, are computed from the
  attention's input (``norm1``'s output) with the head-averaged key weight (``BeitKeys``, a
  ``1 / H`` share of a key projection);
- proportional attention: the additive float ``attn_mask`` every timm block accepts; a BEiT
  block takes ``shared_rel_pos_bias`` instead, which its attention adds to the logits the same
  way;
- rotary embeddings (EVA, NaFlexViT with rope): every block receives ``rope=`` for the full
  grid; the rows of the tokens still present (progressive) or kept (local) are gathered for
  each call;
- relative position biases (BEiT): a bias per pair of the original tokens, ``(H, N0, N0)``.
  The model-wide one (``use_shared_rel_pos_bias``) reaches every block as
  ``shared_rel_pos_bias=`` and is cut to the rows and columns of the tokens of the call (a merged
  token takes its destination's). The per-layer one (``use_rel_pos_bias``) is made by the
  attention's ``_get_rel_pos_bias`` method, which no hook reaches: while tokenmerge is applied,
  each such attention holds an instance attribute of that name (``PairBiasOfTokens``) that calls
  the method and cuts its result the same way; removing the patch deletes it;
- NaFlexViT: a call on images ``(B, 3, H, W)`` is a ViT's (the grid comes from ``embeds``, whose
  projection is linear by default); a NaFlex call (a dict of patches with ``patch_valid`` and
  ``patch_coord``, or ``patch_coord=``: padded patches, one grid per sample) is refused with a
  ``TokenMergeError`` rather than merged across the padding;
- prefix tokens: ``model.num_prefix_tokens`` (class, distillation, registers), never merged.

Example:
    >>> import timm, torch, tokenmerge
    >>> model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4)
    >>> model = model.eval()
    >>> with tokenmerge.apply(model, "tome", r=8) as handle:
    ...     logits = model(torch.randn(2, 3, 224, 224))
    ...     [s.tokens_out for s in handle.stats().values()]
    [189, 181, 173, 165]
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import parameter_index
from tokenmerge.adapters._tables import gather_pairs
from tokenmerge.adapters._vit import (
    ViTAdapter,
    ViTBlock,
    ViTOptions,
    gather_rows,
    keys_by_head,
)
from tokenmerge.calls import CallValues, PerThread
from tokenmerge.errors import TokenMergeError, UnsupportedModelError
from tokenmerge.patch import Adjust, SitePatch
from tokenmerge.plan import Plan
from tokenmerge.progressive import ArgSpec, BlockAdjust, TokenTrack
from tokenmerge.proportional import SizeBias

__all__ = ["TimmViTAdapter"]

#: the keyword by which a BEiT block and its attention take the model-wide relative position
#: bias, an additive logits bias (proportional attention goes there too)
_SHARED_BIAS = "shared_rel_pos_bias"


def _model_classes() -> tuple[type, ...]:
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva, Beit, NaFlexVit


def _beit_attention() -> type:
    from timm.models.beit import Attention

    return Attention


def _naflex_model() -> type:
    from timm.models.naflexvit import NaFlexVit

    return NaFlexVit


class TimmViTAdapter(ViTAdapter):
    """timm ``VisionTransformer``, ``Eva``, ``Beit`` and ``NaFlexVit`` models (and their
    subclasses, such as DeiT's distilled model); every block is a site. Progressive mode by
    default.

    Args:
        options: its ``ViTOptions`` (``mode``, ``proportional_attention``, ``merge_at``).
    """

    name = "timm_vit"
    supported_names: ClassVar[tuple[str, ...]] = (
        "timm.models.vision_transformer.VisionTransformer (ViT, DeiT, DeiT-3, registers, "
        "qk_norm, dynamic_img_size) and its subclasses",
        "timm.models.eva.Eva (EVA, EVA-02)",
        "timm.models.beit.Beit (BEiT, BEiT-2: shared or per-layer relative position biases)",
        "timm.models.naflexvit.NaFlexVit (called on image tensors)",
    )

    def __init__(self, options: ViTOptions | None = None) -> None:
        super().__init__(options)
        self._rope = False
        self._shared_bias = False  # blocks take BEiT's shared_rel_pos_bias
        #: BEiT attentions with a per-layer relative position bias table
        self._pair_tables: list[nn.Module] = []
        self._tokens: CallTokens | None = None

    @classmethod
    def supports(cls, model: Any) -> bool:
        return isinstance(model, _model_classes())

    def find_blocks(self, root: nn.Module) -> list[ViTBlock]:
        blocks = []
        self._pair_tables = []
        for index, block in enumerate(root.blocks):
            attn = getattr(block, "attn", None)
            mlp = getattr(block, "mlp", None)
            keys_module, keys = getattr(attn, "k_norm", None), keys_by_head
            if keys_module is None and isinstance(attn, _beit_attention()):
                keys_module, keys = getattr(block, "norm1", None), BeitKeys(attn)
                if getattr(attn, "relative_position_bias_table", None) is not None:
                    self._pair_tables.append(attn)
            if not all(isinstance(m, nn.Module) for m in (attn, mlp, keys_module)):
                raise UnsupportedModelError(
                    f"timm block blocks.{index} ({type(block).__name__}) has no attn.k_norm / mlp "
                    "sub-modules this adapter hooks (parallel blocks such as "
                    "ParallelScalingBlock are not supported); supported: "
                    + "; ".join(self.supported_names)
                )
            mask = None
            for name in ("attn_mask", _SHARED_BIAS):
                position = parameter_index(type(block), name)
                if position is not None:
                    mask = ArgSpec(name, position)
                    self._shared_bias |= name == _SHARED_BIAS
                    break
            if parameter_index(type(block), "rope") is not None:
                self._rope = True
            blocks.append(
                ViTBlock(
                    f"blocks.{index}",
                    block,
                    attn,
                    mlp,
                    keys_module,
                    keys,
                    mask,
                    # a parallel block feeds attention and MLP the same input
                    sequential=hasattr(block, "norm2"),
                )
            )
        return blocks

    def num_prefix(self, root: nn.Module) -> int:
        return int(root.num_prefix_tokens)

    def patch_projection(self, root: nn.Module) -> nn.Module:
        if isinstance(root, _naflex_model()):
            # a Linear on patchified pixels by default (no grid in its output): the grid is
            # read from ``embeds`` (attach_model); a Conv2d reports it here as well
            return root.embeds.proj
        return root.patch_embed.proj

    def attach_model(self, root: nn.Module, patches: list[SitePatch]) -> list[RemovableHandle]:
        handles = super().attach_model(root, patches)
        if isinstance(root, _naflex_model()):
            handles.append(root.embeds.register_forward_hook(self._read_naflex_grid))
        if self._pair_tables:
            # per-layer relative position biases: an instance attribute stands in for the
            # method that makes them (no hook reaches a method); a pre-hook, first in line,
            # says which tokens the attention call has
            self._tokens = CallTokens(self.carry.tracks if self.carry is not None else None)
            for attn in self._pair_tables:
                if "_get_rel_pos_bias" in attn.__dict__:
                    continue  # another patch's stand-in (or the user's): left alone
                attn.__dict__["_get_rel_pos_bias"] = PairBiasOfTokens(attn, self._tokens)
                handles.append(
                    attn.register_forward_pre_hook(
                        self._tokens.before, with_kwargs=True, prepend=True
                    )
                )
        # forward_intermediates reshapes every block's output into the patch grid; with merged
        # tokens that reshape succeeds with wrong channels, so refuse it instead
        if self.carry is not None and "forward_intermediates" not in root.__dict__:
            root.__dict__["forward_intermediates"] = RefuseIntermediates()
        return handles

    def detach(self, root: nn.Module) -> None:
        if isinstance(root.__dict__.get("forward_intermediates"), RefuseIntermediates):
            del root.__dict__["forward_intermediates"]
        for attn in self._pair_tables:
            if isinstance(attn.__dict__.get("_get_rel_pos_bias"), PairBiasOfTokens):
                del attn.__dict__["_get_rel_pos_bias"]

    def _read_naflex_grid(self, module: nn.Module, args: tuple, output: Any) -> None:
        grid = output[1] if isinstance(output, tuple) and len(output) == 2 else None
        if grid is None:
            raise TokenMergeError(
                f"{type(module).__name__} was called in NaFlex mode (patches with patch_coord "
                "and patch_valid: padded patches, a grid of its own per sample); tokenmerge "
                "merges NaFlexVit called on images (batch, channels, height, width) only, since "
                "a merge would mix padding into valid patches and lose each sample's grid. Call "
                "the model on an image tensor, or remove the patch (tokenmerge.remove(model)) "
                "for NaFlex batches"
            )
        self._grids.value.grid = (int(grid[0]), int(grid[1]))

    def block_adjust(self) -> BlockAdjust | None:
        return _rope_of_present_tokens if self._rope else None

    def rotary(self) -> bool:
        return self._rope

    def pair_arguments(self) -> tuple[str, ...]:
        # BEiT's model-wide bias reaches every block, and its attention, over the original tokens
        return (_SHARED_BIAS,) if self._shared_bias else ()

    def local_size_bias(self) -> SizeBias | None:
        # timm's Attention adds attn_mask to its logits, BEiT's adds shared_rel_pos_bias
        return SizeBias(_SHARED_BIAS if self._shared_bias else "attn_mask", "sdpa")

    def local_adjust(self) -> Adjust | None:
        if not (self._rope or self._pair_tables):
            return None
        return self._arguments_of_kept_tokens

    def _arguments_of_kept_tokens(self, plan: Plan, kwargs: dict) -> dict:
        if self._tokens is not None:
            self._tokens.keep(plan.kept)  # for the per-layer bias made inside the attention
        rope = kwargs.get("rope")
        if rope is None:
            return kwargs
        return {**kwargs, "rope": gather_rows(rope, plan.kept_without_prefix(self._num_prefix))}


def _rope_of_present_tokens(track: TokenTrack, kwargs: dict) -> dict:
    rope = kwargs.get("rope")
    if rope is None:
        return kwargs
    return {**kwargs, "rope": gather_rows(rope, track.positions)}


class BeitKeys:
    """The keys of a BEiT attention averaged over heads, ``(B, N, d)``, from its input (the
    block's ``norm1`` output): the attention computes q / k / v with ``F.linear`` on
    ``qkv.weight`` (so no hook on ``qkv`` fires) and has no ``k_norm``. Averaging over heads is
    linear, so one projection with the head-averaged key weight gives it, for ``1 / H`` of the
    cost of the keys (a class, so ``copy.deepcopy`` copies it with the model)."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def __call__(self, output: Tensor) -> Tensor:
        attn = self.attn
        weight = attn.qkv.weight
        inner, heads = weight.shape[0] // 3, attn.num_heads
        key_weight = weight[inner : 2 * inner].view(heads, inner // heads, -1).mean(0)
        key_bias = getattr(attn, "k_bias", None)
        if key_bias is not None:
            key_bias = key_bias.view(heads, -1).mean(0)
        return F.linear(output, key_weight, key_bias)


class CallTokens:
    """Per thread: the original index of the tokens of the BEiT attention call under way (None:
    the original tokens), which ``PairBiasOfTokens`` cuts the per-layer bias to.

    ``before`` (an attention pre-hook, first in line) sets it in progressive mode from the
    carry's token record, and clears it in local mode, where the local hook's adjustment
    (``keep``) sets it for a merged call. Taking it clears it, so no index outlives the call.
    """

    def __init__(self, tracks: PerThread | None) -> None:
        self.tracks = tracks
        self.calls = PerThread(partial(CallValues, index=None))

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.calls.value
        call.index = None
        if self.tracks is None:
            return
        track = self.tracks.value
        x = args[0] if args else kwargs.get("x")
        if track.merged and isinstance(x, Tensor) and x.shape[1] == track.num_tokens:
            call.index = track.token_index()

    def keep(self, index: Tensor) -> None:
        self.calls.value.index = index

    def take(self) -> Tensor | None:
        call = self.calls.value
        index, call.index = call.index, None
        return index


class PairBiasOfTokens:
    """Stands in for a BEiT attention's ``_get_rel_pos_bias`` method while tokenmerge is
    applied (an instance attribute of that name): the class's bias over the original tokens,
    ``(1, H, N0, N0)``, cut to the rows and columns of the tokens of the call."""

    def __init__(self, attn: nn.Module, tokens: CallTokens) -> None:
        self.attn = attn
        self.tokens = tokens

    def __call__(self) -> Tensor:
        bias = type(self.attn)._get_rel_pos_bias(self.attn)
        index = self.tokens.take()
        return bias if index is None else gather_pairs(bias, index)


class RefuseIntermediates:
    """Stands in for ``forward_intermediates`` while progressive merging is applied."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TokenMergeError(
            "forward_intermediates reads every block's output as the patch grid, but in "
            "progressive mode tokens merge between blocks; apply with adapter_options="
            "{'mode': 'local'} for intermediate feature maps (the token grid is kept), or remove "
            "the patch first"
        )
