"""The registry of strategies and adapters, fed by pluggy plugins.

Built-ins are plugins of tokenmerge itself (their module names are listed in ``DEFAULT_PLUGINS``);
third-party plugins come from the ``tokenmerge`` entry-point group. Everything loads lazily, on the
first use of the registry. A third-party plugin that fails to import or to register is skipped
with a ``PluginWarning`` naming it; ``TOKENMERGE_DISABLE_PLUGIN_AUTOLOAD=1`` turns entry-point
loading off (built-ins still load).
"""

# No ``from __future__ import annotations`` here: doctests inherit a module's future flags, and
# the plugin example below must define its config class with evaluated annotations.

import fnmatch
import importlib
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, SimpleNamespace
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import (
    DuplicateNameError,
    PluginError,
    PluginWarning,
    UnknownAdapterError,
    UnknownNameError,
    UnknownStrategyError,
    unknown_name_message,
)

if TYPE_CHECKING:
    from .adapter import Adapter
    from .config import MergeConfig
    from .strategy import Strategy

__all__ = [
    "AdapterSpec",
    "DEFAULT_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "registry",
]

ENTRY_POINT_GROUP = "tokenmerge"
DISABLE_AUTOLOAD_ENV = "TOKENMERGE_DISABLE_PLUGIN_AUTOLOAD"
DEFAULT_PLUGINS = ("tokenmerge.strategies", "tokenmerge.adapters")


def _version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release segments: '0.30.0.dev1' -> (0, 30, 0)."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


@dataclass(frozen=True)
class AdapterSpec:
    """How to find and load an adapter, without importing it or its library.

    Attributes:
        name: the adapter's registry name (``apply(..., adapter=name)``).
        target: ``"module:Class"`` of the ``Adapter`` subclass, imported on first use.
        requires: distribution name -> minimum version of each library the adapter needs.
        extra: the pip extra that installs them (``pip install 'tokenmerge[extra]'``).
        claims: module prefixes of the model classes the adapter is for (``"diffusers."``),
            checked on the model's class hierarchy without importing anything; a model an
            unavailable adapter claims gets an error naming the extra.
        description: one line for listings.
    """

    name: str
    target: str
    requires: Mapping[str, str] = field(default_factory=dict)
    extra: str | None = None
    claims: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise PluginError(
                f"adapter {self.name!r}: target must be 'module:Class', got {self.target!r}"
            )
        object.__setattr__(self, "requires", MappingProxyType(dict(self.requires)))

    @property
    def install_hint(self) -> str:
        """The command that makes the adapter available."""
        if self.extra:
            return f"pip install 'tokenmerge[{self.extra}]'"
        needs = " ".join(f"'{dist}>={version}'" for dist, version in self.requires.items())
        return f"pip install {needs}"

    def unavailable_reason(self) -> str | None:
        """None when every required library is installed at its minimum version, else why not."""
        for dist, minimum in self.requires.items():
            try:
                installed = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                return f"{dist} is not installed; {self.install_hint}"
            if _version_tuple(installed) < _version_tuple(minimum):
                return f"{dist} {installed} is older than {minimum}; {self.install_hint}"
        return None

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    def claims_model(self, model: Any) -> bool:
        """True when the model's class (or a base class) lives under one of ``claims``."""
        modules = [cls.__module__ for cls in type(model).__mro__]
        return any(m == p.rstrip(".") or m.startswith(p) for m in modules for p in self.claims)

    def load(self) -> "type[Adapter]":
        """Import and return the adapter class (raises with the install hint if unavailable)."""
        from .errors import UnsupportedModelError

        reason = self.unavailable_reason()
        if reason is not None:
            raise UnsupportedModelError(f"adapter {self.name!r} is unavailable: {reason}")
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


def _own_version() -> str:
    from . import __version__

    return __version__


@dataclass
class PluginInfo:
    """One loaded plugin: where it came from and what it registered."""

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    strategies: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


class _Batch:
    """What one plugin registers, committed only if the whole plugin succeeds."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.strategies: dict[str, tuple[type[Strategy], bool]] = {}
        self.adapters: dict[str, tuple[AdapterSpec, bool]] = {}

    def strategy(self, cls: "type[Strategy]", replace: bool = False) -> None:
        from .strategy import Strategy

        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise PluginError(
                f"plugin {self.owner!r} registered {cls!r}: a strategy must be a subclass of "
                "tokenmerge.Strategy"
            )
        cls.validate_class()
        self.strategies[cls.name] = (cls, replace)

    def adapter(self, spec: AdapterSpec, replace: bool = False) -> None:
        if not isinstance(spec, AdapterSpec):
            raise PluginError(
                f"plugin {self.owner!r} registered {spec!r}: adapters are registered as "
                "tokenmerge.AdapterSpec(name=..., target='module:Class', ...)"
            )
        self.adapters[spec.name] = (spec, replace)


class _Table:
    """Registered names of one kind. Each name keeps a stack of (owner, item): the last one is in
    force, and unregistering a plugin that replaced a name brings the previous item back."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._stacks: dict[str, list[tuple[str, Any]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._stacks

    def names(self) -> list[str]:
        return sorted(self._stacks)

    def get(self, name: str) -> Any:
        return self._stacks[name][-1][1]

    def check(self, items: dict[str, tuple[Any, bool]], owner: str) -> None:
        for name, (_, replace) in items.items():
            if name in self._stacks and not replace:
                raise DuplicateNameError(
                    f"{self.kind} {name!r} from plugin {owner!r} is already registered by plugin "
                    f"{self._stacks[name][-1][0]!r}; pick another name or register it with "
                    "replace=True to take over"
                )

    def push(self, items: dict[str, tuple[Any, bool]], owner: str) -> None:
        for name, (item, _) in items.items():
            self._stacks.setdefault(name, []).append((owner, item))

    def drop(self, owner: str) -> None:
        for name in list(self._stacks):
            stack = [entry for entry in self._stacks[name] if entry[0] != owner]
            if stack:
                self._stacks[name] = stack
            else:
                del self._stacks[name]


class Registry:
    """Strategies, adapters and the plugins that provided them (use the module's ``registry``)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._reset_state()

    def _reset_state(self) -> None:
        self._loaded = False
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._strategies = _Table("strategy")
        self._adapters = _Table("adapter")
        self._plugins: dict[str, PluginInfo] = {}

    def reset(self) -> None:
        """Forget every plugin; the next use loads the built-ins and entry points again."""
        with self._lock:
            self._reset_state()

    # ------------------------------------------------------------------ loading
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            for module_name in DEFAULT_PLUGINS:
                module = importlib.import_module(module_name)
                info = PluginInfo(module_name, "tokenmerge", _own_version(), builtin=True)
                self._add_plugin(module, module_name, info)
            if os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false"):
                return
            for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                self._load_entry_point(entry_point)

    def _load_entry_point(self, entry_point: importlib.metadata.EntryPoint) -> None:
        dist = getattr(entry_point, "dist", None)
        info = PluginInfo(
            entry_point.name,
            distribution=dist.metadata["Name"] if dist else None,
            version=dist.version if dist else None,
        )
        origin = f"{info.distribution} {info.version}" if dist else entry_point.value
        try:
            plugin = entry_point.load()
            if entry_point.name in self._plugins or self._pm.is_registered(plugin):
                raise PluginError("a plugin of that name or object is already registered")
            self._add_plugin(plugin, entry_point.name, info)
        except Exception as error:  # noqa: BLE001 - any third-party failure is skipped
            warnings.warn(
                f"tokenmerge plugin {entry_point.name!r} (from {origin}) failed to load and "
                f"was skipped: {type(error).__name__}: {error}",
                PluginWarning,
                stacklevel=3,
            )

    def _add_plugin(self, plugin: Any, name: str, info: PluginInfo) -> None:
        """Register one plugin atomically: every name it registers, or none."""
        self._pm.register(plugin, name=name)
        batch = _Batch(name)
        try:
            for hook, register in (
                (self._pm.hook.tokenmerge_register_strategies, batch.strategy),
                (self._pm.hook.tokenmerge_register_adapters, batch.adapter),
            ):
                for impl in hook.get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=register)
            self._commit(batch)
        except Exception:
            self._pm.unregister(plugin)
            raise
        info.strategies = sorted(batch.strategies)
        info.adapters = sorted(batch.adapters)
        self._plugins[name] = info

    def _commit(self, batch: _Batch) -> None:
        self._strategies.check(batch.strategies, batch.owner)
        self._adapters.check(batch.adapters, batch.owner)
        self._strategies.push(batch.strategies, batch.owner)
        self._adapters.push(batch.adapters, batch.owner)

    # ------------------------------------------------------------------ run-time plugins
    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object or module at run time; returns its name.

        Raises:
            PluginError: the name is taken.
            DuplicateNameError: it registers a strategy or adapter name that exists, without
                ``replace=True``.
        """
        self._ensure_loaded()
        with self._lock:
            name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
            if name in self._plugins:
                raise PluginError(
                    f"a plugin named {name!r} is already registered; pass another name= or "
                    "unregister_plugin it first"
                )
            if self._pm.is_registered(plugin):
                raise PluginError(
                    f"this plugin object is already registered as "
                    f"{self._pm.get_name(plugin)!r}; register it once"
                )
            self._add_plugin(plugin, name, PluginInfo(name))
            return name

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and every strategy and adapter it registered."""
        self._ensure_loaded()
        with self._lock:
            if name not in self._plugins:
                raise UnknownNameError(unknown_name_message("plugin", name, self._plugins))
            self._pm.unregister(name=name)
            del self._plugins[name]
            self._strategies.drop(name)
            self._adapters.drop(name)

    # ------------------------------------------------------------------ look-ups
    def strategy(self, name: str) -> "type[Strategy]":
        """The strategy class registered as ``name``."""
        self._ensure_loaded()
        if name not in self._strategies:
            raise UnknownStrategyError(
                unknown_name_message("strategy", name, self._strategies.names())
            )
        return self._strategies.get(name)

    def adapter(self, name: str) -> AdapterSpec:
        """The adapter spec registered as ``name``."""
        self._ensure_loaded()
        if name not in self._adapters:
            raise UnknownAdapterError(unknown_name_message("adapter", name, self._adapters.names()))
        return self._adapters.get(name)

    def strategy_names(self) -> list[str]:
        self._ensure_loaded()
        return self._strategies.names()

    def adapter_specs(self) -> list[AdapterSpec]:
        self._ensure_loaded()
        return [self._adapters.get(name) for name in self._adapters.names()]

    def config_classes(self) -> "list[type[MergeConfig]]":
        self._ensure_loaded()
        return [self._strategies.get(name).config_class for name in self._strategies.names()]

    def plugins(self) -> list[PluginInfo]:
        self._ensure_loaded()
        return [self._plugins[name] for name in sorted(self._plugins)]

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        self._ensure_loaded()
        return self._pm


registry = Registry()


def _filter(names: list[str], pattern: str | list[str]) -> list[str]:
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def list_strategies(pattern: str | list[str] = "*") -> list[str]:
    """Names of the registered strategies matching a wildcard pattern (or any of several).

    Example:
        >>> import tokenmerge
        >>> tokenmerge.list_strategies()
        ['random', 'retom', 'tome']
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
    names = [
        spec.name
        for spec in registry.adapter_specs()
        if available is None or spec.available == available
    ]
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

    Example:
        >>> import tokenmerge
        >>> from tokenmerge.strategies.random import RandomStrategy, RandomConfig
        >>> from typing import Literal
        >>> class ShuffleConfig(RandomConfig):
        ...     strategy: Literal["shuffle"] = "shuffle"
        >>> class Shuffle(RandomStrategy):
        ...     name = "shuffle"
        ...     config_class = ShuffleConfig
        >>> class Plugin:
        ...     @tokenmerge.hookimpl
        ...     def tokenmerge_register_strategies(self, register):
        ...         register(Shuffle)
        >>> tokenmerge.register_plugin(Plugin(), name="shuffle-plugin")
        'shuffle-plugin'
        >>> "shuffle" in tokenmerge.list_strategies()
        True
        >>> tokenmerge.unregister_plugin("shuffle-plugin")
    """
    return registry.register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    """Unregister a plugin and everything it registered."""
    registry.unregister_plugin(name)


def register_strategy(cls: "type[Strategy]", *, replace: bool = False) -> None:
    """Register one strategy class at run time (a one-strategy plugin named after it).

    With ``replace=True`` it takes the name over from whoever registered it before.
    """
    from .strategy import Strategy

    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise PluginError(f"register_strategy takes a tokenmerge.Strategy subclass; got {cls!r}")
    _register_single("strategy", cls.validate_class(), cls, replace)


def register_adapter(spec: AdapterSpec, *, replace: bool = False) -> None:
    """Register one adapter spec at run time (a one-adapter plugin named after it).

    With ``replace=True`` it takes the name over from whoever registered it before.
    """
    if not isinstance(spec, AdapterSpec):
        raise PluginError(f"register_adapter takes a tokenmerge.AdapterSpec; got {spec!r}")
    _register_single("adapter", spec.name, spec, replace)


def _register_single(kind: str, name: str, item: Any, replace: bool) -> None:
    def register_one(register: Callable[..., None]) -> None:
        register(item, replace=replace)

    hook = (
        "tokenmerge_register_strategies" if kind == "strategy" else "tokenmerge_register_adapters"
    )
    plugin = SimpleNamespace(**{hook: hookspecs.hookimpl(register_one)})
    plugin_name = f"{kind}:{name}"
    with registry._lock:
        if replace and plugin_name in {p.name for p in registry.plugins()}:
            registry.unregister_plugin(plugin_name)  # an earlier single registration of ours
        registry.register_plugin(plugin, name=plugin_name)
