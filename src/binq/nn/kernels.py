"""The registry of fast paths for :class:`~binq.nn.BinaryLinear`.

A kernel declares what it supports (``supports(module, x)``: a layout, a device, a dtype, a shape) and
computes ``y = x W^T + b`` without going through the dense weight. ``BinaryLinear.forward`` asks the
registered kernels in priority order and falls back to the pure-torch reference when none applies, so
adding a kernel never changes which checkpoints load, only how fast they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from binq.nn.binary_linear import BinaryLinear


class Kernel(Protocol):
    name: str
    priority: int  # higher is tried first

    def supports(self, module: BinaryLinear, x: torch.Tensor) -> bool: ...

    def forward(self, module: BinaryLinear, x: torch.Tensor) -> torch.Tensor: ...


_KERNELS: list[Kernel] = []


def register_kernel(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the registry (once per name)."""
    if any(k.name == kernel.name for k in _KERNELS):
        raise ValueError(f"kernel {kernel.name!r} registered twice")
    _KERNELS.append(kernel)
    _KERNELS.sort(key=lambda k: -k.priority)
    return kernel


def unregister_kernel(name: str) -> None:
    _KERNELS[:] = [k for k in _KERNELS if k.name != name]


def available_kernels() -> list[Kernel]:
    return list(_KERNELS)


def select_kernel(module: BinaryLinear, x: torch.Tensor) -> Kernel | None:
    """The first registered kernel that supports this call, or None (the reference path)."""
    for kernel in _KERNELS:
        if kernel.supports(module, x):
            return kernel
    return None
