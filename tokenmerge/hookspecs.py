"""The plugin hooks: how strategies and adapters get into the registry, and subcommands into
the ``tokenmerge`` command.

A plugin is any object or module with ``@hookimpl``-decorated functions named after these specs.
Third-party packages expose theirs through the ``tokenmerge`` entry-point group::

    [project.entry-points.tokenmerge]
    my_strategy = "my_package.plugin"

The built-in strategies and adapters are registered through exactly the same hooks. Command
plugins (``tokenmerge_register_commands``) use a group of their own, ``tokenmerge.commands``.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "tokenmerge"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tokenmerge_register_strategies(register: Callable[..., None]) -> None:
    """Register merge strategies.

    Call ``register(StrategyClass)`` once per strategy (``register(cls, replace=True)`` to take
    over a name that is already registered). A strategy class subclasses
    ``tokenmerge.extend.Strategy`` and names its config class.

    Example:
        >>> from tokenmerge.extend import hookimpl
        >>> class MyPlugin:
        ...     @hookimpl
        ...     def tokenmerge_register_strategies(self, register):
        ...         from tokenmerge.strategies.random import RandomStrategy
        ...         register(RandomStrategy, replace=True)
    """


@hookspec
def tokenmerge_register_adapters(register: Callable[..., None]) -> None:
    """Register model adapters.

    Call ``register(AdapterSpec(...))`` once per adapter. The spec names the module that holds
    the adapter class, which is imported only when the adapter is first used, and the libraries
    it needs, so a missing library makes the adapter show as unavailable instead of failing.

    Example:
        >>> from tokenmerge.extend import hookimpl, AdapterSpec
        >>> class MyPlugin:
        ...     @hookimpl
        ...     def tokenmerge_register_adapters(self, register):
        ...         register(AdapterSpec(
        ...             name="my_adapter",
        ...             target="my_package.adapter:MyAdapter",
        ...             requires={"my_library": "1.0"},
        ...             extra="my-package",
        ...         ))
    """


@hookspec
def tokenmerge_register_commands(register: Callable[..., None]) -> None:
    """Register subcommands of the ``tokenmerge`` command.

    Call ``register(Command(...))`` once per subcommand (``tokenmerge.cli.Command``: its name,
    one line of help, a function adding its arguments, a function running them). Command plugins
    are read from their own entry-point group, ``tokenmerge.commands``, by the command alone:
    they never load the strategy registry, and a broken one is skipped with a warning naming it.
    tokenmerge-bench registers ``bench`` and ``visualize`` this way::

        [project.entry-points."tokenmerge.commands"]
        bench = "tokenmerge_bench.commands"

    Example:
        >>> from tokenmerge.extend import hookimpl
        >>> from tokenmerge.cli import Command
        >>> class MyCommands:
        ...     @hookimpl
        ...     def tokenmerge_register_commands(self, register):
        ...         register(Command(name="hello", help="say hello",
        ...                          configure=lambda parser: None, run=lambda args: 0))
    """
