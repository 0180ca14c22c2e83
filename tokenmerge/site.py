"""Sites (the places in a model where merging happens) and their per-site statistics."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from torch import Tensor

__all__ = ["GLOB_RULE", "Site", "SiteStats", "TokenLayout", "module_glob"]

#: the one rule of every module-name glob (``sites.include`` / ``exclude``, per-site mapping
#: keys), as error messages state it
GLOB_RULE = (
    "a module-name glob matches the whole dotted name: '*' and '?' stay within one name part, "
    "'**' crosses dots ('up_blocks.1.**' is everything under up_blocks.1), '[...]' is a "
    "character class"
)


@lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            parts.append(".*")
            i += 2
            continue
        if char == "*":
            parts.append("[^.]*")
        elif char == "?":
            parts.append("[^.]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                parts.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                parts.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = end
        else:
            parts.append(re.escape(char))
        i += 1
    return re.compile("".join(parts) + r"\Z")


def module_glob(name: str, pattern: str) -> bool:
    """Glob match on a dotted module name (``GLOB_RULE``): the whole name must match; ``*`` and
    ``?`` stay within one name part, ``**`` crosses dots, ``[...]`` is a character class.

    Example:
        >>> module_glob("blocks.3.attn", "blocks.*.attn")
        True
        >>> module_glob("blocks.3.attn.qkv", "blocks.*")
        False
        >>> module_glob("down_blocks.1.attentions.0", "down_blocks.**")
        True
    """
    return _glob_regex(pattern).match(name) is not None


@dataclass(frozen=True)
class Site:
    """One place in a model where tokens merge: a block, with the sub-modules merged around.

    Adapters describe each site once, when they attach; the strategy sees it on every plan.

    Attributes:
        name: the dotted module name of the block in the model (what include / exclude globs and
            ratio mappings match).
        targets: the kinds of sub-module merged around (``"attn"``, ``"cross_attn"``,
            ``"mlp"``), as the adapter lists them, once the config's choice is applied.
        stage: ``"down"``, ``"mid"`` or ``"up"`` in a UNet; None where the model has no stages.
        level: the downsample factor of the site's grid relative to the model input (1, 2, 4...);
            None where every site shares one grid.
        block_index: position of the block among the model's merge-capable blocks.
        mode: ``"local"`` (merge, run, unmerge) or ``"progressive"`` (tokens stay merged).
        shared_plan: one plan for the whole batch (required where a positional table is shared
            by the batch, as with rotary embeddings).
        rotary: the block receives rotary position tables: positions enter inside attention,
            so the tokens' features carry none, and a token merged into a far destination
            attends and is attended to from the destination's place.
    """

    name: str
    targets: tuple[str, ...] = ()
    stage: str | None = None
    level: int | None = None
    block_index: int | None = None
    mode: str = "local"
    shared_plan: bool = False
    rotary: bool = False

    def matches(self, pattern: str) -> bool:
        """True when the glob ``pattern`` matches the site's name (see ``module_glob``)."""
        return module_glob(self.name, pattern)


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens reaching a site are laid out at one call.

    Attributes:
        grid: ``(h, w)`` of the image tokens, row-major. In local mode ``h * w`` is the image
            token count; in progressive mode it is the model's original patch grid.
        num_prefix: protected tokens before the image tokens (class, distillation, registers),
            never merged.
        positions: ``(B or 1, n)`` row-major index in ``grid`` of every image token present,
            when they are not the whole grid in order: in progressive mode once tokens merged (a
            merged token keeps its destination's position), and where a model keeps a subset of
            its patches (ViTMAE); None while the tokens are the whole grid in order.
        frames: local mode: video frames of ``grid`` each, one after the other (frame-major,
            then row-major). Each frame is planned on its own, so no token merges into another
            frame's token; the strategy sees one frame's ``grid``.
        num_suffix: protected tokens after the image tokens (text behind the image in one
            sequence, as in HiDream's single-stream blocks), never merged.
    """

    grid: tuple[int, int]
    num_prefix: int = 0
    positions: Tensor | None = None
    frames: int = 1
    num_suffix: int = 0

    @property
    def num_image_tokens(self) -> int:
        if self.positions is not None:
            return self.positions.shape[-1]
        return self.frames * self.grid[0] * self.grid[1]

    def frame(self) -> TokenLayout:
        """The layout of one frame: what a strategy plans on."""
        return TokenLayout(self.grid, self.num_prefix, self.positions)


@dataclass
class SiteStats:
    """What happened at one site since the patch was applied.

    Attributes:
        name: the site's module name.
        calls: forward calls seen at the site.
        tokens_in: tokens that reached the site at its last call.
        tokens_out: tokens after the merge at its last call (equal to ``tokens_in`` when skipped).
        plans_computed: plans computed from scratch.
        plans_reused: calls served by a cached plan.
        shortfall: at the last call, how many tokens fewer merged than the ratio asked for
            (windows or cells ran out).
        skipped: why the last call did not merge (e.g. below ``min_tokens``), or None.
        ratio: the ratio configured for this site.
        passed_through: calls of a target left untouched because the plan could not handle
            them (an attention mask over the merged tokens, 4-D hidden states, chunked MLP...).
        pass_reason: why the last such call was passed through.
        value_correction: the fitted weight of the value-corrected unmerge at the site's
            self-attention (``MergeConfig.value_correction``), averaged over the batch and the
            site's corrected attentions; None where it is not applied: not asked for, before a
            fit, progressive mode, or an attention it cannot describe (see
            ``tokenmerge.adapters._views``).
        keys_values: whether the site's self-attention merges its keys and values alone, every
            query kept (``MergeConfig.keys_values``); ``tokens_out`` then counts the keys.
    """

    name: str
    ratio: float = 0.0
    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    plans_computed: int = 0
    plans_reused: int = 0
    shortfall: int = 0
    skipped: str | None = None
    passed_through: int = 0
    pass_reason: str | None = None
    value_correction: float | None = None
    keys_values: bool = False
