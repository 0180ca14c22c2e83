"""What every check of the kit shares: its failure, its subject, running many, patching a model.

A check runs inside ``failing_as(check, subject, case)``, which turns whatever goes wrong into one
``AssertionError`` naming the check, what it checks (a strategy with its options, or an adapter
with a strategy and a model) and the case; ``run_all`` runs a list of checks and raises one error
listing every failure. Adapter checks work on a ``ModelTrial``: a fresh model with the way to run
and patch it, its outputs (every tensor it returns, by path) and a snapshot of what exact removal
must restore.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from tokenmerge.api import Handle, apply
from tokenmerge.errors import RatioWarning, ShortfallWarning
from tokenmerge.load import load_config
from tokenmerge.registry import registry

#: an output's tensors with their paths (``output[0]``, ``output.sample``...)
Outputs = list[tuple[str, Tensor]]
#: what exact removal restores: every module's class, ``vars()`` keys and hook keys; the state dict
Snapshot = tuple[dict, dict]

# ---------------------------------------------------------------------------- failures


class Failure(AssertionError):
    """A failure already worded with its check, subject and case (not wrapped again)."""


def require(condition: object, message: str) -> None:
    # not ``assert``: checks must keep working under ``python -O``
    if not condition:
        raise AssertionError(message)


@contextmanager
def failing_as(check: str, subject: str, case: str = "") -> Iterator[None]:
    """Turn anything raised inside into one ``AssertionError`` naming the check and the case."""
    try:
        yield
    except Failure:
        raise
    except Exception as error:
        where = f"{check}: {subject}" + (f" ({case})" if case else "")
        if isinstance(error, AssertionError):
            raise Failure(f"{where}: {error}") from None
        raise Failure(f"{where}: raised {type(error).__name__}: {error}") from error


def run_all(calls: Sequence[Callable[[], None]], subject: str) -> None:
    """Run every check; raise one ``AssertionError`` listing all that failed."""
    failures: list[AssertionError] = []
    for call in calls:
        try:
            call()
        except AssertionError as failure:
            failures.append(failure)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        listed = "\n".join(f"- {failure}" for failure in failures)
        raise AssertionError(f"{len(failures)} checks failed for {subject}:\n{listed}") from (
            failures[0]
        )


def adapter_subject(adapter: str | None, strategy: str | None = None) -> str:
    """``adapter 'name'`` (or chosen by ``apply``), with the strategy when there is one."""
    text = f"adapter {adapter or '(chosen by apply)'!r}"
    return text + (f", strategy {strategy!r}" if strategy is not None else "")


# ---------------------------------------------------------------------------- outputs


def tensors(value: Any, path: str = "output") -> Outputs:
    """Every tensor in ``value`` (a tensor, mapping, sequence or dataclass), with its path."""
    if isinstance(value, Tensor):
        return [(path, value.detach())]
    if isinstance(value, Mapping):
        items = [(f"{path}[{key!r}]", item) for key, item in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    else:
        return []
    return [found for sub, item in items for found in tensors(item, sub)]


def same_form(expected: Outputs, got: Outputs, what: str) -> None:
    require(
        [p for p, _ in got] == [p for p, _ in expected],
        f"{what}: the output structure changed ({[p for p, _ in got]})",
    )


def same_outputs(expected: Outputs, got: Outputs, what: str) -> None:
    same_form(expected, got, what)
    for (path, e), (_, g) in zip(expected, got, strict=True):
        require(
            e.shape == g.shape, f"{what}: {path} has shape {tuple(g.shape)}, not {tuple(e.shape)}"
        )
        require(e.dtype == g.dtype, f"{what}: {path} is {g.dtype}, not {e.dtype}")
        if not torch.equal(e, g):
            diff = (e.double() - g.double()).abs().max().item() if e.is_floating_point() else "?"
            raise AssertionError(f"{what}: {path} differs (largest difference {diff})")


# ---------------------------------------------------------------------------- snapshots


def snapshot(model: nn.Module) -> Snapshot:
    """Class, ``vars()`` keys and hook keys of every module; the state dict, copied."""
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        hooks = {
            key: list(value)
            for key, value in vars(module).items()
            if "hook" in key and isinstance(value, dict)
        }
        modules[name or "(root)"] = (type(module), sorted(vars(module)), hooks)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return modules, state


def same_snapshot(before: Snapshot, after: Snapshot, what: str) -> None:
    modules, state = before
    now_modules, now_state = after
    require(list(now_modules) == list(modules), f"{what}: the module tree changed")
    for name, (cls, keys, hooks) in modules.items():
        now_cls, now_keys, now_hooks = now_modules[name]
        require(now_cls is cls, f"{what}: {name} is a {now_cls.__name__}, was a {cls.__name__}")
        added = sorted(set(now_keys) - set(keys))
        gone = sorted(set(keys) - set(now_keys))
        require(not added and not gone, f"{what}: vars() of {name}: added {added}, removed {gone}")
        for key, ids in hooks.items():
            require(
                now_hooks[key] == ids, f"{what}: {name}.{key} holds {now_hooks[key]}, was {ids}"
            )
    require(list(now_state) == list(state), f"{what}: the state_dict keys changed")
    for key, value in state.items():
        require(torch.equal(now_state[key], value), f"{what}: state_dict[{key!r}] changed")


# ---------------------------------------------------------------------------- a patched model


@dataclass
class ModelTrial:
    """One adapter check's model: run it, patch it, snapshot it.

    Attributes:
        model: a fresh model from the check's factory.
        run: calls the model on fixed inputs and returns its output.
        strategy: the strategy's registered name.
        adapter: the adapter's name (None: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply`` (the trial sets ``ratio``).
    """

    model: nn.Module
    run: Callable[[nn.Module], Any]
    strategy: str
    adapter: str | None
    overrides: Mapping[str, Any]

    @property
    def subject(self) -> str:
        return f"{adapter_subject(self.adapter, self.strategy)}, model {type(self.model).__name__}"

    @cached_property
    def merge_ratio(self) -> float:
        """0.5, or the strategy's ratio limit where that is lower."""
        fields = registry.strategy(self.strategy).config_class.model_fields
        config = {k: v for k, v in self.overrides.items() if k in fields and k != "ratio"}
        return min(0.5, load_config(self.strategy, **config).ratio_limit())

    def outputs(self, model: Callable[..., Any] | None = None) -> Outputs:
        """The tensors ``run`` returns for the model (or ``model``, e.g. its compiled form)."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ShortfallWarning)  # a shortfall is not a failure here
            found = tensors(self.run(self.model if model is None else model))
        require(found, "run(model) returned no tensor (return the model's output)")
        return found

    def patch(self, ratio: float | None = None) -> Handle:
        """``tokenmerge.apply`` with the overrides, at ``ratio`` (default: ``merge_ratio``)."""
        ratio = self.merge_ratio if ratio is None else ratio
        with warnings.catch_warnings():
            # the checks merge hard on purpose, so that merging shows; quality is not checked
            warnings.simplefilter("ignore", RatioWarning)
            return apply(
                self.model,
                self.strategy,
                adapter=self.adapter,
                **{**self.overrides, "ratio": ratio},
            )

    def snapshot(self) -> Snapshot:
        return snapshot(self.model)

    def restored(self, before: Snapshot, expected: Outputs, what: str) -> None:
        """The model is as ``before`` and gives ``expected`` again."""
        same_snapshot(before, self.snapshot(), what)
        same_outputs(expected, self.outputs(), what)


@contextmanager
def model_trial(
    check: str,
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None,
    overrides: Mapping[str, Any] | None,
) -> Iterator[ModelTrial]:
    """A fresh model's trial, with anything raised inside worded as a failure of ``check``."""
    trial = ModelTrial(model_factory(), run, strategy, adapter, overrides or {})
    with failing_as(check, trial.subject):
        yield trial


def merged_somewhere(handle: Handle, what: str) -> None:
    """Some site reached by the call just made merged a token (else say what each site did)."""
    stats = handle.stats()
    reached = {name: s for name, s in stats.items() if s.calls or s.passed_through}
    require(reached, f"{what}: no site was called (does run(model) reach {sorted(stats)}?)")
    if any(s.calls and s.tokens_out < s.tokens_in for s in reached.values()):
        return
    seen = [
        f"{name} passed {s.passed_through} calls through ({s.pass_reason})"
        if s.passed_through
        else f"{name} {s.tokens_in} -> {s.tokens_out} tokens"
        + (f" (skipped: {s.skipped})" if s.skipped else "")
        for name, s in reached.items()
    ]
    raise AssertionError(f"{what}: no site merged a token: {'; '.join(seen)}")
