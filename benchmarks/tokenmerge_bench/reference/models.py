"""The two reference models: their architectures, their inputs, and loading their weights.

- **The denoiser** is a small diffusers ``DiTTransformer2DModel`` (six blocks of four heads of
  32, adaLN-zero). It denoises 64 x 64 pixel images folded into a 16 x 16 "latent" of 48
  channels (each 4 x 4 pixel patch becomes one token, a lossless stand-in for a VAE), with
  patch size 1, so every self-attention sees 256 tokens. It is unconditional: every call passes
  class 0, its only class. (A first try with a small SD-shaped UNet learned nearly uniform
  attention - its convolutions did the work - so merging could not hurt it: useless here.)
- **The classifier** is a timm ``VisionTransformer``: 32 x 32 pixel crops in 8 x 8 patches of
  4 x 4 pixels (64 tokens and a class token), six blocks of four heads, 19 classes (which
  photograph the crop comes from).

Their weights were trained here by ``python benchmarks/train_reference.py`` and ship as fp16
safetensors in ``tokenmerge_bench/data``; ``load_denoiser`` and ``load_classifier`` build the
architecture and load them.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmerge.errors import UnknownNameError

# the configurations live in a module without torch (the presets list them for --help)
from .configs import CLASSIFIER_CONFIG, DENOISER_CONFIG, NOISE_SCHEDULE, PATCH

__all__ = [
    "CLASSIFIER_CONFIG",
    "DENOISER_CONFIG",
    "NOISE_SCHEDULE",
    "PATCH",
    "build_classifier",
    "build_denoiser",
    "build_reference",
    "class_condition",
    "fold",
    "load_classifier",
    "load_denoiser",
    "load_reference",
    "unfold",
    "weights_file",
]

_WEIGHTS = {
    "denoiser": "reference_denoiser.safetensors",
    "classifier": "reference_vit.safetensors",
    "digit-flux": "digit_flux.safetensors",
    "digit-dit": "digit_dit.safetensors",
    "digit-vit": "digit_vit.safetensors",
    "digit-judge": "digit_judge.safetensors",
}


def fold(images: Tensor) -> Tensor:
    """Images ``(B, 3, 64, 64)`` in [-1, 1] to the denoiser's input ``(B, 48, 16, 16)``."""
    return F.pixel_unshuffle(images, PATCH)


def unfold(latents: Tensor) -> Tensor:
    """The inverse of ``fold``."""
    return F.pixel_shuffle(latents, PATCH)


def class_condition(batch: int, device=None) -> Tensor:
    """The denoiser's class labels: class 0, its only class, for every sample."""
    return torch.zeros(batch, dtype=torch.long, device=device)


def build_denoiser() -> nn.Module:
    """The denoiser's architecture with fresh random weights (diffusers' initialisation)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DENOISER_CONFIG)


def build_classifier() -> nn.Module:
    """The classifier's architecture with fresh random weights (timm's initialisation). It
    takes crops standardised per channel (``tokenmerge_bench.reference.data.standardise``)."""
    import timm

    return timm.create_model(**CLASSIFIER_CONFIG)


def _known(kind: str) -> str:
    if kind not in _WEIGHTS:
        raise UnknownNameError(f"unknown reference model {kind!r}; there are {', '.join(_WEIGHTS)}")
    return kind


def build_reference(kind: str) -> nn.Module:
    """The architecture of ``kind`` (a key of ``_WEIGHTS``) with fresh random weights."""
    if _known(kind).startswith("digit-"):
        from .digits import build_digit_model

        return build_digit_model(kind)
    return build_denoiser() if kind == "denoiser" else build_classifier()


def weights_file(kind: str) -> Any:
    """The bundled weights of ``"denoiser"`` or ``"classifier"`` (an importlib resource)."""
    return resources.files("tokenmerge_bench").joinpath(f"data/{_WEIGHTS[_known(kind)]}")


def _load(model: nn.Module, file: Any, device, dtype) -> nn.Module:
    from safetensors.torch import load

    state = load(file.read_bytes())
    model.load_state_dict({name: value.float() for name, value in state.items()})
    return nn.Module.to(model.eval(), device=device, dtype=dtype)


def load_reference(kind: str, device: str | torch.device = "cpu", dtype=torch.float32):
    """``load_denoiser`` or ``load_classifier``, by ``kind``."""
    return _load(build_reference(kind), weights_file(kind), device, dtype)


def load_denoiser(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The trained reference denoiser, in eval mode (needs diffusers).

    Example:
        >>> dit = load_denoiser()
        >>> images, timesteps = torch.zeros(2, 3, 64, 64), torch.tensor([500, 500])
        >>> labels = class_condition(2)
        >>> dit(fold(images), timestep=timesteps, class_labels=labels).sample.shape
        torch.Size([2, 48, 16, 16])
    """
    return load_reference("denoiser", device, dtype)


def load_classifier(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The trained reference ViT classifier, in eval mode (needs timm).

    Example:
        >>> vit = load_classifier()
        >>> vit(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 19])
    """
    return load_reference("classifier", device, dtype)
