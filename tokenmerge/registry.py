"""The registry: which strategies and adapters are registered, and registering more.

Everything comes from plugins (built-ins included) through ``tokenmerge.plugins``; this module is
its public face: wildcard look-ups in the manner of timm's ``list_models`` and run-time
registration.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from .adapter_spec import AdapterSpec
from .plugins import DEFAULT_PLUGINS, DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, PluginInfo, Registry
from .strategy import Strategy

__all__ = [
    "AdapterSpec",
    "DEFAULT_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "adapter_status",
    "list_adapters",
    "list_plugins",
    "list_strategies",
    "register_adapter",
    "register_plugin",
    "register_strategy",
    "registry",
    "unregister_plugin",
]

#: the one registry of the process (``registry.reset()`` forgets every plugin)
registry = Registry()


def _filter(names: list[str], pattern: str | list[str]) -> list[str]:
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def list_strategies(pattern: str | list[str] = "*") -> list[str]:
    """Names of the registered strategies matching a wildcard pattern (or any of several).

    Example:
        >>> import tokenmerge
        >>> tokenmerge.list_strategies("*tom*")
        ['retom', 'tome']
    """
    return _filter(registry.strategy_names(), pattern)


def list_adapters(pattern: str | list[str] = "*", available: bool | None = None) -> list[str]:
    """Names of the registered adapters matching a pattern; ``available=True`` / ``False`` filters.

    An adapter whose library is missing is listed (``available=False`` shows them);
    ``adapter_status(name)`` says what to install.

    Example:
        >>> import tokenmerge
        >>> "generic" in tokenmerge.list_adapters(available=True)
        True
    """
    specs = registry.table("adapter").values()
    names = [s.name for s in specs if available is None or s.available == available]
    return _filter(names, pattern)


def adapter_status(name: str) -> str:
    """``"available"``, or why the adapter is not, with the command that fixes it.

    Example:
        >>> import tokenmerge
        >>> tokenmerge.adapter_status("generic")
        'available'
    """
    return registry.adapter(name).unavailable_reason() or "available"


def list_plugins(pattern: str | list[str] = "*") -> list[PluginInfo]:
    """The loaded plugins (built-in ones included) whose name matches the pattern.

    Example:
        >>> import tokenmerge
        >>> [p.name for p in tokenmerge.list_plugins("tokenmerge.*")]
        ['tokenmerge.adapters', 'tokenmerge.strategies']
    """
    plugins = registry.plugins()
    keep = set(_filter([p.name for p in plugins], pattern))
    return [p for p in plugins if p.name in keep]


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin (an object or module with ``@hookimpl`` functions) at run time.

    Raises:
        PluginError: the name or the object is registered already, or it registers a bad item.
        DuplicateNameError: it registers a taken strategy or adapter name without ``replace=True``.

    Example:
        >>> from tokenmerge import extend
        >>> class Plugin:
        ...     @extend.hookimpl
        ...     def tokenmerge_register_adapters(self, register):
        ...         register(extend.AdapterSpec("mine", "my_package.adapter:MyAdapter"))
        >>> extend.register_plugin(Plugin(), name="my-plugin")
        'my-plugin'
        >>> "mine" in list_adapters()
        True
        >>> extend.unregister_plugin("my-plugin")
    """
    return registry.register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    """Unregister a plugin and everything it registered."""
    registry.unregister_plugin(name)


def register_strategy(cls: type[Strategy], *, replace: bool = False) -> None:
    """Register one strategy class at run time (a one-strategy plugin ``strategy:<name>``).

    With ``replace=True`` it takes the name over from whoever registered it before.
    """
    registry.register_one("strategy", cls, replace)


def register_adapter(spec: AdapterSpec, *, replace: bool = False) -> None:
    """Register one adapter spec at run time (a one-adapter plugin ``adapter:<name>``).

    With ``replace=True`` it takes the name over from whoever registered it before.
    """
    registry.register_one("adapter", spec, replace)
