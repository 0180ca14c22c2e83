"""Tiny random-weight timm BEiT and NaFlexViT models (no downloads), three blocks, 8 x 8 patch
grids of 8 pixels at 64 pixels; seeded, in eval mode. Inputs: ``vit_models.pixels``.

BEiT starts its relative position bias tables at zero, where a bias cut to the wrong tokens
would go unseen, and NaFlexViT its LayerScale at ``1e-5``, where the blocks barely change the
tokens: the builders draw the tables at random and raise the LayerScale.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn
from vit_models import IMG, PATCH, TIMM_SMALL, _seeded


def _random_pair_biases(model: nn.Module, scale: float = 1.0) -> nn.Module:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_(0.0, scale)
    return model


def timm_beit(bias_scale: float = 1.0, **overrides: Any) -> nn.Module:
    """BEiT-base's architecture (LayerScale 0.1, no absolute position embeddings, average
    pooling) with the small overrides; relative position bias tables drawn at random."""
    options = {**TIMM_SMALL, "use_abs_pos_emb": False, **overrides}
    model = _seeded(lambda: timm.create_model("beit_base_patch16_224", **options))
    return _random_pair_biases(model, bias_scale)


def make_beit(**overrides: Any) -> nn.Module:
    """BEiT with a relative position bias per layer (``use_rel_pos_bias``, BEiT's own config),
    made inside each attention by its ``_get_rel_pos_bias`` method; 1 prefix token."""
    return timm_beit(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, **overrides)


def make_beit_shared(**overrides: Any) -> nn.Module:
    """BEiT with one relative position bias for the whole model (``use_shared_rel_pos_bias``),
    passed to every block as ``shared_rel_pos_bias=``; 1 prefix token."""
    return timm_beit(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, **overrides)


def make_beit_both(**overrides: Any) -> nn.Module:
    """BEiT with both the shared and the per-layer relative position biases; 1 prefix token."""
    return timm_beit(use_rel_pos_bias=True, use_shared_rel_pos_bias=True, **overrides)


def timm_naflexvit(**overrides: Any) -> nn.Module:
    """NaFlexViT-base's ``gap`` architecture (4 register tokens, no class token, average
    pooling, a linear patch embedding) with the small overrides and LayerScale 0.1."""
    options = dict(TIMM_SMALL, init_values=0.1)
    return _seeded(
        lambda: timm.create_model("naflexvit_base_patch16_gap", **{**options, **overrides})
    )


def make_naflexvit() -> nn.Module:
    """NaFlexViT: timm ``Block``s, learned position embeddings, 4 register tokens (4 prefix
    tokens), linear patch embedding."""
    return timm_naflexvit()


def make_naflexvit_rope() -> nn.Module:
    """NaFlexViT with axial rotary embeddings (``EvaBlock``s taking ``rope=``), a class token
    and 4 register tokens (5 prefix tokens), a convolutional patch embedding."""
    return timm_naflexvit(rope_type="axial", class_token=True, embed_proj_type="conv")


#: builder -> (prefix tokens, image size, patch size)
SHAPES = {
    make_beit: (1, IMG, PATCH),
    make_beit_shared: (1, IMG, PATCH),
    make_beit_both: (1, IMG, PATCH),
    make_naflexvit: (4, IMG, PATCH),
    make_naflexvit_rope: (5, IMG, PATCH),
}
