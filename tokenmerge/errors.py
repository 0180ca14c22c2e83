"""One hierarchy for every error and warning tokenmerge raises.

Every message says what was wrong, what is allowed and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TokenMergeError(Exception):
    """Base class of every tokenmerge error."""


class TokenMergeWarning(UserWarning):
    """Base class of every tokenmerge warning."""


class ConfigError(TokenMergeError, ValueError):
    """A merge configuration was rejected (bad value, unknown field, impossible ratio...)."""


class UnknownNameError(TokenMergeError, KeyError):
    """A strategy, adapter or plugin name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownStrategyError(UnknownNameError, ConfigError):
    """No strategy of that name is registered."""


class UnknownAdapterError(UnknownNameError):
    """No adapter of that name is registered."""


class DuplicateNameError(TokenMergeError, ValueError):
    """A strategy or adapter name is registered twice without ``replace=True``."""


class UnsupportedModelError(TokenMergeError, TypeError):
    """No available adapter supports the model (or its adapter's library is missing)."""


class NoSitesError(TokenMergeError, ValueError):
    """The configuration selected no merge site in the model."""


class UnmatchedSelectorError(NoSitesError, ConfigError):
    """A selector the user wrote (a per-site mapping key, an include / exclude glob, a level,
    stage or block) selects no site of the model being patched, or a per-block list does not
    have one value per block."""


class AlreadyAppliedError(TokenMergeError, RuntimeError):
    """``apply`` was called on a model that is already patched."""


class PluginError(TokenMergeError):
    """A plugin could not be registered."""


class InvalidPlanError(TokenMergeError, ValueError):
    """A strategy returned a plan (or a capacity) that breaks the plan contract."""


class ModelLoadError(TokenMergeError, ValueError):
    """A local checkpoint folder could not be loaded (missing, unrecognised, corrupt...)."""


class OutputPathError(TokenMergeError, ValueError):
    """A file the command was asked to write cannot be written there."""


class InputError(TokenMergeError, ValueError):
    """A patched model, a site or a strategy was handed something it cannot work with: hidden
    states of the wrong layout, a module that changed the token count, a timestep of the wrong
    type, features that do not fit the grid (the message names the site or strategy), an image
    size the model cannot take."""


class ShortfallWarning(TokenMergeWarning):
    """A site could merge fewer tokens than the ratio asked for."""


class RatioWarning(TokenMergeWarning):
    """A ratio that merges more than a model is known to take without a clear loss."""


class NothingMergedWarning(TokenMergeWarning):
    """A site merged nothing in a whole forward (its input was not tokens it can merge, or too
    few of them); warned once per site."""


class CompiledModelWarning(TokenMergeWarning):
    """``apply`` was handed a ``torch.compile``'d module and patched the module it wraps: a
    graph compiled before the patch does not see it."""


class PluginWarning(TokenMergeWarning):
    """A third-party plugin failed to load and was skipped."""


def close_matches(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Names in ``known`` that look like ``name`` (for "did you mean" hints)."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)


def unknown_name_message(kind: str, name: str, known: Iterable[str], hint: str = "") -> str:
    """``unknown <kind> 'name'; known: a, b; did you mean: ...`` with an optional fix hint."""
    known = sorted(known)
    plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
    message = f"unknown {kind} {name!r}; known {plural}: {', '.join(known) or '(none)'}"
    matches = close_matches(name, known)
    if matches:
        message += f"; did you mean {' or '.join(repr(m) for m in matches)}?"
    if hint:
        message += f" {hint}"
    return message
