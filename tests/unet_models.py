"""The tiny diffusers UNet tests share (importable: pyproject puts tests/ on the path)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel, UNetSpatioTemporalConditionModel


def tiny_unet() -> UNet2DConditionModel:
    """A seeded random-weight UNet, 16 x 16 latents: attention at level 1 (``down_blocks.0``,
    ``up_blocks.1``) and in the mid block (level 2); text embeddings of width 32."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def tiny_unet2d(seed: int = 0, **extra) -> UNet2DModel:
    """A random-weight DDPM-style UNet (attention on feature maps), 16 x 16 samples of 3
    channels: attention at level 2 (``down_blocks.1``, the mid block, ``up_blocks.0``)."""
    torch.manual_seed(seed)
    options = dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    options.update(extra)
    return UNet2DModel(**options).eval()


def tiny_svd_unet() -> UNetSpatioTemporalConditionModel:
    """A seeded random-weight Stable Video Diffusion UNet: spatial and temporal attention at
    level 1, image embeddings of width 32, three added-time ids of 8 channels each."""
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(2, 4), in_channels=4, out_channels=4,
        projection_class_embeddings_input_dim=3 * 8, addition_time_embed_dim=8,
    ).eval()  # fmt: skip
