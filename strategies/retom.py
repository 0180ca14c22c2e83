"""ReToM: local representative token guided merging (Lee, Kim, Lee, 2025).

1. Non-overlapping ``s x s`` windows over the site's token grid; ``s`` per stage (smaller windows
   in the down / up stages for local detail, larger in the bottleneck for global context). A window
   cut by the grid's edge is a smaller window.
2. In each window the *representative* is the token with the highest average cosine similarity to
   the window's other tokens. With unit features and ``S_W`` the window's feature sum, that average
   is ``(f_i . S_W - 1) / (|W| - 1)``: one dot product per token, ``O(N C)`` for the whole grid.
3. The ``r`` non-representatives most similar to their own window's representative merge into it
   (``scope="window"``, the default for diffusion models), or each non-representative joins the
   most similar representative anywhere (``scope="global"``, the default for ViTs). The
   representative is a real token, so positions stay exact.
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

from tokenmerge.config import (
    MAX_CELL,
    Levels,
    MergeConfig,
    not_empty,
    per_site_values,
    resolve_per_site,
    selector_keys,
)
from tokenmerge.errors import ConfigError
from tokenmerge.plan import Plan
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout
from tokenmerge.strategy import Strategy, merge_into_representatives, pick_top
from tokenmerge.windows import (
    best_per_window,
    grown_window,
    num_windows,
    window_labels,
    window_partition,
)

__all__ = ["ReToMConfig", "ReToMStrategy", "representatives"]


class ReToMConfig(MergeConfig):
    """Configuration of ``retom``.

    Example:
        >>> import tokenmerge
        >>> config = tokenmerge.load_config("retom", ratio=0.5, window_size={"mid": 4, "*": 2})
        >>> config.scope_in(progressive=False), config.cache_interval
        ('window', 5)
    """

    strategy: Literal["retom"] = Field(default="retom", description="Always 'retom'.")
    window_size: int | dict[str, int] | tuple[int, ...] = Field(
        default={"down": 6, "mid": 8, "up": 6, "*": 2},
        description=(
            "Side of the square windows, at least 2: one number, one per block (a list indexed "
            "by block: a depth schedule for DiT-style transformers), or a mapping from site "
            "selector (module-name glob, stage 'down' / 'mid' / 'up' or 'first' / 'middle' / "
            "'last', level digits, '*') to a size. Default {'down': 6, 'mid': 8, 'up': 6, "
            "'*': 2}: in a UNet, SD 1.5 at 512 px (tokenmerge bench's defaults, 2026-11-22: "
            "similarity-based attention, ratio 0.5, window scope, value correction) has block "
            "errors of 0.365 with {down 2, mid 4, up 2}, 0.283 with {4, 6, 4} and 0.256 with "
            "{6, 8, 6} (tomesd: 0.423); larger windows in the bottleneck, as the paper says. 2 in "
            "transformers: on the reference DiT trained here (learned attention, ratio 0.5, "
            "window scope) the held-out denoising loss rises by 38.7 % with 2 x 2 windows, "
            "39.7 % with 3 x 3, 47.6 % with 4 x 4 and 51.0 % with 6 x 6. "
            "The ratio may not exceed "
            "1 - 1 / s**2 for the smallest s (one representative per window stays)."
        ),
    )
    scope: Literal["auto", "window", "global"] = Field(
        default="auto",
        description=(
            "'window': a token merges into its own window's representative (the paper's local "
            "boundaries); 'global': into the most similar representative anywhere (costs "
            "N x windows similarities per plan); 'auto': 'window' where plans are cached across "
            "denoising steps (diffusion models), 'global' in progressive mode (ViTs). Default "
            "'auto', measured 2026-11-22: window scope lowers SD 1.5's block error from 0.298 to "
            "0.271 at 512 px (tokenmerge bench: similarity-based attention, ratio 0.5, 6 x 6 "
            "windows, value correction; tomesd: 0.468) and plans in 2.8 ms per forward instead "
            "of 5.0; on the reference DiT trained here (learned attention) it raises the "
            "held-out denoising loss by 38.7 % instead of 48.6 % at ratio 0.5 (2 x 2 windows), "
            "and at every window size tried (2 to 8) and ratio but 2 x 2 at 0.75; on the reference "
            "ViT, global scope keeps more predictions (94.9 % agreement against 92.5 % at r=8)."
        ),
    )
    value_correction: bool = Field(
        default=True,
        description=(
            "Value-corrected unmerge at self-attention sites (see MergeConfig.value_correction). "
            "Default on: on SD 1.5 with similarity-based attention at ratio 0.5 (tokenmerge "
            "bench, 2026-11-22) the block error is 0.271 with it against 0.487 without at 512 px "
            "(tomesd: 0.468), for 0.7 points more overhead; on the reference DiT trained here "
            "(learned attention) the held-out denoising loss rises by 38.7 % with it against "
            "54.5 % without at ratio 0.5. Its fitted weight goes to 0 where attention does not "
            "favour the token itself."
        ),
    )
    cache_interval: int = Field(
        default=5,
        ge=1,
        description=(
            "Compute a site's plan once every this many denoising steps and reuse it in between; "
            "always recomputed on a new generation or a change of batch, token count, device or "
            "dtype. Default 5 (10 plans in a 50-step generation): the paper caches similarity "
            "across steps but gives no interval; on the reference DiT trained here (learned "
            "attention, 50 steps, ratio 0.5) the held-out denoising loss rises by 36.6 % when "
            "planning every step, 37.1 % every 2, 38.7 % every 5 and 41.5 % every 10. On SD 1.5 "
            "at 512 px planning then costs 0.1 % of the forward, and the value correction's "
            "fit, made with each plan, 0.2 % (tokenmerge bench, 2026-11-22)."
        ),
    )

    levels: Levels | None = Field(
        default=None,
        description=(
            "Only sites at these downsample levels (1 = full resolution, 2 = half...). Default "
            "None: the adapter's choice, the finest level that has attention (SD 1.5's level 1, "
            "tomesd's sites). Measured 2026-11-22 on SD 1.5 at 768 px (similarity-based "
            "attention, ratio 0.5): x1.371 over no merging with block error 0.269; levels (1, 2) "
            "with merge_mlp=True give x1.605 at 0.330 (tomesd: x1.303 at 0.426): the default "
            "keeps the error, the second level and the MLP buy speed."
        ),
    )
    share_cfg_plan: bool = Field(
        default=False,
        description=(
            "With an even batch, plan on the second half (the conditional half in the [uncond, "
            "cond] order of most diffusers pipelines; DiTPipeline puts cond first) and use that "
            "plan for both halves. Sites that share one plan across the batch (Flux) ignore it. "
            "Default off: on SD 1.5 at 512 px with a classifier-free-guidance batch (one latent, "
            "two prompts) the block error is 0.2682 with a plan per sample and 0.2681 with a "
            "shared one (2026-11-22), so sharing buys nothing but half a plan, and off keeps "
            "every sample's output independent of the rest of the batch."
        ),
    )

    @field_validator("window_size", mode="before")
    @classmethod
    def _window_keys(cls, value: object) -> object:
        return selector_keys(value, "window_size")

    @field_validator("window_size")
    @classmethod
    def _window_at_least_two(cls, value: int | dict[str, int] | tuple[int, ...]) -> object:
        not_empty(value, "window_size")
        for size in per_site_values(value):
            if size < 2:
                raise ValueError(
                    f"window_size {size} is too small: a window side must be at least 2 "
                    "tokens so something can merge into its representative"
                )
            if size > MAX_CELL:
                raise ValueError(f"window_size {size} is too large: at most {MAX_CELL} tokens")
        return value

    def scope_in(self, progressive: bool) -> Literal["window", "global"]:
        """The scope in effect: ``scope`` itself, or what ``"auto"`` means in this mode."""
        if self.scope != "auto":
            return self.scope
        return "global" if progressive else "window"

    def smallest_window(self) -> int:
        return min(per_site_values(self.window_size))

    def ratio_limit(self) -> float:
        return 1.0 - 1.0 / self.smallest_window() ** 2

    def ratio_limit_reason(self) -> str:
        s = self.smallest_window()
        return f"one representative per {s} x {s} window stays"

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
    valid = windows >= 0
    # padding slots hold token 0's features: left out of the sums, masked in every result
    members = features[:, windows.clamp(min=0)]  # (P, W, K, C)
    window_sum = valid.to(members.dtype)[:, None, :] @ members  # (P, W, 1, C)
    count = valid.sum(dim=1, keepdim=True)  # (W, 1)
    # mean similarity to the other members; a window of one token is its own representative
    # (dot products as batched matrix-vector products: no (P, W, K, C) temporary)
    mean_similarity = (_dots(members, window_sum) - 1) / (count - 1).clamp(min=1)
    blocked = float("-inf")  # a Python scalar: no host-to-device copy
    rep_slot = torch.where(valid, mean_similarity, blocked).argmax(dim=-1)
    rep = members.gather(2, rep_slot[..., None, None].expand(-1, -1, 1, members.shape[-1]))
    to_rep = _dots(members, rep)
    is_rep = torch.zeros(to_rep.shape, dtype=torch.bool, device=features.device)
    is_rep.scatter_(2, rep_slot.unsqueeze(-1), True)
    return rep_slot, torch.where(valid & ~is_rep, to_rep, blocked)


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
        windows = window_partition(layout.grid, self._window(site), features.device)
        rows = features.shape[0]
        rep_slot, to_rep = representatives(features, windows)
        rep_token = windows.expand(rows, -1, -1).gather(2, rep_slot.unsqueeze(-1)).squeeze(-1)
        if self.config.scope_in(progressive=False) == "window":
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
        members = features.new_zeros(rows, count).scatter_add(
            1, labels, torch.ones_like(labels, dtype=features.dtype)
        )
        own_sum = window_sum.gather(1, index)
        own_count = members.gather(1, labels)
        mean_similarity = ((features * own_sum).sum(-1) - 1) / (own_count - 1).clamp(min=1)
        rep_token = best_per_window(mean_similarity, labels, count)  # (P, windows)
        if self.config.scope_in(progressive=True) == "global":
            return self._global_plan(features, rep_token, num_merge)
        rep_of = rep_token.gather(1, labels)  # (P, n): every token's representative
        rep_features = features.gather(1, rep_of.unsqueeze(-1).expand(-1, -1, channels))
        return merge_into_representatives(rep_of, (features * rep_features).sum(-1), num_merge)
