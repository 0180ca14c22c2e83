"""The registry: strategies and adapters, all registered by plugins through the hooks of
``tokenmerge.hookspecs`` - the built-ins (``DEFAULT_PLUGINS``), entry points of the ``tokenmerge``
group and run-time plugins alike - atomically, on first use. A third-party plugin that fails is
skipped with a ``PluginWarning``; ``TOKENMERGE_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import os
import threading
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pluggy

from . import hookspecs
from ._version import __version__
from .adapter_spec import AdapterSpec
from .config import MergeConfig
from .errors import (
    DuplicateNameError,
    PluginError,
    PluginWarning,
    UnknownAdapterError,
    UnknownNameError,
    UnknownStrategyError,
    close_matches,
    unknown_name_message,
)
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

ENTRY_POINT_GROUP = "tokenmerge"
DISABLE_AUTOLOAD_ENV = "TOKENMERGE_DISABLE_PLUGIN_AUTOLOAD"
DEFAULT_PLUGINS = ("tokenmerge.strategies", "tokenmerge.adapters")
#: each kind of item: the hook that registers it and the error for an unknown name
_KINDS = {
    "strategy": ("tokenmerge_register_strategies", UnknownStrategyError),
    "adapter": ("tokenmerge_register_adapters", UnknownAdapterError),
}


@dataclass
class PluginInfo:
    """One loaded plugin: where it came from and what it registered."""

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    strategies: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


def _name_of(kind: str, item: Any, who: str) -> str:
    """The registry name of a strategy class or adapter spec; a ``PluginError`` if it is neither."""
    if kind == "adapter" and isinstance(item, AdapterSpec):
        return item.name
    if kind == "strategy" and isinstance(item, type) and issubclass(item, Strategy):
        return item.validate_class()
    wanted = (
        "a subclass of tokenmerge.extend.Strategy"
        if kind == "strategy"
        else ("tokenmerge.extend.AdapterSpec(name=..., target='module:Class', ...)")
    )
    raise PluginError(f"{who}: {item!r} is not a {kind}; register {wanted}")


def _why_empty(plugin: Any, manager: pluggy.PluginManager) -> str:
    """Why a plugin registered nothing, and how to fix it."""
    hooks = [name for name, _ in _KINDS.values()]
    wanted = f"an @hookimpl function {' or '.join(hooks)}"
    if plugin is None:
        return f"the plugin is None; pass an object or module with {wanted}"
    names = [n for n in dir(plugin) if n.startswith("tokenmerge_")]
    marked = [n for n in names if manager.parse_hookimpl_opts(plugin, n) is not None]
    for name in names:
        if not callable(getattr(hookspecs, name, None)):
            matches = close_matches(name, hooks, n=1)
            hint = f"; did you mean {matches[0]!r}?" if matches else ""
            return f"{name!r} is no tokenmerge hook (it needs {wanted}){hint}"
        if name in hooks and name not in marked:
            return f"{name!r} is not decorated with @tokenmerge.extend.hookimpl"
    if any(name in hooks for name in marked):
        return "its hooks ran but called register() for nothing"
    if marked:  # tokenmerge_register_commands alone
        return (
            f"it implements only {', '.join(marked)}, which the tokenmerge command reads from "
            "the 'tokenmerge.commands' entry-point group"
        )
    return f"it has no {wanted[3:]}"


class Registry:
    """Strategies, adapters and the plugins that provided them (use the module's ``registry``)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forget every plugin; the next use loads the built-ins and entry points again."""
        with self._lock:
            self._loaded = False
            self._pm = pluggy.PluginManager(hookspecs.PROJECT)
            self._pm.add_hookspecs(hookspecs)
            # (owner, kind, name, item) in registration order: the last entry of a name is in
            # force, so unregistering a plugin that replaced a name brings the previous one back
            self._entries: list[tuple[str, str, str, Any]] = []
            self._plugins: dict[str, PluginInfo] = {}

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module_name in DEFAULT_PLUGINS:
            info = PluginInfo(module_name, "tokenmerge", __version__, builtin=True)
            self._add(importlib.import_module(module_name), info)
        if os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false"):
            return
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist
            info = PluginInfo(entry_point.name)
            if dist is not None:
                info.distribution, info.version = dist.metadata["Name"], dist.version
            origin = f"{info.distribution} {info.version}" if dist else entry_point.value
            try:
                plugin = entry_point.load()
                self._add(plugin, info)
            except KeyboardInterrupt:
                raise
            # BaseException: a plugin that parses sys.argv at import raises SystemExit (in
            # Jupyter, on the kernel's own -f flag), which must not end the user's program
            except BaseException as error:  # noqa: BLE001 - any third-party failure is skipped
                warnings.warn(
                    f"tokenmerge plugin {info.name!r} (from {origin}) failed to load and was "
                    f"skipped: {type(error).__name__}: {error}",
                    PluginWarning,
                    stacklevel=3,
                )
                continue
            self._warn_if_empty(plugin, info, f"tokenmerge plugin {info.name!r} (from {origin})")

    def _add(self, plugin: Any, info: PluginInfo) -> None:
        """Register one plugin atomically: every name it registers, or none."""
        if info.name in self._plugins:
            raise PluginError(
                f"a plugin named {info.name!r} is already registered; pass another name= or "
                "unregister_plugin it first"
            )
        if self._pm.is_registered(plugin):
            raise PluginError(
                f"this plugin object is already registered as {self._pm.get_name(plugin)!r}; "
                "register it once"
            )
        self._pm.register(plugin, name=info.name)
        batch = []
        try:
            for kind, (hook, _) in _KINDS.items():
                for impl in getattr(self._pm.hook, hook).get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=self._registrar(kind, info.name, batch))
        except BaseException:
            self._pm.unregister(plugin)
            raise
        self._entries += batch
        info.strategies = sorted({n for _, kind, n, _ in batch if kind == "strategy"})
        info.adapters = sorted({n for _, kind, n, _ in batch if kind == "adapter"})
        self._plugins[info.name] = info

    def _registrar(self, kind: str, owner: str, batch: list) -> Any:
        def register(item: Any, replace: bool = False) -> None:
            name = _name_of(kind, item, f"plugin {owner!r}")
            current = [o for o, k, n, _ in self._entries if (k, n) == (kind, name)]
            if current and not replace:
                raise DuplicateNameError(
                    f"{kind} {name!r} from plugin {owner!r} is already registered by plugin "
                    f"{current[-1]!r}; pick another name or register it with replace=True to "
                    "take over"
                )
            batch.append((owner, kind, name, item))

        return register

    def table(self, kind: str) -> dict[str, Any]:
        """Name -> strategy class (``kind="strategy"``) or adapter spec (``"adapter"``), sorted."""
        with self._lock:
            self._ensure_loaded()
            return dict(sorted({n: item for _, k, n, item in self._entries if k == kind}.items()))

    def get(self, kind: str, name: str) -> Any:
        """The strategy class or adapter spec registered as ``name`` (errors list the known)."""
        table = self.table(kind)
        if name not in table:
            raise _KINDS[kind][1](unknown_name_message(kind, name, table))
        return table[name]

    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object or module at run time; returns its name."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        with self._lock:
            self._ensure_loaded()
            info = PluginInfo(name)
            if plugin is not None:  # pluggy takes a None plugin for a blocked name
                self._add(plugin, info)
        self._warn_if_empty(plugin, info, f"register_plugin(..., name={name!r})")
        return name

    def _warn_if_empty(self, plugin: Any, info: PluginInfo, who: str) -> None:
        """A ``PluginWarning`` when ``plugin`` registered no strategy and no adapter, saying
        why where that shows (a misspelled hook name, a hook without ``@hookimpl``)."""
        if info.strategies or info.adapters:
            return
        warnings.warn(
            f"{who} registered no strategy and no adapter: {_why_empty(plugin, self._pm)}",
            PluginWarning,
            stacklevel=4,
        )

    def register_one(self, kind: str, item: Any, replace: bool = False) -> None:
        """Register one strategy class or adapter spec as a plugin ``<kind>:<name>`` of its own;
        with ``replace=True`` an earlier such plugin of the same name goes first."""
        plugin_name = f"{kind}:{_name_of(kind, item, f'register_{kind}')}"
        hook = hookspecs.hookimpl(lambda register: register(item, replace=replace))
        with self._lock:
            self._ensure_loaded()
            if replace and plugin_name in self._plugins:
                self.unregister_plugin(plugin_name)
            self._add(SimpleNamespace(**{_KINDS[kind][0]: hook}), PluginInfo(plugin_name))

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and every strategy and adapter it registered."""
        with self._lock:
            self._ensure_loaded()
            if name not in self._plugins:
                raise UnknownNameError(unknown_name_message("plugin", name, self._plugins))
            self._pm.unregister(name=name)
            del self._plugins[name]
            self._entries = [entry for entry in self._entries if entry[0] != name]

    def strategy(self, name: str) -> type[Strategy]:
        return self.get("strategy", name)

    def adapter(self, name: str) -> AdapterSpec:
        return self.get("adapter", name)

    def strategy_names(self) -> list[str]:
        return list(self.table("strategy"))

    def config_classes(self) -> list[type[MergeConfig]]:
        """The config class of every strategy: the members of the discriminated union."""
        return [cls.config_class for cls in self.table("strategy").values()]

    def plugins(self) -> list[PluginInfo]:
        with self._lock:
            self._ensure_loaded()
            return [self._plugins[name] for name in sorted(self._plugins)]

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        with self._lock:
            self._ensure_loaded()
            return self._pm


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
