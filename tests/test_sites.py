"""Where a setting lives: the ``Sites`` selector, typed adapter options, and the old flat
spellings, which keep working for one release with a warning that names the new one."""

from __future__ import annotations

import json
import re
import warnings

import pydantic
import pytest
import torch
from torch import nn
from vit_models import make_vit, pixels

import tokenmerge
from tokenmerge import ConfigError, Sites, load_config
from tokenmerge.adapters._vit import ViTOptions
from tokenmerge.adapters.generic import GenericOptions
from tokenmerge.deprecated import SITE_FIELDS
from tokenmerge.extend import AdapterOptions
from tokenmerge.site import Site

#: an old flat field, a value, and the new spelling its warning must name
FLAT = [
    ("levels", (1, 2), "sites={'levels': (1, 2)}"),
    ("stages", ("up",), "sites={'stages': ('up',)}"),
    ("blocks", (0, -1), "sites={'blocks': (0, -1)}"),
    ("include", ("up_blocks.**",), "sites={'include': ('up_blocks.**',)}"),
    ("exclude", ("mid_block.*",), "sites={'exclude': ('mid_block.*',)}"),
    ("merge_attn", False, "sites={'attn': False}"),
    ("merge_cross_attn", True, "sites={'cross_attn': True}"),
    ("merge_mlp", True, "sites={'mlp': True}"),
    ("min_tokens", 64, "sites={'min_tokens': 64}"),
]


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


# ---------------------------------------------------------------------------- Sites


def test_sites_defaults_and_methods():
    sites = Sites()
    assert (sites.attn, sites.cross_attn, sites.mlp, sites.min_tokens) == (True, False, False, None)
    assert sites.targets() == ("attn",) and not sites.explicit and sites.filters() == {}
    chosen = Sites(levels=[1], exclude=["*.1"], mlp=True)
    assert chosen.targets() == ("attn", "mlp") and chosen.explicit
    assert chosen.filters() == {"levels": (1,), "exclude": ("*.1",)}
    assert chosen.selects(Site("a.0", level=1)) and not chosen.selects(Site("a.1", level=1))
    assert Sites(exclude=["x"]).explicit is False  # exclude narrows the adapter's choice only


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"levels": [0]}, "greater than or equal to 1"),
        ({"stages": ["side"]}, "'first', 'middle' or 'last'"),
        ({"include": [" "]}, "must not be empty"),
        ({"min_tokens": 0}, "greater than or equal to 1"),
        ({"mlp": "maybe"}, "valid boolean"),
        ({"levls": [1]}, "Extra inputs are not permitted"),
    ],
)
def test_sites_validate(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        Sites(**fields)


def test_sites_is_frozen_and_a_config_takes_it_or_a_dict():
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        Sites().mlp = True
    as_dict = load_config("tome", sites={"levels": (1, 2), "mlp": True})
    as_object = load_config("tome", sites=Sites(levels=(1, 2), mlp=True))
    assert as_dict == as_object and isinstance(as_dict.sites, Sites)
    assert "Sites" in tokenmerge.__all__ and tokenmerge.Sites is Sites


def test_unknown_sites_field_lists_the_allowed_ones_and_close_matches():
    with pytest.raises(ConfigError) as info:
        load_config("tome", sites={"levls": [1]})
    message = str(info.value)
    assert "sites.levls: unknown field" in message and "did you mean 'levels'?" in message
    assert "cross_attn" in message and "min_tokens" in message
    with pytest.raises(ConfigError, match=r"use sites=\{'mlp': \.\.\.\}"):
        load_config("tome", mlp=True)  # a Sites field given at the top


# ---------------------------------------------------------------------------- dumps


@pytest.mark.parametrize("strategy", ["tome", "retom", "random"])
def test_dumps_use_the_new_shape_and_load_back_equal(strategy):
    config = load_config(strategy, sites={"levels": [1, 2], "mlp": True, "exclude": ["x.*"]})
    dumped = config.model_dump()
    assert dumped["sites"]["levels"] == (1, 2) and dumped["sites"]["mlp"] is True
    assert not set(SITE_FIELDS) & set(dumped) and "mode" not in dumped
    assert load_config(dumped) == config
    assert load_config(config.model_dump_json()) == config
    assert load_config(json.loads(config.model_dump_json())) == config


# ---------------------------------------------------------------------------- deprecations


@pytest.mark.parametrize(("old", "value", "new"), FLAT)
def test_flat_site_field_warns_naming_sites_and_means_the_same(old, value, new):
    expected = load_config("retom", sites={SITE_FIELDS[old]: value})
    with pytest.warns(DeprecationWarning, match=re.escape(f"'{old}' is deprecated; use {new}")):
        config = load_config("retom", **{old: value})
    assert config == expected
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated"):
        assert load_config({"strategy": "retom", old: value}) == expected
    text = json.dumps({"strategy": "retom", old: value})
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated"):
        assert load_config(text) == expected
    with pytest.warns(
        DeprecationWarning, match=rf"config\.{old} is deprecated; read config\.sites"
    ):
        assert getattr(config, old) == getattr(expected.sites, SITE_FIELDS[old])


def test_flat_fields_through_apply_select_the_same_sites():
    new = tokenmerge.apply(model(), "tome", adapter="generic",
                           sites={"include": ["1"], "min_tokens": 1})  # fmt: skip
    with pytest.warns(DeprecationWarning) as caught:
        old = tokenmerge.apply(model(), "tome", adapter="generic", include=["1"], min_tokens=1)
    assert [str(w.message).split("; ")[1] for w in caught] == [
        "use sites={'include': ['1']} (a tokenmerge.Sites)",
        "use sites={'min_tokens': 1} (a tokenmerge.Sites)",
    ]
    assert all(w.filename == __file__ for w in caught)  # they point at the caller's line
    assert [s.name for s in old.sites] == [s.name for s in new.sites] == ["1"]
    assert old.config == new.config
    x = torch.randn(2, 16, 8)
    assert old.model(x).shape == x.shape and old.stats()["1"].tokens_out == 8


def test_flat_override_lies_over_the_config_sites():
    base = load_config("tome", sites={"levels": (1,), "mlp": True})
    with pytest.warns(DeprecationWarning):
        config = load_config(base, levels=(2,))
    assert config.sites == Sites(levels=(2,), mlp=True)  # the other site fields stay
    with pytest.warns(DeprecationWarning):
        config = load_config({"strategy": "tome", "sites": {"mlp": True}}, min_tokens=3)
    assert config.sites == Sites(mlp=True, min_tokens=3)


@pytest.mark.parametrize(
    "given",
    [
        {"levels": (1,), "sites": {"levels": (2,)}},
        {"merge_mlp": True, "sites": Sites(mlp=False)},
        {"min_tokens": 3, "sites": {"min_tokens": 4, "mlp": True}},
    ],
)
def test_a_setting_given_both_ways_is_a_config_error(given):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ConfigError, match="given both ways"):
            load_config("tome", **given)
        with pytest.raises(ConfigError, match="given both ways"):
            load_config({"strategy": "tome", **given})


def test_old_merge_fields_with_other_sites_fields_combine():
    with pytest.warns(DeprecationWarning, match=r"use sites=\{'mlp': True\}"):
        config = load_config("tome", merge_mlp=True, sites={"levels": (1,)})
    assert config.sites == Sites(levels=(1,), mlp=True)


@pytest.mark.parametrize(("old", "value"), [("mode", "local"), ("proportional_attention", False)])
def test_adapter_fields_on_the_config_warn_and_still_reach_the_adapter(old, value):
    with pytest.warns(DeprecationWarning, match=rf"use adapter_options=\{{'{old}': "):
        config = load_config("tome", **{old: value})
    assert config.model_dump() == load_config("tome").model_dump()  # not in dumps
    with pytest.warns(DeprecationWarning, match=rf"config\.{old} is deprecated"):
        assert getattr(config, old) == value
    vit = make_vit()
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated"):
        handle = tokenmerge.apply(vit, "tome", r=4, **{old: value})
    with handle:
        assert getattr(handle.adapter.options, old) == value
        vit(pixels())
    # carried over when the config is loaded again with overrides
    with tokenmerge.apply(vit, config, r=4) as handle:
        assert getattr(handle.adapter.options, old) == value


def test_deprecated_mode_behaves_as_the_adapter_option():
    vit = make_vit()
    x = pixels()
    with (
        torch.no_grad(),
        tokenmerge.apply(vit, "tome", ratio=0.6, adapter_options={"mode": "local"}),
    ):
        expected = vit(x)
    with pytest.warns(DeprecationWarning), torch.no_grad():
        with tokenmerge.apply(vit, "tome", ratio=0.6, mode="local") as handle:
            assert handle.adapter.mode == "local"
            got = vit(x)
    assert torch.equal(got, expected)


def test_deprecated_mode_on_a_local_only_adapter():
    with pytest.warns(DeprecationWarning):
        with tokenmerge.apply(model(), "tome", adapter="generic", sites={"include": ["1"]},
                              mode="local") as handle:  # fmt: skip
            assert handle.adapter.mode == "local"
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError) as info:
        tokenmerge.apply(model(), "tome", adapter="generic", sites={"include": ["1"]},
                         mode="progressive")  # fmt: skip
    assert "'progressive' is not available" in str(info.value) and "'local'" in str(info.value)


def test_mode_given_both_ways_is_a_config_error():
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="both ways"):
        tokenmerge.apply(make_vit(), "tome", mode="local", adapter_options={"mode": "local"})


# ---------------------------------------------------------------------------- adapter options


def test_every_adapter_names_a_frozen_described_options_class():
    from tokenmerge.registry import registry

    for spec in registry.table("adapter").values():
        options = spec.load().options_class
        assert issubclass(options, AdapterOptions), spec.name
        assert options.model_config["frozen"] and options.model_config["extra"] == "forbid"
        for name, info in options.model_fields.items():
            assert info.description and len(info.description) <= 200, (spec.name, name)
    assert AdapterOptions.model_fields == {}


def test_unknown_option_lists_the_allowed_ones_and_close_matches():
    with pytest.raises(ConfigError) as info:
        tokenmerge.apply(model(), "tome", adapter="generic", sites={"include": ["1"]},
                         adapter_options={"num_prefx": 1})  # fmt: skip
    message = str(info.value)
    assert "options of adapter 'generic'" in message
    assert (
        "num_prefx: unknown option; allowed options: grid, num_prefix, full_length_args, "
        "timestep_arg" in message
    )
    assert "did you mean 'num_prefix'?" in message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_prefix": -1}, "num_prefix must be 'auto' or a whole number of tokens"),
        ({"num_prefix": True}, "num_prefix must be 'auto' or a whole number .* got True"),
        ({"num_prefix": "all"}, "num_prefix must be 'auto' or a whole number .* got 'all'"),
        ({"grid": (0, 4)}, "grid must be \\(height, width\\)"),
    ],
)
def test_bad_option_value_is_a_config_error(options, message):
    with pytest.raises(ConfigError, match=message):
        tokenmerge.apply(model(), "tome", adapter="generic", sites={"include": ["1"]},
                         adapter_options=options)  # fmt: skip


def test_an_options_object_is_handed_to_the_adapter():
    options = GenericOptions(grid=(2, 8))
    with tokenmerge.apply(model(), "tome", adapter="generic", adapter_options=options,
                          sites={"include": ["1"], "min_tokens": 1}) as handle:  # fmt: skip
        assert handle.adapter.options is options
        handle.model(torch.randn(1, 16, 8))
    with pytest.raises(ConfigError, match="takes GenericOptions options"):
        tokenmerge.apply(model(), "tome", adapter="generic", adapter_options=ViTOptions(),
                         sites={"include": ["1"]})  # fmt: skip
    with tokenmerge.apply(make_vit(), "tome", r=2, adapter_options=ViTOptions(mode="local")) as h:
        assert h.adapter.mode == "local" and isinstance(h.adapter.options, ViTOptions)


def test_a_plugin_config_field_named_like_an_old_one_is_its_own():
    from typing import Literal

    from pydantic import Field

    from tokenmerge.strategies.random import RandomConfig, RandomStrategy

    class ModalConfig(RandomConfig):
        strategy: Literal["modal"] = Field(default="modal", description="Always 'modal'.")
        mode: Literal["a", "b"] = Field(default="a", description="A field of its own. Default a.")

    class Modal(RandomStrategy):
        name, config_class = "modal", ModalConfig

    tokenmerge.extend.register_strategy(Modal)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config = load_config("modal", mode="b")
            assert config.mode == "b" and config.deprecated_adapter_options == {}
            assert load_config({"strategy": "modal", "mode": "b"}) == config
    finally:
        tokenmerge.extend.unregister_plugin("strategy:modal")
