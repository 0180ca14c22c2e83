"""Per-model step state: where a generation is, so plans can be cached across denoising steps."""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError

__all__ = ["ScheduleStep", "StepState", "read_timestep", "timestep_value"]

#: a drop of the timestep this many times the largest step of the generation so far is no step
#: of it: the run was abandoned and another one started lower (an img2img run, say)
IMPLAUSIBLE_DROP = 8.0
#: conditioning tensors one step may take (the guidance halves as separate calls, PAG's third)
MAX_CONDITIONINGS = 4


@dataclass(frozen=True, eq=False)
class ScheduleStep:
    """A timestep known by its place in the schedule tensor it was taken from, not its value.

    Pipelines pass ``t`` from ``for t in scheduler.timesteps`` (or ``t.expand(batch)``): a view
    into the schedule, whose position the host knows without reading the device. Within one
    schedule a later position is a later step; another schedule tensor is another generation.

    Attributes:
        schedule: a weak reference to the schedule tensor (never kept alive here).
        index: the position in it.
    """

    schedule: weakref.ref
    index: int

    def same_schedule(self, other: Any) -> bool:
        """Whether ``other`` is a place in the same (still living) schedule tensor."""
        if not isinstance(other, ScheduleStep):
            return False
        mine = self.schedule()
        return mine is not None and mine is other.schedule()


def read_timestep(timestep: Any) -> float | ScheduleStep | None:
    """A root call's timestep as the host can know it without waiting for the device.

    A view into a 1-D tensor (the scheduler's ``timesteps``, as diffusers pipelines pass ``t``)
    is its ``ScheduleStep``: no value is read. Anything else is its value (``timestep_value``):
    a Python number costs nothing; a tensor computed for the call (Flux's ``timestep / 1000``)
    is read, which waits for the device once per model call.
    """
    if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
        base = timestep._base
        # a schedule has several steps: a one-element base is a tensor made for the call
        if base is not None and base.dim() == 1 and base.shape[0] > 1 and base.stride(0) > 0:
            offset = timestep.storage_offset() - base.storage_offset()
            index, rest = divmod(offset, base.stride(0))
            if rest == 0 and 0 <= index < base.shape[0]:
                return ScheduleStep(weakref.ref(base), index)
    return timestep_value(timestep)


def timestep_value(timestep: Any) -> float | None:
    """A timestep argument as a float (the first element of a tensor), or None when absent.

    Reading a device tensor waits for the device (``read_timestep`` avoids it where it can).
    """
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().flatten()[0])
    return float(timestep)


def _key(timestep: float | ScheduleStep) -> float:
    """A timestep as a number that falls from step to step: its value, or minus its place in
    its schedule (compare keys only of timesteps that ``StepState._follows`` orders)."""
    return -float(timestep.index) if isinstance(timestep, ScheduleStep) else timestep


@dataclass
class StepState:
    """Denoising progress of one patched model in one thread, fed by the adapter's root pre-hook.

    Each thread calling a patched model has its own (``tokenmerge.calls``); ``Handle.state`` is
    the calling thread's.

    - A call whose timestep is lower than the last one is the next step; so is one whose
      timestep comes later in the same schedule tensor (``read_timestep``).
    - A call with the same timestep is the same step (e.g. the two classifier-free guidance
      halves run as separate calls, or a second-order solver's correction); it plans when the
      step plans. With the halves as separate calls and ``cache_interval`` > 1, the steps in
      between reuse the plan of the step's last call: batch the halves (the diffusers default)
      for a plan per sample.
    - A new generation (step 0) starts at a call without a timestep (so models that are not
      denoisers never reuse a plan across inputs), at a timestep higher than the last, at a
      sample of another shape, at a conditioning tensor (text embeddings) the generation has not
      seen at a step other than the one under way (pipelines make one per generation and pass
      it at every step), and at a drop of the timestep more than ``IMPLAUSIBLE_DROP`` times the
      generation's largest step so far (a run abandoned at t=979 and another started at t=600).
    - A timestep that is not a finite number is refused (``InputError``), and the call
      changes nothing.

    The root hook runs outside any compiled graph and turns this into one boolean per call,
    ``replan``, which is all the merge sites read: a denoising loop then compiles to a few graph
    variants instead of one per step.

    Attributes:
        generation: increases at every new generation; cached plans from an older one are dropped.
        step: step index within the generation (0-based).
        call: root forward calls so far.
        timestep: the last timestep seen: its value, or its place in the schedule tensor it
            was taken from (``ScheduleStep``, known without reading the device); None at the
            start of a generation.
        cache_interval: plans are made at steps 0, k, 2k... of a generation (k = this).
        replan: whether sites make new plans at this call (else they reuse their cached plan
            when it fits the call's batch, tokens, device and dtype).
        shape: the shape of the generation's sample (None: not known).
        largest_drop: the largest fall of the timestep between two steps of the generation.
        epoch: the ``Handle.new_generation`` count this state has followed.
    """

    generation: int = 0
    step: int = 0
    call: int = 0
    timestep: float | ScheduleStep | None = None
    cache_interval: int = 1
    replan: bool = True
    shape: tuple[int, ...] | None = None
    largest_drop: float = 0.0
    epoch: int = 0
    #: weak references to the conditioning tensors of the generation (never kept alive here)
    conditionings: list[weakref.ref] = field(default_factory=list, repr=False)

    def begin_call(
        self,
        timestep: float | ScheduleStep | None,
        shape: tuple[int, ...] | None = None,
        conditioning: torch.Tensor | None = None,
    ) -> bool:
        """Record the start of a root forward call with this timestep (None if it has none), the
        shape of its sample and its conditioning tensor (None where unknown).

        Returns:
            True when the call starts a new generation.

        Raises:
            InputError: the timestep is NaN or infinite (nothing is recorded).

        Example:
            >>> state = StepState(cache_interval=2)
            >>> [state.begin_call(t) for t in (999.0, 979.0, 959.0, 600.0)]
            [True, False, False, True]
            >>> state.step, state.replan
            (0, True)
        """
        if isinstance(timestep, float) and not math.isfinite(timestep):
            raise InputError(
                f"timestep {timestep} is not a finite number; tokenmerge counts denoising steps "
                "by comparing timesteps (a lower one is the next step), which needs finite "
                "values. Pass the scheduler's timestep (check it and the inputs for NaN / inf), "
                "or remove the patch for this call"
            )
        self.call += 1
        started = (
            timestep is None
            or not self._follows(timestep)
            or _key(timestep) > _key(self.timestep)
            or (shape is not None and self.shape is not None and shape != self.shape)
            or self._new_conditioning(conditioning, timestep)
            or self._implausible_drop(timestep)
        )
        if started:
            self.new_generation()
        elif _key(timestep) < _key(self.timestep):
            self.largest_drop = max(self.largest_drop, _key(self.timestep) - _key(timestep))
            self.step += 1
            self.replan = self.step % self.cache_interval == 0
        # the same timestep again (the CFG halves run as two calls, a solver's correction): the
        # step's decision stands, so with cache_interval 1 every call plans on its own input,
        # as tomesd does
        self.timestep = timestep
        self.shape = shape
        self._remember(conditioning)
        return started

    def _follows(self, timestep: float | ScheduleStep) -> bool:
        """Whether ``timestep`` can be ordered against the last one: both numbers, or both
        places in one schedule tensor."""
        if isinstance(timestep, ScheduleStep):
            return timestep.same_schedule(self.timestep)
        return self.timestep is not None and not isinstance(self.timestep, ScheduleStep)

    def _new_conditioning(
        self, conditioning: torch.Tensor | None, timestep: float | ScheduleStep
    ) -> bool:
        """Whether ``conditioning`` is foreign to the generation: not seen in it, and not a
        further conditioning of the step under way (the other guidance half)."""
        if conditioning is None or any(ref() is conditioning for ref in self.conditionings):
            return False
        same_step = _key(timestep) == _key(self.timestep)
        return not (same_step and len(self.conditionings) < MAX_CONDITIONINGS)

    def _implausible_drop(self, timestep: float | ScheduleStep) -> bool:
        drop = _key(self.timestep) - _key(timestep)
        return self.largest_drop > 0 and drop > IMPLAUSIBLE_DROP * self.largest_drop

    def _remember(self, conditioning: torch.Tensor | None) -> None:
        if conditioning is not None and not any(r() is conditioning for r in self.conditionings):
            self.conditionings.append(weakref.ref(conditioning))

    def new_generation(self) -> None:
        """Start a new generation: step 0, every site plans afresh."""
        self.generation += 1
        self.step = 0
        self.timestep = None
        self.replan = True
        self.shape = None
        self.largest_drop = 0.0
        self.conditionings = []

    def __deepcopy__(self, memo: dict) -> StepState:
        # the weak references stay as they are: a copy goes on with the same conditioning and
        # in the same schedule (copy.copy goes through __getstate__, which drops both)
        clone = copy.copy(self)
        clone.conditionings = list(self.conditionings)
        clone.timestep = self.timestep
        return clone

    def __getstate__(self) -> dict[str, Any]:
        # weak references cannot be pickled: an unpickled model starts a generation at a
        # conditioning it has not seen (it plans afresh, which is always right)
        # (and a place in a schedule tensor cannot be pickled either: it starts one too)
        timestep = None if isinstance(self.timestep, ScheduleStep) else self.timestep
        return {**self.__dict__, "conditionings": [], "timestep": timestep}
