"""Value-corrected unmerge (``MergeConfig.value_correction``, ``tokenmerge.correction``)."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import tokenmerge
from tokenmerge.correction import ValueCorrection, corrects
from tokenmerge.observe import Observer, Part
from tokenmerge.plan import Plan
from tokenmerge.site import Site
from tokenmerge_bench.fidelity import BlockErrorProbe, relative_error, tie_self_attention
from tokenmerge_bench.presets import get_preset
from tokenmerge_bench.runner import sharing_weights
from tokenmerge_bench.workload import UNetWorkload

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Opaque(AttnProcessor2_0):
    """A processor the correction does not know (e.g. a user's own)."""


@pytest.fixture(scope="module")
def tied_unet():
    unet = get_preset("tiny-unet").build(seed=0)
    tie_self_attention(unet, 3.0)
    return unet


def _workload(unet, batch=2):
    return UNetWorkload(unet, 128, batch, torch.device("cpu"), torch.float32)


def _block_error(unet, workload, **config) -> float:
    """Mean block error over the merged blocks, on a photograph at two timesteps."""
    merged = sharing_weights(unet)
    with tokenmerge.apply(merged, **config) as handle, torch.no_grad():
        names = list(handle.stats())
        errors = []
        for timestep in (800, 300):
            sample = workload.noisy_photo("astronaut", timestep)
            with BlockErrorProbe(merged, unet, names) as probe:
                workload(merged, sample, timestep)
            errors += [e for n in names for e in probe.records[n].errors]
        assert all(s.tokens_out < s.tokens_in for s in handle.stats().values())
    return sum(errors) / len(errors)


@pytest.mark.parametrize("strategy", ["tome", "retom", "random"])
def test_correction_lowers_block_error_on_similarity_attention(tied_unet, strategy):
    workload = _workload(tied_unet)
    plain = _block_error(tied_unet, workload, config=strategy, value_correction=False)
    corrected = _block_error(tied_unet, workload, config=strategy, value_correction=True)
    assert corrected < plain, (plain, corrected)


def test_fitted_weight_is_reported_and_in_range(tied_unet):
    workload = _workload(tied_unet)
    sample = workload.noisy_photo("astronaut", 500)
    model = sharing_weights(tied_unet)
    with tokenmerge.apply(model, "tome", ratio=0.5, value_correction=True) as handle:
        with torch.no_grad():
            workload(model, sample, 500)
        betas = [s.value_correction for s in handle.stats().values()]
    assert betas and all(b is not None and 0.0 < b <= 1.0 for b in betas), betas
    with tokenmerge.apply(model, "tome", ratio=0.5) as handle:  # off by default for tome
        with torch.no_grad():
            workload(model, sample, 500)
        assert all(s.value_correction is None for s in handle.stats().values())


def test_retom_corrects_by_default():
    assert tokenmerge.load_config("retom").value_correction is True
    assert tokenmerge.load_config("tome").value_correction is False


def test_ratio_zero_stays_bit_identical(tied_unet):
    workload = _workload(tied_unet)
    sample = workload.noisy_photo("astronaut", 500)
    with torch.no_grad():
        reference = workload(tied_unet, sample, 500)
        with tokenmerge.apply(tied_unet, "retom", ratio=0.0, value_correction=True):
            out = workload(tied_unet, sample, 500)
        assert torch.equal(out, reference)
        assert torch.equal(workload(tied_unet, sample, 500), reference)  # removed


def test_unknown_processor_is_left_uncorrected_and_shown():
    unet = get_preset("tiny-unet").build(seed=1)
    for module in unet.modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            module.set_processor(_Opaque())
    workload = _workload(unet)
    with tokenmerge.apply(unet, "retom", value_correction=True) as handle, torch.no_grad():
        workload(unet, workload.noisy_photo("astronaut", 500), 500)
        stats = handle.stats().values()
        assert all(s.value_correction is None for s in stats)
        assert any(s.tokens_out < s.tokens_in for s in stats)  # merging itself still happens


def test_corrects_only_plain_self_attention():
    self_attention = Attention(16, heads=2, dim_head=8)
    cross = Attention(16, cross_attention_dim=8, heads=2, dim_head=8)
    assert corrects(self_attention)
    assert not corrects(cross)
    self_attention.set_processor(_Opaque())
    assert not corrects(self_attention)


def test_direction_is_the_bias_free_value_and_output_projection():
    torch.manual_seed(0)
    attention = Attention(16, heads=2, dim_head=8, bias=True, out_bias=True).eval()
    plan = Plan.from_assignment(torch.tensor([[1, 3]]), torch.tensor([[0, 2]]), 5)
    x = torch.randn(2, 5, 16)
    merged = plan.merge(x)
    copied = plan.unmerge(attention(merged))
    correction = ValueCorrection(attention, samples=2)
    corrected = correction(plan, x, merged, copied.clone())
    offsets = x - plan.unmerge(merged)
    value = F.linear(offsets, attention.to_v.weight)
    beta = correction.beta[:, None, None]  # one weight per sample
    expected = copied + beta * F.linear(value, attention.to_out[0].weight)
    sources, others = [1, 3], [0, 2, 4]
    torch.testing.assert_close(corrected[:, sources], expected[:, sources])
    assert torch.equal(corrected[:, others], copied[:, others])  # destinations and the rest


@pytest.mark.parametrize("qk_norm", [None, "layer_norm"])
def test_exact_rows_are_the_attention_output_of_those_rows(qk_norm):
    """The fit's exact rows, computed in input space (or, with keys normalised per head, by
    projecting every key and value), are what the attention itself outputs for those tokens."""
    torch.manual_seed(0)
    attention = Attention(32, heads=4, dim_head=8, bias=True, out_bias=True, qk_norm=qk_norm)
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        rows = ValueCorrection(attention.eval())._exact_rows(x[:, ::5], x)
        torch.testing.assert_close(rows, attention(x)[:, ::5], atol=1e-5, rtol=1e-5)


def test_fit_recovers_the_exact_rows_of_a_self_dominated_attention():
    """Where every token attends only to itself, the exact output of token i is
    to_out(to_v(x_i)): the correction with beta = 1 is exact for the merged-away tokens, and the
    fit finds it."""
    torch.manual_seed(0)
    attention = Attention(16, heads=1, dim_head=16).eval()
    with torch.no_grad():
        attention.to_q.weight.copy_(torch.eye(16) * 40.0)
        attention.to_k.weight.copy_(torch.eye(16) * 40.0)
    x = F.normalize(torch.randn(1, 8, 16), dim=-1)
    plan = Plan.from_assignment(torch.tensor([[1, 3, 5]]), torch.tensor([[0, 2, 4]]), 8)
    merged = plan.merge(x)
    with torch.no_grad():
        copied = plan.unmerge(attention(merged))
        exact = attention(x)
    correction = ValueCorrection(attention)
    corrected = correction(plan, x, merged, copied.clone())
    assert float(correction.beta) == pytest.approx(1.0, abs=0.02)
    sources = [1, 3, 5]
    error = (corrected - exact)[:, sources].norm() / (copied - exact)[:, sources].norm()
    assert float(error) < 0.05


class _Fits(Observer):
    """Counts the value correction's fits per site."""

    def __init__(self) -> None:
        self.sites: list[str] = []

    def around(self, part: Part, site: Site) -> AbstractContextManager[object]:
        if part == "fit":
            self.sites.append(site.name)
        return nullcontext()


def test_refits_only_on_new_plans(tied_unet):
    workload = _workload(tied_unet, batch=1)
    model = sharing_weights(tied_unet)
    sample = workload.noisy_photo("astronaut", 500)
    with tokenmerge.apply(model, "retom", cache_interval=3) as handle, torch.no_grad():
        with handle.observe(_Fits()) as fits:
            for timestep in (900, 800, 700, 600, 500, 400):
                workload(model, sample, timestep)
        sites = [name for name, s in handle.stats().items() if s.tokens_out < s.tokens_in]
    assert sites
    assert sorted(fits.sites) == sorted(sites * 2)  # plans at steps 1 and 4


def test_copy_taken_mid_generation_goes_on_as_the_original(tied_unet):
    workload = _workload(tied_unet)
    model = copy.deepcopy(tied_unet)
    sample = workload.noisy_photo("astronaut", 500)
    with tokenmerge.apply(model, "retom", cache_interval=5), torch.no_grad():
        workload(model, sample, 500)  # plans and fits
        clone = copy.deepcopy(model)
        # the next step reuses the plan and its fitted weight, in the copy as in the original
        assert torch.equal(workload(clone, sample, 480), workload(model, sample, 480))


def test_each_sample_fits_its_own_weight(tied_unet):
    """A sample's output does not depend on the rest of the batch: a batch of two gives what
    two batches of one give (up to the float noise of batched kernels)."""
    workload = _workload(tied_unet)
    photos = ("astronaut", "coffee")
    sample = torch.cat([workload.noisy_photo(photo, 500)[:1] for photo in photos])
    model = sharing_weights(tied_unet)
    config = dict(config="retom", scope="window")  # window scope: no near-tie flips in the plan
    with tokenmerge.apply(model, **config) as handle, torch.no_grad():
        both = workload(model, sample, 500)
        betas = [s.value_correction for s in handle.stats().values()]
        solos = []
        prompt = workload.kwargs["encoder_hidden_states"]
        for index in range(2):
            handle.new_generation()
            rows = slice(index, index + 1)
            solos.append(model(sample[rows], 500, encoder_hidden_states=prompt[rows]).sample)
    assert all(b is not None and b > 0.05 for b in betas), betas
    for index, solo in enumerate(solos):
        assert relative_error(both[index : index + 1], solo) < 1e-4, index
