"""Per-model step state: where a generation is, so plans can be cached across denoising steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StepState", "timestep_value"]


def timestep_value(timestep: Any) -> float | None:
    """A timestep argument as a float (the first element of a tensor), or None when absent.

    Reading a device tensor synchronises once per model forward, at the root, never per site.
    """
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().flatten()[0])
    return float(timestep)


@dataclass
class StepState:
    """Denoising progress of one patched model, fed by the adapter's root pre-hook.

    - A call whose timestep is lower than the last one is the next step.
    - A call with the same timestep is the same step (e.g. the two classifier-free guidance
      halves run as separate calls, or a second-order solver's correction); it plans when the
      step plans. With the halves as separate calls and ``cache_interval`` > 1, the steps in
      between reuse the plan of the step's last call: batch the halves (the diffusers default)
      for a plan per sample.
    - A timestep higher than the last starts a new generation (step 0); so does every call
      without a timestep, so models that are not denoisers never reuse a plan across inputs.

    The root hook runs outside any compiled graph and turns this into one boolean per call,
    ``replan``, which is all the merge sites read: a denoising loop then compiles to a few graph
    variants instead of one per step.

    Attributes:
        generation: increases at every new generation; cached plans from an older one are dropped.
        step: step index within the generation (0-based).
        call: root forward calls so far.
        timestep: the last timestep seen, or None.
        cache_interval: plans are made at steps 0, k, 2k... of a generation (k = this).
        replan: whether sites make new plans at this call (else they reuse their cached plan
            when it fits the call's batch, tokens, device and dtype).
    """

    generation: int = 0
    step: int = 0
    call: int = 0
    timestep: float | None = None
    cache_interval: int = 1
    replan: bool = True

    def begin_call(self, timestep: float | None) -> bool:
        """Record the start of a root forward call with this timestep (None if it has none).

        Returns:
            True when the call starts a new generation.
        """
        self.call += 1
        started = timestep is None or self.timestep is None or timestep > self.timestep
        if started:
            self.new_generation()
        elif timestep < self.timestep:
            self.step += 1
            self.replan = self.step % self.cache_interval == 0
        # the same timestep again (the CFG halves run as two calls, a solver's correction): the
        # step's decision stands, so with cache_interval 1 every call plans on its own input,
        # as tomesd does
        self.timestep = timestep
        return started

    def new_generation(self) -> None:
        """Start a new generation: step 0, every site plans afresh."""
        self.generation += 1
        self.step = 0
        self.timestep = None
        self.replan = True
