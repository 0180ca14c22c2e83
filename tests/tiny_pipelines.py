"""Tiny random-weight diffusers pipelines saved to folders, loadable offline with
``from_pretrained``: the stand-ins for downloaded checkpoints (docs examples, ``compare``)."""

from __future__ import annotations

from pathlib import Path


def tiny_stable_diffusion(folder: Path) -> Path:
    """A tiny random Stable Diffusion pipeline saved with ``save_pretrained``: the tiny-unet
    preset, a 4-level VAE (8x downsampling, like SD's), a character-level CLIP tokenizer and a
    1-layer CLIP text encoder. Loads offline with ``StableDiffusionPipeline.from_pretrained``."""
    import string

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tokenmerge_bench.presets import get_preset

    chars = list(string.ascii_lowercase + string.digits)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(specials + chars + [c + "</w>" for c in chars])}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,  # the tiny UNet's cross_attention_dim
                intermediate_size=37,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=128,
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
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
    pipe.save_pretrained(folder)
    return folder
