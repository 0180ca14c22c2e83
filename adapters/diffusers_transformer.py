"""The diffusers transformer adapter: any diffusers image or video transformer, found by what it
is made of rather than by its class (Sana, Wan, Qwen-Image, HunyuanVideo, CogVideoX, ...).

What makes a model one of these: a diffusers ``ModelMixin`` whose blocks (the items of the
``nn.ModuleList`` attributes of the model) hold diffusers attention modules (``Attention`` or
any ``AttentionModuleMixin``), and whose image tokens can be placed on a grid:

- from latents ``(B, C, H, W)`` or video latents ``(B, C, F, H, W)`` / ``(B, F, C, H, W)``
  over the config's patch size (``patch_size``, an int or ``(t, h, w)``, and ``patch_size_t``);
- from ``img_shapes`` (Qwen-Image: ``(frames, rows, cols)`` per image);
- from ``num_frames``, ``height`` and ``width`` (LTX-Video's packed tokens).

Sites are the blocks, in model order (stages: the first, middle and last third). Each site
merges around every attention module of the block whose ``hidden_states`` are exactly the image
tokens (self-attention and joint attention as ``"attn"``, cross-attention as ``"cross_attn"``,
queries only) and, with ``sites.mlp``, around its diffusers ``FeedForward`` modules of the image
stream. Text tokens are never merged: where a joint attention takes them as
``encoder_hidden_states`` they attend to the merged image tokens and come back whole; a module
given text and image tokens in one sequence merges the image part where the order is known
(``TEXT_FIRST_BLOCKS``, ``IMAGE_FIRST_BLOCKS``) and passes through otherwise, counted in
``stats()``. Self-attention
given its own tokens again as ``encoder_hidden_states`` (OmniGen, Lumina) gets the merged tokens
there too.

Positions follow the tokens: every site plans once for the whole batch (``shared_plan``), and at
a merged call every other argument with a token axis of the image's length, rotary tables in
any form (cos / sin pairs, complex frequencies, batched or not) and attention masks alike, is
reduced to the rows of the kept tokens (``token_axes`` says which axis). A kept token is a real
token (a ToMe destination, a ReToM representative), so its position stays exact. An argument over
the call's text and image tokens together is reduced where the processor's order of the two is
known (``JOINT_ORDER``). A call the reduction cannot place passes through with the reason: an
argument spanning text and image tokens in an unknown order, text as long as the image, a table
with two axes of the image's length. Lumina's proportional attention (``base_sequence_length``:
logits scaled by ``sqrt(log(L) / log(base))`` for ``L`` tokens) gets the base that keeps the
whole call's scale.

Value correction (``value_correction``) applies where the attention has a view of its own
(``tokenmerge.adapters._views``); these models' attention classes have none yet, so their
``stats()`` show None.

Video: the grid has frames; every frame is planned on its own (``TokenLayout.frames``), so no
token merges into another frame's token, while attention still spans all frames.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapter import AdapterOptions, SiteCandidate, forward_parameters
from tokenmerge.adapters._diffusers import (
    GridHook,
    TargetGuard,
    TransformerAdapter,
    depth_stage,
    given_arguments,
    value_correction,
)
from tokenmerge.attention_view import processor_name
from tokenmerge.calls import CallValues, PerThread
from tokenmerge.errors import TokenMergeWarning
from tokenmerge.patch import SitePatch
from tokenmerge.plan import Plan
from tokenmerge.site import Site, TokenLayout

__all__ = [
    "IMAGE_FIRST_BLOCKS",
    "JOINT_ORDER",
    "TEXT_FIRST_BLOCKS",
    "DiffusersTransformerAdapter",
    "Keywords",
    "TransformerOptions",
    "is_attention",
    "reduce_tables",
    "takes_rotary",
    "token_axes",
]

#: module-name parts of a block's text stream (``txt_mlp``, ``ff_context``...): never merged
_TEXT_PARTS = ("txt", "text", "context", "encoder", "added")


def _attention_classes() -> tuple[type, ...]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return Attention, AttentionModuleMixin


def _feed_forward() -> type:
    from diffusers.models.attention import FeedForward

    return FeedForward


def _model_mixin() -> type:
    from diffusers.models.modeling_utils import ModelMixin

    return ModelMixin


def is_attention(module: nn.Module) -> bool:
    """A diffusers attention module: ``Attention``, an ``AttentionModuleMixin``, or a class of
    its own built the same way (Mochi's: an ``...Attention`` with ``to_q`` / ``to_k`` / ``to_v``
    and a processor)."""
    if isinstance(module, _attention_classes()):
        return True
    return type(module).__name__.endswith("Attention") and all(
        hasattr(module, name) for name in ("to_q", "to_k", "to_v", "processor")
    )


def model_blocks(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of ``root``: the items of its module lists that hold an attention module."""
    found = []
    for name, child in root.named_children():
        if not isinstance(child, nn.ModuleList):
            continue
        for index, block in enumerate(child):
            if any(is_attention(m) for m in block.modules()):
                found.append((f"{name}.{index}", block))
    return found


def block_targets(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(kind, module)`` of every module a block merges around: its outermost attention
    modules (``"attn"`` or ``"cross_attn"``) and its image-stream ``FeedForward`` (``"mlp"``)."""
    feed_forward = _feed_forward()
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []  # names of the modules found: their descendants are theirs
    for name, module in block.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in inside):
            continue
        if is_attention(module):
            found.append(("cross_attn" if _is_cross(name, module) else "attn", module))
            inside.append(name)
        elif isinstance(module, feed_forward):
            inside.append(name)
            if not any(part in name.lower() for part in _TEXT_PARTS):
                found.append(("mlp", module))
    return found


def takes_rotary(block_class: type) -> bool:
    """Whether a block's forward takes a rotary position table: a parameter named like one
    (``image_rotary_emb``, ``rotary_emb``, ``rope``, ``freqs_cis``: every diffusers block
    with rotary positions names it so).

    Example:
        >>> from diffusers.models.transformers import transformer_wan, sana_transformer
        >>> wan = transformer_wan.WanTransformerBlock
        >>> takes_rotary(wan), takes_rotary(sana_transformer.SanaTransformerBlock)
        (True, False)
    """
    names = [name.lower() for name in forward_parameters(block_class)]
    return any("rotary" in name or "rope" in name or name == "freqs_cis" for name in names)


def _is_cross(name: str, module: nn.Module) -> bool:
    # by its name first: diffusers' is_cross_attention only says that a cross_attention_dim
    # was given, which some self-attention modules are (OmniGen's); joint attention (text
    # through added projections) counts as self-attention
    last = name.rsplit(".", 1)[-1].lower()
    if last in ("attn", "attn1", "self_attn", "attention"):
        return False
    if last == "attn2" or "cross" in last:
        return True
    return bool(getattr(module, "is_cross_attention", False))


def token_axes(name: str, value: Tensor, tokens: int) -> list[int] | None:
    """The axes of argument ``name`` that run over the ``tokens`` image tokens, reduced with
    them at a merged call; None when that cannot be told.

    A mask or a bias (by its name) may have several (queries and keys): each axis of that
    length. Any other tensor, a positional table, has one: the first axis of that length
    other than its last (its features), or its only one; an integer tensor (token positions)
    may have it last. Two such axes are ambiguous.

    Example:
        >>> import torch
        >>> token_axes("rotary_emb", torch.zeros(1, 64, 1, 16), 64)  # Wan's cos or sin
        [1]
        >>> token_axes("attention_mask", torch.zeros(2, 1, 64, 64), 64)
        [2, 3]
        >>> token_axes("image_rotary_emb", torch.zeros(7, 8), 64) is None  # text rows
        False
    """
    shape = value.shape
    if any(part in name for part in ("mask", "bias")):
        return [axis for axis, size in enumerate(shape) if size == tokens]
    positions = not value.is_floating_point() and not value.is_complex()
    candidates = range(value.dim() if positions else max(value.dim() - 1, 1))
    axes = [axis for axis in candidates if shape[axis] == tokens]
    return None if len(axes) > 1 else axes


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in ``value``: itself, or those in its (nested) tuples and lists."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for part in value:
            yield from _tensors(part)


#: blocks whose modules take one sequence of text then image tokens, joined by the model or the
#: block (its text, AuraFlow's registers, OmniGen's time token first): the image tokens merge,
#: the others are protected like a ViT's class token. A block that joins them in another order
#: is not listed: its calls pass through, since where the image rows are is not known; so do
#: calls under a padding mask (``BlockText``), where each sample's image starts elsewhere.
TEXT_FIRST_BLOCKS = frozenset(
    {
        "AuraFlowSingleTransformerBlock",
        "OmniGenBlock",
        # their attention takes the image tokens alone, their MLP the text then the image
        "CogVideoXBlock",
        "CogView3PlusTransformerBlock",
        # its main layers join each caption and the image: text first, the same place in every
        # sample unless a padding mask says the captions differ (such calls pass through)
        "Lumina2TransformerBlock",
    }
)

#: blocks whose modules take one sequence of image then text tokens (HiDream's single-stream
#: blocks, wrapped in a ``HiDreamBlock``): the image tokens merge, the text behind is protected
IMAGE_FIRST_BLOCKS = frozenset({"HiDreamImageSingleTransformerBlock"})


def sequence_order(block: nn.Module) -> str | None:
    """``"text first"`` or ``"image first"`` where a block's modules take text and image tokens
    in one sequence in that order (the block or a block it wraps is listed), else None."""
    names = {type(block).__name__, *(type(m).__name__ for m in block.children())}
    if names & TEXT_FIRST_BLOCKS:
        return "text first"
    return "image first" if names & IMAGE_FIRST_BLOCKS else None


#: the arguments a merged call never reduces: the merged tokens and the text tokens
_NOT_TABLES = frozenset({"hidden_states", "encoder_hidden_states", "norm_encoder_hidden_states"})


class LatentGrid(GridHook):
    """Pre-hook of the model: the image-token grid of this call, ``(frames, rows, cols)``, read
    from its arguments (shapes and Python values only, never a device value). Serves as every
    site's layout: a call whose hidden states are not exactly those tokens has none."""

    def __init__(self, root: nn.Module, frames_span: int = 1) -> None:
        super().__init__()
        self.frames_span = frames_span
        self.warned_span = False
        self.names = forward_parameters(type(root))
        config = root.config
        size = config.get("patch_size", 1) or 1
        sizes = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if len(sizes) == 2:
            sizes = (config.get("patch_size_t", 1) or 1, *sizes)
        self.patch = sizes  # (frames, rows, cols)
        self.in_channels = config.get("in_channels")

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = self.read(given_arguments(self.names, args, kwargs))
        self.calls.value.grid = None if grid is None else self.grouped(grid)

    def grouped(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(groups, span * rows, cols)``: ``span`` consecutive frames planned together, as
        one grid of their rows stacked (tokens are frame-major, so that is their order), with
        ``span`` the largest divisor of the frame count up to ``frames_span``."""
        frames, rows, cols = grid
        span = max(d for d in range(1, min(self.frames_span, frames) + 1) if frames % d == 0)
        if span < self.frames_span and frames > 1 and not self.warned_span:
            self.warned_span = True
            warnings.warn(
                f"frames_span={self.frames_span}: the {frames} latent frames of this call do not "
                f"split into groups of {self.frames_span}; planning groups of {span} frame(s), "
                f"the largest divisor of {frames} up to {self.frames_span}. Choose a "
                f"frames_span that divides the latent frame count (reported once)",
                TokenMergeWarning,
                stacklevel=2,
            )
        return frames // span, rows * span, cols

    def read(self, given: dict[str, Any]) -> tuple[int, int, int] | None:
        """``(frames, rows, cols)`` of this call's image tokens, or None."""
        pt, ph, pw = self.patch
        shapes = given.get("img_shapes")
        if shapes:
            first = shapes[0]
            shape = (
                first[0]
                if isinstance(first, (list, tuple))
                and first
                and isinstance(first[0], (list, tuple))
                else first
            )
            if isinstance(shape, (list, tuple)) and len(shape) == 3:
                return tuple(int(v) for v in shape)  # type: ignore[return-value]
            return None
        frames, height, width = (given.get(k) for k in ("num_frames", "height", "width"))
        if all(isinstance(v, int) for v in (frames, height, width)):
            return _divided((frames, height, width), self.patch)
        x = given.get("hidden_states")
        if not isinstance(x, Tensor):
            return None
        if x.dim() == 4:
            return _divided((1, *x.shape[2:]), (1, ph, pw))
        if x.dim() == 5:
            channels_first = self.in_channels is None or x.shape[1] == self.in_channels
            frames_first = x.shape[2:] if channels_first else (x.shape[1], *x.shape[3:])
            return _divided(tuple(frames_first), (pt, ph, pw))
        return None

    def layout(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        grid = self.calls.value.grid
        if grid is None:
            return None
        frames, rows, cols = grid
        if hidden_states.shape[1] != frames * rows * cols:
            return None
        return TokenLayout((rows, cols), frames=frames)

    def layout_text_first(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        """The layout at a block of ``TEXT_FIRST_BLOCKS``: the tokens beyond the grid's come
        first, protected."""
        return self._joined(hidden_states, "text first")

    def layout_image_first(self, site: Site, hidden_states: Tensor) -> TokenLayout | None:
        """The layout at a block of ``IMAGE_FIRST_BLOCKS``: the tokens beyond the grid's come
        last, protected."""
        return self._joined(hidden_states, "image first")

    def _joined(self, hidden_states: Tensor, order: str) -> TokenLayout | None:
        grid = self.calls.value.grid
        if grid is None:
            return None
        frames, rows, cols = grid
        extra = hidden_states.shape[1] - frames * rows * cols
        if extra < 0:
            return None
        if order == "text first":
            return TokenLayout((rows, cols), extra, frames=frames)
        return TokenLayout((rows, cols), frames=frames, num_suffix=extra)

    def tokens(self) -> int | None:
        """How many image tokens this call's grid holds (None: no grid)."""
        grid = self.calls.value.grid
        return None if grid is None else grid[0] * grid[1] * grid[2]


def _divided(sizes: tuple, patch: tuple) -> tuple[int, int, int] | None:
    if any(size % step for size, step in zip(sizes, patch, strict=True)):
        return None
    return tuple(size // step for size, step in zip(sizes, patch, strict=True))  # type: ignore


class Keywords:
    """Pre-hook of a target that passes its first argument by position and the others as
    keywords (Wan's blocks call ``attn1(x, None, None, rotary_emb)``; HiDream names the first
    ``norm_hidden_states``), so a merged call finds its tokens first and reduces the rest by
    name."""

    def __init__(self, module: nn.Module) -> None:
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
        self.names = [p.name for p in parameters if p.kind in kinds]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if not args and self.names and self.names[0] in kwargs:
            kwargs = dict(kwargs)
            args = (kwargs.pop(self.names[0]),)
        elif len(args) <= 1 or len(args) > len(self.names):
            return None
        return args[:1], {**kwargs, **dict(zip(self.names[1:], args[1:], strict=False))}


class BlockText:
    """Pre-hook of a block: the length of the text its call was given (0: none), per thread.
    A module the block runs on its text as well as on its image (CogView4 puts both through
    one ``ff``) cannot tell them apart when they are as long. Also whether the call carries a
    padding mask ``(B, N)`` over its tokens: in one sequence of text then image (Lumina2's
    main layers), each sample's text then has a length of its own, and its image tokens start
    at a place of their own."""

    def __init__(self, block: nn.Module) -> None:
        self.names = forward_parameters(type(block))
        self.calls = PerThread(_no_text)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "calls": PerThread(_no_text)}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        given = given_arguments(self.names, args, kwargs)
        call = self.calls.value
        call.length = _text_length(given.get("encoder_hidden_states"))
        mask, x = given.get("attention_mask"), given.get("hidden_states")
        call.padded = (
            isinstance(mask, Tensor)
            and isinstance(x, Tensor)
            and mask.dim() == 2
            and mask.shape == x.shape[:2]
        )


def _text_length(text: Any) -> int:
    """Tokens of a ``(B, T, C)`` text argument; 0 for anything else (none given)."""
    return text.shape[1] if isinstance(text, Tensor) and text.dim() == 3 else 0


def _no_text() -> CallValues:
    return CallValues(length=0, padded=False)


class TableGuard(TargetGuard):
    """Lets a call merge only when every argument with the image's length can be reduced."""

    def __init__(
        self, grid: LatentGrid, text: BlockText, module: nn.Module, kind: str, block: nn.Module
    ) -> None:
        super().__init__(module, kind, block)
        self.grid = grid
        self.text = text
        self.joined = sequence_order(block) is not None  # text and image in one sequence

    def __call__(self, args: tuple, kwargs: dict) -> str | None:
        reason = self.replaying_hook()
        if reason is not None:
            return reason
        if self.kind == "mlp" and getattr(self.block, "_chunk_size", None) is not None:
            return "MLP run in token chunks (forward chunking)"
        tokens = self.grid.tokens()
        x = args[0] if args else kwargs.get("hidden_states")
        if tokens is None or not isinstance(x, Tensor) or x.dim() != 3:
            return None  # the layout has no grid for it: passed through, counted as such
        if self.joined and x.shape[1] > tokens:
            if self.text.calls.value.padded:
                return (
                    "text and image tokens in one sequence under a padding mask: each sample's "
                    "text has its own length, so its image tokens start at a place of their own"
                )
            tokens = x.shape[1]  # text and image tokens: every argument runs over both
        elif x.shape[1] != tokens:
            return (
                f"hidden states of {x.shape[1]} tokens, not the {tokens} image tokens "
                "(text and image tokens in one sequence?)"
            )
        if self.text.calls.value.length == tokens:
            return f"the block's text is as long as the image ({tokens} tokens): which is this?"
        base = kwargs.get("base_sequence_length")
        if base is not None and (not isinstance(base, (int, float)) or base <= 1):
            return f"base_sequence_length {base!r}: not a number above 1 to rescale"
        text = call_text(kwargs)
        # keys and values from the hidden states themselves are merged with them: no text
        text_length = 0 if text is x else _text_length(text)
        joint = JOINT_ORDER.get(processor_name(self.module))
        for name, value in kwargs.items():
            if name in _NOT_TABLES:
                continue
            for part in _tensors(value):
                axes = token_axes(name, part, tokens)
                if axes is None:
                    return f"{name} has two axes of {tokens} rows: which runs over the tokens?"
                if axes and text_length == tokens:
                    return f"text as long as the image ({tokens} tokens): {name} is ambiguous"
                if text_length and text_length + tokens in part.shape and joint is None:
                    return (
                        f"{name} spans text and image tokens ({text_length} + {tokens} rows); "
                        "which rows are the image's is not known here"
                    )
                spans = token_axes(name, part, text_length + tokens) if joint else []
                if spans is None:
                    return f"{name} has two axes over the text and image tokens"
                if not axes and not spans and any(size > tokens for size in part.shape[:-1]):
                    return (
                        f"{name} of shape {tuple(part.shape)} has more rows than the {tokens} "
                        "image tokens (text and image tokens together?)"
                    )
        return None


#: where a joint attention processor puts the text it takes as ``encoder_hidden_states``, for
#: the arguments that run over text and image tokens (HunyuanVideo's model makes a text-padding
#: mask over image then text tokens); a call with such an argument under a processor not
#: listed here passes through, since which rows are the image's is not known
JOINT_ORDER = {"HunyuanVideoAttnProcessor2_0": "image first", "HiDreamAttnProcessor": "image first"}


def call_text(kwargs: dict) -> Any:
    """The text tokens an attention call takes (HiDream's processor names them
    ``norm_encoder_hidden_states``)."""
    text = kwargs.get("encoder_hidden_states")
    return kwargs.get("norm_encoder_hidden_states") if text is None else text


def reduce_tables(plan: Plan, kwargs: dict, joint: str | None = None) -> dict:
    """The call's keyword arguments with every token axis (``token_axes``) reduced to the rows
    of the tokens the batch-shared ``plan`` keeps; with ``joint`` (``JOINT_ORDER``'s
    ``"image first"`` or ``"text first"``), also every axis over the image and the call's text
    tokens together, whose text rows all stay."""
    text_length = _text_length(call_text(kwargs)) if joint else 0
    lengths = {plan.num_tokens: None}
    if text_length:
        lengths[plan.num_tokens + text_length] = (joint, text_length)
    reduced = {}
    for name, value in kwargs.items():
        if name in _NOT_TABLES:
            continue
        if any(True for _ in _tensors(value)):
            reduced[name] = _reduced(plan, name, value, lengths)
    return {**kwargs, **reduced} if reduced else kwargs


class TableReducer:
    """``reduce_tables`` for one target, with the joint order of its processor at each call."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, plan: Plan, kwargs: dict) -> dict:
        kwargs = reduce_tables(plan, kwargs, JOINT_ORDER.get(processor_name(self.module)))
        base = kwargs.get("base_sequence_length")
        if base is None:
            return kwargs
        return {**kwargs, "base_sequence_length": same_scale_base(base, plan)}


def same_scale_base(base: float, plan: Plan) -> float:
    """Lumina's proportional attention scales the logits by ``sqrt(log(L) / log(base))`` for
    ``L`` query tokens: the base that gives the merged call (``plan.num_out`` tokens) the scale
    of the whole one, so merging changes the tokens, not the temperature."""
    return base ** (math.log(plan.num_out) / math.log(plan.num_tokens))


def _reduced(plan: Plan, name: str, value: Any, lengths: dict) -> Any:
    """``value`` (a tensor, or nested tuples and lists of them) with its token axes reduced:
    ``lengths`` maps each reduced length to None (the image tokens) or ``(order, text)``."""
    if isinstance(value, (tuple, list)):
        return type(value)(_reduced(plan, name, part, lengths) for part in value)
    if not isinstance(value, Tensor):
        return value
    for length, joint in lengths.items():
        for axis in token_axes(name, value, length) or ():
            value = value.index_select(axis, _rows(plan, joint, value.device))
    return value


def _rows(plan: Plan, joint: tuple[str, int] | None, device: torch.device) -> Tensor:
    """The rows kept: the plan's, behind or before the text's where ``joint`` says."""
    key = ("kept rows", joint, device)
    return plan.derived(key, lambda: _joint_rows(plan, joint).to(device))


def _joint_rows(plan: Plan, joint: tuple[str, int] | None) -> Tensor:
    kept = plan.kept[0]
    if joint is None:
        return kept
    order, text = joint
    if order == "image first":
        return torch.cat([kept, plan.num_tokens + torch.arange(text, device=kept.device)])
    return torch.cat([torch.arange(text, device=kept.device), kept + text])


class TransformerOptions(AdapterOptions):
    """Options of the ``diffusers_transformer`` adapter.

    Example:
        >>> from tokenmerge.adapters.diffusers_transformer import TransformerOptions
        >>> TransformerOptions(frames_span=3).frames_span
        3
    """

    frames_span: int = Field(
        default=1,
        ge=1,
        description=(
            "Video: consecutive latent frames planned together, stacked as one grid (a token "
            "may merge into another frame's of its group). Default 1: each frame on its own."
        ),
    )


class DiffusersTransformerAdapter(TransformerAdapter):
    """Merging in any diffusers image or video transformer built from diffusers attention
    modules, and the pipelines that hold one (``pipe.transformer`` is patched).

    Example:
        >>> import torch, tokenmerge
        >>> from diffusers import SanaTransformer2DModel
        >>> sana = SanaTransformer2DModel(in_channels=4, out_channels=4,
        ...     num_layers=2, num_attention_heads=2, attention_head_dim=8,
        ...     num_cross_attention_heads=2, cross_attention_head_dim=8,
        ...     cross_attention_dim=16, caption_channels=8, sample_size=16,
        ...     patch_size=2).eval()
        >>> handle = tokenmerge.apply(sana, "tome", ratio=0.5, sites={"min_tokens": 1})
        >>> handle.adapter.name, [site.name for site in handle.sites]
        ('diffusers_transformer', ['transformer_blocks.0', 'transformer_blocks.1'])
        >>> text = torch.randn(1, 5, 8)
        >>> out = sana(torch.randn(1, 4, 16, 16), encoder_hidden_states=text,
        ...            timestep=torch.tensor([500])).sample
        >>> out.shape, handle.stats()["transformer_blocks.0"].tokens_out
        (torch.Size([1, 4, 16, 16]), 32)
        >>> handle.remove()
    """

    name = "diffusers_transformer"
    options_class: ClassVar[type[AdapterOptions]] = TransformerOptions
    options: TransformerOptions

    def __init__(self, options: TransformerOptions | None = None) -> None:
        super().__init__(options)
        self._targets: dict[str, list[tuple[str, nn.Module]]] = {}
        #: sites whose modules take text and image tokens in one sequence: in which order
        self._orders: dict[str, str] = {}

    @staticmethod
    def model_classes() -> tuple[type, ...]:
        return (_model_mixin(),)

    @classmethod
    def supports(cls, model: Any) -> bool:
        root = model if isinstance(model, _model_mixin()) else getattr(model, "transformer", None)
        return isinstance(root, _model_mixin()) and _griddable(root) and bool(model_blocks(root))

    def root(self, model: Any) -> nn.Module:
        return model if isinstance(model, _model_mixin()) else super().root(model)

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        self.watch_root(root, LatentGrid(root, self.options.frames_span))
        blocks = model_blocks(root)
        found = []
        for index, (name, block) in enumerate(blocks):
            targets = block_targets(block)
            if not targets:
                continue
            modules: dict[str, nn.Module] = {}
            for kind, module in targets:
                modules.setdefault(kind, module)
            stage = depth_stage(index, len(blocks))
            rotary = takes_rotary(type(block))
            site = Site(name, stage=stage, block_index=index, shared_plan=True, rotary=rotary)
            order = sequence_order(block)
            if order is not None:
                self._orders[name] = order
            self._blocks[name] = block
            self._targets[name] = targets
            found.append(SiteCandidate(site, modules))
        return found

    def layout_for(self, site: Site) -> Callable[[Site, Tensor], TokenLayout | None]:
        order = self._orders.get(site.name)
        if order == "text first":
            return self._grid.layout_text_first
        if order == "image first":
            return self._grid.layout_image_first
        return self._grid.layout

    def attach(self, patch: SitePatch, modules: dict[str, nn.Module]) -> list[RemovableHandle]:
        block, handles = self.attach_block(patch)
        text = BlockText(block)
        handles.append(block.register_forward_pre_hook(text, with_kwargs=True))
        for kind, module in self._targets[patch.site.name]:
            if kind not in modules:
                continue
            keywords = Keywords(module)
            handles.append(module.register_forward_pre_hook(keywords, with_kwargs=True))
            guard = TableGuard(self._grid, text, module, kind, block)
            correction = value_correction(patch, kind, module)
            if correction is not None and correction.view.verify:
                # a view guessed from projection names knows nothing of rotary or per-head
                # norms over all heads: it would fail its check (or the call) at every fit
                correction = None
            adjust = None if kind == "mlp" else TableReducer(module)
            handles += patch.attach_local(
                module,
                guard=guard,
                adjust=adjust,
                correction=correction,
                again="encoder_hidden_states",
            )
        return handles


def _griddable(root: nn.Module) -> bool:
    """Whether the grid of a call can be read: a patch size, or arguments that give it."""
    config = getattr(root, "config", None)
    if config is None:
        return False
    names = set(forward_parameters(type(root)))
    if "img_shapes" in names or {"num_frames", "height", "width"} <= names:
        return True
    return config.get("patch_size") is not None and "hidden_states" in names
