"""Modules that run quantized weights: :class:`BinaryLinear` and the kernel registry behind it."""

from binq.nn.binary_linear import BinaryLinear, quantized_weights, set_weight_cache
from binq.nn.kernels import Kernel, available_kernels, reference_only, register_kernel

__all__ = [
    "BinaryLinear",
    "Kernel",
    "available_kernels",
    "quantized_weights",
    "reference_only",
    "register_kernel",
    "set_weight_cache",
]
