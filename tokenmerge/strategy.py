"""The strategy interface: pure tensor code that turns token features into a ``Plan``."""

from __future__ import annotations

import functools
import operator
import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .config import MergeConfig
from .errors import ConfigError, InputError, PluginError
from .plan import Plan
from .rng import SiteRandom
from .site import Site, TokenLayout
from .windows import token_indices

__all__ = ["Strategy", "merge_into_representatives", "pick_top"]


def pick_top(score: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` highest scores along the last dim (the lowest value, ``-inf``
    or ``-1`` for integer ranks, marks the ineligible).

    ``count`` never exceeds the eligible entries when callers cap it by the strategy's capacity.
    """
    return score.topk(count, dim=-1, sorted=False).indices


def merge_into_representatives(rep_of: Tensor, score: Tensor, num_merge: int) -> Plan:
    """The plan merging the ``num_merge`` highest-scoring tokens into their representatives.

    ``rep_of (P, n)`` is the representative of every token (a representative is its own);
    representatives never merge. ``num_merge`` must not exceed the non-representatives.
    """
    tokens = token_indices(rep_of.shape[1], rep_of.device)
    blocked = float("-inf")  # a Python scalar: no host-to-device copy
    chosen = pick_top(torch.where(rep_of == tokens, blocked, score), num_merge)
    return Plan.from_assignment(chosen, rep_of.gather(1, chosen), rep_of.shape[1])


class Strategy(ABC):
    """Base class of every merge strategy.

    A strategy never touches modules: given the image-token features at a site it returns a
    ``Plan``. The framework around it selects the image tokens, normalises the features (float32,
    unit length), shares plans over the batch where asked, caches plans and applies them.

    Subclasses set ``name`` and ``config_class`` and implement ``capacity`` and ``make_plan``.

    Example:
        >>> import torch, tokenmerge
        >>> from tokenmerge.rng import SiteRandom
        >>> from tokenmerge.site import Site, TokenLayout
        >>> strategy = tokenmerge.get_strategy("retom")
        >>> features = torch.nn.functional.normalize(torch.randn(2, 16, 8), dim=-1)
        >>> site = Site("blk", stage="down")
        >>> plan = strategy.make_plan(
        ...     features, TokenLayout((4, 4)), site, 8, SiteRandom(seed=0)
        ... )
        >>> plan.num_out
        8
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MergeConfig]]
    #: False for content-blind strategies: they are handed features of shape (1, n, 0).
    uses_features: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # every strategy's own make_plan checks its arguments first, so a caller planning on
        # tensors directly gets one clear error instead of an index error deep in the strategy;
        # runs once per fresh plan (never on a cached call) and reads shapes only
        own = cls.__dict__.get("make_plan")
        if own is not None and not getattr(own, "__isabstractmethod__", False):
            if not getattr(own, "_tokenmerge_checked", False):
                cls.make_plan = _checked_make_plan(own)

    def __init__(self, config: MergeConfig) -> None:
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"strategy {self.name!r} takes a {self.config_class.__name__}, got "
                f"{type(config).__name__}; build it with tokenmerge.load_config({self.name!r}, ...)"
            )
        self.config = config

    @classmethod
    def validate_class(cls) -> str:
        """Check the class is a well-formed strategy (run when it is registered); its name."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_\-]*", name):
            raise PluginError(
                f"{cls.__qualname__}.name must be a lower-case name such as 'my_strategy'; "
                f"got {name!r}"
            )
        config_class = getattr(cls, "config_class", None)
        if not (isinstance(config_class, type) and issubclass(config_class, MergeConfig)):
            raise PluginError(
                f"strategy {name!r}: config_class must subclass tokenmerge.MergeConfig"
            )
        field = config_class.model_fields["strategy"]
        if field.default != name or field.annotation != Literal[name]:
            raise PluginError(
                f"strategy {name!r}: declare {config_class.__name__}.strategy as "
                f"Literal[{name!r}] with default {name!r} (it discriminates the config union); "
                f"got {field.annotation} with default {field.default!r}"
            )
        return name

    @abstractmethod
    def capacity(self, layout: TokenLayout, site: Site) -> int:
        """The most image tokens this strategy can merge at one call with this layout."""

    @abstractmethod
    def make_plan(
        self,
        features: Tensor,
        layout: TokenLayout,
        site: Site,
        num_merge: int,
        rng: SiteRandom,
    ) -> Plan:
        """Plan the merge of ``num_merge`` image tokens.

        Args:
            features: ``(P, n, C)`` float32 unit-length features of the ``n`` image tokens
                (``P`` is the batch, or 1 for a plan shared by the batch).
            layout: the grid of the image tokens.
            site: where the plan is used (stage, level, name: for per-site settings).
            num_merge: tokens to merge, already capped at ``capacity``.
            rng: the site's private random stream (never the global RNG).

        Returns:
            A plan over the ``n`` image tokens (the framework adds protected prefix tokens).
        """


def _checked_make_plan(make_plan: Any) -> Any:
    """``make_plan`` with its arguments checked (``Strategy.__init_subclass__`` wraps it)."""

    @functools.wraps(make_plan)
    def checked(
        self: Strategy,
        features: Tensor,
        layout: TokenLayout,
        site: Site,
        num_merge: int,
        rng: SiteRandom,
    ) -> Plan:
        # a compiled site passes the arguments it already checked (SitePatch caps num_merge and
        # cuts the features to the layout's tokens); the checks' Python would only add guards
        if not torch.compiler.is_compiling():
            _check_plan_request(self, features, layout, site, num_merge)
        return make_plan(self, features, layout, site, num_merge, rng)

    checked._tokenmerge_checked = True  # type: ignore[attr-defined]
    return checked


def _check_plan_request(
    strategy: Strategy, features: Any, layout: TokenLayout, site: Site, num_merge: Any
) -> None:
    where = f"strategy {strategy.name!r} at site {site.name!r}"
    n = layout.num_image_tokens
    if not isinstance(features, Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise InputError(
            f"{where}: features must be a (P, n, C) tensor of the n image tokens (P: the batch, "
            f"or 1 for a plan shared by the batch); got {shape}. Add the batch dimension, e.g. "
            "features.unsqueeze(0)"
        )
    if features.shape[1] != n:
        raise InputError(
            f"{where}: the layout's grid {layout.grid} holds {n} image tokens but features has "
            f"{features.shape[1]} (shape {tuple(features.shape)}); pass features of exactly the "
            "image tokens (no prefix tokens) and the grid they lie on"
        )
    try:
        count = operator.index(num_merge)
    except TypeError:
        count = None
    capacity = strategy.capacity(layout, site)
    if count is None or isinstance(num_merge, bool) or not 0 <= count <= capacity:
        raise InputError(
            f"{where}: num_merge must be an integer from 0 to {capacity} (the most it can merge "
            f"among {n} tokens on a {layout.grid[0]} x {layout.grid[1]} grid, "
            f"strategy.capacity(layout, site)); got {num_merge!r}. Cap it: "
            "min(num_merge, strategy.capacity(layout, site))"
        )
