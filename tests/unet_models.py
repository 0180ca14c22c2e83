"""The tiny diffusers UNet tests share (importable: pyproject puts tests/ on the path)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


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
