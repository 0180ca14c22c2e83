"""Tiny random-weight diffusers pipelines of the DiT family, for CPU tests (seconds).

Nothing can be downloaded here, so every pipeline is built from configs: no tokenizer files, no
text encoders (prompts go in as embeddings), a tiny ``AutoencoderKL`` with the real 8x spatial
factor (so the pipelines' pixel-size arithmetic is the real one) that only DiT ever runs.

Image token grids at the transformer (rows x columns), chosen so every grid has at least 8 x 8
tokens and three of the four are not square:

============  ==========  ================  ==========  ===================================
family        pixels      latent            tokens      text tokens beside the image
============  ==========  ================  ==========  ===================================
DiT           128 x 128   4 x 16 x 16       8 x 8       none (class label)
PixArt-alpha  192 x 128   4 x 24 x 16       12 x 8      cross-attention (``attn2``) only
SD3 / SD3.5   128 x 192   16 x 16 x 24      8 x 12      joint attention (``attn``), separate
Flux          160 x 128   16 x 20 x 16      10 x 8      text first in the joint sequence
============  ==========  ================  ==========  ===================================

Use::

    pipe = make_sd3(dual_attention=True)
    latents = run(pipe, steps=2, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

HEADS = 2
HEAD_DIM = 16
WIDTH = HEADS * HEAD_DIM  # the transformers' inner width
TEXT_DIM = 32  # width of the (absent) text encoders' hidden states
POOLED_DIM = 16  # width of the pooled text embedding (SD3, Flux)
TEXT_TOKENS = 6  # prompt length handed to the pipelines

# pixel sizes (height, width) and the image token grid (rows, columns) each family's transformer
# sees at that size: pixels / 8 (VAE) / 2 (patch, or Flux's 2 x 2 packing)
DIT_SIZE = (128, 128)  # DiT only generates squares of transformer.config.sample_size latents
PIXART_SIZE = (192, 128)
SD3_SIZE = (128, 192)
FLUX_SIZE = (160, 128)
GRIDS: dict[type, tuple[int, int]] = {
    DiTPipeline: (8, 8),
    PixArtAlphaPipeline: (12, 8),
    StableDiffusion3Pipeline: (8, 12),
    FluxPipeline: (10, 8),
}

# DiT's pipeline hard-codes class 1000 as the unconditional label, so the class table needs the
# real 1000 classes (+1 for the null class): only 1001 x WIDTH floats
DIT_CLASSES = 1000


def tiny_vae(latent_channels: int = 4, seed: int = 0, **config) -> AutoencoderKL:
    """A random-weight ``AutoencoderKL`` with four levels, so the pipelines derive the real
    ``vae_scale_factor`` of 8 from ``len(block_out_channels)``, at 8 channels per level.

    Args:
        latent_channels: 4 (DiT, PixArt) or 16 (SD3, Flux).
        seed: seeds the weights.
        **config: more ``AutoencoderKL`` config, e.g. ``shift_factor``.

    Returns:
        The VAE in eval mode.
    """
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        **config,
    ).eval()


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    # every pipeline here draws a tqdm bar per call otherwise, which floods the test log
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_dit(seed: int = 0, layers: int = 2) -> DiTPipeline:
    """A ``DiTPipeline``: class-conditional ``DiTTransformer2DModel`` (DiT-XL/2's block layout:
    ``BasicTransformerBlock`` with ``ada_norm_zero``, self-attention ``attn1`` and ``ff``, no
    cross-attention) on 16 x 16 latents, a DDIM scheduler, and a 4-class ``id2label``.

    Quirks of ``DiTPipeline`` in diffusers 0.42: it takes no ``latents``, ``height`` or ``width``
    (it always samples ``sample_size`` x ``sample_size`` latents from ``generator``), has no
    ``output_type="latent"`` (it always decodes with the VAE, which is why the VAE must be real),
    always runs classifier-free guidance as one batch of 2 per image when ``guidance_scale > 1``,
    and uses class id 1000 as the null class whatever the model's class count. It predicts a
    learned sigma (``out_channels = 2 * in_channels``), as DiT-XL/2 does.

    Args:
        seed: seeds every weight.
        layers: number of transformer blocks.

    Returns:
        The pipeline, progress bar off.
    """
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=DIT_SIZE[0] // 8,
        patch_size=2,
        num_embeds_ada_norm=DIT_CLASSES,
    ).eval()
    pipe = DiTPipeline(
        transformer=transformer,
        vae=tiny_vae(4, seed=seed),
        scheduler=DDIMScheduler(),
        id2label={0: "tench, Tinca tinca", 1: "goldfish", 2: "white shark", 3: "umbrella"},
    )
    return _finish(pipe)


def make_pixart(seed: int = 0, layers: int = 2) -> PixArtAlphaPipeline:
    """A ``PixArtAlphaPipeline``: ``PixArtTransformer2DModel`` (``BasicTransformerBlock`` with
    ``ada_norm_single``: self-attention ``attn1``, cross-attention ``attn2`` to the T5 tokens,
    ``ff``), DPM-Solver++ (PixArt's own scheduler), no tokenizer or text encoder.

    Quirks: ``use_resolution_binning`` must be off at call time (it only knows ``sample_size``
    32 / 64 / 128 and raises "Invalid sample size" otherwise; with those sizes it would snap the
    requested size to its aspect-ratio bins); ``prompt_embeds`` need ``prompt_attention_mask``
    and negative embeddings need their mask too; ``negative_prompt`` defaults to ``""``, which
    ``check_inputs`` refuses beside ``negative_prompt_embeds``, so pass ``negative_prompt=None``;
    height and width must be multiples of 8. With ``sample_size`` != 128 the resolution /
    aspect-ratio micro-conditions are off (as in PixArt-alpha 256 / 512). With
    ``num_inference_steps=1`` it takes ``scheduler.step(...)[1]`` (the predicted clean sample),
    which DPM-Solver's step does not return (IndexError): run at least 2 steps.

    Args:
        seed: seeds every weight.
        layers: number of transformer blocks.

    Returns:
        The pipeline, progress bar off.
    """
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=WIDTH,
        caption_channels=TEXT_DIM,
        sample_size=16,
        patch_size=2,
    ).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(4, seed=seed),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _finish(pipe)


def make_sd3(
    seed: int = 0, layers: int = 2, dual_attention: bool = False
) -> StableDiffusion3Pipeline:
    """A ``StableDiffusion3Pipeline``: ``SD3Transformer2DModel`` (MMDiT ``JointTransformerBlock``s:
    joint attention ``attn`` over image + text, image ``ff``, text ``ff_context``; the last block
    is ``context_pre_only``), a flow-matching Euler scheduler with SD3's ``shift=3``, no
    tokenizers or text encoders.

    With ``dual_attention=True`` it is SD 3.5 (medium)'s layout: block 0 also has the image-only
    self-attention ``attn2`` (``dual_attention_layers``) and the attention uses RMS ``qk_norm``.

    Quirks: all four embeddings must be given (``prompt_embeds``, ``pooled_prompt_embeds`` and the
    two negatives) or it reaches for the absent tokenizers; height and width must be multiples of
    ``vae_scale_factor * patch_size`` (16); ``pos_embed_max_size`` bounds the grid (16 here) since
    SD3 crops a fixed position table; the VAE needs a ``shift_factor`` (SD3 uses 0.0609), which
    ``AutoencoderKL`` leaves ``None`` by default, though only decoding reads it.

    Args:
        seed: seeds every weight.
        layers: number of transformer blocks.
        dual_attention: SD 3.5's image-only ``attn2`` in block 0, and ``qk_norm``.

    Returns:
        The pipeline, progress bar off.
    """
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=WIDTH,  # the text stream has the image stream's width
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if dual_attention else (),
        qk_norm="rms_norm" if dual_attention else None,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(16, seed=seed, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return _finish(pipe)


def make_flux(
    seed: int = 0, double_layers: int = 2, single_layers: int = 2, guidance_embeds: bool = True
) -> FluxPipeline:
    """A ``FluxPipeline``: ``FluxTransformer2DModel`` with ``double_layers`` double-stream blocks
    (``FluxTransformerBlock``: joint ``attn`` over image + text with separate projections, image
    ``ff``) and ``single_layers`` single-stream blocks (``FluxSingleTransformerBlock``: text and
    image concatenated, ``attn`` in parallel with ``proj_mlp``, no ``ff``), rotary positions from
    ``img_ids`` / ``txt_ids``, and FLUX.1-dev's dynamically shifted flow-matching scheduler.

    Quirks: ``default_sample_size`` is hard-coded to 128 latents (1024 px), whatever the
    transformer, so always pass height and width (multiples of ``vae_scale_factor * 2`` = 16);
    the latents it takes and returns are packed 2 x 2, ``(B, tokens, 4 * 16)``; the text tokens
    come first in the joint sequence; guidance is distilled into the model (``guidance_embeds``,
    FLUX.1-dev) so one call per step, batch 1, unless ``true_cfg_scale > 1`` with negative
    embeddings, which runs a *second* call per step (not a batch of 2).

    Args:
        seed: seeds every weight.
        double_layers: number of double-stream blocks.
        single_layers: number of single-stream blocks.
        guidance_embeds: FLUX.1-dev's guidance embedding (False: FLUX.1-schnell).

    Returns:
        The pipeline, progress bar off.
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x the 2 x 2 packing
        num_layers=double_layers,
        num_single_layers=single_layers,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # must sum to the head dim
    ).eval()
    scheduler = flux_scheduler()
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(16, seed=seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    return _finish(pipe)


FACTORIES: dict[str, Callable[[], DiffusionPipeline]] = {
    "dit": make_dit,
    "pixart": make_pixart,
    "sd3": make_sd3,
    "sd35": lambda: make_sd3(dual_attention=True),
    "flux": make_flux,
}


def image_grid(pipe: DiffusionPipeline) -> tuple[int, int]:
    """The image token grid (rows, columns) the transformer sees at the default size of
    ``run``."""
    return GRIDS[type(pipe)]


def image_tokens(pipe: DiffusionPipeline) -> int:
    """How many image tokens the transformer sees at the default size of ``run``."""
    rows, columns = image_grid(pipe)
    return rows * columns


def _embeds(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


@torch.no_grad()
def run(
    pipe: DiffusionPipeline, steps: int = 2, seed: int = 0, guidance_scale: float = 4.0, **kwargs
) -> torch.Tensor:
    """Run ``steps`` denoising steps with seeded random prompt embeddings and noise, and return
    the final latents (no VAE decode, except for DiT, whose pipeline cannot skip it).

    Classifier-free guidance is on (``guidance_scale > 1``): DiT, PixArt and SD3 run one batch
    of 2 per step (negative first for PixArt and SD3, conditional first for DiT); Flux uses
    ``guidance_scale`` as its distilled-guidance input and runs one call of batch 1 per step
    (pass ``true_cfg_scale=...`` for a second, negative call).

    Args:
        pipe: a pipeline from one of the factories here.
        steps: number of inference steps (= transformer calls per image and guidance branch);
            at least 2 for PixArt (see ``make_pixart``).
        seed: seeds the noise and the embeddings; the same seed gives bit-identical latents.
        guidance_scale: as the pipelines take it.
        **kwargs: passed on to the pipeline, overriding the defaults built here.

    Returns:
        The latents after the last step: ``(1, C, h, w)`` for DiT, PixArt and SD3, packed
        ``(1, tokens, 64)`` for Flux.
    """
    generator = torch.Generator().manual_seed(seed)
    if isinstance(pipe, DiTPipeline):
        return _run_dit(pipe, steps, generator, guidance_scale, **kwargs)
    arguments: dict = dict(
        num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent"
    )
    if isinstance(pipe, PixArtAlphaPipeline):
        mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
        mask[:, -2:] = 0  # T5 pads to a fixed length: the padding is masked out
        arguments.update(
            prompt_embeds=_embeds(generator, 1, TEXT_TOKENS, TEXT_DIM),
            prompt_attention_mask=mask,
            negative_prompt_embeds=_embeds(generator, 1, TEXT_TOKENS, TEXT_DIM),
            negative_prompt_attention_mask=mask.clone(),
            negative_prompt=None,  # its default "" clashes with negative_prompt_embeds
            height=PIXART_SIZE[0],
            width=PIXART_SIZE[1],
            use_resolution_binning=False,
        )
    elif isinstance(pipe, StableDiffusion3Pipeline):
        arguments.update(
            prompt_embeds=_embeds(generator, 1, TEXT_TOKENS, TEXT_DIM),
            pooled_prompt_embeds=_embeds(generator, 1, POOLED_DIM),
            negative_prompt_embeds=_embeds(generator, 1, TEXT_TOKENS, TEXT_DIM),
            negative_pooled_prompt_embeds=_embeds(generator, 1, POOLED_DIM),
            height=SD3_SIZE[0],
            width=SD3_SIZE[1],
        )
    elif isinstance(pipe, FluxPipeline):
        arguments.update(
            prompt_embeds=_embeds(generator, 1, TEXT_TOKENS, TEXT_DIM),
            pooled_prompt_embeds=_embeds(generator, 1, POOLED_DIM),
            height=FLUX_SIZE[0],
            width=FLUX_SIZE[1],
        )
        if kwargs.get("true_cfg_scale", 1.0) > 1.0:
            arguments.update(
                negative_prompt_embeds=_embeds(generator, 1, TEXT_TOKENS, TEXT_DIM),
                negative_pooled_prompt_embeds=_embeds(generator, 1, POOLED_DIM),
            )
    else:
        raise TypeError(f"no inputs known for {type(pipe).__name__}")
    arguments.update(kwargs)
    return pipe(generator=generator, **arguments).images


def _run_dit(
    pipe: DiTPipeline, steps: int, generator: torch.Generator, guidance_scale: float, **kwargs
) -> torch.Tensor:
    # DiTPipeline always decodes and offers no callback: read the latents where the VAE
    # receives them (post_quant_conv is the decoder's first module) and undo the scaling
    received: list[torch.Tensor] = []
    hook = pipe.vae.post_quant_conv.register_forward_pre_hook(
        lambda module, args: received.append(args[0])
    )
    try:
        pipe(
            # a list: get_label_ids("white shark") looks up each character (list(str))
            class_labels=kwargs.pop("class_labels", pipe.get_label_ids(["white shark"])),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
            **kwargs,
        )
    finally:
        hook.remove()
    (latents,) = received
    return latents * pipe.vae.config.scaling_factor


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler: flow matching, shifted by image size."""
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
