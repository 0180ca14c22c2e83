"""Every example in docstrings, the README and docs/ runs, so the documentation can't rot."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import tokenmerge

ROOT = Path(__file__).resolve().parents[1]
# The editable install maps tokenmerge.strategies / .adapters to other folders, which walking
# tokenmerge.__path__ alone would miss: walk each package.
PACKAGES = ["tokenmerge", "tokenmerge.strategies", "tokenmerge.adapters"]
MODULES = sorted(
    set(PACKAGES)
    | {
        m.name
        for package in PACKAGES
        for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")
    }
)
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(autouse=True)
def _fresh_registry():
    yield
    tokenmerge.registry.registry.reset()


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"


def test_every_public_function_has_an_example():
    missing = []
    for name in tokenmerge.__all__:
        obj = getattr(tokenmerge, name)
        if callable(obj) and not isinstance(obj, type) and ">>>" not in (obj.__doc__ or ""):
            if name not in {"hookimpl", "unregister_plugin", "register_strategy",
                            "register_adapter"}:  # fmt: skip
                missing.append(name)
    assert not missing, f"public functions without a runnable example: {missing}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.name)
def test_markdown_python_blocks_run(path):
    blocks = PYTHON_BLOCK.findall(path.read_text())
    for index, block in enumerate(blocks):
        namespace: dict = {"__name__": f"doc_{path.stem}_{index}"}
        exec(compile(block, f"{path.name}[python block {index}]", "exec"), namespace)


def test_every_module_is_collected():
    # guards the parametrisation above against silently missing the mapped packages
    for name in ("tokenmerge.strategies.retom", "tokenmerge.adapters.generic", "tokenmerge.plan"):
        assert name in MODULES


def test_markdown_has_examples_where_expected():
    # guards the test above against silently finding nothing (a changed fence style, say)
    assert PYTHON_BLOCK.findall((ROOT / "README.md").read_text())
    assert PYTHON_BLOCK.findall((ROOT / "docs" / "getting-started.md").read_text())
