"""Strategy variants for ``tokenmerge bench --strategies``: ``NAME[:KEY=VALUE[,KEY=VALUE...]]``.

A variant is a strategy with some of its config fields set, so one run can compare, say, ReToM
merging around attention only with ReToM merging around attention and the MLP::

    tokenmerge bench --strategies tome retom retom:sites.mlp=true

Values are JSON (``true``, ``4``, ``[1,2]``, ``{"down": 2}``); a bare word is a string. Fields are
those of the strategy's config, a dotted key reaching into a nested one (``sites.levels=[1,2]``
sets ``sites={"levels": [1, 2]}``; ``--set`` sets a field for every variant; a variant's own
fields win). The ratio is not a variant field: ``--ratios`` gives it to every variant.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tokenmerge.config import MergeConfig
from tokenmerge.errors import ConfigError
from tokenmerge.load import load_config

__all__ = ["StrategyVariant", "nested", "parse_variant", "parse_variants"]

#: a comma starts a new field only where ``KEY=`` follows, so JSON lists and objects keep theirs
_FIELD_BOUNDARY = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_.]*\s*=)")
_FORMAT = "NAME[:KEY=VALUE[,KEY=VALUE...]], e.g. retom or retom:sites.mlp=true,cache_interval=2"


def nested(fields: dict[str, Any]) -> dict[str, Any]:
    """Config fields with dotted keys (``sites.mlp``) turned into nested dicts.

    Example:
        >>> nested({"sites.mlp": True, "sites.levels": [1, 2], "seed": 1})
        {'sites': {'mlp': True, 'levels': [1, 2]}, 'seed': 1}
    """
    out: dict[str, Any] = {}
    for key, value in fields.items():
        *path, last = key.split(".")
        where = out
        for part in path:
            where = where.setdefault(part, {})
        where[last] = value
    return out


def _dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


@dataclass(frozen=True)
class StrategyVariant:
    """A strategy with some config fields set (the fields apply on top of ``--set``).

    Example:
        >>> variant = parse_variant("retom:sites.mlp=true")
        >>> variant.strategy, variant.fields, variant.name
        ('retom', {'sites.mlp': True}, 'retom+sites.mlp')
    """

    strategy: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The variant in a few characters: ``retom``, ``retom+sites.mlp``,
        ``retom-sites.attn+sites.mlp``, ``retom+window_size=4``."""
        parts = [self.strategy]
        for key, value in self.fields.items():
            if value is True:
                parts.append(f"+{key}")
            elif value is False:
                parts.append(f"-{key}")
            else:
                parts.append(f"+{key}={json.dumps(value, separators=(',', ':'))}")
        return "".join(parts)

    def label(self, ratio: float) -> str:
        """The row label the bench prints: ``retom+sites.mlp 0.5``."""
        return f"{self.name} {ratio:g}"

    def config(self, ratio: float, overrides: dict[str, Any] | None = None) -> MergeConfig:
        """The validated config of this variant at ``ratio`` (``overrides`` under its fields).

        Raises:
            UnknownStrategyError: the strategy is not registered (lists the known ones).
            ConfigError: a field is unknown or invalid (lists the allowed fields).
        """
        fields = nested({**(overrides or {}), **self.fields})
        return load_config(self.strategy, **fields, ratio=ratio)


def parse_variant(spec: str) -> StrategyVariant:
    """Parse ``NAME[:KEY=VALUE[,KEY=VALUE...]]`` (values JSON, a bare word a string).

    Only the syntax is checked here; ``StrategyVariant.config`` validates names and fields.

    Raises:
        ConfigError: the text is not of that form, sets a field twice, or sets the ratio.

    Example:
        >>> parse_variant("retom:window_size=4,sites.levels=[1,2]").fields
        {'window_size': 4, 'sites.levels': [1, 2]}
        >>> parse_variant("tome").fields
        {}
    """
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"strategy variant {spec!r} names no strategy; expected {_FORMAT}")
    fields: dict[str, Any] = {}
    if sep:
        if not rest.strip():
            raise ConfigError(
                f"strategy variant {spec!r} sets no field after ':'; expected {_FORMAT}"
            )
        for item in _FIELD_BOUNDARY.split(rest):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or not all(part.isidentifier() for part in key.split(".")):
                raise ConfigError(
                    f"strategy variant {spec!r}: {item.strip()!r} is not KEY=VALUE; "
                    f"expected {_FORMAT}"
                )
            if key in fields:
                raise ConfigError(f"strategy variant {spec!r} sets {key!r} twice")
            if key in ("ratio", "strategy"):
                raise ConfigError(
                    f"strategy variant {spec!r} sets {key!r}: give ratios with --ratios (every "
                    "variant runs at each of them) and the strategy before the ':'"
                )
            try:
                fields[key] = json.loads(raw)
            except json.JSONDecodeError:
                fields[key] = raw.strip()  # a bare word is a string
    return StrategyVariant(name, fields)


def parse_variants(
    specs: list[str], ratios: list[float], overrides: dict[str, Any]
) -> list[StrategyVariant]:
    """Parse and validate every variant at every ratio, before anything long starts.

    Returns:
        The variants, in order.

    Raises:
        UnknownStrategyError, ConfigError: as ``parse_variant`` and ``StrategyVariant.config``;
            also when two specs configure the same merging (their rows would measure one thing).

    Example:
        >>> variants = parse_variants(["tome", "retom:sites.mlp=true"], [0.5], {})
        >>> [v.name for v in variants]
        ['tome', 'retom+sites.mlp']
    """
    variants = []
    seen: list[tuple[list[MergeConfig], str]] = []  # configs may hold dicts: no hashing
    for spec in specs:
        parsed = parse_variant(spec)
        configs = [parsed.config(ratio, overrides) for ratio in ratios]
        # two specs that configure the same thing ("retom" and "retom:sites.mlp=false") would
        # give two rows measuring one configuration
        for other_configs, other in seen:
            if other_configs == configs:
                raise ConfigError(
                    f"strategy variants {other!r} and {spec!r} configure the same merging "
                    "(a field set to its default changes nothing); give each once"
                )
        seen.append((configs, spec))
        # the fields as the config holds them ("yes" validates as true): one spelling per label
        dumped = configs[0].model_dump(mode="json") if configs else parsed.fields
        variants.append(
            StrategyVariant(parsed.strategy, {key: _dotted(dumped, key) for key in parsed.fields})
        )
    return variants
