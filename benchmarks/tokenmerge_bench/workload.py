"""How ``tokenmerge bench`` feeds a model: its inputs, its noise schedule, one denoising call.

One workload per family of diffusers denoisers, picked by ``make_workload`` from the model's
class:

- ``UNetWorkload``: ``UNet2DConditionModel`` (SD 1.x / 2.x / XL), epsilon or v prediction on
  SD's scaled-linear DDPM schedule.
- ``DiTWorkload``: ``DiTTransformer2DModel`` (class-conditional) and ``PixArtWorkload``:
  ``PixArtTransformer2DModel`` (T5 text through cross-attention): DDPM-style models on discrete
  timesteps 0..999 with linear betas 1e-4..0.02, whose output stacks the noise prediction and a
  learned variance (only the noise half is compared and stepped with).
- ``SD3Workload``: ``SD3Transformer2DModel`` (SD 3 / 3.5) and ``FluxWorkload``:
  ``FluxTransformer2DModel`` (FLUX.1): rectified-flow models, ``x_t = (1 - s) x_0 + s noise``
  with ``s = t / 1000``; SD3 takes the timestep ``t``, Flux takes ``s`` (it multiplies by 1000
  itself) and packed latents.

Every workload speaks in timesteps on the 0..1000 scale (``--timesteps 900 500 100``), walks
the family's real sampling schedule in the timed rounds (50 steps for the DDPM families, 28 for
the flow-matching ones, their pipelines' defaults) and samples its trajectory with the family's
sampler (DDIM, or Euler for flow matching). Prompts are seeded Gaussian embeddings of the text
encoders' real shapes (no text encoder runs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmerge.errors import InputError, UnsupportedModelError
from tokenmerge_bench.reference.data import (
    DENOISER_HELD_OUT,
    denoiser_held_out,
    load_photo_set,
    reference_photo,
)

from .fidelity import photo_latent

__all__ = [
    "DiTWorkload",
    "FluxWorkload",
    "PixArtWorkload",
    "ReferenceDenoiserWorkload",
    "SD3Workload",
    "UNetWorkload",
    "Workload",
    "default_size",
    "make_workload",
]

#: the latent is the image over this factor (every SD, PixArt, SD3 and FLUX.1 VAE)
VAE_SCALE = 8
#: tokens of the prompt embeddings fed to cross-attention (CLIP's context length)
PROMPT_TOKENS = 77
#: the schedule the timed rounds of the DDPM-style families walk through: a 50-step run
TIMING_STEPS = 50
#: the flow-matching families' sampling runs (SD3's and FLUX.1-dev's pipeline default)
FLOW_TIMING_STEPS = 28
#: training timesteps of every family here; ``--timesteps`` are on this scale
TRAIN_TIMESTEPS = 1000


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - diffusers is a test dependency
        raise UnsupportedModelError(
            'tokenmerge bench needs diffusers for its models: pip install "tokenmerge[diffusers]"'
        ) from exc
    return diffusers


def _as_number(value: Tensor) -> int | float:
    """A scheduler timestep as a Python number (int for discrete schedules)."""
    return int(value) if not value.is_floating_point() else float(value)


class Workload(ABC):
    """A family's inputs and calls; what every family shares: seeded noise, photograph latents,
    the sampling walk.

    Subclasses set the latent layout (``channels``, ``sample_shape``), the scheduler, the call
    and, for flow matching, the forward process.

    Args:
        model: the denoiser (only its config is read).
        size: image size in pixels; the latent grid is ``size / 8``.
        batch: samples per call.
        device, dtype: where the inputs live.
        seed: seeds the conditioning and every noise draw.
    """

    kind = "diffusion"
    #: the sampler of the trajectory, for the report
    sampler = "DDIM"
    #: steps of the sampling run the timed rounds walk through
    timing_steps = TIMING_STEPS
    #: the latent grid must divide into this many pixels per token side
    pixels_per_token = VAE_SCALE
    #: the photographs fidelity is measured on when none are named (``tokenmerge_bench.photos``)
    default_photos: tuple[str, ...] = ("astronaut",)

    def __init__(
        self,
        model: nn.Module,
        size: int,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
    ) -> None:
        self.config = model.config  # first: the token size below may depend on it
        step = self.pixels_per_token
        if size % step or size < 2 * step:
            raise InputError(
                f"image size {size} px is not a multiple of {step} of at least {2 * step}: "
                f"{type(model).__name__} sees one token per {step} x {step} pixels; pick e.g. 512"
            )
        self.size = size
        self.latent_size = size // VAE_SCALE
        self.channels = self.config.in_channels
        self.batch = batch
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self.kwargs: dict[str, Any] = {}
        self._generator = torch.Generator().manual_seed(seed)
        #: the timed sampling run's timesteps as the model takes them, by dtype and scale
        self._schedules: dict[tuple[torch.dtype, float], tuple[dict, Tensor]] = {}
        self._condition(model)

    @abstractmethod
    def _condition(self, model: nn.Module) -> None:
        """Fill ``kwargs`` with the family's conditioning (prompt embeddings, labels...)."""

    def _randn(self, *shape: int) -> Tensor:
        """Seeded Gaussian conditioning (drawn in order, so every run gets the same)."""
        return torch.randn(*shape, generator=self._generator).to(self.device, self.dtype)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one batch of model input."""
        return (self.batch, self.channels, self.latent_size, self.latent_size)

    @property
    def tokens(self) -> int:
        """Image tokens at the model's full resolution."""
        return self.latent_size**2

    def describe(self) -> str:
        return (
            f"{self.size} px ({self.latent_size} x {self.latent_size} latent, "
            f"{self.tokens} tokens at full resolution), batch {self.batch}"
        )

    @abstractmethod
    def scheduler(self) -> Any:
        """A fresh scheduler of the family's sampling run."""

    def _set_timesteps(self, scheduler: Any, steps: int) -> None:
        scheduler.set_timesteps(steps)

    def timing_timesteps(self, count: int) -> list[int | float]:
        """The first ``count`` timesteps of the family's sampling run (consecutive denoising
        steps, so plan caches behave as in a real generation)."""
        scheduler = self.scheduler()
        self._set_timesteps(scheduler, self.timing_steps)
        steps = [_as_number(t) for t in scheduler.timesteps]
        return [steps[i % len(steps)] for i in range(count)]

    def as_passed(
        self, timestep: int | float, dtype: torch.dtype = torch.long, scale: float = 1.0
    ) -> Tensor | None:
        """``timestep * scale`` as a pipeline passes a step of its sampling run: an element of
        the schedule tensor on the device (``for t in scheduler.timesteps``), which tokenmerge
        places without reading the device; None for a timestep outside the timed run."""
        key = (dtype, scale)
        if key not in self._schedules:
            values = self.timing_timesteps(self.timing_steps)
            schedule = torch.tensor([v * scale for v in values], dtype=dtype, device=self.device)
            self._schedules[key] = ({v: i for i, v in enumerate(values)}, schedule)
        index, schedule = self._schedules[key]
        return schedule[index[timestep]] if timestep in index else None

    def noise(self, seed_offset: int = 0) -> Tensor:
        """Gaussian noise the shape of one batch of model input."""
        generator = torch.Generator().manual_seed(self.seed + 1 + seed_offset)
        return torch.randn(self.sample_shape, generator=generator).to(self.device, self.dtype)

    def clean_photo(self, photo: str) -> Tensor:
        """A batch of the photograph's latent, laid out as the model's input."""
        clean = photo_latent(photo, self.channels, self.latent_size).to(self.device, self.dtype)
        return clean.expand(self.batch, -1, -1, -1)

    def noisy_photo(self, photo: str, timestep: int | float, seed_offset: int = 0) -> Tensor:
        """A batch of the photograph's latent noised to ``timestep`` (the forward process)."""
        clean, noise = self.clean_photo(photo), self.noise(seed_offset)
        return self.scheduler().add_noise(clean, noise, torch.tensor([int(timestep)]))

    @abstractmethod
    def __call__(self, model: nn.Module, sample: Tensor, timestep: int | float) -> Tensor:
        """One denoising call: the model's prediction for ``sample`` at ``timestep``."""

    def trajectory(
        self, model: nn.Module, steps: int, before_step: Callable[[int], Any] | None = None
    ) -> Tensor:
        """A ``steps``-step sampling run (``sampler``) from seeded noise; the final latent.

        ``before_step(index)`` (optional) is called before every model call.
        """
        scheduler = self.scheduler()
        self._set_timesteps(scheduler, steps)
        # flow matching starts from plain noise (its schedulers have no init_noise_sigma)
        latent = self.noise(seed_offset=1000) * getattr(scheduler, "init_noise_sigma", 1.0)
        for index, timestep in enumerate(scheduler.timesteps):
            if before_step is not None:
                before_step(index)
            prediction = self(model, latent, _as_number(timestep))
            latent = scheduler.step(prediction, timestep, latent).prev_sample
        return latent

    @abstractmethod
    def block_names(self, model: nn.Module) -> list[str]:
        """Every transformer block of the model (where attention runs), in model order."""


class UNetWorkload(Workload):
    """Inputs and calls of a diffusers ``UNet2DConditionModel``.

    The prompt embeddings are seeded Gaussian noise (no text encoder); SDXL's pooled text
    embedding and size conditioning are filled in when the model asks for them.

    Example:
        >>> from tokenmerge_bench.presets import get_preset
        >>> unet = get_preset("tiny-unet").build_empty()
        >>> UNetWorkload(unet, 128, 2, torch.device("cpu"), torch.float32).describe()
        '128 px (16 x 16 latent, 256 tokens at full resolution), batch 2'
    """

    def _condition(self, model: nn.Module) -> None:
        size, batch, device, dtype = self.size, self.batch, self.device, self.dtype
        config = self.config
        prompt = self._randn(batch, PROMPT_TOKENS, config.cross_attention_dim)
        self.kwargs["encoder_hidden_states"] = prompt
        if config.addition_embed_type == "text_time":  # SDXL: pooled text + size conditioning
            pooled = config.projection_class_embeddings_input_dim - 6 * (
                config.addition_time_embed_dim
            )
            self.kwargs["added_cond_kwargs"] = {
                "text_embeds": self._randn(batch, pooled),
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

    def scheduler(self) -> Any:
        """A fresh DDIM scheduler with Stable Diffusion's training schedule."""
        return _diffusers().DDIMScheduler(
            num_train_timesteps=TRAIN_TIMESTEPS,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )

    def __call__(self, model: nn.Module, sample: Tensor, timestep: int | float) -> Tensor:
        """One denoising call: the predicted noise (or v) for ``sample`` at ``timestep``."""
        passed = self.as_passed(timestep)
        return model(sample, timestep if passed is None else passed, **self.kwargs).sample

    def block_names(self, model: nn.Module) -> list[str]:
        """Every spatial transformer block (where attention runs), in model order."""
        block = _diffusers().models.attention.BasicTransformerBlock
        return [name for name, module in model.named_modules() if isinstance(module, block)]


class _TransformerWorkload(Workload):
    """A DiT-style transformer: the latent is cut into ``patch x patch`` tokens on one grid."""

    #: prompt tokens and the attention they enter ("cross" or "joint"); 0: no text
    text_tokens = 0
    text_attention = "cross"
    #: the list attributes of the model that hold its blocks, in model order
    block_lists: tuple[str, ...] = ("transformer_blocks",)

    @property
    def patch(self) -> int:
        """Latent pixels per token side."""
        return self._patch(self.config)

    @property
    def pixels_per_token(self) -> int:
        return VAE_SCALE * self.patch

    @property
    def grid(self) -> int:
        """Image tokens per side."""
        return self.latent_size // self.patch

    @staticmethod
    def _patch(config: Any) -> int:
        return config.patch_size

    @property
    def tokens(self) -> int:
        return self.grid**2

    def describe(self) -> str:
        text = ""
        if self.text_tokens:
            where = "in joint attention" if self.text_attention == "joint" else "cross-attended"
            text = f", {self.text_tokens} text tokens {where}"
        return (
            f"{self.size} px ({self.latent_size} x {self.latent_size} latent, patch "
            f"{self.patch}: {self.grid} x {self.grid} = {self.tokens} image tokens{text}), "
            f"batch {self.batch}"
        )

    def _timesteps(
        self, timestep: int | float, dtype: torch.dtype = torch.long, scale: float = 1.0
    ) -> Tensor:
        """``timestep * scale`` for every sample, as the family's pipeline passes it (a step of
        the schedule expanded over the batch)."""
        passed = self.as_passed(timestep, dtype, scale)
        if passed is not None:
            return passed.expand(self.batch)
        return torch.full((self.batch,), timestep * scale, device=self.device, dtype=dtype)

    def block_names(self, model: nn.Module) -> list[str]:
        return [
            f"{attribute}.{index}"
            for attribute in self.block_lists
            for index in range(len(getattr(model, attribute, ())))
        ]


class _LearnedSigmaWorkload(_TransformerWorkload):
    """DiT and PixArt-alpha: DDPM on linear betas 1e-4..0.02 (their schedulers' defaults), and
    an output that may stack a learned variance under the noise prediction."""

    def scheduler(self) -> Any:
        """A fresh DDIM scheduler on the DiT / PixArt training schedule."""
        return _diffusers().DDIMScheduler(
            num_train_timesteps=TRAIN_TIMESTEPS,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            clip_sample=False,
        )

    def _noise_prediction(self, output: Tensor) -> Tensor:
        # out_channels = 2 x in_channels: noise, then the variance interpolation (learned
        # sigma), which neither DDIM nor the fidelity figures use
        return output[:, : self.channels]


class DiTWorkload(_LearnedSigmaWorkload):
    """Inputs and calls of a diffusers ``DiTTransformer2DModel``: seeded ImageNet class labels.

    Example:
        >>> from tokenmerge_bench.presets import get_preset
        >>> dit = get_preset("tiny-dit").build_empty()
        >>> workload = DiTWorkload(dit, 256, 2, torch.device("cpu"), torch.float32)
        >>> workload.describe()
        '256 px (32 x 32 latent, patch 2: 16 x 16 = 256 image tokens), batch 2'
        >>> workload.kwargs["class_labels"].shape
        torch.Size([2])
    """

    def _condition(self, model: nn.Module) -> None:
        batch, device = self.batch, self.device
        classes = self.config.num_embeds_ada_norm
        labels = torch.randint(0, classes, (batch,), generator=self._generator)
        self.kwargs["class_labels"] = labels.to(device)

    def __call__(self, model: nn.Module, sample: Tensor, timestep: int | float) -> Tensor:
        """One denoising call: the predicted noise for ``sample`` at ``timestep``."""
        output = model(sample, timestep=self._timesteps(timestep), **self.kwargs).sample
        return self._noise_prediction(output)


class ReferenceDenoiserWorkload(DiTWorkload):
    """Inputs and calls of tokenmerge's reference denoiser (``tokenmerge_bench.reference``), a small
    DiT: images folded 4 x 4 pixels per token (no VAE), its only class label, the linear DDPM
    schedule it was trained with, and photographs from its own set (by default the three it
    never saw).

    Example:
        >>> from tokenmerge_bench.presets import get_preset
        >>> dit = get_preset("reference-denoiser").build_empty()
        >>> cpu = torch.device("cpu")
        >>> ReferenceDenoiserWorkload(dit, 64, 2, cpu, torch.float32).describe()
        '64 px (16 x 16 latent, patch 1: 16 x 16 = 256 image tokens), batch 2'
    """

    pixels_per_token = 4
    default_photos = DENOISER_HELD_OUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latent_size = self.size // self.pixels_per_token

    def _condition(self, model: nn.Module) -> None:
        from tokenmerge_bench.reference.models import class_condition

        self.kwargs["class_labels"] = class_condition(self.batch, self.device)

    def scheduler(self) -> Any:
        """A fresh DDIM scheduler with the model's training schedule."""
        from tokenmerge_bench.reference.models import NOISE_SCHEDULE

        return _diffusers().DDIMScheduler(**NOISE_SCHEDULE)

    def clean_photo(self, photo: str) -> Tensor:
        """A batch of one of the reference photographs (the whole of it), folded into tokens."""
        from tokenmerge_bench.reference.models import fold

        image = self._at_size(reference_photo(photo)[None])
        return fold(image).to(self.device, self.dtype).expand(self.batch, -1, -1, -1)

    def held_out(self) -> Tensor:
        """The model's held-out images (``denoiser_held_out``) at the workload's size."""
        return self._at_size(denoiser_held_out(load_photo_set()))

    def _at_size(self, images: Tensor) -> Tensor:
        """``images (n, 3, h, w)`` resized to the workload's size (antialiased) when they differ."""
        if images.shape[-1] == self.size:
            return images
        return F.interpolate(images, size=self.size, mode="bilinear", antialias=True)

    def to_images(self, latent: Tensor) -> Tensor:
        """Model inputs back to images in [0, 1]."""
        from tokenmerge_bench.reference.models import unfold

        return unfold(latent.float()).add(1.0).div(2.0).clamp(0.0, 1.0)


class PixArtWorkload(_LearnedSigmaWorkload):
    """Inputs and calls of a diffusers ``PixArtTransformer2DModel`` (PixArt-alpha / sigma).

    The prompt is 120 seeded Gaussian T5 embeddings (the pipeline's default length); the
    resolution and aspect-ratio conditioning is filled in for the models that use it (the
    1024 px multi-aspect ones).
    """

    text_tokens = 120

    def _condition(self, model: nn.Module) -> None:
        size, batch, device, dtype = self.size, self.batch, self.device, self.dtype
        width = self.config.caption_channels or self.config.cross_attention_dim
        self.kwargs["encoder_hidden_states"] = self._randn(batch, self.text_tokens, width)
        conditions: dict[str, Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if getattr(model, "use_additional_conditions", False):
            conditions = {
                "resolution": torch.tensor([[size, size]] * batch).to(device, dtype),
                "aspect_ratio": torch.tensor([[1.0]] * batch).to(device, dtype),
            }
        self.kwargs["added_cond_kwargs"] = conditions

    def __call__(self, model: nn.Module, sample: Tensor, timestep: int | float) -> Tensor:
        """One denoising call: the predicted noise for ``sample`` at ``timestep``."""
        output = model(sample, timestep=self._timesteps(timestep), **self.kwargs).sample
        return self._noise_prediction(output)


class _FlowMatchWorkload(_TransformerWorkload):
    """Rectified flow: ``x_t = (1 - s) x_0 + s noise`` at ``s = t / 1000``, sampled with Euler."""

    sampler = "Euler (flow matching)"
    timing_steps = FLOW_TIMING_STEPS
    text_attention = "joint"
    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def noisy_photo(self, photo: str, timestep: int | float, seed_offset: int = 0) -> Tensor:
        """A batch of the photograph's latent moved ``timestep / 1000`` of the way to noise."""
        s = float(timestep) / TRAIN_TIMESTEPS
        return (1.0 - s) * self.clean_photo(photo) + s * self.noise(seed_offset)


class SD3Workload(_FlowMatchWorkload):
    """Inputs and calls of a diffusers ``SD3Transformer2DModel`` (SD 3 and 3.5).

    The prompt is 333 seeded Gaussian embeddings (CLIP's 77 tokens and T5's 256, the pipeline's
    default) and a pooled CLIP embedding; the schedule is SD3's, shifted by 3.
    """

    text_tokens = PROMPT_TOKENS + 256

    def _condition(self, model: nn.Module) -> None:
        size, batch = self.size, self.batch
        config = self.config
        largest = config.pos_embed_max_size
        if largest is not None and self.grid > largest:
            raise InputError(
                f"image size {size} px is too large for this SD3 model: its position table "
                f"covers {largest} x {largest} tokens, at most "
                f"{largest * self.pixels_per_token} px"
            )
        self.kwargs["encoder_hidden_states"] = self._randn(
            batch, self.text_tokens, config.joint_attention_dim
        )
        self.kwargs["pooled_projections"] = self._randn(batch, config.pooled_projection_dim)

    def scheduler(self) -> Any:
        """A fresh flow-matching Euler scheduler with SD3's shift of 3."""
        return _diffusers().FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=TRAIN_TIMESTEPS, shift=3.0
        )

    def __call__(self, model: nn.Module, sample: Tensor, timestep: int | float) -> Tensor:
        """One denoising call: the predicted velocity for ``sample`` at ``timestep``."""
        timesteps = self._timesteps(timestep, torch.float32)
        return model(sample, timestep=timesteps, **self.kwargs).sample


class FluxWorkload(_FlowMatchWorkload):
    """Inputs and calls of a diffusers ``FluxTransformer2DModel`` (FLUX.1).

    Latents have 16 channels, each 2 x 2 patch packed into one 64-wide token, row-major; the
    positions are ``img_ids`` ``[0, row, column]`` per token and zero ``txt_ids``. The prompt is
    512 seeded Gaussian T5 embeddings (FLUX.1-dev's pipeline default) and a pooled CLIP
    embedding; guidance is 3.5 for guidance-distilled models; the schedule is shifted by the
    image's token count, as FLUX.1's pipeline does.

    Example:
        >>> from tokenmerge_bench.presets import get_preset
        >>> flux = get_preset("tiny-flux").build_empty()
        >>> workload = FluxWorkload(flux, 256, 1, torch.device("cpu"), torch.float32)
        >>> workload.sample_shape, workload.kwargs["img_ids"][:3].tolist()
        ((1, 256, 64), [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    """

    text_tokens = 512
    #: FLUX.1's VAE latent channels, before 2 x 2 packing
    latent_channels = 16
    guidance_scale = 3.5

    def _condition(self, model: nn.Module) -> None:
        batch, device, dtype = self.batch, self.device, self.dtype
        config = self.config
        packed = self.latent_channels * self.patch**2
        if config.in_channels != packed:
            raise UnsupportedModelError(
                f"tokenmerge bench feeds FLUX.1 text-to-image transformers, whose input is "
                f"{self.latent_channels} latent channels packed 2 x 2 ({packed} wide); this one "
                f"takes {config.in_channels} (an image-conditioned variant such as Fill or "
                "Canny); use tokenmerge.apply() on it directly"
            )
        self.channels = self.latent_channels
        self.kwargs["encoder_hidden_states"] = self._randn(
            batch, self.text_tokens, config.joint_attention_dim
        )
        self.kwargs["pooled_projections"] = self._randn(batch, config.pooled_projection_dim)
        rows, cols = torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij")
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        self.kwargs["img_ids"] = ids.to(device, dtype)
        self.kwargs["txt_ids"] = torch.zeros(self.text_tokens, 3).to(device, dtype)
        if config.guidance_embeds:
            self.kwargs["guidance"] = torch.full((batch,), self.guidance_scale).to(device)

    @staticmethod
    def _patch(config: Any) -> int:
        return 2  # the pipeline packs 2 x 2 latent pixels into a token (config.patch_size is 1)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.batch, self.tokens, self.latent_channels * self.patch**2)

    def pack(self, latent: Tensor) -> Tensor:
        """``(B, 16, H, W)`` latents as ``(B, H/2 * W/2, 64)`` tokens, row-major."""
        b, c, h, w = latent.shape
        p = self.patch
        tokens = latent.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return tokens.reshape(b, (h // p) * (w // p), c * p * p)

    def clean_photo(self, photo: str) -> Tensor:
        return self.pack(super().clean_photo(photo))

    def scheduler(self) -> Any:
        """A fresh flow-matching Euler scheduler with FLUX.1's resolution-dependent shift."""
        return _diffusers().FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=TRAIN_TIMESTEPS,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )

    def _set_timesteps(self, scheduler: Any, steps: int) -> None:
        # the shift grows linearly with the image's token count, from base_shift at 256 tokens
        # to max_shift at 4096 (FLUX.1's pipeline), over evenly spaced sigmas from 1 to 1/steps
        config = scheduler.config
        slope = (config.max_shift - config.base_shift) / (
            config.max_image_seq_len - config.base_image_seq_len
        )
        mu = config.base_shift + slope * (self.tokens - config.base_image_seq_len)
        sigmas = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)

    def __call__(self, model: nn.Module, sample: Tensor, timestep: int | float) -> Tensor:
        """One denoising call: the predicted velocity for the packed ``sample`` at ``timestep``
        (passed as ``timestep / 1000``: the model scales it back itself)."""
        # FLUX.1's pipeline divides the step by 1000 itself; tokenmerge then places it by the
        # pipeline's current step (apply(pipeline)), as it places this view of a scaled schedule
        timesteps = self._timesteps(timestep, self.dtype, 1 / TRAIN_TIMESTEPS)
        return model(sample, timestep=timesteps, **self.kwargs).sample


#: model class name -> its workload (a subclass of one of these classes gets its workload)
WORKLOADS: dict[str, type[Workload]] = {
    "UNet2DConditionModel": UNetWorkload,
    "DiTTransformer2DModel": DiTWorkload,
    "PixArtTransformer2DModel": PixArtWorkload,
    "SD3Transformer2DModel": SD3Workload,
    "FluxTransformer2DModel": FluxWorkload,
}


def _workload_class(model: nn.Module) -> type[Workload] | None:
    for cls in type(model).__mro__:
        if cls.__name__ in WORKLOADS:
            return WORKLOADS[cls.__name__]
    return None


def default_size(model: nn.Module) -> int:
    """The image size in pixels ``model`` was configured for (its ``sample_size`` latent), or
    1024 for a model that does not say (FLUX.1).

    Example:
        >>> from tokenmerge_bench.presets import get_preset
        >>> default_size(get_preset("tiny-unet").build_empty())
        128
    """
    sample_size = getattr(getattr(model, "config", None), "sample_size", None)
    if isinstance(sample_size, int):
        return sample_size * VAE_SCALE
    if isinstance(sample_size, (tuple, list)) and sample_size:
        return int(sample_size[0]) * VAE_SCALE
    return 1024


def make_workload(
    model: nn.Module,
    size: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    reference: str | None = None,
) -> Workload:
    """The workload for ``model`` (``reference="denoiser"``: the reference denoiser's); a clear
    error for a model the bench cannot feed yet."""
    cls = ReferenceDenoiserWorkload if reference == "denoiser" else _workload_class(model)
    if cls is None:
        raise UnsupportedModelError(
            f"cannot run a {type(model).__name__} yet: denoising workloads exist for diffusers' "
            f"{', '.join(WORKLOADS)}, and tokenmerge bench measures timm / transformers "
            "vision transformers as classifiers (tokenmerge visualize draws on denoisers "
            "only). Use tokenmerge.apply() on this model directly"
        )
    return cls(model, size, batch, device, dtype, seed)
