"""timm's hierarchical and windowed vision models: tokens merge around each block's MLP only.

Swin, MaxViT, LeViT, SAM's image encoder and EfficientViT (MSRA) shrink their token grid from
stage to stage and run attention inside windows, pooled grids or a fixed resolution, with
relative position biases indexed by the positions in those windows. Merged tokens cannot follow
any of that, so attention is never merged here. Their MLP, though, is token-wise (linear or 1 x 1
convolution, activation, LayerNorm or eval-mode BatchNorm, each acting on one token at a time), so
running it on merged tokens and copying each merged token's output back to the tokens it stands
for (as tomesd does for Stable Diffusion's feed-forward) is exact but for the one approximation
merging makes: tokens merged together share one output - and the MLP holds most of these
models' FLOPs. Every call plans afresh on the
MLP's own input (there are no denoising steps to reuse a plan over), the token grid stays whole
between the MLPs, and output shapes never change.

What each supported class merges: one site per module owning a token-wise MLP, named after
that module. A site's ``level`` is ``2 ** i`` in the model's stage ``i`` (its grid's downsample
factor relative to the first stage: every stage halves it; SAM has one grid, level 1), so
``sites={"levels": (1, 2)}`` picks the first two stages; its ``stage`` is the third of the sites
it is in (``first`` / ``middle`` / ``last``), as in the ViT adapters.

- ``SwinTransformer``, ``SwinTransformerV2``, ``SwinTransformerV2Cr``: every block's ``mlp``,
  which receives ``(B, H * W, C)``; the grid is the block input's ``(B, H, W, C)``.
- ``MaxxVit`` (MaxViT, MaxxViT, CoAtNet): the ``mlp`` of each partition-attention unit
  (``attn_block`` / ``attn_grid``: ``(B, H, W, C)``, or ``(B, C, H, W)`` with
  ``use_nchw_attn``), of CoAtNet's ``TransformerBlock2d`` and of MaxxViT's ``ConvNeXtBlock``
  (``(B, C, H, W)`` through a 1 x 1 ``ConvMlp``, or ``(B, H, W, C)``). MBConv blocks have no MLP.
- ``Levit`` (and ``LevitDistilled``): the ``LevitMlp`` of every block and attention-downsample,
  ``(B, N, C)`` on the grid the block's attention is built for (``(B, C, H, W)`` in the conv
  variants); its BatchNorm layers are token-wise in eval mode only.
- ``VisionTransformerSAM``: every block's ``mlp``, ``(B, H * W, C)``; the grid is the block
  input's ``(B, H, W, C)``.
- ``EfficientVitMsra``: each residual feed-forward (``ffn0`` / ``ffn1`` and the downsamples'
  ``res1.1`` / ``res2.1``, a 1 x 1 ``ConvNorm`` pair), ``(B, C, H, W)``; eval mode only.

Refused, with the layer that mixes tokens: ``PyramidVisionTransformerV2`` (its MLP runs a 3 x 3
depthwise convolution between its linear layers), ``EfficientVit`` and ``EfficientVitLarge``
(their feed-forward is an MBConv with a 3 x 3 depthwise convolution).

The MLP is this adapter's only target and its default: ``sites.attn`` at its default stands for
it, ``sites={"mlp": True}`` names it; asking for ``sites.attn`` or ``sites.cross_attn`` explicitly
is a ``ConfigError``. An MLP whose BatchNorm normalises with batch statistics (training mode)
mixes tokens, so such calls pass through unmerged (``stats().passed_through``).

Example:
    >>> import timm, torch, tokenmerge
    >>> model = timm.create_model(
    ...     "swin_tiny_patch4_window7_224", pretrained=False,
    ...     embed_dim=16, depths=(2, 2), num_heads=(1, 2), img_size=56,
    ... ).eval()
    >>> with tokenmerge.apply(model, "tome", ratio=0.5) as handle:
    ...     logits = model(torch.randn(1, 3, 56, 56))
    ...     [(s.tokens_in, s.tokens_out) for s in handle.stats().values()]
    [(196, 98), (196, 98), (49, 25), (49, 25)]
    >>> handle.sites[0].targets
    ('mlp',)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, partial
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import Adapter, SiteCandidate, depth_stage
from tokenmerge.calls import CallValues, PerThread
from tokenmerge.config import MergeConfig
from tokenmerge.errors import ConfigError, UnsupportedModelError
from tokenmerge.patch import EMPTY_BATCH, SitePatch
from tokenmerge.selectors import Sites
from tokenmerge.site import Site, TokenLayout

__all__ = ["TimmHierarchicalAdapter"]

#: ``grid_of(owner, owner_input)``: the ``(h, w)`` grid of a 3-D MLP input, read when the
#: module owning the MLP is called
GridOf = Callable[[nn.Module, Any], "tuple[int, int] | None"]


def _grid_of_channels_last_input(owner: nn.Module, x: Any) -> tuple[int, int] | None:
    """Swin and SAM blocks take ``(B, H, W, C)`` and flatten it to ``(B, H * W, C)`` for the
    MLP, so the grid is only visible at the block's input."""
    if isinstance(x, Tensor) and x.dim() == 4:
        return int(x.shape[1]), int(x.shape[2])
    return None


def _grid_of_levit_block(owner: nn.Module, x: Any) -> tuple[int, int] | None:
    """A LeViT block's tokens are its attention's fixed resolution (its biases are built for
    it), row-major, without prefix tokens."""
    height, width = owner.attn.resolution
    return int(height), int(width)


def _grid_of_levit_downsample(owner: nn.Module, x: Any) -> tuple[int, int] | None:
    """A LeViT attention-downsample's MLP sees the queries' grid: the resolution subsampled
    with the attention's stride, rounded up (as ``AttentionDownsample`` builds it)."""
    attn = owner.attn_downsample
    height, width = attn.resolution
    return -(-int(height) // attn.stride), -(-int(width) // attn.stride)


@dataclass(frozen=True)
class _Owner:
    """A timm module class that owns a token-wise MLP.

    Attributes:
        mlp: the attribute holding the MLP.
        grid_of: where the grid of a 3-D MLP input comes from (None: the MLP input is 4-D and
            carries its grid).
        mlp_class: only owners whose MLP is of this class are sites (EfficientViT-MSRA's
            residual wrapper also wraps convolutions and attention).
    """

    mlp: str
    grid_of: GridOf | None = None
    mlp_class: type | None = None


@cache
def _owners() -> dict[type, _Owner]:
    """The module classes owning an MLP, matched by exact class: a subclass may run its MLP on
    another layout."""
    from timm.models import (
        efficientvit_msra,
        levit,
        maxxvit,
        swin_transformer,
        swin_transformer_v2,
        swin_transformer_v2_cr,
        vision_transformer_sam,
    )

    from_input = _Owner("mlp", _grid_of_channels_last_input)
    four_d = _Owner("mlp")
    return {
        swin_transformer.SwinTransformerBlock: from_input,
        swin_transformer_v2.SwinTransformerV2Block: from_input,
        swin_transformer_v2_cr.SwinTransformerV2CrBlock: from_input,
        vision_transformer_sam.Block: from_input,
        maxxvit.PartitionAttentionCl: four_d,
        maxxvit.PartitionAttention2d: four_d,
        maxxvit.ParallelPartitionAttention: four_d,
        maxxvit.TransformerBlock2d: four_d,
        maxxvit.ConvNeXtBlock: four_d,
        levit.LevitBlock: _Owner("mlp", _grid_of_levit_block),
        levit.LevitDownsample: _Owner("mlp", _grid_of_levit_downsample),
        efficientvit_msra.ResidualDrop: _Owner("m", mlp_class=efficientvit_msra.ConvMlp),
    }


@cache
def _token_wise_mlps() -> tuple[type, ...]:
    """MLP classes whose forward applies its layers to each token alone (given 1 x 1 convs and
    no BatchNorm in training mode, checked separately). ``GlobalResponseNormMlp`` (norms over
    the grid) and a ``GatedMlp`` with a gate (gMLP's spatial gating) are not among them."""
    from timm.layers import ConvMlp, GatedMlp, GluMlp, Mlp, SwiGLU
    from timm.models import efficientvit_msra, levit

    return Mlp, GluMlp, SwiGLU, ConvMlp, GatedMlp, levit.LevitMlp, efficientvit_msra.ConvMlp


@cache
def _model_classes() -> tuple[type, ...]:
    from timm.models.efficientvit_msra import EfficientVitMsra
    from timm.models.levit import Levit
    from timm.models.maxxvit import MaxxVit
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    return (
        SwinTransformer,
        SwinTransformerV2,
        SwinTransformerV2Cr,
        MaxxVit,
        Levit,
        VisionTransformerSAM,
        EfficientVitMsra,
    )


_ONLY_MLP = (
    "only token-wise MLPs merge in timm's hierarchical models; their attention (windowed, "
    "pooled or at a fixed resolution, with relative position biases) cannot follow merged tokens"
)
#: timm hierarchical models without a token-wise MLP, by class name (the first in the MRO wins)
_REFUSED = {
    "PyramidVisionTransformerV2": (
        "PVT-v2's MLP is not token-wise: every block's mlp (MlpWithDepthwiseConv) runs a 3 x 3 "
        "depthwise convolution (mlp.dwconv) between its two linear layers, mixing each token "
        f"with its neighbours, so it cannot run on merged tokens; and {_ONLY_MLP}"
    ),
    "EfficientVitLarge": (
        "EfficientViT-Large has no token-wise MLP: its feed-forward is an MBConv / FusedMBConv "
        "(local_module.main) whose 3 x 3 convolutions (depth_conv, spatial_conv) mix "
        f"neighbouring tokens, so it cannot run on merged tokens; and {_ONLY_MLP}"
    ),
    "EfficientVit": (
        "EfficientViT (MIT) has no token-wise MLP: each block's feed-forward is an MBConv "
        "(local_module.main) whose 3 x 3 depthwise convolution (depth_conv) mixes neighbouring "
        f"tokens, so it cannot run on merged tokens; and {_ONLY_MLP}"
    ),
}

#: ``layers.2.blocks.0`` / ``stages.1.downsample`` -> stage 2 / 1; SAM's ``blocks.*``: stage 0
_STAGE = re.compile(r"^(?:layers|stages)\.(\d+)\.")


def _not_token_wise(mlp: nn.Module) -> str | None:
    """Why ``mlp`` may mix tokens (None: it acts on each token alone, given eval-mode
    BatchNorm, which ``_MlpMerge`` checks at every call)."""
    if type(mlp) not in _token_wise_mlps():
        return (
            f"{type(mlp).__module__}.{type(mlp).__qualname__} is not an MLP this adapter knows "
            "to act on each token alone"
        )
    gate = getattr(mlp, "gate", None)
    if gate is not None and not isinstance(gate, nn.Identity):
        return f"its gate ({type(gate).__name__}) mixes tokens"
    for name, layer in mlp.named_modules():
        if isinstance(layer, nn.modules.conv._ConvNd) and (
            any(k != 1 for k in layer.kernel_size)
            or any(s != 1 for s in layer.stride)
            or layer.padding not in ("valid", "same", (0,) * len(layer.kernel_size))
        ):
            return f"its layer {name} is a {layer.kernel_size} convolution, which mixes tokens"
    return None


def _channels_first(mlp: nn.Module) -> bool:
    """Whether a 4-D input of ``mlp`` is ``(B, C, H, W)``: its first layer is a convolution
    (a ``Linear`` first takes ``(B, H, W, C)``)."""
    for layer in mlp.modules():
        if isinstance(layer, nn.Linear):
            return False
        if isinstance(layer, nn.modules.conv._ConvNd):
            return True
    return False


@dataclass
class _Found:
    """One module owning a token-wise MLP."""

    owner: nn.Module
    mlp: nn.Module
    grid_of: GridOf | None
    channels_first: bool
    norms: tuple[_BatchNorm, ...]


class _Grid:
    """The token grid of the calling thread's current MLP call at one site; also the site's
    layout callable (``Adapter.layout_for``), which ``copy.deepcopy`` copies with the model."""

    def __init__(self) -> None:
        self.grids = PerThread(partial(CallValues, grid=None))

    def __call__(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        grid = self.grids.value.grid
        if grid is None or grid[0] * grid[1] != hidden_states.shape[1]:
            return None
        return TokenLayout(grid)  # no prefix tokens: LeViT, Swin, MaxViT and SAM have none


class _GridHook:
    """The pre-hook of a module owning an MLP with 3-D input: records the grid of its call
    (the MLP's own input no longer shows it)."""

    def __init__(self, grid: _Grid, grid_of: GridOf) -> None:
        self.grid = grid
        self.grid_of = grid_of

    def __call__(self, owner: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        self.grid.grids.value.grid = self.grid_of(owner, x)


class _MlpMerge:
    """The hooks merging around one MLP: its input's tokens are merged before its forward, its
    output unmerged after (a class, so ``copy.deepcopy`` copies it with the model).

    A 4-D input is seen as tokens - ``(B, H, W, C)`` flattened, ``(B, C, H, W)`` flattened and
    transposed (views, where the strides allow) - and the merged tokens reach the MLP in the
    input's own layout, with the grid collapsed to ``(M, 1)``: a token-wise MLP does not care
    where a token sits.
    """

    def __init__(self, patch: SitePatch, grid: _Grid, found: _Found) -> None:
        self.patch = patch
        self.grid = grid
        self.channels_first = found.channels_first
        self.norms = found.norms
        #: per thread: the call's plan and input shape, between the two hooks
        self.slots = PerThread(list)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "slots": PerThread(list)}

    def _tokens(self, x: Tensor) -> Tensor | None:
        """``x`` as ``(B, N, C)`` tokens, setting the grid of a 4-D input."""
        if x.dim() == 3:
            return x
        if x.dim() != 4:
            return None
        if self.channels_first:
            self.grid.grids.value.grid = (int(x.shape[2]), int(x.shape[3]))
            return x.flatten(2).transpose(1, 2)
        self.grid.grids.value.grid = (int(x.shape[1]), int(x.shape[2]))
        return x.flatten(1, 2)

    def _why_not(self, x: Any) -> str | None:
        if not isinstance(x, Tensor) or x.dim() not in (3, 4):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            return f"MLP input of shape {shape}, neither tokens (B, N, C) nor a 4-D feature map"
        if x.shape[0] == 0:
            return EMPTY_BATCH
        for norm in self.norms:
            if norm.training or norm.running_mean is None:
                return (
                    "the MLP's BatchNorm normalises with batch statistics (training mode, or "
                    "no running statistics), which mixes tokens; call model.eval() to merge"
                )
        return None

    def before(self, mlp: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        slot = self.slots.value
        slot.clear()  # a forward that raised left its plan here
        x = args[0] if args else None
        reason = self._why_not(x)
        tokens = self._tokens(x) if reason is None else None
        plan = self.patch.plan_afresh(tokens) if tokens is not None else None
        if plan is None:
            self.patch.count_pass_through(
                reason or f"no token grid known for {tokens.shape[1]} tokens at this call"
            )
            return None
        if plan.is_identity:
            return None  # ratio 0, or fewer tokens than min_tokens: the MLP sees its own input
        merged = self.patch.observed("merge", plan.merge, tokens)
        slot.append((plan, x.shape))
        if x.dim() == 3:
            return (merged, *args[1:]), kwargs
        if self.channels_first:
            merged = merged.transpose(1, 2).unsqueeze(-1)  # (B, C, M, 1)
        else:
            merged = merged.unsqueeze(2)  # (B, M, 1, C)
        return (merged, *args[1:]), kwargs

    def after(self, mlp: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
        slot = self.slots.value
        if not slot:  # passed through, or the pre-hook raised
            return None
        plan, shape = slot.pop()  # never kept past the call
        if not isinstance(output, Tensor):
            raise TypeError(
                f"site {self.patch.site.name!r}: cannot unmerge the output of "
                f"{type(mlp).__name__} ({type(output).__name__}); expected a tensor"
            )
        if len(shape) == 3:
            tokens = output
        elif self.channels_first:
            tokens = output.flatten(2).transpose(1, 2)
        else:
            tokens = output.flatten(1, 2)
        self.patch.check_merged_output(plan, tokens, mlp)
        unmerged = self.patch.observed("unmerge", plan.unmerge, tokens)
        if len(shape) == 3:
            return unmerged
        height, width = (shape[2], shape[3]) if self.channels_first else (shape[1], shape[2])
        if self.channels_first:
            # contiguous NCHW, as the MLP's own output was: later convolutions keep their layout
            return unmerged.transpose(1, 2).unflatten(2, (height, width)).contiguous()
        return unmerged.unflatten(1, (height, width))


def _explicit(sites: Sites, field: str) -> bool:
    """Whether ``field`` of ``sites`` was given by the user. A config dumped and loaded back
    has every field set, so there a field's default value cannot be told from a choice."""
    given = sites.model_fields_set
    return field in given and given != set(type(sites).model_fields)


class TimmHierarchicalAdapter(Adapter):
    """timm's hierarchical / windowed models (Swin v1 / v2 / v2-cr, MaxViT, LeViT, SAM,
    EfficientViT-MSRA): local merging around every token-wise MLP, the only target. See the
    module docstring for what merges in each class and why only the MLP.

    Example:
        >>> import timm, tokenmerge
        >>> model = timm.create_model(
        ...     "levit_128s", pretrained=False, embed_dim=(32, 48), depth=(1, 1),
        ...     num_heads=(2, 3), key_dim=8, img_size=64,
        ... ).eval()
        >>> handle = tokenmerge.apply(model, "tome", ratio=0.25)
        >>> [(s.name, s.level) for s in handle.sites]
        [('stages.0.blocks.0', 1), ('stages.1.downsample', 2), ('stages.1.blocks.0', 2)]
        >>> handle.remove()
    """

    name = "timm_hierarchical"
    #: every stage merges: the last ones have few tokens (Swin-T's 7 x 7, LeViT's 4 x 4 at
    #: 224 px) but the widest MLPs
    default_min_tokens: ClassVar[int] = 1
    supported_names: ClassVar[tuple[str, ...]] = (
        "timm SwinTransformer, SwinTransformerV2, SwinTransformerV2Cr",
        "MaxxVit (MaxViT, MaxxViT, CoAtNet)",
        "Levit (and LevitDistilled)",
        "VisionTransformerSAM",
        "EfficientVitMsra",
    )

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._found: dict[str, _Found] = {}
        self._grids: dict[str, _Grid] = {}

    @classmethod
    def supports(cls, model: Any) -> bool:
        return isinstance(model, _model_classes())

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        for klass in type(model).__mro__:
            if klass.__module__.startswith("timm.") and klass.__name__ in _REFUSED:
                return _REFUSED[klass.__name__]
        return None

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        owners = _owners()
        found: dict[str, _Found] = {}
        for name, module in root.named_modules():
            owner = owners.get(type(module))
            mlp = getattr(module, owner.mlp, None) if owner is not None else None
            if mlp is None or (owner.mlp_class is not None and type(mlp) is not owner.mlp_class):
                continue
            problem = _not_token_wise(mlp)
            if problem is not None:
                raise UnsupportedModelError(
                    f"{type(root).__name__}: {name}.{owner.mlp} ({type(mlp).__name__}) in "
                    f"{type(module).__name__} cannot merge: {problem}. The timm_hierarchical "
                    "adapter merges around token-wise MLPs only (linear or 1 x 1 convolution "
                    "layers, activations, norms); for another model, pass adapter='generic' "
                    "with sites={'include': [module-name globs of token-wise modules]}"
                )
            norms = tuple(m for m in mlp.modules() if isinstance(m, _BatchNorm))
            found[name] = _Found(module, mlp, owner.grid_of, _channels_first(mlp), norms)
        self._found = found
        candidates = []
        for index, (name, item) in enumerate(found.items()):
            stage = _STAGE.match(name)
            level = 2 ** int(stage.group(1)) if stage is not None else 1
            site = Site(name, stage=depth_stage(index, len(found)), level=level, block_index=index)
            # the MLP under both kinds: the config's default target (sites.attn, which cannot
            # mean attention here: check_config refuses it when asked for) and sites.mlp
            candidates.append(SiteCandidate(site, {"attn": item.mlp, "mlp": item.mlp}))
        return candidates

    def check_config(self, config: MergeConfig) -> None:
        sites = config.sites
        asked = [
            f"sites.{kind}=True"
            for kind in ("attn", "cross_attn")
            if getattr(sites, kind) and (kind == "cross_attn" or _explicit(sites, kind))
        ]
        if asked:
            raise ConfigError(
                f"{' and '.join(asked)}: the timm_hierarchical adapter merges around each "
                "block's MLP only. Attention in these models is windowed or pooled, with "
                "relative position biases inside each window (Swin, MaxViT, SAM) or built for a "
                "fixed resolution (LeViT, EfficientViT-MSRA), which merged tokens cannot "
                "follow; the token-wise MLP is exact to merge around and holds most of the "
                "FLOPs. Leave sites.attn and sites.cross_attn out: the MLP is this adapter's "
                "default target (or name it: sites={'mlp': True})"
            )

    def layout_for(self, site: Site) -> Callable[[Site, Tensor], TokenLayout | None]:
        return self._grids.setdefault(site.name, _Grid())

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        return self.layout_for(site)(site, hidden_states)

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        found = self._found[patch.site.name]
        # whichever kind selected it, the site merges around its MLP alone
        patch.site = replace(patch.site, targets=("mlp",))
        grid = self.layout_for(patch.site)
        hooks = _MlpMerge(patch, grid, found)
        handles = []
        if found.grid_of is not None:
            hook = _GridHook(grid, found.grid_of)
            handles.append(found.owner.register_forward_pre_hook(hook, with_kwargs=True))
        handles.append(found.mlp.register_forward_pre_hook(hooks.before, with_kwargs=True))
        handles.append(found.mlp.register_forward_hook(hooks.after, with_kwargs=True))
        return handles
