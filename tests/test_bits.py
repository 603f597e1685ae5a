"""Tests for binq.bits: linear and whole-model bit accounting of a quantized tiny model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from binq.bits import summarize_bits, unquantized_bits
from binq.engine.calibrate import quantize_model
from binq.methods import get_method
from binq.models import get_architecture, parameter_inventory
from binq.quant.structured import QuantizedWeight


def quantize(model: nn.Module, ids: torch.Tensor, method_name: str, **options: object) -> dict[str, QuantizedWeight]:
    method = get_method(method_name)
    arch = get_architecture(model)
    return quantize_model(model, arch, ids, method, method.make_config(**options), progress=False).weights


def packed_bits(weight: QuantizedWeight) -> int:
    """Bits of every packed tensor, counted here from the tensors themselves."""
    return sum(t.numel() * t.element_size() * 8 for t in weight.packed_tensors().values())


@pytest.mark.parametrize(
    ("method_name", "options"),
    [("gptq", {"bits": 4, "group_size": 32}), ("billm", {}), ("rtn", {"bits": 1})],
)
def test_linear_storage_bits_are_the_packed_bits(
    method_name: str,
    options: dict,
    make_tiny_model: Callable[..., nn.Module],
    make_ids: Callable[..., torch.Tensor],
) -> None:
    model = make_tiny_model("llama")
    weights = quantize(model, make_ids(2, 32), method_name, **options)
    inventory = parameter_inventory(model, get_architecture(model))
    bits = summarize_bits(inventory, weights, 16)

    params = sum(w.numel for w in weights.values())
    assert params == sum(r.numel for r in inventory if r.quantizable)
    storage = sum(packed_bits(w) for w in weights.values())
    assert bits.linear.parameters == params
    assert bits.linear.storage_bits == pytest.approx(storage / params, rel=1e-12)
    assert bits.linear.storage_bytes == pytest.approx(storage / 8)
    compute = sum(w.compute_bits * w.numel for w in weights.values()) / params
    assert bits.linear.compute_bits == pytest.approx(compute, rel=1e-12)
    assert bits.linear.storage_bits > bits.linear.compute_bits
    if method_name == "gptq":
        # 4-bit codes, plus per row and group of 32 one fp16 scale and one 4-bit zero point
        assert bits.linear.compute_bits == 4.0
        assert bits.linear.storage_bits == pytest.approx(4 + (16 + 4) / 32, rel=1e-12)
    if method_name == "rtn":
        # a sign per weight and one fp16 scale per row (rows of 64 or 128 columns)
        rows_64 = sum(w.shape[0] for w in weights.values() if w.shape[1] == 64)
        rows_128 = sum(w.shape[0] for w in weights.values() if w.shape[1] == 128)
        assert storage == params + 16 * (rows_64 + rows_128)


def test_whole_model_counts_tied_embedding_once_and_other_params_at_given_bits(
    make_tiny_model: Callable[..., nn.Module], make_ids: Callable[..., torch.Tensor]
) -> None:
    tied = make_tiny_model("llama", tie_word_embeddings=True)
    tied.tie_weights()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = make_tiny_model("llama", tie_word_embeddings=False)
    assert tied.lm_head.weight is not untied.model.embed_tokens.weight
    ids = make_ids(2, 32)
    summaries = {}
    for label, model in (("tied", tied), ("untied", untied)):
        weights = quantize(model, ids, "gptq", bits=4, group_size=32)
        inventory = parameter_inventory(model, get_architecture(model))
        unique = sum(p.numel() for p in model.parameters())  # PyTorch yields a tied tensor once
        linear_params = sum(w.numel for w in weights.values())
        linear_storage = sum(packed_bits(w) for w in weights.values())
        for other_bits in (16, 32):
            bits = summarize_bits(inventory, weights, other_bits)
            other = unique - linear_params
            assert bits.model.parameters == unique
            assert bits.other_parameters_bits == other_bits
            assert bits.model.storage_bits == pytest.approx((linear_storage + other * other_bits) / unique)
            assert bits.model.storage_bytes == pytest.approx((linear_storage + other * other_bits) / 8)
            assert bits.model.compute_bits == pytest.approx((4 * linear_params + other * other_bits) / unique)
            assert bits.to_dict()["model"]["parameters"] == unique
            summaries[label, other_bits] = bits
    hidden, vocab = tied.config.hidden_size, tied.config.vocab_size
    every_name = sum(p.numel() for _, p in tied.named_parameters(remove_duplicate=False))
    assert summaries["tied", 16].model.parameters == every_name - vocab * hidden  # the head is not counted twice
    assert summaries["untied", 16].model.parameters - summaries["tied", 16].model.parameters == vocab * hidden
    assert summaries["untied", 16].linear == summaries["tied", 16].linear  # same blocks, same seed
    assert summaries["tied", 16].model.storage_bits < summaries["tied", 32].model.storage_bits


def test_biases_are_not_quantized_parameters(
    make_tiny_model: Callable[..., nn.Module], make_ids: Callable[..., torch.Tensor]
) -> None:
    model = make_tiny_model("qwen2")  # q/k/v carry a bias
    weights = quantize(model, make_ids(2, 32), "rtn", bits=2, group_size=32)
    inventory = parameter_inventory(model, get_architecture(model))
    bits = summarize_bits(inventory, weights, 16)
    linear_weights = sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("_proj.weight") and ".layers." in n
    )
    assert bits.linear.parameters == linear_weights
    assert bits.model.parameters == sum(p.numel() for p in model.parameters())


def test_unquantized_bits(make_tiny_model: Callable[..., nn.Module]) -> None:
    model = make_tiny_model("llama", tie_word_embeddings=True)
    inventory = parameter_inventory(model, get_architecture(model))
    bits = unquantized_bits(inventory, 16)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(r.numel for r in inventory if r.quantizable)
    assert (bits.model.parameters, bits.linear.parameters) == (total, linear)
    assert bits.model.storage_bits == bits.model.compute_bits == bits.linear.storage_bits == 16.0
    assert bits.model.storage_bytes == total * 2
    # nothing quantized: summarize_bits agrees on the whole model
    nothing = summarize_bits(inventory, {}, 16)
    assert nothing.linear.parameters == 0 and nothing.linear.storage_bits == 0.0
    assert nothing.model.parameters == total and nothing.model.storage_bits == 16.0
