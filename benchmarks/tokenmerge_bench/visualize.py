"""``tokenmerge visualize``: draw which tokens each strategy merges, on a photograph.

The model (a bench preset or a local checkpoint) denoises one bundled photograph, noised to a
timestep, once per strategy with merging applied; one site's plan from that call is drawn. The
figure is a grid of panels:

- **Top row**: the photograph, resized so every token of the site's ``h x w`` grid covers a
  square patch of whole pixels, and a legend with the model, the site and the settings.
- **One row per strategy**:

  - *assignment*: the dimmed photograph with every merged-away token tinted and linked by a thin
    line to the token it merged into; destinations (the tokens others merged into; for ReToM the
    window representatives) are dots, and ReToM's windows are a grid of thin lines.
  - *merged + unmerged*: the photograph's pixel patches, one per token, merged and unmerged with
    that same plan, as the site does to its hidden states. What merging loses shows as flat
    blocks; its PSNR against the photograph is in the title, with the tokens in -> out.

The plans come from the model's own features at the site (the noised latent of the photograph,
not its pixels), so the picture shows what a strategy groups, and the PSNR how much detail that
grouping would cost an image. With preset models the weights are random; similarity-based
self-attention (the default for presets) makes them attend to similar tokens, as trained
attention largely does.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmerge.api import apply
from tokenmerge.errors import (
    OutputPathError,
    TokenMergeError,
    UnknownNameError,
    unknown_name_message,
)
from tokenmerge.load import load_config
from tokenmerge.patch import SitePatch
from tokenmerge.plan import Plan
from tokenmerge.registry import list_strategies
from tokenmerge.windows import clamp_window
from tokenmerge_bench.photos import load_photo, patch_tokens, tokens_to_image
from tokenmerge_bench.report import check_writable
from tokenmerge_bench.runner import BenchSettings, load_bench_model, sharing_weights
from tokenmerge_bench.variants import nested
from tokenmerge_bench.workload import make_workload

__all__ = ["StrategyView", "Visualization", "collect", "psnr", "visualize"]

#: side of one panel in inches; the dpi is chosen so a token spans at least ``_TOKEN_PX`` pixels
_PANEL_INCHES = 5.0
_TOKEN_PX = 10
_MIN_DPI, _MAX_DPI = 100, 300
#: side of the bundled photographs in pixels
_PHOTO_SIDE = 256
#: characters per line of the settings text beside the photograph
_HEADER_COLUMNS = 64

_DIM = 0.5  # brightness of the photograph under the assignment
_TINT = (1.0, 0.55, 0.1, 0.35)  # merged-away tokens
_LINK = (1.0, 0.95, 0.65, 0.9)  # source -> destination (a neighbour's; longer links fade)
_LINK_MIN_ALPHA = 0.08
_DEST = "#29d3ff"  # destinations
_WINDOW = (1.0, 1.0, 1.0, 0.35)  # ReToM's windows


@dataclass
class StrategyView:
    """What one strategy did at the drawn site.

    Attributes:
        strategy: the strategy's name.
        site: the site's module name.
        grid: ``(h, w)`` of the site's image tokens.
        tokens_in: tokens reaching the site (prefix tokens included).
        tokens_out: tokens after the merge.
        plan: the site's plan over the image tokens alone, one row (prefix tokens removed).
        window: ReToM-style window ``(sy, sx)`` drawn over the grid, or None.
        psnr: PSNR in dB of the photograph's pixel patches merged and unmerged with the plan
            (``inf`` when nothing merged).
        unmerged: the photograph ``(3, H, W)`` in [0, 1] after merge and unmerge.
        skipped: why the site did not merge at this call, or None.
    """

    strategy: str
    site: str
    grid: tuple[int, int]
    tokens_in: int
    tokens_out: int
    plan: Plan
    window: tuple[int, int] | None
    psnr: float
    unmerged: Tensor
    skipped: str | None = None


@dataclass
class Visualization:
    """The plans of one ``visualize`` run, ready to draw (``save``) or print (``summary``).

    Attributes:
        model: the model's description (name, class, source, attention weights).
        input: the model input, in words.
        size: the image size in pixels.
        photo: the photograph's name.
        timestep: the timestep its latent was noised to.
        ratio: the merge ratio.
        image: the photograph, ``uint8 (3, 256, 256)``.
        views: one per strategy, in order.
    """

    model: dict[str, Any]
    input: str
    size: int
    photo: str
    timestep: int
    ratio: float
    image: Tensor
    views: list[StrategyView]

    def summary(self) -> str:
        """A few lines: the model and site, then per strategy the tokens in -> out and PSNR."""
        first = self.views[0]
        lines = [
            f"tokenmerge visualize: {self.model['name']}, {self.size} px, site {first.site} "
            f"({first.grid[0]} x {first.grid[1]} tokens), ratio {self.ratio:g}, {self.photo} "
            f"at timestep {self.timestep}",
            f"  attention weights: {self.model['attention']}",
        ]
        width = max(len(view.strategy) for view in self.views)
        for view in self.views:
            line = (
                f"  {view.strategy:<{width}}  {view.tokens_in} -> {view.tokens_out} tokens  "
                f"PSNR {view.psnr:.2f} dB"
            )
            if view.window is not None:
                line += f"  (windows {view.window[0]} x {view.window[1]})"
            if view.skipped:
                line += f"  (not merged: {view.skipped})"
            lines.append(line)
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        """Draw the figure into a PNG at ``path``."""
        figure = _figure(_matplotlib(), self)
        try:
            figure.savefig(path, format="png")
        except OSError as exc:
            raise OutputPathError(f"cannot write {path}: {exc.strerror or exc}") from exc


def psnr(value: Tensor, reference: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of ``value`` against ``reference``, both in [0, 1].

    Example:
        >>> round(psnr(torch.full((4,), 0.5), torch.full((4,), 0.75)), 2)
        12.04
        >>> psnr(torch.ones(2), torch.ones(2))
        inf
    """
    mse = float(((value.double() - reference.double()) ** 2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(1.0 / mse)


def visualize(
    model: str = "sd15",
    strategies: list[str] | None = None,
    ratio: float = 0.5,
    photo: str = "astronaut",
    site: str | None = None,
    timestep: int = 500,
    output: str | Path = "tokenmerge-merges.png",
    size: int | None = None,
    attention: str | None = None,
    similarity_scale: float = 3.0,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> str:
    """Draw what each strategy merges at one site of ``model`` into a PNG (see the module
    docstring); the engine of ``tokenmerge visualize``.

    Args:
        model: a bench preset (``sd15``, ``tiny-unet``...) or the folder of a local checkpoint.
        strategies: strategy names, one row each (default: every registered strategy).
        ratio: the merge ratio of every strategy.
        photo: the bundled photograph (``tokenmerge_bench.photos.PHOTOS``).
        site: the site's module name; default the first site the strategies patch.
        timestep: the diffusion timestep the photograph's latent is noised to.
        output: where the PNG goes.
        size: image size in pixels; default the model's.
        attention: ``"similarity"`` or ``"as-loaded"`` self-attention weights; default
            similarity for presets, as loaded for checkpoints (see ``tie_self_attention``).
        similarity_scale: the scale of the tied projections.
        device: the torch device the model runs on.
        dtype: the model's dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``).
        seed: seeds the preset's weights and the noise.
        overrides: merge-config fields set for every strategy.

    Returns:
        A short summary, one line per strategy: the tokens in -> out at the site and the PSNR.

    Raises:
        UnknownNameError: ``site`` is not one of the sites the strategies patch.
        TokenMergeError: ``output`` cannot be written, matplotlib is missing, or the site made
            no plan at the call.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "merges.png"
        >>> print(visualize("tiny-unet", ["retom"], output=out))  # doctest: +ELLIPSIS
        tokenmerge visualize: tiny-unet, ...
          retom  256 -> 128 tokens  PSNR ... dB
        >>> out.read_bytes()[:4]
        b'\\x89PNG'
    """
    _matplotlib()  # fail before the model runs, not after it
    check_writable(output)
    result = collect(
        model=model,
        strategies=strategies,
        ratio=ratio,
        photo=photo,
        site=site,
        timestep=timestep,
        size=size,
        attention=attention,
        similarity_scale=similarity_scale,
        device=device,
        dtype=dtype,
        seed=seed,
        overrides=overrides,
    )
    result.save(output)
    return result.summary()


def collect(
    model: str = "sd15",
    strategies: list[str] | None = None,
    ratio: float = 0.5,
    photo: str = "astronaut",
    site: str | None = None,
    timestep: int = 500,
    size: int | None = None,
    attention: str | None = None,
    similarity_scale: float = 3.0,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Visualization:
    """Run ``model`` once per strategy on the noised photograph and take the site's plans:
    what ``visualize`` draws, without drawing it. The arguments are ``visualize``'s.

    Example:
        >>> result = collect("tiny-unet", ["tome"], ratio=0.25)
        >>> view = result.views[0]
        >>> view.grid, view.tokens_in, view.tokens_out, view.plan.num_merged
        ((16, 16), 256, 192, 64)
    """
    strategies = list_strategies() if strategies is None else list(strategies)
    overrides = dict(overrides or {})
    settings = BenchSettings(
        model=model,
        strategies=strategies,
        ratios=[ratio],
        size=size,
        attention=attention,  # type: ignore[arg-type]
        similarity_scale=similarity_scale,
        device=device,
        dtype=dtype,
        seed=seed,
        overrides=overrides,
    )
    torch_device, torch_dtype = torch.device(device), getattr(torch, dtype)
    base, info, image_size = load_bench_model(settings, torch_device, torch_dtype)
    workload = make_workload(base, image_size, 1, torch_device, torch_dtype, seed)
    sample = workload.noisy_photo(photo, timestep)
    image = load_photo(photo)
    views = []
    for strategy in strategies:
        copy = sharing_weights(base)  # its own hooks, the same weights
        handle = apply(copy, load_config(strategy, ratio=ratio, **nested(overrides)))
        try:
            known = {patch.site.name: patch for patch in handle.patches}
            site = site or handle.sites[0].name
            if site not in known:
                raise UnknownNameError(
                    unknown_name_message(
                        "site",
                        site,
                        known,
                        hint="(the sites the merge config selects; select others with --set, "
                        "e.g. --set 'sites.levels=[1,2]')",
                    )
                )
            with torch.no_grad():
                workload(copy, sample, timestep)
            views.append(_view(strategy, known[site], image))
        finally:
            handle.remove()
    return Visualization(
        model=info,
        input=workload.describe(),
        size=image_size,
        photo=photo,
        timestep=timestep,
        ratio=ratio,
        image=image,
        views=views,
    )


# ---------------------------------------------------------------------- the plan at a site
def _view(strategy: str, patch: SitePatch, image: Tensor) -> StrategyView:
    """The site's latest plan, its grid and the photograph merged and unmerged with it."""
    name = patch.site.name
    plan = patch.last_plan
    stats = patch.stats
    if plan is None:
        reason = stats.pass_reason or "the site was not called"
        raise TokenMergeError(
            f"site {name!r} made no plan with {strategy} at this call ({reason}); pick another "
            "site with --site"
        )
    plan = plan.to("cpu")
    layout = patch.last_layout
    grid, prefix = layout.grid, layout.num_prefix
    image_plan = _image_plan(plan, prefix)
    side = max(1, _PHOTO_SIDE // max(grid))
    pixels = _resize(image, (grid[0] * side, grid[1] * side))
    tokens, _ = patch_tokens(pixels, side)
    unmerged_tokens = image_plan.unmerge(image_plan.merge(tokens))
    unmerged = tokens_to_image(unmerged_tokens, grid, side).clamp(0, 1)
    return StrategyView(
        strategy=strategy,
        site=name,
        grid=grid,
        tokens_in=plan.num_tokens,
        tokens_out=plan.num_out,
        plan=image_plan,
        window=_window(patch, grid),
        psnr=psnr(unmerged_tokens, tokens),
        unmerged=unmerged,
        skipped=stats.skipped,
    )


def _image_plan(plan: Plan, num_prefix: int) -> Plan:
    """Row 0 of ``plan`` over the image tokens alone: the inverse of ``Plan.with_prefix``."""
    k = num_prefix
    return Plan(
        kept=plan.kept[:1, k:] - k,
        src=plan.src[:1] - k,
        dst=plan.dst[:1] - k,
        origin=plan.origin[:1, k:] - k,
        dst_count=plan.dst_count[:1],
        num_tokens=plan.num_tokens - k,
    )


def _window(patch: SitePatch, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The windows a token merges within, for configs that have them (``window_for``, scope
    ``"window"`` in effect: ReToM and plugins shaped like it)."""
    window_for = getattr(patch.config, "window_for", None)
    scope = getattr(patch.config, "scope", None)
    scope_at = getattr(patch.config, "scope_at", None)  # retom's "auto" resolved
    if callable(scope_at):
        scope = scope_at(patch.site)
    if not callable(window_for) or scope != "window":
        return None
    size = window_for(patch.site)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return clamp_window(grid, size)


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``uint8 (3, H, W)`` -> float ``(3, *size)`` in [0, 1], antialiased."""
    pixels = image.float()[None] / 255.0
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True)
    return pixels[0].clamp(0, 1)


# ---------------------------------------------------------------------- text
def _header(result: Visualization) -> str:
    """The settings, for the panel beside the photograph."""
    first, model = result.views[0], result.model
    attention = "similarity-based" if "similarity" in model["attention"] else "as loaded"
    lines = [
        f"model: {model['name']} ({model['class']}); {model['source']}; self-attention: "
        f"{attention}",
        f"input: {result.photo}, noised to t={result.timestep}; {result.input}",
        f"site: {first.site}, {first.grid[0]} x {first.grid[1]} tokens; ratio {result.ratio:g}",
        "right: the photograph's pixel patches, one per token, merged and unmerged with each "
        "plan, as the site does to its hidden states; PSNR against the photograph",
    ]
    wrapped = [
        textwrap.fill(line, _HEADER_COLUMNS, subsequent_indent="  ", break_on_hyphens=False)
        for line in lines
    ]
    return "\n".join(wrapped)


# ---------------------------------------------------------------------- drawing
def _matplotlib() -> Any:
    """matplotlib's ``Figure`` and Agg canvas (no pyplot, so no global backend is switched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise TokenMergeError(
            "tokenmerge visualize draws with matplotlib, which is not installed: "
            "pip install matplotlib (a dependency of tokenmerge-bench)"
        ) from exc
    return Figure, FigureCanvasAgg


def _figure(mpl: Any, result: Visualization) -> Any:
    Figure, FigureCanvasAgg = mpl
    views = result.views
    grid = views[0].grid
    side = max(1, _PHOTO_SIDE // max(grid))
    photo = _resize(result.image, (grid[0] * side, grid[1] * side))
    longest = max(max(view.grid) for view in views)
    dpi = min(_MAX_DPI, max(_MIN_DPI, math.ceil(_TOKEN_PX * longest / _PANEL_INCHES)))
    rows = 1 + len(views)
    figure = Figure(
        figsize=(2 * _PANEL_INCHES, rows * (_PANEL_INCHES + 0.6)), dpi=dpi, layout="constrained"
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 2, squeeze=False)
    _image(axes[0][0], photo, grid)
    axes[0][0].set_title(
        f"photograph, {photo.shape[1]} x {photo.shape[2]} px = {grid[0]} x {grid[1]} tokens "
        f"of {side} x {side} px",
        fontsize=9,
    )
    _legend(axes[0][1], _header(result))
    for row, view in zip(axes[1:], views, strict=True):
        _assignment(row[0], photo, view)
        _image(row[1], view.unmerged, view.grid)
        psnr_text = "inf" if math.isinf(view.psnr) else f"{view.psnr:.2f}"
        row[1].set_title(
            f"{view.strategy}: the photograph merged + unmerged with this plan\n"
            f"{view.tokens_in} -> {view.tokens_out} tokens, PSNR {psnr_text} dB",
            fontsize=9,
        )
    return figure


def _image(axis: Any, pixels: Tensor, grid: tuple[int, int]) -> None:
    """Show ``pixels (3, H, W)`` with token coordinates: token ``(i, j)`` centred at ``(j, i)``."""
    h, w = grid
    axis.imshow(
        pixels.permute(1, 2, 0).numpy(),
        extent=(-0.5, w - 0.5, h - 0.5, -0.5),
        interpolation="nearest",
    )
    axis.set_xticks([])
    axis.set_yticks([])


def _assignment(axis: Any, photo: Tensor, view: StrategyView) -> None:
    from matplotlib.collections import LineCollection

    h, w = view.grid
    plan = view.plan
    _image(axis, photo * _DIM, view.grid)
    src = plan.src[0]
    dst = plan.kept[0].gather(0, plan.dst[0])  # slot -> the token it keeps
    overlay = torch.zeros(h * w, 4)
    overlay[src] = torch.tensor(_TINT)
    axis.imshow(
        overlay.view(h, w, 4).numpy(),
        extent=(-0.5, w - 0.5, h - 0.5, -0.5),
        interpolation="nearest",
    )
    token_pt = _PANEL_INCHES * 72 / max(h, w)  # a token's side in points
    if view.window is not None:
        sy, sx = view.window
        segments = [[(x - 0.5, -0.5), (x - 0.5, h - 0.5)] for x in range(sx, w, sx)]
        segments += [[(-0.5, y - 0.5), (w - 0.5, y - 0.5)] for y in range(sy, h, sy)]
        axis.add_collection(LineCollection(segments, colors=[_WINDOW], linewidths=0.5))
    if src.numel():
        starts = torch.stack([src % w, src // w], dim=-1).float()
        ends = torch.stack([dst % w, dst // w], dim=-1).float()
        length = (ends - starts).norm(dim=-1)
        # links between neighbours are drawn strong; long ones fade, so hundreds of links across
        # the image (ToMe matches over the whole grid) leave the photograph visible
        colors = torch.tensor(_LINK).repeat(len(src), 1)
        colors[:, 3] = (_LINK[3] * 1.5 / length.clamp(min=1.5)).clamp(min=_LINK_MIN_ALPHA)
        axis.add_collection(
            LineCollection(
                torch.stack([starts, ends], dim=1).numpy(),
                colors=colors.numpy(),
                linewidths=min(1.0, 0.12 * token_pt),
            )
        )
        targets = torch.unique(dst)
        diameter = min(6.0, max(1.5, 0.45 * token_pt))
        axis.scatter(
            (targets % w).numpy(),
            (targets // w).numpy(),
            s=diameter**2,
            c=_DEST,
            linewidths=0,
            zorder=3,
        )
        detail = f"{len(targets)} destinations"
        links = f"links {float(length.mean()):.1f} tokens long on average"
    else:
        detail, links = "nothing", "no links"
    window = "" if view.window is None else f"windows {view.window[0]} x {view.window[1]}; "
    axis.set_xlim(-0.5, w - 0.5)
    axis.set_ylim(h - 0.5, -0.5)
    axis.set_title(
        f"{view.strategy}: {plan.num_merged} of {plan.num_tokens} tokens merged into {detail}\n"
        f"{window}{links}",
        fontsize=9,
    )


def _legend(axis: Any, header: str) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    axis.axis("off")
    axis.text(
        0.0,
        1.0,
        header,
        va="top",
        ha="left",
        fontsize=8.5,
        family="monospace",
        linespacing=1.3,
        transform=axis.transAxes,
    )
    handles = [
        Patch(facecolor=_TINT[:3], alpha=_TINT[3], label="merged-away token (tinted)"),
        Line2D(
            [], [], color=_LINK[:3], linewidth=1.5, label="source -> its destination (long: faint)"
        ),
        Line2D(
            [],
            [],
            color=_DEST,
            marker="o",
            linestyle="",
            label="destination (ReToM: window representative)",
        ),
        Line2D([], [], color=_WINDOW[:3], alpha=0.6, linewidth=1, label="ReToM window"),
    ]
    legend = axis.legend(
        handles=handles,
        loc="lower left",
        fontsize=9,
        frameon=True,
        facecolor=(0.25, 0.25, 0.25),
        labelcolor="white",
        edgecolor="none",
    )
    legend.set_title("assignment panels", prop={"size": 9})
    legend.get_title().set_color("white")
