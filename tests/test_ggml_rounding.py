"""binq's model with llama.cpp's activation rounding (binq.inference.ggml_rounding) against llama.cpp itself."""

from __future__ import annotations

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


def test_round_fp16() -> None:
    x = torch.tensor([1 + 2**-12, 1 + 3 * 2**-12, 70000.0])
    assert round_fp16(x).tolist() == [1.0, 1 + 2**-10, float("inf")]


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
