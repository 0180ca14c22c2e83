"""Which sites merge: the ``Sites`` selector and per-site setting resolution.

A config's ``sites`` (a ``Sites``) filters the candidate sites an adapter finds (levels, stages,
blocks, include / exclude globs) and says around which sub-modules they merge (attention,
cross-attention, MLP). Per-site values (``ratio``, ReToM's ``window_size``; fields typed
``PerSite[...]``) are a single value, a tuple with one value per block (a depth schedule, indexed
by the site's block index), or a mapping whose keys select sites, most specific first:

1. a module-name glob (``"up_blocks.1.**"``; see ``tokenmerge.site.GLOB_RULE``), the first
   matching key in the mapping's order;
2. a stage: ``"down"``, ``"mid"`` or ``"up"`` in a UNet, ``"first"``, ``"middle"`` or ``"last"``
   (the thirds of the blocks) in a DiT-style transformer;
3. a level, the downsample factor as digits: ``"1"``, ``"2"``, ``"4"``...;
4. ``"*"``, the default for every other site.

``apply`` checks every selector the user wrote against the model (``tokenmerge.selector_check``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)

from .errors import ConfigError
from .frozen import FrozenDict, FrozenModel
from .site import Site
from .strict import Integer

__all__ = [
    "PER_SITE",
    "STAGES",
    "PerBlock",
    "PerSite",
    "Sites",
    "deciding_key",
    "not_empty",
    "per_site_fields",
    "per_site_values",
    "resolve_per_site",
    "selector_keys",
]

#: UNet stages, then the thirds of a transformer's depth (DiT, PixArt, SD3, Flux: no down / up)
STAGES = ("down", "mid", "up", "first", "middle", "last")
Stage = Literal["down", "mid", "up", "first", "middle", "last"]
#: downsample levels of the sites that merge (1 = full resolution)
Levels = tuple[Annotated[Integer, Field(ge=1)], ...]


def selector_kind(key: str) -> str:
    """``"default"`` (``"*"``), ``"stage"``, ``"level"`` or ``"glob"``: what a mapping key selects.

    Example:
        >>> [selector_kind(k) for k in ("*", "up", "2", "blocks.*")]
        ['default', 'stage', 'level', 'glob']
    """
    if key == "*":
        return "default"
    if key in STAGES:
        return "stage"
    if key.isascii() and key.isdigit():
        return "level"
    return "glob"


def selects(key: str, site: Site) -> bool:
    """True when the mapping key ``key`` selects ``site`` (alone, before precedence)."""
    kind = selector_kind(key)
    if kind == "glob":
        return site.matches(key)
    if kind == "stage":
        return key == site.stage
    if kind == "level":
        return site.level is not None and int(key) == site.level
    return True


def deciding_key(mapping: Mapping[str, Any], site: Site) -> str | None:
    """The key of ``mapping`` whose value applies at ``site`` (globs in order, then a stage, a
    level, ``"*"``), or None when no key selects it.

    Example:
        >>> from tokenmerge.site import Site
        >>> site = Site("up_blocks.1.attentions.0", stage="up", level=2)
        >>> deciding_key({"*": 1, "2": 2, "up": 3}, site)
        'up'
        >>> print(deciding_key({"down": 1}, site))  # no key selects it
        None
    """
    for kind in ("glob", "stage", "level", "default"):
        for key in mapping:
            if selector_kind(key) == kind and selects(key, site):
                return key
    return None


def resolve_per_site(value: Any, site: Site) -> Any:
    """The value of a per-site setting at ``site``, or None when no key of the mapping selects it.

    Raises:
        ConfigError: a per-block list has no entry for the site's block.

    Example:
        >>> from tokenmerge.site import Site
        >>> name = "up_blocks.1.attentions.0.transformer_blocks.0"
        >>> site = Site(name, stage="up", level=2)
        >>> resolve_per_site({"down": 2, "up": 3, "*": 4}, site)
        3
        >>> resolve_per_site({"2": 0.3, "up_blocks.1.**": 0.6}, site)
        0.6
        >>> resolve_per_site([2, 2, 4], Site("transformer_blocks.2", block_index=2))
        4
    """
    if isinstance(value, (list, tuple)):
        index = site.block_index
        if index is None or not 0 <= index < len(value):
            raise ConfigError(
                f"a per-block list of {len(value)} values has no entry for site {site.name!r} "
                f"(block index {index}); give one value per block of the model, or use a "
                "mapping of site selectors ('first' / 'middle' / 'last', globs, '*')"
            )
        return value[index]
    if not isinstance(value, Mapping):
        return value
    key = deciding_key(value, site)
    return None if key is None else value[key]


def per_site_values(value: Any) -> list[Any]:
    """Every value a per-site setting can take (a mapping's values, a list's items, or itself).

    Example:
        >>> per_site_values({"up": 0.3, "*": 0.5}), per_site_values(0.4)
        ([0.3, 0.5], [0.4])
    """
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def not_empty(value: Any, field: str) -> Any:
    """Reject an empty per-site mapping or list (it would select nothing, silently)."""
    if isinstance(value, (Mapping, list, tuple)) and not value:
        raise ValueError(
            f"an empty {type(value).__name__} of {field} values selects no site; give one value, "
            "one per block, or a mapping with a '*' default"
        )
    return value


def selector_keys(value: Any, field: str) -> Any:
    """Validate the keys of a per-site mapping (integer keys are levels); other values pass."""
    if not isinstance(value, Mapping):
        return value
    allowed = (
        f"{field} keys select sites: a module-name glob, a stage ({', '.join(STAGES)}), a level "
        "as a positive integer or digits ('1', '2', '4'...) or '*'"
    )
    checked = {}
    for key, item in value.items():
        original = key
        if isinstance(key, int) and not isinstance(key, bool) and key >= 1:
            key = str(key)
        bad_level = isinstance(key, str) and selector_kind(key) == "level" and int(key) < 1
        if not isinstance(key, str) or not key or key != key.strip() or bad_level:
            raise ValueError(f"{allowed}; got {original!r}")
        if key in checked:
            raise ValueError(f"{field} keys {key!r} and {original!r} select the same sites")
        checked[key] = item
    return checked


class _PerSiteMarker:
    """Marks a config field as per-site (``PerSite`` / ``PerBlock``): ``apply`` checks its
    selectors and its per-block length against the model."""

    def __repr__(self) -> str:
        return "PER_SITE"


PER_SITE = _PerSiteMarker()
T = TypeVar("T")


def _per_site_kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    return "per-block" if isinstance(value, (list, tuple)) else "value"


def _per_block_kind(value: Any) -> str:
    return "per-block" if isinstance(value, (list, tuple)) else "value"


def _keys(value: Any, info: ValidationInfo) -> Any:
    return selector_keys(value, info.field_name or "per-site")


def _frozen(value: Any, info: ValidationInfo) -> Any:
    not_empty(value, info.field_name or "per-site")
    return FrozenDict(value) if isinstance(value, dict) else value


#: the type of a per-site config field of ``T`` values: one value, a tuple of one per block, or
#: a mapping of site selectors (validated keys, frozen). A plugin's config declares its own
#: per-site fields with it (``window: PerSite[int] = Field(...)``) and gets the same checks.
PerSite = Annotated[
    Union[  # noqa: UP007 - tagged arms of a generic alias
        Annotated[T, Tag("value")],
        Annotated[dict[str, T], Tag("mapping")],
        Annotated[tuple[T, ...], Tag("per-block")],
    ],
    Discriminator(_per_site_kind),
    PER_SITE,
    BeforeValidator(_keys),
    AfterValidator(_frozen),
]
#: a per-site field without selector mappings: one value or a tuple of one per block
PerBlock = Annotated[
    Union[Annotated[T, Tag("value")], Annotated[tuple[T, ...], Tag("per-block")]],  # noqa: UP007
    Discriminator(_per_block_kind),
    PER_SITE,
    AfterValidator(_frozen),
]


def _marked(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        if any(item is PER_SITE for item in annotation.__metadata__):
            return True
        annotation = get_args(annotation)[0]
    return any(_marked(arm) for arm in get_args(annotation)) if get_origin(annotation) else False


def per_site_fields(cls: type[BaseModel]) -> tuple[str, ...]:
    """The names of ``cls``'s per-site fields (typed ``PerSite[...]`` or ``PerBlock[...]``).

    Example:
        >>> from tokenmerge import load_config
        >>> per_site_fields(type(load_config("retom")))
        ('ratio', 'r', 'window_size')
    """
    return tuple(
        name
        for name, info in cls.model_fields.items()
        if PER_SITE in info.metadata or _marked(info.annotation)
    )


#: the filters of ``Sites``: given any of them, the adapter's default choice of sites is off
FILTERS = ("levels", "stages", "blocks", "include", "exclude")
#: the sub-module kinds a site can merge around, as ``Sites`` fields
TARGETS = ("attn", "cross_attn", "mlp")


class Sites(FrozenModel):
    """Which sites merge (filters on the adapter's candidate sites) and around what.

    Every filter given must keep a site; with none of ``levels``, ``stages``, ``blocks`` or
    ``include`` the adapter chooses (the finest level with attention in a UNet, every block
    elsewhere).

    Example:
        >>> from tokenmerge import Sites, load_config
        >>> sites = Sites(levels=(1, 2), mlp=True)
        >>> sites.targets(), sites.explicit
        (('attn', 'mlp'), True)
        >>> load_config("tome", sites={"include": ["up_blocks.**"]}).sites.include
        ('up_blocks.**',)
    """

    levels: Levels | None = Field(
        default=None,
        description=(
            "Only sites at these downsample levels (1 = full resolution, 2 = half...). Default "
            "None: the adapter's choice, the finest level that has attention."
        ),
    )
    stages: tuple[Stage, ...] | None = Field(
        default=None,
        description=(
            "Only sites in these stages: 'down', 'mid', 'up' in a UNet; 'first', 'middle', 'last' "
            "(thirds of the blocks) in a transformer. Default None: every stage."
        ),
    )
    blocks: tuple[Integer, ...] | None = Field(
        default=None,
        description=(
            "Only these block indices (negative counts from the end). Default None: every block."
        ),
    )
    include: tuple[str, ...] = Field(
        default=(),
        description=(
            "Module-name globs; when given, only sites whose name matches one of them. "
            "Default: no filter."
        ),
    )
    exclude: tuple[str, ...] = Field(
        default=(),
        description="Module-name globs of sites never merged. Default: none excluded.",
    )
    attn: bool = Field(
        default=True,
        description="Merge around self-attention, the largest cost at high resolution. Default on.",
    )
    cross_attn: bool = Field(
        default=False,
        description=(
            "Merge around cross-attention too (its queries only; text keys never merge). Default "
            "off, as tomesd."
        ),
    )
    mlp: bool = Field(
        default=False,
        description=(
            "Merge around the MLP / feed-forward too; where attention is cheap (SDXL at 1024 px, "
            "DiTs, ViTs) that is where the speed is. Default off, as tomesd."
        ),
    )
    min_tokens: Integer | None = Field(
        default=None,
        ge=1,
        description=(
            "Calls with fewer image tokens are left alone (shown as skipped in stats()). Default "
            "None: the adapter's choice (256 in diffusion models, none in ViTs)."
        ),
    )

    @field_validator("include", "exclude")
    @classmethod
    def _globs_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not pattern.strip():
                raise ValueError("module-name globs must not be empty")
        return value

    @property
    def explicit(self) -> bool:
        """True when the filters choose sites themselves (levels, stages, blocks or include);
        otherwise the adapter's default choice applies (exclude only narrows it)."""
        return (
            self.levels is not None
            or self.stages is not None
            or self.blocks is not None
            or bool(self.include)
        )

    def selects(self, site: Site, num_blocks: int | None = None) -> bool:
        """True when the filters (levels, stages, blocks, include, exclude) keep ``site``.

        Example:
            >>> from tokenmerge import Sites
            >>> from tokenmerge.site import Site
            >>> Sites(stages=("up",), exclude=("*.1",)).selects(Site("up.0", stage="up"))
            True
            >>> Sites(blocks=(-1,)).selects(Site("b.0", block_index=0), num_blocks=2)
            False
        """
        if self.levels is not None and site.level not in self.levels:
            return False
        if self.stages is not None and site.stage not in self.stages:
            return False
        if self.blocks is not None:
            if site.block_index is None:
                return False
            wanted = {b + num_blocks if (num_blocks and b < 0) else b for b in self.blocks}
            if site.block_index not in wanted:
                return False
        if self.include and not any(site.matches(p) for p in self.include):
            return False
        return not any(site.matches(p) for p in self.exclude)

    def targets(self) -> tuple[str, ...]:
        """Which sub-module kinds merge: a subset of ``("attn", "cross_attn", "mlp")``.

        Example:
            >>> from tokenmerge import Sites
            >>> Sites(cross_attn=True).targets()
            ('attn', 'cross_attn')
        """
        return tuple(name for name in TARGETS if getattr(self, name))

    def filters(self) -> dict[str, Any]:
        """The filters given (not at their defaults), for messages."""
        values = {name: getattr(self, name) for name in FILTERS}
        return {name: value for name, value in values.items() if value not in (None, ())}
