"""What the reference models are measured by: held-out denoising loss, held-out accuracy, and
the entropy of their self-attention (is there anything for merging to lose?)."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import NOISE_SCHEDULE, class_condition, fold

__all__ = [
    "EVAL_TIMESTEPS",
    "accuracy",
    "add_noise",
    "attention_entropy",
    "denoising_losses",
    "loss_increase",
    "predictions",
]

#: the held-out loss sweep: the 50 timesteps of a 50-step DDIM generation (980, 960, ..., 0), one
#: call each from noisy to clean, so merging's plan caches work as they would in a generation
EVAL_TIMESTEPS = tuple(range(980, -1, -20))


@functools.cache
def _forward_process() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE_SCHEDULE)


def add_noise(clean: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """The forward process of ``NOISE_SCHEDULE`` (diffusers' ``DDPMScheduler.add_noise``)."""
    return _forward_process().add_noise(clean, noise, timesteps)


@torch.no_grad()
def denoising_losses(
    denoiser: nn.Module,
    images: Tensor,
    timesteps: tuple[int, ...] = EVAL_TIMESTEPS,
    seed: int = 0,
) -> dict[int, float]:
    """The held-out noise-prediction loss (mean squared error) at each timestep: all ``images``
    in one call per timestep, noised with one seeded draw of noise (the same for every
    timestep and every model measured).

    Example:
        >>> from tokenmerge_bench.reference import (
        ...     denoiser_held_out, load_denoiser, load_photo_set
        ... )
        >>> held_out = denoiser_held_out(load_photo_set())
        >>> losses = denoising_losses(load_denoiser(), held_out)
        >>> list(losses) == list(EVAL_TIMESTEPS)
        True
    """
    parameter = next(denoiser.parameters())
    device, dtype = parameter.device, parameter.dtype
    clean = fold(images).to(device, dtype)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean.shape, generator=generator).to(device, dtype)
    labels = class_condition(len(clean), device)
    losses = {}
    for timestep in timesteps:
        steps = torch.full((len(clean),), timestep, device=device)
        noisy = add_noise(clean, noise, steps)
        predicted = denoiser(noisy, timestep=steps, class_labels=labels).sample
        losses[timestep] = float(F.mse_loss(predicted.float(), noise.float()))
    return losses


def loss_increase(
    losses: dict[int, float], baseline: dict[int, float], low: int = 0, high: int = 999
) -> float:
    """How much higher ``losses`` are than ``baseline``'s, in %: the mean over the timesteps in
    ``[low, high]`` of each timestep's ratio, minus one. Every timestep counts the same: the
    plain mean of the losses would be half made of the last few steps, where the noise to
    predict is a hundredth of the image and no model predicts it (loss near 1 at t = 0).

    Example:
        >>> loss_increase({900: 0.02, 100: 0.5}, {900: 0.01, 100: 0.5})
        50.0
    """
    ratios = [losses[t] / baseline[t] for t in baseline if low <= int(t) <= high]
    return 100.0 * (sum(ratios) / len(ratios) - 1.0)


@torch.no_grad()
def predictions(classifier: nn.Module, crops: Tensor, batch: int = 128) -> Tensor:
    """The classifier's top-1 class for each crop (crops in [-1, 1])."""
    parameter = next(classifier.parameters())
    out = [
        classifier(crops[start : start + batch].to(parameter.device, parameter.dtype)).argmax(-1)
        for start in range(0, len(crops), batch)
    ]
    return torch.cat(out).cpu()


def accuracy(classifier: nn.Module, crops: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy on ``crops`` (a fraction)."""
    return float((predictions(classifier, crops) == labels).float().mean())


@torch.no_grad()
def attention_entropy(model: nn.Module, run) -> dict[str, tuple[float, int]]:
    """Mean entropy (nats) of every self-attention's attention rows while ``run()`` calls the
    model, and the number of keys ``N`` it attends over: ``{module name: (entropy, N)}``.

    Covers diffusers' ``Attention`` used as self-attention (``attn1``) and timm's ``Attention``
    (a fused ``qkv``); the rows are recomputed from the module's own projections, so nothing
    about the model changes. Uniform attention has entropy ``log N``.
    """
    sums: dict[str, list[float]] = {}
    handles = []
    for name, module in model.named_modules():
        rows = _entropy_reader(module)
        if rows is None:
            continue

        def hook(module, args, kwargs, output, name=name, rows=rows):
            x = args[0] if args else kwargs["hidden_states"]
            if rows is _flux_rows:
                context, rotary = kwargs.get("encoder_hidden_states"), kwargs["image_rotary_emb"]
                entropy, keys = rows(module, x, context, rotary)
            else:
                entropy, keys = rows(module, x)
            total = sums.setdefault(name, [0.0, 0.0, keys])
            total[0] += float(entropy.sum())
            total[1] += entropy.numel()

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / count, int(keys)) for name, (total, count, keys) in sums.items()}


def _row_entropy(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """Entropy of ``softmax(q k^T * scale)`` per row: ``(B, heads, N)``."""
    logits = (query.float() @ key.float().transpose(-1, -2)) * scale
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def _entropy_reader(module: nn.Module):
    """A function computing the attention-row entropy of ``module`` on its input, or None when
    it is not a self-attention this knows."""
    if type(module).__name__ == "FluxAttention":
        return _flux_rows
    if type(module).__name__ == "Attention" and hasattr(module, "to_q"):
        if getattr(module, "is_cross_attention", False):
            return None

        def diffusers_rows(module, x):
            batch, tokens = x.shape[0], x.shape[1]
            heads = module.heads

            def split(t):
                return t.view(batch, tokens, heads, -1).transpose(1, 2)

            query, key = split(module.to_q(x)), split(module.to_k(x))
            return _row_entropy(query, key, module.scale), tokens

        return diffusers_rows
    if type(module).__name__ == "Attention" and hasattr(module, "qkv"):

        def timm_rows(module, x):
            batch, tokens, _ = x.shape
            qkv = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, -1)
            query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            query, key = module.q_norm(query), module.k_norm(key)
            return _row_entropy(query, key, module.scale), tokens

        return timm_rows
    return None


def _flux_rows(module: nn.Module, x: Tensor, context: Tensor | None = None, rotary=None):
    """Attention-row entropy of a diffusers ``FluxAttention``: the text tokens (double-stream
    blocks: ``context``) first, normalised queries and keys, rotary positions applied."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(t: Tensor) -> Tensor:
        return t.unflatten(-1, (module.heads, -1))

    query, key = module.norm_q(heads(module.to_q(x))), module.norm_k(heads(module.to_k(x)))
    if context is not None:
        query = torch.cat([module.norm_added_q(heads(module.add_q_proj(context))), query], 1)
        key = torch.cat([module.norm_added_k(heads(module.add_k_proj(context))), key], 1)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    scale = query.shape[-1] ** -0.5
    return _row_entropy(query.transpose(1, 2), key.transpose(1, 2), scale), key.shape[1]
