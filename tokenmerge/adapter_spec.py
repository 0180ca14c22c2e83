"""``AdapterSpec``: how the registry finds and loads an adapter without importing it first."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .errors import PluginError, UnsupportedModelError

if TYPE_CHECKING:
    from .adapter import Adapter

__all__ = ["AdapterSpec"]


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

    Example:
        >>> from tokenmerge.extend import AdapterSpec
        >>> spec = AdapterSpec(name="mine", target="my_package.adapter:MyAdapter",
        ...                    requires={"my-library": "1.0"}, extra="mine")
        >>> spec.install_hint
        "pip install 'tokenmerge[mine]'"
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

    def load(self) -> type[Adapter]:
        """Import and return the adapter class (raises with the install hint if unavailable)."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise UnsupportedModelError(f"adapter {self.name!r} is unavailable: {reason}")
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)
