"""The adapter checks: what ``tokenmerge.apply`` must guarantee on any model an adapter patches.

Each check builds a fresh model from the factory it is given, runs it through ``run`` and
compares every tensor of the output (see ``check_adapter``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tokenmerge.api import Handle, remove
from tokenmerge.errors import AlreadyAppliedError
from tokenmerge.registry import registry

from ._scaffold import (
    adapter_subject,
    merged_somewhere,
    model_trial,
    require,
    run_all,
    same_form,
    same_outputs,
    same_snapshot,
)


def check_ratio_zero_is_bit_identical(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """At ratio 0 the patched model's outputs are bit-identical to the unpatched model's.

    Run twice (the second call goes through the plan cache); every site that was called reports
    as many tokens out as in.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output (tensors, or a tuple, mapping
            or dataclass holding them: all are compared).
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply`` (``sites``,
            ``adapter_options``...); the checks set ``ratio`` themselves.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    with model_trial(
        "ratio_zero_is_bit_identical", model_factory, run, strategy, adapter, overrides
    ) as trial:
        expected = trial.outputs()
        with trial.patch(0.0) as handle:
            same_outputs(expected, trial.outputs(), "first call at ratio 0")
            same_outputs(expected, trial.outputs(), "second call at ratio 0")
            for name, stats in handle.stats().items():
                require(
                    not stats.calls or stats.tokens_out == stats.tokens_in,
                    f"site {name} went {stats.tokens_in} -> {stats.tokens_out} tokens at ratio 0",
                )


def check_output_shapes_unchanged(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """At ratio 0.5 the outputs keep their structure, shapes and dtypes, and stay finite.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    with model_trial(
        "output_shapes_unchanged", model_factory, run, strategy, adapter, overrides
    ) as trial:
        expected = trial.outputs()
        with trial.patch():
            got = trial.outputs()
        same_form(expected, got, f"at ratio {trial.merge_ratio}")
        for (path, e), (_, g) in zip(expected, got, strict=True):
            require(
                (g.shape, g.dtype, g.device) == (e.shape, e.dtype, e.device),
                f"{path} is {tuple(g.shape)} {g.dtype} on {g.device}, was "
                f"{tuple(e.shape)} {e.dtype} on {e.device}",
            )
            require(not g.is_floating_point() or bool(g.isfinite().all()), f"{path} not finite")


def check_tokens_merge(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """At ratio 0.5 merging really happens: some site's tokens shrink and the outputs change.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    with model_trial("tokens_merge", model_factory, run, strategy, adapter, overrides) as trial:
        expected = trial.outputs()
        with trial.patch() as handle:
            got = trial.outputs()
            merged_somewhere(handle, f"ratio {trial.merge_ratio}")
        require(
            any(not torch.equal(e, g) for (_, e), (_, g) in zip(expected, got, strict=True)),
            "the sites merged but every output equals the unpatched model's",
        )


def check_remove_restores_exactly(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """``Handle.remove()`` (and ``tokenmerge.remove``) restore the model exactly.

    After patched calls at ratio 0.5: every module has its class, its ``vars()`` keys and its
    hooks back, the state dict is unchanged, the outputs are bit-identical; removing again does
    nothing; ``tokenmerge.remove(model)`` returns True once, then False, and the handle's own
    ``remove()`` after it does nothing.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    with model_trial(
        "remove_restores_exactly", model_factory, run, strategy, adapter, overrides
    ) as trial:
        model = trial.model
        before, expected = trial.snapshot(), trial.outputs()
        handle = trial.patch()
        require(not handle.removed, "a fresh handle says it is removed")
        trial.outputs()
        trial.outputs()
        handle.remove()
        require(handle.removed, "handle.removed is False after remove()")
        trial.restored(before, expected, "after handle.remove()")
        handle.remove()
        same_snapshot(before, trial.snapshot(), "after a second handle.remove()")
        require(remove(model) is False, "tokenmerge.remove found a patch after handle.remove()")
        handle = trial.patch()
        trial.outputs()
        require(remove(model) is True, "tokenmerge.remove(model) did not find the patch")
        require(handle.removed, "tokenmerge.remove(model) left the handle unremoved")
        require(remove(model) is False, "a second tokenmerge.remove(model) found a patch")
        trial.restored(before, expected, "after tokenmerge.remove(model)")
        handle.remove()
        same_snapshot(before, trial.snapshot(), "after handle.remove() following tokenmerge.remove")


def check_context_manager_restores_exactly(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """``with tokenmerge.apply(...) as handle:`` merges inside and restores exactly on exit.

    Also when the body raises: the exception propagates and the model is restored.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """

    class _Boom(Exception):
        pass

    with model_trial(
        "context_manager_restores_exactly", model_factory, run, strategy, adapter, overrides
    ) as trial:
        before, expected = trial.snapshot(), trial.outputs()
        with trial.patch() as handle:
            require(isinstance(handle, Handle), f"__enter__ returned {type(handle).__name__}")
            trial.outputs()
            merged_somewhere(handle, "inside the with block")
        require(handle.removed, "leaving the with block did not remove the patch")
        trial.restored(before, expected, "after the with block")
        try:
            with trial.patch():
                trial.outputs()
                raise _Boom
        except _Boom:
            pass
        trial.restored(before, expected, "after a with block that raised")
        require(remove(trial.model) is False, "a with block that raised left a patch behind")


def check_second_apply_raises(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """Applying to a patched model raises ``AlreadyAppliedError`` and changes nothing.

    The message says to remove the patch first; the first patch goes on working alike; after
    removing it, applying again works and gives the first patch's outputs (same seed).

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    with model_trial(
        "second_apply_raises", model_factory, run, strategy, adapter, overrides
    ) as trial:
        with trial.patch() as handle:
            first = trial.outputs()
            patched = trial.snapshot()
            try:
                second = trial.patch()
            except AlreadyAppliedError as error:
                require("remove" in str(error), f"the error does not say how to fix it: {error}")
            else:
                second.remove()
                raise AssertionError("a second apply did not raise AlreadyAppliedError")
            same_snapshot(patched, trial.snapshot(), "after the refused apply")
            handle.new_generation()
            same_outputs(first, trial.outputs(), "the first patch after the refused apply")
        with trial.patch():
            same_outputs(first, trial.outputs(), "applying again after remove()")


def check_global_rng_untouched(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """A patched model draws from the global RNG exactly what the unpatched model draws.

    The global RNG state is restored afterwards.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    with (
        model_trial(
            "global_rng_untouched", model_factory, run, strategy, adapter, overrides
        ) as trial,
        torch.random.fork_rng(devices=[]),
    ):
        start = torch.random.get_rng_state()
        trial.outputs()
        plain = torch.random.get_rng_state()
        torch.random.set_rng_state(start)
        with trial.patch():
            trial.outputs()
            require(
                torch.equal(torch.random.get_rng_state(), plain),
                "a call of the patched model changed the global RNG state unlike a call of "
                "the unpatched model (plans must draw from the SiteRandom they are handed)",
            )


def check_works_under_torch_compile(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    strategy: str,
    adapter: str | None = None,
    overrides: dict | None = None,
) -> None:
    """``torch.compile(model, backend="eager")`` runs the patched model and matches eager.

    Twice (the second call runs the compiled graphs again), within 1e-4 (float32), each merging;
    removing the patch afterwards still restores the model's outputs exactly. Dynamo's caches
    are reset before and after.

    Args:
        model_factory: builds a fresh tiny model.
        run: calls the model on fixed inputs and returns its output.
        strategy: a registered strategy's name.
        adapter: the adapter's name (``None``: the one ``apply`` chooses).
        overrides: keyword arguments for ``tokenmerge.apply``.

    Raises:
        AssertionError: naming this check, the adapter, the strategy and what was wrong.
    """
    with model_trial(
        "works_under_torch_compile", model_factory, run, strategy, adapter, overrides
    ) as trial:
        plain = trial.outputs()
        torch.compiler.reset()
        try:
            with trial.patch() as handle:
                handle.new_generation()
                eager = trial.outputs()
                compiled = torch.compile(trial.model, backend="eager")
                for call in ("first", "second"):
                    handle.new_generation()  # the same plans as the eager call
                    got = trial.outputs(compiled)
                    merged_somewhere(handle, f"{call} compiled call")
                    same_form(eager, got, f"{call} compiled call")
                    for (path, e), (_, g) in zip(eager, got, strict=True):
                        tolerance = 1e-4 if e.dtype in (torch.float32, torch.float64) else 1e-2
                        try:
                            torch.testing.assert_close(g, e, atol=tolerance, rtol=tolerance)
                        except AssertionError as error:
                            raise AssertionError(
                                f"{call} compiled call: {path} differs from eager: {error}"
                            ) from None
        finally:
            torch.compiler.reset()
        same_outputs(plain, trial.outputs(), "after removing the compiled patch")


#: every adapter check by name: ``ADAPTER_CHECKS[name](model_factory, run, strategy, adapter,
#: overrides)``
ADAPTER_CHECKS: dict[str, Callable[..., None]] = {
    "ratio_zero_is_bit_identical": check_ratio_zero_is_bit_identical,
    "output_shapes_unchanged": check_output_shapes_unchanged,
    "tokens_merge": check_tokens_merge,
    "remove_restores_exactly": check_remove_restores_exactly,
    "context_manager_restores_exactly": check_context_manager_restores_exactly,
    "second_apply_raises": check_second_apply_raises,
    "global_rng_untouched": check_global_rng_untouched,
    "works_under_torch_compile": check_works_under_torch_compile,
}


def check_adapter(
    model_factory: Callable[[], nn.Module],
    run: Callable[[nn.Module], Any],
    *,
    adapter: str | None = None,
    strategies: Sequence[str] | None = None,
    overrides: dict | None = None,
    compile: bool = False,
) -> None:
    """Run every adapter check (``ADAPTER_CHECKS``) on tiny models, with every strategy.

    Args:
        model_factory: builds a fresh tiny model of the adapter's family (called once per check).
        run: calls the model on fixed inputs and returns its output: a tensor, or a tuple,
            mapping or dataclass holding tensors (every tensor is compared).
        adapter: the adapter's registered name (``None``: the one ``apply`` chooses).
        strategies: strategy names (``None``: every registered strategy).
        overrides: keyword arguments for ``tokenmerge.apply`` (``sites``,
            ``adapter_options``...); the checks set ``ratio`` themselves.
        compile: also run ``works_under_torch_compile`` (seconds per strategy).

    Raises:
        AssertionError: listing every failed check, each naming the adapter, the strategy and
            what was wrong.

    Example:
        >>> import torch
        >>> from tokenmerge.testing import check_adapter
        >>> x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
        >>> check_adapter(
        ...     lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)),
        ...     lambda model: model(x),
        ...     adapter="generic",
        ...     strategies=["tome"],
        ...     overrides={"sites": {"include": ["0"], "min_tokens": 1}},
        ... )
    """
    names = list(strategies) if strategies is not None else registry.strategy_names()
    checks = {
        name: check
        for name, check in ADAPTER_CHECKS.items()
        if compile or name != "works_under_torch_compile"
    }
    calls = [
        lambda check=check, strategy=strategy: check(
            model_factory, run, strategy, adapter, overrides
        )
        for strategy in names
        for check in checks.values()
    ]
    run_all(calls, adapter_subject(adapter))
