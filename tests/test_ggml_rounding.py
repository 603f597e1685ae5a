"""binq's model with llama.cpp's activation rounding (binq.inference.ggml_rounding) against llama.cpp itself."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import binq
from binq.errors import BinqError
from binq.export.gguf import export_gguf
from binq.inference.ggml_rounding import linear_types, llama_cpp_rounding, round_fp16, round_q8_0
from binq.inference.llamacpp import llama_cpp_tensors, unavailable_reason
from test_gguf_export import saved_checkpoint

IDS = [5, 17, 40, 99, 120, 3, 60, 70, 11, 42, 64, 7]


def test_round_q8_0_by_hand() -> None:
    block = torch.zeros(32)
    block[:4] = torch.tensor([1.27, -0.5, 0.006, 0.004])
    # amax 1.27: d = fp16(0.01), q = round(x * 127 / 1.27) = round(100 x): 127, -50, 1, 0.
    d = float(np.float16(np.float32(1.27) / 127))
    expected = torch.zeros(32)
    expected[:3] = torch.tensor([127 * d, -50 * d, d])
    assert torch.equal(round_q8_0(block), expected)
    assert torch.equal(round_q8_0(torch.zeros(2, 64)), torch.zeros(2, 64))  # an all-zero block stays zero
    with pytest.raises(BinqError, match="multiple of 32"):
        round_q8_0(torch.zeros(48))


def test_round_q8_0_is_ggml_q8_0() -> None:
    """Away from exact ties (none in random data) it is gguf's own Q8_0 quantize-dequantize."""
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 16)[:, None]
    blocks = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(round_q8_0(x), torch.from_numpy(expected).reshape(x.shape))
    assert round_q8_0(x.double()).dtype == torch.float64


def ggml_cpu_function(name: str) -> ctypes._CFuncPtr:
    """A function of llama.cpp's CPU backend library (the one llama-cpp-python loads), initialised."""
    import llama_cpp

    library = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
    if not hasattr(library, name):
        pytest.skip(f"this llama-cpp-python's libggml-cpu does not export {name}")
    library.ggml_cpu_init()
    return getattr(library, name)


def ggml_quantize_row_q8_0(x: np.ndarray) -> np.ndarray:
    """llama.cpp's own CPU ``quantize_row_q8_0`` (the activation quantizer of its Q1_0-Q8_0 matmuls),
    its blocks dequantized: ``q * d``."""
    quantize = ggml_cpu_function("quantize_row_q8_0")
    quantize.argtypes, quantize.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    blocks = np.zeros((x.size // 32, 34), dtype=np.uint8)
    quantize(x.ctypes.data, blocks.ctypes.data, x.size)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (blocks[:, 2:].view(np.int8).astype(np.float32) * scales).ravel()


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_round_q8_0_is_llama_cpps_quantizer_bit_for_bit() -> None:
    """Ties included (half to even: 17.5 -> 18, 18.5 -> 18, 54.5 -> 54), and 1M random values over 6 decades."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=generator) * torch.logspace(-3, 3, 4096)[:, None]
    assert np.array_equal(round_q8_0(x).numpy().ravel(), ggml_quantize_row_q8_0(x.numpy()))
    ties = torch.zeros(32)
    ties[:7] = torch.tensor([127.0, 17.5, 18.5, -17.5, 54.5, 17.499998, 54.500008])
    assert round_q8_0(ties)[:7].tolist() == [127.0, 18.0, 18.0, -18.0, 54.0, 17.0, 55.0]
    assert np.array_equal(round_q8_0(ties).numpy(), ggml_quantize_row_q8_0(ties.numpy()))


def test_round_fp16() -> None:
    x = torch.tensor([1 + 2**-12, 1 + 3 * 2**-12, 70000.0])
    assert round_fp16(x).tolist() == [1.0, 1 + 2**-10, float("inf")]


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_round_fp16_is_llama_cpps_conversion_bit_for_bit() -> None:
    """``ggml_cpu_fp32_to_fp16``: what its matmuls apply to the activations of F16 weights."""
    convert = ggml_cpu_function("ggml_cpu_fp32_to_fp16")
    convert.argtypes, convert.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 16, generator=generator) * torch.logspace(-8, 5, 1 << 16)
    x[:3] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 70000.0])  # ties, and past fp16's range
    halves = np.zeros(x.numel(), dtype=np.float16)
    convert(x.numpy().ctypes.data, halves.ctypes.data, x.numel())
    assert np.array_equal(round_fp16(x).numpy(), halves.astype(np.float32))


def test_rounding_hooks_come_off(tmp_path: Path) -> None:
    saved_checkpoint(tmp_path / "ckpt", "rtn", bits=1, group_size=128)
    out = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    model = binq.load(tmp_path / "ckpt")
    types = linear_types(model, out)
    assert types["model.layers.0.mlp.down_proj"] == "Q1_0"
    assert types["lm_head"] == "F16"  # tied: llama.cpp multiplies by the F16 embedding
    ids = torch.tensor([IDS])
    with torch.no_grad():
        before = model(ids).logits
        with llama_cpp_rounding(model, types):
            rounded = model(ids).logits
        after = model(ids).logits
    assert torch.equal(before, after)
    assert not torch.equal(before, rounded)
    assert model.config._attn_implementation != "binq_ggml_rounded"


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_llama_cpp_q1_0_matmul_is_binq_with_q8_0_inputs(tmp_path: Path) -> None:
    """llama.cpp's Q1_0 matmul is binq's weight times the input rounded to Q8_0 blocks, to fp32 precision;
    binq's plain fp32 product is 1e-2 off (measured 2.0e-7 against 8.0e-3). Its F16 LM head: binq's with
    fp16 inputs (2.1e-7 against 2.0e-4). And the whole model (tiny, random, every linear Q1_0) with
    llama.cpp's roundings is llama.cpp's to 4e-6 of the largest logit, 1800 times closer than without.
    """
    saved_checkpoint(tmp_path / "ckpt", "rtn", bits=1, group_size=128)
    out = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    model = binq.load(tmp_path / "ckpt")
    types = linear_types(model, out)
    found, logits = llama_cpp_tensors(out, IDS, lambda name: name in ("ffn_swiglu-1", "ffn_out-1", "result_norm"))
    theirs = torch.from_numpy(logits)

    def relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
        return ((ours - reference).norm() / reference.norm()).item()

    down = model.get_submodule("model.layers.1.mlp.down_proj")
    x, y = torch.from_numpy(found["ffn_swiglu-1"]), torch.from_numpy(found["ffn_out-1"])
    head_input = torch.from_numpy(found["result_norm"])
    with torch.no_grad():
        assert relative(down(round_q8_0(x)), y) < 1e-6 < 1e-3 < relative(down(x), y)
        assert (
            relative(model.lm_head(round_fp16(head_input)), theirs)
            < 1e-6
            < 1e-5
            < relative(model.lm_head(head_input), theirs)
        )
        plain = model(torch.tensor([IDS])).logits[0]
        with llama_cpp_rounding(model, types):
            rounded = model(torch.tensor([IDS])).logits[0]
    error_plain = (plain - theirs).abs().max().item()
    error_rounded = (rounded - theirs).abs().max().item()
    # Measured: 3.2e-6 against 5.7e-3, the largest logit 0.8 (llama-cpp-python 0.3.36).
    assert error_rounded < 1e-4 * theirs.abs().max().item()
    assert error_rounded < error_plain / 100, (error_rounded, error_plain)
