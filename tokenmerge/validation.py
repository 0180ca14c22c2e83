"""pydantic validation errors as tokenmerge messages: what was wrong where, and what is allowed."""

from __future__ import annotations

from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .errors import close_matches
from .peer_names import peer_hint

__all__ = ["format_validation_error"]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``Sites``, ``Sites | None``...), or None."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [m for m in map(_model_of, get_args(annotation)) if m is not None]
    return models[0] if len(models) == 1 else None


def _nested(model: type[BaseModel] | None) -> dict[str, type[BaseModel]]:
    """``model``'s fields that hold a model of their own, with that model."""
    if model is None:
        return {}
    found = {name: _model_of(info.annotation) for name, info in model.model_fields.items()}
    return {name: nested for name, nested in found.items() if nested is not None}


def format_validation_error(
    title: str,
    error: ValidationError,
    fields: list[str],
    kind: str = "field",
    model: type[BaseModel] | None = None,
) -> str:
    """A pydantic error as a list of what was wrong where, naming the allowed fields (and the
    close matches) of an unknown one; ``kind`` names them (``"field"``, ``"option"``).

    ``model`` (the class validated) lets it name the fields of a nested model (``sites``) too.

    Example:
        >>> import pydantic
        >>> from tokenmerge import Sites
        >>> from tokenmerge.validation import format_validation_error
        >>> try:
        ...     Sites(level=(1,))
        ... except pydantic.ValidationError as error:
        ...     print(format_validation_error("Sites", error, list(Sites.model_fields)))
        invalid Sites:
          - level: unknown field; allowed fields: ...; did you mean 'levels'? (got (1,))
    """
    nested = _nested(model)
    lines = [f"invalid {title}:"]
    for item in error.errors():
        loc = item["loc"]
        where = ".".join(str(part) for part in loc) or "(config)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            name = str(loc[-1]) if loc else ""
            owner = nested.get(str(loc[0])) if len(loc) == 2 else None
            allowed = list(owner.model_fields) if owner is not None else fields
            message = f"unknown {kind}; allowed {kind}s: {', '.join(allowed)}"
            hint = peer_hint(name) if owner is None and kind == "field" else None
            matches = close_matches(name, allowed)
            if hint is not None:  # tomesd's / ToMe's name: our spelling, not a near miss
                message += f"; {hint}"
            elif matches:
                message += f"; did you mean {' or '.join(repr(m) for m in matches)}?"
            homes = [field for field, cls in nested.items() if name in cls.model_fields]
            if owner is None and kind == "field" and homes:
                message += f" ({name} belongs in {homes[0]}: use {homes[0]}={{{name!r}: ...}})"
        shown = repr(item.get("input"))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  - {where}: {message} (got {shown})")
    return "\n".join(lines)
