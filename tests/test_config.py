"""Merge configurations: validation, messages, per-site resolution, site filters, serialisation."""

from __future__ import annotations

import json
import math

import pydantic
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tokenmerge
from tokenmerge import ConfigError, MergeConfig, UnknownStrategyError, load_config
from tokenmerge.deprecated import ADAPTER_FIELDS, SITE_FIELDS
from tokenmerge.load import config_union
from tokenmerge.registry import registry
from tokenmerge.selectors import resolve_per_site
from tokenmerge.site import Site, module_glob
from tokenmerge.strategies.random import RandomConfig
from tokenmerge.strategies.retom import ReToMConfig
from tokenmerge.strategies.todo import ToDoConfig
from tokenmerge.strategies.tome import ToMeConfig

BUILTIN = ["random", "retom", "todo", "tome"]
BUILTIN_CLASSES = {
    "random": RandomConfig,
    "retom": ReToMConfig,
    "todo": ToDoConfig,
    "tome": ToMeConfig,
}


@pytest.fixture(autouse=True)
def _fresh_registry():
    """No plugin registered by another test may leak into these tests, nor these into others."""
    registry.reset()
    yield
    registry.reset()


def rejected(config="retom", **overrides) -> str:
    """The message of the ConfigError ``load_config`` raises (fails the test if it accepts)."""
    with pytest.raises(ConfigError) as info:
        load_config(config, **overrides)
    return str(info.value)


# ---------------------------------------------------------------------------- ratio range


@pytest.mark.parametrize("strategy", BUILTIN)
@pytest.mark.parametrize(
    ("ratio", "allowed"),
    [
        (-0.1, "greater than or equal to 0"),
        (-1e-9, "greater than or equal to 0"),
        (1, "less than 1"),
        (1.0, "less than 1"),
        (1.5, "less than 1"),
        (math.nan, "finite number"),
        (math.inf, "finite number"),
        (-math.inf, "finite number"),
    ],
)
def test_ratio_outside_unit_interval_rejected(strategy, ratio, allowed):
    message = rejected(strategy, ratio=ratio)
    assert "ratio" in message
    assert allowed in message


@pytest.mark.parametrize("strategy", BUILTIN)
@pytest.mark.parametrize("bad", [-0.5, 1.0, 2.0, math.nan, math.inf])
def test_ratio_mapping_values_outside_unit_interval_rejected(strategy, bad):
    message = rejected(strategy, ratio={"down": 0.3, "*": bad})
    assert "ratio" in message
    assert "*" in message


@pytest.mark.parametrize("strategy", BUILTIN)
@pytest.mark.parametrize("ratio", [0, 0.0, 0.25, 0.5, 0.75])
def test_ratio_inside_range_accepted(strategy, ratio):
    assert load_config(strategy, ratio=ratio).ratio == ratio


# ---------------------------------------------------------------------------- capacity limits


def test_retom_window_two_caps_ratio_at_three_quarters():
    message = rejected("retom", window_size=2, ratio=0.8)
    assert "at most 0.75" in message
    assert "2 x 2 window" in message
    assert "lower the ratio" in message
    assert load_config("retom", window_size=2, ratio=0.75).ratio == 0.75
    assert "at most 0.75" in rejected("retom", window_size=2, ratio=0.7501)


def test_retom_limit_uses_the_smallest_window_of_a_mapping():
    # down 3 / mid 2 / * 4: the 2 x 2 windows decide
    message = rejected("retom", window_size={"down": 3, "mid": 2, "*": 4}, ratio=0.8)
    assert "at most 0.75" in message and "2 x 2" in message
    # the mapping is named, so a UNet user sees that its own 6 x 6 windows did not decide
    assert "'mid': 2" in message and "larger windows" in message
    assert load_config("retom", window_size={"down": 3, "mid": 2, "*": 4}, ratio=0.75)
    # only 3 x 3 windows: up to 8 / 9
    assert load_config("retom", window_size={"down": 3, "*": 3}, ratio=0.88).ratio == 0.88
    assert "at most 0.8889" in rejected("retom", window_size={"*": 3}, ratio=0.9)


def test_retom_default_windows_are_four_or_more_so_default_limit_is_fifteen_sixteenths():
    assert ReToMConfig().smallest_window() == 4
    assert "at most 0.9375" in rejected("retom", ratio=0.95)


def test_retom_ratio_mapping_checked_value_by_value():
    message = rejected("retom", window_size=2, ratio={"up": 0.5, "*": 0.8})
    assert "ratio 0.8" in message and "at most 0.75" in message
    assert load_config("retom", window_size=2, ratio={"up": 0.5, "*": 0.75})


@pytest.mark.parametrize("strategy", ["tome", "random"])
def test_cell_strategies_limit_ratio_by_cell_area(strategy):
    # a 1 x 3 cell keeps one destination out of three
    assert load_config(strategy, sx=3, sy=1, ratio=0.66).ratio == 0.66
    message = rejected(strategy, sx=3, sy=1, ratio=0.7)
    assert "at most 0.6667" in message and "1 x 3 cell" in message
    # 2 x 2 (the default) keeps one of four
    assert load_config(strategy, ratio=0.75)
    assert "at most 0.75" in rejected(strategy, ratio=0.76)
    # 4 x 2: one of eight
    assert load_config(strategy, sx=4, sy=2, ratio=0.875)
    assert "at most 0.875" in rejected(strategy, sx=4, sy=2, ratio=0.9)


@pytest.mark.parametrize("strategy", ["tome", "random"])
def test_one_by_one_cell_merges_nothing(strategy):
    message = rejected(strategy, sx=1, sy=1, ratio=0.1)
    assert "sx * sy must be at least 2" in message
    assert load_config(strategy, sx=1, sy=1, ratio=0.0).ratio == 0.0


def test_tome_alternate_partition_merges_at_most_half():
    assert load_config("tome", partition="alternate", ratio=0.5)
    message = rejected("tome", partition="alternate", ratio=0.6)
    assert "at most 0.5" in message and "alternating partition" in message


# ---------------------------------------------------------------------------- other fields


@pytest.mark.parametrize("size", [1, 0, -3])
def test_window_size_below_two_rejected(size):
    message = rejected("retom", window_size=size)
    assert "window_size" in message and "at least 2" in message


def test_window_size_below_two_in_a_mapping_rejected():
    message = rejected("retom", window_size={"mid": 1, "*": 2}, ratio=0.5)
    assert "window_size 1 is too small" in message and "at least 2" in message


def test_empty_window_size_mapping_rejected_with_a_helpful_message():
    message = rejected("retom", window_size={})
    reason = message.splitlines()[1].split("(got")[0]
    assert "window_size" in reason, message


@pytest.mark.parametrize("strategy", BUILTIN)
@pytest.mark.parametrize("value", [0, -1])
def test_cache_interval_below_one_rejected(strategy, value):
    message = rejected(strategy, cache_interval=value)
    assert "cache_interval" in message
    assert "greater than or equal to 1" in message


@pytest.mark.parametrize("strategy", BUILTIN)
def test_min_tokens_below_one_rejected(strategy):
    message = rejected(strategy, sites={"min_tokens": 0})
    assert "min_tokens" in message and "greater than or equal to 1" in message


@pytest.mark.parametrize("strategy", ["tome", "random"])
@pytest.mark.parametrize("field", ["sx", "sy"])
def test_cell_side_below_one_rejected(strategy, field):
    message = rejected(strategy, **{field: 0})
    assert field in message and "greater than or equal to 1" in message


@pytest.mark.parametrize("strategy", BUILTIN)
def test_unknown_field_lists_allowed_fields_and_close_match(strategy):
    message = rejected(strategy, raito=0.3)
    assert "raito" in message and "unknown field" in message
    cls = BUILTIN_CLASSES[strategy]
    allowed = message.split("allowed fields:")[1].split(";")[0]
    assert [name.strip() for name in allowed.split(",")] == list(cls.model_fields)
    assert "did you mean 'ratio'" in message


def test_unknown_field_without_close_match_still_lists_allowed_fields():
    message = rejected("tome", zzzzzz=1)
    assert "allowed fields:" in message and "partition" in message
    assert "did you mean" not in message


def test_field_of_another_strategy_is_unknown():
    message = rejected("random", partition="cells")
    assert "partition" in message and "allowed fields:" in message and "sx" in message


@pytest.mark.parametrize(
    "config",
    ["retm", {"strategy": "retm"}, '{"strategy": "retm"}', " retm "],
)
def test_unknown_strategy_lists_known_names_and_close_matches(config):
    with pytest.raises(UnknownStrategyError) as info:
        load_config(config)
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "'retm'" in message
    assert "random, retom, todo, tome" in message
    assert "did you mean 'retom'" in message


def test_unknown_strategy_through_apply_and_get_strategy():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UnknownStrategyError, match="did you mean 'tome'"):
        tokenmerge.apply(model, "tomee", adapter="generic", sites={"include": ["0"]})
    with pytest.raises(UnknownStrategyError, match="random, retom, todo, tome"):
        tokenmerge.get_strategy("rand")
    assert not hasattr(model, "_tokenmerge_handle")


@pytest.mark.parametrize("name", [None, 3, ["retom"]])
def test_dict_without_a_strategy_name_rejected(name):
    data = {"ratio": 0.3} if name is None else {"strategy": name, "ratio": 0.3}
    message = rejected(data)
    assert "'strategy' key" in message and "random, retom, todo, tome" in message


@pytest.mark.parametrize("config", [3, 0.5, None, ["retom"], ("retom",)])
def test_config_of_wrong_type_rejected(config):
    message = rejected(config)
    assert "strategy name" in message and "MergeConfig" in message


def test_invalid_json_text_rejected():
    assert "not valid JSON" in rejected('{"strategy": "tome", ratio: 0.3}')


@pytest.mark.parametrize(
    ("strategy", "field", "value", "allowed"),
    [
        ("retom", "ratio", "abc", "valid number"),
        ("retom", "ratio", ["half"], "valid number"),
        ("retom", "ratio", [1.5], "less than 1"),
        ("retom", "sites.attn", "maybe", "valid boolean"),
        ("retom", "sites.mlp", 2, "valid boolean"),
        ("retom", "sites.min_tokens", "x", "valid integer"),
        ("retom", "sites.min_tokens", 2.5, "valid integer"),
        ("retom", "seed", "x", "valid integer"),
        ("retom", "sites.levels", "down", "valid tuple"),
        ("retom", "sites.levels", [0], "greater than or equal to 1"),
        ("retom", "sites.stages", ["side"], "'first', 'middle' or 'last'"),
        ("retom", "sites.blocks", [1.5], "valid integer"),
        ("retom", "sites.include", "blocks.*", "valid tuple"),
        ("retom", "sites.include", [" "], "must not be empty"),
        ("retom", "sites.exclude", [""], "must not be empty"),
        ("retom", "window_size", "big", "valid integer"),
        ("retom", "window_size", 2.5, "valid integer"),
        ("retom", "window_size", [2, 1], "at least 2"),
        ("retom", "scope", "everywhere", "'auto', 'window' or 'global'"),
        ("tome", "partition", "zigzag", "'auto', 'cells' or 'alternate'"),
        ("tome", "random_destinations", "sometimes", "valid boolean"),
        ("tome", "sx", "2x", "valid integer"),
        ("random", "sy", None, "valid integer"),
    ],
)
def test_wrong_types_rejected_saying_what_is_allowed(strategy, field, value, allowed):
    owner, _, name = field.rpartition(".")
    message = rejected(strategy, **({owner: {name: value}} if owner else {field: value}))
    assert field in message
    assert allowed in message


@pytest.mark.parametrize("field", ["ratio", "window_size"])
@pytest.mark.parametrize("key", ["", " up", "up ", 0, -1, True, 1.5, ("a",), None])
def test_bad_per_site_mapping_keys_rejected(field, key):
    value = 0.25 if field == "ratio" else 2
    message = rejected("retom", **{field: {key: value}})
    assert f"{field} keys select sites" in message
    for allowed in (
        "module-name glob",
        "stage (down, mid, up, first, middle, last)",
        "level",
        "'*'",
    ):
        assert allowed in message


@pytest.mark.parametrize("key", ["\u00b2", "\u2460", "\u0661"])
def test_non_ascii_digit_ratio_keys_rejected_or_usable(key):
    """str.isdigit() is true for '²' or '①': such a key must not crash later resolution."""
    try:
        config = load_config("tome", ratio={key: 0.3, "*": 0.1})
    except ConfigError:
        return
    # accepted: resolving at a site with a level must work
    assert config.ratio_for(Site("a", level=1)) in (0.3, 0.1)


# ---------------------------------------------------------------------------- overrides


def test_load_config_by_name_with_overrides():
    config = load_config("retom", ratio=0.5, window_size=3, scope="global")
    assert isinstance(config, ReToMConfig)
    assert (config.ratio, config.window_size, config.scope) == (0.5, 3, "global")


def test_load_config_default_is_retom():
    assert isinstance(load_config(), ReToMConfig)


def test_load_config_instance_with_overrides_keeps_other_fields():
    base = ReToMConfig(ratio=0.3, window_size=3, sites={"include": ("a.*",)})
    config = load_config(base, ratio=0.6)
    assert isinstance(config, ReToMConfig)
    assert config.ratio == 0.6
    assert (config.window_size, config.sites.include) == (3, ("a.*",))
    assert base.ratio == 0.3  # the original is untouched
    assert load_config(base) is base


def test_load_config_instance_overrides_are_validated():
    base = ReToMConfig(window_size=2)
    assert "at most 0.75" in rejected(base, ratio=0.8)
    assert "did you mean 'ratio'" in rejected(base, raito=0.3)
    assert "'retom'" in rejected(base, strategy="tome")


def test_load_config_dict_and_json_text_with_overrides():
    config = load_config({"strategy": "tome", "ratio": 0.2, "sx": 3}, ratio=0.4)
    assert isinstance(config, ToMeConfig) and (config.ratio, config.sx) == (0.4, 3)
    config = load_config('  {"strategy": "random", "ratio": 0.2}  ', sy=1, ratio=0.25)
    assert isinstance(config, RandomConfig) and (config.ratio, config.sy) == (0.25, 1)
    # the override may even pick the strategy
    assert isinstance(load_config({"strategy": "retom"}, strategy="tome"), ToMeConfig)


def test_apply_passes_overrides_to_load_config():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    base = ToMeConfig(ratio=0.25, sx=4, sy=1)
    with tokenmerge.apply(
        model, base, ratio=0.5, adapter="generic", sites={"include": ["0"]}
    ) as handle:
        assert isinstance(handle.config, ToMeConfig)
        assert (handle.config.ratio, handle.config.sx, handle.config.sites.include) == (
            0.5,
            4,
            ("0",),
        )
    with tokenmerge.apply(
        model, "retom", ratio=0.5, adapter="generic", sites={"include": ["0"]}
    ) as handle:
        assert isinstance(handle.config, ReToMConfig) and handle.config.ratio == 0.5
    with pytest.raises(ConfigError, match="did you mean 'ratio'"):
        tokenmerge.apply(model, "retom", raito=0.5, adapter="generic", sites={"include": ["0"]})
    assert not hasattr(model, "_tokenmerge_handle")


# ---------------------------------------------------------------------------- frozen, fields


@pytest.mark.parametrize("strategy", BUILTIN)
def test_configs_are_frozen(strategy):
    config = load_config(strategy)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.ratio = 0.1
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.sites.min_tokens = 1
    assert config.ratio == (0.75 if strategy == "todo" else 0.5)  # todo: 2 x 2 cells pooled


@pytest.mark.parametrize("strategy", BUILTIN)
def test_configs_forbid_extra_fields(strategy):
    cls = registry.strategy(strategy).config_class
    assert cls.model_config["frozen"] is True
    assert cls.model_config["extra"] == "forbid"
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        cls(ratio=0.5, not_a_field=1)
    with pytest.raises(pydantic.ValidationError):
        cls(**{"strategy": strategy, "Ratio": 0.5})


def _all_fields() -> list[tuple[type[MergeConfig], str]]:
    registry.reset()
    found = [(cls, name) for cls in registry.config_classes() for name in cls.model_fields]
    registry.reset()
    return found


@pytest.mark.parametrize(
    ("cls", "field"), _all_fields(), ids=[f"{c.__name__}.{f}" for c, f in _all_fields()]
)
def test_every_field_is_described_with_its_default(cls, field):
    info = cls.model_fields[field]
    description = info.description or ""
    assert description.strip(), f"{cls.__name__}.{field} has no description"
    if info.is_required():
        return
    if field == "strategy":  # the discriminator: its value is the only value
        assert repr(info.default) in description
    else:
        assert "default" in description.lower(), (
            f"{cls.__name__}.{field}: the description does not state the default "
            f"({info.default!r}): {description!r}"
        )


def test_every_registered_config_class_is_a_frozen_merge_config():
    classes = registry.config_classes()
    names = ["RandomConfig", "ReToMConfig", "ToDoConfig", "ToMeConfig"]
    assert [c.__name__ for c in classes] == names
    for cls in classes:
        assert issubclass(cls, MergeConfig)
        assert cls.model_fields["strategy"].default in BUILTIN


# ---------------------------------------------------------------------------- per-site values

UP = Site("up_blocks.1.attentions.0", stage="up", level=2, block_index=7)
DOWN = Site("down_blocks.0.attentions.1", stage="down", level=1, block_index=1)
MID = Site("mid_block.attentions.0", stage="mid", level=8, block_index=4)
FLAT = Site("blocks.3")  # no stage, no level


def test_resolve_per_site_passes_plain_values():
    assert resolve_per_site(0.3, UP) == 0.3
    assert resolve_per_site(None, UP) is None


def test_resolve_per_site_precedence_glob_stage_level_default():
    # keys listed from least to most specific: the kind decides, not the order
    value = {"*": 0.1, "2": 0.2, "up": 0.3, "down_blocks.**": 0.5, "up_blocks.1.**": 0.4}
    assert resolve_per_site(value, UP) == 0.4
    without_glob = {k: v for k, v in value.items() if k != "up_blocks.1.**"}
    assert resolve_per_site(without_glob, UP) == 0.3
    assert resolve_per_site({"*": 0.1, "2": 0.2}, UP) == 0.2
    assert resolve_per_site({"*": 0.1, "4": 0.2}, UP) == 0.1
    assert resolve_per_site({"*": 0.1}, FLAT) == 0.1


def test_resolve_per_site_first_matching_glob_wins():
    value = {"up_blocks.*.attentions.0": 0.1, "up_blocks.1.**": 0.2}
    assert resolve_per_site(value, UP) == 0.1
    value = {"up_blocks.1.**": 0.2, "up_blocks.*.attentions.0": 0.1}
    assert resolve_per_site(value, UP) == 0.2
    # a glob that does not match falls through to the next kind
    assert resolve_per_site({"up_blocks.1.*": 0.2, "up": 0.3}, UP) == 0.3


def test_resolve_per_site_unmatched_is_none_and_ratio_zero():
    assert resolve_per_site({"down": 0.3, "4": 0.2}, UP) is None
    assert resolve_per_site({"up": 0.3, "2": 0.2}, FLAT) is None  # no stage / level
    config = load_config("tome", ratio={"down": 0.3, "mid_block.**": 0.6})
    assert config.ratio_for(UP) == 0.0
    assert config.ratio_for(DOWN) == 0.3
    assert config.ratio_for(MID) == 0.6
    assert config.ratio_for(FLAT) == 0.0
    assert load_config("tome", ratio=0.4).ratio_for(FLAT) == 0.4


def test_integer_ratio_keys_are_levels():
    config = load_config("tome", ratio={2: 0.3, 1: 0.5, "*": 0.1})
    assert config.ratio == {"2": 0.3, "1": 0.5, "*": 0.1}
    assert config.ratio_for(UP) == 0.3
    assert config.ratio_for(DOWN) == 0.5
    assert config.ratio_for(MID) == 0.1
    retom = load_config("retom", window_size={1: 3, "*": 2})
    assert retom.window_size == {"1": 3, "*": 2}
    assert retom.window_for(DOWN) == 3 and retom.window_for(UP) == 2


def test_retom_window_for_sites():
    config = load_config("retom")
    assert config.window_for(MID) == 8 and config.window_for(UP) == 6
    assert config.window_for(DOWN) == 6 and config.window_for(FLAT) == 4
    config = load_config("retom", window_size={"mid": 4, "down": 2}, ratio=0.5)
    with pytest.raises(ConfigError, match="add a '\\*' key"):
        config.window_for(UP)


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("blocks.3.attn", "blocks.*.attn", True),
        ("blocks.3.attn.qkv", "blocks.*", False),  # * does not cross dots
        ("blocks.3", "blocks.*", True),
        ("blocks.3.attn.qkv", "blocks.**", True),  # ** does
        ("down_blocks.1.attentions.0", "down_blocks.**", True),
        ("down_blocks.1.attentions.0", "**.attentions.0", True),
        ("a.b.c", "a.**.c", True),
        ("a.c", "a.*.c", False),
        ("blocks.10", "blocks.1", False),  # whole name
        ("xblocks.1", "blocks.1", False),
        ("blocks.1", "blocks.?", True),
        ("blocks.12", "blocks.?", False),
        ("a.b", "a?b", False),  # ? does not match a dot
        ("blocks.2", "blocks.[0-3]", True),
        ("blocks.5", "blocks.[0-3]", False),
        ("blocks.5", "blocks.[!0-3]", True),
        ("blocks.1", "blocks.[!0-3]", False),
        ("a+b", "a+b", True),  # regex characters are literal
        ("aab", "a+b", False),
        ("block(1)", "block(1)", True),
        ("", "*", True),
    ],
)
def test_module_glob(name, pattern, expected):
    assert module_glob(name, pattern) is expected
    assert Site(name).matches(pattern) is expected


def test_ratio_globs_use_module_glob_semantics():
    config = load_config("tome", ratio={"blocks.*": 0.3})
    assert config.ratio_for(Site("blocks.1")) == 0.3
    assert config.ratio_for(Site("blocks.1.attn")) == 0.0
    assert load_config("tome", ratio={"blocks.**": 0.3}).ratio_for(Site("blocks.1.attn")) == 0.3


# ---------------------------------------------------------------------------- site filters


def test_selects_everything_without_filters():
    config = load_config("tome")
    assert all(config.sites.selects(site) for site in (UP, DOWN, MID, FLAT))


def test_selects_by_level():
    config = load_config("tome", sites={"levels": [1, 8]})
    assert config.sites.selects(DOWN) and config.sites.selects(MID)
    assert not config.sites.selects(UP)
    assert not config.sites.selects(FLAT)  # no level: not selected once levels are given


def test_selects_by_stage():
    config = load_config("tome", sites={"stages": ["up", "mid"]})
    assert config.sites.selects(UP) and config.sites.selects(MID)
    assert not config.sites.selects(DOWN) and not config.sites.selects(FLAT)


def test_selects_by_block_index_with_negative_indices():
    config = load_config("tome", sites={"blocks": [1, -1]})
    assert config.sites.selects(DOWN, num_blocks=8)  # block 1
    assert config.sites.selects(UP, num_blocks=8)  # block 7 == -1
    assert not config.sites.selects(MID, num_blocks=8)  # block 4
    assert not config.sites.selects(UP, num_blocks=9)  # -1 is block 8 now
    assert not config.sites.selects(FLAT, num_blocks=8)  # no block index
    assert not config.sites.selects(UP)  # negative indices need num_blocks
    assert load_config("tome", sites={"blocks": [-4]}).sites.selects(MID, num_blocks=8)


def test_negative_block_index_out_of_range_selects_nothing():
    """-9 of 8 blocks does not exist (Python indexing would raise): it must not wrap around."""
    config = load_config("tome", sites={"blocks": [-9]})
    sites = [Site(f"b.{i}", block_index=i) for i in range(8)]
    assert [s.block_index for s in sites if config.sites.selects(s, num_blocks=8)] == []


def test_selects_include_and_exclude():
    config = load_config("tome", sites={"include": ["up_blocks.**", "mid_block.*.*"]})
    assert config.sites.selects(UP) and config.sites.selects(MID)
    assert not config.sites.selects(DOWN)
    config = load_config("tome", sites={"include": ["**"], "exclude": ["*.1.**"]})
    assert not config.sites.selects(UP)
    assert config.sites.selects(MID)
    assert config.sites.selects(DOWN)  # its second part is 0
    assert not load_config("tome", sites={"exclude": ["down_**"]}).sites.selects(DOWN)
    assert load_config("tome", sites={"exclude": ["down_*"]}).sites.selects(
        DOWN
    )  # * stays in one part


def test_selects_combines_filters():
    config = load_config(
        "tome", sites={"stages": ["up", "down"], "levels": [1, 2], "exclude": ["down_**"]}
    )
    assert config.sites.selects(UP)
    assert not config.sites.selects(DOWN)  # excluded
    assert not config.sites.selects(MID)  # wrong stage and level


# ---------------------------------------------------------------------------- serialisation

EXAMPLES = [
    ("retom", {}),
    (
        "retom",
        {
            "ratio": {"up_blocks.1.**": 0.6, "mid": 0.2, 2: 0.3, "*": 0.1},
            "window_size": {"mid": 4, 1: 3, "*": 2},
            "scope": "global",
            "cache_interval": 3,
            "share_cfg_plan": True,
            "seed": -12,
            "sites": {
                "levels": [1, 2],
                "stages": ["down", "up"],
                "blocks": [0, -1],
                "include": ["**"],
                "exclude": ["mid_block.*"],
                "mlp": True,
                "cross_attn": True,
                "min_tokens": 1,
            },
        },
    ),
    ("tome", {}),
    ("tome", {"ratio": 0.6, "sx": 3, "sy": 4, "random_destinations": False, "partition": "cells"}),
    (
        "tome",
        {"ratio": {"*": 0.5}, "partition": "alternate", "sites": {"attn": False, "mlp": True}},
    ),
    ("random", {}),
    ("random", {"ratio": 0.0, "sx": 1, "sy": 1, "seed": 2**40}),
]
EXAMPLE_IDS = [f"{name}-{'custom' if fields else 'default'}" for name, fields in EXAMPLES]


@pytest.mark.parametrize(("name", "fields"), EXAMPLES, ids=EXAMPLE_IDS)
def test_json_round_trip_through_load_config(name, fields):
    config = load_config(name, **fields)
    text = config.model_dump_json()
    assert json.loads(text)["strategy"] == config.strategy
    again = load_config(text)
    assert type(again) is type(config)
    assert again == config
    assert load_config(config.model_dump()) == config
    assert load_config(json.loads(text)) == config


@pytest.mark.parametrize(("name", "fields"), EXAMPLES, ids=EXAMPLE_IDS)
def test_json_round_trip_through_config_union(name, fields):
    config = load_config(name, **fields)
    union = config_union()
    text = union.dump_json(config)
    assert json.loads(text) == json.loads(config.model_dump_json())
    again = union.validate_json(text)
    assert type(again) is type(config) and again == config
    again = union.validate_python(json.loads(text))
    assert type(again) is type(config) and again == config


def test_config_union_picks_the_class_by_strategy_and_rejects_unknown():
    union = config_union()
    for name, cls in BUILTIN_CLASSES.items():
        assert type(union.validate_python({"strategy": name})) is cls
    with pytest.raises(pydantic.ValidationError, match="'random', 'retom', 'todo', 'tome'"):
        union.validate_python({"strategy": "retm"})
    with pytest.raises(pydantic.ValidationError):
        union.validate_python({"strategy": "tome", "window_size": 2})
    schema = union.json_schema()
    assert set(schema["discriminator"]["mapping"]) == set(BUILTIN)


# ---------------------------------------------------------------------------- fuzzing


@pytest.mark.parametrize(
    ("strategy", "fields"),
    [
        ("retom", {"window_size": 10**200}),
        ("retom", {"window_size": {"*": 10**200}}),
        ("tome", {"sx": 10**200, "sy": 10**200}),
        ("random", {"sx": 10**155, "sy": 10**155}),
    ],
)
def test_huge_sizes_accepted_or_rejected_with_config_error(strategy, fields):
    """The capacity check must not overflow converting a huge window or cell area to float."""
    try:
        config = load_config(strategy, ratio=0.5, **fields)
    except ConfigError:
        return
    assert load_config(config.model_dump_json()) == config


def _fields_by_strategy() -> dict[str, list[str]]:
    registry.reset()
    found = {
        name: [f for f in registry.strategy(name).config_class.model_fields if f != "strategy"]
        for name in registry.strategy_names()
    }
    registry.reset()
    return found


FIELDS_BY_STRATEGY = _fields_by_strategy()
ALL_FIELDS = sorted({f for fields in FIELDS_BY_STRATEGY.values() for f in fields})
SELECTOR_KEYS = st.one_of(
    st.sampled_from(["*", "down", "mid", "up", "1", "2", "4", "blocks.*", "**", "", " up"]),
    st.integers(-2, 8),
    st.text(max_size=6),
)
ANY_VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(-3, 10),
        st.floats(),
        st.floats(0, 1),
        st.text(max_size=8),
        st.sampled_from(
            ["down", "mid", "up", "*", "window", "global", "auto", "cells", "alternate", "0.5"]
        ),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(SELECTOR_KEYS, children, max_size=3),
    ),
    max_leaves=6,
)
GLOBS = st.lists(
    st.one_of(st.sampled_from(["**", "blocks.*", "", " ", "a.?"]), st.text()), max_size=3
)
# values of about the right type and range, so that a fair share of the dicts is valid
PLAUSIBLE = {
    "ratio": st.one_of(
        st.floats(-0.1, 1.0), st.dictionaries(SELECTOR_KEYS, st.floats(0, 0.8), max_size=3)
    ),
    "window_size": st.one_of(
        st.integers(1, 6), st.dictionaries(SELECTOR_KEYS, st.integers(1, 6), max_size=3)
    ),
    "cache_interval": st.integers(-1, 10),
    "seed": st.integers(),
    "sx": st.integers(0, 5),
    "sy": st.integers(0, 5),
    "scope": st.sampled_from(["auto", "window", "global", "local"]),
    "partition": st.sampled_from(["auto", "cells", "alternate", "rows"]),
    "sites": st.fixed_dictionaries(
        {},
        optional={
            "levels": st.one_of(st.none(), st.lists(st.integers(0, 8), max_size=3)),
            "stages": st.one_of(
                st.none(), st.lists(st.sampled_from(["down", "mid", "up", "side"]), max_size=3)
            ),
            "blocks": st.one_of(st.none(), st.lists(st.integers(-5, 5), max_size=3)),
            "include": GLOBS,
            "exclude": GLOBS,
            "min_tokens": st.integers(-1, 500),
            "attn": st.booleans(),
            "cross_attn": st.booleans(),
            "mlp": st.booleans(),
            "levls": st.booleans(),  # a misspelt one now and then
        },
    ),
}


def _value_for(draw, field: str):
    if draw(st.integers(0, 9)) < 8:
        return draw(PLAUSIBLE.get(field, st.booleans()))
    return draw(ANY_VALUE)


@st.composite
def config_dicts(draw) -> dict:
    """Mostly real strategies with plausible values; sometimes junk names, values and keys."""
    data = {}
    if draw(st.integers(0, 9)) < 7:
        strategy = draw(st.sampled_from(sorted(FIELDS_BY_STRATEGY)))
    else:
        strategy = draw(
            st.one_of(
                st.sampled_from(["", "retm", "RETOM", "tome ", "*"]),
                ANY_VALUE,
                st.just(None),  # no strategy key at all
            )
        )
    if strategy is not None:
        data["strategy"] = strategy
    own = FIELDS_BY_STRATEGY.get(strategy, ALL_FIELDS) if isinstance(strategy, str) else ALL_FIELDS
    for field in draw(st.lists(st.sampled_from(own), max_size=6, unique=True)):
        data[field] = _value_for(draw, field)
    if draw(st.integers(0, 3)) == 0:  # a field of another strategy, or junk
        junk = st.text(max_size=8).filter(lambda k: k not in {*SITE_FIELDS, *ADAPTER_FIELDS})
        key = draw(st.one_of(st.sampled_from(ALL_FIELDS), junk))
        data[key] = _value_for(draw, key)
    return data


@settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(config_dicts())
@example({"strategy": "tome", "ratio": 0.3, "sx": 3, "sites": {"levels": [1, 2]}})
@example({"strategy": "retom", "window_size": {"mid": 4, "*": 3}, "ratio": {"2": 0.8}})
def test_fuzzed_config_dicts_are_accepted_and_round_trip_or_raise_config_error(data):
    try:
        config = load_config(data)
    except ConfigError:
        return
    assert type(config) is registry.strategy(data["strategy"]).config_class
    text = config.model_dump_json()
    again = load_config(text)
    assert type(again) is type(config)
    assert again == config
    assert config_union().validate_json(text) == config
