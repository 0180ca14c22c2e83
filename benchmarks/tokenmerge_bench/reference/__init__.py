"""Reference models trained here on bundled photographs: a small DiT denoiser and a small
ViT classifier whose attention was learned, to measure what merging costs on real attention.

See ``docs/reference-models.md``.
"""

from .data import (
    DENOISER_HELD_OUT,
    REFERENCE_PHOTOS,
    classifier_held_out,
    denoiser_held_out,
    load_photo_set,
)
from .models import class_condition, fold, load_classifier, load_denoiser, unfold

__all__ = [
    "DENOISER_HELD_OUT",
    "class_condition",
    "REFERENCE_PHOTOS",
    "classifier_held_out",
    "denoiser_held_out",
    "fold",
    "load_classifier",
    "load_denoiser",
    "load_photo_set",
    "unfold",
]
