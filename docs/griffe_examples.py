"""A griffe extension for the API reference (``extensions:`` in mkdocs.yml): reads the code base's
``Example:`` docstring sections as Google-style ``Examples:``.

griffe's Google parser knows only the plural as a section; a singular ``Example:`` becomes an
admonition whose ``>>>`` lines Markdown renders as nested quotes (and whose ``['a', 'b']`` outputs
as broken cross-references). As ``Examples:`` they render as Python code blocks.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
