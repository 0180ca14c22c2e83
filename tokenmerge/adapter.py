"""The adapter interface: what tokenmerge needs to know about a model family.

An adapter finds the candidate sites of a model (with their stage, level and the sub-modules
that can be merged around), says how tokens are laid out at a call (grid, prefix tokens), reads the
timestep at the root, and installs removable native hooks. Everything architecture-specific lives
in the adapter; strategies stay pure tensor code.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .config import MergeConfig
from .patch import SitePatch
from .site import Site, TokenLayout

__all__ = [
    "Adapter",
    "AdapterOptions",
    "SiteCandidate",
    "TARGET_KINDS",
    "depth_stage",
    "parameter_index",
]

#: the kinds of sub-module a site can merge around (``Sites.attn`` / ``cross_attn`` / ``mlp``)
TARGET_KINDS = ("attn", "cross_attn", "mlp")


class AdapterOptions(BaseModel):
    """Base of the options an adapter takes (``apply(..., adapter_options=...)``): none.

    An adapter with options subclasses it (frozen, unknown options rejected, every field
    described) and names the subclass as its ``options_class``; ``apply`` validates the options
    against the chosen adapter's class and hands the adapter the validated object.

    Example:
        >>> from pydantic import Field
        >>> from tokenmerge.extend import AdapterOptions
        >>> class MyOptions(AdapterOptions):
        ...     patch_size: int = Field(
        ...         default=2, ge=1, description="Pixels per token side."
        ...     )
        >>> MyOptions(patch_size=4).patch_size
        4
    """

    model_config = ConfigDict(frozen=True, extra="forbid")


def forward_parameters(cls: type) -> list[str]:
    """The names of ``cls.forward``'s parameters, in order, without ``self``."""
    return [p for p in inspect.signature(cls.forward).parameters if p != "self"]


def parameter_index(cls: type, name: str) -> int | None:
    """Position of argument ``name`` in ``cls.forward`` when passed positionally (no self)."""
    params = forward_parameters(cls)
    return params.index(name) if name in params else None


def depth_stage(index: int, count: int) -> str:
    """``"first"``, ``"middle"`` or ``"last"``: the third of ``count`` blocks ``index`` is in.

    Example:
        >>> [depth_stage(i, 7) for i in range(7)]
        ['first', 'first', 'first', 'middle', 'middle', 'last', 'last']
    """
    return ("first", "middle", "last")[min(2, 3 * index // max(count, 1))]


@dataclass
class SiteCandidate:
    """A place where merging could happen, before the config's selection.

    Attributes:
        site: its description (name, stage, level, block index, mode).
        modules: the sub-modules merged around, by kind (``"attn"``, ``"cross_attn"``,
            ``"mlp"``); the site merges around those the config turns on.
    """

    site: Site
    modules: dict[str, nn.Module] = field(default_factory=dict)


class Adapter(ABC):
    """Base class of model adapters.

    Subclasses set ``name`` and implement ``supports``, ``candidates`` and ``layout``; the other
    methods have defaults that fit models whose sites merge in local mode around modules taking
    ``hidden_states`` first. Options passed as ``apply(..., adapter_options={...})`` are
    validated against ``options_class`` and arrive as ``options``, the first argument of
    ``__init__`` (kept as ``self.options``).
    """

    name: ClassVar[str]
    #: the adapter's options (``apply(..., adapter_options=...)``); the base class has none
    options_class: ClassVar[type[AdapterOptions]] = AdapterOptions
    #: ``sites.min_tokens`` when the config leaves it None
    default_min_tokens: ClassVar[int] = 256
    #: whether its self-attention sites can merge keys and values alone
    #: (``MergeConfig.keys_values``): the attention takes them from an argument of their own
    merges_keys_values: ClassVar[bool] = False
    #: whether ``attach_model`` warns itself about sites that merged nothing (else ``apply``
    #: warns once when no site of the model merged in a forward)
    watches_sites: ClassVar[bool] = False

    def __init__(self, options: AdapterOptions | None = None) -> None:
        self.options = self.options_class() if options is None else options

    @property
    def default_ratio(self) -> float | None:
        """The ratio the sites get when the config sets neither ``ratio`` nor ``r``; None: the
        config's own default."""
        return None

    @property
    def mode(self) -> str:
        """How every site merges: ``"local"`` (merge, run, unmerge around each sub-module; the
        default) or ``"progressive"`` (tokens stay merged to the last block: ViT adapters)."""
        return "local"

    @classmethod
    @abstractmethod
    def supports(cls, model: Any) -> bool:
        """True when this adapter knows how to patch ``model``.

        A class-level check: ``apply`` asks each candidate adapter class before building any,
        and constructs only the one it chooses, so keep it cheap and free of side effects.
        """

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        """Why this adapter's library has ``model`` but it cannot be merged, when known (the
        ``UnsupportedModelError`` says so instead of suggesting the generic adapter); default
        None. Asked only of adapters whose ``supports`` said no, so keep it as cheap."""
        return None

    def root(self, model: Any) -> nn.Module:
        """The module that is patched (a pipeline's denoiser, for instance)."""
        return model

    @abstractmethod
    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        """Every site of the model that could merge, in model order."""

    def default_sites(
        self, candidates: list[SiteCandidate], config: MergeConfig
    ) -> list[SiteCandidate]:
        """The sites used when ``config.sites`` selects none itself (no levels, stages, blocks
        or include); default: all."""
        return candidates

    @abstractmethod
    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        """How the tokens reaching ``site`` in this call are laid out (None: unknown, and the
        call passes through unmerged)."""

    def layout_for(self, site: Site) -> Callable[[Site, Tensor], TokenLayout | None]:
        """The layout callable ``site`` calls on every plan (default: ``layout``). Override it
        to hand each site an object of its own, so the hot path does no look-up by site name."""
        return self.layout

    def timestep(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """The timestep of a root forward call, or None (each call is then a new generation)."""
        return None

    def conditioning(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
        """The conditioning tensor of a root forward call (its text embeddings...), or None.

        A pipeline makes it once per generation and passes the same tensor at every step, so a
        tensor the generation has not seen starts a new one (``StepState``). Default: the
        ``encoder_hidden_states`` keyword, when it is a tensor.
        """
        value = kwargs.get("encoder_hidden_states")
        return value if isinstance(value, Tensor) else None

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        """Install the hooks of one site: local merging around each chosen sub-module."""
        handles: list[RemovableHandle] = []
        for module in modules.values():
            handles += patch.attach_local(module)
        return handles

    def check_config(self, config: MergeConfig) -> None:  # noqa: B027 - optional override
        """Raise ``ConfigError`` for a config this model family cannot honour (default: none)."""

    def attach_model(self, root: nn.Module, patches: list[SitePatch]) -> list[RemovableHandle]:
        """Install model-level hooks, after every site's (progressive mode's token tracking,
        for instance); default: none."""
        return []

    def detach(self, root: nn.Module) -> None:  # noqa: B027 - optional override
        """Undo anything beyond the hooks ``attach`` returned (default: nothing)."""
