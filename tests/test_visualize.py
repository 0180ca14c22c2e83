"""tokenmerge_bench.visualize and ``tokenmerge visualize`` on the tiny-unet preset (16 x 16
tokens)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tokenmerge.cli import main
from tokenmerge.errors import UnknownNameError
from tokenmerge_bench.visualize import collect, psnr, visualize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STRATEGIES = ["retom", "tome", "random"]
FIRST_SITE = "down_blocks.0.attentions.0.transformer_blocks.0"
OTHER_SITE = "up_blocks.1.attentions.1.transformer_blocks.0"
PSNR_LINE = re.compile(r"^\s+(\S+)\s+(\d+) -> (\d+) tokens\s+PSNR (\S+) dB", re.MULTILINE)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    output = tmp_path_factory.mktemp("visualize") / "merges.png"
    summary = visualize(model="tiny-unet", strategies=STRATEGIES, output=output)
    return summary, output


def _psnr_lines(summary: str) -> dict[str, tuple[int, int, float]]:
    return {
        name: (int(tokens_in), int(tokens_out), float(value))
        for name, tokens_in, tokens_out, value in PSNR_LINE.findall(summary)
    }


def test_writes_a_png_with_a_row_per_strategy(drawn):
    import matplotlib.image

    _, output = drawn
    assert output.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(output)
    height, width = pixels.shape[:2]
    assert height > 0 and width > 0
    # two panels across; the photograph's row and one row per strategy down
    rows, columns = 1 + len(STRATEGIES), 2
    assert height / width == pytest.approx(rows / columns, rel=0.15)
    assert pixels[..., :3].std() > 0.05  # something was drawn


def test_summary_names_every_strategy_with_a_psnr(drawn):
    summary, _ = drawn
    assert FIRST_SITE in summary
    lines = _psnr_lines(summary)
    assert sorted(lines) == sorted(STRATEGIES)
    for tokens_in, tokens_out, value in lines.values():
        assert (tokens_in, tokens_out) == (256, 128)
        assert 5.0 < value < 60.0
    # retom's default scope is global: no strategy keeps its merges inside windows here
    assert "windows" not in summary


def test_ratio_zero_is_the_identity_plan():
    result = collect(model="tiny-unet", strategies=["retom", "tome"], ratio=0.0)
    for view in result.views:
        assert view.plan.is_identity
        assert view.tokens_in == view.tokens_out == 256
        assert math.isinf(view.psnr)
    for tokens_in, tokens_out, value in _psnr_lines(result.summary()).values():
        assert tokens_in == tokens_out and value == math.inf


def test_plan_is_drawn_on_the_site_grid():
    # the first wave's retom: merges into the representative of their window, drawn with the plan
    overrides = {"scope": "window", "destinations": "representatives"}
    view = collect(model="tiny-unet", strategies=["retom"], ratio=0.5, overrides=overrides).views[0]
    assert view.grid == (16, 16)
    assert view.window == (6, 6)  # the UNet's down stage
    plan = view.plan
    assert plan.batch == 1 and plan.num_tokens == 256 and plan.num_merged == 128

    def window(token):
        return token // 16 // 6 * 3 + token % 16 // 6

    destinations = plan.kept[0, plan.dst[0]]
    assert torch.equal(window(plan.src[0]), window(destinations))
    # a retom destination is its window's representative: one per window
    assert window(destinations.unique()).unique().numel() == destinations.unique().numel()
    # the merged-and-unmerged photograph has the resized photograph's shape (16 px per token)
    assert view.unmerged.shape == (3, 256, 256)


def test_unknown_site_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownNameError) as error:
        visualize(model="tiny-unet", strategies=["tome"], site="nope", output=tmp_path / "v.png")
    message = str(error.value)
    assert "\n" not in message
    assert "unknown site 'nope'" in message
    assert FIRST_SITE in message and OTHER_SITE in message
    assert not (tmp_path / "v.png").exists()


def test_explicit_site(tmp_path):
    output = tmp_path / "v.png"
    summary = visualize(
        model="tiny-unet", strategies=["retom", "random"], site=OTHER_SITE, output=output
    )
    assert f"site {OTHER_SITE}" in summary
    assert sorted(_psnr_lines(summary)) == ["random", "retom"]
    assert output.read_bytes()[:8] == PNG_MAGIC


def test_psnr():
    assert psnr(torch.ones(3), torch.ones(3)) == math.inf
    assert psnr(torch.zeros(4), torch.full((4,), 0.1)) == pytest.approx(20.0)


# ---------------------------------------------------------------------------------- the command
def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tokenmerge: error: ")
    return lines[0]


def test_cli_end_to_end(tmp_path, capsys):
    output = tmp_path / "v.png"
    argv = ["visualize", "--model", "tiny-unet", "--output", str(output)]
    assert main([*argv, "--strategies", "retom", "tome"]) == 0
    assert output.read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert sorted(_psnr_lines(out)) == ["retom", "tome"]
    assert f"wrote {output}" in out


def test_cli_unknown_site_is_one_line(tmp_path, capsys):
    output = tmp_path / "v.png"
    argv = ["visualize", "--model", "tiny-unet", "--output", str(output), "--site", "nope"]
    assert main([*argv, "--strategies", "tome"]) == 2
    line = _error_line(capsys)
    assert "unknown site 'nope'" in line and FIRST_SITE in line
    assert not output.exists()


def test_cli_unwritable_output_is_one_line(capsys):
    argv = ["visualize", "--model", "tiny-unet", "--output", "/nonexistent-dir/x.png"]
    assert main([*argv, "--strategies", "tome"]) != 0
    assert "/nonexistent-dir" in _error_line(capsys)
