"""What plugin authors subclass and use: the strategy and adapter interfaces, the types they
exchange with the framework, and run-time registration.

Users applying merging need none of it (``tokenmerge.__all__`` is theirs); a package adding a
strategy or an adapter imports from here.

Example:
    >>> from typing import Literal
    >>> from tokenmerge import extend
    >>> from tokenmerge.strategies.random import RandomConfig, RandomStrategy
    >>> class ShuffleConfig(RandomConfig):
    ...     strategy: Literal["shuffle"] = "shuffle"
    >>> class Shuffle(RandomStrategy):
    ...     name, config_class = "shuffle", ShuffleConfig
    >>> extend.register_strategy(Shuffle)
    >>> import tokenmerge
    >>> tokenmerge.list_strategies("shuf*")
    ['shuffle']
    >>> extend.unregister_plugin("strategy:shuffle")
"""

# No ``from __future__ import annotations``: doctests inherit a module's future flags, and the
# example above defines a config class whose annotations pydantic must see evaluated.

from .adapter import Adapter, AdapterOptions, SiteCandidate
from .adapter_spec import AdapterSpec
from .errors import (
    DuplicateNameError,
    InvalidPlanError,
    PluginError,
    PluginWarning,
    UnknownNameError,
)
from .hookspecs import hookimpl
from .plan import Plan
from .registry import (
    PluginInfo,
    register_adapter,
    register_plugin,
    register_strategy,
    unregister_plugin,
)
from .site import Site, SiteStats, TokenLayout
from .state import StepState
from .strategy import Strategy

__all__ = [
    "Adapter",
    "AdapterOptions",
    "AdapterSpec",
    "DuplicateNameError",
    "InvalidPlanError",
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
]
