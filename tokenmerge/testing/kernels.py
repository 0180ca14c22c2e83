"""``count_kernels``: the kernels a call queues and the host syncs it makes, countable on a CPU.

An eager forward on a GPU is launch-bound at the sizes people run: its time follows the number
of kernels the host queues, and every device-to-host read (``.item()``, ``.tolist()``,
``nonzero``, a Python ``if`` on a tensor) stops the queue until the device catches up. Both are
properties of the code, not of the device, so they are counted here by watching the ATen ops
dispatched on any device - deterministic numbers that tests may assert, unlike timings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KernelCount", "SYNC_OPS", "count_kernels"]

#: ATen ops that read a device value back to the host (or, like ``nonzero``, size their output
#: by one), so the host waits for the device at each of them
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), .tolist(), int(t), bool(t), if t: ...
        "item",
        "is_nonzero",
        "equal",
        "nonzero",
        "nonzero_static_fallback",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "repeat_interleave",  # without output_size its output length is read from the device
        "_assert_async",
    }
)


@dataclass
class KernelCount:
    """What a call dispatched.

    Attributes:
        kernels: ops that launch work (every dispatched ATen op that is not a view).
        syncs: the host-syncing ops, in order (empty when the call never waits on the device).
        ops: kernels by op name.
    """

    kernels: int = 0
    syncs: list[str] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)


class _Counting(TorchDispatchMode):
    def __init__(self, count: KernelCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.count.syncs.append(name)
        if not func.is_view:
            self.count.kernels += 1
            self.count.ops[name] += 1
        return func(*args, **(kwargs or {}))


#: tensor methods that read a tensor's data to the host without an ATen op on a CPU tensor
_HOST_READS = ("tolist", "numpy", "__array__")


@contextmanager
def _reads_counted(count: KernelCount) -> Iterator[None]:
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counted(name: str) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            count.syncs.append(name)
            return originals[name](self, *args, **kwargs)

        return read

    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def count_kernels(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, KernelCount]:
    """Run ``fn(*args, **kwargs)`` and count the kernels and host syncs it dispatched.

    Counted below autograd, on any device: a CPU run counts what a GPU run would queue (the
    same ATen ops; a fused attention is one op either way). Ops dispatched by code that is not
    traced through ATen (a compiled graph's generated kernels) are not seen. Host reads count as
    syncs on every device, CPU tensors' ``tolist`` and ``numpy`` included (on a GPU they would
    wait for it). Not thread-safe: those two methods are wrapped while ``fn`` runs.

    Returns:
        ``fn``'s result and the ``KernelCount``.

    Example:
        >>> import torch
        >>> x = torch.ones(4)
        >>> _, count = count_kernels(lambda: (x * 2).sum().item())
        >>> count.kernels, count.syncs
        (3, ['_local_scalar_dense'])
    """
    count = KernelCount()
    with _reads_counted(count), _Counting(count):
        result = fn(*args, **kwargs)
    return result, count
