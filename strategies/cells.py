"""The config shared by strategies that put one destination in every ``sy x sx`` cell."""

from __future__ import annotations

from pydantic import Field

from tokenmerge.config import MAX_CELL, MergeConfig
from tokenmerge.strict import Integer

__all__ = ["CellConfig"]


class CellConfig(MergeConfig):
    """A merge config with a cell size; at most ``1 - 1 / (sx * sy)`` of the tokens can merge."""

    sx: Integer = Field(
        default=2, ge=1, le=MAX_CELL, description="Cell width in tokens. Default 2, as tomesd."
    )
    sy: Integer = Field(
        default=2, ge=1, le=MAX_CELL, description="Cell height in tokens. Default 2, as tomesd."
    )

    def ratio_limit(self) -> float:
        return 1.0 - 1.0 / (self.sx * self.sy)

    def ratio_limit_reason(self) -> str:
        if self.sx * self.sy < 2:
            return "a 1 x 1 cell has no token to merge: sx * sy must be at least 2"
        return f"one destination per {self.sy} x {self.sx} cell stays"
