"""mkdocs hooks of the tokenmerge site (``hooks:`` in mkdocs.yml). Two jobs:

1. **Point mkdocstrings (griffe) at the installed package.** griffe reads source files, it does
   not import. Pointed at the repository it finds ``tokenmerge/`` but no ``tokenmerge.strategies``
   or ``tokenmerge.adapters``: pyproject's ``[tool.setuptools.package-dir]`` maps those to the
   top-level ``strategies/`` and ``adapters/``. An editable install's finder knows the mapping, but
   griffe's reading of it only adds the mapped folders' parents to its search path, where
   ``strategies/`` is a top-level package. So ``on_config`` asks the import system where each part
   of the *installed* package lives (``importlib.util.find_spec``: the editable finder, or
   site-packages for a wheel), links them into one ``tokenmerge/`` tree in a temporary folder,
   and puts that folder first in the python handler's ``paths``. The bench's distribution,
   ``tokenmerge_bench`` (built from ``benchmarks/``, which is on no search path either), is
   linked in beside it the same way.
2. **Generate the configuration reference.** ``on_page_markdown`` replaces ``MARKER`` in
   ``configuration.md`` with ``config_reference()``: every registered strategy's config class
   (read from the registry, so an installed plugin's appears too) with every field, its type and
   allowed values, default and description, all read from the pydantic models.

Why a hook and not mkdocstrings' pydantic support (the griffe-pydantic extension): that reads the
classes the API pages name, from source, so a plugin's config installed in the environment would
not appear unless a page named it; here the list of classes comes from the registry itself, the
same one ``load_config`` validates against, and the allowed values are read from the same pydantic
metadata that validates them.

The tests import this file and call ``config_reference()`` and ``installed_package_tree()``.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo

try:
    from mkdocs.plugins import event_priority
except ImportError:  # the tests call config_reference() where mkdocs may not be installed

    def event_priority(priority: float) -> Any:
        return lambda function: function


#: replaced in configuration.md by the generated reference
MARKER = "<!-- config-reference -->"
#: subpackages that pyproject's package-dir maps out of tokenmerge/ (tests/test_meta.py checks
#: that griffe then finds every module the import system finds)
MAPPED_SUBPACKAGES = ("strategies", "adapters")
#: other installed top-level packages the API pages document: the bench's (benchmarks/)
BESIDE = {"tokenmerge_bench": "pip install -e benchmarks"}


# ------------------------------------------------------------------ 1. griffe's search path


def installed_package_tree(dest: Path) -> Path:
    """Lay the installed ``tokenmerge`` out as one folder tree, ``dest/tokenmerge``, with the
    packages of ``BESIDE`` next to it (``dest/tokenmerge_bench``); returns ``dest``, the folder
    to put on griffe's search path.

    Every entry of the installed ``tokenmerge/`` folder is linked in as it is; each mapped
    subpackage is linked from wherever the import system finds it. For a wheel install the
    subpackages already sit inside ``tokenmerge/`` and are linked like everything else.
    """
    root_spec = importlib.util.find_spec("tokenmerge")
    if root_spec is None or not root_spec.submodule_search_locations:
        raise RuntimeError("tokenmerge is not installed in the environment that runs mkdocs")
    root = Path(root_spec.submodule_search_locations[0])
    sources = {
        entry.name: entry
        for entry in root.iterdir()
        if entry.name != "__pycache__" and not entry.name.startswith(".")
    }
    for name in MAPPED_SUBPACKAGES:
        spec = importlib.util.find_spec(f"tokenmerge.{name}")
        if spec is None or spec.origin is None:
            raise RuntimeError(f"tokenmerge.{name} cannot be imported: reinstall tokenmerge")
        sources[name] = Path(spec.origin).parent
    package = dest / "tokenmerge"
    package.mkdir(parents=True)
    for name, source in sorted(sources.items()):
        _link(source, package / name)
    for name, install in BESIDE.items():
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"{name} is not installed, and the API pages document it: {install}")
        _link(Path(spec.submodule_search_locations[0]), dest / name)
    return dest


def _link(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source, target_is_directory=source.is_dir())
    except OSError:  # no symlinks (Windows without the privilege): copy instead
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


# before mkdocstrings' own on_config, which instantiates the python handler with its paths
@event_priority(100)
def on_config(config: Any) -> Any:
    dest = Path(tempfile.mkdtemp(prefix="tokenmerge-docs-"))
    atexit.register(shutil.rmtree, dest, True)
    installed_package_tree(dest)
    handlers = config["plugins"]["mkdocstrings"].config["handlers"]
    python = handlers.setdefault("python", {})
    python["paths"] = [str(dest), *(python.get("paths") or [])]
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, config_reference())
    return markdown


# ------------------------------------------------------------------ 2. the config reference

_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def _number(value: Any) -> str:
    return repr(float(value)).removesuffix(".0") if isinstance(value, float) else repr(value)


def _constraints(metadata: list[Any]) -> str:
    """``in [0, 1)``, ``>= 1``... from annotated-types metadata (as pydantic stores it)."""
    items = []
    for item in metadata:
        if isinstance(item, FieldInfo):  # Annotated[T, Field(...)] keeps its own metadata
            items += item.metadata
        else:
            items.append(item)
    bounds: dict[str, Any] = {}
    words = []
    for item in items:
        for kind, attr, _ in _BOUNDS:
            if isinstance(item, kind):
                bounds[attr] = getattr(item, attr)
        if isinstance(item, annotated_types.MultipleOf):
            words.append(f"a multiple of {_number(item.multiple_of)}")
        if isinstance(item, annotated_types.MinLen):
            words.append(f"at least {item.min_length} long")
        if isinstance(item, annotated_types.MaxLen):
            words.append(f"at most {item.max_length} long")
    low = next((b for b in ("ge", "gt") if b in bounds), None)
    high = next((b for b in ("le", "lt") if b in bounds), None)
    if low and high:
        left, right = "[" if low == "ge" else "(", "]" if high == "le" else ")"
        words.insert(0, f"in {left}{_number(bounds[low])}, {_number(bounds[high])}{right}")
    else:
        for _, attr, sign in _BOUNDS:
            if attr in bounds:
                words.insert(0, f"{sign} {_number(bounds[attr])}")
    return ", ".join(words)


def _unwrapped(annotation: Any) -> Any:
    """``annotation`` without its ``Annotated`` layers."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def describe_type(annotation: Any, metadata: list[Any] = ()) -> str:  # type: ignore[assignment]
    """A field's type with its allowed values, in words and code spans.

    ``Annotated[float, Field(ge=0, lt=1)] | dict[str, ...]`` reads ``float in [0, 1)``, or
    ``dict[str, float in [0, 1)]``; a ``Literal`` lists its values.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return describe_type(args[0], [*args[1:], *metadata])
    limits = _constraints(list(metadata))
    if annotation is type(None) or annotation is None:
        text = "`None`"
    elif origin is typing.Literal and len(args) == 1:
        text = f"`{args[0]!r}`"
    elif origin is typing.Literal:
        text = "one of " + ", ".join(f"`{value!r}`" for value in args)
    elif origin in (typing.Union, types.UnionType):
        # a field's limits apply to its numeric arms (``int | None`` with ``ge=1``)
        # (an arm may be Annotated: the strict ``Integer`` / ``Number`` of tokenmerge.strict)
        is_number = [_unwrapped(arm) in (int, float) for arm in args]
        numeric = list(metadata) if any(is_number) else []
        return ", or ".join(
            describe_type(arm, numeric if number else [])
            for arm, number in zip(args, is_number, strict=True)
        ) + (f" {limits}" if limits and not numeric else "")
    elif origin in (tuple, list, set, frozenset):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            text = f"tuple of ({describe_type(args[0])})"
        elif origin is tuple:
            text = "tuple (" + "; ".join(describe_type(arg) for arg in args) + ")"
        else:
            text = f"{origin.__name__} of ({describe_type(args[0])})" if args else origin.__name__
    elif origin is dict:
        key, value = args if args else (Any, Any)
        text = f"mapping {describe_type(key)} -> ({describe_type(value)})"
    elif annotation is bool:
        text = "`True` or `False`"
    elif isinstance(annotation, type):
        text = f"`{annotation.__name__}`"
    else:
        text = f"`{annotation!r}`"
    return f"{text} {limits}" if limits else text


def describe_default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    return f"`{field.get_default(call_default_factory=True)!r}`"


def field_row(field_name: str, field: FieldInfo) -> tuple[str, str, str, str]:
    """The reference's row of one field: name, type and allowed values, default, description."""
    description = " ".join((field.description or "(no description)").split())
    return (
        f"`{field_name}`",
        describe_type(field.annotation, field.metadata),
        describe_default(field),
        description,
    )


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    lines = [
        "| field | type and allowed values | default | description |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return lines


def _ratio_limit(cls: type) -> list[str]:
    """The ratio limit of a config at its defaults (nothing when it has required fields)."""
    try:
        config = cls()
    except Exception:  # noqa: BLE001 - a plugin's config may need arguments
        return []
    limit = config.ratio_limit()
    if limit >= 1.0 - 1e-9:
        return ["", "With its defaults any ratio below 1 is allowed."]
    reason = config.ratio_limit_reason()
    return ["", f"With its defaults the ratio may be at most {limit:.4g}: {reason}."]


def config_reference() -> str:
    """The configuration reference in Markdown, generated from the registry's config classes.

    One table of the fields every config shares (``MergeConfig``), then one section per registered
    strategy: a table of the fields its config adds or defines differently, and the names of the
    shared fields it keeps as they are.
    """
    from tokenmerge.config import MergeConfig
    from tokenmerge.registry import registry
    from tokenmerge.selectors import Sites

    shared = {name: field_row(name, f) for name, f in MergeConfig.model_fields.items()}
    # the selector's own table follows: its row points there instead of spelling out the default
    shown = {**shared, "sites": ("`sites`", "[`Sites`](#sites)", "`Sites()`", shared["sites"][3])}
    owners = {name: plugin for plugin in registry.plugins() for name in plugin.strategies}
    lines = [
        "### Fields every config shares",
        "",
        "`tokenmerge.MergeConfig`, the base class of every strategy's config.",
        "",
        *_table(list(shown.values())),
        "",
        "### Sites",
        "",
        "`tokenmerge.Sites`, a config's `sites`: which sites merge, around which sub-modules. A",
        'dict of its fields is accepted: `sites={"levels": (1, 2), "mlp": True}`.',
        "",
        *_table([field_row(name, f) for name, f in Sites.model_fields.items()]),
    ]
    for name in registry.strategy_names():
        cls = registry.strategy(name).config_class
        plugin = owners.get(name)
        if plugin is None:
            origin = "registered at run time"
        elif plugin.builtin:
            origin = "built in"
        elif plugin.distribution:
            dist = f"`{plugin.distribution} {plugin.version}`"
            origin = f"from the plugin `{plugin.name}` (distribution {dist})"
        else:
            origin = f"from the plugin `{plugin.name}`, registered at run time"
        own, kept = [], []
        for field_name, field in cls.model_fields.items():
            row = field_row(field_name, field)
            (kept if shared.get(field_name) == row else own).append((field_name, row))
        lines += [
            "",
            f"### `{name}`",
            "",
            f"`{cls.__module__}.{cls.__qualname__}`, {origin}.",
            "",
            *_table([row for _, row in own]),
        ]
        if kept:
            names = ", ".join(f"`{field_name}`" for field_name, _ in kept)
            lines += [
                "",
                f"[Shared fields](#fields-every-config-shares) it keeps as they are: {names}.",
            ]
        lines += _ratio_limit(cls)
    return "\n".join(lines + adapter_options_reference()) + "\n"


def adapter_options_reference() -> list[str]:
    """One section per registered adapter: its options class and their fields (or none)."""
    from tokenmerge.registry import registry

    lines = [
        "",
        "### Adapter options",
        "",
        "What `tokenmerge.apply(..., adapter_options=...)` takes, per adapter: a dict of these",
        "fields or the adapter's options object; unknown options and bad values are a",
        "`ConfigError`.",
    ]
    for spec in registry.table("adapter").values():
        try:
            options = spec.load().options_class
        except Exception as error:  # noqa: BLE001 - an adapter whose library is missing here
            lines += [
                "",
                f"#### `{spec.name}`",
                "",
                f"Not loadable where the site was built: {error}",
            ]
            continue
        lines += ["", f"#### `{spec.name}`", ""]
        if not options.model_fields:
            lines.append("No options.")
            continue
        lines += [
            f"`{options.__module__}.{options.__qualname__}`:",
            "",
            *_table([field_row(name, f) for name, f in options.model_fields.items()]),
        ]
    return lines
