"""Merge configurations: pydantic v2 models, frozen, extra fields forbidden, every field described.

A config holds what the strategy decides: ``strategy``, how much to merge (``ratio`` / ``r``), the
plan cache, value correction, the seed, and each strategy's own fields (subclasses of
``MergeConfig`` with a ``strategy`` literal that discriminates the union). Which sites merge is
its ``sites`` (a ``tokenmerge.Sites``, in ``tokenmerge.selectors``, which also says how per-site
values such as ``ratio={"up": 0.6, "*": 0.3}`` resolve); what an adapter does is its own options
(``apply(..., adapter_options=...)``). The union is built from the registry, so a plugin's config
validates and serialises exactly like a built-in one.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidatorFunctionWrapHandler,
    model_validator,
)

from .deprecated import ADAPTER_FIELDS, SITE_FIELDS, split_flat, warn_deprecated, with_sites
from .errors import ConfigError
from .frozen import FrozenDict, FrozenModel
from .selectors import STAGES, PerBlock, PerSite, Sites, per_site_values, resolve_per_site
from .site import Site
from .strict import Integer, Number

__all__ = ["MergeConfig", "r_schedule", "MAX_CELL", "STAGES", "resolve_per_site"]

#: largest window / cell side accepted: far beyond any grid, and keeps the ratio limits finite
MAX_CELL = 1024

Ratio = Annotated[Number, Field(ge=0.0, lt=1.0)]


class MergeConfig(FrozenModel):
    """What every strategy shares: how much to merge, at which sites, how plans are kept.

    Example:
        >>> from tokenmerge import load_config
        >>> load_config("tome", ratio={"1": 0.6, "*": 0.3}).ratio
        {'1': 0.6, '*': 0.3}
        >>> load_config("tome", sites={"levels": (1, 2), "mlp": True}).sites.targets()
        ('attn', 'mlp')
    """

    strategy: str = Field(description="Name of the registered strategy this config is for.")
    ratio: PerSite[Ratio] = Field(
        default=0.5,
        description=(
            "Fraction of a site's image tokens merged away, in [0, 1); 0 is bit-identical. One "
            "value, one per block, or a mapping of site selectors. Default 0.5."
        ),
    )
    sites: Sites = Field(
        default=Sites(),
        description=(
            "Which sites merge, around which sub-modules: a tokenmerge.Sites or a dict of its "
            "fields. Default Sites(): the adapter's sites, around self-attention."
        ),
    )
    r: PerBlock[Annotated[Integer, Field(ge=0)]] | None = Field(
        default=None,
        description=(
            "Tokens merged at each site, overriding ratio: one number or one per block (see "
            "tokenmerge.r_schedule); capped by what the strategy can merge. Default None: ratio "
            "decides."
        ),
    )
    value_correction: bool = Field(
        default=False,
        description=(
            "Add back each merged-away token's own value at self-attention merged in local mode, "
            "weight fitted per plan; stats() shows it, None where not applied. Default off, as "
            "tomesd."
        ),
    )
    local_proportional_attention: bool = Field(
        default=False,
        description=(
            "At local-mode self-attention sites, add log(size) of each merged token to the "
            "attention logits, so it weighs as much as the tokens it stands for. Default off."
        ),
    )
    keys_values: bool | Literal["auto"] = Field(
        default=False,
        description=(
            "Merge only the keys and values of self-attention, keeping every query (diffusers "
            "UNet, DiT, PixArt); 'auto': where it can. Default off ('auto' for todo)."
        ),
    )
    share_cfg_plan: bool = Field(
        default=False,
        description=(
            "With an even batch, plan on its second half (the conditional half in most pipelines) "
            "and use that plan for both halves. Default off: samples plan on themselves."
        ),
    )
    cache_interval: Integer = Field(
        default=1,
        ge=1,
        description=(
            "Make a site's plan once every this many denoising steps and reuse it in between (new "
            "generations and shape changes replan). Default 1: plan every step."
        ),
    )
    seed: Integer = Field(
        default=0,
        description=(
            "Seed of the private random generators (one per site); the global RNG is never used. "
            "Default 0."
        ),
    )

    #: ``mode`` / ``proportional_attention`` given the old way (on the config): ``apply`` hands
    #: them to the adapter. Not a field: they are adapter options, and dumps leave them out.
    _adapter_options: FrozenDict = PrivateAttr(default_factory=FrozenDict)

    @model_validator(mode="wrap")
    @classmethod
    def _upgrade_flat_fields(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        options: dict[str, Any] = {}
        if isinstance(data, dict):
            data, sites, options = split_flat(data, cls.model_fields)
            if sites:
                data = {**data, "sites": with_sites(data.get("sites"), sites)}
        config = handler(data)
        if options:
            config._adapter_options = FrozenDict({**config._adapter_options, **options})
        return config

    @property
    def deprecated_adapter_options(self) -> dict[str, Any]:
        """Adapter options given the deprecated way, as config fields (``mode``,
        ``proportional_attention``); ``apply`` passes them on to the adapter."""
        return dict(self._adapter_options)

    def with_deprecated_adapter_options(self, options: dict[str, Any]) -> MergeConfig:
        """A copy carrying ``options`` (old-style ``mode`` / ``proportional_attention``) too."""
        if not options:
            return self
        copy = self.model_copy()
        copy._adapter_options = FrozenDict({**self._adapter_options, **options})
        return copy

    def _carry_private(self, copy: MergeConfig) -> MergeConfig:
        copy._adapter_options = FrozenDict({**self._adapter_options, **copy._adapter_options})
        return copy

    def __getattr__(self, name: str) -> Any:
        # Attribute reads of the old flat fields keep working for one release.
        if name in SITE_FIELDS:
            new = SITE_FIELDS[name]
            warn_deprecated(f"config.{name} is deprecated; read config.sites.{new}")
            return getattr(self.sites, new)
        if name in ADAPTER_FIELDS:
            warn_deprecated(
                f"config.{name} is deprecated; it is an adapter option now "
                f"(adapter_options={{{name!r}: ...}}, read from the adapter's options)"
            )
            return self._adapter_options.get(name, ADAPTER_FIELDS[name])
        return super().__getattr__(name)

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

    def with_min_tokens(self, min_tokens: int) -> MergeConfig:
        """This config with ``sites.min_tokens`` set (the adapter's default, when it was None)."""
        return self.model_copy(
            update={"sites": self.sites.model_copy(update={"min_tokens": min_tokens})}
        )

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
