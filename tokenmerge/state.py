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
      halves run as separate calls, or a second-order solver's correction).
    - A timestep higher than the last starts a new generation (step 0); so does every call
      without a timestep, so models that are not denoisers never reuse a plan across inputs.

    Attributes:
        generation: increases at every new generation; cached plans from an older one are dropped.
        step: step index within the generation (0-based).
        call: root forward calls so far; sites share one plan within a call.
        timestep: the last timestep seen, or None.
    """

    generation: int = 0
    step: int = 0
    call: int = 0
    timestep: float | None = None

    def begin_call(self, timestep: float | None) -> None:
        """Record the start of a root forward call with this timestep (None if it has none)."""
        self.call += 1
        if timestep is None or self.timestep is None or timestep > self.timestep:
            self.new_generation()
        elif timestep < self.timestep:
            self.step += 1
        self.timestep = timestep

    def new_generation(self) -> None:
        """Start a new generation: step 0, every cached plan dropped at its next use."""
        self.generation += 1
        self.step = 0
        self.timestep = None
