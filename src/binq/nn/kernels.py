"""The registry of fast paths for :class:`~binq.nn.BinaryLinear`.

A kernel declares what it supports (``supports(module, x)``: a layout, a device, a dtype, a shape) and
computes ``y = x W^T + b`` without going through the dense weight. ``BinaryLinear.forward`` asks the
registered kernels in priority order and falls back to the pure-torch reference when none applies, so
adding a kernel never changes which checkpoints load, only how fast they run.

The built-in kernels live in the modules named by ``BUILTIN_KERNEL_MODULES``; each exposes a list
``KERNELS`` and is imported on first use of the registry. Their heavy toolchains (numba, Triton) are
imported lazily by the kernels themselves: a missing one means the reference path, with one warning.
``reference_only()`` turns every kernel off for a while (comparisons against the reference path).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
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
BUILTIN_KERNEL_MODULES = ("binq.nn.cpu_kernels", "binq.nn.bitplane_kernel", "binq.nn.triton_kernels")
_builtins_loaded = False
_enabled = True


def _load_builtin_kernels() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module_name in BUILTIN_KERNEL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:  # that kernel family is not part of this build
                continue
            raise
        for kernel in module.KERNELS:
            if not any(k.name == kernel.name for k in _KERNELS):
                register_kernel(kernel)


@contextmanager
def reference_only() -> Iterator[None]:
    """Within the block, every ``BinaryLinear`` runs the reference path (dequantize, ``F.linear``)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


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
    _load_builtin_kernels()
    return list(_KERNELS)


def select_kernel(module: BinaryLinear, x: torch.Tensor) -> Kernel | None:
    """The first registered kernel that supports this call, or None (the reference path)."""
    if not _enabled:
        return None
    _load_builtin_kernels()
    for kernel in _KERNELS:
        if kernel.supports(module, x):
            return kernel
    return None
