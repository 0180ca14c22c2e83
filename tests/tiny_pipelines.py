"""Tiny random-weight diffusers pipelines saved to folders, loadable offline with
``from_pretrained``: the stand-ins for downloaded checkpoints (docs examples, ``compare``).

Each has its real pipeline class and component classes, at tiny widths, with a character-level
CLIP tokenizer (a T5 tokenizer needs a vocabulary file that cannot be downloaded here, so the
FLUX.1 stand-in tokenizes its T5 prompt with the same character-level tokenizer)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

#: the tiny text encoders' width: the tiny UNet's cross_attention_dim
TEXT_WIDTH = 32


def _vocabulary() -> dict[str, int]:
    chars = list(string.ascii_lowercase + string.digits)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(specials + chars + [c + "</w>" for c in chars])}


def _tokenizer(max_length: int = 77) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_vocabulary(), merges=[], model_max_length=max_length)


def _clip_text(projection: bool = False, width: int = TEXT_WIDTH) -> Any:
    """A 1-layer CLIP text encoder (with a projection: SDXL's second encoder, FLUX.1's CLIP)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(_vocabulary()),
        hidden_size=width,
        intermediate_size=37,
        projection_dim=width,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _seeded(build: Any) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def tiny_stable_diffusion(folder: Path) -> Path:
    """A tiny random Stable Diffusion pipeline saved with ``save_pretrained``: the tiny-unet
    preset, a 4-level VAE (8x downsampling, like SD's), a character-level CLIP tokenizer and a
    1-layer CLIP text encoder. Loads offline with ``StableDiffusionPipeline.from_pretrained``."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from dit_pipelines import tiny_vae

    from tokenmerge_bench.presets import get_preset

    def build() -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=_clip_text(),
            tokenizer=_tokenizer(),
            unet=get_preset("tiny-unet").build(),
            scheduler=PNDMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                skip_prk_steps=True,
                steps_offset=1,
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    _seeded(build).save_pretrained(folder)
    return folder


def tiny_stable_diffusion_xl(folder: Path) -> Path:
    """A tiny random SDXL pipeline: SDXL's UNet layout (no attention at the first level, its
    text-and-time embedding) at tiny widths, two CLIP text encoders (the second with a
    projection), 256 px by default. Loads with ``StableDiffusionXLPipeline.from_pretrained``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from dit_pipelines import tiny_vae

    def build() -> StableDiffusionXLPipeline:
        unet = UNet2DConditionModel(
            sample_size=32,  # 256 px: 256 tokens at the level with attention, as min_tokens asks
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=2 * TEXT_WIDTH,  # the two encoders' states side by side
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8,  # pooled + 6 time ids
            use_linear_projection=True,
            norm_num_groups=8,
        )
        return StableDiffusionXLPipeline(
            vae=tiny_vae(),
            text_encoder=_clip_text(),
            text_encoder_2=_clip_text(projection=True),
            tokenizer=_tokenizer(),
            tokenizer_2=_tokenizer(),
            unet=unet,
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                timestep_spacing="leading",
                steps_offset=1,
            ),
        )

    _seeded(build).save_pretrained(folder)
    return folder


def tiny_flux(folder: Path) -> Path:
    """A tiny random FLUX.1-dev pipeline: ``dit_pipelines.make_flux``'s transformer (rotary
    positions, double- and single-stream blocks, distilled guidance), VAE and scheduler, with a
    CLIP and a 1-layer T5 text encoder. Loads with ``FluxPipeline.from_pretrained``; pass
    ``height`` and ``width`` (FLUX.1's default is 1024 px whatever the model)."""
    from diffusers import FluxPipeline
    from dit_pipelines import POOLED_DIM, TEXT_DIM, make_flux
    from transformers import T5Config, T5EncoderModel

    def build() -> FluxPipeline:
        parts = make_flux()
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(_vocabulary()),
                d_model=TEXT_DIM,
                d_kv=8,
                d_ff=37,
                num_layers=1,
                num_heads=4,
                pad_token_id=1,
            )
        )
        return FluxPipeline(
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=_clip_text(width=POOLED_DIM),  # its pooled output: the pooled embedding
            tokenizer=_tokenizer(),
            text_encoder_2=t5,
            tokenizer_2=_tokenizer(max_length=512),
            transformer=parts.transformer,
        )

    _seeded(build).save_pretrained(folder)
    return folder


def tiny_clip(folder: Path) -> Path:
    """A tiny random CLIP model and its processor (the character-level tokenizer, 32 px
    images), saved for ``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text = _clip_text().config.to_dict()
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=1, num_attention_heads=4)  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    _seeded(lambda: CLIPModel(config)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=_tokenizer()).save_pretrained(folder)
    return folder
