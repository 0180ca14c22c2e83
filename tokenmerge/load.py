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
from .deprecated import split_flat, with_sites
from .errors import ConfigError, UnknownStrategyError, unknown_name_message
from .registry import registry
from .validation import format_validation_error

__all__ = ["config_union", "format_validation_error", "load_config"]


def _validate(cls: type[MergeConfig], data: dict[str, Any]) -> MergeConfig:
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(
            format_validation_error(cls.__name__, error, list(cls.model_fields), model=cls)
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
    if isinstance(config, str) and not config.strip().startswith("{"):
        name = config.strip()
        registry.strategy(name)  # an unknown name: the registry's error, with close matches
        config = {"strategy": name}
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config text is not valid JSON: {error}") from None
    if isinstance(config, MergeConfig):
        if not overrides:
            return config
        cls, base, options = type(config), config.model_dump(), config.deprecated_adapter_options
    elif isinstance(config, dict):
        cls = _config_class({**config, **overrides}.get("strategy"))
        base, options = _upgrade(config, {}, cls)
    else:
        raise ConfigError(
            "config must be a strategy name, a dict with a 'strategy' key, its JSON text or a "
            f"MergeConfig; got {type(config).__name__}"
        )
    data, options = _upgrade(overrides, options, cls, under=base)
    return _validate(cls, data).with_deprecated_adapter_options(options)


def _upgrade(
    data: dict[str, Any],
    options: dict[str, Any],
    cls: type[MergeConfig],
    under: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data`` in the new shape (old flat fields warn and move into ``sites``), laid over
    ``under``, and the adapter options the old fields gave, on top of ``options``."""
    data, sites, given = split_flat(data, cls.model_fields)
    if sites and "sites" not in data and under is not None:
        data = {**data, "sites": with_sites(under.get("sites"), sites, layered=True)}
    elif sites:
        data = {**data, "sites": with_sites(data.get("sites"), sites)}
    return {**(under or {}), **data}, {**options, **given}


def _config_class(name: Any) -> type[MergeConfig]:
    if not isinstance(name, str):
        raise ConfigError(
            "a config dict needs a 'strategy' key naming a registered strategy "
            f"({', '.join(registry.strategy_names())}); got {name!r}"
        )
    if name not in registry.strategy_names():
        raise UnknownStrategyError(
            unknown_name_message("strategy", name, registry.strategy_names())
        )
    return registry.strategy(name).config_class
