"""Loading third-party plugins never ends the user's program, and never fails silently: a plugin
whose import or hook raises ``SystemExit`` (or any ``BaseException`` but ``KeyboardInterrupt``) is
skipped with a ``PluginWarning`` naming it, and a plugin that registers nothing warns, saying
why. Entry points are faked here (tests/test_registry.py installs real distributions)."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from types import SimpleNamespace

import pytest

import tokenmerge
from tokenmerge import cli, extend
from tokenmerge.extend import PluginWarning
from tokenmerge.registry import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, registry

BUILTIN_STRATEGIES = ["random", "retom", "todo", "tome"]


class Interrupt(BaseException):
    """A BaseException of a plugin's own (neither Exception nor KeyboardInterrupt)."""


class FakeEntryPoint:
    """An entry point of a fake distribution whose ``load`` imports a module (or raises)."""

    def __init__(self, name: str, value: str, distribution: str = "tokenmerge-fake") -> None:
        self.name, self.value, self.group = name, value, ENTRY_POINT_GROUP
        self.dist = SimpleNamespace(metadata={"Name": distribution}, version="1.2")

    def load(self):
        return importlib.import_module(self.value)


@pytest.fixture
def entry_points(monkeypatch, tmp_path):
    """``install(name=source, ...)``: modules in a fresh folder, each the plugin of an entry
    point of that name; autoloading on, from a fresh registry."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    real = importlib.metadata.entry_points
    installed: list[FakeEntryPoint] = []

    def fake(**kwargs):
        return list(installed) if kwargs.get("group") == ENTRY_POINT_GROUP else real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)

    def install(**sources: str) -> None:
        for name, source in sources.items():
            module = f"tm_fake_{name}"
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            sys.modules.pop(module, None)
            installed.append(FakeEntryPoint(name, module))

    registry.reset()
    yield install
    registry.reset()
    for entry_point in installed:
        sys.modules.pop(entry_point.value, None)


GOOD = """
    from tokenmerge.extend import hookimpl
    from tokenmerge.strategies.random import RandomStrategy

    class Good(RandomStrategy):
        name = "good"

    from typing import Literal
    from pydantic import Field
    from tokenmerge.strategies.random import RandomConfig

    class GoodConfig(RandomConfig):
        strategy: Literal["good"] = Field(default="good", description="Always 'good'.")

    Good.config_class = GoodConfig

    @hookimpl
    def tokenmerge_register_strategies(register):
        register(Good)
"""


@pytest.mark.parametrize(
    ("source", "raised"),
    [
        ("import sys\nraise SystemExit('usage: prog [-h] (unrecognized -f)')", "SystemExit"),
        ("import sys\nsys.exit(2)", "SystemExit: 2"),
        (f"from {__name__} import Interrupt\nraise Interrupt('its own')", "Interrupt: its own"),
        ("raise RuntimeError('plain')", "RuntimeError: plain"),
    ],
    ids=["systemexit-argv", "sys-exit", "own-baseexception", "exception"],
)
def test_a_plugin_raising_at_import_is_skipped_with_a_warning_naming_it(
    source, raised, entry_points
):
    entry_points(argv_parser=source, good=GOOD)
    with pytest.warns(PluginWarning) as caught:
        strategies = tokenmerge.list_strategies()
    assert strategies == sorted([*BUILTIN_STRATEGIES, "good"])  # the others still load
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(
        "tokenmerge plugin 'argv_parser' (from tokenmerge-fake 1.2) failed to load and was "
        "skipped: "
    ), message
    assert raised in message
    assert "argv_parser" not in [p.name for p in tokenmerge.list_plugins()]


def test_a_plugin_whose_hook_raises_systemexit_registers_nothing(entry_points):
    entry_points(
        exits="""
        from tokenmerge.extend import hookimpl
        from tokenmerge.strategies.random import RandomStrategy

        @hookimpl
        def tokenmerge_register_strategies(register):
            raise SystemExit(1)
        """
    )
    with pytest.warns(PluginWarning, match="plugin 'exits' .*skipped: SystemExit: 1"):
        assert tokenmerge.list_strategies() == BUILTIN_STRATEGIES
    # atomic: not half registered with pluggy either, so the name can be taken again
    assert registry.plugin_manager.get_plugin("exits") is None


def test_keyboard_interrupt_still_interrupts(entry_points):
    entry_points(interrupted="raise KeyboardInterrupt")
    with pytest.raises(KeyboardInterrupt):
        tokenmerge.list_strategies()


NOTHING = {
    "misspelled": (
        """
        from tokenmerge.extend import hookimpl

        @hookimpl
        def tokenmerge_register_strategy(register):
            pass
        """,
        "'tokenmerge_register_strategy' is no tokenmerge hook (it needs an @hookimpl function "
        "tokenmerge_register_strategies or tokenmerge_register_adapters); did you mean "
        "'tokenmerge_register_strategies'?",
    ),
    "undecorated": (
        """
        def tokenmerge_register_adapters(register):
            pass
        """,
        "'tokenmerge_register_adapters' is not decorated with @tokenmerge.extend.hookimpl",
    ),
    "empty": (
        "VERSION = 1\n",
        "it has no @hookimpl function tokenmerge_register_strategies or "
        "tokenmerge_register_adapters",
    ),
    "silent": (
        """
        from tokenmerge.extend import hookimpl

        @hookimpl
        def tokenmerge_register_strategies(register):
            pass
        """,
        "its hooks ran but called register() for nothing",
    ),
    "commands_only": (
        """
        from tokenmerge.extend import hookimpl

        @hookimpl
        def tokenmerge_register_commands(register):
            pass
        """,
        "it implements only tokenmerge_register_commands, which the tokenmerge command reads "
        "from the 'tokenmerge.commands' entry-point group",
    ),
}


@pytest.mark.parametrize("name", list(NOTHING))
def test_an_entry_point_plugin_registering_nothing_warns_saying_why(name, entry_points):
    source, why = NOTHING[name]
    entry_points(**{name: source})
    with pytest.warns(PluginWarning) as caught:
        assert tokenmerge.list_strategies() == BUILTIN_STRATEGIES
    (message,) = [str(w.message) for w in caught]
    assert message == (
        f"tokenmerge plugin {name!r} (from tokenmerge-fake 1.2) registered no strategy and no "
        f"adapter: {why}"
    )
    assert name in [p.name for p in tokenmerge.list_plugins()]  # listed, with nothing


class Misspelled:
    @extend.hookimpl
    def tokenmerge_register_strategie(self, register):
        pass


class Undecorated:
    def tokenmerge_register_strategies(self, register):
        pass


@pytest.mark.parametrize(
    ("plugin", "name", "why"),
    [
        (None, "NoneType", "the plugin is None; pass an object or module with an @hookimpl"),
        (Misspelled(), "Misspelled", "did you mean 'tokenmerge_register_strategies'?"),
        (Undecorated(), "Undecorated", "is not decorated with @tokenmerge.extend.hookimpl"),
    ],
    ids=["none", "misspelled", "undecorated"],
)
def test_a_runtime_plugin_registering_nothing_warns_saying_why(plugin, name, why):
    registry.reset()
    try:
        with pytest.warns(PluginWarning) as caught:
            assert extend.register_plugin(plugin, name=name) == name
        (message,) = [str(w.message) for w in caught]
        assert message.startswith(
            f"register_plugin(..., name={name!r}) registered no strategy and no adapter: "
        ), message
        assert why in message
        assert tokenmerge.list_strategies() == BUILTIN_STRATEGIES
    finally:
        registry.reset()


def test_a_command_plugin_raising_systemexit_at_import_is_skipped(monkeypatch, capsys):
    class Exits:
        name, value, dist = "argv_parser", "tm_argv_parser", None

        def load(self):
            raise SystemExit("usage: tm_argv_parser [-h]")

    monkeypatch.setattr(cli, "_entry_points", lambda: [Exits()])
    with pytest.warns(PluginWarning, match="command plugin 'argv_parser'.*skipped: SystemExit"):
        assert cli.main(["list"]) == 0
    assert "strategies" in capsys.readouterr().out
