"""The generic adapter: merge around modules you name, in any PyTorch model.

For research models and architectures without a dedicated adapter. Each module a
``sites={"include": [...]}`` glob matches becomes a site, merged in local mode: its first
argument (or ``hidden_states=``) must be image tokens ``(B, N, C)`` - optionally behind
``num_prefix`` protected tokens - and its output a tensor of the same layout (or a tuple starting
with one).

Value correction (``value_correction``): where a named module is an attention the correction
knows (diffusers, timm, transformers) or shows its projections by name (``to_q`` / ``to_k`` /
``to_v`` / ``to_out``, ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, ``qkv`` / ``proj``, with
a head count), checked against the module's own output at every fit
(``tokenmerge.adapters._views``); elsewhere, ``torch.nn.MultiheadAttention`` included, none, and
``stats()`` shows None.

Its options (``GenericOptions``): the grid is ``grid=(h, w)`` when given, else square when the
image-token count is a perfect square, else ``1 x N``. Without ``timestep_arg`` every call of the
model is a new generation (no plan reuse across calls); with it, plans are cached across
denoising steps like in the diffusion adapters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import Adapter, AdapterOptions, SiteCandidate
from tokenmerge.adapters._views import value_correction
from tokenmerge.config import MergeConfig
from tokenmerge.errors import InputError, NoSitesError
from tokenmerge.patch import SitePatch
from tokenmerge.site import Site, TokenLayout

__all__ = ["GenericAdapter", "GenericOptions"]


class GenericOptions(AdapterOptions):
    """Options of the generic adapter.

    Example:
        >>> from tokenmerge.adapters.generic import GenericOptions
        >>> GenericOptions(grid=(4, 8), num_prefix=1).grid
        (4, 8)
    """

    grid: tuple[int, int] | None = Field(
        default=None,
        description=(
            "(height, width) of the image tokens. Default None: square when the image-token "
            "count is a perfect square, else 1 x N."
        ),
    )
    num_prefix: Annotated[int, Field(strict=True, ge=0)] = Field(
        default=0,
        description=(
            "Protected tokens before the image tokens (a class token...), never merged. Default 0."
        ),
    )
    timestep_arg: str | int | None = Field(
        default=None,
        description=(
            "Where the model's forward takes the diffusion timestep: a keyword name or a "
            "positional index. Default None: no timestep, every call a new generation."
        ),
    )

    @field_validator("grid", mode="before")
    @classmethod
    def _grid_is_two_sides(cls, grid: Any) -> Any:
        if grid is None:
            return grid
        if (
            isinstance(grid, (str, bytes))
            or not isinstance(grid, Sequence)
            or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
        ):
            raise ValueError(f"grid must be (height, width), two positive integers; got {grid!r}")
        return tuple(grid)


class GenericAdapter(Adapter):
    """Local merging around the modules named by ``sites`` include globs; see the module
    docstring. Options: ``GenericOptions``.

    Example:
        >>> import torch, tokenmerge
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        >>> handle = tokenmerge.apply(model, "tome", ratio=0.5, adapter="generic",
        ...                           sites={"include": ["1"], "min_tokens": 1},
        ...                           adapter_options={"grid": (4, 8)})
        >>> model(torch.randn(2, 32, 8)).shape, handle.stats()["1"].tokens_out
        (torch.Size([2, 32, 8]), 16)
        >>> handle.remove()
    """

    name = "generic"
    options_class: ClassVar[type[AdapterOptions]] = GenericOptions

    def __init__(self, options: GenericOptions | None = None) -> None:
        super().__init__(options)
        # read on every call: plain attributes
        self.grid = self.options.grid
        self.num_prefix = self.options.num_prefix
        self.timestep_arg = self.options.timestep_arg

    @classmethod
    def supports(cls, model: Any) -> bool:
        return isinstance(model, nn.Module)

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        return [
            SiteCandidate(Site(name), {"attn": module})
            for name, module in root.named_modules()
            if name
        ]

    def default_sites(
        self, candidates: list[SiteCandidate], config: MergeConfig
    ) -> list[SiteCandidate]:
        if not config.sites.include:
            raise NoSitesError(
                "the generic adapter merges around the modules you name: pass sites={'include': "
                "[globs of module names]}, e.g. sites={'include': ['blocks.*.attn']}; module "
                "names in this model: "
                + ", ".join(c.site.name for c in candidates[:12])
                + (" ..." if len(candidates) > 12 else "")
            )
        return candidates

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout:
        if hidden_states.dim() != 3:
            raise InputError(
                f"site {site.name!r}: the generic adapter needs (batch, tokens, channels) "
                f"hidden states; got shape {tuple(hidden_states.shape)}"
            )
        n = hidden_states.shape[1] - self.num_prefix
        if n < 0:
            raise InputError(
                f"site {site.name!r}: adapter_options['num_prefix'] is {self.num_prefix}, but "
                f"the module received only {hidden_states.shape[1]} tokens; num_prefix counts "
                "the protected tokens in front of the image tokens, so it must not exceed the "
                "token count: fix adapter_options['num_prefix'] (or the include globs, if this "
                "module is not the one you meant)"
            )
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != n:
                raise InputError(
                    f"site {site.name!r}: grid {self.grid} holds {self.grid[0] * self.grid[1]} "
                    f"tokens but the module received {n} image tokens (after {self.num_prefix} "
                    "prefix tokens); fix adapter_options['grid'] or ['num_prefix']"
                )
            return TokenLayout(self.grid, self.num_prefix)
        side = math.isqrt(n)
        grid = (side, side) if side * side == n else (1, n)
        return TokenLayout(grid, self.num_prefix)

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        handles: list[RemovableHandle] = []
        for kind, module in modules.items():
            correction = value_correction(patch, kind, module)
            handles += patch.attach_local(module, correction=correction)
        return handles

    def timestep(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        where = self.timestep_arg
        if where is None:
            return None
        if isinstance(where, int):
            value = args[where] if len(args) > where else None
        else:
            value = kwargs.get(where)
        if value is None or isinstance(value, torch.Tensor):
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value
        raise InputError(
            f"adapter_options['timestep_arg'] is {where!r}, and the model was called with a "
            f"{type(value).__name__} there ({_shorten(value)}); the timestep must be a number or "
            "a tensor. Point timestep_arg at the model's timestep argument (a keyword name or a "
            "positional index), or leave it None (every call is then a new generation)"
        )


def _shorten(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
