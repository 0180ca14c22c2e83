"""Built-in strategies (tome, retom, random, todo), registered as a plugin of tokenmerge itself."""

from __future__ import annotations

from tokenmerge.hookspecs import hookimpl
from tokenmerge.strategies.random import RandomStrategy
from tokenmerge.strategies.retom import ReToMStrategy
from tokenmerge.strategies.todo import ToDoStrategy
from tokenmerge.strategies.tome import ToMeStrategy


@hookimpl
def tokenmerge_register_strategies(register):
    for strategy in (ToMeStrategy, ReToMStrategy, RandomStrategy, ToDoStrategy):
        register(strategy)
