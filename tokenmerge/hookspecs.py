"""The plugin hooks: how strategies and adapters get into the registry.

A plugin is any object or module with ``@hookimpl``-decorated functions named after these specs.
Third-party packages expose theirs through the ``tokenmerge`` entry-point group::

    [project.entry-points.tokenmerge]
    my_strategy = "my_package.plugin"

The built-in strategies and adapters are registered through exactly the same hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "tokenmerge"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tokenmerge_register_strategies(register: Callable[..., None]) -> None:
    """Register merge strategies.

    Call ``register(StrategyClass)`` once per strategy (``register(cls, replace=True)`` to take
    over a name that is already registered). A strategy class subclasses
    ``tokenmerge.Strategy`` and names its config class.

    Example:
        >>> from tokenmerge import hookimpl
        >>> class MyPlugin:
        ...     @hookimpl
        ...     def tokenmerge_register_strategies(self, register):
        ...         from tokenmerge.strategies.random import RandomStrategy
        ...         register(RandomStrategy, replace=True)
    """


@hookspec
def tokenmerge_register_adapters(register: Callable[..., None]) -> None:
    """Register model adapters.

    Call ``register(AdapterSpec(...))`` once per adapter. The spec names the module that holds
    the adapter class, which is imported only when the adapter is first used, and the libraries
    it needs, so a missing library makes the adapter show as unavailable instead of failing.

    Example:
        >>> from tokenmerge import hookimpl, AdapterSpec
        >>> class MyPlugin:
        ...     @hookimpl
        ...     def tokenmerge_register_adapters(self, register):
        ...         register(AdapterSpec(name="my_adapter", target="my_package.adapter:MyAdapter",
        ...                              requires={"my_library": "1.0"}, extra="my-package"))
    """
