"""Built-in models for ``tokenmerge bench`` and ``tokenmerge visualize``: real architectures with
random weights (nothing is downloaded).

A preset keeps its model's published configuration: the widths, block types and token counts
that decide what merging costs and saves. Only the weights are random, so speed figures carry
over to the real model and fidelity figures do not (see ``fidelity.tie_self_attention``). A
preset that departs from the real model in anything but its weights says so in its ``notes``
(``flux-dev-cut`` keeps FLUX.1-dev's width but not its depth), and every report repeats them.
The ``tiny-*`` presets are seconds-fast stand-ins for tests and smoke runs, one per family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmerge.errors import UnknownNameError, unknown_name_message
from tokenmerge_bench.reference.configs import CLASSIFIER_CONFIG, DENOISER_CONFIG

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch and the model libraries are imported by the methods that build a model: the presets'
# names and descriptions are read by `tokenmerge --help` and `tokenmerge list`, which import
# no torch

__all__ = ["CLASSIFIER_LIBRARIES", "PRESETS", "Preset", "get_preset"]

#: the libraries whose models the bench measures as image classifiers (not denoisers)
CLASSIFIER_LIBRARIES = ("timm", "transformers")


@dataclass(frozen=True)
class Preset:
    """A built-in model: how to build it and how it is fed.

    Args:
        name: the name ``--model`` takes.
        description: one line for ``tokenmerge list`` and the report header.
        library: the library the model class comes from (``"diffusers"``, ``"timm"``).
        model_class: the class name, built from ``config`` (for timm: ``create_model``, the
            factory, with ``pretrained=False`` in the config).
        config: the published configuration (random weights are drawn from it).
        default_size: the image size in pixels the bench runs it at: the size it was trained at,
            unless the description says otherwise.
        notes: what differs from the real model, said in every report (empty: nothing but the
            weights).
        default_r: classifiers: tokens merged per block when the bench is not given ratios
            (ToMe's setting: 13 for ViT-B/16 at 224 px).
        reference: ``"denoiser"`` or ``"classifier"`` for the models trained here
            (``tokenmerge_bench.reference``): built with their trained weights instead of random
            ones, and measured on their held-out data.
    """

    name: str
    description: str
    library: str
    model_class: str
    config: dict[str, Any] = field(repr=False)
    default_size: int
    notes: str = ""
    default_r: int = 13
    reference: str | None = None

    @property
    def classifier(self) -> bool:
        """Whether the bench measures it as an image classifier (a ViT), not a denoiser."""
        return self.library in CLASSIFIER_LIBRARIES

    def build(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> nn.Module:
        """The model with seeded random weights (a reference model: its trained weights), in
        eval mode, on ``device`` in ``dtype`` (default float32).

        Example:
            >>> unet = get_preset("tiny-unet").build()
            >>> type(unet).__name__, unet.training
            ('UNet2DConditionModel', False)
        """
        import torch
        from torch import nn

        dtype = torch.float32 if dtype is None else dtype
        cls = self._model_class()
        if self.reference is not None:
            from tokenmerge_bench.reference.models import load_reference

            return load_reference(self.reference, device, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(**self.config)
        # nn.Module.to, not diffusers' override: that one warns about modules to keep in
        # float32, which only matters for weights loaded with from_pretrained
        return nn.Module.to(model.eval(), device=device, dtype=dtype)

    def build_empty(self) -> nn.Module:
        """The model on the meta device (no memory, no weights): for inspecting its structure."""
        import torch

        with torch.device("meta"):
            return self._model_class()(**self.config).eval()

    def _model_class(self) -> type[nn.Module]:
        try:
            library = importlib.import_module(self.library)
        except ImportError as exc:
            raise UnknownNameError(
                f"preset {self.name!r} needs {self.library}, which is not installed; install it "
                f'with pip install "tokenmerge[{self.library}]"'
            ) from exc
        return getattr(library, self.model_class)


#: the UNet layout SD 1.x and 2.x share (they differ in cross-attention width and head sizes)
_SD_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
)

#: DiT-XL/2's transformer, which PixArt-alpha keeps (28 blocks of 16 heads x 72 on 2 x 2 patches
#: of a 4-channel latent; 8 output channels: the noise and a learned variance)
_DIT_XL_2 = dict(
    num_layers=28,
    num_attention_heads=16,
    attention_head_dim=72,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_embeds_ada_norm=1000,
)

#: stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
_SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    num_attention_heads=24,
    attention_head_dim=64,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)

#: black-forest-labs/FLUX.1-dev, transformer/config.json
_FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    num_attention_heads=24,
    attention_head_dim=128,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

#: the tiny DiT-style stand-ins: 2 blocks of 2 heads x 16 on a 32 x 32 latent (16 x 16 tokens,
#: as many as tiny-unet's full-resolution level)
_TINY_DIT = dict(
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    patch_size=2,
    in_channels=4,
    sample_size=32,
    num_embeds_ada_norm=1000,
)

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in [
        Preset(
            name="sd15",
            description="Stable Diffusion 1.5 UNet (860M parameters), 512 px",
            library="diffusers",
            model_class="UNet2DConditionModel",
            config=dict(
                sample_size=64,
                **_SD_UNET,
                cross_attention_dim=768,
                attention_head_dim=8,
            ),
            default_size=512,
        ),
        Preset(
            name="sd21",
            description="Stable Diffusion 2.1 UNet (865M parameters, linear projections), 768 px",
            library="diffusers",
            model_class="UNet2DConditionModel",
            config=dict(
                sample_size=96,
                **_SD_UNET,
                cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True,
            ),
            default_size=768,
        ),
        Preset(
            name="sdxl",
            description="Stable Diffusion XL base UNet (2.6B parameters), 1024 px",
            library="diffusers",
            model_class="UNet2DConditionModel",
            config=dict(
                sample_size=128,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                layers_per_block=2,
                transformer_layers_per_block=(1, 2, 10),
                cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            ),
            default_size=1024,
        ),
        Preset(
            name="dit-xl-2",
            description="DiT-XL/2 class-conditional transformer (675M parameters), 512 px",
            library="diffusers",
            model_class="DiTTransformer2DModel",
            config=dict(**_DIT_XL_2, sample_size=64, norm_type="ada_norm_zero"),
            default_size=512,
        ),
        Preset(
            name="pixart-alpha-512",
            description="PixArt-alpha XL/2 text-to-image transformer (611M parameters), 512 px",
            library="diffusers",
            model_class="PixArtTransformer2DModel",
            config=dict(
                **_DIT_XL_2,
                sample_size=64,
                norm_type="ada_norm_single",
                norm_eps=1e-6,
                cross_attention_dim=1152,
                caption_channels=4096,
                # the 512 px model: no resolution / aspect-ratio conditioning, position table
                # at scale 1 (the 1024 px multi-aspect model has sample_size 128 and both on)
                interpolation_scale=1,
                use_additional_conditions=False,
            ),
            default_size=512,
        ),
        Preset(
            name="sd3-medium",
            description="Stable Diffusion 3 Medium MMDiT (2.0B parameters), 512 px (trained at "
            "up to 1024)",
            library="diffusers",
            model_class="SD3Transformer2DModel",
            config=_SD3_MEDIUM,
            default_size=512,
        ),
        Preset(
            name="flux-dev-cut",
            description="FLUX.1-dev transformer, full width, depth cut to 2 + 4 of 19 + 38 "
            "blocks (1.3B of 11.9B), 512 px",
            library="diffusers",
            model_class="FluxTransformer2DModel",
            config=dict(_FLUX_DEV, num_layers=2, num_single_layers=4),
            default_size=512,
            notes="depth cut: 2 of FLUX.1-dev's 19 double-stream blocks and 4 of its 38 "
            "single-stream blocks (1.3B of 11.9B parameters), so it fits in memory; widths, "
            "heads, embedders and token counts are FLUX.1-dev's, so per-block figures carry "
            "over and whole-model times are about a tenth of the real model's",
        ),
        Preset(
            name="tiny-unet",
            description="a tiny SD-shaped UNet (2 levels, 32 / 64 channels) for tests, 128 px",
            library="diffusers",
            model_class="UNet2DConditionModel",
            config=dict(
                sample_size=16,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                layers_per_block=1,
                cross_attention_dim=32,
                attention_head_dim=8,
                norm_num_groups=8,
            ),
            default_size=128,
            notes="not a real model: a tiny configuration for tests and smoke runs",
        ),
        Preset(
            name="tiny-dit",
            description="a tiny DiT (2 blocks, 2 x 16 heads) for tests, 256 px",
            library="diffusers",
            model_class="DiTTransformer2DModel",
            config=dict(**_TINY_DIT, out_channels=8, norm_type="ada_norm_zero"),
            default_size=256,
            notes="not a real model: a tiny configuration for tests and smoke runs",
        ),
        Preset(
            name="tiny-pixart",
            description="a tiny PixArt-alpha (2 blocks, 2 x 16 heads) for tests, 256 px",
            library="diffusers",
            model_class="PixArtTransformer2DModel",
            config=dict(
                **_TINY_DIT,
                out_channels=8,
                norm_type="ada_norm_single",
                cross_attention_dim=32,  # PixArt's caption projection outputs the block width
                caption_channels=48,
            ),
            default_size=256,
            notes="not a real model: a tiny configuration for tests and smoke runs",
        ),
        Preset(
            name="tiny-sd3",
            description="a tiny SD 3.5-style MMDiT (2 blocks, one with an image-only attn2) for "
            "tests, 256 px",
            library="diffusers",
            model_class="SD3Transformer2DModel",
            config=dict(
                sample_size=32,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=2,
                num_attention_heads=2,
                attention_head_dim=16,
                joint_attention_dim=32,
                caption_projection_dim=32,  # the text stream runs at the block width
                pooled_projection_dim=32,
                pos_embed_max_size=32,
                dual_attention_layers=(0,),
                qk_norm="rms_norm",
            ),
            default_size=256,
            notes="not a real model: a tiny configuration for tests and smoke runs",
        ),
        Preset(
            name="tiny-flux",
            description="a tiny FLUX.1 (2 double- + 2 single-stream blocks, 2 x 16 heads) for "
            "tests, 256 px",
            library="diffusers",
            model_class="FluxTransformer2DModel",
            config=dict(
                patch_size=1,
                in_channels=64,
                num_layers=2,
                num_single_layers=2,
                num_attention_heads=2,
                attention_head_dim=16,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),  # rotary axes (even sizes) sum to the head width
            ),
            default_size=256,
            notes="not a real model: a tiny configuration for tests and smoke runs",
        ),
        Preset(
            name="vit-b-16",
            description="ViT-B/16 image classifier (timm vit_base_patch16_224, 86M parameters), "
            "224 px",
            library="timm",
            model_class="create_model",
            config=dict(model_name="vit_base_patch16_224", pretrained=False),
            default_size=224,
        ),
        Preset(
            name="deit-s-16",
            description="DeiT-S/16 image classifier (timm deit_small_patch16_224, 22M "
            "parameters), 224 px",
            library="timm",
            model_class="create_model",
            config=dict(model_name="deit_small_patch16_224", pretrained=False),
            default_size=224,
        ),
        Preset(
            name="tiny-vit",
            description="a tiny ViT (4 blocks, 4 x 16 heads, 8 x 8 patches) for tests, 64 px",
            library="timm",
            model_class="create_model",
            config=dict(
                model_name="vit_tiny_patch16_224",
                pretrained=False,
                depth=4,
                embed_dim=64,
                num_heads=4,
                img_size=64,
                patch_size=8,
                num_classes=10,
            ),
            default_size=64,
            notes="not a real model: a tiny configuration for tests and smoke runs",
            default_r=12,
        ),
        Preset(
            name="reference-denoiser",
            description="tokenmerge's reference denoiser, trained here: a DiT (6 blocks of 4 "
            "heads, 2.1M parameters) on 64 px photographs, 16 x 16 tokens",
            library="diffusers",
            model_class="DiTTransformer2DModel",
            config=DENOISER_CONFIG,
            default_size=64,
            notes="trained here (tokenmerge_bench.reference); pixels folded 4 x 4 into tokens "
            "instead of a VAE latent; measured on photographs it never saw",
            reference="denoiser",
        ),
        Preset(
            name="reference-vit",
            description="tokenmerge's reference ViT classifier, trained here: 6 blocks of 4 "
            "heads on 32 px crops, 8 x 8 patches, 19 classes",
            library="timm",
            model_class="create_model",
            config=CLASSIFIER_CONFIG,
            default_size=32,
            notes="trained here (tokenmerge_bench.reference); names which of 19 photographs a "
            "crop is from, measured on crops of rows it never saw",
            default_r=4,
            reference="classifier",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Example:
        >>> get_preset("sd15").default_size
        512
    """
    if name not in PRESETS:
        raise UnknownNameError(
            unknown_name_message(
                "preset", name, PRESETS, hint="Or pass --model PATH to a local checkpoint."
            )
        )
    return PRESETS[name]
