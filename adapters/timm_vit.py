"""timm vision transformers: ``VisionTransformer`` (ViT, DeiT, DeiT-3, registers, ``qk_norm``,
``dynamic_img_size``) and ``Eva`` (EVA, EVA-02 with rotary embeddings).

Native hooks only, on the blocks and their sub-modules (ToMe's class-swapping patch is broken on
DeiT-3, ``qk_norm``, register tokens and EVA in today's timm):

- keys: the output of ``attn.k_norm`` (an ``Identity`` without ``qk_norm``), ``(B, H, N, d)``,
  averaged over heads. It fires on EVA too, where the fused q / k / v projection is computed by
  ``F.linear`` on ``attn.qkv.weight`` and no hook on ``attn.qkv`` would;
- proportional attention: the additive float ``attn_mask`` every timm block accepts;
- rotary embeddings (EVA): every block receives ``rope=`` for the full grid; the rows of the
  tokens still present (progressive) or kept (local) are gathered for each call;
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

from typing import Any, ClassVar

from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import parameter_index
from tokenmerge.adapters._vit import (
    ViTAdapter,
    ViTBlock,
    ViTOptions,
    gather_rows,
    keys_by_head,
)
from tokenmerge.errors import TokenMergeError, UnsupportedModelError
from tokenmerge.patch import Adjust, SitePatch
from tokenmerge.plan import Plan
from tokenmerge.progressive import ArgSpec, BlockAdjust, TokenTrack
from tokenmerge.proportional import SizeBias

__all__ = ["TimmViTAdapter"]


def _model_classes() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva


_HIERARCHICAL = (
    "it is a hierarchical model: its stages change the token grid themselves (downsampling "
    "between stages; windowed, pooled or linear attention inside them), so there is no single "
    "token grid through its blocks to merge on; merging inside its windows or stages is not "
    "implemented"
)
#: timm models built from attention that tokenmerge cannot merge, and why
_REFUSED = {
    "Beit": (
        "BEiT adds a relative position bias per pair of tokens inside its attention, which "
        "cannot follow merged tokens"
    ),
    "NaFlexVit": (
        "NaFlexViT takes a variable number of patches with a patch mask and per-patch "
        "coordinates; merging them is not implemented yet"
    ),
    "VisionTransformerSAM": (
        "SAM's image encoder runs windowed attention with relative position biases in most "
        "blocks, which cannot follow merged tokens"
    ),
    **{
        name: _HIERARCHICAL
        for name in (
            "SwinTransformer",
            "SwinTransformerV2",
            "SwinTransformerV2Cr",
            "MaxxVit",
            "PyramidVisionTransformerV2",
            "Levit",
            "EfficientVit",
            "EfficientVitLarge",
            "EfficientVitMsra",
        )  # fmt: skip
    },
}


class TimmViTAdapter(ViTAdapter):
    """timm ``VisionTransformer`` and ``Eva`` models (and their subclasses, such as DeiT's
    distilled model); every block is a site. Progressive mode by default.

    Args:
        options: its ``ViTOptions`` (``mode``, ``proportional_attention``, ``merge_at``).
    """

    name = "timm_vit"
    supported_names: ClassVar[tuple[str, ...]] = (
        "timm.models.vision_transformer.VisionTransformer (ViT, DeiT, DeiT-3, registers, "
        "qk_norm, dynamic_img_size) and its subclasses",
        "timm.models.eva.Eva (EVA, EVA-02)",
    )

    def __init__(self, options: ViTOptions | None = None) -> None:
        super().__init__(options)
        self._rope = False

    @classmethod
    def supports(cls, model: Any) -> bool:
        return isinstance(model, _model_classes())

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        for klass in type(model).__mro__:
            if klass.__name__ in _REFUSED:
                return _REFUSED[klass.__name__]
        return None

    def find_blocks(self, root: nn.Module) -> list[ViTBlock]:
        blocks = []
        for index, block in enumerate(root.blocks):
            attn = getattr(block, "attn", None)
            mlp = getattr(block, "mlp", None)
            keys_module = getattr(attn, "k_norm", None)
            if not all(isinstance(m, nn.Module) for m in (attn, mlp, keys_module)):
                raise UnsupportedModelError(
                    f"timm block blocks.{index} ({type(block).__name__}) has no attn.k_norm / mlp "
                    "sub-modules this adapter hooks (parallel blocks such as "
                    "ParallelScalingBlock are not supported); supported: "
                    + "; ".join(self.supported_names)
                )
            mask_index = parameter_index(type(block), "attn_mask")
            if parameter_index(type(block), "rope") is not None:
                self._rope = True
            blocks.append(
                ViTBlock(
                    f"blocks.{index}",
                    block,
                    attn,
                    mlp,
                    keys_module,
                    keys_by_head,
                    ArgSpec("attn_mask", mask_index) if mask_index is not None else None,
                    # a parallel block feeds attention and MLP the same input
                    sequential=hasattr(block, "norm2"),
                )
            )
        return blocks

    def num_prefix(self, root: nn.Module) -> int:
        return int(root.num_prefix_tokens)

    def patch_projection(self, root: nn.Module) -> nn.Module:
        return root.patch_embed.proj

    def attach_model(self, root: nn.Module, patches: list[SitePatch]) -> list[RemovableHandle]:
        handles = super().attach_model(root, patches)
        # forward_intermediates reshapes every block's output into the patch grid; with merged
        # tokens that reshape succeeds with wrong channels, so refuse it instead
        if self.carry is not None and "forward_intermediates" not in root.__dict__:
            root.__dict__["forward_intermediates"] = RefuseIntermediates()
        return handles

    def detach(self, root: nn.Module) -> None:
        if isinstance(root.__dict__.get("forward_intermediates"), RefuseIntermediates):
            del root.__dict__["forward_intermediates"]

    def block_adjust(self) -> BlockAdjust | None:
        return _rope_of_present_tokens if self._rope else None

    def local_size_bias(self) -> SizeBias | None:
        return SizeBias("attn_mask", "sdpa")  # timm's Attention adds attn_mask to its logits

    def local_adjust(self) -> Adjust | None:
        return self._rope_of_kept_tokens if self._rope else None

    def _rope_of_kept_tokens(self, plan: Plan, kwargs: dict) -> dict:
        rope = kwargs.get("rope")
        if rope is None:
            return kwargs
        return {**kwargs, "rope": gather_rows(rope, plan.kept_without_prefix(self._num_prefix))}


def _rope_of_present_tokens(track: TokenTrack, kwargs: dict) -> dict:
    rope = kwargs.get("rope")
    if rope is None:
        return kwargs
    return {**kwargs, "rope": gather_rows(rope, track.positions)}


class RefuseIntermediates:
    """Stands in for ``forward_intermediates`` while progressive merging is applied."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TokenMergeError(
            "forward_intermediates reads every block's output as the patch grid, but in "
            "progressive mode tokens merge between blocks; apply with adapter_options="
            "{'mode': 'local'} for intermediate feature maps (the token grid is kept), or remove "
            "the patch first"
        )
