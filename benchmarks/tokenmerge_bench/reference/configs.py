"""The reference models' configurations, in a module of their own without torch: the bench's
presets name them, and ``tokenmerge --help`` lists the presets without importing torch.
``tokenmerge_bench.reference.models`` builds the models from them (and re-exports them).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLASSIFIER_CONFIG", "DENOISER_CONFIG", "NOISE_SCHEDULE", "PATCH"]

#: pixels per token side of the denoiser's folded input
PATCH = 4

#: the DiT's configuration (diffusers ``DiTTransformer2DModel`` arguments)
DENOISER_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    patch_size=1,
    in_channels=3 * PATCH * PATCH,
    out_channels=3 * PATCH * PATCH,
    num_layers=6,
    num_attention_heads=4,
    attention_head_dim=32,
    num_embeds_ada_norm=1,
    norm_type="ada_norm_zero",
)

#: the forward process the denoiser was trained with (diffusers' DDPMScheduler arguments):
#: it predicts the added noise
NOISE_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02
)

#: ``timm.create_model`` arguments: a ViT-Tiny reshaped (every size below replaces ViT-Tiny's)
CLASSIFIER_CONFIG: dict[str, Any] = dict(
    model_name="vit_tiny_patch16_224",
    pretrained=False,
    img_size=32,
    patch_size=4,
    num_classes=19,
    embed_dim=128,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
)
