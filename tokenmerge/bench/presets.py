"""Built-in models for ``tokenmerge bench`` and ``tokenmerge visualize``: real architectures with
random weights (nothing is downloaded).

A preset keeps its model's published configuration: the widths, block types and token counts
that decide what merging costs and saves. Only the weights are random, so speed figures carry
over to the real model and fidelity figures do not (see ``fidelity.tie_self_attention``). A preset
exists for every model family whose adapter has landed; ``tiny-unet`` is a seconds-fast stand-in
for tests and smoke runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenmerge.errors import UnknownNameError, unknown_name_message

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A built-in model: how to build it and how it is fed.

    Args:
        name: the name ``--model`` takes.
        description: one line for ``tokenmerge list`` and the report header.
        library: the library the model class comes from (``"diffusers"``).
        model_class: the class name, built from ``config``.
        config: the published configuration (random weights are drawn from it).
        default_size: the image size in pixels the model was trained at.
        notes: what differs from the real model, said in every report (empty: nothing but the
            weights).
    """

    name: str
    description: str
    library: str
    model_class: str
    config: dict[str, Any] = field(repr=False)
    default_size: int
    notes: str = ""

    def build(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> nn.Module:
        """The model with seeded random weights, in eval mode, on ``device`` in ``dtype``.

        Example:
            >>> unet = get_preset("tiny-unet").build()
            >>> type(unet).__name__, unet.training
            ('UNet2DConditionModel', False)
        """
        cls = self._model_class()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(**self.config)
        # nn.Module.to, not diffusers' override: that one warns about modules to keep in
        # float32, which only matters for weights loaded with from_pretrained
        return nn.Module.to(model.eval(), device=device, dtype=dtype)

    def build_empty(self) -> nn.Module:
        """The model on the meta device (no memory, no weights): for inspecting its structure."""
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
