"""Hugging Face transformers vision encoders built like a ViT, by structure: patch-embedded
image tokens (a ``Conv2d`` in ``embeddings``), layers each with an attention holding ``k_proj``
(or a self-attention holding ``key``) and an ``mlp`` (or an ``intermediate`` layer). That covers
``ViTModel``, DeiT, Dinov2 (with or without registers), Siglip's vision model, the vision tower
of ``CLIPModel``, BEiT, Data2Vec-Vision, ViTMAE's encoder and their task heads
(``...ForImageClassification``, reached through ``base_model``). The protected prefix is read
from the embeddings: class, distillation and register tokens. Windowed models (a
``window_size`` in their config) are not claimed.

- Relative position biases (BEiT, Data2Vec-Vision): a ``(1, H, N0, N0)`` bias over the original
  tokens, from a ``...RelativePositionBias`` module or in a layer's ``attention_mask`` /
  ``relative_position_bias`` argument, is cut to the rows and columns of the tokens present
  (``adapters._vit.PairBiasCut``, ``cut_pair_arguments``).
- ViTMAE: the embeddings keep a random subset of the patches, shuffled; their ``ids_restore``
  output gives each token's grid position (``TokenLayout.positions``).

Layers are found by class, the one the model records hidden states from
(``type(model)._can_record_outputs["hidden_states"]``, else the class of ``encoder.layer``'s
items), inside the vision module only: a ``CLIPModel``'s text tower and ViTMAE's decoder use
the same layer class and are never touched. Native hooks only:

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

from tokenmerge.adapter import forward_parameters, parameter_index
from tokenmerge.adapters._vit import HeadMean, ViTAdapter, ViTBlock
from tokenmerge.errors import UnsupportedModelError
from tokenmerge.patch import SitePatch
from tokenmerge.progressive import ArgSpec, TokenCarry

__all__ = ["TransformersViTAdapter"]


#: the layer argument carrying an additive attention bias: a mask, or the shared relative
#: position bias of BEiT-style models whose layers take no mask (Data2Vec-Vision)
_MASK_ARGUMENTS = ("attention_mask", "relative_position_bias")
#: how the modules computing a relative position bias per pair of tokens end their class name
_PAIR_BIAS = "RelativePositionBias"
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
    """The class of the encoder's layers: the one it records hidden states from, or (models
    that collect them by hand, Data2Vec-Vision) the items of its ``encoder.layer`` list."""
    recorded = getattr(type(encoder), "_can_record_outputs", None) or {}
    layer = recorded.get("hidden_states")
    if isinstance(layer, type):
        return layer
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return type(layers[0])
    return None


def _patch_projection(encoder: nn.Module) -> nn.Conv2d | None:
    embeddings = getattr(encoder, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        return None
    return next((m for m in embeddings.modules() if isinstance(m, nn.Conv2d)), None)


def _vision_module(model: Any) -> nn.Module | None:
    """The encoder of a model built like a ViT (patch-embedded image tokens, layers that record
    hidden states), or None."""
    encoder = _encoder(model)
    if encoder is None:
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
        "without registers, Siglip, CLIP's vision tower, BEiT, Data2Vec-Vision, ViTMAE...) and "
        "their task heads",
    )

    @classmethod
    def supports(cls, model: Any) -> bool:
        return _vision_module(model) is not None

    def root(self, model: Any) -> nn.Module:
        # a CLIPModel is patched in its vision tower: the text tower shares the layer class
        return model.vision_model if type(model).__name__ == "CLIPModel" else model

    def find_blocks(self, root: nn.Module) -> list[ViTBlock]:
        encoder = _vision_module(root)
        layer_class = _layer_class(encoder)
        inside = set(encoder.modules())  # not a decoder of the same layer class (ViTMAE's)
        blocks = []
        for name, layer in root.named_modules():
            if isinstance(layer, layer_class) and layer in inside:
                blocks.append(self._block(name, layer))
        return blocks

    def _block(self, name: str, layer: nn.Module) -> ViTBlock:
        attn = getattr(layer, "attention", None) or getattr(layer, "self_attn", None)
        # a self-attention inside the attention module (Data2Vec-Vision: query / key / value)
        inner = getattr(attn, "attention", attn)
        keys_module = getattr(attn, "k_proj", None) or getattr(inner, "key", None)
        # an MLP module, or the first of the two a layer calls in turn (Data2Vec-Vision's
        # intermediate, then output)
        mlp = getattr(layer, "mlp", None) or getattr(layer, "intermediate", None)
        if not all(isinstance(m, nn.Module) for m in (attn, mlp, keys_module)):
            raise UnsupportedModelError(
                f"layer {name} ({type(layer).__name__}) has no attention k_proj / mlp "
                "sub-modules this adapter hooks; supported: " + ", ".join(self.supported_names)
            )
        heads = next(
            getattr(m, a) for m in (attn, inner) for a in ("num_attention_heads", "num_heads")
            if hasattr(m, a)
        )  # fmt: skip
        biases = tuple(m for m in layer.modules() if type(m).__name__.endswith(_PAIR_BIAS))
        mask = next(a for a in _MASK_ARGUMENTS if a in forward_parameters(type(layer)))
        return ViTBlock(
            name,
            layer,
            attn,
            mlp,
            keys_module,
            HeadMean(heads),
            ArgSpec(mask, parameter_index(type(layer), mask)),
            pair_biases=biases,
        )

    def pair_arguments(self) -> tuple[str, ...]:
        return _MASK_ARGUMENTS

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
        embeddings = _vision_module(root).embeddings
        if callable(getattr(embeddings, "random_masking", None)):
            handles.append(embeddings.register_forward_hook(self._read_kept_patches))
        if self.carry is not None:
            # the module whose forward collects the recorded hidden states
            self.carry.keep_block_inputs()
            restore = _RestoreHiddenStates(self.carry)
            handles.append(_vision_module(root).register_forward_hook(restore))
        return handles

    def _read_kept_patches(self, module: nn.Module, args: tuple, output: Any) -> None:
        """ViTMAE's embeddings keep a random subset of the patches, in random order, behind
        the class token, and return ``ids_restore``: the grid position of every token is the
        patch it came from."""
        tokens, ids_restore = output[0], output[-1]
        kept = tokens.shape[1] - self._num_prefix
        self._grids.value.positions = ids_restore.argsort(dim=1)[:, :kept]


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
