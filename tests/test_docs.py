"""Every example in docstrings, the README and docs/ runs, so the documentation can't rot.

A ```python block in Markdown runs as written, in a fresh module of its own. One that cannot run
here carries its reason in an HTML comment on the line right above it,
``<!-- not run: needs a GPU -->``; a block skipped without a reason fails. Examples that load
weights with ``from_pretrained`` run against a tiny random model saved for the occasion (see
``PRETRAINED``): nothing is downloaded.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
import sys
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_pipelines import tiny_flux, tiny_stable_diffusion, tiny_stable_diffusion_xl

import tokenmerge

ROOT = Path(__file__).resolve().parents[1]
# The editable install maps tokenmerge.strategies / .adapters to other folders, which walking
# tokenmerge.__path__ alone would miss: walk each package. tokenmerge_bench is the bench's
# distribution (benchmarks/), documented by the same examples.
PACKAGES = ["tokenmerge", "tokenmerge.strategies", "tokenmerge.adapters", "tokenmerge_bench"]
MODULES = sorted(
    set(PACKAGES)
    | {
        m.name
        for package in PACKAGES
        for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")
    }
)
EXAMPLES = ROOT / "examples"
MARKDOWN = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted(EXAMPLES.glob("*/README.md")),
]
# a fence, possibly indented (in a list or an admonition), with its language and its body
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S
)
SKIP = re.compile(r"<!--\s*not run\b\s*:?(?P<reason>.*?)-->\s*$", re.S)
# Python under another name would silently never run
PYTHON_ALIASES = {"py", "py3", "python3", "pycon", "ipython", "pyi"}


@dataclass
class Block:
    path: Path
    index: int
    line: int
    lang: str
    code: str
    skip_reason: str | None  # None: runs; "": marked "not run" without a reason (an error)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        marker = SKIP.search(before[-1]) if before else None
        blocks.append(
            Block(
                path=path,
                index=len(blocks),
                line=text.count("\n", 0, match.start()) + 1,
                lang=match["lang"].lower(),
                code=textwrap.dedent(match["body"]),
                skip_reason=marker["reason"].strip() if marker else None,
            )
        )
    return blocks


# ---------------------------------------------------------------- stand-ins for from_pretrained


#: repository ids the docs load, and what saves a tiny random stand-in for each
PRETRAINED: dict[str, Callable[[Path], Path]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": tiny_stable_diffusion,
    "stabilityai/stable-diffusion-xl-base-1.0": tiny_stable_diffusion_xl,
    "black-forest-labs/FLUX.1-dev": tiny_flux,
}


@pytest.fixture(scope="session")
def pretrained_folders(tmp_path_factory):
    """Repository id -> folder of its saved stand-in, each built on first use."""
    folders: dict[str, Path] = {}

    def folder_for(repo_id: str) -> Path:
        if repo_id not in folders:
            target = tmp_path_factory.mktemp(repo_id.replace("/", "--"))
            folders[repo_id] = PRETRAINED[repo_id](target)
        return folders[repo_id]

    return folder_for


@pytest.fixture
def redirect_from_pretrained(monkeypatch, pretrained_folders):
    """``from_pretrained`` of diffusers pipelines and models loads the stand-in for a known
    repository id and refuses any other remote id (nothing may be downloaded)."""
    from diffusers import DiffusionPipeline, ModelMixin

    def redirect(cls_owner):
        original = cls_owner.from_pretrained.__func__

        def from_pretrained(cls, name, *args, **kwargs):
            if isinstance(name, str) and name in PRETRAINED:
                name = pretrained_folders(name)
            elif not Path(name).exists():
                raise AssertionError(
                    f"a docs example loads {name!r}, which has no stand-in: add one to "
                    "PRETRAINED in tests/test_docs.py"
                )
            return original(cls, name, *args, **kwargs)

        monkeypatch.setattr(cls_owner, "from_pretrained", classmethod(from_pretrained))

    redirect(DiffusionPipeline)
    redirect(ModelMixin)


@pytest.fixture
def timm_without_download(monkeypatch):
    """``timm.create_model(..., pretrained=True)`` builds the same architecture with random
    weights: the example runs as written, nothing is downloaded."""
    import timm

    create_model = timm.create_model

    def random_weights(name, pretrained=False, **kwargs):
        return create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", random_weights)


# ---------------------------------------------------------------- the tests


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


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_python_blocks_run(path, request, monkeypatch, one_torch_thread):
    if path.is_relative_to(EXAMPLES):  # an example plugin's README runs as its users would:
        monkeypatch.delenv("TOKENMERGE_DISABLE_PLUGIN_AUTOLOAD")  # installed, found by entry point
        tokenmerge.registry.registry.reset()
    for block in markdown_blocks(path):
        if block.lang != "python" or block.skip_reason is not None:
            continue  # a skip without a reason fails test_skipped_blocks_state_a_reason
        if "from_pretrained(" in block.code:
            request.getfixturevalue("redirect_from_pretrained")
        if "pretrained=True" in block.code:
            request.getfixturevalue("timm_without_download")
        # a real module, as in a script: classes get a __module__ that imports back, so an
        # AdapterSpec target "module:Class" written in an example resolves
        name = re.sub(r"\W", "_", f"doc_{path.stem}_{block.index}")
        module = types.ModuleType(name)
        sys.modules[name] = module
        try:
            exec(compile(block.code, f"{block.where} (python block {block.index})", "exec"),
                 module.__dict__)  # fmt: skip
        finally:
            del sys.modules[name]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_skipped_blocks_state_a_reason(path):
    unexplained = [b.where for b in markdown_blocks(path) if b.skip_reason == ""]
    assert not unexplained, (
        f"blocks marked 'not run' without a reason: {unexplained}; write it in the comment: "
        "<!-- not run: needs a GPU -->"
    )


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_is_fenced_as_python(path):
    # a block fenced ```py (or left without a language in docs/) would never run
    wrong = [f"{b.where} ({b.lang!r})" for b in markdown_blocks(path) if b.lang in PYTHON_ALIASES]
    if path.is_relative_to(ROOT / "docs"):
        wrong += [f"{b.where} (no language)" for b in markdown_blocks(path) if not b.lang]
    assert not wrong, f"fence Python as ```python and give every docs fence a language: {wrong}"


def test_every_module_is_collected():
    # guards the parametrisation above against silently missing the mapped packages
    for name in ("tokenmerge.strategies.retom", "tokenmerge.adapters.generic", "tokenmerge.plan"):
        assert name in MODULES


def test_markdown_has_examples_where_expected():
    # guards the tests above against silently finding nothing (a changed fence style, say)
    for name in ("README.md", "docs/getting-started.md", "docs/write-a-strategy.md",
                 "docs/write-an-adapter.md"):  # fmt: skip
        blocks = markdown_blocks(ROOT / name)
        assert any(b.lang == "python" and b.skip_reason is None for b in blocks), name
    getting_started = (ROOT / "docs" / "getting-started.md").read_text()
    assert "from_pretrained(" in getting_started  # runs through redirect_from_pretrained


def test_skip_marker_parsing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not run: needs a GPU -->\n```python\nx\n```\n\n"
        "<!-- not run -->\n```python\ny\n```\n\n"
        "text\n\n```python\nz\n```\n\n"
        "- item\n\n    ```bash\n    make docs\n    ```\n"
    )
    blocks = markdown_blocks(page)
    assert [(b.lang, b.skip_reason, b.code) for b in blocks] == [
        ("python", "needs a GPU", "x\n"),
        ("python", "", "y\n"),
        ("python", None, "z\n"),
        ("bash", None, "make docs\n"),
    ]
