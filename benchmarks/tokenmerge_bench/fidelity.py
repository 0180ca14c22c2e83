"""Fidelity measurements: inputs made from photographs, similarity-based attention, block error.

Random-weight self-attention is nearly uniform (SD 1.5 at 4096 tokens: 8.27 nats of entropy
against a maximum of 8.32), so what merging loses barely shows in it. ``tie_self_attention``
makes every self-attention attend to similar tokens, as trained attention largely does: the key
projection becomes a copy of the query projection and both are scaled (a scale of 3 brought SD
1.5's entropy down to about 2.5 nats). Reports always say which weights a figure used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge_bench.photos import load_photo

__all__ = ["BlockErrorProbe", "photo_latent", "relative_error", "tie_self_attention"]


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``||value - reference|| / ||reference||`` over the whole tensor (float64 norms).

    Example:
        >>> relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
        1.0
    """
    reference = reference.detach().double()
    return float((value.detach().double() - reference).norm() / reference.norm().clamp_min(1e-30))


def photo_latent(name: str, channels: int, size: int, seed: int = 0) -> Tensor:
    """A bundled photograph as a ``(channels, size, size)`` latent with unit standard deviation.

    A stand-in for a VAE encoder (whose weights cannot be downloaded here): the photograph is
    resized to the latent grid and its RGB values projected to the latent channels by a fixed
    seeded matrix. It keeps what merging reacts to - the photograph's edges, textures and flat
    regions at the positions of the latent tokens.

    Example:
        >>> latent = photo_latent("astronaut", channels=4, size=64)
        >>> latent.shape, round(float(latent.std()), 3)
        (torch.Size([4, 64, 64]), 1.0)
    """
    photo = load_photo(name).float() / 127.5 - 1.0
    mode = "area" if size <= photo.shape[-1] else "bilinear"
    pixels = F.interpolate(photo[None], size=(size, size), mode=mode)[0]
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(channels, 3, generator=generator)
    latent = torch.einsum("kc,chw->khw", projection, pixels)
    return (latent - latent.mean()) / latent.std()


def tie_self_attention(model: nn.Module, scale: float) -> int:
    """Make every self-attention attend by similarity: ``to_k = to_q = scale * to_q``.

    A self-attention is a module with ``to_q`` / ``to_k`` (or ``q_proj`` / ``k_proj``) linear
    layers of the same shape that is not marked ``is_cross_attention``, or a timm attention with a
    fused ``qkv`` projection (diffusers' ``Attention``, SD3's joint attention on its
    image stream, ``FluxAttention``). Where queries and keys are normalised per head
    (``norm_q`` / ``norm_k``: FLUX.1, SD 3.5), normalisation would undo a scaled projection, so
    the key norm is tied to the query norm and *its* weight carries the scale: either way the
    attention logits grow by ``scale ** 2``. The weights change in place, so models that share
    them (``sharing_weights``) change too. Returns how many were tied.

    Example:
        >>> from tokenmerge_bench.presets import get_preset
        >>> tie_self_attention(get_preset("tiny-unet").build(), scale=3.0)
        4
    """
    tied = 0
    with torch.no_grad():
        for module in model.modules():
            if _tie_fused(module, scale):
                tied += 1
                continue
            query, key = getattr(module, "to_q", None), getattr(module, "to_k", None)
            if query is None and key is None:  # transformers' naming
                query, key = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
            if not (isinstance(query, nn.Linear) and isinstance(key, nn.Linear)):
                continue
            if getattr(module, "is_cross_attention", False):
                continue
            if query.weight.shape != key.weight.shape:
                continue
            query_norm, key_norm = _norm_weight(module, "norm_q"), _norm_weight(module, "norm_k")
            normalised = query_norm is not None and key_norm is not None
            _tie(query, key, 1.0 if normalised else scale)
            if normalised:
                query_norm.mul_(scale)
                key_norm.copy_(query_norm)
            tied += 1
    return tied


def _tie_fused(module: nn.Module, scale: float) -> bool:
    """timm's fused ``qkv`` projection (rows: queries, keys, values): tie the key rows."""
    qkv = getattr(module, "qkv", None)
    if not (isinstance(qkv, nn.Linear) and qkv.out_features % 3 == 0):
        return False
    width = qkv.out_features // 3
    query_norm, key_norm = _norm_weight(module, "q_norm"), _norm_weight(module, "k_norm")
    normalised = query_norm is not None and key_norm is not None
    factor = 1.0 if normalised else scale
    qkv.weight[:width].mul_(factor)
    qkv.weight[width : 2 * width].copy_(qkv.weight[:width])
    if qkv.bias is not None:
        qkv.bias[:width].mul_(factor)
        qkv.bias[width : 2 * width].copy_(qkv.bias[:width])
    if normalised:
        query_norm.mul_(scale)
        key_norm.copy_(query_norm)
    return True


def _norm_weight(module: nn.Module, name: str) -> Tensor | None:
    norm = getattr(module, name, None)
    weight = getattr(norm, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def _tie(query: nn.Linear, key: nn.Linear, scale: float) -> None:
    query.weight.mul_(scale)
    key.weight.copy_(query.weight)
    if query.bias is not None and key.bias is not None:
        query.bias.mul_(scale)
        key.bias.copy_(query.bias)


@dataclass
class BlockRecord:
    """Block errors recorded at one block over the probe's calls."""

    errors: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


class BlockErrorProbe:
    """Block error of a merged model: each probed block's output against the exact block run
    on the same input, ``||y_merged - y_exact|| / ||y_exact - x||``.

    The exact block is the module of the same name in ``exact_root`` (a model with the same
    weights and no merging, e.g. the unpatched original of a ``sharing_weights`` copy). Use it as
    a context manager around the merged model's calls; ``errors`` then maps block name to its
    record.

    Blocks that carry two streams (SD3's ``JointTransformerBlock``, FLUX.1's double- and
    single-stream blocks) return ``(text, image)``; the error is that of the image stream, the
    output with the shape of the block's ``hidden_states`` input ``x``.

    Args:
        merged_root: the model with merging applied.
        exact_root: the same model (same weights) without merging.
        names: the blocks to probe (module names, the same in both models).
    """

    def __init__(self, merged_root: nn.Module, exact_root: nn.Module, names: list[str]) -> None:
        self.merged_root = merged_root
        self.exact_root = exact_root
        self.names = names
        self.records: dict[str, BlockRecord] = {name: BlockRecord() for name in names}
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> BlockErrorProbe:
        for name in self.names:
            rerun = _ExactRerun(self.exact_root.get_submodule(name), self.records[name])
            module = self.merged_root.get_submodule(name)
            # the input is taken before any other pre-hook (an adapter merging at the block
            # boundary would otherwise hand us merged tokens), the output after every forward
            # hook (after the unmerge)
            self._handles.append(
                module.register_forward_pre_hook(rerun.capture, with_kwargs=True, prepend=True)
            )
            self._handles.append(module.register_forward_hook(rerun, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _ExactRerun:
    def __init__(self, exact: nn.Module, record: BlockRecord) -> None:
        self.exact = exact
        self.record = record
        self._inputs: tuple[tuple, dict] | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._inputs = (tuple(args), dict(kwargs))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._inputs is not None:
            args, kwargs = self._inputs
            self._inputs = None
        x = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            exact = _image_stream(self.exact(*args, **kwargs), x)
        merged = _image_stream(output, x)
        change = (exact.double() - x.double()).norm().clamp_min(1e-30)
        self.record.errors.append(float((merged.double() - exact.double()).norm() / change))
        self.record.tokens.append(x.shape[1])


def _image_stream(output: Any, x: Tensor) -> Tensor:
    """The image hidden states in a block's output: the output itself, or the element of an
    output tuple with the shape of the block's image input ``x`` (the last such one: diffusers'
    two-stream blocks return ``(text, image)``, and the text may happen to have that shape too).
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        matching = [t for t in output if isinstance(t, Tensor) and t.shape == x.shape]
        if matching:
            return matching[-1]
    shapes = (
        [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in output]
        if isinstance(output, (tuple, list))
        else type(output).__name__
    )
    raise TypeError(
        f"cannot find the image hidden states (shape {tuple(x.shape)}, as the block's input) "
        f"in a block output of {shapes}"
    )
