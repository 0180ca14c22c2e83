"""The diffusers UNet adapter: SD 1.x, SD 2.x, SDXL and any ``UNet2DConditionModel`` pipeline, and
Stable Video Diffusion's ``UNetSpatioTemporalConditionModel``.

Sites are the ``BasicTransformerBlock``s of the spatial ``Transformer2DModel``s in
``down_blocks``, ``mid_block`` and ``up_blocks``, and the spatial blocks of SVD's
``TransformerSpatioTemporalModel``s; temporal blocks (attention across frames) are never sites.
SVD runs its spatial blocks on the frames as a batch, ``(batch * frames, tokens, channels)``, so
each frame plans on its own and no token merges into another frame. Each site merges around
its self-attention (``attn1``) and, when the config asks, its cross-attention (``attn2``,
queries only) and MLP (``ff``), with native torch hooks on those modules: no class is swapped
and no attention processor replaced, so LoRA, IP-Adapter, fused QKV, offloading hooks and
attention back-ends keep working.

- Grid: read from each ``Transformer2DModel``'s input ``(B, C, H, W)`` by a pre-hook.
- Stage and level: ``down`` / ``mid`` / ``up``, and the downsample factor of the site's grid
  relative to the latent (1, 2, 4...), counted from the UNet's down- and upsamplers. The default
  sites are those of the finest level that has attention: level 1 in SD 1.x / 2.x, level 2 in SDXL
  (whose full-resolution blocks have no attention, where tomesd's default merges nothing).
- Metric: every plan is made from the block's input before ``norm1``, as tomesd does, so one plan
  serves all of a block's targets and ``tome`` configured like tomesd reproduces its outputs.
- Timestep: a native pre-hook on the UNet reads ``timestep`` (its second argument), which drives
  the step state and so the plan cache across denoising steps.

Calls the plan cannot handle pass through untouched and are counted in ``stats()``: a
self-attention call with an attention mask (its keys are the merged tokens), a cross-attention mask
with a row per query, non-3-D hidden states, an MLP run in token chunks, and any target module
that carries a diffusers hook (pyramid attention broadcast and the other caches replay outputs
made at earlier steps, with earlier plans).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import Adapter, AdapterOptions, SiteCandidate
from tokenmerge.adapters._diffusers import (
    PatchGrid,
    check_signatures,
    target_hooks,
)
from tokenmerge.config import MergeConfig
from tokenmerge.patch import SitePatch
from tokenmerge.site import Site, TokenLayout

__all__ = ["DiffusersUNetAdapter"]

_STAGES = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


def _diffusers():
    import diffusers
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.models.unets.unet_spatio_temporal_condition import (
        UNetSpatioTemporalConditionModel,
    )

    return (
        diffusers,
        BasicTransformerBlock,
        Attention,
        (Transformer2DModel, TransformerSpatioTemporalModel),
        (UNet2DConditionModel, UNetSpatioTemporalConditionModel),
    )


def _check_signatures() -> None:
    _, block, attention, transformers, unets = _diffusers()
    expected = {
        **{unet: ("sample", "timestep", "encoder_hidden_states") for unet in unets},
        **{transformer: ("hidden_states",) for transformer in transformers},
        block: ("hidden_states",),
        attention: ("hidden_states", "encoder_hidden_states", "attention_mask"),
    }
    check_signatures(expected, "UNet")


class _GridReader(PatchGrid):
    """Pre-hook of a ``Transformer2DModel`` (its latents are its tokens: patch size 1), serving
    as the layout of its sites."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(patch_size=1)
        self.transformer = transformer
        self.attached = False  # its pre-hook is installed (once, by the transformer's first site)


class DiffusersUNetAdapter(Adapter):
    """Merging in diffusers ``UNet2DConditionModel``s and ``UNetSpatioTemporalConditionModel``s
    and the pipelines that hold one.

    Example:
        >>> import torch, tokenmerge
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel(
        ...     block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ...     attention_head_dim=8, norm_num_groups=8, sample_size=16)
        >>> handle = tokenmerge.apply(unet, "retom", ratio=0.5, sites={"min_tokens": 1})
        >>> [(site.name, site.stage, site.level) for site in handle.sites][:2]
        [('down_blocks.0.attentions.0.transformer_blocks.0', 'down', 1),
         ('up_blocks.1.attentions.0.transformer_blocks.0', 'up', 1)]
        >>> out = unet(torch.randn(2, 4, 16, 16), 999, torch.randn(2, 7, 32)).sample
        >>> handle.stats()["down_blocks.0.attentions.0.transformer_blocks.0"].tokens_out
        128
        >>> handle.remove()
    """

    name = "diffusers_unet"
    merges_keys_values = True

    def __init__(self, options: AdapterOptions | None = None) -> None:
        _check_signatures()
        super().__init__(options)
        self._readers: dict[str, _GridReader] = {}  # site name -> its transformer's grid reader
        self._blocks: dict[str, nn.Module] = {}  # site name -> its BasicTransformerBlock

    @classmethod
    def supports(cls, model: Any) -> bool:
        unet = _diffusers()[4]
        return isinstance(model, unet) or isinstance(getattr(model, "unet", None), unet)

    @classmethod
    def refusal(cls, model: Any) -> str | None:
        model = getattr(model, "unet", model)
        name = type(model).__name__
        if name == "UNet2DModel":
            return (
                "its attention (diffusers' AttnDownBlock2D / AttnUpBlock2D) takes (batch, "
                "channels, height, width) feature maps and adds its residual inside the "
                "attention module, so merging around it would unmerge the residual too and blur "
                "every merged token; tokenmerge merges UNet2DConditionModel (SD 1.x / 2.x / XL) "
                "and does not merge this one (the generic adapter would pass every call through "
                "and warn)"
            )
        return None

    def root(self, model: Any) -> nn.Module:
        unet = _diffusers()[4]
        return model if isinstance(model, unet) else model.unet

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        _, block_cls, _, transformer_cls, _ = _diffusers()
        levels = self._levels(root)
        found = []
        for name, module in root.named_modules():
            top = name.split(".")[0]
            if not isinstance(module, transformer_cls) or top not in _STAGES:
                continue
            prefix = ".".join(name.split(".")[:2]) if top != "mid_block" else "mid_block"
            reader = _GridReader(module)
            for index, block in enumerate(module.transformer_blocks):
                if not isinstance(block, block_cls):
                    continue
                site_name = f"{name}.transformer_blocks.{index}"
                modules = {"attn": block.attn1, "mlp": block.ff}
                if block.attn2 is not None:
                    modules["cross_attn"] = block.attn2
                site = Site(
                    site_name,
                    stage=_STAGES[top],
                    level=levels[prefix],
                    block_index=len(found),
                )
                self._readers[site_name] = reader
                self._blocks[site_name] = block
                found.append(SiteCandidate(site, modules))
        return found

    @staticmethod
    def _levels(root: nn.Module) -> dict[str, int]:
        """Downsample factor of every down / up block and of the mid block."""
        levels, factor = {}, 1
        for index, block in enumerate(root.down_blocks):
            levels[f"down_blocks.{index}"] = factor
            if getattr(block, "downsamplers", None) is not None:
                factor *= 2
        levels["mid_block"] = factor
        for index, block in enumerate(root.up_blocks):
            levels[f"up_blocks.{index}"] = factor
            if getattr(block, "upsamplers", None) is not None:
                factor //= 2
        return levels

    def default_sites(
        self, candidates: list[SiteCandidate], config: MergeConfig
    ) -> list[SiteCandidate]:
        if not candidates:
            return candidates
        finest = min(c.site.level for c in candidates)
        return [c for c in candidates if c.site.level == finest]

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        return self._readers[site.name].layout(site, hidden_states)

    def layout_for(self, site: Site) -> Callable[[Site, Tensor], TokenLayout | None]:
        return self._readers[site.name].layout

    def timestep(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return args[1] if len(args) > 1 else None

    def conditioning(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
        value = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        return value if isinstance(value, Tensor) else None

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        handles = []
        reader = self._readers[patch.site.name]
        if not reader.attached:
            reader.attached = True
            handles.append(reader.transformer.register_forward_pre_hook(reader, with_kwargs=True))
        block = self._blocks[patch.site.name]
        handles += patch.watch_block_input(block)
        for kind, module in modules.items():
            handles += patch.attach_local(module, **target_hooks(patch, kind, module, block))
        return handles

    def detach(self, root: nn.Module) -> None:
        for reader in self._readers.values():
            reader.attached = False
            reader.grid = None
