"""Hugging Face transformers vision transformers: ``ViTModel``, ``ViTForImageClassification``,
``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` and the vision tower of ``CLIPModel``.

Layers are found by class, the one the model records hidden states from
(``type(model)._can_record_outputs["hidden_states"]``), inside the vision module only: a
``CLIPModel``'s text tower uses the same layer class and is never touched. Native hooks only:

- keys: the output of the attention's ``k_proj``, ``(B, N, H * d)``, averaged over heads;
- proportional attention: the additive ``attention_mask`` every layer passes to its attention
  function (eager and SDPA back-ends add it to the logits);
- the token count changes at layer boundaries only (the layer's MLP input, progressive mode),
  never inside an attention function; the last layer's output is restored to the full token
  set, so ``last_hidden_state``, the pooler and the heads see the usual shapes.

Example:
    >>> import torch, tokenmerge
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> config = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    ...                    intermediate_size=128, image_size=64, patch_size=8)
    >>> model = ViTForImageClassification(config).eval()
    >>> with tokenmerge.apply(model, "tome", r=8) as handle:
    ...     logits = model(torch.randn(2, 3, 64, 64)).logits
    ...     [s.tokens_out for s in handle.stats().values()]
    [57, 49, 41]
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from tokenmerge.adapters._vit import HeadMean, ViTAdapter, ViTBlock
from tokenmerge.errors import UnsupportedModelError
from tokenmerge.progressive import ArgSpec

__all__ = ["TransformersViTAdapter"]


def _vision_module(model: Any) -> nn.Module | None:
    """The module holding the vision layers, or None for an unsupported model."""
    from transformers import (
        CLIPModel,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        ViTForImageClassification,
        ViTModel,
    )

    if isinstance(model, (ViTModel, CLIPVisionModel)):
        return model
    if isinstance(model, ViTForImageClassification):
        return model.vit
    if isinstance(model, (CLIPModel, CLIPVisionModelWithProjection)):
        return model.vision_model
    return None


class TransformersViTAdapter(ViTAdapter):
    """Hugging Face ``ViTModel`` / ``ViTForImageClassification`` and CLIP's vision tower; every
    layer is a site. Progressive mode by default.

    Args:
        options: its ``ViTOptions`` (``mode``, ``proportional_attention``, ``merge_at``).
    """

    name = "transformers_vit"
    supported_names: ClassVar[tuple[str, ...]] = (
        "transformers ViTModel",
        "ViTForImageClassification",
        "CLIPVisionModel",
        "CLIPVisionModelWithProjection",
        "CLIPModel (its vision tower)",
    )

    @classmethod
    def supports(cls, model: Any) -> bool:
        return _vision_module(model) is not None

    def root(self, model: Any) -> nn.Module:
        # a CLIPModel is patched in its vision tower: the text tower shares the layer class
        return model.vision_model if type(model).__name__ == "CLIPModel" else model

    def find_blocks(self, root: nn.Module) -> list[ViTBlock]:
        layer_class = type(root)._can_record_outputs["hidden_states"]
        blocks = []
        for name, layer in root.named_modules():
            if not isinstance(layer, layer_class):
                continue
            attn = getattr(layer, "attention", None) or getattr(layer, "self_attn", None)
            mlp = getattr(layer, "mlp", None)
            keys_module = getattr(attn, "k_proj", None)
            if not all(isinstance(m, nn.Module) for m in (attn, mlp, keys_module)):
                raise UnsupportedModelError(
                    f"layer {name} ({type(layer).__name__}) has no attention k_proj / mlp "
                    "sub-modules this adapter hooks; supported: " + ", ".join(self.supported_names)
                )
            heads = getattr(attn, "num_attention_heads", None) or attn.num_heads
            blocks.append(
                ViTBlock(
                    name,
                    layer,
                    attn,
                    mlp,
                    keys_module,
                    HeadMean(heads),
                    ArgSpec("attention_mask", 1),
                )
            )
        return blocks

    def num_prefix(self, root: nn.Module) -> int:
        return 1  # the class token

    def patch_projection(self, root: nn.Module) -> nn.Module:
        embeddings = _vision_module(root).embeddings
        return next(m for m in embeddings.modules() if isinstance(m, nn.Conv2d))
