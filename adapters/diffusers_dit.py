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
  ``"middle"`` or ``"last"`` third of the depth (for ``sites.stages`` and per-stage settings such
  as ``ratio={"middle": 0.6, "*": 0.4}`` or ReToM's ``window_size``); every block is a site by
  default.
- Metric: plans are made from the block's input, so one plan serves all of a block's targets.
- Timestep: the root's ``timestep`` argument, which drives the plan cache across steps.

Calls the plan cannot handle pass through untouched and are counted in ``stats()`` (see the
UNet adapter: attention masks over the merged tokens, chunked MLPs, diffusers cache hooks on a
target).
"""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import AdapterOptions, SiteCandidate
from tokenmerge.adapters._diffusers import (
    PatchGrid,
    TransformerAdapter,
    check_signatures,
    depth_stage,
    target_hooks,
)
from tokenmerge.patch import SitePatch
from tokenmerge.site import Site

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


class DiffusersDiTAdapter(TransformerAdapter):
    """Merging in diffusers ``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` and
    ``SD3Transformer2DModel``, and the pipelines that hold one (``pipe.transformer`` is patched).

    Example:
        >>> import torch, tokenmerge
        >>> from diffusers import DiTTransformer2DModel
        >>> dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8,
        ...                             in_channels=4, out_channels=4, num_layers=3,
        ...                             sample_size=16, num_embeds_ada_norm=10)
        >>> handle = tokenmerge.apply(dit, "retom", ratio=0.5,
        ...                           sites={"mlp": True, "min_tokens": 1})
        >>> for site in handle.sites:
        ...     print(site.name, site.stage)
        transformer_blocks.0 first
        transformer_blocks.1 middle
        transformer_blocks.2 last
        >>> out = dit(torch.randn(2, 4, 16, 16), timestep=torch.tensor([999, 999]),
        ...           class_labels=torch.tensor([1, 2])).sample
        >>> handle.stats()["transformer_blocks.0"].tokens_out
        32
        >>> handle.remove()
    """

    name = "diffusers_dit"
    merges_keys_values = True

    def __init__(self, options: AdapterOptions | None = None) -> None:
        _check_signatures()
        super().__init__(options)

    @staticmethod
    def model_classes() -> tuple[type, ...]:
        return _models()

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        basic, joint = _blocks()
        self.watch_root(root, PatchGrid(root.config.patch_size))
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

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        block, handles = self.attach_block(patch)
        targets = list(modules.items())
        if "attn" in modules and getattr(block, "use_dual_attention", False):
            targets.append(("attn", block.attn2))  # SD 3.5's image-only second self-attention
        for kind, module in targets:
            handles += patch.attach_local(module, **target_hooks(patch, kind, module, block))
        return handles
