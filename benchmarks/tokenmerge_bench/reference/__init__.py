"""Reference models trained here on bundled photographs: a small DiT denoiser and a small
ViT classifier whose attention was learned, to measure what merging costs on real attention.

See ``docs/reference-models.md``.

The names below load their submodule (and torch) on first use, so importing
``tokenmerge_bench.reference.configs`` (which the bench's presets do for ``tokenmerge --help``)
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data import (
        DENOISER_HELD_OUT,
        REFERENCE_PHOTOS,
        classifier_held_out,
        denoiser_held_out,
        load_photo_set,
    )
    from .models import class_condition, fold, load_classifier, load_denoiser, unfold

#: each public name, with the submodule that holds it
_SUBMODULE = {
    "DENOISER_HELD_OUT": "data",
    "REFERENCE_PHOTOS": "data",
    "classifier_held_out": "data",
    "denoiser_held_out": "data",
    "load_photo_set": "data",
    "class_condition": "models",
    "fold": "models",
    "load_classifier": "models",
    "load_denoiser": "models",
    "unfold": "models",
}

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


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SUBMODULE[name]}", __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULE])
