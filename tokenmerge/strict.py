"""Strict number types for config fields: no bools, strings or fractional floats slip through.

(Switches stay pydantic ``bool``: it takes ``True`` / ``False`` and the unambiguous spellings
``1`` / ``0``, ``"true"`` / ``"false"``, ``"yes"`` / ``"no"``, which the command line relies on,
and refuses anything else.)

pydantic's lax mode turns ``False`` into a ratio of 0.0 and ``True`` into a ``seed`` of 1, and its
strict mode refuses NumPy scalars; these take what is a number in Python (``int``, ``float``,
NumPy scalars) and refuse the rest, saying what they got. A ``Number`` is finite too.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

__all__ = ["Integer", "Number"]


def _refused(kind: str, value: Any) -> PydanticCustomError:
    if isinstance(value, bool):
        got = "a bool: write the number itself"
    else:
        got = f"{type(value).__name__}"
    return PydanticCustomError(f"{kind}_type", f"Input should be a valid {kind}, not {got}")


def _integer(value: Any) -> int:
    # operator.index accepts int and NumPy integers, and refuses floats and strings; bool is an
    # int subclass and must be refused by hand
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise _refused("integer", value)


def _number(value: Any) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise PydanticCustomError("finite_number", "Input should be a finite number")
        return float(value)
    raise _refused("number", value)


#: a whole number (int or NumPy integer), never a bool, float or string
Integer = Annotated[int, BeforeValidator(_integer)]
#: a finite real number (int, float or NumPy scalar), never a bool or string
Number = Annotated[float, BeforeValidator(_number)]
