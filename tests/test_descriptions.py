"""Config field descriptions stay short: what the field does and its default; the evidence behind
a default lives in docs/defaults.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tokenmerge.config import MergeConfig
from tokenmerge.registry import registry
from tokenmerge.selectors import Sites

#: two lines of the project's 100-character width
MAX_DESCRIPTION = 200
#: a dated measurement ("2026-11-22") or a measured figure ("38.7 %", "x1.371", "0.256 with")
MEASUREMENT = re.compile(r"\d{4}-\d{2}-\d{2}|\d %|\d%|\bx\d|\d\.\d{2,}")


def _fields() -> list[tuple[str, str, str]]:
    registry.reset()
    options = [spec.load().options_class for spec in registry.table("adapter").values()]
    classes = [MergeConfig, Sites, *registry.config_classes(), *dict.fromkeys(options)]
    registry.reset()
    return [
        (cls.__name__, name, info.description or "")
        for cls in classes
        for name, info in cls.model_fields.items()
    ]


@pytest.mark.parametrize(("owner", "field", "description"), _fields())
def test_field_description_is_at_most_two_lines_without_measurements(owner, field, description):
    assert len(description) <= MAX_DESCRIPTION, (
        f"{owner}.{field}: {len(description)} characters; keep it to two lines and move the "
        "evidence to docs/defaults.md"
    )
    found = MEASUREMENT.findall(description)
    assert not found, f"{owner}.{field} cites measurements {found}: move them to docs/defaults.md"


def test_every_default_with_evidence_has_its_section_in_the_docs():
    page = (Path(__file__).parents[1] / "docs" / "defaults.md").read_text()
    headings = {
        h.strip()
        for line in page.splitlines()
        if line.startswith("### ")
        for h in line[4:].split(",")
    }
    for field in (
        "window_size",
        "scope",
        "value_correction",
        "cache_interval",
        "sites.levels",
        "share_cfg_plan",
        "ratio",
        "sites.min_tokens",
        "sites.mlp",
    ):
        assert field in headings, f"docs/defaults.md has no section for {field}"
