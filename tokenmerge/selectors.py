"""Which sites merge: the ``Sites`` selector and per-site setting resolution.

A config's ``sites`` (a ``Sites``) filters the candidate sites an adapter finds (levels, stages,
blocks, include / exclude globs) and says around which sub-modules they merge (attention,
cross-attention, MLP). Per-site values (``ratio``, ReToM's ``window_size``) are a single value,
a list with one value per block (a depth schedule, indexed by the site's block index), or a
mapping whose keys select sites, most specific first:

1. a module-name glob (``"up_blocks.1.**"``; ``*`` stays within one name part, ``**`` crosses
   dots), the first matching key in the mapping's order;
2. a stage: ``"down"``, ``"mid"`` or ``"up"`` in a UNet, ``"first"``, ``"middle"`` or ``"last"``
   (the thirds of the blocks) in a DiT-style transformer;
3. a level, the downsample factor as digits: ``"1"``, ``"2"``, ``"4"``...;
4. ``"*"``, the default for every other site.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ConfigError
from .site import Site

__all__ = [
    "STAGES",
    "Sites",
    "not_empty",
    "per_site_values",
    "resolve_per_site",
    "selector_keys",
]

#: UNet stages, then the thirds of a transformer's depth (DiT, PixArt, SD3, Flux: no down / up)
STAGES = ("down", "mid", "up", "first", "middle", "last")
Stage = Literal["down", "mid", "up", "first", "middle", "last"]
#: downsample levels of the sites that merge (1 = full resolution)
Levels = tuple[Annotated[int, Field(ge=1)], ...]


def _selector_kind(key: str) -> str:
    if key == "*":
        return "default"
    if key in STAGES:
        return "stage"
    if key.isascii() and key.isdigit():
        return "level"
    return "glob"


def resolve_per_site(value: Any, site: Site) -> Any:
    """The value of a per-site setting at ``site``, or None when no key of the mapping selects it.

    Raises:
        ConfigError: a per-block list has no entry for the site's block.

    Example:
        >>> from tokenmerge.site import Site
        >>> site = Site("up_blocks.1.attentions.0.transformer_blocks.0", stage="up", level=2)
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
    if not isinstance(value, dict):
        return value
    by_kind: dict[str, list[tuple[str, Any]]] = {}
    for key, item in value.items():
        by_kind.setdefault(_selector_kind(key), []).append((key, item))
    for key, item in by_kind.get("glob", []):
        if site.matches(key):
            return item
    for key, item in by_kind.get("stage", []):
        if key == site.stage:
            return item
    for key, item in by_kind.get("level", []):
        if site.level is not None and int(key) == site.level:
            return item
    for _, item in by_kind.get("default", []):
        return item
    return None


def per_site_values(value: Any) -> list[Any]:
    """Every value a per-site setting can take (a mapping's values, a list's items, or itself).

    Example:
        >>> per_site_values({"up": 0.3, "*": 0.5}), per_site_values(0.4)
        ([0.3, 0.5], [0.4])
    """
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def not_empty(value: Any, field: str) -> Any:
    """Reject an empty per-site mapping or list (it would select nothing, silently)."""
    if isinstance(value, (dict, list, tuple)) and not value:
        raise ValueError(
            f"an empty {type(value).__name__} of {field} values selects no site; give one value, "
            "one per block, or a mapping with a '*' default"
        )
    return value


def selector_keys(value: Any, field: str) -> Any:
    """Validate the keys of a per-site mapping (integer keys are levels); other values pass."""
    if not isinstance(value, dict):
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
        bad_level = isinstance(key, str) and _selector_kind(key) == "level" and int(key) < 1
        if not isinstance(key, str) or not key or key != key.strip() or bad_level:
            raise ValueError(f"{allowed}; got {original!r}")
        if key in checked:
            raise ValueError(f"{field} keys {key!r} and {original!r} select the same sites")
        checked[key] = item
    return checked


#: the filters of ``Sites``: given any of them, the adapter's default choice of sites is off
FILTERS = ("levels", "stages", "blocks", "include", "exclude")
#: the sub-module kinds a site can merge around, as ``Sites`` fields
TARGETS = ("attn", "cross_attn", "mlp")


class Sites(BaseModel):
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

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

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
    blocks: tuple[int, ...] | None = Field(
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
    min_tokens: int | None = Field(
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
