"""The registry: listing, run-time and entry-point plugins, duplicates, atomicity, availability."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Literal

import pydantic
import pytest
import torch
from pydantic import Field
from torch import nn

import tokenmerge
from tokenmerge import (
    ConfigError,
    MergeConfig,
    UnknownAdapterError,
    UnknownStrategyError,
    UnsupportedModelError,
    extend,
)
from tokenmerge.extend import (
    AdapterSpec,
    DuplicateNameError,
    Plan,
    PluginError,
    Strategy,
    UnknownNameError,
)
from tokenmerge.load import config_union
from tokenmerge.registry import DISABLE_AUTOLOAD_ENV, registry
from tokenmerge.strategies.random import RandomConfig, RandomStrategy
from tokenmerge.strategies.retom import ReToMConfig, ReToMStrategy
from tokenmerge.strategies.tome import ToMeConfig

PLUGIN_DISTS = Path(__file__).parent / "plugin_dists"
# the built-in adapters (diffusers is installed in the test environment)
BUILTIN_ADAPTERS = [
    "diffusers_dit",
    "diffusers_flux",
    "diffusers_transformer",
    "diffusers_unet",
    "generic",
    "timm_hierarchical",
    "timm_vit",
    "transformers_vit",
]
BUILTIN_PLUGINS = ["tokenmerge.adapters", "tokenmerge.strategies"]


@pytest.fixture(autouse=True)
def fresh_registry():
    """Every test starts from the built-ins and leaves nothing registered behind."""
    registry.reset()
    yield registry
    registry.reset()


# ---------------------------------------------------------------------------- a plugin strategy


class PairsConfig(MergeConfig):
    """Configuration of ``pairs``."""

    strategy: Literal["pairs"] = Field(default="pairs", description="Always 'pairs'.")
    label: str = Field(default="p", description="A free-form label. Default 'p'.")

    def ratio_limit(self) -> float:
        return 0.5

    def ratio_limit_reason(self) -> str:
        return "one token of each pair stays"


class PairsStrategy(Strategy):
    """Token 2k+1 merges into token 2k (first pairs first); ignores the features."""

    name = "pairs"
    config_class = PairsConfig
    uses_features = False

    def capacity(self, layout, site):
        return layout.num_image_tokens // 2

    def make_plan(self, features, layout, site, num_merge, generator):
        n = layout.num_image_tokens
        if num_merge == 0:
            return Plan.identity(n, features.device)
        src = torch.arange(num_merge, device=features.device) * 2 + 1
        return Plan.from_assignment(src.unsqueeze(0), (src - 1).unsqueeze(0), n)


class PairsPlugin:
    @extend.hookimpl
    def tokenmerge_register_strategies(self, register):
        register(PairsStrategy)


def tiny_model() -> nn.Module:
    """Modules that take and return (B, N, C)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))


def plugin_with(strategies=(), adapters=(), raise_after=None):
    """A plugin object registering the given strategies (with replace flags) and adapters."""

    class Plugin:
        @extend.hookimpl
        def tokenmerge_register_strategies(self, register):
            for item in strategies:
                cls, replace = item if isinstance(item, tuple) else (item, False)
                register(cls, replace=replace)

        @extend.hookimpl
        def tokenmerge_register_adapters(self, register):
            for spec in adapters:
                register(spec)
            if raise_after is not None:
                raise raise_after

    return Plugin()


# ---------------------------------------------------------------------------- listing


def test_list_strategies_builtin():
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*", ["random", "retom", "todo", "tome"]),
        ("*tom*", ["retom", "tome"]),
        ("r*", ["random", "retom"]),
        ("tome", ["tome"]),
        ("t?me", ["tome"]),
        ("[rt]*e", ["tome"]),
        (["t*", "ran*"], ["random", "todo", "tome"]),
        (["tome", "tome"], ["tome"]),
        ("nothing*", []),
        ([], []),
    ],
)
def test_list_strategies_wildcards(pattern, expected):
    assert tokenmerge.list_strategies(pattern) == expected


def test_list_adapters_builtin():
    # the test environment installs diffusers, so its adapter is available here
    assert tokenmerge.list_adapters() == BUILTIN_ADAPTERS
    assert tokenmerge.list_adapters("gen*") == ["generic"]
    assert tokenmerge.list_adapters(["x*", "*ic"]) == ["generic"]
    assert tokenmerge.list_adapters("timm") == []
    assert tokenmerge.list_adapters(available=True) == BUILTIN_ADAPTERS
    assert tokenmerge.list_adapters(available=False) == []
    assert tokenmerge.adapter_status("generic") == "available"
    assert tokenmerge.adapter_status("diffusers_unet") == "available"


def test_list_plugins_builtin_info_and_filtering():
    plugins = tokenmerge.list_plugins()
    assert [p.name for p in plugins] == BUILTIN_PLUGINS
    for info in plugins:
        assert info.builtin is True
        assert info.distribution == "tokenmerge"
        assert info.version == tokenmerge.__version__
    by_name = {p.name: p for p in plugins}
    assert by_name["tokenmerge.strategies"].strategies == ["random", "retom", "todo", "tome"]
    assert by_name["tokenmerge.strategies"].adapters == []
    assert by_name["tokenmerge.adapters"].adapters == BUILTIN_ADAPTERS
    assert [p.name for p in tokenmerge.list_plugins("*strategies")] == ["tokenmerge.strategies"]
    assert [p.name for p in tokenmerge.list_plugins(["*adapters", "nope"])] == [
        "tokenmerge.adapters"
    ]
    assert tokenmerge.list_plugins("third-party*") == []


def test_reset_reloads_builtins_lazily():
    extend.register_plugin(PairsPlugin(), name="pairs-plugin")
    assert "pairs" in tokenmerge.list_strategies()
    registry.reset()
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]
    assert [p.name for p in tokenmerge.list_plugins()] == BUILTIN_PLUGINS


# ---------------------------------------------------------------------------- unknown names


def test_unknown_strategy_lists_known_and_close_matches():
    with pytest.raises(UnknownStrategyError) as info:
        registry.strategy("retm")
    message = str(info.value)
    assert message.startswith("unknown strategy 'retm'")  # not quoted like a KeyError
    assert "random, retom, todo, tome" in message
    assert "did you mean 'retom'" in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigError)
    with pytest.raises(UnknownStrategyError, match="did you mean 'random'"):
        tokenmerge.get_strategy("randon")


def test_unknown_adapter_lists_known_and_close_matches():
    with pytest.raises(UnknownAdapterError) as info:
        registry.adapter("generc")
    message = str(info.value)
    assert "unknown adapter 'generc'" in message
    assert "known adapters: " + ", ".join(BUILTIN_ADAPTERS) in message
    assert "did you mean 'generic'" in message
    model = tiny_model()
    with pytest.raises(UnknownAdapterError, match="did you mean 'generic'"):
        tokenmerge.apply(model, "tome", adapter="generc", sites={"include": ["0"]})
    with pytest.raises(UnknownAdapterError, match="generic"):
        tokenmerge.adapter_status("timm")
    assert not hasattr(model, "_tokenmerge_handle")


def test_unknown_plugin_name_lists_plugins():
    with pytest.raises(UnknownNameError) as info:
        extend.unregister_plugin("tokenmerge.strategy")
    message = str(info.value)
    assert "tokenmerge.adapters, tokenmerge.strategies" in message
    assert "did you mean 'tokenmerge.strategies'" in message


# ---------------------------------------------------------------------------- run-time plugins


def test_runtime_plugin_is_listed_validated_serialised_and_usable():
    assert extend.register_plugin(PairsPlugin(), name="pairs-plugin") == "pairs-plugin"
    assert tokenmerge.list_strategies() == ["pairs", "random", "retom", "todo", "tome"]
    assert tokenmerge.list_strategies("p*") == ["pairs"]
    (info,) = tokenmerge.list_plugins("pairs-plugin")
    assert (info.strategies, info.adapters, info.builtin) == (["pairs"], [], False)
    assert info.distribution is None
    assert registry.strategy("pairs") is PairsStrategy

    # its config validates like a built-in one
    config = tokenmerge.load_config("pairs", ratio=0.5, label="x")
    assert isinstance(config, PairsConfig) and config.label == "x"
    with pytest.raises(ConfigError, match="at most 0.5"):
        tokenmerge.load_config("pairs", ratio=0.6)
    with pytest.raises(ConfigError, match="did you mean 'label'"):
        tokenmerge.load_config("pairs", lable="x")
    with pytest.raises(UnknownStrategyError, match="pairs, random, retom, todo, tome"):
        tokenmerge.load_config("pears")

    # ... and serialises like one, alone and through the discriminated union
    text = config.model_dump_json()
    assert tokenmerge.load_config(text) == config
    union = config_union()
    assert union.validate_json(text) == config
    assert type(union.validate_python({"strategy": "pairs"})) is PairsConfig
    assert type(union.validate_python({"strategy": "retom"})) is ReToMConfig
    assert "pairs" in union.json_schema()["discriminator"]["mapping"]

    # ... and merges in a model through the generic adapter
    model = tiny_model()
    x = torch.randn(2, 16, 8)
    reference = model(x)
    handle = tokenmerge.apply(
        model, "pairs", adapter="generic", sites={"include": ["2"], "min_tokens": 1}, ratio=0.5
    )
    assert isinstance(handle.config, PairsConfig)
    assert isinstance(handle.patches[0].strategy, PairsStrategy)
    y = model(x)
    assert y.shape == x.shape
    assert handle.stats()["2"].tokens_out == 8
    # every pair went through the last layer as one token: both copies are equal
    torch.testing.assert_close(y[:, 0::2], y[:, 1::2])
    assert not torch.allclose(y, reference)
    handle.remove()
    torch.testing.assert_close(model(x), reference)


def test_unregister_plugin_removes_everything_it_registered():
    extend.register_plugin(PairsPlugin(), name="pairs-plugin")
    spec = AdapterSpec(name="extra", target="tokenmerge.adapters.generic:GenericAdapter")
    extend.register_plugin(plugin_with(adapters=[spec]), name="adapter-plugin")
    assert tokenmerge.list_adapters() == sorted([*BUILTIN_ADAPTERS, "extra"])
    extend.unregister_plugin("pairs-plugin")
    extend.unregister_plugin("adapter-plugin")
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]
    assert tokenmerge.list_adapters() == BUILTIN_ADAPTERS
    assert [p.name for p in tokenmerge.list_plugins()] == BUILTIN_PLUGINS
    with pytest.raises(UnknownStrategyError):
        tokenmerge.load_config("pairs")
    with pytest.raises(pydantic.ValidationError):
        config_union().validate_python({"strategy": "pairs"})
    assert registry.plugin_manager.get_plugin("pairs-plugin") is None
    # the name is free again
    extend.register_plugin(PairsPlugin(), name="pairs-plugin")
    assert "pairs" in tokenmerge.list_strategies()


def test_module_plugin_named_after_the_module(tmp_path, monkeypatch):
    (tmp_path / "tm_test_module_plugin.py").write_text(
        textwrap.dedent(
            """
            from typing import Literal

            import tokenmerge
            from tokenmerge.strategies.random import RandomConfig, RandomStrategy

            class ModConfig(RandomConfig):
                strategy: Literal["mod"] = "mod"

            class ModStrategy(RandomStrategy):
                name = "mod"
                config_class = ModConfig

            @tokenmerge.extend.hookimpl
            def tokenmerge_register_strategies(register):
                register(ModStrategy)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import tm_test_module_plugin

    try:
        assert extend.register_plugin(tm_test_module_plugin) == "tm_test_module_plugin"
        assert tokenmerge.list_strategies("mod") == ["mod"]
        assert type(tokenmerge.load_config("mod")).__name__ == "ModConfig"
    finally:
        sys.modules.pop("tm_test_module_plugin", None)


def test_register_strategy_convenience():
    extend.register_strategy(PairsStrategy)
    assert "pairs" in tokenmerge.list_strategies()
    assert tokenmerge.list_plugins("strategy:pairs")[0].strategies == ["pairs"]
    assert isinstance(tokenmerge.get_strategy("pairs", ratio=0.25), PairsStrategy)
    with pytest.raises((DuplicateNameError, PluginError)):
        extend.register_strategy(PairsStrategy)
    extend.unregister_plugin("strategy:pairs")
    assert "pairs" not in tokenmerge.list_strategies()


def test_register_strategy_again_with_replace_takes_over():
    """A second version of a strategy registered with replace=True replaces the first."""

    class PairsV2(PairsStrategy):
        pass

    extend.register_strategy(PairsStrategy)
    extend.register_strategy(PairsV2, replace=True)
    assert registry.strategy("pairs") is PairsV2


def test_register_adapter_convenience():
    spec = AdapterSpec(name="generic2", target="tokenmerge.adapters.generic:GenericAdapter")
    extend.register_adapter(spec)
    assert tokenmerge.list_adapters() == sorted([*BUILTIN_ADAPTERS, "generic2"])
    model = tiny_model()
    with tokenmerge.apply(
        model, "tome", adapter="generic2", sites={"include": ["0"], "min_tokens": 1}
    ) as h:
        assert h.adapter.name == "generic"  # the class the spec names
    with pytest.raises(DuplicateNameError):
        extend.register_adapter(AdapterSpec(name="generic", target="a:B"))


# ---------------------------------------------------------------------------- duplicates


def test_duplicate_strategy_name_is_an_error():
    class OtherRetom(ReToMStrategy):
        pass

    with pytest.raises(DuplicateNameError) as info:
        extend.register_plugin(plugin_with(strategies=[OtherRetom]), name="dup")
    message = str(info.value)
    assert "'retom'" in message and "'tokenmerge.strategies'" in message
    assert "replace=True" in message
    assert registry.strategy("retom") is ReToMStrategy
    assert "dup" not in [p.name for p in tokenmerge.list_plugins()]
    assert registry.plugin_manager.get_plugin("dup") is None


def test_duplicate_between_two_runtime_plugins():
    extend.register_plugin(PairsPlugin(), name="first")
    with pytest.raises(DuplicateNameError, match="'first'"):
        extend.register_plugin(PairsPlugin(), name="second")
    assert tokenmerge.list_plugins("first")[0].strategies == ["pairs"]
    assert tokenmerge.list_plugins("second") == []


def test_duplicate_adapter_name_is_an_error():
    spec = AdapterSpec(name="generic", target="somewhere:Else")
    with pytest.raises(DuplicateNameError, match="adapter 'generic'"):
        extend.register_plugin(plugin_with(adapters=[spec]), name="dup-adapter")
    assert registry.adapter("generic").target == "tokenmerge.adapters.generic:GenericAdapter"


def test_replace_true_takes_over_a_name():
    class OtherRetom(ReToMStrategy):
        pass

    extend.register_plugin(plugin_with(strategies=[(OtherRetom, True)]), name="override")
    assert registry.strategy("retom") is OtherRetom
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]
    assert tokenmerge.list_plugins("override")[0].strategies == ["retom"]
    spec = AdapterSpec(name="generic", target="tokenmerge.adapters.generic:GenericAdapter")
    extend.register_adapter(spec, replace=True)
    assert registry.adapter("generic") is spec


def test_unregistering_a_replacing_plugin_restores_the_replaced_strategy():
    class OtherRetom(ReToMStrategy):
        pass

    extend.register_plugin(plugin_with(strategies=[(OtherRetom, True)]), name="override")
    extend.unregister_plugin("override")
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]
    assert registry.strategy("retom") is ReToMStrategy


def test_plugin_name_taken_is_a_plugin_error():
    extend.register_plugin(PairsPlugin(), name="same")
    with pytest.raises(PluginError, match="already registered"):
        extend.register_plugin(plugin_with(), name="same")
    with pytest.raises(PluginError, match="already registered"):
        extend.register_plugin(plugin_with(), name="tokenmerge.strategies")


def test_same_plugin_object_twice_is_a_plugin_error():
    plugin = PairsPlugin()
    extend.register_plugin(plugin, name="once")
    with pytest.raises(PluginError):
        extend.register_plugin(plugin, name="twice")


# ---------------------------------------------------------------------------- atomic plugins


class BadName(PairsStrategy):
    name = "Bad Name"


def test_plugin_with_a_bad_second_strategy_registers_nothing():
    with pytest.raises(PluginError, match="lower-case name"):
        extend.register_plugin(plugin_with(strategies=[PairsStrategy, BadName]), name="half")
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]
    assert tokenmerge.list_plugins("half") == []
    assert registry.plugin_manager.get_plugin("half") is None
    # nothing is left behind: the same name and strategy register cleanly afterwards
    extend.register_plugin(PairsPlugin(), name="half")
    assert "pairs" in tokenmerge.list_strategies()


def test_plugin_with_a_duplicate_second_strategy_registers_nothing():
    class OtherTome(RandomStrategy):
        name = "tome"
        config_class = ToMeConfig

    with pytest.raises(DuplicateNameError):
        extend.register_plugin(plugin_with(strategies=[PairsStrategy, OtherTome]), name="h")
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]
    assert tokenmerge.list_plugins("h") == []


def test_plugin_whose_adapter_hook_fails_registers_no_strategy_either():
    with pytest.raises(PluginError, match="AdapterSpec"):
        extend.register_plugin(
            plugin_with(strategies=[PairsStrategy], adapters=["not a spec"]), name="h"
        )
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]
    spec = AdapterSpec(name="fine", target="a:B")
    with pytest.raises(RuntimeError, match="boom"):
        extend.register_plugin(
            plugin_with(
                strategies=[PairsStrategy], adapters=[spec], raise_after=RuntimeError("boom")
            ),
            name="h",
        )
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]
    assert tokenmerge.list_adapters() == BUILTIN_ADAPTERS
    assert tokenmerge.list_plugins("h") == []


# ---------------------------------------------------------------------------- bad classes


class MismatchedConfig(MergeConfig):
    strategy: Literal["other"] = Field(default="other", description="Always 'other'.")


class NoLiteralConfig(MergeConfig):
    strategy: str = Field(default="loose", description="Always 'loose'.")


def _strategy(name, config_class, **attrs):
    return type("Made", (PairsStrategy,), {"name": name, "config_class": config_class, **attrs})


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_strategy("Pairs", PairsConfig), "lower-case name"),
        (_strategy("my pairs", PairsConfig), "lower-case name"),
        (_strategy("9pairs", PairsConfig), "lower-case name"),
        (_strategy(7, PairsConfig), "lower-case name"),
        (_strategy("pairs", dict), "config_class must subclass tokenmerge.MergeConfig"),
        (_strategy("pairs", RandomConfig), "default 'random'"),
        (_strategy("pairs", MismatchedConfig), "Literal['pairs']"),
        (RandomConfig, "subclass of tokenmerge.extend.Strategy"),
        (int, "subclass of tokenmerge.extend.Strategy"),
        ("pairs", "subclass of tokenmerge.extend.Strategy"),
    ],
    ids=[
        "upper",
        "space",
        "digit-first",
        "not-str",
        "config-not-mergeconfig",
        "config-default-random",
        "config-default-other",
        "a-config",
        "int",
        "str",
    ],
)
def test_bad_strategy_class_rejected_with_plugin_error(cls, message):
    with pytest.raises(PluginError, match=re.escape(message)):
        extend.register_plugin(plugin_with(strategies=[cls]), name="bad")
    assert tokenmerge.list_plugins("bad") == []
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]


def test_strategy_without_a_name_rejected_with_plugin_error():
    class Nameless(Strategy):
        config_class = PairsConfig

        def capacity(self, layout, site):
            return 0

        def make_plan(self, features, layout, site, num_merge, generator):
            return Plan.identity(layout.num_image_tokens)

    with pytest.raises(PluginError, match="lower-case name"):
        extend.register_plugin(plugin_with(strategies=[Nameless]), name="bad")


@pytest.mark.parametrize("cls", [RandomConfig, int, "pairs"])
def test_register_strategy_with_a_non_strategy_is_a_plugin_error(cls):
    with pytest.raises(PluginError):
        extend.register_strategy(cls)


def test_config_whose_strategy_is_not_a_literal_is_rejected():
    """Such a config cannot join the discriminated union: registering it must fail (else
    config_union() breaks for every strategy)."""
    with pytest.raises(PluginError, match="Literal"):
        extend.register_strategy(_strategy("loose", NoLiteralConfig))
    assert type(config_union().validate_python({"strategy": "retom"})) is ReToMConfig


def test_adapter_spec_target_must_name_a_class():
    with pytest.raises(PluginError, match="'module:Class'"):
        AdapterSpec(name="x", target="just_a_module")


# ---------------------------------------------------------------------------- availability


class FakeLibModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(8, 8)

    def forward(self, x):
        return self.block(x)


FakeLibModel.__module__ = "fakelib.models"


class UserModel(FakeLibModel):
    """A user's subclass (in another module) of a model class the fake library defines."""


def fake_spec(**requires) -> AdapterSpec:
    return AdapterSpec(
        name="fake",
        target="x:Y",
        requires=requires or {"definitely-not-installed-dist": "1.0"},
        extra="fake",
        claims=("fakelib.",),
        description="models of the fake library",
    )


def test_adapter_with_missing_library_is_listed_as_unavailable():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extend.register_adapter(fake_spec())
        assert tokenmerge.list_adapters() == sorted([*BUILTIN_ADAPTERS, "fake"])
        assert tokenmerge.list_adapters(available=False) == ["fake"]
        assert tokenmerge.list_adapters(available=True) == BUILTIN_ADAPTERS
        assert tokenmerge.list_adapters("f*", available=False) == ["fake"]
        status = tokenmerge.adapter_status("fake")
    assert caught == []
    assert "definitely-not-installed-dist is not installed" in status
    assert "pip install 'tokenmerge[fake]'" in status
    assert registry.adapter("fake").available is False
    assert "x" not in sys.modules  # the target was never imported


@pytest.mark.parametrize("model_class", [FakeLibModel, UserModel])
def test_model_of_unavailable_adapter_names_the_extra(model_class):
    extend.register_adapter(fake_spec())
    model = model_class()
    with pytest.raises(UnsupportedModelError) as info:
        tokenmerge.apply(model, "tome")
    message = str(info.value)
    assert "'fake' adapter" in message
    assert "pip install 'tokenmerge[fake]'" in message
    assert model_class.__name__ in message
    with pytest.raises(UnsupportedModelError, match=r"pip install 'tokenmerge\[fake\]'"):
        tokenmerge.apply(model, "tome", adapter="fake")
    assert not hasattr(model, "_tokenmerge_handle")
    # the generic adapter, named explicitly, still handles it
    with tokenmerge.apply(
        model, "tome", adapter="generic", sites={"include": ["block"], "min_tokens": 1}
    ):
        assert model(torch.randn(1, 16, 8)).shape == (1, 16, 8)


def test_adapter_with_too_old_library_is_unavailable():
    extend.register_adapter(fake_spec(torch="999.0"))
    assert tokenmerge.list_adapters(available=False) == ["fake"]
    status = tokenmerge.adapter_status("fake")
    assert f"torch {importlib.metadata.version('torch')} is older than 999.0" in status
    assert "pip install 'tokenmerge[fake]'" in status
    with pytest.raises(UnsupportedModelError, match="older than 999.0"):
        tokenmerge.apply(FakeLibModel(), "tome")


def test_adapter_without_extra_hints_at_the_requirement():
    spec = AdapterSpec(name="fake2", target="x:Y", requires={"torch": "999.0"})
    extend.register_adapter(spec)
    assert "pip install 'torch>=999.0'" in tokenmerge.adapter_status("fake2")


def test_adapter_with_installed_library_is_available():
    extend.register_adapter(
        AdapterSpec(name="ok", target="x:Y", requires={"torch": "2.0", "pydantic": "2"})
    )
    assert tokenmerge.adapter_status("ok") == "available"
    assert tokenmerge.list_adapters(available=True) == sorted([*BUILTIN_ADAPTERS, "ok"])


def test_model_no_adapter_claims_suggests_generic():
    with pytest.raises(UnsupportedModelError, match="adapter='generic'"):
        tokenmerge.apply(tiny_model(), "tome")


# ---------------------------------------------------------------------------- entry points


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory):
    """The distributions in tests/plugin_dists, pip-installed into a throwaway target folder.

    Installing into the shared venv would show the broken plugins to every other test process
    running meanwhile (their PluginWarnings are errors there); the folder is put on the
    PYTHONPATH of the subprocesses only, and removed afterwards.
    """
    root = tmp_path_factory.mktemp("plugin_dists")
    sources = []
    for name in ("tokenmerge_demo_plugin", "tokenmerge_broken_plugin"):
        source = root / name
        shutil.copytree(
            PLUGIN_DISTS / name,
            source,
            ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
        )
        sources.append(str(source))
    target = root / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--disable-pip-version-check", "-q", "--target", str(target)]
    done = subprocess.run(command + sources, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "tokenmerge_demo_plugin-0.3.1.dist-info").is_dir()
    yield target
    shutil.rmtree(root, ignore_errors=True)


CHECK_SCRIPT = """
import json, os, sys, warnings
import torch


def check():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import tokenmerge
        strategies = tokenmerge.list_strategies()
    plugins = {p.name: [p.distribution, p.version, p.builtin, p.strategies, p.adapters]
               for p in tokenmerge.list_plugins()}
    used = None
    if "demo_pairs" in strategies:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        with tokenmerge.apply(model, "demo_pairs", ratio=0.5, adapter="generic",
                              include=["1"], min_tokens=1) as handle:
            y = model(torch.randn(2, 16, 8))
            used = [type(handle.config).__name__, handle.stats()["1"].tokens_out,
                    bool(torch.equal(y[:, 0::2], y[:, 1::2]))]
    return {
        "strategies": strategies,
        "adapters": tokenmerge.list_adapters(),
        "plugins": plugins,
        "used": used,
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
    }


results = {"fresh": check()}  # the environment as given, on the first import
from tokenmerge.registry import DISABLE_AUTOLOAD_ENV, registry
for value in json.loads(sys.argv[1]):  # then reloaded under other values of the switch
    os.environ[DISABLE_AUTOLOAD_ENV] = value
    registry.reset()
    results[value] = check()
print(json.dumps(results))
"""


def run_check(target: Path, values: list[str] = (), **env: str) -> dict:
    """Results of CHECK_SCRIPT in a fresh interpreter that sees the installed plugins."""
    environment = {k: v for k, v in os.environ.items() if k != DISABLE_AUTOLOAD_ENV}
    pythonpath = [str(target), os.environ.get("PYTHONPATH", "")]
    environment.update(PYTHONPATH=os.pathsep.join(p for p in pythonpath if p), **env)
    done = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, json.dumps(list(values))],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


TEST_DISTRIBUTIONS = {"tokenmerge", "tokenmerge-demo-plugin", "tokenmerge-broken-plugin"}


def without_environment_plugins(result: dict) -> list[str]:
    """The strategies listed, less those of plugins the environment itself has installed (the
    dev venv installs examples/tokenmerge-plugin-example, whose strategy the subprocess sees)."""
    others = {
        name
        for distribution, _, _, strategies, _ in result["plugins"].values()
        if distribution not in TEST_DISTRIBUTIONS
        for name in strategies
    }
    return [name for name in result["strategies"] if name not in others]


DISABLING = ["1", "true", "yes", "TRUE"]
NOT_DISABLING = ["0", "", "false"]


@pytest.fixture(scope="module")
def autoload_results(installed_plugins) -> dict:
    """One fresh interpreter with autoloading on, then reloaded under each value of the switch."""
    return run_check(installed_plugins, DISABLING + NOT_DISABLING)


def test_entry_point_plugin_is_loaded_listed_and_usable(autoload_results):
    result = autoload_results["fresh"]
    assert without_environment_plugins(result) == ["demo_pairs", "random", "retom", "todo", "tome"]
    assert result["plugins"]["demo"] == [
        "tokenmerge-demo-plugin",
        "0.3.1",
        False,
        ["demo_pairs"],
        [],
    ]
    assert result["used"] == ["DemoPairsConfig", 8, True]
    # the built-ins are still there
    assert set(BUILTIN_PLUGINS) <= set(result["plugins"])
    assert result["adapters"] == BUILTIN_ADAPTERS


def test_broken_entry_point_plugins_warn_and_are_skipped(autoload_results):
    result = autoload_results["fresh"]
    plugin_warnings = {
        message.split("'")[1]: message
        for category, message in result["warnings"]
        if category == "PluginWarning"
    }
    assert sorted(plugin_warnings) == ["broken_hook", "broken_import"]
    for message in plugin_warnings.values():
        assert "tokenmerge-broken-plugin 0.0.1" in message
        assert "was skipped" in message
    assert "ModuleNotFoundError" in plugin_warnings["broken_import"]
    assert "tm_broken_plugin.no_such_module" in plugin_warnings["broken_import"]
    assert "RuntimeError: deliberately broken plugin hook" in plugin_warnings["broken_hook"]
    # skipped entirely (atomic: the strategy the broken hook registered first is gone too)
    assert "half_done" not in result["strategies"]
    assert "broken_hook" not in result["plugins"]
    assert "broken_import" not in result["plugins"]
    # the other plugins work
    assert result["used"] == ["DemoPairsConfig", 8, True]
    assert [c for c, _ in result["warnings"]] == ["PluginWarning", "PluginWarning"]


def _assert_autoload_off(result: dict) -> None:
    assert result["strategies"] == ["random", "retom", "todo", "tome"]
    assert sorted(result["plugins"]) == BUILTIN_PLUGINS
    assert result["warnings"] == []
    assert result["used"] is None


def test_autoload_disabled_from_the_start(installed_plugins):
    result = run_check(installed_plugins, **{DISABLE_AUTOLOAD_ENV: "1"})["fresh"]
    _assert_autoload_off(result)


@pytest.mark.parametrize("value", DISABLING)
def test_autoload_disabled_by_truthy_values(autoload_results, value):
    _assert_autoload_off(autoload_results[value])


@pytest.mark.parametrize("value", NOT_DISABLING)
def test_autoload_stays_on_for_falsy_values(autoload_results, value):
    result = autoload_results[value]
    assert without_environment_plugins(result) == ["demo_pairs", "random", "retom", "todo", "tome"]
    assert result["used"] == ["DemoPairsConfig", 8, True]
    assert len(result["warnings"]) == 2


def test_plain_import_and_listing_emit_no_warning():
    script = (
        "import warnings; warnings.simplefilter('error'); import tokenmerge; "
        "tokenmerge.list_strategies(); tokenmerge.list_adapters(available=False); "
        "tokenmerge.list_plugins()"
    )
    # with autoloading on (tests/conftest.py turns it off): installed plugins load silently too
    environment = {k: v for k, v in os.environ.items() if k != DISABLE_AUTOLOAD_ENV}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert done.returncode == 0, done.stderr
