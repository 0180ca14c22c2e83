"""tokenmerge: training-free token merging for attention-based image models.

``tokenmerge.__all__`` is what users call; what plugin authors subclass and use (``Strategy``,
``Adapter``, ``AdapterSpec``, ``hookimpl``, ``register_plugin``...) is in ``tokenmerge.extend``.

Example:
    >>> import tokenmerge
    >>> tokenmerge.list_strategies()
    ['random', 'retom', 'todo', 'tome']
"""

from __future__ import annotations

import warnings
from importlib import import_module
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    AlreadyAppliedError,
    ConfigError,
    NoSitesError,
    ShortfallWarning,
    TokenMergeError,
    TokenMergeWarning,
    UnknownAdapterError,
    UnknownStrategyError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from . import extend  # noqa: F401 (loaded on first use below)
    from .api import Handle, apply, get_strategy, remove
    from .config import MergeConfig, r_schedule
    from .load import load_config
    from .registry import adapter_status, list_adapters, list_plugins, list_strategies
    from .selectors import Sites

#: the names that import torch, loaded on first use so that `import tokenmerge` (and with it
#: the `tokenmerge` command's --help) stays cheap
_LAZY = {
    name: module
    for module, names in {
        ".api": ("Handle", "apply", "get_strategy", "remove"),
        ".config": ("MergeConfig", "r_schedule"),
        ".load": ("load_config",),
        ".registry": ("adapter_status", "list_adapters", "list_plugins", "list_strategies"),
        ".selectors": ("Sites",),
    }.items()
    for name in names
}

__all__ = [
    "AlreadyAppliedError",
    "ConfigError",
    "Handle",
    "MergeConfig",
    "NoSitesError",
    "ShortfallWarning",
    "Sites",
    "TokenMergeError",
    "TokenMergeWarning",
    "UnknownAdapterError",
    "UnknownStrategyError",
    "UnsupportedModelError",
    "__version__",
    "adapter_status",
    "apply",
    "get_strategy",
    "list_adapters",
    "list_plugins",
    "list_strategies",
    "load_config",
    "r_schedule",
    "remove",
]


#: the plugin-author names that lived here until 0.1; they keep working for one release. A
#: fixed list, not derived from extend.__all__: names new in extend (AdapterOptions) never
#: were top-level spellings, so they must not become deprecated aliases here.
_MOVED_TO_EXTEND = (
    "Adapter",
    "AdapterSpec",
    "DuplicateNameError",
    "Plan",
    "PluginError",
    "PluginInfo",
    "PluginWarning",
    "Site",
    "SiteCandidate",
    "SiteStats",
    "StepState",
    "Strategy",
    "TokenLayout",
    "UnknownNameError",
    "hookimpl",
    "register_adapter",
    "register_plugin",
    "register_strategy",
    "unregister_plugin",
)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"extend"})


def __getattr__(name: str) -> Any:
    if name == "extend":
        return import_module(".extend", __name__)
    if name in _LAZY:
        module = import_module(_LAZY[name], __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name not in _MOVED_TO_EXTEND:
        if find_spec(f"{__name__}.{name}") is not None:  # a submodule not imported yet
            return import_module(f".{name}", __name__)
        raise AttributeError(f"module 'tokenmerge' has no attribute {name!r}")
    warnings.warn(
        f"tokenmerge.{name} is deprecated; use tokenmerge.extend.{name}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(import_module(".extend", __name__), name)
