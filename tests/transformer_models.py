"""Tiny random-weight models of the DiT family (DiT, PixArt, SD3 / SD 3.5, Flux) and their inputs.

Three blocks each (two double- and two single-stream blocks for Flux), so the first / middle /
last depth stages all exist; image tokens on an 8 x 6 grid by default (DiT: square only).
Shared by the adapter tests and the conformance matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from torch import Tensor, nn

BATCH = 2


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def make_dit() -> nn.Module:
    return _seeded(
        lambda: DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
            num_layers=3, sample_size=16, num_embeds_ada_norm=10,
        )
    )  # fmt: skip


def make_pixart() -> nn.Module:
    return _seeded(
        lambda: PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
            num_layers=3, sample_size=16, cross_attention_dim=16, caption_channels=12,
            use_additional_conditions=False,
        )
    )  # fmt: skip


def make_sd3() -> nn.Module:
    return _seeded(
        lambda: SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
            caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16,
            dual_attention_layers=(0,),
        )
    )  # fmt: skip


def make_flux() -> nn.Module:
    return _seeded(
        lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
            pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
        )
    )  # fmt: skip


def flux_ids(height: int, width: int) -> Tensor:
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


def inputs(family: str, batch: int = BATCH, grid: tuple[int, int] = (8, 6)) -> dict[str, Any]:
    """Seeded inputs of one model call; ``grid`` is the image-token grid (DiT: square only)."""
    g = torch.Generator().manual_seed(1)
    h, w = grid
    t = torch.full((batch,), 500.0)
    if family == "dit":
        return {
            "hidden_states": torch.randn(batch, 4, 2 * h, 2 * h, generator=g),
            "timestep": t.long(),
            "class_labels": torch.arange(batch) % 10,
        }
    if family == "pixart":
        return {
            "hidden_states": torch.randn(batch, 4, 2 * h, 2 * w, generator=g),
            "encoder_hidden_states": torch.randn(batch, 7, 12, generator=g),
            "timestep": t.long(),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    if family == "sd3":
        return {
            "hidden_states": torch.randn(batch, 4, 2 * h, 2 * w, generator=g),
            "encoder_hidden_states": torch.randn(batch, 7, 12, generator=g),
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "timestep": t,
        }
    return {
        "hidden_states": torch.randn(batch, h * w, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
        "pooled_projections": torch.randn(batch, 8, generator=g),
        "timestep": t / 1000,
        "img_ids": flux_ids(h, w),
        "txt_ids": torch.zeros(5, 3),
    }


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "dit": make_dit,
    "pixart": make_pixart,
    "sd3": make_sd3,
    "flux": make_flux,
}


def run(model: nn.Module, kwargs: dict[str, Any]) -> Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def image_tokens(family: str, grid: tuple[int, int] = (8, 6)) -> int:
    return grid[0] * grid[0] if family == "dit" else grid[0] * grid[1]
