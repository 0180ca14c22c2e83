"""Merge configurations: pydantic v2 models, frozen, extra fields forbidden, every field described.

``MergeConfig`` holds what every strategy shares (how much to merge, where, around which
sub-modules); each strategy subclasses it with its own fields and a ``strategy`` literal that
discriminates the union. The union is built from the registry, so a plugin's config validates and
serialises exactly like a built-in one.

Per-site values (``ratio``, ReToM's ``window_size``) are a single value, a list with one value
per block (a depth schedule, indexed by the site's block index), or a mapping whose keys select
sites, most specific first:

1. a module-name glob (``"up_blocks.1.**"``; ``*`` stays within one name part, ``**`` crosses
   dots), the first matching key in the mapping's order;
2. a stage: ``"down"``, ``"mid"`` or ``"up"`` in a UNet, ``"first"``, ``"middle"`` or ``"last"``
   (the thirds of the blocks) in a DiT-style transformer;
3. a level, the downsample factor as digits: ``"1"``, ``"2"``, ``"4"``...;
4. ``"*"``, the default for every other site.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ConfigError
from .site import Site

__all__ = ["MergeConfig", "r_schedule", "MAX_CELL", "STAGES", "resolve_per_site"]

#: UNet stages, then the thirds of a transformer's depth (DiT, PixArt, SD3, Flux: no down / up)
STAGES = ("down", "mid", "up", "first", "middle", "last")
Stage = Literal["down", "mid", "up", "first", "middle", "last"]
#: largest window / cell side accepted: far beyond any grid, and keeps the ratio limits finite
MAX_CELL = 1024

Ratio = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]
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
    """Every value a per-site setting can take (a mapping's values, a list's items, or itself)."""
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


class MergeConfig(BaseModel):
    """What every strategy shares: how much to merge, where, and around which sub-modules.

    Example:
        >>> from tokenmerge import load_config
        >>> load_config("tome", ratio={"1": 0.6, "*": 0.3}).ratio
        {'1': 0.6, '*': 0.3}
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    strategy: str = Field(description="Name of the registered strategy this config is for.")
    ratio: Ratio | dict[str, Ratio] | tuple[Ratio, ...] = Field(
        default=0.5,
        description=(
            "Fraction of a site's image tokens merged away, in [0, 1); 0 is bit-identical. One "
            "value, one per block, or a mapping of site selectors. Default 0.5."
        ),
    )
    merge_attn: bool = Field(
        default=True,
        description="Merge around self-attention, the largest cost at high resolution. Default on.",
    )
    merge_cross_attn: bool = Field(
        default=False,
        description=(
            "Merge around cross-attention too (its queries only; text keys never merge). Default "
            "off, as tomesd."
        ),
    )
    merge_mlp: bool = Field(
        default=False,
        description=(
            "Merge around the MLP / feed-forward too; where attention is cheap (SDXL at 1024 px, "
            "DiTs, ViTs) that is where the speed is. Default off, as tomesd."
        ),
    )
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
    min_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Calls with fewer image tokens are left alone (shown as skipped in stats()). Default "
            "None: the adapter's choice (256 in diffusion models, none in ViTs)."
        ),
    )
    mode: Literal["auto", "local", "progressive"] = Field(
        default="auto",
        description=(
            "'local': merge and unmerge around each sub-module; 'progressive': tokens stay merged "
            "to the last block (ToMe on ViTs). Default 'auto': the adapter's choice."
        ),
    )
    r: int | tuple[Annotated[int, Field(ge=0)], ...] | None = Field(
        default=None,
        description=(
            "Tokens merged at each site, overriding ratio: one number or one per block (see "
            "tokenmerge.r_schedule); capped by what the strategy can merge. Default None: ratio "
            "decides."
        ),
    )
    proportional_attention: bool = Field(
        default=True,
        description=(
            "Progressive mode only: add log(size) of every key to the attention logits, so a "
            "merged token weighs as much as the tokens it stands for (ToMe). Default on."
        ),
    )
    value_correction: bool = Field(
        default=False,
        description=(
            "Add back each merged-away token's own value at diffusers self-attention sites, with a "
            "weight fitted per plan (stats() shows it). Default off, as tomesd."
        ),
    )
    share_cfg_plan: bool = Field(
        default=False,
        description=(
            "With an even batch, plan on its second half (the conditional half in most pipelines) "
            "and use that plan for both halves. Default off: samples plan on themselves."
        ),
    )
    cache_interval: int = Field(
        default=1,
        ge=1,
        description=(
            "Make a site's plan once every this many denoising steps and reuse it in between (new "
            "generations and shape changes replan). Default 1: plan every step."
        ),
    )
    seed: int = Field(
        default=0,
        description=(
            "Seed of the private random generators (one per site); the global RNG is never used. "
            "Default 0."
        ),
    )

    @field_validator("ratio", mode="before")
    @classmethod
    def _ratio_keys(cls, value: Any) -> Any:
        return selector_keys(value, "ratio")

    @field_validator("ratio")
    @classmethod
    def _ratio_not_empty(cls, value: Any) -> Any:
        return not_empty(value, "ratio")

    @field_validator("r")
    @classmethod
    def _r_valid(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"r {value} is negative: give the tokens to merge per site, >= 0")
        return not_empty(value, "r")

    @field_validator("include", "exclude")
    @classmethod
    def _globs_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not pattern.strip():
                raise ValueError("module-name globs must not be empty")
        return value

    @model_validator(mode="after")
    def _ratio_within_capacity(self) -> MergeConfig:
        limit = self.ratio_limit()
        for value in per_site_values(self.ratio):
            if value > limit + 1e-12:
                raise ValueError(
                    f"ratio {value} is more than this {self.strategy!r} config can merge: at most "
                    f"{limit:.4g} ({self.ratio_limit_reason()}); lower the ratio or "
                    "change the setting that limits it"
                )
        return self

    def ratio_limit(self) -> float:
        """The largest ratio this config can honour at every site."""
        return math.nextafter(1.0, 0.0)

    def ratio_limit_reason(self) -> str:
        """Why ``ratio_limit`` is what it is, for error messages."""
        return "a ratio must stay below 1"

    def for_site(self, site: Site) -> MergeConfig:
        """This config with its per-site settings resolved to plain values for ``site``.

        Each site plans with such a view, so the hot path never resolves a mapping (and under
        ``torch.compile`` sites that resolve to the same values share one graph).
        """
        return self.model_copy(update={"ratio": self.ratio_for(site), "r": self.r_for(site)})

    def r_for(self, site: Site) -> int | None:
        """Tokens to merge at ``site`` when ``r`` is set, else None (``ratio`` decides)."""
        return None if self.r is None else int(resolve_per_site(self.r, site))

    def ratio_for(self, site: Site) -> float:
        """The ratio at ``site`` (0.0 where a ratio mapping selects nothing)."""
        value = resolve_per_site(self.ratio, site)
        return 0.0 if value is None else float(value)

    def selects(self, site: Site, num_blocks: int | None = None) -> bool:
        """True when the site filters (levels, stages, blocks, include, exclude) keep ``site``."""
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
        """Which sub-module kinds merge: a subset of ``("attn", "cross_attn", "mlp")``."""
        chosen = (
            ("attn", self.merge_attn),
            ("cross_attn", self.merge_cross_attn),
            ("mlp", self.merge_mlp),
        )
        return tuple(name for name, on in chosen if on)


def r_schedule(r: int, num_blocks: int, shape: str = "decreasing") -> tuple[int, ...]:
    """ToMe's per-block schedules of ``r``, merging about ``r * num_blocks`` tokens in all.

    ``"constant"`` merges ``r`` in every block; ``"decreasing"`` starts at ``2r`` and falls
    linearly to 0 (merge early, where it saves the most); ``"increasing"`` is its mirror.

    Example:
        >>> from tokenmerge import r_schedule
        >>> r_schedule(4, 5)
        (8, 6, 4, 2, 0)
        >>> sum(r_schedule(13, 12)), r_schedule(2, 3, "increasing")
        (156, (0, 2, 4))
    """
    shapes = ("constant", "decreasing", "increasing")
    if shape not in shapes:
        raise ConfigError(f"r_schedule shape {shape!r} is unknown; use one of {shapes}")
    if r < 0 or num_blocks < 1:
        raise ConfigError(f"r_schedule needs r >= 0 and num_blocks >= 1; got {r}, {num_blocks}")
    if shape == "constant" or num_blocks == 1:
        return (r,) * num_blocks
    step = 2 * r / (num_blocks - 1)
    values = tuple(round(2 * r - step * i) for i in range(num_blocks))
    return values if shape == "decreasing" else values[::-1]


#: names that moved to ``tokenmerge.load`` (above the registry they read), kept here for a release
_MOVED = ("load_config", "config_union")


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"tokenmerge.config.{name} is deprecated; import it from tokenmerge.load"
        + (" (or use tokenmerge.load_config)" if name == "load_config" else ""),
        DeprecationWarning,
        stacklevel=2,
    )
    # No import: this module sits below the registry, and tokenmerge.load above it; importing
    # tokenmerge (always done before any of its modules) has loaded tokenmerge.load already.
    return getattr(sys.modules["tokenmerge.load"], name)
