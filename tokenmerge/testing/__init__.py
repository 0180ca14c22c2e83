"""The plugin authoring kit: the conformance checks every strategy and adapter should pass.

The project's own conformance matrix (``tests/test_conformance.py``) runs exactly these checks
on every registered strategy and adapter; a plugin runs them from its own tests. They need torch
only (no pytest, no hypothesis, no model library) and fail by raising ``AssertionError`` with a
message naming the check, the strategy or adapter, the case and what was wrong.

Strategy checks drive plans through the framework's real path (a ``SitePatch`` planning for a
``TokenLayout``, features prepared as the framework prepares them), so they fail where the
framework and a strategy disagree, not only where a strategy disagrees with itself.

The checks live in modules by subject (``plans``, ``strategies``, ``adapters``); every name is
importable from here. ``count_kernels`` counts the kernels and host syncs of a call (``kernels``).

Example:
    A strategy plugin checks its strategy by registered name, or by class before registering::

        >>> from tokenmerge.testing import check_strategy
        >>> check_strategy("random")

    An adapter plugin checks its adapter on tiny models of its family, with every registered
    strategy by default (one here); ``run`` calls the model on fixed inputs and returns what it
    returns::

        >>> import torch
        >>> from tokenmerge.testing import check_adapter
        >>> x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
        >>> def tiny_model():
        ...     return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(),
        ...                                torch.nn.Linear(8, 8))
        >>> check_adapter(tiny_model, lambda model: model(x), adapter="generic",
        ...               strategies=["random"],
        ...               overrides={"sites": {"include": ["2"], "min_tokens": 1}})

    Under pytest, one test per check reports every failing check at once::

        import pytest
        import tokenmerge
        from tokenmerge.testing import ADAPTER_CHECKS, STRATEGY_CHECKS

        @pytest.mark.parametrize("check", STRATEGY_CHECKS)
        def test_my_strategy(check):
            STRATEGY_CHECKS[check](MyStrategy, None)

        @pytest.mark.parametrize("check", ADAPTER_CHECKS)
        @pytest.mark.parametrize("strategy", tokenmerge.list_strategies())
        def test_my_adapter(check, strategy):
            overrides = {"sites": {"min_tokens": 1}}
            ADAPTER_CHECKS[check](tiny_model, run, strategy, "my_adapter", overrides)
"""

from .adapters import (
    ADAPTER_CHECKS,
    check_adapter,
    check_context_manager_restores_exactly,
    check_global_rng_untouched,
    check_output_shapes_unchanged,
    check_ratio_zero_is_bit_identical,
    check_remove_restores_exactly,
    check_second_apply_raises,
    check_tokens_merge,
    check_works_under_torch_compile,
)
from .kernels import KernelCount, count_kernels
from .plans import check_plan
from .strategies import (
    STRATEGY_CHECKS,
    check_config_class_validates,
    check_content_blind_gets_empty_features,
    check_identical_tokens_merge_exactly,
    check_merges_num_merge_up_to_capacity,
    check_no_global_rng_state_consumed,
    check_plan_batch_is_one_or_the_batch,
    check_plans_are_well_formed,
    check_ratio_zero_is_identity,
    check_same_seed_same_plan,
    check_strategy,
)

__all__ = [
    "ADAPTER_CHECKS",
    "KernelCount",
    "STRATEGY_CHECKS",
    "check_adapter",
    "check_config_class_validates",
    "check_content_blind_gets_empty_features",
    "check_context_manager_restores_exactly",
    "check_global_rng_untouched",
    "check_identical_tokens_merge_exactly",
    "check_merges_num_merge_up_to_capacity",
    "check_no_global_rng_state_consumed",
    "check_output_shapes_unchanged",
    "check_plan",
    "check_plan_batch_is_one_or_the_batch",
    "check_plans_are_well_formed",
    "check_ratio_zero_is_bit_identical",
    "check_ratio_zero_is_identity",
    "check_remove_restores_exactly",
    "check_same_seed_same_plan",
    "check_second_apply_raises",
    "check_strategy",
    "check_tokens_merge",
    "check_works_under_torch_compile",
    "count_kernels",
]
