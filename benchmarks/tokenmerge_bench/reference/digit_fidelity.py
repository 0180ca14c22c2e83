"""What merging costs the digit models (``digits.py``): the errors issue 25's targets are set in.

- **Denoisers** (``DenoiserProbe``): the relative error of the merged model's velocity against
  the unmerged one's on held-out digits at three noise levels (one call each), and of whole
  sampling runs: the same noise, the same labels, 20 Euler steps with classifier-free guidance,
  merged against unmerged, final images compared; plus how many of the merged model's digits the
  judge still recognises. Where the model's sites make one plan for the whole batch (Flux's
  rotary table is shared by the batch), every digit runs as a batch of its own: one plan for
  hundreds of unrelated digits is not what a user generating one image meets.
- **Classifier** (``ClassifierProbe``): on the held-out digits, how often the merged model's top-1
  disagrees with the unmerged model's, and the mean KL divergence of its predictions from them.

Every measurement applies the configuration afresh and removes it after, and checks that every
site it selected did merge (a site skipped for its size would make a strategy look lossless).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokenmerge
from tokenmerge.api import Handle
from tokenmerge.errors import NothingMergedWarning
from tokenmerge_bench.fidelity import relative_error

from .digits import digit_split, judge_digits, sample, velocity

__all__ = ["ClassifierProbe", "DenoiserProbe"]

ONE_STEP_TIMES = (0.25, 0.5, 0.75)


def _merged(
    model: nn.Module, config: Any, run: Callable[[Handle | None], Any], **options: Any
) -> Any:
    """``run(handle)`` with ``config`` applied to ``model`` (``options``: ``apply``'s keywords);
    every selected site must merge."""
    handle = tokenmerge.apply(model, config, **options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NothingMergedWarning)  # an error here, just below
            out = run(handle)
        idle = [
            name
            for name, stats in handle.stats().items()
            if stats.calls and stats.tokens_out >= stats.tokens_in
        ]
        if idle:
            raise RuntimeError(f"sites that merged nothing under {config!r}: {idle}")
        return out
    finally:
        handle.remove()


class DenoiserProbe:
    """Fixed inputs and the unmerged model's outputs for them; ``errors(config)`` measures a
    configuration against them.

    Args:
        model: a digit denoiser (``digit-flux`` or ``digit-dit``), in eval mode.
        per_class: generated digits per class in the sampling runs.
        held_out: held-out digits in the one-step measurement.
        steps: Euler steps per sampling run.
        per_digit: run every digit as a batch of its own (in the sampling runs, the digit and
            its empty-class twin); None (the default): where the model's sites plan once for
            the whole batch.
    """

    def __init__(
        self,
        model: nn.Module,
        per_class: int = 5,
        held_out: int = 200,
        steps: int = 20,
        per_digit: bool | None = None,
    ) -> None:
        self.model, self.steps = model, steps
        self.per_digit = _plans_per_batch(model) if per_digit is None else per_digit
        images, labels = digit_split("held_out")
        pick = torch.linspace(0, len(labels) - 1, held_out).long()
        self.images, self.labels = images[pick], labels[pick]
        generator = torch.Generator().manual_seed(0)
        self.noise = torch.randn(self.images.shape, generator=generator)
        self.sample_labels = torch.arange(10).repeat_interleave(per_class)
        self.sample_noise = torch.randn(len(self.sample_labels), 1, 28, 28, generator=generator)
        self.reference = self._run()

    def _batches(self, count: int) -> list[slice]:
        if not self.per_digit:
            return [slice(0, count)]
        return [slice(index, index + 1) for index in range(count)]

    @torch.no_grad()
    def _one_step(self, handle: Handle | None) -> dict[float, Tensor]:
        out = {}
        for t in ONE_STEP_TIMES:
            parts = []
            for part in self._batches(len(self.labels)):
                if handle is not None:  # a digit is a generation of its own: no plan reused
                    handle.new_generation()
                noisy = (1 - t) * self.images[part] + t * self.noise[part]
                times = torch.full((len(self.labels[part]),), t)
                parts.append(velocity(self.model, noisy, times, self.labels[part]))
            out[t] = torch.cat(parts)
        return out

    def _run(self, handle: Handle | None = None) -> dict[str, Any]:
        finals = []
        for part in self._batches(len(self.sample_labels)):
            if handle is not None:
                handle.new_generation()
            labels, noise = self.sample_labels[part], self.sample_noise[part]
            finals.append(sample(self.model, labels, noise, steps=self.steps))
        return {"one_step": self._one_step(handle), "final": torch.cat(finals)}

    def errors(self, config: Any, **options: Any) -> dict[str, float]:
        """Relative errors of ``config`` against the unmerged model, and the judge's score
        (``options``: ``apply``'s keywords)."""
        out = _merged(self.model, config, self._run, **options)
        result = {
            f"one_step_{t}": relative_error(out["one_step"][t], self.reference["one_step"][t])
            for t in ONE_STEP_TIMES
        }
        result["final"] = relative_error(out["final"], self.reference["final"])
        recognised = judge_digits(out["final"]) == self.sample_labels
        result["recognised"] = float(recognised.float().mean())
        return result

    def recognised_unmerged(self) -> float:
        return float((judge_digits(self.reference["final"]) == self.sample_labels).float().mean())


def _plans_per_batch(model: nn.Module) -> bool:
    """Whether tokenmerge's adapter for ``model`` makes one plan for a whole batch."""
    config = tokenmerge.load_config("random", ratio=0.5, sites={"min_tokens": 1})
    handle = tokenmerge.apply(model, config)
    try:
        return any(site.shared_plan for site in handle.sites)
    finally:
        handle.remove()


class ClassifierProbe:
    """The held-out digits and the unmerged classifier's predictions on them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.images, self.labels = digit_split("held_out")
        self.reference = self._logits()

    @torch.no_grad()
    def _logits(self) -> Tensor:
        return torch.cat([self.model(chunk) for chunk in self.images.split(250)])

    def errors(self, config: Any, **options: Any) -> dict[str, float]:
        """Top-1 disagreement with the unmerged model, mean KL from its predictions, and the
        merged model's accuracy (``options``: ``apply``'s keywords, e.g. ``adapter_options``)."""
        logits = _merged(self.model, config, lambda handle: self._logits(), **options)
        kl = F.kl_div(
            logits.log_softmax(-1), self.reference.log_softmax(-1), log_target=True,
            reduction="batchmean",
        )  # fmt: skip
        return {
            "disagreement": float((logits.argmax(-1) != self.reference.argmax(-1)).float().mean()),
            "kl": float(kl),
            "accuracy": float((logits.argmax(-1) == self.labels).float().mean()),
        }

    def accuracy_unmerged(self) -> float:
        return float((self.reference.argmax(-1) == self.labels).float().mean())
