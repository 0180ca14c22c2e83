"""ReToM: local representative token guided merging (Lee, Kim, Lee, 2025).

1. Non-overlapping ``s x s`` windows over the site's token grid; ``s`` per stage (smaller windows
   in the down / up stages for local detail, larger in the bottleneck for global context). A window
   cut by the grid's edge is a smaller window.
2. In each window the *representative* is the token with the highest average cosine similarity to
   the window's other tokens. With unit features and ``S_W`` the window's feature sum, that average
   is ``(f_i . S_W - 1) / (|W| - 1)``: one dot product per token, ``O(N C)`` for the whole grid.
3. Which tokens merge, and into what (``destinations``):

   - ``"detail"`` (the default): the representatives stay, and so do the tokens least like
     them (the detail one token per window cannot stand for); the ``r`` tokens most like a
     representative merge, each into its most similar token that stays. Plain regions give up
     many tokens, detailed ones few. One sort splits sources from the tokens that stay, and
     only those pairs are compared: ``r (N - r)`` dot products.
   - ``"representatives"``: the ``r`` non-representatives most like a representative merge into
     it; only representatives take merges.

   ``scope="global"`` lets a token merge anywhere; ``scope="window"`` keeps it in its own
   window; ``"auto"`` (the default) is the window scope where positions are rotary
   (``Site.rotary``) and the global scope elsewhere. The destination is always a real token, so
   positions stay exact.
4. Plans are cached for ``cache_interval`` denoising steps (the framework's plan cache).
5. Progressive mode (ViTs): windows over the tokens' *original* grid positions (a merged token
   keeps its representative's position); a window's side doubles when the tokens left cannot
   fill the merge with one representative per window (``tokenmerge.windows.grown_window``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from tokenmerge.config import MAX_CELL, MergeConfig
from tokenmerge.errors import ConfigError
from tokenmerge.plan import Plan
from tokenmerge.rng import SiteRandom
from tokenmerge.selectors import PerSite, per_site_values, resolve_per_site
from tokenmerge.site import Site, TokenLayout
from tokenmerge.strategy import Strategy, merge_into_representatives, pick_top
from tokenmerge.strict import Integer
from tokenmerge.windows import (
    best_per_window,
    grid_window_labels,
    grown_window,
    made_once,
    num_windows,
    shared_window_partition,
    window_labels,
)

__all__ = ["ReToMConfig", "ReToMStrategy", "representatives"]


class ReToMConfig(MergeConfig):
    """Configuration of ``retom``.

    Example:
        >>> import tokenmerge
        >>> window_size = {"mid": 4, "*": 2}
        >>> config = tokenmerge.load_config("retom", ratio=0.5, window_size=window_size)
        >>> from tokenmerge.site import Site
        >>> rotary = Site("blocks.0", rotary=True)
        >>> config.scope_at(Site("blocks.0")), config.scope_at(rotary)
        ('global', 'window')
    """

    strategy: Literal["retom"] = Field(default="retom", description="Always 'retom'.")
    window_size: PerSite[Integer] = Field(
        default={"down": 6, "mid": 8, "up": 6, "*": 4},
        description=(
            "Side of the square windows, at least 2: one value, one per block, or a mapping of "
            "site selectors. Default {'down': 6, 'mid': 8, 'up': 6, '*': 4}."
        ),
    )
    scope: Literal["auto", "window", "global"] = Field(
        default="auto",
        description=(
            "'window': a token merges within its own window; 'global': anywhere. 'auto': window "
            "where positions are rotary (Site.rotary), global elsewhere. Default 'auto'."
        ),
    )
    destinations: Literal["detail", "representatives"] = Field(
        default="detail",
        description=(
            "'representatives': merged tokens join window representatives only; 'detail': also "
            "the tokens least like any representative stay and take merges. Default 'detail'."
        ),
    )
    value_correction: bool = Field(
        default=True,
        description=(
            "Value-corrected unmerge at self-attention sites merged in local mode (see "
            "MergeConfig.value_correction). Default on for retom."
        ),
    )
    local_proportional_attention: bool = Field(
        default=True,
        description=(
            "Add log(size) of each merged token to its attention logit at local-mode "
            "self-attention (see MergeConfig.local_proportional_attention). Default on for retom."
        ),
    )
    cache_interval: Integer = Field(
        default=2,
        ge=1,
        description=(
            "Make a site's plan once every this many denoising steps and reuse it in between (new "
            "generations and shape changes replan). Default 2."
        ),
    )

    share_cfg_plan: bool = Field(
        default=False,
        description=(
            "With an even batch, plan on its second half (the conditional half in most pipelines) "
            "and use that plan for both halves. Default off."
        ),
    )

    @field_validator("window_size")
    @classmethod
    def _window_at_least_two(cls, value: int | dict[str, int] | tuple[int, ...]) -> object:
        for size in per_site_values(value):
            if size < 2:
                raise ValueError(
                    f"window_size {size} is too small: a window side must be at least 2 "
                    "tokens so something can merge into its representative"
                )
            if size > MAX_CELL:
                raise ValueError(f"window_size {size} is too large: at most {MAX_CELL} tokens")
        return value

    def scope_at(self, site: Site) -> Literal["window", "global"]:
        """The scope in effect at ``site``: ``scope`` itself, or for ``"auto"`` the window scope
        where the site's positions are rotary and the global scope elsewhere.

        Rotary positions enter inside attention, so features say nothing of where a token is,
        and a token merged into a far destination attends from the destination's place; where
        positions are in the features (added tables, convolutions), similar tokens are near
        ones already."""
        if self.scope != "auto":
            return self.scope
        return "window" if site.rotary else "global"

    def smallest_window(self) -> int:
        return min(per_site_values(self.window_size))

    def ratio_limit(self) -> float:
        return 1.0 - 1.0 / self.smallest_window() ** 2

    def ratio_limit_reason(self) -> str:
        s = self.smallest_window()
        if isinstance(self.window_size, int):
            return f"one representative per {s} x {s} window stays"
        # a mapping or per-block sizes: name the smallest, which may not be the model's own
        return (
            f"one representative per window stays, and the smallest window_size here is {s} x {s} "
            f"(window_size={self.window_size!r}); larger windows raise the limit"
        )

    def for_site(self, site: Site) -> ReToMConfig:
        view = super().for_site(site)
        return view.model_copy(update={"window_size": self.window_for(site)})

    def window_for(self, site: Site) -> int:
        """The window side at ``site``."""
        size = resolve_per_site(self.window_size, site)
        if size is None:
            raise ConfigError(
                f"window_size {self.window_size!r} selects no size for site {site.name!r} "
                f"(stage {site.stage!r}, level {site.level!r}); add a '*' key as the default"
            )
        return size


def representatives(features: Tensor, windows: Tensor) -> tuple[Tensor, Tensor]:
    """Each window's representative and every window member's similarity to it.

    Args:
        features: ``(P, n, C)`` unit-length features.
        windows: ``(W, K)`` token indices per window, ``-1`` where the grid ended.

    Returns:
        ``rep_slot (P, W)``: position in the window of the representative;
        ``to_rep (P, W, K)``: cosine similarity of each member to its representative, ``-inf``
        for padding and for the representative itself (the tokens that cannot merge).
    """
    rep_slot, members, valid = _representative_slots(features, windows)
    blocked = float("-inf")  # a Python scalar: no host-to-device copy
    rep = members.gather(2, rep_slot[..., None, None].expand(-1, -1, 1, members.shape[-1]))
    to_rep = _dots(members, rep)
    is_rep = torch.zeros(to_rep.shape, dtype=torch.bool, device=features.device)
    is_rep.scatter_(2, rep_slot.unsqueeze(-1), True)
    return rep_slot, torch.where(valid & ~is_rep, to_rep, blocked)


def _representative_slots(features: Tensor, windows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``representatives``' ``rep_slot``, with the members' features ``(P, W, K, C)`` and
    which window slots hold a token ``(W, K)``."""
    valid, tokens, weights = _window_tables(windows, features.dtype)
    # padding slots hold token 0's features: left out of the sums, masked in every result
    members = features[:, tokens]  # (P, W, K, C)
    window_sum = weights @ members  # (P, W, 1, C)
    # the highest mean similarity to the other members is the highest dot product with the
    # window's sum: a member's own term is 1 and the count is the window's (dot products as
    # batched matrix-vector products: no (P, W, K, C) temporary)
    similarity = _dots(members, window_sum)
    if windows.numel() > features.shape[1]:  # padding slots, where the grid did not divide
        similarity = torch.where(valid, similarity, float("-inf"))
    return similarity.argmax(dim=-1), members, valid


@made_once
def _window_tables(windows: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Of a (shared) window partition ``(W, K)``: which slots hold a token, the token of every
    slot (token 0 for padding) and the slots' weights ``(W, 1, K)`` in ``dtype``."""
    valid = windows >= 0
    return valid, windows.clamp(min=0), valid.to(dtype)[:, None, :]


def _detail_plan(
    features: Tensor,
    rep_token: Tensor,
    num_merge: int,
    labels: Tensor | None = None,
    empty_windows: bool = True,
) -> Plan:
    """Merge the ``num_merge`` tokens most like a representative, each into its most similar
    token that stays.

    ``rep_token (P, W)``: each window's representative (an index past the end marks a window
    with no token). The tokens that stay are the representatives and the tokens least like the
    representatives: the detail that one token per window would not stand for. Plain regions
    thus give up many tokens and detailed ones few. With ``labels`` (``(P or 1, n)``, every
    token's window: the window scope) a token is measured against its own window's
    representative and merges within its window; without, against the most similar
    representative, and it merges anywhere. ``empty_windows=False`` says that every window
    has a token (windows over a whole grid), which saves masking.
    """
    rows, n, channels = features.shape
    blocked = float("-inf")  # a Python scalar: no host-to-device copy
    if empty_windows:
        valid = rep_token < n
        rep_token = rep_token.clamp(max=n - 1)
    rep_features = features.gather(1, rep_token.unsqueeze(-1).expand(-1, -1, channels))
    to_reps = features @ rep_features.transpose(1, 2)
    if empty_windows:
        to_reps = torch.where(valid.unsqueeze(1), to_reps, blocked)
    if labels is None:
        likeness = to_reps.amax(dim=-1)
    else:
        labels = labels.expand(rows, -1)
        likeness = to_reps.gather(2, labels.unsqueeze(-1)).squeeze(-1)
    # one sort splits the tokens into the sources (the first r) and the tokens that stay, so
    # sources are compared with the tokens that stay only: half the products of all n, and no
    # mask to keep a source from being a destination
    order = likeness.scatter_(1, rep_token, blocked).argsort(dim=1, descending=True)
    chosen, kept = order[:, :num_merge], order[:, num_merge:]  # (P, r), (P, n - r)
    ordered = features.gather(1, order.unsqueeze(-1).expand(-1, -1, channels))
    to_kept = ordered[:, :num_merge] @ ordered[:, num_merge:].transpose(1, 2)  # (P, r, n - r)
    if labels is not None:  # the tokens of other windows are out of reach
        window = labels.gather(1, order)
        other_window = window[:, :num_merge, None] != window[:, None, num_merge:]
        to_kept = to_kept.masked_fill_(other_window, blocked)
    return Plan.from_assignment(chosen, kept.gather(1, to_kept.argmax(dim=-1)), n)


def _dots(members: Tensor, one: Tensor) -> Tensor:
    """``(P, W, K, C) . (P, W, 1, C) -> (P, W, K)``: each member's dot product with its window's
    one vector."""
    return (members @ one.transpose(-1, -2)).squeeze(-1)


class ReToMStrategy(Strategy):
    """ReToM: windows merge into their most representative token; plans cached across steps.

    Details in the module docstring.
    """

    name = "retom"
    config_class = ReToMConfig

    def _window(self, site: Site) -> tuple[int, int]:
        size = self.config.window_for(site)
        return size, size

    def capacity(self, layout: TokenLayout, site: Site) -> int:
        if layout.positions is not None:
            return layout.num_image_tokens - 1  # windows grow until one is left
        return layout.num_image_tokens - num_windows(layout.grid, self._window(site))

    def make_plan(
        self,
        features: Tensor,
        layout: TokenLayout,
        site: Site,
        num_merge: int,
        rng: SiteRandom,
    ) -> Plan:
        n = layout.num_image_tokens
        if num_merge == 0:
            return Plan.identity(n, features.device)
        if layout.positions is not None:
            return self._progressive_plan(features, layout, site, num_merge)
        windows = shared_window_partition(layout.grid, self._window(site), features.device)
        rows = features.shape[0]
        rep_slot = _representative_slots(features, windows)[0]
        rep_token = windows.expand(rows, -1, -1).gather(2, rep_slot.unsqueeze(-1)).squeeze(-1)
        window_scope = self.config.scope_at(site) == "window"
        if self.config.destinations == "detail":
            labels = None
            if window_scope:
                labels = grid_window_labels(layout.grid, self._window(site), features.device)
            return _detail_plan(features, rep_token, num_merge, labels, empty_windows=False)
        if window_scope:
            to_rep = representatives(features, windows)[1]
            chosen = pick_top(to_rep.flatten(1), num_merge)
            src = windows.flatten().expand(rows, -1).gather(1, chosen)
            dst = rep_token.gather(1, chosen // windows.shape[1])
            return Plan.from_assignment(src, dst, n)
        return self._global_plan(features, rep_token, num_merge)

    def _global_plan(self, features: Tensor, rep_token: Tensor, num_merge: int) -> Plan:
        """Every non-representative may join any representative (``rep_token (P, W)``, an
        index past the end marks a window with no token)."""
        rows, n, channels = features.shape
        valid = rep_token < n
        rep_token = rep_token.clamp(max=n - 1)
        rep_features = features.gather(1, rep_token.unsqueeze(-1).expand(-1, -1, channels))
        blocked = float("-inf")  # a Python scalar: no host-to-device copy
        similarity = torch.where(
            valid.unsqueeze(1), features @ rep_features.transpose(1, 2), blocked
        )
        best, match = similarity.max(dim=-1)  # (P, n)
        mergeable = torch.ones(rows, n, dtype=torch.bool, device=features.device)
        mergeable.scatter_(1, rep_token, False)
        chosen = pick_top(torch.where(mergeable, best, blocked), num_merge)
        return Plan.from_assignment(chosen, rep_token.gather(1, match.gather(1, chosen)), n)

    def _progressive_plan(
        self, features: Tensor, layout: TokenLayout, site: Site, num_merge: int
    ) -> Plan:
        """Windows over the original grid positions of the tokens still present."""
        rows, n, channels = features.shape
        positions = layout.positions[-rows:].expand(rows, -1)
        size = grown_window(layout.grid, self._window(site), n, num_merge)
        labels, count = window_labels(positions, layout.grid, size)
        index = labels.unsqueeze(-1).expand(-1, -1, channels)
        window_sum = features.new_zeros(rows, count, channels).scatter_add(1, index, features)
        # the highest dot product with the window's sum is the highest mean similarity to the
        # other members (as in _representative_slots)
        similarity = (features * window_sum.gather(1, index)).sum(-1)
        rep_token = best_per_window(similarity, labels, count)  # (P, windows)
        window_scope = self.config.scope_at(site) == "window"
        if self.config.destinations == "detail":
            return _detail_plan(features, rep_token, num_merge, labels if window_scope else None)
        if not window_scope:
            return self._global_plan(features, rep_token, num_merge)
        rep_of = rep_token.gather(1, labels)  # (P, n): every token's representative
        rep_features = features.gather(1, rep_of.unsqueeze(-1).expand(-1, -1, channels))
        return merge_into_representatives(rep_of, (features * rep_features).sum(-1), num_merge)
