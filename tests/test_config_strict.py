"""Configs are never silently wrong (issue 23, items 4, 8 and 9): every selector the user wrote
selects a site of the model, configs are deeply immutable and hashable and every derived config is
validated, and types are strict (no bools for numbers, per-block lists of the model's length)."""

from __future__ import annotations

import copy
import json
import pickle
from typing import Literal

import numpy as np
import pydantic
import pytest
from diffusers import UNet2DConditionModel
from pydantic import Field
from snapshots import hook_count, snapshot
from torch import nn
from unet_models import tiny_unet
from vit_models import make_vit

import tokenmerge
from tokenmerge import ConfigError, MergeConfig, NoSitesError, Sites, load_config
from tokenmerge.errors import UnmatchedSelectorError
from tokenmerge.frozen import FrozenDict, mutable_part
from tokenmerge.selectors import PerSite, per_site_fields
from tokenmerge.site import GLOB_RULE, module_glob

BUILTIN = ["random", "retom", "todo", "tome"]

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # the selector tests set ViT ratios above 0.25 on purpose; what merges is checked, not quality
    pytest.mark.filterwarnings("ignore::tokenmerge.errors.RatioWarning"),
]


def rejected(config, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config, **overrides)
    return str(info.value)


def unmatched(model: nn.Module, config: str = "tome", **overrides) -> str:
    """The message of the ``UnmatchedSelectorError`` that ``apply`` raises; the model is left
    exactly as it was."""
    before = snapshot(model)
    try:
        handle = tokenmerge.apply(model, config, **overrides)
    except UnmatchedSelectorError as error:
        assert snapshot(model) == before and hook_count(model) == 0
        return str(error)
    handle.remove()  # the shared model stays unpatched for the next test
    pytest.fail(f"apply accepted {overrides}")


def site_ratios(model: nn.Module, config: str = "tome", **overrides) -> dict[str, float]:
    with tokenmerge.apply(model, config, **overrides) as handle:
        return {patch.site.name: patch.config.ratio for patch in handle.patches}


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return make_vit()  # blocks.0 .. blocks.2: stages first, middle, last


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_unet()  # attention at level 1 (down_blocks.0, up_blocks.1) and level 2 (mid)


# ---------------------------------------------------------------------------- item 8: immutable


@pytest.mark.parametrize("strategy", BUILTIN)
def test_a_config_mapping_cannot_change_in_place(strategy):
    config = load_config(strategy, ratio={"*": 0.5})
    for change in (
        lambda m: m.__setitem__("*", 1.5),
        lambda m: m.__delitem__("*"),
        lambda m: m.update({"*": -0.5}),
        lambda m: m.setdefault("up", 0.9),
        lambda m: m.pop("*"),
        lambda m: m.popitem(),
        lambda m: m.clear(),
    ):
        with pytest.raises(TypeError, match="immutable.*load_config"):
            change(config.ratio)
    with pytest.raises(TypeError, match="immutable"):
        ratio = config.ratio
        ratio |= {"*": 0.9}
    assert config.ratio == {"*": 0.5}
    assert config.ratio_for(tokenmerge.extend.Site("a")) == 0.5


def test_default_and_nested_values_are_immutable_too():
    config = load_config("retom")
    with pytest.raises(TypeError, match="immutable"):
        config.window_size["up"] = 1
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.sites.include = ("x",)
    assert isinstance(load_config("retom", sites={"levels": [1, 2]}).sites.levels, tuple)
    assert isinstance(load_config("tome", ratio=[0.1, 0.2]).ratio, tuple)
    with pytest.raises(TypeError, match="immutable"):
        config._adapter_options["mode"] = "local"
    assert FrozenDict.fromkeys("ab", 1) == {"a": 1, "b": 1}


@pytest.mark.parametrize("strategy", BUILTIN)
def test_every_field_of_every_config_is_deeply_immutable(strategy):
    for ratio in (0.3, {"blocks.*": 0.2, "*": 0.1}, (0.1, 0.2)):
        config = load_config(strategy, ratio=ratio, sites={"include": ["a"], "levels": [1]})
        assert mutable_part(config) is None
        for name in type(config).model_fields:
            assert mutable_part(getattr(config, name)) is None, name


@pytest.mark.parametrize("strategy", BUILTIN)
def test_configs_hash_and_equal_configs_hash_equal(strategy):
    for fields in ({}, {"ratio": {"up": 0.3, "*": 0.2}}, {"ratio": (0.1, 0.2), "r": (1, 2)}):
        one, two = load_config(strategy, **fields), load_config(strategy, **fields)
        assert one == two and hash(one) == hash(two)
        assert hash(one.sites) == hash(Sites())
    assert len({load_config(strategy), load_config(strategy), load_config(strategy, seed=1)}) == 2


def test_glob_key_order_is_part_of_equality():
    """The first matching glob wins, so the same items in another order are another config."""
    one = load_config("tome", ratio={"up_blocks.*.**": 0.1, "up_blocks.1.**": 0.2})
    two = load_config("tome", ratio={"up_blocks.1.**": 0.2, "up_blocks.*.**": 0.1})
    site = tokenmerge.extend.Site("up_blocks.1.attentions.0")
    assert one.ratio_for(site) != two.ratio_for(site)
    assert one != two and one.ratio != two.ratio
    assert one.ratio == {"up_blocks.*.**": 0.1, "up_blocks.1.**": 0.2}


@pytest.mark.parametrize("strategy", BUILTIN)
def test_model_copy_with_changes_validates(strategy):
    config = load_config(strategy, ratio={"*": 0.3}, seed=4)
    for update, allowed in (
        ({"ratio": -0.5}, "greater than or equal to 0"),
        ({"ratio": {"*": 1.5}}, "less than 1"),
        ({"ratio": {"": 0.5}}, "keys select sites"),
        ({"ratio": True}, "not a bool"),
        ({"cache_interval": 0}, "greater than or equal to 1"),
        ({"sites": {"levels": (0,)}}, "greater than or equal to 1"),
        ({"raito": 0.2}, "did you mean 'ratio'"),
    ):
        with pytest.raises(ConfigError, match=allowed):
            config.model_copy(update=update)
        with pytest.raises(ConfigError, match=allowed):
            config.__replace__(**update)  # copy.replace (Python 3.13) goes through it
    with pytest.raises(ConfigError, match="greater than or equal to 1"):
        config.sites.model_copy(update={"min_tokens": 0})
    copied = config.model_copy(update={"ratio": {"up": 0.4, "*": 0.1}})
    assert type(copied) is type(config) and isinstance(copied.ratio, FrozenDict)
    assert (copied.seed, copied.ratio) == (4, {"up": 0.4, "*": 0.1})
    assert copied.model_fields_set == {"strategy", "ratio", "seed"}
    assert config.model_copy() == config and config.model_copy(deep=True) == config


def test_model_copy_keeps_adapter_options_given_the_old_way():
    with pytest.warns(DeprecationWarning):
        config = load_config("tome", mode="local")
    copied = config.model_copy(update={"ratio": 0.2})
    assert copied.deprecated_adapter_options == {"mode": "local"}


@pytest.mark.parametrize("strategy", BUILTIN)
def test_deepcopy_pickle_and_json_round_trips_keep_configs_equal_and_frozen(strategy):
    config = load_config(strategy, ratio={"blocks.*": 0.3, "*": 0.1}, sites={"levels": (1,)})
    for again in (
        copy.deepcopy(config),
        copy.copy(config),
        pickle.loads(pickle.dumps(config)),
        load_config(config.model_dump_json()),
        load_config(config.model_dump()),
        load_config(json.loads(json.dumps(config.model_dump()))),
    ):
        assert again == config and hash(again) == hash(config)
        assert isinstance(again.ratio, FrozenDict)
        with pytest.raises(TypeError, match="immutable"):
            again.ratio["*"] = 0.9
    assert json.loads(config.model_dump_json())["ratio"] == {"blocks.*": 0.3, "*": 0.1}
    assert type(config.model_dump()["ratio"]) is dict  # a dump is the user's to change


def test_a_plugin_config_must_hold_immutable_values_and_gets_per_site_fields():
    class Loose(MergeConfig):
        strategy: Literal["loose"] = Field(default="loose", description="Always 'loose'.")
        tags: list[str] = Field(default_factory=list, description="Tags. Default none.")

    with pytest.raises(pydantic.ValidationError, match="'tags' of Loose holds a list.*tuple"):
        Loose()

    class Windowed(MergeConfig):
        strategy: Literal["windowed"] = Field(default="windowed", description="Always it.")
        window: PerSite[int] = Field(default=2, description="A window. Default 2.")

    assert per_site_fields(Windowed) == ("ratio", "r", "window")
    config = Windowed(window={3: 4, "*": 2})
    assert config.window == {"3": 4, "*": 2} and isinstance(config.window, FrozenDict)
    assert hash(config) == hash(Windowed(window={"3": 4, "*": 2}))
    with pytest.raises(pydantic.ValidationError, match="window keys select sites"):
        Windowed(window={"": 2})
    with pytest.raises(pydantic.ValidationError, match="empty"):
        Windowed(window={})


# ---------------------------------------------------------------------------- item 9: strict


@pytest.mark.parametrize("strategy", BUILTIN)
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ratio", False),
        ("ratio", True),
        ("ratio", {"*": False}),
        ("ratio", (0.1, True)),
        ("cache_interval", True),
        ("r", True),
        ("r", (True, 1)),
        ("seed", True),
        ("seed", False),
        ("sites.min_tokens", True),
        ("sites.levels", (True,)),
        ("sites.blocks", (False,)),
    ],
)
def test_bools_are_not_numbers(strategy, field, value):
    owner, _, name = field.rpartition(".")
    message = rejected(strategy, **({owner: {name: value}} if owner else {field: value}))
    assert "not a bool: write the number itself" in message
    assert field in message


@pytest.mark.parametrize(
    ("strategy", "field", "value"),
    [
        ("retom", "window_size", True),
        ("retom", "window_size", {"*": True}),
        ("tome", "sx", True),
        ("random", "sy", False),
    ],
)
def test_strategy_fields_refuse_bools_too(strategy, field, value):
    assert "not a bool" in rejected(strategy, **{field: value})


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("cache_interval", 2.0, "valid integer, not float"),
        ("seed", "3", "valid integer, not str"),
        ("ratio", "0.5", "valid number, not str"),
        ("value_correction", 2, "valid boolean"),
        ("share_cfg_plan", "sometimes", "valid boolean"),
        ("sites.mlp", 0.5, "valid boolean"),
    ],
)
def test_no_lax_conversions(field, value, allowed):
    owner, _, name = field.rpartition(".")
    message = rejected("retom", **({owner: {name: value}} if owner else {field: value}))
    assert allowed in message


def test_numpy_scalars_are_numbers():
    config = load_config("tome", ratio=np.float32(0.25), seed=np.int64(3), r=(np.int32(2),))
    assert (config.ratio, config.seed, config.r) == (0.25, 3, (2,))
    assert type(config.seed) is int and type(config.ratio) is float
    assert "valid integer" in rejected("tome", seed=np.float64(3.0))


@pytest.mark.parametrize(
    ("field", "length"), [("ratio", 20), ("ratio", 2), ("r", 4), ("window_size", 1)]
)
def test_a_per_block_list_must_have_one_value_per_block(vit, field, length):
    value = (0.1,) * length if field == "ratio" else (2,) * length
    message = unmatched(vit, "retom", **{field: value})
    assert f"{field} is a per-block list of {length} value" in message
    assert "this model has 3 blocks; give exactly 3 values" in message


def test_a_per_block_list_of_the_right_length_gives_each_block_its_value(vit):
    assert site_ratios(vit, "tome", ratio=[0.1, 0.2, 0.3]) == {
        "blocks.0": 0.1,
        "blocks.1": 0.2,
        "blocks.2": 0.3,
    }
    with tokenmerge.apply(vit, "retom", r=(1, 2, 3), window_size=(2, 3, 2)) as handle:
        assert [(p.config.r, p.config.window_size) for p in handle.patches] == [
            (1, 2),
            (2, 3),
            (3, 2),
        ]


def test_a_per_block_list_where_sites_have_no_block_order():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    message = unmatched(model, ratio=(0.1, 0.2), adapter="generic", sites={"include": ["*"]})
    assert "no block order" in message


# ---------------------------------------------------------------------------- item 4: selectors


def test_a_stage_key_on_a_model_without_that_stage_raises(vit):
    message = unmatched(vit, ratio={"down": 0.5})
    assert "ratio key 'down' selects no site" in message
    assert "stages here: first, middle, last" in message


def test_a_glob_key_that_matches_nothing_raises_with_close_names_and_the_rule(vit):
    message = unmatched(vit, ratio={"blocks.*.attn": 0.5, "*": 0.2})
    assert "ratio key 'blocks.*.attn' selects no site" in message
    assert "close names: blocks." in message and GLOB_RULE in message


def test_a_glob_that_needs_double_star_says_so(unet):
    # the case: '*' stays within one name part, so this matched nothing and the sites
    # under up_blocks.1 silently stayed at ratio 0
    message = unmatched(unet, ratio={"up_blocks.1.*": 0.5}, sites={"min_tokens": 1})
    assert "did you mean 'up_blocks.1.**'?" in message
    ratios = site_ratios(unet, ratio={"up_blocks.1.**": 0.5}, sites={"min_tokens": 1})
    assert ratios == {
        "down_blocks.0.attentions.0.transformer_blocks.0": 0.0,
        "up_blocks.1.attentions.0.transformer_blocks.0": 0.5,
        "up_blocks.1.attentions.1.transformer_blocks.0": 0.5,
    }


def test_a_key_whose_sites_the_filters_leave_out_raises(unet):
    # level 2 (the mid block) exists, but the default sites are the finest level only
    message = unmatched(unet, ratio={"2": 0.5, "*": 0.3})
    assert "selects only sites that the sites filters leave out" in message
    assert "mid_block.attentions.0.transformer_blocks.0" in message
    ratios = site_ratios(unet, ratio={"2": 0.5, "*": 0.3}, sites={"levels": (1, 2)})
    assert ratios["mid_block.attentions.0.transformer_blocks.0"] == 0.5
    assert "no site of this model is at level 8 (levels here: 1, 2)" in unmatched(
        unet, ratio={"8": 0.5, "*": 0.3}
    )


def test_a_key_that_decides_no_site_raises(vit):
    message = unmatched(vit, ratio={"blocks.*": 0.3, "first": 0.5})
    assert "ratio key 'first' decides no site" in message and "'blocks.*'" in message
    # '*' is the default of the sites no other key selects: it may be left with none
    assert site_ratios(vit, ratio={"blocks.*": 0.3, "*": 0.1}) == dict.fromkeys(
        ("blocks.0", "blocks.1", "blocks.2"), 0.3
    )


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        ({"exclude": ["blokcs.0"]}, "sites.exclude glob 'blokcs.0' matches no site"),
        ({"include": ["blocks.0", "blokcs.1"]}, "sites.include glob 'blokcs.1' matches no site"),
        ({"stages": ["first", "down"]}, "sites.stages 'down' matches no site"),
        ({"blocks": [0, 3]}, "sites.blocks 3 is no block of this model"),
        ({"blocks": [-4, 0]}, "it has 3 blocks: 0 to 2, or -3 to -1"),
    ],
)
def test_every_site_filter_must_match_a_site(vit, sites, message):
    assert message in unmatched(vit, sites=sites)


def test_a_level_filter_that_matches_nothing_on_a_unet(unet):
    assert "sites.levels 4 matches no site of this model (levels here: 1, 2)" in unmatched(
        unet, sites={"levels": (1, 4)}
    )


def test_filters_that_leave_no_site_at_all_keep_the_no_sites_error(vit):
    """Nothing selected: the NoSitesError lists the candidates, levels and stages present."""
    with pytest.raises(NoSitesError, match="Candidate sites: blocks.0") as info:
        tokenmerge.apply(vit, "tome", sites={"levels": (1,)})
    assert not isinstance(info.value, UnmatchedSelectorError)


def test_unmatched_selector_errors_are_config_and_no_sites_errors(vit):
    unmatched(vit, ratio={"down": 0.5})
    for error in (ConfigError, NoSitesError, tokenmerge.TokenMergeError):
        assert issubclass(UnmatchedSelectorError, error)


def test_default_mappings_apply_to_any_model_unchecked(vit, unet):
    """ReToM's default window_size names UNet stages; on a ViT they select nothing, and that is
    no error: the user did not write them. Told apart by value, so it holds after a round trip
    through JSON (where every field comes back set)."""
    default = load_config("retom")
    assert default.window_size == {"down": 6, "mid": 8, "up": 6, "*": 4}
    round_trip = load_config(default.model_dump_json())
    assert "window_size" in round_trip.model_fields_set
    for config in (default, round_trip, load_config(default, ratio=0.3)):
        with tokenmerge.apply(vit, config) as handle:
            assert {p.config.window_size for p in handle.patches} == {4}
    with tokenmerge.apply(unet, "retom", sites={"levels": (1, 2)}) as handle:
        assert {p.config.window_size for p in handle.patches} == {6, 8}


def test_a_mapping_the_user_wrote_is_checked_even_in_a_default_field(vit):
    message = unmatched(vit, "retom", window_size={"down": 4, "*": 2})
    assert "window_size key 'down' selects no site" in message
    with tokenmerge.apply(vit, "retom", window_size={"first": 4, "*": 2}) as handle:
        assert [p.config.window_size for p in handle.patches] == [4, 2, 2]


PATTERNS = ["blocks.*", "blocks.1", "blocks.?", "blocks.[02]", "blocks.[!0]", "**", "*.1"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_one_glob_rule_for_include_exclude_and_per_site_keys(vit, pattern):
    names = [f"blocks.{i}" for i in range(3)]
    expected = {name for name in names if module_glob(name, pattern)}
    with tokenmerge.apply(vit, "tome", sites={"include": [pattern]}) as handle:
        assert {site.name for site in handle.sites} == expected
    ratios = site_ratios(vit, "tome", ratio={pattern: 0.3, "*": 0.1})
    assert {name for name, ratio in ratios.items() if ratio == 0.3} == expected
    if expected != set(names):
        with tokenmerge.apply(vit, "tome", sites={"exclude": [pattern]}) as handle:
            assert {site.name for site in handle.sites} == set(names) - expected


def test_the_glob_rule_is_stated_in_the_docs():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert "'*' and '?' stay within one name part" in GLOB_RULE
    assert "`*` and `?` stay within one name part, `**` crosses dots" in text
