"""The built documentation site as a reader meets it: links that lead somewhere, code that fits.

``docs/check_links.py`` checks the built site's internal links and anchors (``make docs`` runs it);
the tests here prove it catches what it should, on a tiny fake site. The line-length tests keep
every code line within the width of material's content column, so no reader has to scroll a code
block sideways.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
from pathlib import Path

import pytest
from test_docs import MARKDOWN, MODULES, ROOT, markdown_blocks

# Material's content column shows 82 characters of a code block at any window wide enough for both
# sidebars (the column and the code font scale together: measured in headless Chromium at 1280 and
# 1920 px wide), and 80 in the API reference, where an 81-character docstring line scrolled.
CODE_WIDTH = 80

# the README and every docs page (GitHub's README column is wider: the docs' limit holds there)
CODE_PAGES = [
    path for path in MARKDOWN if path == ROOT / "README.md" or path.is_relative_to(ROOT / "docs")
]


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_links", ROOT / "docs" / "check_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_links = _load_checker()


def _long_code_lines(path: Path) -> list[str]:
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [
        f"{shown}:{block.line + 1 + number} ({len(line)} chars): {line}"
        for block in markdown_blocks(path)
        for number, line in enumerate(block.code.splitlines())
        if len(line) > CODE_WIDTH
    ]


def _assert_code_fits(paths: list[Path]) -> None:
    long = [entry for path in paths for entry in _long_code_lines(path)]
    assert not long, (
        f"{len(long)} code line(s) wider than the docs' code column ({CODE_WIDTH} characters; "
        "readers would scroll sideways) - wrap them:\n" + "\n".join(long)
    )


# ---------------------------------------------------------------- code lines fit the page


@pytest.mark.parametrize("path", CODE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_lines_fit_the_page(path):
    _assert_code_fits([path])


def _long_docstring_example_lines(module_name: str) -> list[str]:
    # mkdocstrings renders an Example(s) section as a code block of its ">>>" lines and outputs
    module = importlib.import_module(module_name)
    long = []
    for test in doctest.DocTestFinder(exclude_empty=True).find(module):
        for example in test.examples:
            first, *rest = example.source.splitlines()
            lines = [f">>> {first}", *(f"... {line}" for line in rest), *example.want.splitlines()]
            long += [f"{test.name} ({len(x)} chars): {x}" for x in lines if len(x) > CODE_WIDTH]
    return long


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_example_lines_fit_the_page(module_name):
    long = _long_docstring_example_lines(module_name)
    assert not long, (
        f"{len(long)} docstring example line(s) wider than the API reference's code column "
        f"({CODE_WIDTH} characters, with the >>> prompt) - wrap them:\n" + "\n".join(long)
    )


def test_long_code_lines_are_found(tmp_path):
    page = tmp_path / "page.md"
    fits, wide = "x" * CODE_WIDTH, "y" * (CODE_WIDTH + 1)
    page.write_text(f"```bash\n{fits}\n```\n\n{wide} in prose is fine\n\n- item\n\n    ```text\n"
                    f"    {fits}\n    {wide}\n    ```\n")  # fmt: skip
    # the indented block's line counts without its indentation, as it renders
    assert _long_code_lines(page) == [f"{page}:11 ({CODE_WIDTH + 1} chars): {wide}"]


# ---------------------------------------------------------------- the link checker


def _site(root: Path, pages: dict[str, str]) -> Path:
    for name, body in pages.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<!doctype html><html><body>{body}</body></html>")
    return root


def test_link_checker_passes_a_sound_site(tmp_path, capsys):
    site = _site(
        tmp_path,
        {
            "index.html": '<a href="guide.html#setup">setup</a> <a href="#top" id="top">top</a>'
            '<a href="api/index.html">api</a> <img src="images/logo.png" alt="logo">'
            '<a href="https://example.org/">out</a> <a href="mailto:me@example.org">me</a>',
            "guide.html": '<h2 id="setup">Setup</h2><a href="index.html">home</a>'
            '<a href="api/">api</a> <a href="guide.html?q=1#setup">again</a>',
            "api/index.html": '<a href="../guide.html#setup">up</a><a name="old">old</a>'
            '<a href="#old">old</a> <link rel="stylesheet" href="/style.css">'
            '<img srcset="../images/logo.png 1x, ../images/logo%402x.png 2x" alt="">',
        },
    )
    for name in ("images/logo.png", "images/logo@2x.png", "style.css"):
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(b"")
    broken, external, checked = check_links.check_site(site)
    assert broken == []
    assert set(external) == {"https://example.org/", "mailto:me@example.org"}
    assert checked == 12
    assert check_links.main([str(site)]) == 0
    output = capsys.readouterr().out
    assert "https://example.org/" in output and "internal links OK" in output


def test_link_checker_catches_broken_links_and_anchors(tmp_path, capsys):
    site = _site(
        tmp_path,
        {
            "index.html": '<a href="guide.html#setup">fine</a>\n'
            '<a href="gone.html">a missing page</a>\n'
            '<a href="guide.html#install">a missing anchor</a>\n'
            '<a href="#nowhere">a missing anchor on this page</a>\n'
            '<img src="images/missing.png" alt="">\n'
            '<a href="../outside.html">above the site</a>',
            "guide.html": '<h2 id="setup">Setup</h2>',
        },
    )
    broken, _, _ = check_links.check_site(site)
    assert broken == [
        "index.html:2: gone.html (no file gone.html)",
        "index.html:3: guide.html#install (no id 'install' in guide.html)",
        "index.html:4: #nowhere (no id 'nowhere' in index.html)",
        "index.html:5: images/missing.png (no file images/missing.png)",
        "index.html:6: ../outside.html (points outside the site)",
    ]
    assert check_links.main([str(site)]) == 1
    errors = capsys.readouterr().err
    assert "5 broken internal link(s)" in errors and "guide.html#install" in errors


def test_link_checker_refuses_a_missing_site(tmp_path):
    assert check_links.main([str(tmp_path / "no-site")]) == 2
