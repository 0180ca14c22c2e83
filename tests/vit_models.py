"""Tiny random-weight vision transformers (timm and Hugging Face transformers) and their inputs.

Built from configs (no downloads), three blocks each, 8 x 8 patch grids by default; seeded, in
eval mode. Every family knows how to call its model on pixels and which tensors of the output to
compare. Shared by the ViT adapter tests and the conformance matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import Tensor, nn
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Data2VecVisionConfig,
    Data2VecVisionModel,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTModel,
)

BATCH = 2
DEPTH = 3
IMG = 64  # 8 x 8 patches of 8 pixels
PATCH = 8
EVA_IMG = 112  # 8 x 8 patches of 14 pixels (EVA-02's own patch size)
EVA_PATCH = 14
TEXT_TOKENS = 7
VOCAB = 100


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


# ---------------------------------------------------------------------------- timm

#: small overrides every timm ViT below shares
TIMM_SMALL = dict(
    pretrained=False,
    img_size=IMG,
    patch_size=PATCH,
    embed_dim=32,
    depth=DEPTH,
    num_heads=2,
    num_classes=10,
)


def timm_vit(name: str = "vit_tiny_patch16_224", **overrides: Any) -> nn.Module:
    """A timm model from its registered architecture with the small overrides (and more)."""
    return _seeded(lambda: timm.create_model(name, **{**TIMM_SMALL, **overrides}))


def make_vit(**overrides: Any) -> nn.Module:
    """Plain ViT: class token, class-token pooling."""
    return timm_vit(**overrides)


def make_deit_distilled() -> nn.Module:
    """DeiT distilled: class and distillation tokens (2 prefix tokens), two heads."""
    return timm_vit("deit_tiny_distilled_patch16_224")


def make_deit3() -> nn.Module:
    """DeiT-3: LayerScale (``init_values``), position embeddings not on the class token."""
    return timm_vit("deit3_small_patch16_224", init_values=0.1)


def make_qk_norm() -> nn.Module:
    return timm_vit(qk_norm=True)


def make_registers() -> nn.Module:
    """Class token and 4 register tokens (5 prefix tokens)."""
    return timm_vit(reg_tokens=4)


def make_registers_avg() -> nn.Module:
    """4 register tokens, no class token, average pooling of the image tokens."""
    return timm_vit(reg_tokens=4, class_token=False, global_pool="avg")


def make_dynamic() -> nn.Module:
    """``dynamic_img_size``: any input size, position embeddings resampled per call."""
    return timm_vit(dynamic_img_size=True)


def make_eva02(**overrides: Any) -> nn.Module:
    """EVA-02 tiny's architecture (rotary embeddings, SwiGLU, scale norm, average pooling) with
    three blocks, a narrower width and an 8 x 8 grid of its own 14-pixel patches."""
    options = dict(
        pretrained=False,
        img_size=EVA_IMG,
        depth=DEPTH,
        embed_dim=64,
        num_heads=2,
        num_classes=10,
    )
    return _seeded(lambda: timm.create_model("eva02_tiny_patch14_224", **{**options, **overrides}))


# ---------------------------------------------------------------------------- transformers


def vit_config(**overrides: Any) -> ViTConfig:
    options = dict(
        hidden_size=32,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMG,
        patch_size=PATCH,
        num_labels=10,
    )
    return ViTConfig(**{**options, **overrides})


def clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        image_size=IMG,
        patch_size=PATCH,
        projection_dim=16,
    )


def clip_text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def make_hf_vit_classifier() -> nn.Module:
    return _seeded(lambda: ViTForImageClassification(vit_config()))


def make_hf_vit() -> nn.Module:
    return _seeded(lambda: ViTModel(vit_config()))


def make_clip_vision() -> nn.Module:
    return _seeded(lambda: CLIPVisionModel(clip_vision_config()))


def make_clip_vision_projection() -> nn.Module:
    return _seeded(lambda: CLIPVisionModelWithProjection(clip_vision_config()))


def make_clip() -> nn.Module:
    config = CLIPConfig(
        text_config=clip_text_config().to_dict(),
        vision_config=clip_vision_config().to_dict(),
        projection_dim=16,
    )
    return _seeded(lambda: CLIPModel(config))


def make_clip_text() -> nn.Module:
    return _seeded(lambda: CLIPTextModel(clip_text_config()))


def _hf_small(config_class: type, **extra: Any) -> Any:
    """A tiny config of one of the ViT-like transformers encoders (DeiT, Dinov2, Siglip...)."""
    return config_class(
        hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=64,
        image_size=IMG, patch_size=PATCH, **extra,
    )  # fmt: skip


def make_hf_deit() -> nn.Module:
    """DeiT with its distillation token, under the classification head with a teacher."""
    return _seeded(lambda: DeiTForImageClassificationWithTeacher(_hf_small(DeiTConfig)))


def make_dinov2() -> nn.Module:
    return _seeded(lambda: Dinov2Model(_hf_small(Dinov2Config)))


def make_dinov2_registers() -> nn.Module:
    config = _hf_small(Dinov2WithRegistersConfig, num_register_tokens=2)
    return _seeded(lambda: Dinov2WithRegistersModel(config))


def make_siglip_vision() -> nn.Module:
    return _seeded(lambda: SiglipVisionModel(_hf_small(SiglipVisionConfig)))


def _random_pair_biases(model: nn.Module) -> nn.Module:
    """Relative position bias tables drawn at random (transformers starts them at zero, where
    a bias cut to the wrong tokens would go unseen)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_()
    return model


def make_hf_beit() -> nn.Module:
    """BEiT: a relative position bias in every layer and one shared by all of them."""
    config = _hf_small(
        BeitConfig, use_relative_position_bias=True, use_shared_relative_position_bias=True
    )
    return _random_pair_biases(_seeded(lambda: BeitForImageClassification(config)))


def make_data2vec_vision() -> nn.Module:
    """Data2Vec-Vision (as its checkpoints: a relative position bias inside every attention)."""
    config = _hf_small(Data2VecVisionConfig, use_relative_position_bias=True)
    return _random_pair_biases(_seeded(lambda: Data2VecVisionModel(config)))


def make_vit_mae() -> nn.Module:
    """ViTMAE for pre-training: an encoder on a random quarter of the patches, and a decoder
    of the same layer class on all of them (never merged)."""
    config = _hf_small(
        ViTMAEConfig, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64,
    )  # fmt: skip
    return _seeded(lambda: ViTMAEForPreTraining(config))


def mae_noise(batch: int, seed: int = 4) -> Tensor:
    """ViTMAE keeps the patches of the lowest noise: fixed noise, the same patches each call."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, (IMG // PATCH) ** 2, generator=g)


# ---------------------------------------------------------------------------- inputs


def pixels(batch: int = BATCH, size: int = IMG, seed: int = 1, width: int | None = None) -> Tensor:
    """Seeded random images ``(batch, 3, size, width or size)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, width or size, generator=g)


def text_ids(batch: int = BATCH, seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, TEXT_TOKENS), generator=g)


# ---------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """A tiny model family: how to build it and call it.

    Attributes:
        name: short name (test ids).
        build: builds the seeded tiny model.
        adapter: the adapter ``apply`` should choose.
        num_prefix: protected tokens in front of the image tokens.
        img: input side in pixels.
        patch: patch side in pixels.
        kept: image tokens the blocks receive, when not the whole grid (ViTMAE's quarter).
    """

    name: str
    build: Callable[[], nn.Module]
    adapter: str
    num_prefix: int
    img: int = IMG
    patch: int = PATCH
    kept: int | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return self.img // self.patch, self.img // self.patch

    @property
    def image_tokens(self) -> int:
        return self.kept or self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> int:
        return self.num_prefix + self.image_tokens

    def inputs(self, batch: int = BATCH, seed: int = 1) -> Tensor:
        return pixels(batch, self.img, seed)

    def call(self, model: nn.Module, images: Tensor, **kwargs: Any) -> Any:
        """The model's raw output on ``images``."""
        if self.name == "clip":
            ids = text_ids(images.shape[0])
            return model(input_ids=ids, pixel_values=images, **kwargs)
        if self.name == "vit_mae":
            kwargs = {"noise": mae_noise(images.shape[0]), **kwargs}
        if self.adapter == "transformers_vit":
            return model(pixel_values=images, **kwargs)
        return model(images, **kwargs)

    def run(self, model: nn.Module, images: Tensor | None = None) -> tuple[Tensor, ...]:
        """The output tensors that matter, computed without gradients."""
        images = self.inputs() if images is None else images
        with torch.no_grad():
            return outputs(self.call(model, images))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The blocks (layers) of the vision stack, in order."""
        if self.adapter == "timm_vit":
            return list(model.blocks)
        module = vision_module(model)
        recorded = type(module)._can_record_outputs
        if recorded is None:  # Data2Vec-Vision collects its hidden states by hand
            return list(module.encoder.layer)
        return [m for m in module.modules() if isinstance(m, recorded["hidden_states"])]


def vision_module(model: nn.Module) -> nn.Module:
    """The module holding the vision embeddings and encoder of a transformers model."""
    if isinstance(model, (CLIPModel, CLIPVisionModelWithProjection)):
        return model.vision_model
    return model.base_model  # ViTModel, DeiT..., or the encoder under a task head


def outputs(output: Any) -> tuple[Tensor, ...]:
    """The tensors of a model output (a tensor, or a transformers ``ModelOutput``), nested
    outputs (CLIP's text and vision outputs) and hidden-state tuples left out."""
    if isinstance(output, Tensor):
        return (output,)
    return tuple(v for v in output.values() if isinstance(v, Tensor))


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("vit", make_vit, "timm_vit", 1),
        Family("deit_distilled", make_deit_distilled, "timm_vit", 2),
        Family("deit3", make_deit3, "timm_vit", 1),
        Family("qk_norm", make_qk_norm, "timm_vit", 1),
        Family("registers", make_registers, "timm_vit", 5),
        Family("registers_avg", make_registers_avg, "timm_vit", 4),
        Family("dynamic", make_dynamic, "timm_vit", 1),
        Family("eva02", make_eva02, "timm_vit", 1, EVA_IMG, EVA_PATCH),
        Family("hf_vit_classifier", make_hf_vit_classifier, "transformers_vit", 1),
        Family("hf_vit", make_hf_vit, "transformers_vit", 1),
        Family("clip_vision", make_clip_vision, "transformers_vit", 1),
        Family("clip_vision_projection", make_clip_vision_projection, "transformers_vit", 1),
        Family("clip", make_clip, "transformers_vit", 1),
        Family("hf_deit", make_hf_deit, "transformers_vit", 2),
        Family("dinov2", make_dinov2, "transformers_vit", 1),
        Family("dinov2_registers", make_dinov2_registers, "transformers_vit", 3),
        Family("siglip_vision", make_siglip_vision, "transformers_vit", 0),
        Family("hf_beit", make_hf_beit, "transformers_vit", 1),
        Family("data2vec_vision", make_data2vec_vision, "transformers_vit", 1),
        Family("vit_mae", make_vit_mae, "transformers_vit", 1, kept=(IMG // PATCH) ** 2 // 4),
    )
}
