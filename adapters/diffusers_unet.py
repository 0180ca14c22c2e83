"""The diffusers UNet adapter: SD 1.x, SD 2.x, SDXL and any ``UNet2DConditionModel`` pipeline,
Stable Video Diffusion's ``UNetSpatioTemporalConditionModel``, and the DDPM-style
``UNet2DModel`` (``DDPMPipeline``, ``DDIMPipeline``...).

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

``UNet2DModel`` has no transformer blocks: its attention (in ``AttnDownBlock2D``,
``AttnUpBlock2D``, ``UNetMidBlock2D``...) is one diffusers ``Attention`` called on the feature
map ``(B, C, H, W)``, which flattens it to tokens, applies its ``group_norm``, attends, projects
(``to_out``) and adds the residual itself, inside the module. Merging around the module would
unmerge the residual too, so each such ``Attention`` is a site of its own that merges *inside*
it, tomesd's "merge after the norm, unmerge before the residual", with native hooks only:

- a pre-hook on the ``Attention`` reads the grid (its input's height and width) and the call's
  plan, made from the flattened input before the norm (as for the blocks above);
- a forward hook on ``attn.group_norm`` returns its output ``(B, C, N)`` merged along the tokens;
- a forward hook on ``attn.to_out[1]`` (the dropout after the output projection) unmerges its
  output ``(B, N', C) -> (B, N, C)`` before the processor reshapes it and adds the residual. The
  dropout rather than the ``to_out[0]`` linear layer: LoRA loaded after applying wraps the
  linear layer, whose own output would then be unmerged without the LoRA branch.

With ``keys_values`` (``todo``'s default ``"auto"``) the pre-hook runs ``attn.group_norm`` on the
input itself, merges that and passes it as ``encoder_hidden_states``: every query stays, the keys
and values come from the merged tokens, nothing is unmerged (one more group norm per call). Not
with ``FusedAttnProcessor2_0``, whose fused self-attention has no key-value projection of its own
(``"auto"`` merges the tokens there; ``True`` is a ``ConfigError``). The value-corrected unmerge
applies (between the two hooks the module computes plain attention of the normed tokens);
proportional attention applies with ``keys_values`` only: the processor sizes an attention mask by
the unmerged tokens otherwise, so there it is left out. The default sites are again those of the
finest level that has attention (the DDPM paper's models attend at 16 x 16 only: level 2 at
CIFAR-10's 32 x 32, 256 tokens); the class labels (the forward's third argument) are its
conditioning.

Calls the plan cannot handle pass through untouched and are counted in ``stats()``: a
self-attention call with an attention mask (its keys are the merged tokens), a cross-attention mask
with a row per query, non-3-D hidden states, an MLP run in token chunks, and any target module
that carries a diffusers hook (pyramid attention broadcast and the other caches replay outputs
made at earlier steps, with earlier plans); in a ``UNet2DModel``, also an attention call whose
input is not a ``(B, C, H, W)`` feature map, an ``Attention`` without a ``group_norm`` (the mid
block's with ``resnet_time_scale_shift="scale_shift"``: no place to merge after the norm), one
given an attention mask, and one whose processor is not a plain one (IP-Adapter's, a user's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import Adapter, AdapterOptions, SiteCandidate
from tokenmerge.adapters._diffusers import (
    PatchGrid,
    TargetGuard,
    check_signatures,
    size_bias,
    target_hooks,
)
from tokenmerge.attention_view import (
    KEYS_VALUES_PROCESSORS,
    PLAIN_PROCESSORS,
    Call,
    DiffusersAttentionView,
    processor_name,
)
from tokenmerge.calls import PerThread
from tokenmerge.config import MergeConfig
from tokenmerge.correction import ValueCorrection
from tokenmerge.errors import ConfigError, InputError
from tokenmerge.patch import EMPTY_BATCH, SitePatch, per_thread_correction, report_fit
from tokenmerge.plan import Plan
from tokenmerge.proportional import SizeBias
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


def _feature_map_unet() -> type:
    """diffusers' ``UNet2DModel``, whose attention runs on feature maps (see the module
    docstring)."""
    from diffusers.models.unets.unet_2d import UNet2DModel

    return UNet2DModel


def _check_signatures() -> None:
    _, block, attention, transformers, unets = _diffusers()
    expected = {
        **{unet: ("sample", "timestep", "encoder_hidden_states") for unet in unets},
        **{transformer: ("hidden_states",) for transformer in transformers},
        _feature_map_unet(): ("sample", "timestep", "class_labels"),
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


@dataclass
class _Pending:
    """One call's merge inside a feature-map attention, between its hooks."""

    plan: Plan
    call: Call  # the attention call's own arguments (the value correction reads them)
    merged: bool = False  # the group norm's output was merged (the unmerge is due)
    inputs: tuple | None = None  # ``(tokens, merged, call, sources)`` for the correction


class _FeatureMapAttention:
    """The hooks of one ``UNet2DModel`` attention site: merge the ``group_norm``'s output,
    unmerge ``to_out[1]``'s, before the residual the module adds itself (module docstring).

    A class, so ``copy.deepcopy`` of a patched model copies the hooks with it; the call under
    way is the calling thread's (``tokenmerge.calls``).

    Args:
        patch: the site's patch (plans, cache, statistics).
        attention: the diffusers ``Attention``.
        grid: the site's layout; this object's pre-hook reads each call's grid into it.
        keys_values: merge the keys and values only (passed as ``encoder_hidden_states``).
        correction: the value-corrected unmerge, or None.
        bias: proportional attention (``keys_values`` only), or None.
    """

    def __init__(
        self,
        patch: SitePatch,
        attention: nn.Module,
        grid: PatchGrid,
        keys_values: bool,
        correction: ValueCorrection | None,
        bias: SizeBias | None,
    ) -> None:
        self.patch = patch
        self.attention = attention
        self.grid = grid
        self.keys_values = keys_values
        self.correction = correction
        self.corrections = per_thread_correction(correction)
        self.bias = bias
        # replaying diffusers hooks (caches) and masks, as at the other UNets' self-attention
        self.guard = TargetGuard(attention, "attn", attention)
        self.target = patch.new_target()
        self.slots = PerThread(list)  # per thread: the call's ``_Pending`` (empty between calls)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "slots": PerThread(list)}

    def attach(self) -> list[RemovableHandle]:
        """Install the hooks; the norm and output hooks only where tokens are merged."""
        attention = self.attention
        handles = [attention.register_forward_pre_hook(self.before, with_kwargs=True)]
        if not self.keys_values and attention.group_norm is not None:
            handles += [
                attention.group_norm.register_forward_hook(self.normed),
                attention.to_out[1].register_forward_hook(self.projected),
            ]
        if self.correction is not None:
            self.patch.report_correction(self.correction)
        return handles

    def pass_reason(self, x: Any, args: tuple, kwargs: dict) -> str | None:
        """Why this call cannot merge, if it cannot."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            return f"hidden states of shape {shape}, not a (batch, channels, height, width) map"
        if self.attention.group_norm is None:
            return "attention without a group_norm: no normed tokens to merge"
        processor = processor_name(self.attention)
        allowed = KEYS_VALUES_PROCESSORS if self.keys_values else PLAIN_PROCESSORS
        if processor not in allowed:
            return (
                f"the {processor} attention processor, which may not compute plain attention "
                "between the group norm and to_out"
            )
        reason = self.guard(args, kwargs)
        if reason is None and self.keys_values and _argument(args, kwargs, 1) is not None:
            reason = "self-attention given encoder_hidden_states already"
        if reason is None and x.shape[0] == 0:
            reason = EMPTY_BATCH
        return reason

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Pre-hook of the attention: grid, guard and plan; the keys and values with
        ``keys_values``."""
        x = args[0] if args else kwargs.get("hidden_states")
        self.grid(module, args, kwargs)
        slot = self.slots.value
        slot.clear()  # a forward that raised left its call here
        reason = self.pass_reason(x, args, kwargs)
        plan = None
        if reason is None:
            # planned on the input before the norm, as the other UNets' blocks are
            plan = self.patch.plan_for(x.flatten(2).transpose(1, 2), self.target)
            if plan is None:
                reason = f"no token grid known for the {tuple(x.shape[-2:])} map at this call"
        if reason is not None:
            self.patch.count_pass_through(reason)
            return None
        if plan.is_identity:
            return None
        if self.keys_values:
            return self._keys_values(module, plan, x, args, kwargs)
        slot.append(_Pending(plan, Call(args, kwargs)))
        return None

    def _keys_values(
        self, module: nn.Module, plan: Plan, x: Tensor, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        """The call with the merged normed tokens as its keys and values: the processor then
        takes its keys and values from ``encoder_hidden_states`` (no cross-attention norm in
        these modules) and its queries from every token."""
        normed = module.group_norm(x.flatten(2)).transpose(1, 2)
        merged = self.patch.observed("merge", plan.merge, normed)
        args, kwargs = _by_keyword(args, kwargs)
        if self.bias is not None:  # sized by the merged keys, as the processor sizes its mask
            kwargs = self.bias(plan, merged, kwargs)
        return args, {**kwargs, "encoder_hidden_states": merged}

    def normed(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Forward hook of ``group_norm``: its ``(B, C, N)`` output merged to ``(B, C, N')``."""
        slot = self.slots.value
        if not slot or slot[-1].merged:
            return None  # not a merged call (or the norm run again, outside the processor)
        pending = slot[-1]
        plan = pending.plan
        if output.dim() != 3 or output.shape[-1] != plan.num_tokens:
            slot.clear()
            raise InputError(
                f"site {self.patch.site.name!r}: group_norm returned {tuple(output.shape)}, not "
                f"(batch, channels, {plan.num_tokens}) for the {plan.num_tokens} tokens of the "
                "attention's input; merging needs the processor to norm the flattened map. "
                "Exclude this site (sites={'exclude': [...]}) or use a plain attention processor"
            )
        tokens = output.transpose(1, 2)
        observed = self.patch.observed
        if self.correction is None:
            merged = observed("merge", plan.merge, tokens)
        else:
            merged, sources = observed("merge", plan.merge_keeping_sources, tokens)
            pending.inputs = (tokens, merged, pending.call, sources)
        pending.merged = True
        return merged.transpose(1, 2)

    def projected(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Forward hook of ``to_out[1]``: its ``(B, N', C)`` output unmerged to ``(B, N, C)``."""
        slot = self.slots.value
        if not slot or not slot[-1].merged:
            return None
        pending = slot.pop()  # never kept past the call
        self.patch.check_merged_output(pending.plan, output, self.attention)
        return self.patch.observed("unmerge", self._unmerge, pending.plan, output, pending.inputs)

    def _unmerge(self, plan: Plan, y: Tensor, inputs: tuple | None) -> Tensor:
        unmerged = plan.unmerge(y)
        if inputs is None:
            return unmerged
        tokens, merged, call, sources = inputs
        correction = self.corrections.value
        out = correction(
            plan,
            tokens,
            merged,
            unmerged,
            observed=self.patch.observed,
            call=call,
            sources=sources,
        )
        report_fit(self.correction, correction)
        return out


#: a diffusers ``Attention``'s positional arguments (``forward`` takes no more)
_ATTENTION_ARGUMENTS = ("hidden_states", "encoder_hidden_states", "attention_mask")


def _argument(args: tuple, kwargs: dict, index: int) -> Any:
    """Argument ``index`` of a diffusers ``Attention`` call, positional or by keyword."""
    return args[index] if len(args) > index else kwargs.get(_ATTENTION_ARGUMENTS[index])


def _by_keyword(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call with every argument after the hidden states passed by keyword, so a hook can
    set one without the call giving it twice (a positional None included)."""
    moved = dict(zip(_ATTENTION_ARGUMENTS[1:], args[1:], strict=False))
    return args[:1], {**moved, **kwargs}


def _feature_map_keys_values(patch: SitePatch, attention: nn.Module) -> bool:
    """Whether a ``UNet2DModel`` attention site merges its keys and values only (the config's
    ``keys_values``; ``"auto"``: where the processor takes them from an argument of their own).

    Raises:
        ConfigError: ``keys_values=True`` with a fused attention processor.
    """
    asked = patch.config.keys_values
    able = processor_name(attention) in KEYS_VALUES_PROCESSORS
    if asked is True and not able:
        raise ConfigError(
            f"site {patch.site.name!r}: keys_values=True merges the keys and values of a "
            "self-attention by passing them as encoder_hidden_states, which its "
            f"{processor_name(attention)} processor projects with to_kv, absent from a fused "
            "self-attention. Set keys_values='auto' (tokens merged there) or False, call "
            "unet.unfuse_qkv_projections(), or exclude the site (sites={'exclude': [...]})"
        )
    return asked is True or (asked == "auto" and able)


class DiffusersUNetAdapter(Adapter):
    """Merging in diffusers ``UNet2DConditionModel``s, ``UNetSpatioTemporalConditionModel``s
    and ``UNet2DModel``s, and the pipelines that hold one.

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

        A DDPM-style ``UNet2DModel`` merges inside each attention of its finest attention level:

        >>> from diffusers import UNet2DModel
        >>> ddpm = UNet2DModel(
        ...     block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        ...     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        ...     up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
        >>> handle = tokenmerge.apply(ddpm, "tome", ratio=0.5, sites={"min_tokens": 1})
        >>> [site.name for site in handle.sites][:2]
        ['down_blocks.1.attentions.0', 'up_blocks.0.attentions.0']
        >>> out = ddpm(torch.randn(2, 3, 16, 16), 999).sample
        >>> handle.stats()["down_blocks.1.attentions.0"].tokens_out
        32
        >>> handle.remove()
    """

    name = "diffusers_unet"
    merges_keys_values = True

    def __init__(self, options: AdapterOptions | None = None) -> None:
        _check_signatures()
        super().__init__(options)
        self._readers: dict[str, _GridReader] = {}  # site name -> its transformer's grid reader
        self._blocks: dict[str, nn.Module] = {}  # site name -> its BasicTransformerBlock
        #: UNet2DModel sites: site name -> the grid its attention's pre-hook reads
        self._maps: dict[str, PatchGrid] = {}

    @staticmethod
    def _unets() -> tuple[type, ...]:
        return (*_diffusers()[4], _feature_map_unet())

    @classmethod
    def supports(cls, model: Any) -> bool:
        unets = cls._unets()
        return isinstance(model, unets) or isinstance(getattr(model, "unet", None), unets)

    def root(self, model: Any) -> nn.Module:
        return model if isinstance(model, self._unets()) else model.unet

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        if isinstance(root, _feature_map_unet()):
            return self._feature_map_candidates(root)
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

    def _feature_map_candidates(self, root: nn.Module) -> list[SiteCandidate]:
        """A ``UNet2DModel``'s sites: each ``Attention`` of its down, mid and up blocks."""
        attention_cls = _diffusers()[2]
        levels = self._levels(root)
        found = []
        for name, module in root.named_modules():
            top = name.split(".")[0]
            if not isinstance(module, attention_cls) or top not in _STAGES:
                continue
            prefix = ".".join(name.split(".")[:2]) if top != "mid_block" else "mid_block"
            site = Site(name, stage=_STAGES[top], level=levels[prefix], block_index=len(found))
            self._maps[name] = PatchGrid(patch_size=1)
            found.append(SiteCandidate(site, {"attn": module}))
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

    def _grid(self, site: Site) -> PatchGrid:
        return self._maps[site.name] if site.name in self._maps else self._readers[site.name]

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        return self._grid(site).layout(site, hidden_states)

    def layout_for(self, site: Site) -> Callable[[Site, Tensor], TokenLayout | None]:
        return self._grid(site).layout

    def timestep(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        return args[1] if len(args) > 1 else None

    def conditioning(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor | None:
        # the third argument: text embeddings, or a UNet2DModel's class labels (a
        # UNet2DConditionModel is always given the former, so its class labels never count)
        if len(args) > 2:
            value = args[2]
        else:
            value = kwargs.get("encoder_hidden_states", kwargs.get("class_labels"))
        return value if isinstance(value, Tensor) else None

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        if patch.site.name in self._maps:
            return self._attach_feature_map(patch, modules["attn"])
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

    def _attach_feature_map(self, patch: SitePatch, attention: nn.Module) -> list[RemovableHandle]:
        """The hooks of a ``UNet2DModel`` attention site (``_FeatureMapAttention``)."""
        keys_values = _feature_map_keys_values(patch, attention)
        if keys_values:
            patch.merges_keys_values()
        correction = None
        if not keys_values and patch.config.value_correction:
            # between the two hooks the module computes plain attention of the normed tokens,
            # which is what the view describes (its norm and residual lie outside them)
            correction = ValueCorrection(DiffusersAttentionView(attention))
        bias = size_bias(patch, "attn", attention) if keys_values else None
        hooks = _FeatureMapAttention(
            patch, attention, self._maps[patch.site.name], keys_values, correction, bias
        )
        return hooks.attach()

    def detach(self, root: nn.Module) -> None:
        for reader in self._readers.values():
            reader.attached = False
            reader.grid = None
        for grid in self._maps.values():
            grid.grid = None
