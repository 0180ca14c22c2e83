"""What the vision-transformer adapters (timm, Hugging Face transformers) share.

A ViT is a stack of blocks over one patch grid with protected prefix tokens (class,
distillation, registers) in front. Every block is a site. In progressive mode (the default) a
site is the whole block: its attention keys, averaged over heads, are the metric and the tokens
merged stay merged (``tokenmerge.progressive``); in local mode the block's attention and / or MLP
merge and unmerge around themselves, so features keep their token grid. The grid is read from
the output of the patch projection (a ``Conv2d``) at every call, so any input size works.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import Adapter, AdapterOptions, SiteCandidate, depth_stage
from tokenmerge.adapters._tables import gather_pairs, gather_rows
from tokenmerge.adapters._views import value_correction
from tokenmerge.calls import CallValues, PerThread
from tokenmerge.config import MergeConfig
from tokenmerge.deprecated import user_stacklevel
from tokenmerge.errors import ConfigError, RatioWarning
from tokenmerge.patch import Adjust, SitePatch
from tokenmerge.plan import Plan
from tokenmerge.progressive import ArgSpec, BlockAdjust, TokenCarry, TokenTrack, attach_progressive
from tokenmerge.proportional import SizeBias
from tokenmerge.selectors import per_site_values
from tokenmerge.site import Site, TokenLayout

__all__ = ["HeadMean", "ViTAdapter", "ViTBlock", "ViTOptions", "gather_rows"]


class ViTOptions(AdapterOptions):
    """Options of the ViT adapters (``timm_vit``, ``transformers_vit``).

    Example:
        >>> import tokenmerge, timm
        >>> vit = timm.create_model(
        ...     "vit_tiny_patch16_224", pretrained=False, img_size=64
        ... )
        >>> options = {"merge_at": "block"}
        >>> with tokenmerge.apply(vit, "tome", r=2, adapter_options=options) as h:
        ...     h.adapter.options.merge_at, h.adapter.mode
        ('block', 'progressive')
    """

    mode: Literal["auto", "progressive", "local"] = Field(
        default="auto",
        description=(
            "'progressive': tokens stay merged to the last block (ToMe); 'local': merge and "
            "unmerge around each sub-module. Default 'auto': progressive."
        ),
    )
    proportional_attention: bool = Field(
        default=True,
        description=(
            "Progressive mode only: add log(size) of every key to the attention logits, so a "
            "merged token weighs as much as the tokens it stands for (ToMe). Default on."
        ),
    )
    merge_at: Literal["mlp", "block"] = Field(
        default="mlp",
        description=(
            "Progressive mode only: 'mlp' merges at the MLP's input (its MLP runs on the merged "
            "tokens, ToMe's saving); 'block' at the block's output. Default 'mlp'."
        ),
    )


class HeadMean:
    """Keys ``(B, N, H * d)`` from a projection -> ``(B, N, d)`` averaged over the ``H`` heads."""

    def __init__(self, heads: int) -> None:
        self.heads = heads

    def __call__(self, output: Tensor) -> Tensor:
        batch, tokens, channels = output.shape
        return output.view(batch, tokens, self.heads, channels // self.heads).mean(2)


def keys_by_head(output: Tensor) -> Tensor:
    """Keys ``(B, H, N, d)`` (a per-head key norm's output) -> ``(B, N, d)``."""
    return output.mean(1)


@dataclass
class ViTBlock:
    """The parts of one block an adapter found.

    Attributes:
        name: dotted module name.
        block: the block module.
        attn: the attention module (local mode merges around it).
        mlp: the MLP module.
        keys_module: a module whose output holds the attention keys.
        keys: its output -> ``(B, N, d)`` keys averaged over heads.
        mask: where the block takes an additive attention mask (None: it takes none).
        sequential: the MLP runs after the attention, on the residual stream (so progressive
            mode can merge at the MLP's input).
        pair_biases: modules called inside the block whose output is a per-pair bias over the
            original tokens, ``(1, H, N0, N0)`` (BEiT's relative position bias); progressive
            mode cuts it to the tokens present.
    """

    name: str
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    keys_module: nn.Module
    keys: Any
    mask: ArgSpec | None
    sequential: bool = True
    pair_biases: tuple[nn.Module, ...] = ()


#: progressive mode's ratio when the config gives neither ratio nor r: the highest that kept both
#: reference classifiers' top-1 within a point with tome and retom (docs/vision.md); a fixed 0.5
#: halved the tokens at every block
PROGRESSIVE_RATIO = 0.15
#: above this a ratio warns: both reference classifiers lost a point or more of top-1 at 0.3
PROGRESSIVE_RATIO_WARN = 0.25


def _warn_high_ratio(patches: list[SitePatch]) -> None:
    """Warn once per ``apply`` when a ratio (not ``r``) is above what the reference classifiers
    took without a clear loss: the merges compound over the blocks."""
    risky = [p for p in patches if p.config.r is None and p.ratio > PROGRESSIVE_RATIO_WARN]
    if not risky:
        return
    left = math.prod(1 - p.ratio for p in patches if p.config.r is None)
    warnings.warn(
        f"ratio {risky[0].ratio} at {risky[0].site.name!r} ({len(risky)} of {len(patches)} "
        f"blocks above {PROGRESSIVE_RATIO_WARN}): in progressive mode (the default for vision "
        f"transformers) the merges compound, leaving about {left:.0%} of the image tokens after "
        f"the last block. Above {PROGRESSIVE_RATIO_WARN} the reference classifiers lost 1 to 48 "
        "points of top-1 accuracy (docs/vision.md). Leave the ratio out for the default "
        f"{PROGRESSIVE_RATIO}, or give r=... tokens per block",
        RatioWarning,
        stacklevel=user_stacklevel(),
    )


class ViTAdapter(Adapter):
    """Base of the ViT adapters; their options are ``ViTOptions`` (mode, proportional attention,
    where progressive mode merges)."""

    options_class: ClassVar[type[AdapterOptions]] = ViTOptions
    options: ViTOptions
    default_min_tokens: ClassVar[int] = 1
    #: what ``supports`` accepts, for error messages
    supported_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: ViTOptions | None = None) -> None:
        super().__init__(options)
        self._blocks: dict[str, ViTBlock] = {}
        # the patch grid of the calling thread's call (tokenmerge.calls), and the grid
        # positions of the image tokens where they are not the whole grid in order
        self._grids = PerThread(partial(CallValues, grid=None, positions=None))
        self._num_prefix = 0
        self.carry: TokenCarry | None = None  # progressive mode's token record and hooks
        # local mode: the kept tokens of the attention call in flight, for the per-pair biases
        # computed inside it (LocalPairBiasCut)
        self._kept = PerThread(partial(CallValues, index=None, full=0))

    # ------------------------------------------------------------------ per library
    @abstractmethod
    def find_blocks(self, root: nn.Module) -> list[ViTBlock]:
        """The model's blocks, in order."""

    @abstractmethod
    def num_prefix(self, root: nn.Module) -> int:
        """Protected tokens in front of the image tokens."""

    @abstractmethod
    def patch_projection(self, root: nn.Module) -> nn.Module:
        """The module whose output ``(B, C, h, w)`` gives the patch grid."""

    def block_adjust(self) -> BlockAdjust | None:
        """Progressive mode: rewrites a block call's keyword arguments for the merged tokens."""
        return None

    def local_adjust(self) -> Adjust | None:
        """Local mode: rewrites an attention call's keyword arguments for the merged tokens."""
        return None

    def local_size_bias(self) -> SizeBias | None:
        """How a local-mode attention call takes proportional attention (None: it cannot)."""
        return None

    def rotary(self) -> bool:
        """Whether the blocks take rotary position tables (``Site.rotary``); read once the
        blocks are found."""
        return False

    def pair_arguments(self) -> tuple[str, ...]:
        """Keyword arguments of a block (progressive mode) or attention (local mode) call that
        may hold a per-pair bias over the original tokens (a relative position bias added to
        an attention mask); one of shape ``(H, N0, N0)`` or ``(B or 1, H or 1, N0, N0)`` is cut
        to the tokens of the call."""
        return ()

    # ------------------------------------------------------------------ Adapter
    @property
    def mode(self) -> str:
        return "progressive" if self.options.mode == "auto" else self.options.mode

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        blocks = self.find_blocks(root)
        self._num_prefix = self.num_prefix(root)
        self._blocks = {b.name: b for b in blocks}
        rotary = self.rotary()
        return [
            SiteCandidate(
                Site(b.name, stage=depth_stage(i, len(blocks)), block_index=i, rotary=rotary),
                {"attn": b.attn, "mlp": b.mlp},
            )
            for i, b in enumerate(blocks)
        ]

    @property
    def default_ratio(self) -> float | None:
        return PROGRESSIVE_RATIO if self.mode == "progressive" else None

    def check_config(self, config: MergeConfig) -> None:
        if self.mode == "local":
            return
        too_high = [v for v in per_site_values(config.ratio) if v > 0.5]
        if config.r is None and too_high:
            raise ConfigError(
                f"ratio {too_high[0]} merges more than half of a block's tokens; in progressive "
                "mode (the default for vision transformers) a block merges at most 50 % of the "
                "tokens reaching it, and the merges add up over the blocks. Use a ratio <= 0.5 "
                "(or r=...), or adapter_options={'mode': 'local'}"
            )
        if config.sites.targets() != ("attn",):
            raise ConfigError(
                "sites.attn / sites.mlp / sites.cross_attn choose sub-modules in local mode; in "
                "progressive mode (the default for vision transformers) a site is a whole block "
                "and its tokens stay merged. Leave them at their defaults, or pass "
                "adapter_options={'mode': 'local'}"
            )

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        if site.mode == "progressive":
            return self.carry.track.layout() if self.carry is not None else None
        call = self._grids.value
        if call.grid is None:
            return None
        if hidden_states.shape[1] != TokenTrack.full_count(
            self._num_prefix, call.grid, call.positions
        ):
            return None
        return TokenLayout(call.grid, self._num_prefix, positions=call.positions)

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        block = self._blocks[patch.site.name]
        if patch.site.mode == "progressive":
            handles = []
            if self.carry is None:
                handles.append(self._start_tracking())
            at_mlp = self.options.merge_at == "mlp" and block.sequential
            for bias in block.pair_biases:
                handles += PairBiasCut(self.carry.tracks).attach(bias)
            return handles + attach_progressive(
                patch, self.carry.tracks, block.block, block.keys_module, block.keys,
                block.mlp if at_mlp else None,
            )  # fmt: skip
        # local mode: plan afresh on the block input at every call (a ViT has no steps to
        # cache over), once for both the attention and the MLP
        handles = patch.watch_block_input(block.block, fresh=True)
        for kind, module in modules.items():
            if kind != "attn":
                handles += patch.attach_local(module)
                continue
            bias = self.local_size_bias() if patch.config.local_proportional_attention else None
            correction = value_correction(patch, kind, module)
            inside = set(module.modules())
            for pair_bias in (m for m in block.pair_biases if m in inside):
                handles += LocalPairBiasCut(self._kept).attach(pair_bias)
            handles += patch.attach_local(
                module, adjust=self._local_adjust(), correction=correction, bias=bias
            )
        return handles

    def _start_tracking(self) -> RemovableHandle:
        """Create the token record of progressive mode; returns its restoring hook, which must
        be registered before the sites' hooks."""
        blocks = list(self._blocks.values())
        masks = {b.mask for b in blocks}
        mask = blocks[0].mask if len(masks) == 1 else None  # one call convention for all
        proportional = self.options.proportional_attention
        if mask is None and proportional:
            raise ConfigError(
                f"{type(blocks[0].block).__name__} takes no attention mask, so proportional "
                "attention cannot be passed; set adapter_options={'proportional_attention': False}"
            )
        track = TokenTrack(self._num_prefix)
        self.carry = TokenCarry(
            track, self._current_grid, mask, proportional, self._block_adjust(),
            positions=self._current_positions,
        )  # fmt: skip
        return self.carry.attach_restore(blocks[-1].block)

    def _block_adjust(self) -> BlockAdjust | None:
        """The adapter's block adjustment, after the per-pair biases are cut."""
        own, names = self.block_adjust(), self.pair_arguments()
        return _PresentPairs(names, own) if names else own

    def _local_adjust(self) -> Adjust | None:
        """The adapter's local adjustment, after the per-pair biases are cut."""
        own, names = self.local_adjust(), self.pair_arguments()
        return _KeptPairs(names, own, self._kept) if names else own

    def attach_model(self, root: nn.Module, patches: list[SitePatch]) -> list[RemovableHandle]:
        if self.mode == "progressive":
            _warn_high_ratio(patches)
        handles = [self.patch_projection(root).register_forward_hook(self._read_grid)]
        if self.carry is not None:
            handles += self.carry.attach_carry([b.block for b in self._blocks.values()])
        return handles

    def _read_grid(self, module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor) and output.dim() == 4:
            self._grids.value.grid = (output.shape[-2], output.shape[-1])

    def _current_grid(self) -> tuple[int, int] | None:
        return self._grids.value.grid

    def _current_positions(self) -> Tensor | None:
        return self._grids.value.positions


def cut_pair_arguments(kwargs: dict, names: tuple[str, ...], full: int, index: Tensor) -> dict:
    """``kwargs`` with every per-pair bias over ``full`` tokens among ``names`` cut to the rows
    and columns of the tokens ``index (P, n)`` names."""
    cut = {}
    for name in names:
        value = kwargs.get(name)
        pairs = isinstance(value, Tensor) and value.dim() in (3, 4)
        if pairs and value.shape[-2:] == (full, full):
            cut[name] = gather_pairs(value, index)
    return {**kwargs, **cut} if cut else kwargs


class _PresentPairs:
    """Progressive mode's block adjustment: the per-pair biases among ``names`` cut to the
    tokens present, then the adapter's own adjustment (classes, not closures, so
    ``copy.deepcopy`` copies what they hold with the model)."""

    def __init__(self, names: tuple[str, ...], own: BlockAdjust | None) -> None:
        self.names, self.own = names, own

    def __call__(self, track: TokenTrack, kwargs: dict) -> dict:
        kwargs = cut_pair_arguments(kwargs, self.names, track.num_full, track.token_index())
        return self.own(track, kwargs) if self.own is not None else kwargs


class _KeptPairs:
    """Local mode's attention adjustment: the per-pair biases among ``names`` cut to the kept
    tokens, which it also leaves in ``kept`` for the biases made inside the attention
    (``LocalPairBiasCut``), then the adapter's own adjustment."""

    def __init__(self, names: tuple[str, ...], own: Adjust | None, kept: PerThread) -> None:
        self.names, self.own, self.kept = names, own, kept

    def __call__(self, plan: Plan, kwargs: dict) -> dict:
        kept = self.kept.value
        kept.index, kept.full = plan.kept, plan.num_tokens
        kwargs = cut_pair_arguments(kwargs, self.names, plan.num_tokens, plan.kept)
        return self.own(plan, kwargs) if self.own is not None else kwargs


class PairBiasCut:
    """Hooks of a module computing a per-pair bias over a block's original tokens inside the
    block (BEiT's relative position bias) in progressive mode: once tokens merged, its output is
    cut to the tokens present, and a ``dim_size`` argument naming the merged token count (the
    size transformers interpolates the bias to) is set back to the original count (a class, so
    ``copy.deepcopy`` copies it with the model)."""

    def __init__(self, tracks: PerThread) -> None:
        self.tracks = tracks
        self.cuts = PerThread(partial(CallValues, index=None, full=0))  # this call's cut

    def attach(self, module: nn.Module) -> list[RemovableHandle]:
        return [
            module.register_forward_pre_hook(self.before, with_kwargs=True),
            module.register_forward_hook(self.after),
        ]

    def take(self, tokens: int | None) -> tuple[Tensor, int] | None:
        """``(index (B, n), N0)`` of the tokens this call runs on, or None when they are the
        original ones; ``tokens``: the call's ``dim_size`` argument, if any."""
        track = self.tracks.value
        if not track.merged:
            return None
        # one row per sample, materialised: transformers adds the mask to the cut in place
        return track.token_index().expand(track.sizes.shape[0], -1), track.num_full

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cut = self.cuts.value
        taken = self.take(kwargs.get("dim_size"))
        cut.index, cut.full = taken if taken is not None else (None, 0)
        if taken is not None and kwargs.get("dim_size") == taken[0].shape[1]:
            return args, {**kwargs, "dim_size": taken[1]}
        return None

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        cut = self.cuts.value
        index, full = cut.index, cut.full
        cut.index = None
        if index is None or not isinstance(output, Tensor) or output.dim() != 4:
            return None
        if output.shape[-2:] != (full, full):
            return None
        return gather_pairs(output, index)


class LocalPairBiasCut(PairBiasCut):
    """``PairBiasCut`` inside an attention merged in local mode: the cut is the kept tokens of
    the call's plan, which the attention's adjustment leaves in ``kept``; a call whose
    ``dim_size`` is not their count is not the merged call."""

    def __init__(self, kept: PerThread) -> None:
        super().__init__(kept)

    def take(self, tokens: int | None) -> tuple[Tensor, int] | None:
        call = self.tracks.value
        index, full = call.index, call.full
        call.index = None  # used once: the next call of the module is another attention call
        if index is None or tokens != index.shape[1]:
            return None
        return index, full
