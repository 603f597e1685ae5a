"""Quantization methods. Importing a method module registers it: one line per method."""

from binq.methods import arb, arb_group, billm, gptq, msb, rtn, w11  # noqa: F401  (registration)
from binq.methods.registry import Method, available_methods, get_method, register

__all__ = ["Method", "available_methods", "get_method", "register"]
