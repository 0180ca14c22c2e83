"""Hugging Face transformers vision encoders built like a ViT, by structure: patch-embedded
image tokens (a ``Conv2d`` in ``embeddings``), layers the model records hidden states from, each
with an attention holding ``k_proj`` and an ``mlp``. That covers ``ViTModel``, DeiT, Dinov2 (with
or without registers), Siglip's vision model, the vision tower of ``CLIPModel`` and their task
heads (``...ForImageClassification``, reached through ``base_model``). The protected prefix is
read from the embeddings: class, distillation and register tokens. ViTMAE (random patch
masking), BEiT and Data2Vec-Vision (relative position biases inside the attention) are refused
with the reason, windowed models (a ``window_size`` in their config) are not claimed.

Layers are found by class, the one the model records hidden states from
(``type(model)._can_record_outputs["hidden_states"]``), inside the vision module only: a
``CLIPModel``'s text tower uses the same layer class and is never touched. Native hooks only:

- keys: the output of the attention's ``k_proj``, ``(B, N, H * d)``, averaged over heads;
- proportional attention: the additive ``attention_mask`` every layer passes to its attention
  function (eager and SDPA back-ends add it to the logits);
- the token count changes at layer boundaries only (the layer's MLP input, progressive mode),
  never inside an attention function; the last layer's output is restored to the full token
  set, so ``last_hidden_state``, the pooler and the heads see the usual shapes;
- ``output_hidden_states``: the library records every layer's output as the next layer sees it,
  merged in progressive mode; each is restored to the full token set (every patch gets a copy of
  the token it was merged into) before the model returns, so ``hidden_states[i]`` keeps its
  shape ``(B, N, C)``. Attention weights (``output_attentions``) stay over the merged tokens of
  their layer: there is no full-size attention map to restore.

Example:
    >>> import torch, tokenmerge
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> config = ViTConfig(hidden_size=64, num_hidden_layers=3,
    ...                    num_attention_heads=4, intermediate_size=128,
    ...                    image_size=64, patch_size=8)
    >>> model = ViTForImageClassification(config).eval()
    >>> with tokenmerge.apply(model, "tome", r=8) as handle:
    ...     logits = model(torch.randn(2, 3, 64, 64)).logits
    ...     [s.tokens_out for s in handle.stats().values()]
    [57, 49, 41]
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapters._vit import HeadMean, ViTAdapter, ViTBlock
from tokenmerge.errors import UnsupportedModelError
from tokenmerge.patch import SitePatch
from tokenmerge.progressive import ArgSpec, TokenCarry

__all__ = ["TransformersViTAdapter"]


#: encoders built like a ViT whose tokens cannot be merged, and why
_REFUSED = {
    "ViTMAEModel": (
        "ViTMAE drops and shuffles patches at random before its encoder (config.mask_ratio), so "
        "the tokens its layers see have no grid to merge on"
    ),
    "BeitModel": (
        "BEiT adds relative position biases inside its attention (not through attention_mask), "
        "which cannot follow merged tokens"
    ),
    "Data2VecVisionModel": (
        "Data2Vec-Vision is BEiT's architecture: relative position biases inside its attention, "
        "which cannot follow merged tokens"
    ),
}
#: prefix-token parameters of the embeddings (class, distillation, registers): tokens per row
_PREFIX_PARAMETERS = ("cls_token", "distillation_token", "register_tokens")


def _encoder(model: Any) -> nn.Module | None:
    """The module holding a transformers vision encoder's embeddings and layers: the model, or
    the base model under its task head (``...ForImageClassification``)."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection, PreTrainedModel

    if isinstance(model, (CLIPModel, CLIPVisionModelWithProjection)):
        return model.vision_model
    if not isinstance(model, PreTrainedModel):
        return None
    return model.base_model


def _layer_class(encoder: nn.Module) -> type | None:
    recorded = getattr(type(encoder), "_can_record_outputs", None) or {}
    layer = recorded.get("hidden_states")
    return layer if isinstance(layer, type) else None


def _patch_projection(encoder: nn.Module) -> nn.Conv2d | None:
    embeddings = getattr(encoder, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        return None
    return next((m for m in embeddings.modules() if isinstance(m, nn.Conv2d)), None)


def _vision_module(model: Any) -> nn.Module | None:
    """The encoder of a model built like a ViT (patch-embedded image tokens, layers that record
    hidden states), or None."""
    encoder = _encoder(model)
    if encoder is None or type(encoder).__name__ in _REFUSED:
        return None
    if _layer_class(encoder) is None or _patch_projection(encoder) is None:
        return None
    if getattr(encoder.config, "window_size", None) is not None:
        return None  # windowed, hierarchical attention (Swin...): no single token grid
    return encoder


class TransformersViTAdapter(ViTAdapter):
    """Hugging Face ``ViTModel`` / ``ViTForImageClassification`` and CLIP's vision tower; every
    layer is a site. Progressive mode by default.

    Args:
        options: its ``ViTOptions`` (``mode``, ``proportional_attention``, ``merge_at``).
    """

    name = "transformers_vit"
    supported_names: ClassVar[tuple[str, ...]] = (
        "transformers vision encoders built like a ViT (ViTModel, DeiT, Dinov2 with or "
        "without registers, Siglip, CLIP's vision tower...) and their task heads",
    )

    @classmethod
    def supports(cls, model: Any) -> bool:
        return _vision_module(model) is not None

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        encoder = _encoder(model)
        return None if encoder is None else _REFUSED.get(type(encoder).__name__)

    def root(self, model: Any) -> nn.Module:
        # a CLIPModel is patched in its vision tower: the text tower shares the layer class
        return model.vision_model if type(model).__name__ == "CLIPModel" else model

    def find_blocks(self, root: nn.Module) -> list[ViTBlock]:
        encoder = _vision_module(root)
        layer_class = _layer_class(encoder)
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
        # the tokens the embeddings put in front of the patches: a class token (ViT, CLIP,
        # Dinov2), a distillation token (DeiT), register tokens (Dinov2 with registers); none
        # in Siglip
        embeddings = _vision_module(root).embeddings
        prefix = 0
        for name in _PREFIX_PARAMETERS:
            parameter = getattr(embeddings, name, None)
            if isinstance(parameter, torch.Tensor):
                prefix += parameter.shape[1] if parameter.dim() == 3 else 1
        if getattr(embeddings, "class_embedding", None) is not None:
            prefix += 1  # CLIP's class token: a (hidden,) vector
        return prefix

    def patch_projection(self, root: nn.Module) -> nn.Module:
        return _patch_projection(_vision_module(root))

    def attach_model(self, root: nn.Module, patches: list[SitePatch]) -> list[RemovableHandle]:
        handles = super().attach_model(root, patches)
        if self.carry is not None:
            # the module whose forward collects the recorded hidden states
            self.carry.keep_block_inputs()
            restore = _RestoreHiddenStates(self.carry)
            handles.append(_vision_module(root).register_forward_hook(restore))
        return handles


class _RestoreHiddenStates:
    """Forward hook restoring the recorded hidden states of a progressive patch to the full
    token set (a class, so ``copy.deepcopy`` copies it with the model)."""

    def __init__(self, carry: TokenCarry) -> None:
        self.carry = carry

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):  # return_dict=False: the states are the one tuple of tuples
            states = [i for i, v in enumerate(output) if isinstance(v, tuple)]
            if not states:
                self.carry.restore_states(())
                return None
            index = states[0]
            restored = self.carry.restore_states(output[index])
            return (*output[:index], restored, *output[index + 1 :])
        states = getattr(output, "hidden_states", None)
        restored = self.carry.restore_states(states if isinstance(states, tuple) else ())
        if isinstance(states, tuple):
            output.hidden_states = restored
        return None
