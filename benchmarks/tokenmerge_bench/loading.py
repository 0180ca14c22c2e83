"""Load a model from a local checkpoint folder, for ``tokenmerge bench --model PATH``.

Nothing is downloaded: every loader reads the folder alone (``local_files_only=True`` where the
library takes it). The folder's files decide the library:

- ``model_index.json``: a diffusers pipeline; its ``unet`` (or else ``transformer``) is patched.
- ``config.json`` with ``_class_name``: a single diffusers model (a UNet, a DiT...).
- ``config.json`` with ``architecture``: a timm model written by ``timm.models.save_for_hf``.
- ``config.json`` with ``model_type``: a transformers model written by ``save_pretrained``.

The model libraries are imported only here, inside the functions, so the core imports without them.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenmerge.errors import ModelLoadError, close_matches

__all__ = ["LoadedModel", "load_model"]

_SAVERS = {
    "diffusers": "save_pretrained()",
    "timm": "timm.models.save_for_hf()",
    "transformers": "save_pretrained()",
}
_EXPECTED = (
    "expected a diffusers pipeline (model_index.json), a diffusers model, a timm or a "
    "transformers checkpoint (config.json)"
)
_HOW_TO_SAVE = "save one with save_pretrained() / timm's save_for_hf()"


@dataclass
class LoadedModel:
    """A model loaded from a local folder, ready to patch.

    Args:
        model: the module to patch (for a diffusers pipeline folder: its unet or transformer).
        library: ``"diffusers"``, ``"timm"`` or ``"transformers"``.
        description: one line naming the class, the folder and how it was found.
        pipeline: the whole diffusers pipeline when the folder held one, else None.
    """

    model: nn.Module
    library: str
    description: str
    pipeline: object | None = None


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load the model saved in a local folder, never downloading anything.

    Args:
        path: a folder written by diffusers' ``save_pretrained`` (a pipeline or a single model),
            timm's ``save_for_hf`` or transformers' ``save_pretrained``.
        dtype: the parameter dtype, for example ``torch.float16``. None keeps each library's own
            default: float32 for diffusers and timm, the dtype stored in the checkpoint for
            transformers 5.

    Returns:
        The model to patch (in eval mode), its library, a one-line description and, for a
        diffusers pipeline folder, the whole pipeline.

    Raises:
        ModelLoadError: the path is missing or not a folder, its format is not recognised, the
            library it needs is not installed, or loading failed (missing or corrupt files; the
            library's own error is chained).

    Example:
        >>> load_model("/no/such/folder")
        Traceback (most recent call last):
        ...
        tokenmerge.errors.ModelLoadError: /no/such/folder does not exist: ...
    """
    shown = os.fspath(path)
    folder = Path(shown)
    if not folder.exists():
        raise ModelLoadError(
            f"{shown} does not exist: {_EXPECTED} in a folder; check the path, or {_HOW_TO_SAVE}"
        )
    if not folder.is_dir():
        raise ModelLoadError(
            f"{shown} is a file, not a folder: {_EXPECTED} in a folder; pass the folder that "
            f"holds the checkpoint, or {_HOW_TO_SAVE}"
        )
    folder = folder.resolve()
    if (folder / "model_index.json").is_file():
        loaded = _load_pipeline(folder, shown, dtype)
    elif (folder / "config.json").is_file():
        config = _read_json(folder / "config.json", shown)
        if "_class_name" in config:
            loaded = _load_diffusers_model(folder, shown, config, dtype)
        elif "architecture" in config:
            loaded = _load_timm(folder, shown, config, dtype)
        elif "model_type" in config:
            loaded = _load_transformers(folder, shown, config, dtype)
        else:
            raise ModelLoadError(
                f"{shown} holds no loadable model: its config.json has none of the keys "
                f"_class_name (diffusers), architecture (timm) or model_type (transformers); "
                f"{_EXPECTED}; {_HOW_TO_SAVE}"
            )
    else:
        raise ModelLoadError(f"{shown} holds no loadable model: {_EXPECTED}; {_HOW_TO_SAVE}")
    loaded.model.eval()
    return loaded


def _load_pipeline(folder: Path, shown: str, dtype: torch.dtype | None) -> LoadedModel:
    diffusers = _import("diffusers", shown)
    index = _read_json(folder / "model_index.json", shown)
    # A component saved as None (a pipeline without its text encoder, say) is written as
    # [null, null], and from_pretrained refuses such a folder unless it is passed as None again.
    absent = {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and all(v is None for v in value)
    }
    with _wrapping("diffusers pipeline", shown, "diffusers"):
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            str(folder), local_files_only=True, **_dtype_kwargs(dtype), **absent
        )
    for component in ("unet", "transformer"):
        model = getattr(pipe, component, None)
        if isinstance(model, nn.Module):
            return LoadedModel(
                model=model,
                library="diffusers",
                description=f"{type(model).__name__} from {shown} "
                f"(diffusers pipeline {type(pipe).__name__}, component {component})",
                pipeline=pipe,
            )
    components = ", ".join(sorted(getattr(pipe, "components", {}))) or "(none)"
    raise ModelLoadError(
        f"the diffusers pipeline {type(pipe).__name__} in {shown} has no unet or transformer "
        f"component to patch (its components: {components}); pass a pipeline whose denoiser is "
        f"a unet or a transformer, or the denoiser's own folder"
    )


def _load_diffusers_model(
    folder: Path, shown: str, config: dict[str, Any], dtype: torch.dtype | None
) -> LoadedModel:
    diffusers = _import("diffusers", shown)
    name = config["_class_name"]
    cls = None
    if isinstance(name, str) and name.isidentifier():
        with _wrapping(f"diffusers class {name!r}", shown, "diffusers"):
            cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        matches = close_matches(str(name), [n for n in dir(diffusers) if not n.startswith("_")])
        hint = f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""
        raise ModelLoadError(
            f"unknown diffusers model class {name!r} in {shown}/config.json (_class_name): "
            f"expected a model class of diffusers {diffusers.__version__}, such as "
            f"UNet2DConditionModel or DiTTransformer2DModel{hint}; fix _class_name, upgrade "
            f"diffusers, or re-save the model with save_pretrained()"
        )
    with _wrapping(f"diffusers model {name}", shown, "diffusers"):
        model = cls.from_pretrained(str(folder), local_files_only=True, **_dtype_kwargs(dtype))
    return LoadedModel(
        model=model, library="diffusers", description=f"{name} from {shown} (diffusers model)"
    )


def _load_timm(
    folder: Path, shown: str, config: dict[str, Any], dtype: torch.dtype | None
) -> LoadedModel:
    timm = _import("timm", shown)
    arch = config["architecture"]
    if not (isinstance(arch, str) and timm.is_model(arch)):
        matches = close_matches(str(arch), timm.list_models())
        hint = f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""
        raise ModelLoadError(
            f"unknown timm architecture {arch!r} in {shown}/config.json: expected a model name "
            f"of timm {timm.__version__} (see timm.list_models()){hint}; fix architecture, "
            f"upgrade timm, or re-save the model with timm.models.save_for_hf()"
        )
    # timm's own "local-dir:" source rebuilds the saved variant from config.json's model_args
    # (depth, img_size, patch_size...) and loads the weights strictly. create_model(arch,
    # pretrained_cfg_overlay=dict(file=...)) would build the registry default instead and load
    # non-strictly: a 2-block export became a 12-block model with 10 random blocks.
    with _wrapping(f"timm model {arch!r}", shown, "timm"):
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        if dtype is not None:
            model = model.to(dtype)
    return LoadedModel(
        model=model,
        library="timm",
        description=f"{type(model).__name__} {arch!r} from {shown} (timm)",
    )


def _load_transformers(
    folder: Path, shown: str, config: dict[str, Any], dtype: torch.dtype | None
) -> LoadedModel:
    transformers = _import("transformers", shown)
    architectures = config.get("architectures") or [None]
    name = architectures[0] if isinstance(architectures, list) else None
    cls = None
    if isinstance(name, str) and name.isidentifier():
        with _wrapping(f"transformers class {name!r}", shown, "transformers"):
            cls = getattr(transformers, name, None)
    how = ""
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        cls = transformers.AutoModel
        how = ", via AutoModel"
    with _wrapping(f"transformers model {cls.__name__}", shown, "transformers"):
        model = cls.from_pretrained(str(folder), local_files_only=True, **_dtype_kwargs(dtype))
    return LoadedModel(
        model=model,
        library="transformers",
        description=f"{type(model).__name__} from {shown} "
        f"(transformers, model_type {config['model_type']}{how})",
    )


def _import(library: str, shown: str) -> Any:
    try:
        return importlib.import_module(library)
    except ImportError as exc:
        raise ModelLoadError(
            f"{shown} holds a {library} checkpoint, but {library} cannot be imported "
            f"({type(exc).__name__}: {_first_line(exc)}); install it with: "
            f'pip install "tokenmerge[{library}]"'
        ) from exc


def _read_json(file: Path, shown: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{file.name} in {shown} could not be read ({type(exc).__name__}: "
            f"{_first_line(exc)}); it must be a JSON object as written by save_pretrained() / "
            f"timm's save_for_hf(): re-save the model"
        ) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"{file.name} in {shown} holds a JSON {type(data).__name__}, not an object; "
            f"{_EXPECTED}; {_HOW_TO_SAVE}"
        )
    return data


@contextmanager
def _wrapping(what: str, shown: str, library: str) -> Iterator[None]:
    """Turn a library's error while loading into a one-line ModelLoadError, chained."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the {what} in {shown}: {type(exc).__name__}: {_first_line(exc)}; "
            f"the folder must hold a complete {library} checkpoint with readable weights: "
            f"re-save it with {_SAVERS[library]}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0].strip() if lines else "(no message)"
    return line if len(line) <= 300 else line[:297] + "..."


def _dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    # diffusers 0.42 and transformers 5 both take dtype= (torch_dtype= is deprecated in both)
    return {} if dtype is None else {"dtype": dtype}
