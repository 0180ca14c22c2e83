"""Progressive mode: tokens merged in a block stay merged for the rest of the block stack.

ToMe's way for ViT classification. Each token carries a *size* (how many patches it stands for)
and the grid position of its destination; the map from the original tokens to the current ones
is kept, so after the last block the full token set is restored by one gather. Restoring keeps
every shape outside the block stack unchanged and keeps pooling exact: a token copied back to
the ``k`` patches it stands for counts ``k`` times in an average (size-weighted average pooling),
the class token is never merged (class-token pooling untouched).

Data path in a block (native hooks only; adapters install them):

- a pre-hook on every block (``TokenCarry``) starts a new record when the block sees the full
  token set, and adds ``log(size)`` of every key to the attention mask (proportional attention)
  once a merge happened; adapters can adjust other per-token arguments there (rotary tables);
- a forward hook on the module that computes the keys hands them (averaged over heads) to the
  site's planner;
- the merge: hooks can merge only at module boundaries, and the residual between a block's
  attention and its MLP is a local variable. With ``merge_at="mlp"`` the MLP input is merged and
  its output copied back (so the MLP runs on the merged tokens, as in ToMe), and the block output
  is merged with the same plan; since merging copies gives back the value, the block output is
  ``merge(x + attn) + mlp(merge(norm(x + attn)))`` - ToMe's order except that the norm sees the
  unmerged tokens. With ``merge_at="block"`` only the block output is merged (the MLP of a
  merging block runs on all its tokens);
- a forward hook on the last block (``TokenCarry.restore``) copies every token back to the
  patches it stands for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .calls import CallValues, PerThread
from .patch import EMPTY_BATCH, SitePatch
from .plan import Plan
from .site import TokenLayout
from .windows import made_once

__all__ = ["ArgSpec", "TokenCarry", "TokenTrack", "attach_progressive"]

#: ``(track, kwargs) -> kwargs`` of a block call on merged tokens (rotary rows of the kept tokens)
BlockAdjust = Callable[["TokenTrack", dict], dict]
#: module output -> ``(B, N, d)`` keys averaged over heads
KeysFn = Callable[[Any], Tensor]


class TokenTrack:
    """What progressive mode knows about the tokens of the current call (one per thread: see
    ``TokenCarry.tracks``).

    Attributes:
        num_prefix: protected tokens in front (class, distillation, registers).
        grid: the original patch grid of the call.
        sizes: ``(B, N)`` patches each current token stands for; None before the first merge.
        positions: ``(B or 1, n)`` original grid index of every current image token (a view;
            one row while every plan was shared by the batch).
        origin: ``(B * N0,)`` row, among the current tokens of the whole batch
            (``x.reshape(B * N, C)``), of every original token.

    Both are followed as flat rows of the batch, as the plans' own rows are (``Plan.rows``):
    one row gather per merge for each, no index offset per sample.
    """

    def __init__(self, num_prefix: int) -> None:
        self.num_prefix = num_prefix
        self.grid: tuple[int, int] | None = None
        #: ``(B or 1, n)`` grid index of each image token the blocks receive, when they are not
        #: the whole grid in order (ViTMAE keeps a random subset of the patches); None: they are
        self.start_positions: Tensor | None = None
        self.clear()

    def clear(self) -> None:
        self.sizes: Tensor | None = None
        self.origin: Tensor | None = None
        #: ``(B * N,)`` of every current token: its destination's grid index, ``j - num_prefix``
        #: for protected token ``j`` (so that adding ``num_prefix`` gives ``token_index``)
        self._grid_rows: Tensor | None = None
        #: whether every plan so far was shared by the batch (every sample's rows are alike)
        self._shared = True
        self.num_tokens = 0

    @property
    def positions(self) -> Tensor | None:
        if self._grid_rows is None:
            return None
        return self._rows_by_sample()[:, self.num_prefix :]

    def _rows_by_sample(self) -> Tensor:
        rows = self._grid_rows.view(-1, self.num_tokens)
        return rows[:1] if self._shared else rows

    def start(self, grid: tuple[int, int], positions: Tensor | None = None) -> None:
        """A block sees the whole token set: a new call begins (or nothing has merged yet)."""
        self.grid = grid
        self.start_positions = positions
        self.clear()

    @staticmethod
    def full_count(num_prefix: int, grid: tuple[int, int], positions: Tensor | None) -> int:
        """Tokens a block receives before any merge."""
        image = grid[0] * grid[1] if positions is None else positions.shape[-1]
        return num_prefix + image

    @property
    def num_full(self) -> int:
        """Tokens of the call before any merge (0 before a call)."""
        if self.grid is None:
            return 0
        return self.full_count(self.num_prefix, self.grid, self.start_positions)

    @property
    def merged(self) -> bool:
        return self.origin is not None

    def layout(self) -> TokenLayout | None:
        if self.grid is None:
            return None
        positions = self.positions if self.merged else self.start_positions
        return TokenLayout(self.grid, self.num_prefix, positions=positions)

    def sizes_for(self, plan: Plan, batch: int) -> Tensor:
        """``(batch, N)`` sizes of the tokens ``plan`` applies to (ones before any merge)."""
        if self.sizes is None:
            return torch.ones(batch, plan.num_tokens, device=plan.device)
        return self.sizes.expand(batch, -1)

    def record(self, plan: Plan, merged_sizes: Tensor) -> None:
        """Follow ``plan``, just applied to a batch; ``merged_sizes`` ``(B, M)`` are the
        sizes after it."""
        if plan.is_identity:
            return
        rows = plan.rows(merged_sizes.shape[0], torch.float32)
        self._shared = self._shared and plan.batch == 1
        if self.origin is None:
            self.origin = rows.origin
            grid_rows = self._start_rows(merged_sizes.shape[0], plan.num_tokens, plan.device)
            start = self.start_positions
            self._shared = self._shared and (start is None or start.shape[0] == 1)
        else:
            self.origin = rows.origin.index_select(0, self.origin)
            grid_rows = self._grid_rows
        self._grid_rows = grid_rows.index_select(0, rows.kept)
        self.sizes = merged_sizes
        self.num_tokens = plan.num_out

    def _start_rows(self, batch: int, tokens: int, device: torch.device) -> Tensor:
        """``(batch * tokens,)`` grid rows of the tokens before any merge."""
        if self.start_positions is None:
            return _whole_grid_rows(batch, self.num_prefix, tokens, device)
        prefix = _whole_grid_rows(batch, self.num_prefix, self.num_prefix, device)
        image = self.start_positions.expand(batch, -1)
        return torch.cat([prefix.view(batch, -1), image], dim=1).flatten()

    def token_index(self) -> Tensor | None:
        """``(B or 1, N)`` original index of every current token (a merged token takes its
        destination's), prefix tokens first; None before the first merge. Per-pair tables made
        for the original tokens (relative position biases) are cut to the current ones with
        it."""
        if self._grid_rows is None:
            return None
        return self._rows_by_sample() + self.num_prefix

    def attention_bias(self, dtype: torch.dtype) -> Tensor:
        """``(B, 1, 1, N)`` additive logits bias: ``log(size)`` of every key."""
        return self.sizes.log().to(dtype)[:, None, None, :]

    def restore(self, x: Tensor) -> Tensor:
        """Every original token gets a copy of the token it was merged into: ``(B, N0, C)``."""
        return restore_rows(x, self.origin)


def restore_rows(x: Tensor, origin: Tensor) -> Tensor:
    """``x (B, N, C)`` -> ``(B, N0, C)``: the row ``origin (B * N0,)`` names for every original
    token."""
    batch, tokens, channels = x.shape
    flat = x.reshape(batch * tokens, channels)
    return flat.index_select(0, origin).view(batch, -1, channels)


@made_once
def _whole_grid_rows(batch: int, num_prefix: int, tokens: int, device: torch.device) -> Tensor:
    """``(batch * tokens,)`` ``TokenTrack``'s grid rows of a whole grid behind ``num_prefix``
    protected tokens: ``-num_prefix .. tokens - num_prefix - 1`` for every sample."""
    one = torch.arange(-num_prefix, tokens - num_prefix, device=device)
    return one.repeat(batch)


@dataclass(frozen=True)
class ArgSpec:
    """Where a block takes an argument: its keyword name and positional index (None: keyword
    only)."""

    name: str
    index: int | None

    def get(self, args: tuple, kwargs: dict) -> Any:
        if self.index is not None and len(args) > self.index:
            return args[self.index]
        return kwargs.get(self.name)

    def set(self, args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
        if self.index is not None and len(args) > self.index:
            return (*args[: self.index], value, *args[self.index + 1 :]), kwargs
        return args, {**kwargs, self.name: value}


def _with_bias(mask: Any, bias: Tensor) -> Tensor:
    """An additive attention mask with ``bias`` added (a boolean mask becomes 0 / -inf first)."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=mask.device).masked_fill(
            ~mask, float("-inf")
        )
    return mask.to(bias.dtype) + bias


class TokenCarry:
    """The model-level hooks of progressive mode: one pre-hook on every block, one forward hook
    on the last block (a class, so ``copy.deepcopy`` copies it with the model).

    ``track`` is a blank record; each thread calling the model follows its tokens in a record of
    its own (``tracks``, ``tokenmerge.calls``).
    """

    def __init__(
        self,
        track: TokenTrack,
        grid: Callable[[], tuple[int, int] | None],
        mask: ArgSpec | None,
        proportional: bool,
        adjust: BlockAdjust | None = None,
        positions: Callable[[], Tensor | None] | None = None,
    ) -> None:
        self.tracks = PerThread(partial(TokenTrack, track.num_prefix))
        self.grid = grid
        #: the call's start positions (``TokenTrack.start_positions``), when the adapter has any
        self.positions = positions
        self.mask = mask
        self.proportional = proportional and mask is not None
        self.adjust = adjust
        self.blocks: list[nn.Module] = []
        #: with ``keep_block_inputs``: per block, the origin map of the merged tokens its input
        #: held in the current call (None: the full token set)
        self.block_inputs: list[Tensor | None] | None = None

    def keep_block_inputs(self) -> None:
        """Remember, per block, how its input's tokens map to the original ones, so the block
        inputs a library records (Hugging Face ``output_hidden_states``) can be restored to
        the full token set with ``restore_states``; call after ``attach_carry``."""
        self.block_inputs = [None] * len(self.blocks)

    def restore_states(self, states: tuple) -> tuple:
        """Hidden states recorded at every block boundary (``len(blocks) + 1`` of them, the
        first the input of block 0 and the last the output of the last block; or
        ``len(blocks)`` without the input of block 0) with each merged one restored to the
        full token set (every original token gets a copy of the token it was merged into, as
        the last block's output is restored); the remembered maps are dropped."""
        inputs = self.block_inputs
        if inputs is None:
            return states
        boundaries = [*inputs, None]  # the last block's output is restored already
        self.block_inputs = [None] * len(inputs)  # nothing index-sized kept between calls
        offset = len(boundaries) - len(states)
        if offset not in (0, 1):
            return states
        restored = []
        for state, origin in zip(states, boundaries[offset:], strict=True):
            if origin is not None and isinstance(state, Tensor) and state.dim() == 3:
                state = restore_rows(state, origin)
            restored.append(state)
        return type(states)(restored)

    @property
    def track(self) -> TokenTrack:
        """The calling thread's token record."""
        return self.tracks.value

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if not isinstance(x, Tensor) or x.dim() != 3:
            return None
        track = self.tracks.value
        grid = self.grid()
        positions = self.positions() if self.positions is not None else None
        if grid is not None and x.shape[1] == track.full_count(track.num_prefix, grid, positions):
            track.start(grid, positions)
        merged = track.merged and x.shape[1] == track.num_tokens
        if self.block_inputs is not None:
            self.block_inputs[self.blocks.index(module)] = track.origin if merged else None
        if not merged:
            return None
        if self.adjust is not None:
            kwargs = self.adjust(track, kwargs)
        if self.proportional:
            bias = track.attention_bias(x.dtype)
            args, kwargs = self.mask.set(
                args, kwargs, _with_bias(self.mask.get(args, kwargs), bias)
            )
        return args, kwargs

    def restore(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        track = self.tracks.value
        x = output[0] if isinstance(output, (tuple, list)) else output
        if not track.merged or not isinstance(x, Tensor) or x.shape[1] != track.num_tokens:
            return None
        full = track.restore(x)
        track.clear()  # never keep an activation-sized index alive between calls
        if isinstance(output, (tuple, list)):
            return type(output)([full, *output[1:]])
        return full

    def attach_restore(self, last_block: nn.Module) -> RemovableHandle:
        """The restoring hook, to be registered before any site's: hooks are registered in
        front (``prepend``), so the sites' merges run first, then the restore, then any hook
        that was there before (a library recording block outputs sees what the next block
        sees)."""
        return last_block.register_forward_hook(self.restore, with_kwargs=True, prepend=True)

    def attach_carry(self, blocks: list[nn.Module]) -> list[RemovableHandle]:
        """The pre-hook of every block (proportional attention, per-token arguments)."""
        self.blocks = list(blocks)
        return [b.register_forward_pre_hook(self.before, with_kwargs=True) for b in blocks]


class _ProgressiveSite:
    """The hooks of one progressive site (a class, so ``copy.deepcopy`` copies it)."""

    def __init__(self, patch: SitePatch, tracks: PerThread, keys: KeysFn, at_mlp: bool) -> None:
        self.patch = patch
        self.tracks = tracks
        self.keys = keys
        self.at_mlp = at_mlp
        # per thread: the plan, its size weights and the sizes after it, computed once for both
        # merges
        self.calls = PerThread(_site_call)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "calls": PerThread(_site_call)}

    def take_keys(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.patch.calls.value.metric = self.keys(output)

    def _plan(self, x: Tensor) -> Plan | None:
        track = self.tracks.value
        if x.shape[0] == 0:
            self.patch.count_pass_through(EMPTY_BATCH)
            return None
        if track.grid is None:
            expected = None
        elif track.merged:
            expected = track.num_tokens
        else:
            expected = track.num_full
        if x.shape[1] != expected:
            self.patch.count_pass_through(
                f"{x.shape[1]} tokens, not the {expected} tokens tracked in this call (was the "
                "block called outside the model's forward?)"
            )
            return None
        plan = self.patch.plan_afresh(x)
        self.patch.calls.value.metric = None
        if plan is not None and not plan.is_identity:
            sizes = track.sizes_for(plan, x.shape[0])
            call = self.calls.value
            call.weight, call.merged_sizes = plan.size_weights(sizes)
        return plan

    def mlp_before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if not args:
            raise TypeError(
                f"site {self.patch.site.name!r}: {type(module).__name__} was called without a "
                "positional input; progressive merging at the MLP needs it"
            )
        x = args[0]
        call = self.calls.value
        call.plan = plan = self._plan(x)
        if plan is None or plan.is_identity:
            return None
        return (self.patch.observed("merge", plan.merge, x, weight=call.weight), *args[1:]), kwargs

    def mlp_after(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Any:
        plan = self.calls.value.plan
        if plan is None or plan.is_identity:
            return None
        self.patch.check_merged_output(plan, output, module)
        return self.patch.observed("unmerge", plan.unmerge, output)

    def block_after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = output[0] if isinstance(output, (tuple, list)) else output
        call = self.calls.value
        plan = call.plan if self.at_mlp else self._plan(x)
        call.plan = None
        self.patch.calls.value.metric = None
        if plan is None or plan.is_identity:
            return None
        merged = self.patch.observed("merge", plan.merge, x, weight=call.weight)
        self.tracks.value.record(plan, call.merged_sizes)
        call.weight = call.merged_sizes = None
        if isinstance(output, (tuple, list)):
            return type(output)([merged, *output[1:]])
        return merged


def _site_call() -> CallValues:
    return CallValues(plan=None, weight=None, merged_sizes=None)


def attach_progressive(
    patch: SitePatch,
    tracks: PerThread,
    block: nn.Module,
    keys_module: nn.Module,
    keys: KeysFn,
    mlp: nn.Module | None,
) -> list[RemovableHandle]:
    """Install one progressive site, following the tokens in ``tracks`` (the carry's
    ``TokenCarry.tracks``): keys from ``keys_module``'s output (through ``keys``), the
    merge at ``mlp``'s input when given (else at the block output), the block output merged
    (in front of the block's other forward hooks; see ``TokenCarry.attach_restore``)."""
    hooks = _ProgressiveSite(patch, tracks, keys, at_mlp=mlp is not None)
    handles = [keys_module.register_forward_hook(hooks.take_keys)]
    if mlp is not None:
        handles += [
            mlp.register_forward_pre_hook(hooks.mlp_before, with_kwargs=True),
            mlp.register_forward_hook(hooks.mlp_after, with_kwargs=True),
        ]
    handles.append(block.register_forward_hook(hooks.block_after, with_kwargs=True, prepend=True))
    return handles
