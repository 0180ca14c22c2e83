"""The arguments of tomesd and ToMe that users bring with them, and how tokenmerge spells each.

An unknown config field that is one of these names gets the translation in its error instead
of a bare "unknown field" (``tokenmerge.validation.format_validation_error``); docs/migration.md
has the full tables with side-by-side examples. tomesd's ``ratio``, ``sx`` and ``sy`` mean the
same here and need no entry.
"""

from __future__ import annotations

__all__ = ["PEER_NAMES", "peer_hint"]

#: a peer's argument -> (whose it is, what to write here instead)
PEER_NAMES: dict[str, tuple[str, str]] = {
    "max_downsample": (
        "tomesd",
        "choose levels with sites={'levels': ...}: max_downsample=1 (tomesd's default) is "
        "levels (1,), 2 is (1, 2), 4 is (1, 2, 4), 8 is (1, 2, 4, 8)",
    ),
    "use_rand": ("tomesd", "use random_destinations=True / False (tome and random strategies)"),
    "merge_crossattn": ("tomesd", "use sites={'cross_attn': True}"),
    "prop_attn": (
        "ToMe",
        "use adapter_options={'proportional_attention': True / False} (ViTs, progressive mode)",
    ),
    "trace_source": (
        "ToMe",
        "there is no source matrix: each site's plan is handle.patches[i].last_plan, and "
        "plan.origin maps every token to the slot it merged into",
    ),
}


def peer_hint(name: str) -> str | None:
    """What to write instead of another tool's argument ``name``, or None for other names.

    Example:
        >>> peer_hint("merge_crossattn")
        "merge_crossattn is tomesd's argument: use sites={'cross_attn': True}"
        >>> peer_hint("ratio") is None
        True
    """
    if name not in PEER_NAMES:
        return None
    owner, instead = PEER_NAMES[name]
    return f"{name} is {owner}'s argument: {instead}"
