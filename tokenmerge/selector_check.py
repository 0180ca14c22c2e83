"""Every selector the user wrote must select a site of the model being patched.

A ``ratio={"up_blocks.1.*": 0.5}`` whose glob matches nothing (``*`` stays within one name part),
``ratio={"down": 0.5}`` on a ViT (no stages called down) or a typo in ``exclude`` would otherwise
leave the model merging differently than asked, without a word. ``apply`` calls
``check_selectors`` once it has chosen the sites:

- every glob, level, stage and block in ``sites`` must match a candidate site of the model;
- every key of a per-site mapping (``ratio``, ``window_size``, any ``PerSite`` field) must decide
  the value of at least one site that merges, except ``"*"`` (the default for the sites no other
  key selects, which may be none). A mapping equal to its field's default is the strategy's
  default, meant for any model (ReToM's ``{"down": 6, "mid": 8, "up": 6, "*": 4}`` on a ViT),
  and is not checked. The default is told apart by value, not by ``model_fields_set``: a config
  dumped and loaded back has every field set;
- a per-block tuple must have one value per block of the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import UnmatchedSelectorError, close_matches
from .selectors import STAGES, Sites, deciding_key, per_site_fields, selector_kind, selects
from .site import GLOB_RULE, Site

__all__ = ["check_selectors"]


def check_selectors(config: Any, candidates: Sequence[Site], chosen: Sequence[Site]) -> None:
    """Raise ``UnmatchedSelectorError`` for a selector of ``config`` that selects no site.

    Args:
        config: the ``MergeConfig`` being applied.
        candidates: every candidate site the adapter found in the model.
        chosen: the sites that merge (after ``config.sites`` and the adapter's default).

    Example:
        >>> from tokenmerge import load_config
        >>> from tokenmerge.site import Site
        >>> sites = [Site(f"blocks.{i}", stage="first", block_index=i) for i in (0, 1)]
        >>> check_selectors(load_config("tome", ratio={"blocks.1": 0.3}), sites, sites)
        >>> check_selectors(load_config("tome", ratio={"down": 0.3}), sites, sites)
        Traceback (most recent call last):
        ...
        tokenmerge.errors.UnmatchedSelectorError: ratio key 'down' selects no site ...
    """
    _check_filters(config.sites, candidates)
    for name in per_site_fields(type(config)):
        value = getattr(config, name)
        if isinstance(value, tuple):
            _check_length(name, value, candidates)
        elif isinstance(value, Mapping) and value != _default(config, name):
            _check_mapping(name, value, candidates, chosen)


def _default(config: Any, name: str) -> Any:
    return type(config).model_fields[name].get_default(call_default_factory=True)


def _shown(names: Sequence[str], limit: int = 6) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _present(values: set[Any]) -> str:
    # stages in model order (down, mid, up / first, middle, last), levels by size
    ordered = sorted(values, key=lambda v: (STAGES.index(v), 0) if v in STAGES else (-1, v))
    return ", ".join(str(v) for v in ordered) or "none"


def _glob_hint(pattern: str, candidates: Sequence[Site]) -> str:
    """Close names, a ``**`` spelling that would match, and the glob rule."""
    names = [site.name for site in candidates]
    hints = []
    crossing = pattern.replace("**", "\0").replace("*", "**").replace("\0", "**")
    if crossing != pattern and any(site.matches(crossing) for site in candidates):
        hints.append(f"did you mean {crossing!r}?")
    matches = close_matches(pattern, names)
    if matches:
        hints.append(f"close names: {', '.join(matches)}")
    elif names:
        hints.append(f"names here: {_shown(names)}")
    return "; ".join([*hints, GLOB_RULE])


def _check_filters(sites: Sites, candidates: Sequence[Site]) -> None:
    for field in ("include", "exclude"):
        for pattern in getattr(sites, field):
            if not any(site.matches(pattern) for site in candidates):
                raise UnmatchedSelectorError(
                    f"sites.{field} glob {pattern!r} matches no site of this model; "
                    f"{_glob_hint(pattern, candidates)}. Fix or drop the glob."
                )
    for field, attribute in (("levels", "level"), ("stages", "stage")):
        present = {getattr(site, attribute) for site in candidates} - {None}
        for value in getattr(sites, field) or ():
            if value not in present:
                raise UnmatchedSelectorError(
                    f"sites.{field} {value!r} matches no site of this model ({field} here: "
                    f"{_present(present)}); fix or drop it"
                )
    count = _block_count(candidates)
    for block in sites.blocks or ():
        if count is None or not -count <= block < count:
            raise UnmatchedSelectorError(
                f"sites.blocks {block} is no block of this model ({_blocks_here(count)}); "
                "fix or drop it"
            )


def _block_count(candidates: Sequence[Site]) -> int | None:
    indices = [site.block_index for site in candidates if site.block_index is not None]
    return max(indices) + 1 if indices else None


def _blocks_here(count: int | None) -> str:
    if count is None:
        return "its sites have no block order"
    return f"it has {count} blocks: 0 to {count - 1}, or -{count} to -1 from the end"


def _check_length(name: str, value: tuple[Any, ...], candidates: Sequence[Site]) -> None:
    count = _block_count(candidates)
    given = f"{name} is a per-block list of {len(value)} value{'s' * (len(value) != 1)}"
    if count is None:
        raise UnmatchedSelectorError(
            f"{given}, but the sites of this model "
            "have no block order; give one value or a mapping of site selectors"
        )
    if len(value) != count:
        raise UnmatchedSelectorError(
            f"{given}, but this model has {count} "
            f"blocks; give exactly {count} values (one per block, in order), one value, or a "
            "mapping of site selectors"
        )


def _check_mapping(
    name: str, mapping: Mapping[str, Any], candidates: Sequence[Site], chosen: Sequence[Site]
) -> None:
    for key in mapping:
        if key == "*":
            continue
        selected = [site for site in chosen if selects(key, site)]
        if not selected:
            raise UnmatchedSelectorError(
                f"{name} key {key!r} selects no site that merges: "
                f"{_why_unmatched(key, candidates, chosen)}. Fix or drop the key."
            )
        if not any(deciding_key(mapping, site) == key for site in selected):
            deciders = sorted({str(deciding_key(mapping, site)) for site in selected})
            raise UnmatchedSelectorError(
                f"{name} key {key!r} decides no site: every site it selects "
                f"({_shown([s.name for s in selected])}) takes its value from "
                f"{', '.join(repr(k) for k in deciders)} (globs first, in order, then stages, "
                "levels, '*'). Drop the key or make it more specific."
            )


def _why_unmatched(key: str, candidates: Sequence[Site], chosen: Sequence[Site]) -> str:
    elsewhere = [site.name for site in candidates if selects(key, site)]
    if elsewhere:
        return (
            f"it selects only sites that the sites filters leave out ({_shown(elsewhere)}); "
            f"the sites that merge are {_shown([site.name for site in chosen])}. Add its sites "
            "with sites={'levels': ...} / {'include': [...]}"
        )
    kind = selector_kind(key)
    if kind == "stage":
        stages = {site.stage for site in candidates} - {None}
        return f"no site of this model is in stage {key!r} (stages here: {_present(stages)})"
    if kind == "level":
        levels = {site.level for site in candidates} - {None}
        return f"no site of this model is at level {key} (levels here: {_present(levels)})"
    return f"it matches no site of this model; {_glob_hint(key, candidates)}"
