"""Package-level guarantees: what the core imports, what importing tokenmerge does, an import
graph without cycles, and the public namespaces (with their deprecated spellings)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import tokenmerge
from tokenmerge import extend

SCRIPT = """
import json, sys, torch, tokenmerge
loaded_at_import = sorted(m for m in sys.modules if m.startswith("tokenmerge.strategies."))
model = torch.nn.Sequential(torch.nn.Linear(8, 8))
for name in tokenmerge.list_strategies():
    with tokenmerge.apply(model, name, ratio=0.5, adapter="generic", include=["0"], min_tokens=1):
        model(torch.randn(2, 64, 8))
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("diffusers", "timm", "transformers", "torchvision"))
print(json.dumps({"loaded_at_import": loaded_at_import, "heavy": heavy}))
"""


def _run() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_imports_no_model_library_and_loads_plugins_lazily():
    result = _run()
    assert result["heavy"] == [], f"the core imported model libraries: {result['heavy']}"
    assert result["loaded_at_import"] == [], "built-in strategies must load on first use"


IMPORT_ONLY = """
import json, sys, torch
before = set(sys.modules)
import tokenmerge
tokenmerge.apply  # the library's names load on first use: load them
print(json.dumps(sorted(set(sys.modules) - before)))
"""
#: what ``import tokenmerge`` must not pull in: each takes a large part of a second or more to
#: import (torch._dynamo, which torch.compiler.disable imports, took 0.9 s of the 1.0 s it cost)
HEAVY = ("torch._dynamo", "diffusers", "timm", "transformers", "matplotlib")


def test_import_tokenmerge_is_light():
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == [], f"import tokenmerge imported {heavy[:10]} ({len(heavy)} modules)"
    assert "tokenmerge.api" in loaded  # the check saw the library load


# ---------------------------------------------------------------------------- the import graph

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (pyproject's package-dir)
PACKAGE_DIRS = {
    "tokenmerge": ROOT / "tokenmerge",
    "tokenmerge.strategies": ROOT / "strategies",
    "tokenmerge.adapters": ROOT / "adapters",
}


def library_modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the library (core, strategies, adapters)."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _imports(path: Path, module: str) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every import statement in ``path``: at the top, inside functions and
    under ``if TYPE_CHECKING`` alike, relative ones resolved (``name`` is None for ``import a``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(base, alias.name) for alias in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the library modules it imports. ``from a import b`` imports module ``a.b`` when
    there is one, else ``a``; the implicit imports of parent packages, which Python runs first,
    are left out (every module would otherwise depend on ``tokenmerge``)."""
    modules = library_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for base, imported in _imports(path, name):
            target = f"{base}.{imported}" if f"{base}.{imported}" in modules else base
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module: each holds import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest closed path from ``start`` through modules of its component (breadth first)."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node] & component):
            if target == start:
                return [*paths[node], start]
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError("a strongly connected component always holds a cycle")


def test_library_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"tokenmerge", "tokenmerge.registry", "tokenmerge.strategies.retom"} <= set(graph)
    assert "tokenmerge.strategy" in graph["tokenmerge.strategies.retom"]  # edges are found
    cycles = [" -> ".join(cycle_through(graph, c, min(c))) for c in tangles(graph)]
    assert not cycles, "import cycles among the library's modules:\n" + "\n".join(cycles)


def test_cycle_finder_names_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    (component,) = tangles(graph)
    assert component == {"a", "b", "c"}
    assert cycle_through(graph, component, "a") == ["a", "b", "c", "a"]


def test_function_local_and_type_checking_imports_are_edges(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .config import MergeConfig\n"
        "def f():\n    from . import registry\n    import tokenmerge.plan\n"
        "    from ..strategies import tome\n"
    )
    found = _imports(source, "tokenmerge.adapters.mod")
    assert ("tokenmerge.adapters.config", "MergeConfig") in found
    assert ("tokenmerge.adapters", "registry") in found
    assert ("tokenmerge.plan", None) in found
    assert ("tokenmerge.strategies", "tome") in found


# ---------------------------------------------------------------------------- public namespaces


def test_top_level_holds_what_users_call():
    assert len(tokenmerge.__all__) <= 22
    assert not set(tokenmerge.__all__) & set(extend.__all__)
    for name in tokenmerge.__all__:
        assert hasattr(tokenmerge, name)
    for name in extend.__all__:
        assert getattr(extend, name) is not None


@pytest.mark.parametrize("name", tokenmerge._MOVED_TO_EXTEND)
def test_old_top_level_spelling_warns_and_names_the_new_one(name):
    with pytest.warns(DeprecationWarning, match=rf"tokenmerge\.extend\.{name}\b"):
        value = getattr(tokenmerge, name)
    assert value is getattr(extend, name)


def test_from_import_of_an_old_spelling_warns():
    with pytest.warns(DeprecationWarning, match=r"use tokenmerge\.extend\.hookimpl"):
        from tokenmerge import hookimpl
    assert hookimpl is extend.hookimpl


def test_unknown_attribute_is_still_an_attribute_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
            _ = tokenmerge.nothing_here
        with pytest.raises(AttributeError, match="no attribute 'AdapterOptions'"):
            _ = tokenmerge.AdapterOptions  # new in tokenmerge.extend: never a top-level name
        assert not hasattr(tokenmerge.config, "nothing_here")


@pytest.mark.parametrize("name", ["load_config", "config_union"])
def test_moved_config_functions_keep_their_old_path(name):
    import tokenmerge.load

    with pytest.warns(DeprecationWarning, match=r"import it from tokenmerge\.load"):
        value = getattr(tokenmerge.config, name)
    assert value is getattr(tokenmerge.load, name)
