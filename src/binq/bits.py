"""Model-level bit accounting: the linear layers, and the whole model with everything else it stores.

Two figures side by side, never one for the other:

- compute bits: the papers' convention per quantized weight (BiLLM's 1 + salient fraction, GPTQ's
  grid width), averaged over the linear layers by parameter count;
- storage bits: every stored bit of the packed tensors, divided by the parameter count.

For the whole model, parameters that are not quantized (embeddings, LM head, norms, biases) count at
the precision the checkpoint stores them in; tied tensors count once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from binq.models.accounting import ParameterRecord
from binq.quant.structured import QuantizedWeight

_WEIGHT_SUFFIX = ".weight"


@dataclass
class BitSummary:
    parameters: int
    compute_bits: float
    storage_bits: float
    storage_bytes: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelBits:
    linear: BitSummary
    model: BitSummary
    other_parameters_bits: int  # precision at which unquantized parameters are counted

    def to_dict(self) -> dict:
        return {
            "linear": self.linear.to_dict(),
            "model": self.model.to_dict(),
            "other_parameters_bits": self.other_parameters_bits,
        }


def summarize_bits(
    inventory: list[ParameterRecord], weights: dict[str, QuantizedWeight], other_parameters_bits: int
) -> ModelBits:
    """Bits of the quantized linears (``weights`` by module name) and of the whole model."""
    linear_params = sum(w.numel for w in weights.values())
    linear_storage = sum(w.storage_bits_total for w in weights.values())
    linear_compute = sum(w.compute_bits * w.numel for w in weights.values())
    other_params = 0
    for record in inventory:
        names = (record.name, *record.aliases)
        quantized = any(n.endswith(_WEIGHT_SUFFIX) and n[: -len(_WEIGHT_SUFFIX)] in weights for n in names)
        if not quantized:
            other_params += record.numel
    total = linear_params + other_params
    other_bits_total = other_params * other_parameters_bits
    linear = BitSummary(
        parameters=linear_params,
        compute_bits=linear_compute / linear_params if linear_params else 0.0,
        storage_bits=linear_storage / linear_params if linear_params else 0.0,
        storage_bytes=linear_storage / 8,
    )
    model = BitSummary(
        parameters=total,
        compute_bits=(linear_compute + other_bits_total) / total,
        storage_bits=(linear_storage + other_bits_total) / total,
        storage_bytes=(linear_storage + other_bits_total) / 8,
    )
    return ModelBits(linear=linear, model=model, other_parameters_bits=other_parameters_bits)


def unquantized_bits(inventory: list[ParameterRecord], bits: int) -> ModelBits:
    """The original model's figures: every parameter at ``bits``."""
    linear_params = sum(r.numel for r in inventory if r.quantizable)
    total = sum(r.numel for r in inventory)
    return ModelBits(
        linear=BitSummary(linear_params, float(bits), float(bits), linear_params * bits / 8),
        model=BitSummary(total, float(bits), float(bits), total * bits / 8),
        other_parameters_bits=bits,
    )
