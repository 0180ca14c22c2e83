"""The registry's machinery: built-ins (``DEFAULT_PLUGINS``), entry points and run-time plugins
all register through the hooks of ``tokenmerge.hookspecs``, atomically, on first use; a failing
third-party plugin is skipped with a ``PluginWarning``. Public look-ups: ``tokenmerge.registry``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
import warnings
from dataclasses import dataclass, field
from functools import partial
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
    unknown_name_message,
)
from .strategy import Strategy

__all__ = ["DEFAULT_PLUGINS", "DISABLE_AUTOLOAD_ENV", "ENTRY_POINT_GROUP", "PluginInfo", "Registry"]

ENTRY_POINT_GROUP = "tokenmerge"
DISABLE_AUTOLOAD_ENV = "TOKENMERGE_DISABLE_PLUGIN_AUTOLOAD"
DEFAULT_PLUGINS = ("tokenmerge.strategies", "tokenmerge.adapters")
#: what each kind of item is registered through, and its unknown-name error
_HOOKS = {"strategy": "tokenmerge_register_strategies", "adapter": "tokenmerge_register_adapters"}
_UNKNOWN = {"strategy": UnknownStrategyError, "adapter": UnknownAdapterError}


@dataclass
class PluginInfo:
    """One loaded plugin: where it came from and what it registered."""

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    strategies: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


def _checked(kind: str, item: Any, who: str) -> str:
    """The registry name of a strategy class or adapter spec; a ``PluginError`` if it is neither."""
    if kind == "adapter":
        if isinstance(item, AdapterSpec):
            return item.name
        raise PluginError(
            f"{who}: {item!r} is not an adapter spec; register adapters as "
            "tokenmerge.extend.AdapterSpec(name=..., target='module:Class', ...)"
        )
    if isinstance(item, type) and issubclass(item, Strategy):
        return item.validate_class()
    raise PluginError(
        f"{who}: {item!r} is not a strategy; register a subclass of tokenmerge.extend.Strategy"
    )


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
        if self._loaded:  # the common case, without taking the lock
            return
        with self._lock:
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
                try:
                    self._add(entry_point.load(), info)
                except Exception as error:  # noqa: BLE001 - any third-party failure is skipped
                    origin = f"{info.distribution} {info.version}" if dist else entry_point.value
                    warnings.warn(
                        f"tokenmerge plugin {info.name!r} (from {origin}) failed to load and was "
                        f"skipped: {type(error).__name__}: {error}",
                        PluginWarning,
                        stacklevel=3,
                    )

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
        batch: list[tuple[str, str, str, Any]] = []

        def register(kind: str, item: Any, replace: bool = False) -> None:
            name = _checked(kind, item, f"plugin {info.name!r}")
            current = self._table(kind).get(name)
            if current is not None and not replace:
                raise DuplicateNameError(
                    f"{kind} {name!r} from plugin {info.name!r} is already registered by plugin "
                    f"{current[0]!r}; pick another name or register it with replace=True to "
                    "take over"
                )
            batch.append((info.name, kind, name, item))

        try:
            for kind, hook in _HOOKS.items():
                for impl in getattr(self._pm.hook, hook).get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=partial(register, kind))
        except Exception:
            self._pm.unregister(plugin)
            raise
        self._entries += batch
        info.strategies = sorted({name for _, kind, name, _ in batch if kind == "strategy"})
        info.adapters = sorted({name for _, kind, name, _ in batch if kind == "adapter"})
        self._plugins[info.name] = info

    def _table(self, kind: str) -> dict[str, tuple[str, Any]]:
        """Name -> (owner, item) of every registered ``kind``, sorted by name."""
        table = {name: (owner, item) for owner, k, name, item in self._entries if k == kind}
        return dict(sorted(table.items()))

    def table(self, kind: str) -> dict[str, Any]:
        """Name -> strategy class (``kind="strategy"``) or adapter spec (``"adapter"``)."""
        with self._lock:
            self._ensure_loaded()
            return {name: item for name, (_, item) in self._table(kind).items()}

    def get(self, kind: str, name: str) -> Any:
        """The strategy class or adapter spec registered as ``name`` (errors list the known)."""
        table = self.table(kind)
        if name not in table:
            raise _UNKNOWN[kind](unknown_name_message(kind, name, table))
        return table[name]

    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object or module at run time; returns its name."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        with self._lock:
            self._ensure_loaded()
            self._add(plugin, PluginInfo(name))
        return name

    def register_one(self, kind: str, item: Any, replace: bool = False) -> None:
        """Register one strategy class or adapter spec as a plugin ``<kind>:<name>`` of its own;
        with ``replace=True`` an earlier such plugin of the same name goes first."""
        plugin_name = f"{kind}:{_checked(kind, item, f'register_{kind}')}"
        hook = hookspecs.hookimpl(lambda register: register(item, replace=replace))
        with self._lock:
            self._ensure_loaded()
            if replace and plugin_name in self._plugins:
                self.unregister_plugin(plugin_name)
            self._add(SimpleNamespace(**{_HOOKS[kind]: hook}), PluginInfo(plugin_name))

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
