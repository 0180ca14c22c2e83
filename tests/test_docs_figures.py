"""The docs' pictures: each one is remade by ``make figures`` (benchmarks/docs_figures.py) or is
the dated record of one past study, and every figure the script makes is shown somewhere."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
IMAGE_LINK = re.compile(r"\]\((?:\.\./)?(?:docs/)?images/(?P<name>[^)\s]+)\)")


def _figures_module():
    spec = importlib.util.spec_from_file_location(
        "docs_figures", ROOT / "benchmarks" / "docs_figures.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


FIGURES = _figures_module()


def _shown() -> dict[str, list[str]]:
    """Image file name -> the pages that show it."""
    shown: dict[str, list[str]] = {}
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for match in IMAGE_LINK.finditer(page.read_text()):
            shown.setdefault(match["name"], []).append(page.name)
    return shown


def test_every_image_shown_is_made_by_the_script_or_dated_by_its_study():
    made = {figure.path.name for figure in FIGURES.FIGURES}
    unexplained = sorted(set(_shown()) - made - set(FIGURES.STUDIES))
    assert not unexplained, (
        f"images shown in the docs that neither `make figures` makes nor STUDIES dates: "
        f"{unexplained}; add them to benchmarks/docs_figures.py"
    )


def test_every_figure_is_shown_and_exists():
    shown = _shown()
    for figure in FIGURES.FIGURES:
        assert figure.path.is_file(), f"{figure.path} is missing: run make figures"
        assert figure.path.name in shown, f"{figure.path.name} is made but no page shows it"


@pytest.mark.parametrize("name, page", sorted(FIGURES.STUDIES.items()))
def test_a_study_figure_is_shown_on_the_page_that_dates_it(name, page):
    assert (DOCS / "images" / name).is_file()
    assert page in _shown().get(name, []), f"{name} should be shown on {page}, which dates it"


def test_no_image_lies_unused():
    unused = sorted({p.name for p in (DOCS / "images").glob("*.png")} - set(_shown()))
    assert not unused, f"images no page shows (delete them or show them): {unused}"


@pytest.mark.parametrize("figure", FIGURES.FIGURES, ids=lambda figure: figure.name)
def test_every_figure_command_parses(figure):
    # the command lines `make figures` runs, parsed as the command would (running them takes
    # minutes: make figures does that)
    from tokenmerge.cli import _build_parser, load_commands

    args = _build_parser(load_commands()).parse_args([*figure.argv, "--output", "out"])
    assert args.command == figure.command
