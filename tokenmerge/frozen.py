"""Immutable configs: ``FrozenDict``, the ``FrozenModel`` base and the deep immutability check.

A frozen pydantic model only stops attribute assignment; a dict or list it holds can still be
changed in place, and ``apply`` would then use a value no validator saw. Configs hold only
immutable values (tuples, ``FrozenDict``, frozen models), which also makes them hashable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import ConfigError
from .validation import format_validation_error

__all__ = ["FrozenDict", "FrozenModel", "mutable_part"]

#: the class of a ``FrozenModel`` method's own object (``typing.Self`` is Python 3.11+)
Self = TypeVar("Self", bound="FrozenModel")


class FrozenDict(dict):
    """A dict that cannot change once made, hashable when its values are.

    Equality and hash follow the key order too: in a per-site mapping the first matching glob
    wins, so two mappings with the same items in another order can select differently. It is a
    ``dict`` subclass, so pydantic validates and serialises it as one, and JSON sees a dict.

    Example:
        >>> from tokenmerge.frozen import FrozenDict
        >>> ratio = FrozenDict({"up": 0.5, "*": 0.3})
        >>> ratio["up"], hash(ratio) == hash(FrozenDict({"up": 0.5, "*": 0.3}))
        (0.5, True)
        >>> ratio["up"] = 0.9
        Traceback (most recent call last):
        ...
        TypeError: this mapping is immutable (...); derive a new config instead: ...
    """

    __slots__ = ()

    def _immutable(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            "this mapping is immutable (a config's mappings cannot change in place); derive a "
            "new config instead: tokenmerge.load_config(config, field=new_value)"
        )

    __setitem__ = __delitem__ = __ior__ = _immutable
    clear = pop = popitem = setdefault = update = _immutable  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return list(self.items()) == list(other.items())

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    @classmethod
    def fromkeys(cls, keys: Any, value: Any = None) -> FrozenDict:  # type: ignore[override]
        return cls(dict.fromkeys(keys, value))  # dict's would fill an empty one item by item

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[Any, Any]]]:
        # dict's own pickling fills an empty instance item by item, which __setitem__ refuses
        return type(self), (dict(self),)

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self  # nothing in it can change: a copy would be equal in every way

    def __repr__(self) -> str:
        return dict.__repr__(self)


def mutable_part(value: Any) -> str | None:
    """Where ``value`` could change in place (``"a list"``, ``"a dict under key 'x'"``...), or
    None when it is deeply immutable; objects of other types are trusted.

    Example:
        >>> from tokenmerge.frozen import mutable_part
        >>> mutable_part((1, (2, 3))), mutable_part((1, [2]))
        (None, 'a list at item 1')
    """
    if isinstance(value, FrozenDict):
        for key, item in value.items():
            found = mutable_part(item)
            if found:
                return f"{found} under key {key!r}"
        return None
    if isinstance(value, (list, dict, set, bytearray)):
        return f"a {type(value).__name__}"
    if isinstance(value, tuple):
        for index, item in enumerate(value):
            found = mutable_part(item)
            if found:
                return f"{found} at item {index}"
        return None
    if isinstance(value, BaseModel):
        if not value.model_config.get("frozen"):
            return f"a {type(value).__name__} that is not frozen"
        for name in type(value).model_fields:
            found = mutable_part(getattr(value, name))
            if found:
                return f"{found} in its field {name!r}"
    return None


class FrozenModel(BaseModel):
    """Base of configs and their parts: frozen all the way down, hashable, unknown fields
    rejected, and every copy with changes validated like a new object.

    A field holding a list, dict or set is refused when the object is made (annotate it as a
    tuple, ``tokenmerge.selectors.PerSite`` or ``FrozenDict``): a frozen model only stops
    attribute assignment, and a value changed in place would reach ``apply`` unvalidated.

    Example:
        >>> from tokenmerge import Sites
        >>> sites = Sites(levels=(1,))
        >>> hash(sites) == hash(Sites(levels=[1]))
        True
        >>> sites.model_copy(update={"levels": (1, 2)}).levels
        (1, 2)
        >>> sites.model_copy(update={"levels": (0,)})
        Traceback (most recent call last):
        ...
        tokenmerge.errors.ConfigError: invalid Sites:
          - levels.0: Input should be greater than or equal to 1 (got 0)
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    @model_validator(mode="after")
    def _deeply_immutable(self: Self) -> Self:
        for name in type(self).model_fields:
            found = mutable_part(getattr(self, name))
            if found:
                raise ValueError(
                    f"field {name!r} of {type(self).__name__} holds {found}, which could change "
                    "after validation; config fields hold immutable values: annotate it as a "
                    "tuple, tokenmerge.selectors.PerSite or tokenmerge.frozen.FrozenDict"
                )
        return self

    def model_copy(
        self: Self, *, update: Mapping[str, Any] | None = None, deep: bool = False
    ) -> Self:
        """A copy; with ``update``, the fields set and the changes validated as a new object
        (pydantic's own ``model_copy`` would take the changes unchecked).

        Raises:
            ConfigError: a changed value is invalid (what was wrong, what is allowed).
        """
        if not update:
            return super().model_copy(deep=deep)
        data = {name: self.__dict__[name] for name in self.model_fields_set}
        data.update(update)
        cls = type(self)
        try:
            copy = cls.model_validate(data)
        except ValidationError as error:
            fields = list(cls.model_fields)
            raise ConfigError(
                format_validation_error(cls.__name__, error, fields, model=cls)
            ) from None
        return self._carry_private(copy)

    def __replace__(self: Self, **changes: Any) -> Self:
        """``copy.replace(config, ...)`` (Python 3.13): validated as ``model_copy(update=...)``.
        Defined here because pydantic before 2.9 has no ``__replace__`` of its own."""
        return self.model_copy(update=changes)

    def _carry_private(self: Self, copy: Self) -> Self:
        """``copy`` with the private state of ``self`` that validation does not rebuild."""
        return copy
