"""The reference models trained here: their data, their shipped weights (held-out metrics pinned),
that their attention is learned enough for merging to matter, the training script, and the
bench presets that measure them."""

from __future__ import annotations

import importlib.util
import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch

import tokenmerge
from tokenmerge_bench.photos import PHOTOS
from tokenmerge_bench.presets import get_preset
from tokenmerge_bench.reference import data, metrics, models


def _training_script():
    """benchmarks/train_reference.py, a script outside any package, imported from its file."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_reference.py"
    spec = importlib.util.spec_from_file_location("train_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_reference = _training_script()
train_main = train_reference.main

#: held-out figures of the shipped weights (fp16 files, run in fp32 on the CPU), measured when
#: they were trained; a broken loader or a silently changed model moves them
DENOISER_HELD_OUT_LOSS = 0.04368  # mean over the 50-timestep sweep
CLASSIFIER_HELD_OUT_ACCURACY = 296 / 494
#: mean self-attention entropy over the merged sites, as a fraction of log N. The issue asked
#: for at most 0.8: the classifier reaches it, the denoiser does not (see
#: docs/reference-models.md); pinned so that a change shows
DENOISER_ENTROPY = 0.944
CLASSIFIER_ENTROPY = 0.778


@pytest.fixture(scope="module")
def photos():
    return data.load_photo_set()


@pytest.fixture(scope="module")
def denoiser():
    return models.load_denoiser()


@pytest.fixture(scope="module")
def classifier():
    return models.load_classifier()


def test_bundled_photographs_are_the_libraries_own():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    assert torch.equal(data.build_photo_set(), data.load_photo_set())


def test_every_bundled_photograph_states_its_source_and_licence():
    # the notes ship beside the photographs, in the package data of tokenmerge-bench
    notes = (resources.files("tokenmerge_bench") / "data" / "PHOTOS.md").read_text()
    rows = {line.split("|")[2].split("`")[1]: line for line in notes.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}  # fmt: skip
    assert list(rows) == [name for name, _ in data.REFERENCE_PHOTOS]
    for name in PHOTOS:
        assert f"{name}_256.pt" in rows[name]
    for name, row in rows.items():
        licence = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert licence, f"{name} has no licence in PHOTOS.md"
    # CC BY asks for the author, the source and the licence to be named
    for name, author, source in [
        ("china", "danielbuechele", "https://www.flickr.com/photos/danielbuechele/6061409035/"),
        ("flower", "vultilion", "https://www.flickr.com/photos/vultilion/6056698931/"),
    ]:
        assert "CC BY 2.0" in rows[name]
        attribution = notes.split(f"**`{name}`**", 1)[1].split("\n- ", 1)[0]
        assert author in attribution and source in attribution
    assert "https://creativecommons.org/licenses/by/2.0/" in notes


def test_denoiser_never_trains_on_its_held_out_photographs(photos):
    marked = torch.zeros_like(photos)  # -1 everywhere once in [-1, 1]
    for index in data._index(data.DENOISER_HELD_OUT):
        marked[index] = 255
    batch = data.denoiser_batch(marked, 64, torch.Generator().manual_seed(0))
    assert batch.shape == (64, 3, 64, 64)
    assert float(batch.max()) < -0.999  # -1 up to the resize's rounding
    assert len(data.denoiser_held_out(photos)) == 30


def test_classifier_never_trains_on_its_held_out_rows(photos, monkeypatch):
    monkeypatch.setattr(data, "standardise", lambda crops: crops)  # keep the marks visible
    marked = torch.zeros_like(photos)
    marked[:, :, 92:] = 255  # the held-out band and the gap above it
    crops, labels = data.classifier_batch(marked, 256, torch.Generator().manual_seed(0))
    assert crops.shape == (256, 3, 32, 32) and float(crops.max()) < -0.999
    assert set(labels.tolist()) == set(range(19))
    monkeypatch.undo()
    held_out, held_out_labels = data.classifier_held_out(photos)
    assert held_out.shape == (494, 3, 32, 32)
    # standardised: every crop's channels have zero mean
    assert held_out.mean(dim=(-2, -1)).abs().max() < 1e-5
    assert torch.bincount(held_out_labels).tolist() == [26] * 19


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="the set has astronaut, brick"):
        data.reference_photo("astro")
    with pytest.raises(tokenmerge.errors.UnknownNameError, match="denoiser, classifier"):
        models.load_reference("unet")


def test_shipped_weights_are_small_fp16_files():
    total = 0
    for kind in ("denoiser", "classifier"):
        from safetensors.torch import load

        raw = models.weights_file(kind).read_bytes()
        total += len(raw)
        assert {value.dtype for value in load(raw).values()} == {torch.float16}
    assert total <= 20 * 2**20


def test_denoiser_held_out_loss_is_pinned(denoiser, photos):
    losses = metrics.denoising_losses(denoiser, data.denoiser_held_out(photos))
    mean = sum(losses.values()) / len(losses)
    assert mean == pytest.approx(DENOISER_HELD_OUT_LOSS, rel=2e-3)
    # it learned to denoise: far below the loss of predicting zero noise (1.0)
    assert mean < 0.1


def test_classifier_held_out_accuracy_is_pinned(classifier, photos):
    crops, labels = data.classifier_held_out(photos)
    accuracy = metrics.accuracy(classifier, crops, labels)
    assert accuracy == pytest.approx(CLASSIFIER_HELD_OUT_ACCURACY, abs=2.5 / len(labels))
    assert accuracy > 3 / 19  # well above chance


def _merged_sites(handle) -> set[str]:
    return {name for name, stats in handle.stats().items() if stats.tokens_out < stats.tokens_in}


def _entropy_at(model, merged: set[str], run) -> float:
    """Mean attention entropy of the unmerged model at the merged sites, a fraction of log N."""
    entropy = metrics.attention_entropy(model, run)
    fractions = [
        value / math.log(keys)
        for name, (value, keys) in entropy.items()
        if any(name.startswith(site + ".") for site in merged)
    ]
    assert fractions, (sorted(entropy), sorted(merged))
    return sum(fractions) / len(fractions)


def test_merging_hurts_the_denoiser(denoiser, photos):
    images = data.denoiser_held_out(photos)
    unmerged = metrics.denoising_losses(denoiser, images)
    handle = tokenmerge.apply(denoiser, "random", ratio=0.75)
    try:
        merged = metrics.denoising_losses(denoiser, images)
        sites = _merged_sites(handle)
    finally:
        handle.remove()

    def run():
        metrics.denoising_losses(denoiser, images, timesteps=(900, 500, 100))

    fraction = _entropy_at(denoiser, sites, run)
    assert fraction == pytest.approx(DENOISER_ENTROPY, abs=0.005)
    increase = metrics.loss_increase(merged, unmerged)
    assert increase >= 10.0, f"random merging at 0.75 costs only {increase:.1f} % more loss"


def test_merging_hurts_the_classifier(classifier, photos):
    crops, labels = data.classifier_held_out(photos)
    unmerged = metrics.accuracy(classifier, crops, labels)
    handle = tokenmerge.apply(classifier, "random", r=8)
    try:
        merged = metrics.accuracy(classifier, crops, labels)
        sites = _merged_sites(handle)
    finally:
        handle.remove()
    fraction = _entropy_at(classifier, sites, lambda: classifier(crops))
    assert fraction == pytest.approx(CLASSIFIER_ENTROPY, abs=0.005)
    # the bar the issue set, kept apart from the pin: a retrained classifier re-pinned above
    # 0.8 would pass the line above and fail here
    assert fraction <= 0.8
    assert unmerged - merged >= 0.03, (unmerged, merged)


@pytest.mark.parametrize("kind", ["denoiser", "classifier"])
def test_training_is_reproducible_and_resumable(kind, tmp_path):
    def run(name, steps, resume=False):
        args = [kind, "--steps", str(steps), "--batch", "2", "--threads", "1",
                "--checkpoint", str(tmp_path / f"{name}.pt"), "--save-every", "2",
                "--out", str(tmp_path / f"{name}.safetensors"),
                "--report", str(tmp_path / f"{name}.json")]  # fmt: skip
        assert train_main(args + (["--resume"] if resume else [])) == 0
        from safetensors.torch import load_file

        return load_file(str(tmp_path / f"{name}.safetensors"))

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, resume=True)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    report = json.loads((tmp_path / "resumed.json").read_text())
    assert report["steps"] == 4 and report["attention_entropy"]
    assert report["device"] == "cpu"


def test_training_refuses_a_learning_rate_floor_outside_0_to_1(capsys):
    with pytest.raises(SystemExit):
        train_main(["classifier", "--lr-floor", "1.5"])
    assert "--lr-floor is a fraction of --lr, from 0 to 1; got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", "--device 'bogus' is not a torch device; use cpu, cuda, cuda:N or mps"),
        ("cuda", "--device cuda: this torch"),
        ("cuda:3", "sees no GPU; leave --device out to train on the CPU"),
    ],
)
def test_training_refuses_a_device_it_cannot_use(device, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train_main(["denoiser", "--device", device])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["denoiser", "classifier"])
def test_training_on_cuda_follows_the_cpu_run(kind, tmp_path):
    from safetensors.torch import load_file

    weights = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.safetensors"
        args = [kind, "--steps", "3", "--batch", "2", "--threads", "1", "--device", device,
                "--checkpoint", str(tmp_path / f"{device}.pt"), "--out", str(out),
                "--report", str(tmp_path / f"{device}.json")]  # fmt: skip
        assert train_main(args) == 0
        weights[device] = load_file(str(out))
    report = json.loads((tmp_path / "cuda.json").read_text())
    assert report["device"].startswith("cuda") and report["attention_entropy"]
    # the same batches and draws, so the same weights up to kernel rounding (stored in fp16)
    for name, value in weights["cpu"].items():
        torch.testing.assert_close(weights["cuda"][name], value, atol=2e-3, rtol=1e-2)


def test_classifier_training_starts_from_sine_cosine_positions():
    model = models.build_classifier()
    train_reference._sincos_positions(model)
    positions = model.pos_embed[0].detach()
    assert torch.equal(positions[0], torch.zeros_like(positions[0]))  # the class token
    grid = positions[1:].view(8, 8, -1)
    # every patch has its own code, and a neighbour's is closer than a far patch's
    assert torch.cdist(positions[1:], positions[1:]).fill_diagonal_(1.0).min() > 0.5
    corner = grid[0, 0]
    assert (grid[0, 1] - corner).norm() < (grid[0, 7] - corner).norm()
    assert (grid[1, 0] - corner).norm() < (grid[7, 0] - corner).norm()
    assert (grid[0, 1] - corner).norm() == pytest.approx((grid[1, 0] - corner).norm())


def test_presets_load_the_trained_weights(denoiser, classifier):
    for name, trained in [("reference-denoiser", denoiser), ("reference-vit", classifier)]:
        built = get_preset(name).build()
        state = trained.state_dict()
        assert all(torch.equal(value, state[key]) for key, value in built.state_dict().items())


def test_bench_measures_the_denoiser_on_held_out_images(tmp_path):
    from tokenmerge_bench.report import format_report
    from tokenmerge_bench.runner import BenchSettings, run_bench

    samples = tmp_path / "samples.png"
    settings = BenchSettings(
        model="reference-denoiser", strategies=["random"], ratios=[0.75], peers=[], rounds=1,
        timesteps=[500], trajectory_steps=2, batch=2, samples=str(samples),
    )  # fmt: skip
    result = run_bench(settings, progress=False)
    none, merged = result.rows
    assert result.settings["photos"] == list(data.DENOISER_HELD_OUT)
    assert list(none.held_out_loss) == [str(t) for t in metrics.EVAL_TIMESTEPS]
    assert none.held_out_loss_increase == 0.0
    assert merged.held_out_loss_increase > 10.0
    assert "own weights" in result.model["attention"]
    assert samples.stat().st_size > 0
    assert "held-out denoising loss" in format_report(result)


def test_bench_measures_the_classifier_on_held_out_crops():
    from tokenmerge_bench.classify import (
        ClassifierSettings,
        format_classifier_report,
        run_classifier_bench,
    )

    settings = ClassifierSettings(
        model="reference-vit", strategies=["tome", 'retom:scope="window"'], r=[2, 8], rounds=1,
        batch=64,
    )  # fmt: skip
    result = run_classifier_bench(settings, progress=False)
    window = 'retom+scope="window"'
    labels = ["none", "tome r=2", f"{window} r=2", "tome r=8", f"{window} r=8"]
    assert [row.label for row in result.rows] == labels
    assert result.rows[0].held_out_top1 == pytest.approx(CLASSIFIER_HELD_OUT_ACCURACY, abs=0.006)
    assert result.rows[3].top1_agreement <= result.rows[1].top1_agreement
    report = format_classifier_report(result)
    assert "held-out top-1" in report
    # the columns line up under the header however long a variant's label is
    header = next(line for line in report.splitlines() if line.startswith("config"))
    rows = [line for line in report.splitlines() if line.startswith(("none", "tome", "retom"))]
    assert {len(line) for line in rows} == {len(header)}


def test_the_reference_classifier_runs_at_its_own_size():
    from tokenmerge.errors import UnsupportedModelError
    from tokenmerge_bench.classify import ClassifierSettings, run_classifier_bench

    with pytest.raises(UnsupportedModelError, match="32 px held-out crops, not at 64 px"):
        run_classifier_bench(ClassifierSettings(model="reference-vit", size=64), progress=False)


def test_samples_are_refused_for_other_models():
    from tokenmerge.errors import UnsupportedModelError
    from tokenmerge_bench.runner import BenchSettings, run_bench

    with pytest.raises(UnsupportedModelError, match="reference denoiser only"):
        run_bench(BenchSettings(model="tiny-unet", samples="x.png"), progress=False)
