"""End-to-end tests of ``tokenmerge.apply`` / ``remove`` / ``Handle`` with the generic adapter.

The test model is a tiny ViT-like stack: optional class token (the generic adapter's
``num_prefix``), blocks with a fused-qkv SDPA attention module and an MLP module, and a root
forward that takes an optional ``timestep`` keyword.
"""

from __future__ import annotations

import copy
import math
import sys
import types
import warnings

import pytest
import torch
from snapshots import Journal
from torch import nn
from toy_models import Attention

import tokenmerge
from tokenmerge import (
    AlreadyAppliedError,
    ConfigError,
    NoSitesError,
    ShortfallWarning,
    UnsupportedModelError,
)
from tokenmerge.adapter import SiteCandidate
from tokenmerge.adapters.generic import GenericAdapter
from tokenmerge.errors import NothingMergedWarning
from tokenmerge.extend import AdapterSpec
from tokenmerge.site import Site
from tokenmerge.testing import ADAPTER_CHECKS

STRATEGIES = ["tome", "retom", "random"]
DIM = 16
GRID = (4, 4)
N = GRID[0] * GRID[1]


# ---------------------------------------------------------------------------- the test model


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.residual:  # every path to the output goes through the merged attention
            return self.mlp(self.attn(self.norm1(x)))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyModel(nn.Module):
    def __init__(
        self, dim: int = DIM, depth: int = 2, num_prefix: int = 1, residual: bool = True
    ) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.time_embed = nn.Linear(1, dim)
        if num_prefix:
            self.cls_token = nn.Parameter(torch.randn(1, num_prefix, dim))
        else:
            self.register_parameter("cls_token", None)
        self.blocks = nn.ModuleList(Block(dim, residual) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, timestep: object = None) -> torch.Tensor:
        if timestep is not None:
            t = torch.as_tensor(timestep, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
            x = x + self.time_embed(t)
        if self.cls_token is not None:
            cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def make_model(seed: int = 0, **kwargs: object) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(**kwargs).eval()


def make_input(batch: int = 2, tokens: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, DIM, generator=torch.Generator().manual_seed(seed))


def patch(
    model: nn.Module,
    strategy: str = "tome",
    ratio: float = 0.5,
    *,
    grid: tuple[int, int] | None = GRID,
    include: tuple[str, ...] = ("blocks.*.attn",),
    **overrides: object,
) -> tokenmerge.Handle:
    options: dict[str, object] = {"timestep_arg": "timestep", "num_prefix": model.num_prefix}
    if grid is not None:
        options["grid"] = grid
    sites = {"include": list(include), "min_tokens": 1, **overrides.pop("sites", {})}
    return tokenmerge.apply(
        model,
        strategy,
        ratio=ratio,
        adapter="generic",
        sites=sites,
        adapter_options=options,
        **overrides,
    )


def baseline(model: nn.Module, x: torch.Tensor) -> tuple[dict, list[str], torch.Tensor]:
    """What a removal must restore: the modules' snapshot, the state_dict keys, the output."""
    before = snapshot(model)
    with torch.no_grad():
        return before, list(model.state_dict()), model(x)


def snapshot(model: nn.Module) -> dict[str, tuple]:
    """Class, attribute names and the content of every hook dict, of every module."""
    result = {}
    for name, module in model.named_modules():
        hooks = {
            key: list(value)
            for key, value in vars(module).items()
            if "hook" in key and isinstance(value, dict)
        }
        result[name] = (type(module), sorted(vars(module)), hooks)
    return result


def hook_count(model: nn.Module) -> int:
    return sum(
        len(value)
        for module in model.modules()
        for key, value in vars(module).items()
        if "hook" in key and isinstance(value, dict)
    )


def assert_restored(model: nn.Module, before: dict, keys: list[str], x, expected) -> None:
    assert snapshot(model) == before
    assert hook_count(model) == 0
    assert "_tokenmerge_handle" not in vars(model)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        assert torch.equal(model(x, timestep=500.0), model(x, timestep=500.0))


# ---------------------------------------------------------------------------- exactness


# The conformance kit's adapter checks on this model (class token, timestep keyword, odd and
# even batches): ratio 0 bit-identical, shapes, merging, exact removal by handle, by
# tokenmerge.remove and by the context manager (also when its body raises), second apply,
# global RNG. tests/test_conformance.py runs them, and torch.compile, on every adapter.
KIT_OVERRIDES = {
    "adapter_options": {"grid": GRID, "num_prefix": 1, "timestep_arg": "timestep"},
    "sites": {"include": ["blocks.*.attn"], "min_tokens": 1},
}


def run_kit(model: nn.Module) -> tuple[torch.Tensor, ...]:
    x = make_input()
    return model(x), model(x, timestep=999.0), model(x, timestep=900.0), model(make_input(3))


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("check", [c for c in ADAPTER_CHECKS if c != "works_under_torch_compile"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_conformance_kit(strategy: str, check: str) -> None:
    ADAPTER_CHECKS[check](make_model, run_kit, strategy, "generic", KIT_OVERRIDES)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_handle_attribute_hooks_and_repr_follow_the_patch(strategy: str) -> None:
    model = make_model()
    handle = patch(model, strategy, ratio=0.5)
    assert hook_count(model) > 0
    assert vars(model)["_tokenmerge_handle"] is handle
    assert "2 sites" in repr(handle)
    handle.remove()
    assert hook_count(model) == 0
    assert "_tokenmerge_handle" not in vars(model)
    assert "removed" in repr(handle)


def test_forward_error_inside_site_leaves_patch_usable() -> None:
    """A forward that raises inside a patched module must not leave a plan behind."""
    model = make_model()
    x = make_input()
    handle = patch(model, "tome")
    with torch.no_grad():
        y = model(x)
        with pytest.raises(RuntimeError):
            model.blocks[0].attn(torch.randn(2, N + 1, DIM + 2))  # qkv fails after merging
        assert torch.equal(model(x), y)
    assert all(not hook.__self__.plans for hook in model.blocks[0].attn._forward_hooks.values())
    handle.remove()
    assert hook_count(model) == 0


# ---------------------------------------------------------------------------- sites and stats


def test_handle_sites_lists_touched_sites() -> None:
    model = make_model(depth=3)
    handle = patch(model, "retom", include=("blocks.0.attn", "blocks.2.attn"))
    assert [site.name for site in handle.sites] == ["blocks.0.attn", "blocks.2.attn"]
    assert all(site.targets == ("attn",) for site in handle.sites)
    assert list(handle.stats()) == ["blocks.0.attn", "blocks.2.attn"]
    assert len(model.blocks[1].attn._forward_pre_hooks) == 0
    assert len(model.blocks[0].attn._forward_pre_hooks) == 1
    assert "2 sites" in repr(handle)
    handle.remove()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5, 0.7])
def test_stats_tokens_in_out_and_prefix_kept(strategy: str, ratio: float) -> None:
    model = make_model(num_prefix=1)
    handle = patch(model, strategy, ratio=ratio)
    with torch.no_grad():
        model(make_input())
    expected_out = N + 1 - math.floor(ratio * N)
    for name, stats in handle.stats().items():
        assert stats.name == name
        assert stats.ratio == ratio
        assert stats.calls == 1
        assert stats.tokens_in == N + 1
        assert stats.tokens_out == expected_out
        assert stats.plans_computed == 1 and stats.plans_reused == 0
        assert stats.shortfall == 0 and stats.skipped is None
    for site_patch in handle.patches:
        plan = site_patch.last_plan
        assert plan.num_tokens == N + 1
        assert (plan.kept[:, 0] == 0).all()  # the class token keeps its own slot
        assert (plan.origin[:, 0] == 0).all()
        assert not (plan.src == 0).any()
        assert not (plan.dst == 0).any()  # nothing merges into the class token either
    handle.remove()


def test_stats_are_copies() -> None:
    model = make_model()
    handle = patch(model, "tome")
    stats = handle.stats()
    stats["blocks.0.attn"].calls = 99
    assert handle.stats()["blocks.0.attn"].calls == 0
    handle.remove()


def test_stats_without_timestep_every_call_computes() -> None:
    model = make_model()
    handle = patch(model, "retom", cache_interval=5)
    with torch.no_grad():
        for _ in range(3):
            model(make_input())
    for stats in handle.stats().values():
        assert (stats.calls, stats.plans_computed, stats.plans_reused) == (3, 3, 0)
    handle.remove()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stats_skipped_below_min_tokens(strategy: str) -> None:
    model = make_model()
    x = make_input()
    with torch.no_grad():
        expected = model(x)
    handle = patch(model, strategy, sites={"min_tokens": N + 1})
    with torch.no_grad():
        with pytest.warns(NothingMergedWarning, match="merged nothing in this forward: .*min_tok"):
            assert torch.equal(model(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x)  # reported once per site
    stats = handle.stats()["blocks.0.attn"]
    assert stats.skipped is not None and "min_tokens" in stats.skipped
    assert stats.tokens_out == stats.tokens_in == N + 1
    handle.remove()
    handle = patch(model, strategy, sites={"min_tokens": N})  # exactly N image tokens: merges
    with torch.no_grad():
        model(x)
    stats = handle.stats()["blocks.0.attn"]
    assert stats.skipped is None
    assert stats.tokens_out < stats.tokens_in
    handle.remove()


@pytest.mark.parametrize(
    ("grid", "ratio", "wanted", "capacity"),
    [((1, 16), 0.7, 11, 8), ((3, 3), 0.7, 6, 5)],
)
def test_retom_shortfall_reported_and_warned_once(grid, ratio, wanted, capacity) -> None:
    model = make_model(num_prefix=1)
    tokens = grid[0] * grid[1]
    x = make_input(tokens=tokens)
    handle = patch(
        model, "retom", ratio=ratio, window_size=2, grid=grid, include=("blocks.0.attn",)
    )
    with pytest.warns(ShortfallWarning, match="blocks.0.attn") as record:
        with torch.no_grad():
            model(x)
    assert len([w for w in record if issubclass(w.category, ShortfallWarning)]) == 1
    assert "stats()" in str(record[0].message)
    stats = handle.stats()["blocks.0.attn"]
    assert stats.shortfall == wanted - capacity
    assert stats.tokens_out == 1 + tokens - capacity
    # warn once: further calls raise no warning (the pytest config turns one into an error)
    with torch.no_grad():
        model(x)
        model(x)
    assert handle.stats()["blocks.0.attn"].shortfall == wanted - capacity
    handle.remove()


def test_no_shortfall_when_capacity_suffices() -> None:
    model = make_model()
    # 4 x 4 grid, 2 x 2 windows: 12 can merge
    handle = patch(model, "retom", ratio=0.7, window_size=2)
    with torch.no_grad():
        model(make_input())
    assert all(s.shortfall == 0 for s in handle.stats().values())
    handle.remove()


# ---------------------------------------------------------------------------- apply twice


def test_second_apply_error_names_the_model_and_the_fix() -> None:
    model = make_model()
    handle = patch(model, "tome")
    with pytest.raises(AlreadyAppliedError) as info:
        patch(model, "retom")  # another strategy: still refused
    message = str(info.value)
    assert "already patched" in message
    assert "remove" in message
    assert "TinyModel" in message
    handle.remove()
    assert "replace=True" in message


def test_replace_swaps_the_patch_and_its_removal_restores_the_model() -> None:
    model = make_model()
    x = make_input()
    before, keys, expected = baseline(model, x)
    old = patch(model, "tome")
    new = patch(model, "retom", ratio=0.25, replace=True)
    with torch.no_grad():
        model(x)
    assert new.stats() and all(s.calls == 1 for s in new.stats().values())
    assert all(s.calls == 0 for s in old.stats().values())  # the old hooks are gone
    assert new.config.strategy == "retom"
    old.remove()  # already removed by the replacement: a no-op
    new.remove()
    assert snapshot(model) == before and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_replace_with_a_bad_config_keeps_the_old_patch() -> None:
    model = make_model()
    old = patch(model, "tome")
    with pytest.raises(tokenmerge.ConfigError):
        patch(model, "retom", ratio=0.99, window_size=2, replace=True)
    with pytest.raises(AlreadyAppliedError):
        patch(model, "random")
    with torch.no_grad():
        model(make_input())
    assert all(s.calls == 1 for s in old.stats().values())
    old.remove()


# ---------------------------------------------------------------------------- deepcopy


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deepcopy_gives_independent_patch(strategy: str) -> None:
    model = make_model()
    x = make_input()
    before, keys, expected = baseline(model, x)
    handle = patch(model, strategy)
    with torch.no_grad():
        y = model(x)
    clone = copy.deepcopy(model)
    clone_handle = vars(clone)["_tokenmerge_handle"]
    assert clone_handle is not handle
    assert clone_handle.model is clone
    assert clone_handle.state is not handle.state
    clone_patches = {id(p) for p in clone_handle.patches}
    for module in (clone.blocks[0].attn, clone.blocks[1].attn):
        for hook in module._forward_pre_hooks.values():
            assert id(hook.__self__.patch) in clone_patches
    with torch.no_grad():
        assert torch.equal(clone(x), y)
        assert torch.equal(model(x), y)
    assert clone_handle.stats()["blocks.0.attn"].tokens_out == N + 1 - N // 2
    # removing the copy's patch leaves the original patched
    assert tokenmerge.remove(clone) is True
    assert not handle.removed
    with torch.no_grad():
        assert torch.equal(model(x), y)
        assert torch.equal(clone(x), expected)
    assert_restored(clone, before, keys, x, expected)
    handle.remove()
    assert_restored(model, before, keys, x, expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_removing_original_leaves_deepcopy_patched(strategy: str) -> None:
    model = make_model()
    x = make_input()
    before, keys, expected = baseline(model, x)
    handle = patch(model, strategy)
    with torch.no_grad():
        y = model(x)
    clone = copy.deepcopy(model)
    handle.remove()
    assert_restored(model, before, keys, x, expected)
    with torch.no_grad():
        assert torch.equal(clone(x), y)
    clone_handle = vars(clone)["_tokenmerge_handle"]
    assert not clone_handle.removed
    assert clone_handle.stats()["blocks.0.attn"].calls == 2  # copied history + this call
    clone_handle.remove()
    assert_restored(clone, before, keys, x, expected)


@pytest.mark.parametrize(
    ("strategy", "cache_interval"), [("tome", 1), ("random", 1), ("retom", 1), ("retom", 5)]
)
def test_deepcopy_mid_generation_matches_original(strategy: str, cache_interval: int) -> None:
    """A copy taken between two denoising steps behaves like the original at the next step.

    At step 1 the original draws from its site generators' continued streams (tome / random) or
    reuses its cached step-0 plan (retom, cache_interval 5); the copy must do the same.
    """
    model = make_model()
    handle = patch(model, strategy, cache_interval=cache_interval)
    with torch.no_grad():
        model(make_input(seed=1), timestep=999.0)
        clone = copy.deepcopy(model)
        y = model(make_input(seed=2), timestep=900.0)
        assert torch.equal(clone(make_input(seed=2), timestep=900.0), y)
    handle.remove()


# ---------------------------------------------------------------------------- errors


def test_no_sites_error_lists_candidates_and_close_matches() -> None:
    model = make_model()
    before = snapshot(model)
    with pytest.raises(NoSitesError) as info:
        patch(model, "tome", include=("blocks.*.atn",))
    message = str(info.value)
    assert "blocks.*.atn" in message
    assert "Candidate sites:" in message
    assert "time_embed" in message  # real module names
    assert "close names" in message and "blocks.0.attn" in message
    assert "include" in message and "exclude" in message
    assert snapshot(model) == before  # a failed apply touches nothing


def test_generic_without_include_says_how_to_fix() -> None:
    model = make_model()
    with pytest.raises(NoSitesError) as info:
        tokenmerge.apply(model, "tome", adapter="generic")
    message = str(info.value)
    assert "sites={'include'" in message
    assert "blocks.0.attn" in message
    assert hook_count(model) == 0


def test_nested_sites_raise_config_error() -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="nest") as info:
        patch(model, "tome", include=("blocks.**",))
    assert "blocks.0" in str(info.value)
    assert hook_count(model) == 0


def test_nested_sites_detected_whatever_the_sibling_names() -> None:
    """Nesting must be found even when a sibling's name sorts between outer and inner.

    ``"-"`` sorts before ``"."``, so ``layers.a``, ``layers.a-b``, ``layers.a.attn`` defeats a
    check that only compares neighbours in sorted order.
    """
    model = make_model()
    model.layers = nn.ModuleDict({"a": Block(DIM), "a-b": Block(DIM)})
    with pytest.raises(ConfigError, match="nest"):
        patch(model, "tome", include=("layers.*", "layers.a.attn"))
    assert hook_count(model) == 0


def test_all_targets_off_raise_config_error() -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="sites.attn") as info:
        patch(model, "tome", sites={"attn": False, "cross_attn": False, "mlp": False})
    assert "sites.mlp" in str(info.value) and "sites.cross_attn" in str(info.value)
    assert hook_count(model) == 0


def test_unknown_adapter_option_lists_accepted_options() -> None:
    model = make_model()
    with pytest.raises(ConfigError) as info:
        tokenmerge.apply(
            model,
            "tome",
            adapter="generic",
            sites={"include": ["blocks.*.attn"]},
            adapter_options={"grd": (4, 4)},
        )
    message = str(info.value)
    assert "grd: unknown option" in message and "did you mean 'grid'?" in message
    for option in ("grid", "num_prefix", "timestep_arg"):
        assert option in message
    assert hook_count(model) == 0


def test_unsupported_model_without_adapter() -> None:
    model = make_model()
    with pytest.raises(UnsupportedModelError) as info:
        tokenmerge.apply(model, "tome", sites={"include": ["blocks.*.attn"]})
    message = str(info.value)
    assert "TinyModel" in message
    assert "adapter='generic'" in message
    assert hook_count(model) == 0


def test_generic_adapter_rejects_non_module() -> None:
    with pytest.raises(UnsupportedModelError, match="generic"):
        tokenmerge.apply(object(), "tome", adapter="generic", sites={"include": ["x"]})


@pytest.mark.parametrize("grid", [(0, 4), (4,), (4, 4, 1), (-2, 8), (4, -1)])
def test_bad_grid_option_raises_config_error(grid) -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="grid") as info:
        patch(model, "tome", grid=grid)
    assert "height, width" in str(info.value)
    assert hook_count(model) == 0


@pytest.mark.parametrize("grid", [(2.5, 4), (4, "4x")])
def test_non_integer_grid_option_raises_config_error(grid) -> None:
    """A grid that is not two integers is a config error, not silently truncated or a raw error."""
    model = make_model()
    with pytest.raises(ConfigError, match="grid"):
        patch(model, "tome", grid=grid)
    assert hook_count(model) == 0


def test_negative_num_prefix_raises_config_error() -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="num_prefix"):
        tokenmerge.apply(
            model,
            "tome",
            adapter="generic",
            sites={"include": ["blocks.*.attn"]},
            adapter_options={"num_prefix": -1},
        )


def test_grid_mismatch_error_is_clear_and_model_still_works() -> None:
    model = make_model()
    handle = patch(model, "tome", grid=(4, 4))
    with torch.no_grad():
        with pytest.raises(ValueError) as info:
            model(make_input(tokens=20))
        message = str(info.value)
        assert "(4, 4)" in message and "16" in message and "20" in message
        assert "blocks.0.attn" in message
        assert "adapter_options['grid']" in message
        assert model(make_input()).shape == (2, N + 1, DIM)  # no stale state after the error
    handle.remove()
    assert hook_count(model) == 0


def test_unknown_strategy_and_bad_ratio_are_config_errors() -> None:
    model = make_model()
    with pytest.raises(ConfigError, match="tome"):
        patch(model, "tomee")
    with pytest.raises(ConfigError, match="ratio"):
        patch(model, "retom", ratio=0.95)  # above 1 - 1/16 for 4 x 4 windows
    assert hook_count(model) == 0


# ---------------------------------------------------------------------------- plan sharing


class _TwoTargetAdapter(GenericAdapter):
    """Sites are whole blocks, merged around both their ``attn`` and their ``mlp``."""

    name = "two-target-test"

    def candidates(self, root: nn.Module) -> list[SiteCandidate]:
        return [
            SiteCandidate(
                Site(f"blocks.{i}", block_index=i), {"attn": block.attn, "mlp": block.mlp}
            )
            for i, block in enumerate(root.blocks)
        ]

    def default_sites(self, candidates, config):
        return candidates


@pytest.fixture
def two_target_adapter(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("_tokenmerge_test_two_target")
    module.TwoTargetAdapter = _TwoTargetAdapter
    monkeypatch.setitem(sys.modules, module.__name__, module)
    tokenmerge.extend.register_adapter(
        AdapterSpec(name="two-target-test", target=f"{module.__name__}:TwoTargetAdapter")
    )
    yield "two-target-test"
    tokenmerge.extend.unregister_plugin("adapter:two-target-test")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_targets_of_one_site_share_one_plan(strategy: str, two_target_adapter: str) -> None:
    model = make_model(num_prefix=1)
    x = make_input()
    with torch.no_grad():
        expected = model(x)
    handle = tokenmerge.apply(
        model,
        strategy,
        ratio=0.5,
        adapter=two_target_adapter,
        sites={"mlp": True, "min_tokens": 1},
        adapter_options={"grid": GRID, "num_prefix": 1},
    )
    assert [s.targets for s in handle.sites] == [("attn", "mlp"), ("attn", "mlp")]
    # attn and mlp of one site: one plan, and both merge with it (the attention's unmerge
    # fits the value correction's weight to the new plan where the strategy corrects)
    fit = ("fit",) if tokenmerge.load_config(strategy).value_correction else ()
    one_plan_each = [
        (part, site)
        for site in ("blocks.0", "blocks.1")
        for part in ("plan", "merge", "unmerge", *fit, "merge", "unmerge")
    ]
    with torch.no_grad(), handle.observe(Journal()) as journal:
        y = model(x)
    assert y.shape == expected.shape and not torch.equal(y, expected)
    assert journal.seen == one_plan_each
    for stats in handle.stats().values():
        assert (stats.calls, stats.plans_computed, stats.plans_reused) == (1, 1, 0)
        assert stats.tokens_out == N + 1 - N // 2
    with torch.no_grad(), handle.observe(Journal()) as journal:
        model(x)  # no timestep: a new call plans afresh
    assert journal.seen == one_plan_each
    assert handle.stats()["blocks.0"].plans_computed == 2
    handle.remove()
    assert hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("strategy", ["tome", "retom"])
def test_share_cfg_plan_even_batch_uses_one_plan_for_both_halves(strategy: str) -> None:
    model = make_model()
    a, b, c, d = (make_input(batch=1, seed=s) for s in (11, 12, 13, 14))
    handle = patch(model, strategy, share_cfg_plan=True)
    with torch.no_grad():
        model(torch.cat([a, b]))
        for site_patch in handle.patches:
            plan = site_patch.last_plan
            assert plan.batch == 1  # batch 2: one plan broadcast over both halves
            assert not plan.is_identity
        model(torch.cat([a, b, c, d]))
        for site_patch in handle.patches:
            plan = site_patch.last_plan
            assert plan.batch == 4
            for field in (plan.kept, plan.src, plan.dst, plan.origin):
                assert torch.equal(field[0], field[2]) and torch.equal(field[1], field[3])
            assert not torch.equal(plan.src[0], plan.src[1])  # c and d plan differently
        # the plan comes from the second half only: the first half does not change it
        y1 = model(torch.cat([a, b]))
        y2 = model(torch.cat([c, b]))
    assert torch.allclose(y1[1], y2[1], atol=1e-6)
    handle.remove()
    # and the second half is computed as if it had planned on itself
    handle = patch(model, strategy)
    with torch.no_grad():
        alone = model(b)
    handle.remove()
    assert torch.allclose(y1[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_share_cfg_plan_odd_batch_still_works(strategy: str) -> None:
    model = make_model()
    x = make_input(batch=3)
    handle = patch(model, strategy, share_cfg_plan=True)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, N + 1, DIM) and torch.isfinite(y).all()
    assert handle.stats()["blocks.0.attn"].tokens_out == N + 1 - N // 2
    if strategy != "random":  # random plans once for the whole batch anyway
        assert handle.patches[0].last_plan.batch == 3
    handle.remove()


# ---------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_gives_identical_outputs_across_applications(strategy: str) -> None:
    x = make_input()
    outputs = []
    for _ in range(2):
        model = make_model()
        handle = patch(model, strategy, seed=7)
        with torch.no_grad():
            outputs.append((model(x), model(x, timestep=999.0), model(x, timestep=900.0)))
        handle.remove()
    for first, second in zip(*outputs, strict=True):
        assert torch.equal(first, second)


def test_different_seeds_differ_for_random_strategy() -> None:
    model = make_model()
    x = make_input()
    results = []
    for seed in (0, 1):
        handle = patch(model, "random", seed=seed)
        with torch.no_grad():
            results.append((model(x), handle.patches[0].last_plan.src.clone()))
        handle.remove()
    assert not torch.equal(results[0][0], results[1][0])
    assert not torch.equal(results[0][1], results[1][1])


# ---------------------------------------------------------------------------- dtypes, autograd


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_low_precision_inputs(strategy: str, dtype: torch.dtype) -> None:
    model = make_model().to(dtype)
    x = make_input().to(dtype)
    handle = patch(model, strategy, ratio=0.5)
    with torch.no_grad():
        y = model(x, timestep=999.0)
    assert y.dtype == dtype
    assert y.shape == (2, N + 1, DIM)
    assert torch.isfinite(y).all()
    assert handle.stats()["blocks.0.attn"].tokens_out == N + 1 - N // 2
    handle.remove()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_autograd_reaches_every_token(strategy: str) -> None:
    model = make_model(residual=False, depth=1).train()
    x = make_input().requires_grad_(True)
    handle = patch(model, strategy, ratio=0.5)
    y = model(x)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * weight).sum().backward()
    plan = handle.patches[0].last_plan
    assert plan.num_merged == N // 2
    per_token = x.grad.abs().sum(-1)  # (B, N): gradient reaching each input token
    assert (per_token > 0).all(), per_token
    merged_away = plan.src.expand(x.shape[0], -1) - model.num_prefix  # image-token indices
    assert (per_token.gather(1, merged_away) > 0).all()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    handle.remove()


# ---------------------------------------------------------------------------- adapter choice


class _ExplodingAdapter(GenericAdapter):
    """Claims diffusers models but supports none of them, and cannot even be built (as a DiT
    adapter whose signature check fails after a diffusers release)."""

    name = "diffusers_aaa_exploding"  # sorts before the built-in diffusers adapters

    @classmethod
    def supports(cls, model) -> bool:
        return False

    def __init__(self) -> None:
        raise RuntimeError("exploding adapter constructed")


def _tiny_unet() -> nn.Module:
    """A one-level UNet: the smallest the diffusers_unet adapter patches."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    blocks = {
        "down_block_types": ("CrossAttnDownBlock2D",),
        "up_block_types": ("CrossAttnUpBlock2D",),
    }
    return UNet2DConditionModel(
        block_out_channels=(32,), cross_attention_dim=32, norm_num_groups=8, **blocks
    ).eval()


def test_adapters_are_asked_before_one_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("_tokenmerge_test_exploding")
    module.ExplodingAdapter = _ExplodingAdapter
    monkeypatch.setitem(sys.modules, module.__name__, module)
    spec = AdapterSpec(
        name=_ExplodingAdapter.name,
        target=f"{module.__name__}:ExplodingAdapter",
        claims=("diffusers.",),
    )
    tokenmerge.extend.register_adapter(spec)
    try:
        assert tokenmerge.list_adapters("diffusers_*")[0] == _ExplodingAdapter.name
        unet = _tiny_unet()
        with tokenmerge.apply(unet, "tome", ratio=0.5, sites={"min_tokens": 1}) as handle:
            assert handle.adapter.name == "diffusers_unet"
            out = unet(torch.randn(1, 4, 16, 16), 999, encoder_hidden_states=torch.randn(1, 7, 32))
            assert out.sample.shape == (1, 4, 16, 16)
        # named explicitly, it is asked first too: an unsupported model, not its constructor
        with pytest.raises(UnsupportedModelError, match=_ExplodingAdapter.name):
            tokenmerge.apply(unet, "tome", adapter=_ExplodingAdapter.name)
    finally:
        tokenmerge.extend.unregister_plugin(f"adapter:{_ExplodingAdapter.name}")


def test_a_broken_dit_adapter_does_not_break_unets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The case behind the rule: a changed signature in a DiT class of diffusers."""
    from tokenmerge.adapters import diffusers_dit

    def changed_signature() -> None:
        raise UnsupportedModelError("DiT signature changed")

    monkeypatch.setattr(diffusers_dit, "_check_signatures", changed_signature)
    unet = _tiny_unet()
    with tokenmerge.apply(unet, "retom", ratio=0.5, sites={"min_tokens": 1}) as handle:
        assert handle.adapter.name == "diffusers_unet"
