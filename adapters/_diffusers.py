"""What the diffusers adapters share: signature checks, the per-call guard, depth stages."""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import (
    Adapter,
    AdapterOptions,
    depth_stage,
    forward_parameters,
    parameter_index,
)
from tokenmerge.adapters._views import value_correction
from tokenmerge.attention_view import KEYS_VALUES_PROCESSORS, PLAIN_PROCESSORS, processor_name
from tokenmerge.calls import CallValues, PerThread
from tokenmerge.errors import ConfigError, UnsupportedModelError
from tokenmerge.patch import SitePatch
from tokenmerge.proportional import SizeBias
from tokenmerge.site import Site, TokenLayout

__all__ = [
    "GridHook",
    "PatchGrid",
    "TargetGuard",
    "TransformerAdapter",
    "check_signatures",
    "depth_stage",
    "given_arguments",
    "parameter_index",
    "size_bias",
    "value_correction",
]

#: diffusers hooks that only move or cast weights: a call under them computes its output afresh,
#: so merging around it stays exact (every other diffusers hook may replay a stored output)
_WEIGHT_ONLY_HOOKS = frozenset(
    {
        "group_offloading",
        "lazy_prefetch_group_offloading",
        "layer_execution_tracker",
        "layerwise_casting",
        "peft_autocast_disable",
    }
)


def given_arguments(names: list[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name: ``args`` matched to ``names`` (``forward_parameters``), then
    ``kwargs``."""
    return {**dict(zip(names, args, strict=False)), **kwargs}


def check_signatures(expected: dict[type, tuple[str, ...]], adapter: str) -> None:
    """Fail loudly when a diffusers release changed a call an adapter relies on.

    Args:
        expected: class -> the names its ``forward`` arguments must start with.
        adapter: the adapter's name, for the message.
    """
    import diffusers

    for cls, names in expected.items():
        params = forward_parameters(cls)
        if tuple(params[: len(names)]) != names:
            raise UnsupportedModelError(
                f"diffusers {diffusers.__version__} changed {cls.__name__}.forward: its "
                f"arguments start with {params[: len(names)]}, tokenmerge's {adapter} adapter "
                f"expects {list(names)}. Install a diffusers version tokenmerge supports "
                "(pip install 'tokenmerge[diffusers]') or report this."
            )


class TargetGuard:
    """Decides, per call of one target module, whether merging around it is safe.

    Args:
        module: the target module.
        kind: ``"attn"``, ``"cross_attn"`` or ``"mlp"``.
        block: the block holding it (its ``_chunk_size`` says whether its MLP runs chunked).
        watched: more modules whose diffusers hooks must be checked (a merge spanning several
            modules, such as a Flux single-stream block's body).
    """

    def __init__(
        self,
        module: nn.Module,
        kind: str,
        block: nn.Module,
        watched: Iterable[nn.Module] = (),
        keys_values: bool = False,
    ) -> None:
        self.module = module
        self.kind = kind
        self.block = block
        self.watched = (module, *watched)
        self.keys_values = keys_values  # the merged tokens go in as encoder_hidden_states

    def replaying_hook(self) -> str | None:
        """Why a diffusers hook on a watched module makes merging unsafe, if one does."""
        # A diffusers cache hook (pyramid attention broadcast, FasterCache...) may hand back an
        # output it stored at an earlier step, made with an earlier plan: unmerging it with this
        # call's plan would mix tokens up, silently. Offloading and casting hooks are harmless.
        for module in self.watched:
            registry = module.__dict__.get("_diffusers_hook")
            if registry is not None and set(getattr(registry, "hooks", ())) - _WEIGHT_ONLY_HOOKS:
                return "a diffusers hook on the module may replay outputs of earlier steps"
        return None

    def __call__(self, args: tuple, kwargs: dict) -> str | None:
        reason = self.replaying_hook()
        if reason is not None:
            return reason
        if self.kind == "mlp":
            if getattr(self.block, "_chunk_size", None) is not None:
                return "MLP run in token chunks (forward chunking)"
            return None
        if self.keys_values:
            if kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None) is not None:
                return "self-attention given encoder_hidden_states already (only_cross_attention)"
            if processor_name(self.module) not in KEYS_VALUES_PROCESSORS:
                return (
                    f"keys_values with the {processor_name(self.module)} attention processor, "
                    "which may not take keys and values from encoder_hidden_states (fused QKV "
                    "projections: there is no to_kv)"
                )
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        if mask is None:
            return None
        if self.kind == "attn":
            return "self-attention with an attention mask over the merged tokens"
        if isinstance(mask, Tensor) and mask.dim() >= 3 and mask.shape[-2] != 1:
            return "cross-attention mask with a row per query"
        return None


def target_hooks(patch: SitePatch, kind: str, module: nn.Module, block: nn.Module) -> dict:
    """``SitePatch.attach_local``'s keyword arguments for a target of a diffusers block: its
    guard, value correction and proportional attention; with ``keys_values``, self-attention
    takes its keys and values from the merged tokens (as ``encoder_hidden_states``) instead
    (``"auto"``: where its processor is a plain one).

    Raises:
        ConfigError: ``keys_values=True`` at a self-attention whose processor is not a plain
            one (SD3's joint attention takes the text as ``encoder_hidden_states``).
    """
    asked = patch.config.keys_values if kind == "attn" else False
    able = processor_name(module) in KEYS_VALUES_PROCESSORS
    keys_values = asked is True or (asked == "auto" and able)
    if keys_values and not able:
        raise ConfigError(
            f"site {patch.site.name!r}: keys_values=True merges the keys and values of a "
            "self-attention by passing them as encoder_hidden_states, which its "
            f"{processor_name(module)} processor cannot take that way (joint attention takes "
            "the text there; fused QKV projections have no to_kv). Set keys_values='auto' "
            "(tokens merged there) or False, or exclude the site (sites={'exclude': [...]})"
        )
    if keys_values:
        patch.merges_keys_values()
    return {
        "guard": TargetGuard(module, kind, block, keys_values=keys_values),
        "correction": None if keys_values else value_correction(patch, kind, module),
        "bias": size_bias(patch, kind, module),
        "keys_values": "encoder_hidden_states" if keys_values else None,
    }


def size_bias(patch: SitePatch, kind: str, module: nn.Module) -> SizeBias | None:
    """Proportional attention for a target, when the config asks for it and the target is a
    self-attention whose processor adds ``attention_mask`` to its logits (the plain processors
    pass it through ``Attention.prepare_attention_mask`` as an additive mask over the keys)."""
    if kind != "attn" or not patch.config.local_proportional_attention:
        return None
    if processor_name(module) not in PLAIN_PROCESSORS:
        return None
    return SizeBias("attention_mask", "diffusers")


def _grid_call() -> CallValues:
    return CallValues(grid=None, key=None)


class GridHook(ABC):
    """A pre-hook that reads the token grid of each call; it also serves as the layout of the
    sites under it (one object, so the hot path does no look-up). Subclasses set
    ``calls.value.grid``: the grid is the calling thread's (``tokenmerge.calls``)."""

    #: whether tokens beyond the grid may come first (Flux's text tokens), protected from merging
    text_first: bool = False

    def __init__(self) -> None:
        self.calls = PerThread(_grid_call)

    def __getstate__(self) -> dict[str, Any]:
        # the grid is read afresh at every call; a copy starts without one
        return {**self.__dict__, "calls": PerThread(_grid_call)}

    @property
    def grid(self) -> tuple[int, int] | None:
        """The grid of the calling thread's call under way (None: unknown)."""
        return self.calls.value.grid

    @grid.setter
    def grid(self, grid: tuple[int, int] | None) -> None:
        self.calls.value.grid = grid

    @abstractmethod
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Read the grid of this call into ``calls.value.grid`` (None when it is unknown)."""

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        """Image tokens on ``grid``, behind the text tokens where ``text_first`` allows them."""
        grid = self.calls.value.grid
        if grid is None:
            return None
        extra = hidden_states.shape[1] - grid[0] * grid[1]
        if extra < 0 or (extra and not self.text_first):
            return None
        return TokenLayout(grid, extra)


class PatchGrid(GridHook):
    """Pre-hook of a module taking ``(B, C, H, W)`` latents (a DiT-style model, a UNet's
    ``Transformer2DModel``): the token grid of a call is the input's size over the patch size."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        p = self.patch_size
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[-2] % p == 0 and x.shape[-1] % p == 0:
            self.calls.value.grid = (x.shape[-2] // p, x.shape[-1] // p)
        else:
            self.calls.value.grid = None


class TransformerAdapter(Adapter):
    """What the DiT-family adapters share: the root is the model or a pipeline's
    ``transformer``; a ``GridHook`` on the root gives every site its layout; the timestep is the
    root's ``timestep`` argument; plans are made from each site's block input.

    Subclasses implement ``model_classes`` and ``candidates``, calling ``watch_root`` there and
    recording each site's block in ``_blocks``.
    """

    def __init__(self, options: AdapterOptions | None = None) -> None:
        super().__init__(options)
        self._root: nn.Module | None = None
        self._grid: GridHook | None = None
        self._grid_attached = False
        self._blocks: dict[str, nn.Module] = {}  # site name -> its block
        self._timestep_index: int | None = None
        self._conditioning_index: dict[str, int | None] = {}
        #: the pipeline applied to (a weak reference), whose current step places the timestep
        self._pipeline: weakref.ref | None = None

    @staticmethod
    @abstractmethod
    def model_classes() -> tuple[type, ...]:
        """The root model classes this adapter patches (imported on demand)."""

    @classmethod
    def supports(cls, model: Any) -> bool:
        models = cls.model_classes()
        return isinstance(model, models) or isinstance(getattr(model, "transformer", None), models)

    def root(self, model: Any) -> nn.Module:
        if isinstance(model, self.model_classes()):
            return model
        self._pipeline = weakref.ref(model)
        return model.transformer

    def __getstate__(self) -> dict[str, Any]:
        # a weak reference cannot be pickled: a copy reads the timestep its calls are given
        return {**self.__dict__, "_pipeline": None}

    def watch_root(self, root: nn.Module, grid: GridHook) -> None:
        """Remember the root, its grid hook and where its forward takes the timestep."""
        self._root = root
        self._grid = grid
        self._timestep_index = parameter_index(type(root), "timestep")
        self._conditioning_index = {
            name: parameter_index(type(root), name)
            for name in ("encoder_hidden_states", "class_labels")
        }

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        return self._grid.layout(site, hidden_states) if self._grid is not None else None

    def layout_for(self, site: Site) -> Callable[[Site, Tensor], TokenLayout | None]:
        return self._grid.layout

    def timestep(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        # a pipeline's step under way (diffusers pipelines keep ``t`` of ``for t in timesteps``
        # as ``_current_timestep``): a view of its schedule, placed without reading the device,
        # where the model is given a tensor computed from it (FLUX.1's ``timestep / 1000``)
        pipeline = self._pipeline() if self._pipeline is not None else None
        current = getattr(pipeline, "_current_timestep", None)
        if isinstance(current, Tensor):
            return current
        if "timestep" in kwargs:
            return kwargs["timestep"]
        index = self._timestep_index
        return args[index] if index is not None and len(args) > index else None

    def conditioning(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
        # text embeddings, or a class-conditional DiT's labels
        for name in ("encoder_hidden_states", "class_labels"):
            value = kwargs.get(name)
            index = self._conditioning_index.get(name)
            if value is None and index is not None and len(args) > index:
                value = args[index]
            if isinstance(value, Tensor):
                return value
        return None

    def attach_block(self, patch: SitePatch) -> tuple[nn.Module, list[RemovableHandle]]:
        """The site's block, and the hooks every site needs: the root's grid hook (installed
        once) and the block-input watcher the plan is made from."""
        handles = []
        if not self._grid_attached:
            self._grid_attached = True
            handles.append(self._root.register_forward_pre_hook(self._grid, with_kwargs=True))
        block = self._blocks[patch.site.name]
        return block, handles + patch.watch_block_input(block)

    def detach(self, root: nn.Module) -> None:
        self._grid_attached = False
        if self._grid is not None:
            self._grid.grid = None
