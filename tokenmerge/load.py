"""Configs from names, dicts and JSON: ``load_config`` and the union of the registered configs.

It sits above the registry (which knows each strategy's config class) and below ``api``; the
config classes themselves, in ``tokenmerge.config``, know nothing of the registry.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from .config import MergeConfig
from .errors import ConfigError, UnknownStrategyError, close_matches, unknown_name_message
from .registry import registry

__all__ = ["config_union", "load_config"]


def _format_validation_error(title: str, error: ValidationError, fields: list[str]) -> str:
    lines = [f"invalid {title}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(config)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            name = str(item["loc"][-1]) if item["loc"] else ""
            message = f"unknown field; allowed fields: {', '.join(fields)}"
            matches = close_matches(name, fields)
            if matches:
                message += f"; did you mean {' or '.join(repr(m) for m in matches)}?"
        shown = repr(item.get("input"))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  - {where}: {message} (got {shown})")
    return "\n".join(lines)


def _validate(cls: type[MergeConfig], data: dict[str, Any]) -> MergeConfig:
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(
            _format_validation_error(cls.__name__, error, list(cls.model_fields))
        ) from None


@lru_cache(maxsize=8)
def _union_adapter(classes: tuple[type[MergeConfig], ...]) -> TypeAdapter:
    if len(classes) == 1:
        return TypeAdapter(classes[0])
    union = Annotated[Union[classes], Field(discriminator="strategy")]  # noqa: UP007
    return TypeAdapter(union)


def config_union() -> TypeAdapter:
    """A pydantic ``TypeAdapter`` for the discriminated union of every registered config.

    Example:
        >>> from tokenmerge.load import config_union
        >>> type(config_union().validate_json('{"strategy": "tome"}')).__name__
        'ToMeConfig'
    """
    return _union_adapter(tuple(registry.config_classes()))


def load_config(config: str | dict | MergeConfig = "retom", **overrides: Any) -> MergeConfig:
    """Turn a strategy name, a dict (or JSON string of one) or a config into a validated config.

    Args:
        config: a strategy name (``"retom"``), a mapping with a ``strategy`` key, its JSON text,
            or a ``MergeConfig`` instance.
        **overrides: fields to set on top (e.g. ``ratio=0.5``).

    Raises:
        UnknownStrategyError: the strategy is not registered (lists known names).
        ConfigError: a field is invalid, unknown or impossible (says what is allowed).

    Example:
        >>> from tokenmerge import load_config
        >>> load_config("retom", ratio=0.5).ratio
        0.5
        >>> load_config('{"strategy": "tome", "ratio": 0.25}').strategy
        'tome'
    """
    if isinstance(config, MergeConfig):
        if not overrides:
            return config
        data = {**config.model_dump(), **overrides}
        return _validate(type(config), data)
    if isinstance(config, str):
        text = config.strip()
        if text.startswith("{"):
            try:
                config = json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"config text is not valid JSON: {error}") from None
        else:
            cls = registry.strategy(text).config_class
            return _validate(cls, {"strategy": text, **overrides})
    if not isinstance(config, dict):
        raise ConfigError(
            "config must be a strategy name, a dict with a 'strategy' key, its JSON text or a "
            f"MergeConfig; got {type(config).__name__}"
        )
    data = {**config, **overrides}
    name = data.get("strategy")
    if not isinstance(name, str):
        raise ConfigError(
            "a config dict needs a 'strategy' key naming a registered strategy "
            f"({', '.join(registry.strategy_names())}); got {name!r}"
        )
    if name not in registry.strategy_names():
        raise UnknownStrategyError(
            unknown_name_message("strategy", name, registry.strategy_names())
        )
    return _validate(registry.strategy(name).config_class, data)
