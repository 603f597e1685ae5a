"""Activation quantization: per-token INT4 as four binary planes (A(1x4)), smoothing, clipping, evaluation hooks."""

from binq.activations.calibrate import ActivationConfig, ActivationPlan, calibrate_activations
from binq.activations.hooks import ActivationSwap, quantized_activations
from binq.activations.int4 import (
    ActivationQuantizer,
    TokenCodes,
    activation_storage_bits,
    bit_planes,
    codes_from_planes,
    fake_quantize,
    quantize_per_token,
)

__all__ = [
    "ActivationConfig",
    "ActivationPlan",
    "ActivationQuantizer",
    "ActivationSwap",
    "TokenCodes",
    "activation_storage_bits",
    "bit_planes",
    "calibrate_activations",
    "codes_from_planes",
    "fake_quantize",
    "quantize_per_token",
    "quantized_activations",
]
