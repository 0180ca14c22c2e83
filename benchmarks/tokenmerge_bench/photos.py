"""The bundled photographs, as images and as patch tokens, for benchmarks and fidelity checks.

Three of scikit-image's sample photographs, centre-cropped to squares and resized to 256 x 256,
stored as ``uint8`` tensors ``(3, 256, 256)`` so the core needs no image library to read them:
``astronaut`` (Eileen Collins, a NASA photograph in the public domain), ``coffee`` (CC0, Rachel
Michetti) and ``chelsea`` (a cat; CC0, Stefan van der Walt). Sources and licences of every
bundled photograph: ``tokenmerge_bench/data/PHOTOS.md``, shipped beside them.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

# torch is imported by the functions that need it: `tokenmerge --help` lists PHOTOS without it

__all__ = ["PHOTOS", "load_photo", "patch_tokens", "photo_tokens", "tokens_to_image"]

#: names of the bundled photographs, in the order benchmarks use them
PHOTOS = ("astronaut", "coffee", "chelsea")


def load_photo(name: str = "astronaut") -> Tensor:
    """A bundled photograph (one of ``PHOTOS``): ``uint8 (3, 256, 256)``.

    Example:
        >>> load_photo().shape, load_photo("coffee").dtype
        (torch.Size([3, 256, 256]), torch.uint8)
    """
    if name not in PHOTOS:
        raise ValueError(f"unknown photograph {name!r}; the bundled ones are {', '.join(PHOTOS)}")
    import torch

    with resources.files("tokenmerge_bench").joinpath(f"data/{name}_256.pt").open("rb") as handle:
        return torch.load(handle, weights_only=True)


def patch_tokens(image: Tensor, patch: int) -> tuple[Tensor, tuple[int, int]]:
    """Cut an image ``(3, H, W)`` into ``patch x patch`` pixel patches: tokens ``(1, N, 3 p^2)``
    in row-major grid order, values in [0, 1], and the grid ``(H / p, W / p)``.

    Example:
        >>> tokens, grid = patch_tokens(load_photo(), 8)
        >>> tokens.shape, grid
        (torch.Size([1, 1024, 192]), (32, 32))
    """
    import torch

    channels, height, width = image.shape
    if height % patch or width % patch:
        raise ValueError(f"image {height} x {width} does not divide into {patch}-pixel patches")
    grid = (height // patch, width // patch)
    pixels = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    tokens = pixels.reshape(channels, grid[0], patch, grid[1], patch)
    tokens = tokens.permute(1, 3, 0, 2, 4).reshape(1, grid[0] * grid[1], channels * patch * patch)
    return tokens, grid


def photo_tokens(side: int, channels: int, patch: int = 4, name: str = "astronaut") -> Tensor:
    """Tokens of a photograph and its mirror image on a ``side x side`` grid, batch 2:
    ``(2, side^2, channels)``, for benchmarks of one site.

    The photograph is resized to ``side * patch`` pixels (so every grid holds the whole image),
    cut into ``patch x patch``-pixel patches and projected to ``channels`` by a fixed random
    matrix (seed 0) scaled to keep the values' spread.

    Example:
        >>> photo_tokens(32, 320).shape
        torch.Size([2, 1024, 320])
    """
    import torch
    import torch.nn.functional as F

    photo = load_photo(name).float().div(255.0).unsqueeze(0)
    size = (side * patch, side * patch)
    image = F.interpolate(photo, size=size, mode="bilinear", antialias=True)[0].clamp(0.0, 1.0)
    pixels, _ = patch_tokens(image, patch)
    mirrored, _ = patch_tokens(image.flip(-1), patch)
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(pixels.shape[-1], channels, generator=generator)
    return torch.cat([pixels, mirrored]) @ projection.div(math.sqrt(pixels.shape[-1]))


def tokens_to_image(tokens: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """Inverse of ``patch_tokens`` for one sample: ``(1, N, 3 p^2) -> (3, H, W)``."""
    rows, cols = grid
    channels = tokens.shape[-1] // (patch * patch)
    image = tokens.reshape(rows, cols, channels, patch, patch).permute(2, 0, 3, 1, 4)
    return image.reshape(channels, rows * patch, cols * patch)
