"""A plugin whose hook registers a valid strategy, then raises: neither may stay registered."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tokenmerge.extend import hookimpl
from tokenmerge.strategies.random import RandomConfig, RandomStrategy


class HalfDoneConfig(RandomConfig):
    strategy: Literal["half_done"] = Field(default="half_done", description="Always 'half_done'.")


class HalfDoneStrategy(RandomStrategy):
    name = "half_done"
    config_class = HalfDoneConfig


@hookimpl
def tokenmerge_register_strategies(register):
    register(HalfDoneStrategy)
    raise RuntimeError("deliberately broken plugin hook")
