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
image-token count is a perfect square, else ``1 x N``. The protected prefix tokens (``num_prefix``)
are, by default, the fewest (at most 8) that leave a square grid behind them: the class and
register tokens of a ViT-like model. Without ``timestep_arg`` every call of the model is a new
generation (no plan reuse across calls); with it, plans are cached across denoising steps like in
the diffusion adapters.

The adapter protects the model from what it cannot merge. A call about to merge whose other
arguments have the token axis's length (a rotary table, an attention mask or bias: they cannot
follow the merge) is refused with an ``InputError`` naming the argument, unless
``full_length_args`` names it (keys and values the module attends to may stay whole). A site
that merges nothing in a whole forward (input not ``(B, N, C)``, fewer tokens than
``sites.min_tokens``...) is reported once, as a ``NothingMergedWarning``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import Adapter, AdapterOptions, SiteCandidate
from tokenmerge.adapters._views import value_correction
from tokenmerge.config import MergeConfig
from tokenmerge.errors import InputError, NoSitesError
from tokenmerge.nothing_merged import NothingMergedWatch
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
    num_prefix: int | Literal["auto"] = Field(
        default="auto",
        description=(
            "Protected tokens before the image tokens (class, register tokens), never merged. "
            "Default 'auto': the fewest, at most 8, that leave a square grid (or the grid given)."
        ),
    )
    full_length_args: tuple[str, ...] = Field(
        default=(),
        description=(
            "Arguments of the merged modules (names) that may keep the full token length, such "
            "as keys and values they attend to. Any other such argument is refused. Default ()."
        ),
    )
    timestep_arg: str | int | None = Field(
        default=None,
        description=(
            "Where the model's forward takes the diffusion timestep: a keyword name or a "
            "positional index. Default None: no timestep, every call a new generation."
        ),
    )

    @field_validator("num_prefix", mode="before")
    @classmethod
    def _prefix_is_auto_or_a_count(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ):
            return value
        raise ValueError(
            f"num_prefix must be 'auto' or a whole number of tokens, 0 or more; got {value!r}"
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
    watches_sites = True
    options_class: ClassVar[type[AdapterOptions]] = GenericOptions

    def __init__(self, options: GenericOptions | None = None) -> None:
        super().__init__(options)
        # read on every call: plain attributes
        self.grid = self.options.grid
        self.num_prefix = self.options.num_prefix
        self.full_length_args = frozenset(self.options.full_length_args)
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
        total = hidden_states.shape[1]
        prefix = self._prefix(total)
        n = total - prefix
        if n < 0:
            raise InputError(
                f"site {site.name!r}: adapter_options['num_prefix'] is {prefix}, but "
                f"the module received only {total} tokens; num_prefix counts "
                "the protected tokens in front of the image tokens, so it must not exceed the "
                "token count: fix adapter_options['num_prefix'] (or the include globs, if this "
                "module is not the one you meant)"
            )
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != n:
                raise InputError(
                    f"site {site.name!r}: grid {self.grid} holds {self.grid[0] * self.grid[1]} "
                    f"tokens but the module received {n} image tokens (after {prefix} "
                    "prefix tokens); fix adapter_options['grid'] or ['num_prefix']"
                )
            return TokenLayout(self.grid, prefix)
        side = math.isqrt(n)
        grid = (side, side) if side * side == n else (1, n)
        return TokenLayout(grid, prefix)

    def _prefix(self, total: int) -> int:
        """``num_prefix``, or what ``"auto"`` finds for ``total`` tokens."""
        if self.num_prefix != "auto":
            return self.num_prefix
        if self.grid is not None:  # the tokens in front of the grid, if that is few enough
            extra = total - self.grid[0] * self.grid[1]
            return extra if 0 <= extra <= MAX_AUTO_PREFIX else 0
        for prefix in range(min(MAX_AUTO_PREFIX, total - 4) + 1):
            side = math.isqrt(total - prefix)
            if side * side == total - prefix:
                return prefix
        return 0

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        handles: list[RemovableHandle] = []
        for kind, module in modules.items():
            correction = value_correction(patch, kind, module)
            check = self.refuse_full_length_arguments
            handles += patch.attach_local(module, correction=correction, check=check)
        return handles

    def attach_model(self, root: nn.Module, patches: list[SitePatch]) -> list[RemovableHandle]:
        return NothingMergedWatch(patches, per_site=True).attach(root)

    def refuse_full_length_arguments(
        self, module: nn.Module, x: Tensor, args: tuple, kwargs: dict
    ) -> None:
        """Raise ``InputError`` when a call about to merge takes another tensor with the token
        axis's length (not ``x`` itself, nor an argument named in ``full_length_args``): it
        could not follow the merge, and the model would fail on it or silently misuse it."""
        length, batch = x.shape[1], x.shape[0]
        others = [(i, value) for i, value in enumerate(args[1:], 1)]
        others += [(name, value) for name, value in kwargs.items() if name != "hidden_states"]
        for where, value in others:
            if not isinstance(value, Tensor) or value is x or value.dim() == 0:
                continue
            if value.dim() == 1 and value.shape[0] == batch:
                continue  # one value per batch row (a timestep, say)
            dims = value.shape[1:] if value.dim() > 1 and value.shape[0] == batch else value.shape
            if length not in dims:
                continue
            name = _argument_name(module, where)
            if name in self.full_length_args:
                continue
            raise InputError(
                f"{type(module).__name__} was called with {name}={_shape(value)}, which has the "
                f"length of the token axis ({length} tokens); the generic adapter shrinks only "
                "the hidden states, so this argument (a rotary table, an attention mask or "
                "bias?) would no longer match them. Merge around a module that takes only the "
                "tokens (its MLP, say) or use an adapter that knows this model; if the module "
                f"may see {name!r} whole (keys and values it attends to), allow it with "
                f"adapter_options={{'full_length_args': [{name!r}]}}"
            )

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


#: the most prefix tokens ``num_prefix="auto"`` protects (a class, a distillation and registers)
MAX_AUTO_PREFIX = 8


def _argument_name(module: nn.Module, where: int | str) -> str:
    """The parameter name of ``module.forward``'s argument ``where`` (a position or a name)."""
    if isinstance(where, str):
        return where
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[where].name if where < len(positional) else f"positional argument {where}"


def _shape(value: Tensor) -> str:
    return f"<tensor of shape {tuple(value.shape)}>"


def _shorten(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
