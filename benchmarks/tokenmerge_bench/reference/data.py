"""The photographs the reference models learn from, and the crops they see.

Nineteen photographs that scikit-image and scikit-learn ship (natural scenes, textures,
microscopy, astronomy, text), centre-cropped to squares and resized to 128 x 128, are bundled as
one ``uint8`` tensor (``tokenmerge_bench/data/reference_photos.pt``, 0.9 MB) so that loading the
models and measuring them needs neither library. ``build_photo_set`` rebuilds that file from the
libraries (the tests check that it matches when they are installed). Where each photograph comes
from and its licence (two are CC BY 2.0, attributed there): ``tokenmerge_bench/data/PHOTOS.md``.

Two splits, one per model:

- the **denoiser** trains on random crops of 16 photographs and is measured on crops of three
  it never saw (``DENOISER_HELD_OUT``);
- the **classifier** names the photograph a 32 x 32 crop comes from (19 classes): it trains on
  crops from the top 92 rows of every photograph and is measured on crops of the bottom 32 rows,
  which it never saw. Every crop is standardised per channel (``standardise``), so the mean
  colour and contrast of a photograph give nothing away: the classifier has to read texture and
  structure, which is what merging tokens can destroy. (A first classifier trained on raw crops
  leaned on colour statistics, which averaging tokens keeps: merging 80 % of its tokens at
  random cost it almost nothing.)
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CLASSIFIER_CROP",
    "DENOISER_CROP",
    "DENOISER_HELD_OUT",
    "PHOTO_SIZE",
    "REFERENCE_PHOTOS",
    "build_photo_set",
    "classifier_batch",
    "classifier_held_out",
    "denoiser_batch",
    "denoiser_held_out",
    "load_photo_set",
    "reference_photo",
    "standardise",
]

#: (name, library): the photographs, in class order; grey ones are repeated over three channels
REFERENCE_PHOTOS = (
    ("astronaut", "skimage"),
    ("brick", "skimage"),
    ("camera", "skimage"),
    ("cell", "skimage"),
    ("chelsea", "skimage"),
    ("clock", "skimage"),
    ("coffee", "skimage"),
    ("coins", "skimage"),
    ("grass", "skimage"),
    ("gravel", "skimage"),
    ("hubble_deep_field", "skimage"),
    ("immunohistochemistry", "skimage"),
    ("moon", "skimage"),
    ("page", "skimage"),
    ("retina", "skimage"),
    ("rocket", "skimage"),
    ("text", "skimage"),
    ("china", "sklearn"),
    ("flower", "sklearn"),
)
#: side of every stored photograph, in pixels
PHOTO_SIZE = 128
#: photographs the denoiser never trains on: a cat, a flower, a man with a camera
DENOISER_HELD_OUT = ("chelsea", "flower", "camera")
#: the denoiser sees 64 x 64 pixel crops (16 x 16 tokens of 4 x 4 pixels)
DENOISER_CROP = 64
#: the classifier sees 32 x 32 pixel crops (8 x 8 patches of 4 x 4 pixels)
CLASSIFIER_CROP = 32
#: classifier crops train on rows [0, 92) and are measured on rows [96, 128) of each photograph
_TRAIN_ROWS = 92
_HELD_OUT_ROW = PHOTO_SIZE - CLASSIFIER_CROP
_FILE = "data/reference_photos.pt"
_NAMES = [name for name, _ in REFERENCE_PHOTOS]


def build_photo_set() -> Tensor:
    """The photographs from scikit-image and scikit-learn: ``uint8 (19, 3, 128, 128)``.

    Each is centre-cropped to a square and resized with antialiasing; grey ones are repeated
    over the three channels.
    """
    try:
        import skimage.data
        from sklearn.datasets import load_sample_image
    except ImportError as exc:
        raise ImportError(
            "rebuilding the reference photographs needs scikit-image and scikit-learn: "
            'pip install -e "benchmarks[train]" in a tokenmerge checkout'
        ) from exc
    photos = []
    for name, library in REFERENCE_PHOTOS:
        array = (
            getattr(skimage.data, name)()
            if library == "skimage"
            else load_sample_image(f"{name}.jpg")
        )
        image = torch.as_tensor(array.copy())
        image = image[..., None].expand(-1, -1, 3) if image.ndim == 2 else image[..., :3]
        image = image.permute(2, 0, 1).float()
        height, width = image.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = image[None, :, top : top + side, left : left + side]
        resized = F.interpolate(square, size=PHOTO_SIZE, mode="bilinear", antialias=True)
        photos.append(resized[0].round().clamp(0, 255).to(torch.uint8))
    return torch.stack(photos)


def load_photo_set() -> Tensor:
    """The bundled photographs: ``uint8 (19, 3, 128, 128)`` in ``REFERENCE_PHOTOS`` order."""
    with resources.files("tokenmerge_bench").joinpath(_FILE).open("rb") as handle:
        return torch.load(handle, weights_only=True)


def reference_photo(name: str) -> Tensor:
    """One photograph of the set by name, in [-1, 1]: ``(3, 128, 128)``."""
    if name not in _NAMES:
        raise ValueError(f"unknown reference photograph {name!r}; the set has {', '.join(_NAMES)}")
    return _to_unit(load_photo_set()[_index((name,))[0]])


def _index(names: tuple[str, ...]) -> list[int]:
    return [_NAMES.index(name) for name in names]


def _to_unit(pixels: Tensor) -> Tensor:
    """``uint8`` pixels to floats in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def _random_crops(
    photos: Tensor, count: int, out: int, sides: tuple[int, int], rows: int, generator
) -> tuple[Tensor, Tensor]:
    """``count`` random square crops (side drawn from ``sides``, top-left within the first
    ``rows`` rows), resized to ``out`` and flipped half the time; and which photograph each is
    from."""
    which = torch.randint(len(photos), (count,), generator=generator)
    side = torch.randint(sides[0], sides[1] + 1, (count,), generator=generator)
    unit = torch.rand(count, 3, generator=generator)
    crops = []
    for i in range(count):
        s = int(side[i])
        top = int(unit[i, 0] * (rows - s + 1))
        left = int(unit[i, 1] * (PHOTO_SIZE - s + 1))
        crop = _to_unit(photos[which[i], :, top : top + s, left : left + s])[None]
        if s != out:
            crop = F.interpolate(crop, size=out, mode="bilinear", antialias=True)
        crops.append(crop.flip(-1) if unit[i, 2] < 0.5 else crop)
    return torch.cat(crops), which


def denoiser_batch(photos: Tensor, batch: int, generator: torch.Generator) -> Tensor:
    """A training batch for the denoiser: random crops (64 to 128 pixels, resized to 64) of the
    training photographs, flipped half the time; ``(batch, 3, 64, 64)`` in [-1, 1]."""
    held_out = _index(DENOISER_HELD_OUT)
    keep = [i for i in range(len(photos)) if i not in held_out]
    crops, _ = _random_crops(
        photos[keep], batch, DENOISER_CROP, (DENOISER_CROP, PHOTO_SIZE), PHOTO_SIZE, generator
    )
    return crops


def denoiser_held_out(photos: Tensor) -> Tensor:
    """The denoiser's held-out images: from each held-out photograph, the whole photograph
    resized to 64 and its four 64 x 64 quadrants, each also mirrored; ``(30, 3, 64, 64)``."""
    images = []
    for index in _index(DENOISER_HELD_OUT):
        photo = _to_unit(photos[index])[None]
        images.append(F.interpolate(photo, size=DENOISER_CROP, mode="bilinear", antialias=True))
        for top in (0, DENOISER_CROP):
            for left in (0, DENOISER_CROP):
                images.append(photo[..., top : top + DENOISER_CROP, left : left + DENOISER_CROP])
    images = torch.cat(images)
    return torch.cat([images, images.flip(-1)])


def standardise(crops: Tensor) -> Tensor:
    """Each crop ``(B, 3, H, W)`` shifted and scaled to zero mean and unit spread per channel
    (the spread floored at 0.1, so flat crops are not blown up into noise)."""
    mean = crops.mean(dim=(-2, -1), keepdim=True)
    spread = crops.std(dim=(-2, -1), keepdim=True).clamp_min(0.1)
    return (crops - mean) / spread


def classifier_batch(
    photos: Tensor, batch: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A training batch for the classifier: random crops (32 to 64 pixels, resized to 32) from
    the top 92 rows of every photograph, flipped half the time, standardised; and their
    photograph's index."""
    crops, labels = _random_crops(
        photos,
        batch,
        CLASSIFIER_CROP,
        (CLASSIFIER_CROP, 2 * CLASSIFIER_CROP),
        _TRAIN_ROWS,
        generator,
    )
    return standardise(crops), labels


def classifier_held_out(photos: Tensor) -> tuple[Tensor, Tensor]:
    """The classifier's held-out crops: 32 x 32 crops of each photograph's bottom 32 rows (13
    positions 8 pixels apart, each also mirrored), standardised, and their labels; 494 crops for
    19 classes."""
    crops, labels = [], []
    for index in range(len(photos)):
        band = _to_unit(photos[index, :, _HELD_OUT_ROW:])
        for left in range(0, PHOTO_SIZE - CLASSIFIER_CROP + 1, 8):
            crop = band[:, :, left : left + CLASSIFIER_CROP]
            crops += [crop, crop.flip(-1)]
            labels += [index, index]
    return standardise(torch.stack(crops)), torch.tensor(labels)
