"""The diffusers DiT-family adapter: DiT, PixArt (alpha / sigma) and SD3 / SD 3.5 (MMDiT).

Sites are the blocks of ``transformer_blocks``: ``BasicTransformerBlock`` in DiT and PixArt,
``JointTransformerBlock`` in SD3. Each site merges around its self-attention and, when the config
asks, its MLP (``ff``) and, in PixArt, its cross-attention (``attn2``, queries only), with native
torch hooks on those modules: no class is swapped and no attention processor replaced.

- SD3's joint attention takes the image tokens as ``hidden_states`` and the text tokens as
  ``encoder_hidden_states``: only the image stream is merged; the text tokens attend to the
  merged image tokens and come back whole. SD 3.5's dual-attention blocks have a second,
  image-only attention (``attn2``): it merges with the first (both are self-attention).
- Grid: the root model's input ``(B, C, H, W)`` over its ``patch_size``, read by a pre-hook.
- Stages: these models have no down / up path, so each block is in the ``"first"``,
  ``"middle"`` or ``"last"`` third of the depth (for ``stages=`` and per-stage settings such
  as ``ratio={"middle": 0.6, "*": 0.4}`` or ReToM's ``window_size``); every block is a site by
  default.
- Metric: plans are made from the block's input, so one plan serves all of a block's targets.
- Timestep: the root's ``timestep`` argument, which drives the plan cache across steps.

Calls the plan cannot handle pass through untouched and are counted in ``stats()`` (see the
UNet adapter: attention masks over the merged tokens, chunked MLPs, diffusers cache hooks on a
target).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import Adapter, SiteCandidate
from tokenmerge.adapters._diffusers import (
    TargetGuard,
    check_signatures,
    depth_stage,
    parameter_index,
)
from tokenmerge.patch import SitePatch
from tokenmerge.site import Site, TokenLayout

__all__ = ["DiffusersDiTAdapter"]


def _models() -> tuple[type, ...]:
    from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
    from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    return DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel


def _blocks() -> tuple[type, type]:
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock

    return BasicTransformerBlock, JointTransformerBlock


def _check_signatures() -> None:
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    dit, pixart, sd3 = _models()
    basic, joint = _blocks()
    check_signatures(
        {
            dit: ("hidden_states", "timestep"),
            pixart: ("hidden_states", "encoder_hidden_states", "timestep"),
            sd3: ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
            basic: ("hidden_states",),
            joint: ("hidden_states", "encoder_hidden_states", "temb"),
            Attention: ("hidden_states", "encoder_hidden_states", "attention_mask"),
            FeedForward: ("hidden_states",),
        },
        "DiT",
    )


class PatchGrid:
    """Pre-hook of the root model: the token grid of this call is its input ``(B, C, H, W)``
    over the patch size. It also serves as every site's layout (one object per model)."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size
        self.grid: tuple[int, int] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        p = self.patch_size
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[-2] % p == 0 and x.shape[-1] % p == 0:
            self.grid = (x.shape[-2] // p, x.shape[-1] // p)
        else:
            self.grid = None

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        grid = self.grid
        if grid is None or grid[0] * grid[1] != hidden_states.shape[1]:
            return None
        return TokenLayout(grid)


class DiffusersDiTAdapter(Adapter):
    """Merging in diffusers ``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` and
    ``SD3Transformer2DModel``, and the pipelines that hold one (``pipe.transformer`` is patched).

    Example:
        >>> import torch, tokenmerge
        >>> from diffusers import DiTTransformer2DModel
        >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8,
        ...                             in_channels=4, out_channels=4, num_layers=3,
        ...                             sample_size=16, num_embeds_ada_norm=10)
        >>> handle = tokenmerge.apply(dit, "retom", ratio=0.5, merge_mlp=True, min_tokens=1)
        >>> [(site.name, site.stage) for site in handle.sites]
        [('transformer_blocks.0', 'first'), ('transformer_blocks.1', 'middle'), \
('transformer_blocks.2', 'last')]
        >>> out = dit(torch.randn(2, 4, 16, 16), timestep=torch.tensor([999, 999]),
        ...           class_labels=torch.tensor([1, 2])).sample
        >>> handle.stats()["transformer_blocks.0"].tokens_out
        32
        >>> handle.remove()
    """

    name = "diffusers_dit"

    def __init__(self) -> None:
        _check_signatures()
        self._root: nn.Module | None = None
        self._grid: PatchGrid | None = None
        self._grid_attached = False
        self._blocks: dict[str, nn.Module] = {}  # site name -> its block
        self._timestep_index: int | None = None

    @classmethod
    def supports(cls, model: Any) -> bool:
        models = _models()
        return isinstance(model, models) or isinstance(getattr(model, "transformer", None), models)

    def root(self, model: Any) -> nn.Module:
        return model if isinstance(model, _models()) else model.transformer

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        basic, joint = _blocks()
        self._root = root
        self._grid = PatchGrid(root.config.patch_size)
        self._timestep_index = parameter_index(type(root), "timestep")
        blocks = root.transformer_blocks
        found = []
        for index, block in enumerate(blocks):
            if isinstance(block, basic):
                modules = {"attn": block.attn1}
                if block.attn2 is not None:
                    modules["cross_attn"] = block.attn2
            elif isinstance(block, joint):
                modules = {"attn": block.attn}
            else:
                continue
            if getattr(block, "ff", None) is not None:
                modules["mlp"] = block.ff
            name = f"transformer_blocks.{index}"
            site = Site(name, stage=depth_stage(index, len(blocks)), block_index=index)
            self._blocks[name] = block
            found.append(SiteCandidate(site, modules))
        return found

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        return self._grid.layout(site, hidden_states) if self._grid is not None else None

    def layout_for(self, site: Site) -> Callable[[Site, Tensor], TokenLayout | None]:
        return self._grid.layout

    def timestep(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        index = self._timestep_index
        return args[index] if index is not None and len(args) > index else None

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        handles = []
        block = self._blocks[patch.site.name]
        if not self._grid_attached:
            self._grid_attached = True
            handles.append(self._root.register_forward_pre_hook(self._grid, with_kwargs=True))
        handles += patch.watch_block_input(block)
        targets = list(modules.items())
        if "attn" in modules and getattr(block, "use_dual_attention", False):
            targets.append(("attn", block.attn2))  # SD 3.5's image-only second self-attention
        for kind, module in targets:
            handles += patch.attach_local(module, guard=TargetGuard(module, kind, block))
        return handles

    def detach(self, root: nn.Module) -> None:
        self._grid_attached = False
        if self._grid is not None:
            self._grid.grid = None
