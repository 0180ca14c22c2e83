"""The ``tokenmerge`` command: ``list`` here, more subcommands from plugins.

Subcommands are registered through the ``tokenmerge_register_commands`` hook by plugins found in
the ``tokenmerge.commands`` entry-point group; ``list`` is registered the same way, by this
module. ``bench``, ``compare`` and ``visualize`` come with tokenmerge-bench, built from this
repository's ``benchmarks/`` folder.

Bad input gets one error line (what was wrong, what is allowed, how to fix it) and exit status
2; a failure while running gets one line and status 1. Never a traceback for a user's mistake.

Parsing, ``--help`` and ``--version`` import no torch of their own: this module imports the
registry (and with it torch) only when ``list`` runs, and a command plugin's module and its
``configure`` must be as light (see ``Command``), since every command line loads every plugin
and builds every parser.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import pluggy

# light modules only (no torch): see the module docstring
from tokenmerge import hookspecs
from tokenmerge._version import __version__
from tokenmerge.errors import PluginWarning, TokenMergeError
from tokenmerge.hookspecs import hookimpl

__all__ = ["Command", "ENTRY_POINT_GROUP", "Listing", "UsageError", "load_commands", "main"]

PROG = "tokenmerge"
#: the entry-point group command plugins are read from
ENTRY_POINT_GROUP = "tokenmerge.commands"
#: commands another distribution of this project provides: named in one line when it is missing
_PROVIDED_BY = {
    "bench": "tokenmerge-bench",
    "compare": "tokenmerge-bench",
    "visualize": "tokenmerge-bench",
}
_INSTALL = {"tokenmerge-bench": "pip install -e benchmarks"}


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2. Raise it from a command's ``run``."""


@dataclass(frozen=True)
class Listing:
    """A section of ``tokenmerge list`` that a command plugin adds.

    Attributes:
        key: the section's key in ``tokenmerge list --json``.
        title: its heading in the text listing.
        items: one dict per entry with at least ``name`` and ``description`` (the text listing
            shows those two; the JSON shows every key).
    """

    key: str
    title: str
    items: list[dict[str, Any]]


@dataclass(frozen=True)
class Command:
    """A subcommand of ``tokenmerge``, as a plugin registers it.

    Attributes:
        name: the word after ``tokenmerge`` on the command line.
        help: one line for ``tokenmerge --help``.
        configure: adds the command's arguments to its ``argparse`` parser (whose errors come
            out as one line). Keep it cheap: ``tokenmerge --help`` (and any command line) loads
            every command plugin and calls every ``configure``, so neither it nor the module
            that registers the command may import torch, a model library or a plotting
            library; import those inside ``run``.
        run: runs the parsed arguments and returns the exit status. A bad argument raises
            ``UsageError``, a failure a ``TokenMergeError``: either is shown in one line.
            Heavy imports belong here.
        description: the command's own ``--help`` text (default: ``help``).
        listing: if given, returns a section ``tokenmerge list`` shows (called by ``list`` only).

    Example:
        >>> def greet(args):
        ...     print(f"hello {args.who}")
        ...     return 0
        >>> command = Command(
        ...     name="greet", help="say hello",
        ...     configure=lambda parser: parser.add_argument("who"), run=greet,
        ... )
        >>> command.name, command.description
        ('greet', 'say hello')
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], Any]
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    listing: Callable[[], Listing] | None = None

    def __post_init__(self) -> None:
        if not self.description:
            object.__setattr__(self, "description", self.help)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


# ------------------------------------------------------------------ loading command plugins


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _register_plugin(
    manager: pluggy.PluginManager, plugin: Any, name: str, commands: dict[str, Command]
) -> None:
    """Register one plugin's commands, all or none: a bad one leaves ``commands`` untouched."""
    found: dict[str, Command] = {}

    def register(command: Command) -> None:
        if not isinstance(command, Command):
            raise TypeError(f"register() takes a tokenmerge.cli.Command, not {command!r}")
        if command.name in commands or command.name in found:
            raise ValueError(f"a command named {command.name!r} is already registered")
        found[command.name] = command

    manager.register(plugin, name=name)
    try:
        for impl in manager.hook.tokenmerge_register_commands.get_hookimpls():
            if impl.plugin is plugin:
                impl.function(register=register)
    except BaseException:
        manager.unregister(plugin)
        raise
    commands.update(found)


def load_commands() -> dict[str, Command]:
    """The subcommands: ``list``, then those of every plugin in the ``tokenmerge.commands``
    entry-point group, by name. A plugin that fails to load or to register is skipped with a
    ``PluginWarning`` that names it.

    The strategy registry's switch, ``TOKENMERGE_DISABLE_PLUGIN_AUTOLOAD``, is deliberately not
    read here: it keeps strategy and adapter listings hermetic (the test suite and CI's wheel
    check set it), whereas command plugins add no strategy or adapter and change nothing that
    ``apply`` does; honouring it would take ``tokenmerge bench`` away wherever it is set.

    Example:
        >>> "list" in load_commands()
        True
    """
    return _load_commands()[0]


def _load_commands() -> tuple[dict[str, Command], dict[str, list[str]]]:
    """``load_commands``, with the distributions the plugins came from: ``"name version"`` to
    the commands each added (for ``--version``)."""
    # a manager of its own: command plugins never touch the strategy registry (or load it)
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    commands: dict[str, Command] = {}
    origins: dict[str, list[str]] = {}
    _register_plugin(manager, sys.modules[__name__], "tokenmerge.cli", commands)
    for entry_point in _entry_points():
        dist = getattr(entry_point, "dist", None)
        origin = f"{dist.metadata['Name']} {dist.version}" if dist else entry_point.value
        before = set(commands)
        try:
            _register_plugin(manager, entry_point.load(), entry_point.name, commands)
        except KeyboardInterrupt:
            raise
        # SystemExit too: a plugin parsing sys.argv at import must not end the command
        except BaseException as error:  # noqa: BLE001 - any third-party failure is skipped
            warnings.warn(
                f"tokenmerge command plugin {entry_point.name!r} (from {origin}) failed to load "
                f"and was skipped: {type(error).__name__}: {error}",
                PluginWarning,
                stacklevel=3,
            )
            continue
        origins.setdefault(origin, []).extend(name for name in commands if name not in before)
    return commands, origins


def _missing_command(name: str) -> str:
    """One line for a command another distribution provides: what is missing, how to get it."""
    dist = _PROVIDED_BY[name]
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return (
            f"'{PROG} {name}' comes with {dist}, which is not installed; install it from a "
            f"tokenmerge checkout: {_INSTALL[dist]}"
        )
    return (
        f"'{PROG} {name}' comes with {dist}, which is installed but failed to load (see the "
        f"warning above); reinstall it from a tokenmerge checkout: {_INSTALL[dist]}"
    )


# ------------------------------------------------------------------ the parser


class _Version(argparse.Action):
    """``--version``: tokenmerge's version, then each command plugin's distribution and version
    with the commands it adds, one per line; exit status 0."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        self.origins: dict[str, list[str]] = kwargs.pop("origins")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        lines = [f"{PROG} {__version__}"]
        lines += [f"{origin} ({', '.join(names)})" for origin, names in self.origins.items()]
        print("\n".join(lines))
        parser.exit(0)


def _build_parser(
    commands: dict[str, Command], origins: dict[str, list[str]] | None = None
) -> _Parser:
    missing = sorted({_PROVIDED_BY[name] for name in _PROVIDED_BY if name not in commands})
    parser = _Parser(
        prog=PROG,
        description="Training-free token merging: list what is installed, benchmark strategies "
        "against each other and against peers, and draw what they merge.",
        epilog="; ".join(
            f"{_and([n for n, d in _PROVIDED_BY.items() if d == dist])} come with {dist} "
            f"(from a tokenmerge checkout: {_INSTALL[dist]})"
            for dist in missing
        )
        or None,
    )
    parser.add_argument(
        "--version",
        action=_Version,
        origins=origins or {},
        help="print the version of tokenmerge and of each command plugin's distribution "
        "(tokenmerge-bench), then exit",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in commands.values():
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.description
        )
        command.configure(sub)
    return parser


def _and(names: list[str]) -> str:
    """``a, b and c``."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


# ------------------------------------------------------------------ list


def _configure_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _run_list(args: argparse.Namespace) -> int:
    # the registry brings the config and strategy modules, and torch: only when `list` runs
    from tokenmerge.registry import list_adapters, list_plugins, list_strategies, registry

    strategies = [
        {"name": name, "description": _first_line(registry.strategy(name).__doc__)}
        for name in list_strategies()
    ]
    adapters = []
    for name in list_adapters():
        spec = registry.adapter(name)
        reason = spec.unavailable_reason()
        adapters.append(
            {
                "name": name,
                "available": reason is None,
                "extra": spec.extra,
                "status": reason or "available",
                "description": spec.description,
            }
        )
    plugins = [
        {
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "builtin": info.builtin,
            "strategies": info.strategies,
            "adapters": info.adapters,
        }
        for info in list_plugins()
    ]
    sections = [c.listing() for c in args._commands.values() if c.listing is not None]
    if args.json:
        listing = {"strategies": strategies, "adapters": adapters, "plugins": plugins}
        listing.update({section.key: section.items for section in sections})
        print(json.dumps(listing, indent=2))
        return 0
    print("strategies:")
    for item in strategies:
        print(f"  {item['name']:<14} {item['description']}")
    print("adapters:")
    for item in adapters:
        extra = f" [extra: {item['extra']}]" if item["extra"] else ""
        print(f"  {item['name']:<14} {item['status']}{extra} - {item['description']}")
    print("plugins:")
    for item in plugins:
        origin = f"{item['distribution'] or 'run time'} {item['version'] or ''}".strip()
        registered = ", ".join(item["strategies"] + item["adapters"]) or "nothing"
        print(f"  {item['name']:<24} from {origin}: {registered}")
    for section in sections:
        print(f"{section.title}:")
        width = max((len(item["name"]) for item in section.items), default=0)
        for item in section.items:
            print(f"  {item['name']:<{width}}  {item['description']}")
    return 0


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else ""


@hookimpl
def tokenmerge_register_commands(register: Callable[[Command], None]) -> None:
    """The built-in ``list``, registered like any plugin's command."""
    register(
        Command(
            name="list",
            help="strategies, adapters, plugins and model presets",
            description="List the registered strategies, the adapters (available or not, with "
            "the extra that installs them), the loaded plugins with their distributions, and "
            "what command plugins add (the bench's model presets).",
            configure=_configure_list,
            run=_run_list,
        )
    )


# ------------------------------------------------------------------ main


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["list"])  # doctest: +ELLIPSIS
        strategies:
        ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    commands, origins = _load_commands()
    try:
        if argv and argv[0] not in commands and argv[0] in _PROVIDED_BY:
            raise UsageError(_missing_command(argv[0]))
        parser = _build_parser(commands, origins)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        args._commands = commands  # what `list` reads the plugins' sections from
        return commands[args.command].run(args)
    except UsageError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except TokenMergeError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, (ValueError, KeyError, TypeError)) else 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
