"""The old, flat spellings of settings that now live elsewhere, kept working for one release.

Until 0.2 ``MergeConfig`` held every setting in flat fields. What selects sites moved to
``sites=`` (a ``tokenmerge.Sites``), and ``mode`` / ``proportional_attention``, which only the ViT
adapters implement, to ``adapter_options=``. The old spellings still work in ``load_config`` /
``apply`` keyword overrides, dicts and JSON, and as attribute reads (``config.levels``); each warns
once per use with a ``DeprecationWarning`` that names the new spelling.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Collection
from typing import Any

from .errors import ConfigError
from .selectors import Sites

__all__ = [
    "ADAPTER_FIELDS",
    "SITE_FIELDS",
    "split_flat",
    "user_stacklevel",
    "warn_deprecated",
    "with_sites",
]

#: old flat config field -> its ``Sites`` field
SITE_FIELDS = {
    "levels": "levels",
    "stages": "stages",
    "blocks": "blocks",
    "include": "include",
    "exclude": "exclude",
    "merge_attn": "attn",
    "merge_cross_attn": "cross_attn",
    "merge_mlp": "mlp",
    "min_tokens": "min_tokens",
}
#: old flat config fields that are adapter options now, with the value they had by default
ADAPTER_FIELDS = {"mode": "auto", "proportional_attention": True}


def user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside tokenmerge and pydantic: the user's line
    (for a warning issued by the function that calls this)."""
    frame, level = sys._getframe(2), 2
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module == "tokenmerge" or module.startswith(("tokenmerge.", "pydantic"))):
            return level
        frame, level = frame.f_back, level + 1
    return level


def warn_deprecated(message: str) -> None:
    """Warn about an old spelling, pointing at the user's code."""
    warnings.warn(message, DeprecationWarning, stacklevel=user_stacklevel())


def split_flat(
    data: dict[str, Any], fields: Collection[str] = ()
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``data`` without its old flat keys, the ``Sites`` fields they set, and the adapter options
    they set; warns for each old key, naming its new spelling. Keys in ``fields`` (the target
    config's own fields: a plugin's config may have a field called ``mode``) are left alone.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     split_flat({"ratio": 0.5, "merge_mlp": True, "mode": "local"})
        ({'ratio': 0.5}, {'mlp': True}, {'mode': 'local'})
    """
    old = [k for k in data if (k in SITE_FIELDS or k in ADAPTER_FIELDS) and k not in fields]
    if not old:
        return data, {}, {}
    sites = {SITE_FIELDS[k]: data[k] for k in old if k in SITE_FIELDS}
    options = {k: data[k] for k in old if k in ADAPTER_FIELDS}
    for key in old:
        value = data[key]
        if key in SITE_FIELDS:
            warn_deprecated(
                f"the config field {key!r} is deprecated; use sites={{{SITE_FIELDS[key]!r}: "
                f"{value!r}}} (a tokenmerge.Sites)"
            )
        elif key in ADAPTER_FIELDS:
            warn_deprecated(
                f"the config field {key!r} is deprecated; it is an adapter option now: use "
                f"adapter_options={{{key!r}: {value!r}}}"
            )
    return {k: v for k, v in data.items() if k not in old}, sites, options


def with_sites(given: Any, updates: dict[str, Any], *, layered: bool = False) -> Any:
    """``given`` (a ``Sites``, a dict of its fields or None) with the fields of ``updates`` set.

    ``layered=False``: both come from the same place (one dict, one set of overrides), so a
    field given both ways is a ``ConfigError``; ``layered=True``: ``updates`` override ``given``
    (flat overrides on top of a config's sites). Anything else is returned for pydantic to reject.
    """
    if not updates:
        return given
    if given is None:
        return dict(updates)
    if isinstance(given, Sites):
        explicit, base = given.model_fields_set, given.model_dump()
    elif isinstance(given, dict):
        explicit, base = set(given), dict(given)
    else:
        return given
    both = sorted((set(updates) & explicit) if not layered else ())
    if both:
        old = {new: old for old, new in SITE_FIELDS.items()}
        raise ConfigError(
            "settings given both ways: "
            + ", ".join(f"{old[name]}= and sites={{{name!r}: ...}}" for name in both)
            + f"; give each once, in sites (the flat {', '.join(old[n] for n in both)} is "
            "deprecated)"
        )
    return {**base, **updates}
