"""Meta-tests of the documentation: every hook is documented and tested, every public name is in
the API reference (and the reference's directives resolve), every page is in the navigation, and
the generated configuration reference lists every field of every registered config class.

All static and fast: nothing here builds the site (``make docs`` does, in CI). Where the site's
build code decides something (griffe's view of the installed package, the config reference), the
tests call that code itself, from docs/hooks.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
import sys
import typing
from pathlib import Path
from typing import Literal

import griffe
import pytest
import yaml
from pydantic import Field

import tokenmerge
from tokenmerge import hookspecs
from tokenmerge.config import MergeConfig
from tokenmerge.registry import registry
from tokenmerge.selectors import Sites
from tokenmerge.strategies.cells import CellConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
DIRECTIVE = re.compile(
    r"^::: (?P<target>[\w.]+)[ \t]*\n(?P<options>(?:[ \t]+.*\n|[ \t]*\n)*)", re.M
)


def _load_hooks_module():
    """docs/hooks.py, the site's build code, imported from its file (no bytecode left in docs/)."""
    spec = importlib.util.spec_from_file_location("tokenmerge_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


docs_hooks = _load_hooks_module()


@pytest.fixture(autouse=True)
def _fresh_registry():
    yield
    registry.reset()


@pytest.fixture(scope="module")
def griffe_tokenmerge(tmp_path_factory):
    """tokenmerge as mkdocstrings sees it: griffe loading the tree docs/hooks.py lays out."""
    search_path = docs_hooks.installed_package_tree(tmp_path_factory.mktemp("griffe"))
    loader = griffe.GriffeLoader(search_paths=[str(search_path)])
    # as mkdocstrings loads: by name only (a relative path would find ./tokenmerge, the source)
    loader.load("tokenmerge", try_relative_path=False)
    loader.load("tokenmerge_bench", try_relative_path=False)  # the bench's pages
    loader.resolve_aliases(implicit=True, external=False)
    return loader


def api_directives() -> list[tuple[Path, str, list[str] | None]]:
    """``(page, target, members)`` of every ``::: target`` in the API pages; ``members`` is the
    directive's ``members:`` option, or None when it has none (everything public renders)."""
    found = []
    for page in API_PAGES:
        for match in DIRECTIVE.finditer(page.read_text()):
            options = yaml.safe_load(match["options"] or "") or {}
            members = (options.get("options") or {}).get("members")
            found.append((page, match["target"], members))
    return found


# ---------------------------------------------------------------- hooks


def hookspec_names() -> list[str]:
    return [name for name, f in vars(hookspecs).items() if hasattr(f, "tokenmerge_spec")]


def test_hookspecs_are_found():
    assert hookspec_names() == [
        "tokenmerge_register_strategies",
        "tokenmerge_register_adapters",
        "tokenmerge_register_commands",
    ]


@pytest.mark.parametrize("hook", hookspec_names())
def test_every_hookspec_is_documented(hook):
    plugins_page = (DOCS / "plugins.md").read_text()
    named_in = [p.name for p in [DOCS / "plugins.md", *API_PAGES] if hook in p.read_text()]
    assert hook in plugins_page or named_in, f"{hook} is named in no page of docs/"
    # and rendered: the hookspecs module's page lists it (its docstring is the reference)
    rendered = [
        target
        for _, target, members in api_directives()
        if target == f"tokenmerge.hookspecs.{hook}"
        or (target == "tokenmerge.hookspecs" and (members is None or hook in members))
    ]
    assert rendered, f"{hook} is not rendered by any directive in docs/api/"


@pytest.mark.parametrize("hook", hookspec_names())
def test_every_hookspec_has_a_test(hook):
    # a test implements the hook: defines a function of its name (a @hookimpl) in a test module
    implementing = [
        path.name
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        if path.name != Path(__file__).name
        and re.search(rf"^\s*def {hook}\(", path.read_text(), re.M)
    ]
    assert implementing, f"no test under tests/ implements the hook {hook}"


# ---------------------------------------------------------------- API reference


def documented_public_names() -> dict[str, str]:
    """Name in ``tokenmerge.__all__`` -> the API page whose directive renders it."""
    found = {}
    for page, target, members in api_directives():
        if target.startswith("tokenmerge.") and target.count(".") == 1:
            found.setdefault(target.split(".", 1)[1], page.name)
        elif target == "tokenmerge":
            for name in tokenmerge.__all__ if members is None else members:
                found.setdefault(name, page.name)
    return found


def test_every_public_name_is_in_the_api_reference():
    documented = documented_public_names()
    missing = [name for name in tokenmerge.__all__ if name not in documented]
    assert not missing, f"names in tokenmerge.__all__ without a directive in docs/api/: {missing}"


def test_every_plugin_author_name_is_in_the_api_reference():
    targets = {target for _, target, _ in api_directives()}
    missing = [n for n in tokenmerge.extend.__all__ if f"tokenmerge.extend.{n}" not in targets]
    assert not missing, f"tokenmerge.extend names without a directive in docs/api/: {missing}"


def test_every_api_directive_resolves(griffe_tokenmerge):
    # what mkdocstrings renders: a target griffe cannot find fails the build, and a member name
    # that does not exist is silently left out, so both are checked here
    collection = griffe_tokenmerge.modules_collection
    directives = api_directives()
    assert len(directives) > 40, "the API pages lost their directives"
    for page, target, members in directives:
        try:
            obj = collection.get_member(target)
        except KeyError:
            pytest.fail(f"{page.name}: '::: {target}' is not found by griffe")
        for member in members or []:
            assert member in obj.all_members, f"{page.name}: {target} has no member {member!r}"


def test_griffe_sees_every_module(griffe_tokenmerge):
    # the mapped packages (tokenmerge.strategies -> strategies/...) included: compare with what
    # the import system finds, as tests/test_docs.py walks it
    packages = ["tokenmerge", "tokenmerge.strategies", "tokenmerge.adapters"]
    imported = set(packages) | {
        m.name
        for package in packages
        for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".")
    }
    collection = griffe_tokenmerge.modules_collection
    missing = []
    for name in sorted(imported):
        try:
            collection.get_member(name)
        except KeyError:
            missing.append(name)
    assert not missing, f"modules griffe does not see (the docs would lack them): {missing}"
    assert {"tokenmerge.strategies.retom", "tokenmerge.adapters.diffusers_unet"} <= imported


def test_testing_and_bench_are_in_the_api_reference():
    targets = {target for _, target, _ in api_directives()}
    assert "tokenmerge.testing" in targets
    assert {"tokenmerge_bench.presets", "tokenmerge_bench.runner"} <= targets
    for name in tokenmerge.list_strategies():
        module = registry.strategy(name).__module__
        assert module in targets, f"the built-in strategy {name!r} ({module}) has no API entry"


# ---------------------------------------------------------------- site structure


def nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


class _TolerantLoader(yaml.SafeLoader):
    """Reads mkdocs.yml whatever tags it uses (``!ENV``, ``!!python/name:``...): as plain None."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
_TolerantLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, s, node: None)


def test_every_page_is_in_the_navigation():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_TolerantLoader)
    listed = nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(listed) == pages, "mkdocs.yml's nav and the pages in docs/ differ"
    assert config["hooks"] == ["docs/hooks.py"]


# ---------------------------------------------------------------- configuration reference


def reference_sections(markdown: str) -> dict[str, str]:
    """Heading text -> section body, for the ``###`` sections of the reference."""
    parts = re.split(r"^### (.+)$", markdown, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def table_rows(section: str) -> dict[str, str]:
    """Field name -> its whole table row."""
    return {m[1]: m[0] for m in re.finditer(r"^\| `(\w+)` \|.*$", section, re.M)}


def allowed_literals(annotation) -> list:
    """Every Literal value anywhere in an annotation."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in allowed_literals(arg)]


def check_reference_lists(markdown: str) -> None:
    sections = reference_sections(markdown)
    shared = table_rows(sections["Fields every config shares"])
    assert set(shared) == set(MergeConfig.model_fields)
    assert set(table_rows(sections["Sites"])) == set(Sites.model_fields)
    parts = re.split(r"^#### (.+)$", sections["Adapter options"], flags=re.M)
    adapters = {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}
    for spec in registry.table("adapter").values():
        options = table_rows(adapters[f"`{spec.name}`"])
        assert set(options) == set(spec.load().options_class.model_fields), spec.name
    names = registry.strategy_names()
    assert names, "no registered strategy"
    for name in names:
        cls = registry.strategy(name).config_class
        section = sections.get(f"`{name}`")
        assert section is not None, f"no section for strategy {name!r}"
        assert cls.__qualname__ in section
        own = table_rows(section)
        kept_line = re.search(r"it keeps as they are: (.*)\.$", section, re.M)
        kept = re.findall(r"`(\w+)`", kept_line[1]) if kept_line else []
        for field_name, field in cls.model_fields.items():
            if field_name in own:
                row = own[field_name]
            else:
                assert field_name in kept, f"{name}: field {field_name!r} is not listed"
                base = MergeConfig.model_fields[field_name]
                assert (field.annotation, field.default, field.description) == (
                    base.annotation,
                    base.default,
                    base.description,
                ), f"{name}: {field_name!r} differs from MergeConfig's but is listed as kept"
                row = shared[field_name]
            default = field.get_default(call_default_factory=True)
            shown = "Sites()" if default == Sites() else repr(default)  # its own table follows
            if not field.is_required():
                assert f"`{shown}`" in row, f"{name}.{field_name}: default {default!r}"
            for value in allowed_literals(field.annotation):
                assert f"`{value!r}`" in row, f"{name}.{field_name}: allowed value {value!r}"
            description = " ".join(field.description.split()).replace("|", "\\|")
            assert description in row, f"{name}.{field_name}: description"


def test_config_reference_lists_every_field_of_every_registered_config():
    check_reference_lists(docs_hooks.config_reference())


class DemoConfig(CellConfig):
    """A plugin's config with every kind of field the reference must render."""

    strategy: Literal["demo_reference"] = Field(default="demo_reference", description="Always.")
    mode: Literal["a", "b"] = Field(default="b", description="A choice | with a pipe.")
    scale: float = Field(default=0.25, gt=0, le=1, description="A bounded number.")
    sizes: tuple[int, ...] | None = Field(default=None, description="Optional sizes.")
    cache_interval: int = Field(default=7, ge=1, description="Changed default.")


def test_config_reference_lists_a_plugins_config():
    from tokenmerge.strategies.random import RandomStrategy

    class Demo(RandomStrategy):
        name = "demo_reference"
        config_class = DemoConfig

    class Plugin:
        @tokenmerge.extend.hookimpl
        def tokenmerge_register_strategies(self, register):
            register(Demo)

    tokenmerge.extend.register_plugin(Plugin(), name="demo-reference-plugin")
    markdown = docs_hooks.config_reference()
    check_reference_lists(markdown)
    section = reference_sections(markdown)["`demo_reference`"]
    rows = table_rows(section)
    assert "from the plugin `demo-reference-plugin`, registered at run time" in section
    assert "in (0, 1]" in rows["scale"] and "`0.25`" in rows["scale"]
    assert "one of `'a'`, `'b'`" in rows["mode"] and "\\|" in rows["mode"]
    assert "`7`" in rows["cache_interval"]  # a redefined shared field gets its own row
    assert "at most 0.75" in section  # the ratio limit at the defaults (2 x 2 cells)


def test_describe_type():
    fields = MergeConfig.model_fields
    describe = docs_hooks.describe_type
    assert describe(fields["ratio"].annotation) == (
        "`float` in [0, 1), or mapping `str` -> (`float` in [0, 1)), "
        "or tuple of (`float` in [0, 1))"
    )
    sites = Sites.model_fields
    assert describe(sites["min_tokens"].annotation, sites["min_tokens"].metadata) == (
        "`int` >= 1, or `None`"
    )
    assert describe(sites["stages"].annotation) == (
        "tuple of (one of `'down'`, `'mid'`, `'up'`, `'first'`, `'middle'`, `'last'`), or `None`"
    )
    assert describe(bool) == "`True` or `False`"


def test_configuration_page_has_the_marker():
    # the hook replaces it; without it the reference would silently vanish from the site
    assert (DOCS / "configuration.md").read_text().count(docs_hooks.MARKER) == 1
