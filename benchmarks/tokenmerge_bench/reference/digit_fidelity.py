"""What merging costs the digit models (``digits.py``): the errors issue 25's targets are set in.

- **Denoisers** (``DenoiserProbe``): the relative error of the merged model's velocity against
  the unmerged one's on held-out digits at three noise levels (one call each), and of whole
  sampling runs: the same noise, the same labels, 20 Euler steps with classifier-free guidance,
  merged against unmerged, final images compared; plus how many of the merged model's digits the
  judge still recognises.
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
from tokenmerge.errors import NothingMergedWarning
from tokenmerge_bench.fidelity import relative_error

from .digits import digit_split, judge_digits, sample, velocity

__all__ = ["ClassifierProbe", "DenoiserProbe"]

ONE_STEP_TIMES = (0.25, 0.5, 0.75)


def _merged(model: nn.Module, config: Any, run: Callable[[], Any], **options: Any) -> Any:
    """``run()`` with ``config`` applied to ``model`` (``options``: ``apply``'s keywords);
    every selected site must merge."""
    handle = tokenmerge.apply(model, config, **options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NothingMergedWarning)  # an error here, just below
            out = run()
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
    """

    def __init__(
        self, model: nn.Module, per_class: int = 5, held_out: int = 200, steps: int = 20
    ) -> None:
        self.model, self.steps = model, steps
        images, labels = digit_split("held_out")
        pick = torch.linspace(0, len(labels) - 1, held_out).long()
        self.images, self.labels = images[pick], labels[pick]
        generator = torch.Generator().manual_seed(0)
        self.noise = torch.randn(self.images.shape, generator=generator)
        self.sample_labels = torch.arange(10).repeat_interleave(per_class)
        self.sample_noise = torch.randn(len(self.sample_labels), 1, 28, 28, generator=generator)
        self.reference = self._run()

    @torch.no_grad()
    def _one_step(self) -> dict[float, Tensor]:
        out = {}
        for t in ONE_STEP_TIMES:
            noisy = (1 - t) * self.images + t * self.noise
            times = torch.full((len(self.labels),), t)
            out[t] = velocity(self.model, noisy, times, self.labels)
        return out

    def _run(self) -> dict[str, Any]:
        final = sample(self.model, self.sample_labels, self.sample_noise, steps=self.steps)
        return {"one_step": self._one_step(), "final": final}

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
        logits = _merged(self.model, config, self._logits, **options)
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
