"""Tiny seeded random builds of timm's hierarchical / windowed models, for the
``timm_hierarchical`` adapter's tests and the conformance matrix.

timm initialises some layers to zero or near zero (LeViT's and EfficientViT-MSRA's last
BatchNorm of each MLP, Swin-v2's post-norms, layer scales), which would hide what merging
changes; ``build`` draws those at random too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class Tiny:
    """A tiny build of a timm model: ``timm.create_model(name, **kwargs)`` at ``img`` pixels."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    img: int = 64


#: one tiny build per supported class, and per MLP layout (tokens, channels-last, channels-first)
FAMILIES = {
    "swin": Tiny(
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "img_size": 56},
        56,
    ),
    "swinv2": Tiny(
        "swinv2_tiny_window8_256",
        {"embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "img_size": 64, "window_size": 8},
    ),
    "swinv2_cr": Tiny(
        "swinv2_cr_tiny_224",
        {"embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "img_size": 56, "window_size": 7},
        56,
    ),
    # MaxViT: MBConv blocks (no MLP) and window / grid partition attention, channels-last Mlp
    "maxvit": Tiny(
        "maxvit_nano_rw_256",
        {
            "embed_dim": (16, 32),
            "depths": (1, 1),
            "stem_width": 16,
            "img_size": 64,
            "transformer_dim_head": 8,
            "transformer_partition_ratio": 8,
        },
    ),
    # MaxViT with NCHW partition attention: a 1 x 1 ConvMlp on (B, C, H, W)
    "maxvit_nchw": Tiny(
        "maxvit_nano_rw_256",
        {
            "embed_dim": (16, 32),
            "depths": (1, 1),
            "stem_width": 16,
            "img_size": 64,
            "transformer_dim_head": 8,
            "transformer_partition_ratio": 8,
            "transformer_use_nchw_attn": True,
        },
    ),
    # MaxViT's parallel blocks: window and grid attention side by side, one Mlp
    "maxvit_parallel": Tiny(
        "maxvit_tiny_pm_256",
        {
            "embed_dim": (16, 32),
            "depths": (1, 1),
            "stem_width": 16,
            "img_size": 64,
            "transformer_dim_head": 8,
            "transformer_partition_ratio": 8,
        },
    ),
    # MaxxViT-v2: ConvNeXt blocks (1 x 1 ConvMlp, NCHW) and grid partition attention
    "maxxvitv2": Tiny(
        "maxxvitv2_nano_rw_256",
        {
            "embed_dim": (16, 32),
            "depths": (1, 1),
            "stem_width": 16,
            "img_size": 64,
            "transformer_dim_head": 8,
            "transformer_partition_ratio": 8,
        },
    ),
    # CoAtNet: TransformerBlock2d, global attention and a 1 x 1 ConvMlp on NCHW
    "coatnet": Tiny(
        "coatnet_nano_rw_224",
        {
            "embed_dim": (16, 16, 32, 32),
            "depths": (1, 1, 1, 1),
            "stem_width": 16,
            "img_size": 128,
            "transformer_dim_head": 8,
        },
        128,
    ),
    "levit": Tiny(
        "levit_128s",
        {"embed_dim": (32, 48), "depth": (2, 2), "num_heads": (2, 3), "key_dim": 8, "img_size": 96},
        96,
    ),
    "levit_conv": Tiny(
        "levit_conv_128s",
        {"embed_dim": (32, 48), "depth": (1, 1), "num_heads": (2, 3), "key_dim": 8, "img_size": 96},
        96,
    ),
    "sam": Tiny(
        "samvit_base_patch16",
        {
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "img_size": 128,
            "window_size": 4,
            "global_attn_indexes": (1,),
            "neck_chans": 16,
        },
        128,
    ),
    "efficientvit_msra": Tiny(
        "efficientvit_m0",
        {
            "embed_dim": (16, 32),
            "depth": (1, 1),
            "num_heads": (2, 2),
            "key_dim": (4, 4),
            "window_size": (4, 4),
            "img_size": 96,
            "down_ops": (("", 1), ("subsample", 2)),
        },
        96,
    ),
}

#: every supported class, and the family standing for it above
CLASSES = {
    "SwinTransformer": "swin",
    "SwinTransformerV2": "swinv2",
    "SwinTransformerV2Cr": "swinv2_cr",
    "MaxxVit": "maxvit",
    "Levit": "levit",
    "VisionTransformerSAM": "sam",
    "EfficientVitMsra": "efficientvit_msra",
}

#: timm classes refused, a tiny build of each and the layer the refusal names
REFUSED = {
    "PyramidVisionTransformerV2": (
        Tiny("pvt_v2_b0", {"embed_dims": (16, 32), "depths": (1, 1), "num_heads": (1, 2)}),
        "mlp.dwconv",
    ),
    "EfficientVit": (
        Tiny("efficientvit_b0", {"widths": (8, 8, 16, 16, 32), "depths": (1, 1, 1, 1, 1)}),
        "depth_conv",
    ),
    "EfficientVitLarge": (
        Tiny("efficientvit_l1", {"widths": (8, 8, 16, 16, 32), "depths": (1, 1, 1, 1, 1)}),
        "depth_conv",
    ),
}


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Draw the layers timm starts at zero or one (norms, layer scales, BatchNorm statistics)
    at random, so that every MLP's output, hence every merge, shows in the model's output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 1:
                continue
            if name.endswith(("weight", "gamma")):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.running_mean is not None:
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)


def build(tiny: Tiny, num_classes: int = 10) -> nn.Module:
    """The tiny model, seeded, with ``_randomize``'s draws, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(
            tiny.name, pretrained=False, num_classes=num_classes, **tiny.kwargs
        )
    _randomize(model)
    return model.eval()


def pixels(tiny: Tiny, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, tiny.img, tiny.img, generator=generator)


def runner(tiny: Tiny) -> Callable[[nn.Module], torch.Tensor]:
    x = pixels(tiny)
    return lambda model: model(x)
