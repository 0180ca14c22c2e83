"""Built-in adapters, registered as a plugin of tokenmerge itself.

Each adapter is registered by an ``AdapterSpec`` naming its module, so neither the adapter nor its
model library is imported until a model needs it.
"""

from __future__ import annotations

from tokenmerge.adapter_spec import AdapterSpec
from tokenmerge.hookspecs import hookimpl


@hookimpl
def tokenmerge_register_adapters(register):
    register(
        AdapterSpec(
            name="generic",
            target="tokenmerge.adapters.generic:GenericAdapter",
            description=(
                "any torch model: local merging around the modules named by "
                "sites={'include': [globs]}"
            ),
        )
    )
    register(
        AdapterSpec(
            name="diffusers_unet",
            target="tokenmerge.adapters.diffusers_unet:DiffusersUNetAdapter",
            requires={"diffusers": "0.42"},
            extra="diffusers",
            claims=("diffusers.",),
            description=(
                "diffusers UNet2DConditionModel (SD 1.x / 2.x / XL), Stable Video Diffusion's "
                "UNetSpatioTemporalConditionModel, UNet2DModel (DDPM) and their pipelines"
            ),
        )
    )
    register(
        AdapterSpec(
            name="diffusers_dit",
            target="tokenmerge.adapters.diffusers_dit:DiffusersDiTAdapter",
            requires={"diffusers": "0.42"},
            extra="diffusers",
            claims=("diffusers.",),
            description=("diffusers DiT, PixArt and SD3 / SD 3.5 transformers and their pipelines"),
        )
    )
    register(
        AdapterSpec(
            name="diffusers_flux",
            target="tokenmerge.adapters.diffusers_flux:DiffusersFluxAdapter",
            requires={"diffusers": "0.42"},
            extra="diffusers",
            claims=("diffusers.",),
            description=(
                "diffusers Flux transformers (FluxTransformer2DModel, ChromaTransformer2DModel) "
                "and their pipelines"
            ),
        )
    )
    register(
        AdapterSpec(
            name="diffusers_transformer",
            target="tokenmerge.adapters.diffusers_transformer:DiffusersTransformerAdapter",
            requires={"diffusers": "0.42"},
            extra="diffusers",
            claims=("diffusers.",),
            description=(
                "any other diffusers image or video transformer built from diffusers attention "
                "modules (Sana, Qwen-Image, Wan, HunyuanVideo, CogVideoX, LTX-Video...)"
            ),
        )
    )
    register(
        AdapterSpec(
            name="timm_hierarchical",
            target="tokenmerge.adapters.timm_hierarchical:TimmHierarchicalAdapter",
            requires={"timm": "1.0.31"},
            extra="timm",
            claims=("timm.",),
            description=(
                "timm hierarchical / windowed models (Swin v1 / v2 / v2-cr, MaxViT, CoAtNet, "
                "MaxxViT, LeViT, SAM, EfficientViT-MSRA): merging around their token-wise MLPs"
            ),
        )
    )
    register(
        AdapterSpec(
            name="timm_vit",
            target="tokenmerge.adapters.timm_vit:TimmViTAdapter",
            requires={"timm": "1.0.31"},
            extra="timm",
            claims=("timm.",),
            description=(
                "timm VisionTransformer (ViT, DeiT, DeiT-3, registers, qk_norm, "
                "dynamic_img_size) and its subclasses, and Eva (EVA, EVA-02)"
            ),
        )
    )
    register(
        AdapterSpec(
            name="transformers_vit",
            target="tokenmerge.adapters.transformers_vit:TransformersViTAdapter",
            requires={"transformers": "5.23"},
            extra="transformers",
            claims=("transformers.",),
            description=(
                "transformers vision encoders built like a ViT: ViTModel, "
                "ViTForImageClassification, DeiT, Dinov2 (with registers), Siglip, "
                "CLIPVisionModel (with projection), CLIPModel (its vision tower), BEiT, "
                "Data2Vec-Vision and ViTMAE's encoder"
            ),
        )
    )
