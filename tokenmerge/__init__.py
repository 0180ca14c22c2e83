"""tokenmerge: training-free token merging for attention-based image models.

Example:
    >>> import tokenmerge
    >>> tokenmerge.list_strategies()
    ['random', 'retom', 'tome']
"""

from __future__ import annotations

from .adapter import Adapter, SiteCandidate
from .api import Handle, apply, get_strategy, remove
from .config import MergeConfig, load_config, r_schedule
from .errors import (
    AlreadyAppliedError,
    ConfigError,
    DuplicateNameError,
    NoSitesError,
    PluginError,
    PluginWarning,
    ShortfallWarning,
    TokenMergeError,
    TokenMergeWarning,
    UnknownAdapterError,
    UnknownNameError,
    UnknownStrategyError,
    UnsupportedModelError,
)
from .hookspecs import hookimpl
from .plan import Plan
from .registry import (
    AdapterSpec,
    PluginInfo,
    adapter_status,
    list_adapters,
    list_plugins,
    list_strategies,
    register_adapter,
    register_plugin,
    register_strategy,
    unregister_plugin,
)
from .site import Site, SiteStats, TokenLayout
from .state import StepState
from .strategy import Strategy

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterSpec",
    "AlreadyAppliedError",
    "ConfigError",
    "DuplicateNameError",
    "Handle",
    "MergeConfig",
    "NoSitesError",
    "Plan",
    "PluginError",
    "PluginInfo",
    "PluginWarning",
    "ShortfallWarning",
    "Site",
    "SiteCandidate",
    "SiteStats",
    "StepState",
    "Strategy",
    "TokenLayout",
    "TokenMergeError",
    "TokenMergeWarning",
    "UnknownAdapterError",
    "UnknownNameError",
    "UnknownStrategyError",
    "UnsupportedModelError",
    "__version__",
    "adapter_status",
    "apply",
    "get_strategy",
    "hookimpl",
    "list_adapters",
    "list_plugins",
    "list_strategies",
    "load_config",
    "r_schedule",
    "register_adapter",
    "register_plugin",
    "register_strategy",
    "remove",
    "unregister_plugin",
]
