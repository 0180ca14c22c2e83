"""tomesd's and ToMe's argument names fail with our spelling in the error (docs/migration.md)."""

from __future__ import annotations

import pytest

import tokenmerge
from tokenmerge import ConfigError
from tokenmerge.peer_names import PEER_NAMES


@pytest.mark.parametrize("name", sorted(PEER_NAMES))
def test_a_peer_argument_names_our_spelling(name):
    owner, instead = PEER_NAMES[name]
    with pytest.raises(ConfigError) as error:
        tokenmerge.load_config("tome", **{name: True})
    message = str(error.value)
    assert f"{name} is {owner}'s argument: {instead}" in message
    # no misleading close match next to the translation (use_rand once suggested 'seed')
    assert "did you mean" not in message


def test_a_peer_argument_in_a_dict_config_is_translated_too():
    with pytest.raises(ConfigError, match="sites=\\{'levels'"):
        tokenmerge.load_config({"strategy": "retom", "max_downsample": 2})


def test_other_unknown_fields_keep_their_close_matches():
    with pytest.raises(ConfigError, match="did you mean 'ratio'"):
        tokenmerge.load_config("tome", ratoi=0.5)
