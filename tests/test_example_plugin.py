"""The example plugin (examples/tokenmerge-plugin-example), installed like any third-party
distribution: discovered through its entry point, configured, validated, applied, listed and
conformant - with no mention of it anywhere in tokenmerge itself.

tests/conftest.py turns entry-point autoloading off for the suite; these tests turn it back on.
The dev environment installs the example (``make venv``, or
``pip install -e examples/tokenmerge-plugin-example``).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from toy_models import Attention

import tokenmerge
from tokenmerge.cli import main
from tokenmerge.load import config_union
from tokenmerge.registry import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, registry
from tokenmerge_bench.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DISTRIBUTION = "tokenmerge-plugin-example"
INSTALL_HINT = f"pip install -e examples/{DISTRIBUTION} (make venv does it)"


@pytest.fixture(autouse=True)
def autoload(monkeypatch):
    """Entry points load again, from a fresh registry; nothing is left behind."""
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the example plugin is not installed in this environment: {INSTALL_HINT}")
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    registry.reset()
    yield
    registry.reset()


class Toy(nn.Module):
    """Two residual attention blocks and a per-token head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Attention(dim, heads=1) for _ in range(2))
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_discovered_through_its_entry_point():
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    (entry_point,) = [ep for ep in entry_points if ep.name == "example"]
    assert entry_point.value == "tokenmerge_plugin_example.plugin"
    assert "grid_pool" in tokenmerge.list_strategies()
    (info,) = tokenmerge.list_plugins("example")
    assert (info.distribution, info.version) == (DISTRIBUTION, "0.1.0")
    assert (info.builtin, info.strategies, info.adapters) == (False, ["grid_pool"], [])
    from tokenmerge_plugin_example.strategy import GridPoolStrategy

    assert registry.strategy("grid_pool") is GridPoolStrategy


def test_autoload_off_hides_it(monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    registry.reset()
    assert tokenmerge.list_strategies() == ["random", "retom", "todo", "tome"]
    assert tokenmerge.list_plugins("example") == []


def test_configured_and_validated():
    config = tokenmerge.load_config("grid_pool", k=2, ratio=0.5)
    assert type(config).__name__ == "GridPoolConfig"
    assert (config.k, config.ratio, config.anchor) == (2, 0.5, "corner")
    # it serialises and validates through the discriminated union of every registered config
    text = config.model_dump_json()
    assert tokenmerge.load_config(text) == config
    assert config_union().validate_json(text) == config
    assert "grid_pool" in config_union().json_schema()["discriminator"]["mapping"]

    with pytest.raises(tokenmerge.ConfigError) as info:
        tokenmerge.load_config("grid_pool", k=1, anchor="middle")
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid GridPoolConfig:"
    assert len(lines) == 3  # one line per problem
    assert lines[1].startswith("  - k: ") and "greater than or equal to 2" in lines[1]
    assert lines[2].startswith("  - anchor: ") and "'corner' or 'center'" in lines[2]
    with pytest.raises(tokenmerge.ConfigError, match=r"at most 0\.75 \(one anchor per 2 x 2"):
        tokenmerge.load_config("grid_pool", k=2, ratio=0.8)
    assert tokenmerge.load_config("grid_pool", k=3, ratio=0.8).k == 3  # 1 - 1/9 is the limit
    with pytest.raises(tokenmerge.ConfigError, match="did you mean 'anchor'"):
        tokenmerge.load_config("grid_pool", ancher="center")


def test_applied_to_a_model_through_the_generic_adapter():
    model = Toy()
    x = torch.randn(2, 64, 16)  # an 8 x 8 grid
    with torch.no_grad():
        reference = model(x)
        handle = tokenmerge.apply(
            model,
            "grid_pool",
            adapter="generic",
            sites={"include": ["blocks.*"], "min_tokens": 1},
            ratio=0.5,
        )
        assert type(handle.patches[0].strategy).__name__ == "GridPoolStrategy"
        merged = model(x)
        stats = handle.stats()
        assert sorted(stats) == ["blocks.0", "blocks.1"]
        for site in stats.values():
            assert (site.tokens_in, site.tokens_out, site.shortfall) == (64, 32, 0)
        assert merged.shape == x.shape
        assert not torch.allclose(merged, reference, atol=1e-4)
        handle.remove()
        assert torch.equal(model(x), reference)


def test_every_token_of_a_block_shares_its_anchor_output():
    linear = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(1, 16, 4)  # a 4 x 4 grid, four 2 x 2 blocks
    with (
        torch.no_grad(),
        tokenmerge.apply(
            linear,
            "grid_pool",
            adapter="generic",
            sites={"include": ["0"], "min_tokens": 1},
            ratio=0.75,
            k=2,
        ),
    ):
        y = linear(x).view(2, 2, 2, 2, 4).permute(0, 2, 1, 3, 4).reshape(4, 4, 4)
    # each block went through the layer as one token: the mean of its four tokens
    blocks = x.view(2, 2, 2, 2, 4).permute(0, 2, 1, 3, 4).reshape(4, 4, 4)
    expected = linear(blocks.mean(dim=1)).detach()
    torch.testing.assert_close(y, expected.unsqueeze(1).expand(4, 4, 4))


def test_applied_to_the_tiny_unet():
    unet = get_preset("tiny-unet").build()
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 8, 32, generator=generator)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return unet(latent, 500, encoder_hidden_states=text).sample

    reference = run()
    handle = tokenmerge.apply(unet, "grid_pool", ratio=0.5)
    merged = run()
    stats = handle.stats()
    assert stats
    assert all(s.tokens_out < s.tokens_in for s in stats.values())
    assert merged.shape == reference.shape
    assert not torch.allclose(merged, reference, atol=1e-4)
    handle.remove()
    assert torch.equal(run(), reference)


def test_listed_by_tokenmerge_list(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    strategy = next(line for line in lines if line.strip().startswith("grid_pool"))
    assert "Grid pooling" in strategy
    plugin = next(line for line in lines if line.strip().startswith("example "))
    assert plugin.split(maxsplit=1)[1] == f"from {DISTRIBUTION} 0.1.0: grid_pool"

    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert "grid_pool" in [s["name"] for s in listing["strategies"]]
    assert {
        "name": "example",
        "distribution": DISTRIBUTION,
        "version": "0.1.0",
        "builtin": False,
        "strategies": ["grid_pool"],
        "adapters": [],
    } in listing["plugins"]


def test_passes_the_conformance_kit():
    from tokenmerge.testing import check_strategy

    check_strategy("grid_pool")
    check_strategy("grid_pool", {"k": 3, "anchor": "center"})


def test_tokenmerge_itself_never_mentions_it():
    """The plugin needed no change to tokenmerge: no installed tokenmerge file names it."""
    import tokenmerge.adapters
    import tokenmerge.strategies

    folders = {
        Path(folder).resolve()
        for package in (tokenmerge, tokenmerge.strategies, tokenmerge.adapters)
        for folder in package.__path__
    }
    files = [
        path
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert len(files) > 20  # the package was found
    for name in (b"grid_pool", b"tokenmerge_plugin_example", DISTRIBUTION.encode()):
        assert [str(p) for p in files if name in p.read_bytes()] == []
    tokenmerge_dist = importlib.metadata.distribution("tokenmerge")
    assert [ep for ep in tokenmerge_dist.entry_points if ep.group == ENTRY_POINT_GROUP] == []


def test_grid_pool_merges_progressively_on_a_vision_transformer():
    from vit_models import FAMILIES as VIT_FAMILIES

    family = VIT_FAMILIES["vit"]
    model = family.build()
    handle = tokenmerge.apply(model, "grid_pool", ratio=0.25)
    family.run(model)
    # the class token and 64 patches; blocks over the original positions, grown as tokens go
    assert [(s.tokens_in, s.tokens_out) for s in handle.stats().values()] == [
        (65, 49),
        (49, 37),
        (37, 28),
    ]
    handle.remove()
