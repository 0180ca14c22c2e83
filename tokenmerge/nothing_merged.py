"""Warnings for a patch that merged nothing in a whole forward, so that no model runs unmerged
while its user believes it merges (every site below ``sites.min_tokens``, inputs no site can
place on a grid...). Watches only eager calls: compiled calls count in tensors, read by
``stats()``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.errors import NothingMergedWarning
from tokenmerge.patch import EMPTY_BATCH, SitePatch

__all__ = ["NothingMergedWatch"]


class NothingMergedWatch:
    """The root's pre- and post-hooks that warn when sites merged nothing in a forward: once
    for the whole model when no site merged (``per_site=False``), or once per site that merged
    nothing (``per_site=True``: the generic adapter, whose sites the user chose one by one).
    A class, so ``copy.deepcopy`` copies it."""

    def __init__(self, patches: list[SitePatch], per_site: bool = False) -> None:
        self.patches = patches
        self.per_site = per_site
        self.warned: set[str] = set()
        self.before_counts: list[tuple[int, int]] = []

    def attach(self, root: nn.Module) -> list[RemovableHandle]:
        return [root.register_forward_pre_hook(self.before), root.register_forward_hook(self.after)]

    def before(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return
        self.before_counts = [patch.eager_call_counts() for patch in self.patches]

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling() or "model" in self.warned:
            return
        idle: list[tuple[SitePatch, str]] = []  # sites called that merged nothing, and why
        merged = False
        for patch, (planned, passed) in zip(self.patches, self.before_counts, strict=False):
            now_planned, now_passed = patch.eager_call_counts()
            if now_planned == planned and now_passed == passed:
                continue  # not called in this forward
            reason = _why_nothing(patch, now_planned - planned, now_passed - passed)
            if reason is None:
                merged = True
            elif reason != EMPTY_BATCH:
                idle.append((patch, reason))
        if self.per_site:
            for patch, reason in idle:
                if patch.site.name not in self.warned:
                    self.warned.add(patch.site.name)
                    _warn(f"site {patch.site.name!r} merged nothing in this forward: {reason}")
        elif idle and not merged:
            self.warned.add("model")
            reasons = sorted({reason for _, reason in idle})
            shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
            _warn(f"no site merged anything in this forward ({len(idle)} sites): {shown}")


def _why_nothing(patch: SitePatch, planned: int, passed: int) -> str | None:
    """Why a site called in a forward merged nothing (None: it merged, or ratio 0)."""
    skipped, pass_reason = patch.skip_reasons()
    if not planned:
        if pass_reason == EMPTY_BATCH:
            return EMPTY_BATCH
        return f"every call was passed through ({pass_reason})"
    if skipped is not None and not passed:
        return skipped
    return None


def _warn(message: str) -> None:
    warnings.warn(
        f"{message}. Merge around modules that take (batch, tokens, channels) with enough "
        "tokens, or lower sites.min_tokens (e.g. sites={'min_tokens': 64}); stats() counts "
        "every such call (reported once)",
        NothingMergedWarning,
        stacklevel=3,
    )
