"""``tokenmerge compare``: a grid, a page and figures for the same prompts and seeds, unmerged
and merged, on a tiny saved Stable Diffusion pipeline and on the digit denoisers."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from tiny_pipelines import tiny_clip, tiny_stable_diffusion

from tokenmerge.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _compare(*args: str) -> int:
    return main(["compare", "--no-progress", *args])


def _results(folder) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_digit_model_writes_grid_page_and_figures(tmp_path, capsys):
    out = tmp_path / "digits"
    status = _compare(
        "--model", "digit-dit", "--prompt", "3", "--prompt", "7", "--seeds", "0",
        "--strategies", "tome", "retom", "--ratios", "0.5", "--steps", "3", "-o", str(out),
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "PSNR dB" in printed and "LPIPS: off" in printed
    results = _results(out)
    labels = [c["label"] for c in results["configurations"]]
    assert labels == ["none", "tome 0.5", "retom 0.5"]
    assert results["rows"] == ["3 / seed 0", "7 / seed 0"]
    unmerged, *merged = results["configurations"]
    assert unmerged["psnr"] is None  # infinite against itself, written as null
    assert unmerged["ssim"] == 1.0
    for column in merged:
        # merged images differ from the unmerged ones, yet stay close
        assert 10 < column["psnr"] < 80 and 0 < column["ssim"] < 1
        assert column["seconds_min"] <= column["seconds_per_image"] <= column["seconds_max"]
        assert 0 <= column["recognised"] <= 1
    with Image.open(out / "grid.png") as grid:
        width, height = grid.size
    assert width > height  # 3 columns, 2 rows
    page = (out / "index.html").read_text()
    assert "grid.png" in page and "retom 0.5" in page and "PSNR" in page


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


def test_pipeline_folder(sd_folder, tmp_path, capsys):
    out = tmp_path / "sd"
    clip = tiny_clip(tmp_path / "clip")
    status = _compare(
        "--model", str(sd_folder), "--prompt", "a cat", "--seeds", "0", "1",
        "--strategies", "tome", "--ratios", "0.3", "0.6", "--steps", "2", "--size", "64",
        "--set", "sites.min_tokens=1", "--clip-model", str(clip), "-o", str(out),
    )  # fmt: skip
    assert status == 0
    assert f"CLIP score: {clip}" in capsys.readouterr().out
    results = _results(out)
    # every image, unmerged included, scored against its prompt
    assert all(0 <= c["clip_score"] <= 100 for c in results["configurations"])
    assert [c["label"] for c in results["configurations"]] == ["none", "tome 0.3", "tome 0.6"]
    assert results["rows"] == ["a cat / seed 0", "a cat / seed 1"]
    assert all("recognised" not in c for c in results["configurations"])
    low, high = results["configurations"][1:]
    assert low["psnr"] is not None and high["psnr"] is not None


def test_a_configuration_that_merges_nothing_is_an_error(sd_folder, tmp_path, capsys):
    # 64 px: 8 x 8 latent tokens, under the default min_tokens of 256
    status = _compare(
        "--model", str(sd_folder), "--prompt", "a cat", "--seeds", "0", "--strategies", "tome",
        "--steps", "1", "--size", "64", "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "merged nothing" in err[0] and "sites.min_tokens=1" in err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "digit-dit", "--prompt", "cat"], "the digits 0-9"),
        (["--model", "no/such/folder"], "not a folder"),
        (["--model", "digit-dit", "--strategies", "tme"], "unknown strategy"),
        (["--model", "digit-dit", "--guidance", "nan"], "finite"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path, capsys):
    assert _compare(*args, "--steps", "1", "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    assert _compare("--model", "digit-dit", "--steps", "1", "-o", str(target)) == 2
    assert "is a file" in capsys.readouterr().err


def test_clip_score_without_its_model_on_disk_says_how_to_get_it(sd_folder, tmp_path, capsys):
    status = _compare(
        "--model", str(sd_folder), "--prompt", "a cat", "--seeds", "0", "--strategies", "tome",
        "--steps", "1", "--size", "64", "--set", "sites.min_tokens=1",
        "--clip-model", str(tmp_path / "no-clip-here"), "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "CLIP score: off" in printed and "--clip-model PATH" in printed
    assert all(c["clip_score"] is None for c in _results(tmp_path / "out")["configurations"])
