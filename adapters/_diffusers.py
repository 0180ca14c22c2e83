"""What the diffusers adapters share: signature checks, the per-call guard, depth stages."""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from torch import Tensor, nn

from tokenmerge.errors import UnsupportedModelError

__all__ = ["TargetGuard", "check_signatures", "depth_stage", "parameter_index"]

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


def check_signatures(expected: dict[type, tuple[str, ...]], adapter: str) -> None:
    """Fail loudly when a diffusers release changed a call an adapter relies on.

    Args:
        expected: class -> the names its ``forward`` arguments must start with.
        adapter: the adapter's name, for the message.
    """
    import diffusers

    for cls, names in expected.items():
        params = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
        if tuple(params[: len(names)]) != names:
            raise UnsupportedModelError(
                f"diffusers {diffusers.__version__} changed {cls.__name__}.forward: its "
                f"arguments start with {params[: len(names)]}, tokenmerge's {adapter} adapter "
                f"expects {list(names)}. Install a diffusers version tokenmerge supports "
                "(pip install 'tokenmerge[diffusers]') or report this."
            )


def parameter_index(cls: type, name: str) -> int | None:
    """Position of argument ``name`` in ``cls.forward`` when passed positionally (no self)."""
    params = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    return params.index(name) if name in params else None


def depth_stage(index: int, count: int) -> str:
    """``"first"``, ``"middle"`` or ``"last"``: the third of ``count`` blocks ``index`` is in.

    Example:
        >>> [depth_stage(i, 7) for i in range(7)]
        ['first', 'first', 'first', 'middle', 'middle', 'last', 'last']
    """
    return ("first", "middle", "last")[min(2, 3 * index // max(count, 1))]


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
        self, module: nn.Module, kind: str, block: nn.Module, watched: Iterable[nn.Module] = ()
    ) -> None:
        self.module = module
        self.kind = kind
        self.block = block
        self.watched = (module, *watched)

    def __call__(self, args: tuple, kwargs: dict) -> str | None:
        # A diffusers cache hook (pyramid attention broadcast, FasterCache...) may hand back an
        # output it stored at an earlier step, made with an earlier plan: unmerging it with this
        # call's plan would mix tokens up, silently. Offloading and casting hooks are harmless.
        for module in self.watched:
            registry = module.__dict__.get("_diffusers_hook")
            if registry is not None and set(getattr(registry, "hooks", ())) - _WEIGHT_ONLY_HOOKS:
                return "a diffusers hook on the module may replay outputs of earlier steps"
        if self.kind == "mlp":
            if getattr(self.block, "_chunk_size", None) is not None:
                return "MLP run in token chunks (forward chunking)"
            return None
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        if mask is None:
            return None
        if self.kind == "attn":
            return "self-attention with an attention mask over the merged tokens"
        if isinstance(mask, Tensor) and mask.dim() >= 3 and mask.shape[-2] != 1:
            return "cross-attention mask with a row per query"
        return None
