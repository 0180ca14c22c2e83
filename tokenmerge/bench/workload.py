"""How ``tokenmerge bench`` feeds a model: its inputs, its noise schedule, one denoising call.

So far the bench measures diffusers ``UNet2DConditionModel`` denoisers (SD 1.x / 2.x / XL);
other families join as their adapters land.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokenmerge.errors import UnsupportedModelError

from .fidelity import photo_latent

__all__ = ["UNetWorkload", "make_workload"]

#: the latent is the image over this factor (every SD VAE)
VAE_SCALE = 8
#: tokens of the prompt embeddings fed to cross-attention (CLIP's context length)
PROMPT_TOKENS = 77
#: the schedule the timed rounds walk through: a standard 50-step sampling run
TIMING_STEPS = 50


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - diffusers is a test dependency
        raise UnsupportedModelError(
            'tokenmerge bench needs diffusers for UNet models: pip install "tokenmerge[diffusers]"'
        ) from exc
    return diffusers


class UNetWorkload:
    """Inputs and calls of a diffusers ``UNet2DConditionModel``.

    The prompt embeddings are seeded Gaussian noise (no text encoder); SDXL's pooled text
    embedding and size conditioning are filled in when the model asks for them.

    Args:
        model: the UNet (only its config is read).
        size: image size in pixels; the latent grid is ``size / 8``.
        batch: samples per call.
        device, dtype: where the inputs live.
        seed: seeds the prompt embeddings and every noise draw.
    """

    kind = "diffusion"

    def __init__(
        self,
        model: nn.Module,
        size: int,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
    ) -> None:
        if size % VAE_SCALE or size < 2 * VAE_SCALE:
            raise ValueError(
                f"image size {size} px is not a multiple of {VAE_SCALE} of at least "
                f"{2 * VAE_SCALE}: the latent grid is the image over {VAE_SCALE}; pick e.g. 512"
            )
        config = model.config
        self.size = size
        self.latent_size = size // VAE_SCALE
        self.channels = config.in_channels
        self.batch = batch
        self.device = device
        self.dtype = dtype
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randn(batch, PROMPT_TOKENS, config.cross_attention_dim, generator=generator)
        self.kwargs: dict[str, Any] = {"encoder_hidden_states": prompt.to(device, dtype)}
        if config.addition_embed_type == "text_time":  # SDXL: pooled text + size conditioning
            pooled = config.projection_class_embeddings_input_dim - 6 * (
                config.addition_time_embed_dim
            )
            self.kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled, generator=generator).to(device, dtype),
                "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch).to(
                    device, dtype
                ),
            }
        elif config.addition_embed_type is not None or config.class_embed_type is not None:
            raise UnsupportedModelError(
                f"tokenmerge bench cannot make the extra conditioning this UNet asks for "
                f"(addition_embed_type={config.addition_embed_type!r}, class_embed_type="
                f"{config.class_embed_type!r}); supported: plain text conditioning (SD 1.x / 2.x) "
                "and SDXL's 'text_time'"
            )

    def describe(self) -> str:
        return (
            f"{self.size} px ({self.latent_size} x {self.latent_size} latent, "
            f"{self.latent_size**2} tokens at full resolution), batch {self.batch}"
        )

    def scheduler(self) -> Any:
        """A fresh DDIM scheduler with Stable Diffusion's training schedule."""
        return _diffusers().DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )

    def timing_timesteps(self, count: int) -> list[int]:
        """The first ``count`` timesteps of a 50-step sampling run (consecutive denoising steps,
        so plan caches behave as in a real generation)."""
        scheduler = self.scheduler()
        scheduler.set_timesteps(TIMING_STEPS)
        steps = [int(t) for t in scheduler.timesteps]
        return [steps[i % len(steps)] for i in range(count)]

    def noise(self, seed_offset: int = 0) -> Tensor:
        """Gaussian noise the shape of one batch of latents."""
        generator = torch.Generator().manual_seed(self.seed + 1 + seed_offset)
        shape = (self.batch, self.channels, self.latent_size, self.latent_size)
        return torch.randn(shape, generator=generator).to(self.device, self.dtype)

    def noisy_photo(self, photo: str, timestep: int, seed_offset: int = 0) -> Tensor:
        """A batch of the photograph's latent noised to ``timestep`` (the forward process)."""
        clean = photo_latent(photo, self.channels, self.latent_size).to(self.device, self.dtype)
        clean = clean.expand(self.batch, -1, -1, -1)
        noise = self.noise(seed_offset)
        return self.scheduler().add_noise(clean, noise, torch.tensor([timestep]))

    def __call__(self, model: nn.Module, sample: Tensor, timestep: int) -> Tensor:
        """One denoising call: the predicted noise (or v) for ``sample`` at ``timestep``."""
        return model(sample, timestep, **self.kwargs).sample

    def trajectory(self, model: nn.Module, steps: int, before_step: Any = None) -> Tensor:
        """A ``steps``-step DDIM sampling run from seeded noise; the final latent.

        ``before_step(index)`` (optional) is called before every model call.
        """
        scheduler = self.scheduler()
        scheduler.set_timesteps(steps)
        latent = self.noise(seed_offset=1000) * scheduler.init_noise_sigma
        for index, timestep in enumerate(scheduler.timesteps):
            if before_step is not None:
                before_step(index)
            prediction = self(model, latent, int(timestep))
            latent = scheduler.step(prediction, timestep, latent).prev_sample
        return latent

    def block_names(self, model: nn.Module) -> list[str]:
        """Every spatial transformer block (where attention runs), in model order."""
        block = _diffusers().models.attention.BasicTransformerBlock
        return [name for name, module in model.named_modules() if isinstance(module, block)]


def make_workload(
    model: nn.Module,
    size: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> UNetWorkload:
    """The workload for ``model``; a clear error for a model the bench cannot feed yet."""
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        return UNetWorkload(model, size, batch, device, dtype, seed)
    raise UnsupportedModelError(
        f"tokenmerge bench cannot run a {name} yet: it measures diffusers UNet2DConditionModel "
        "denoisers (SD 1.x / 2.x / XL); DiT-style transformers and ViTs join as their adapters "
        "land. Use tokenmerge.apply() on this model directly"
    )
