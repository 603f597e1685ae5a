"""Shared quantization maths: structured weights, packing, the binarizer, searches, Hessian factors, sweeps."""

from binq.quant.structured import BinaryWeight, QuantizedWeight, UniformWeight

__all__ = ["BinaryWeight", "QuantizedWeight", "UniformWeight"]
