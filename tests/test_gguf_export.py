"""Tests for the Q1_0 packer (against a block computed by hand) and the GGUF export of checkpoints."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from binq.checkpoint import save_checkpoint
from binq.cli import main
from binq.engine.calibrate import quantize_model
from binq.errors import BinqError
from binq.export.gguf import export_gguf, rope_row_order
from binq.export.q1_0 import Q1_0_BLOCK_BYTES, QK1_0, dequantize_q1_0, pack_q1_0, q1_0_form_problem, q1_0_rows
from binq.methods import get_method
from binq.methods.rtn import sign_binarize
from binq.models import get_architecture
from conftest import build_tiny_model, build_tiny_tokenizer, random_ids

# Every linear of this llama is a multiple of 128 wide: all of them fit Q1_0.
WIDE = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}


def test_q1_0_block_by_hand() -> None:
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q1_0] == (QK1_0, Q1_0_BLOCK_BYTES)
    signs = torch.zeros(2, 128, dtype=torch.bool)
    signs[0, [0, 2, 9, 127]] = True  # +d at weights 0, 2, 9 and 127 of row 0, -d elsewhere
    signs[1, :8] = True  # row 1: the first byte all ones
    scales = torch.tensor([[0.5], [-2.0]], dtype=torch.float16)
    # d = 0.5 is fp16 0x3800, stored little-endian; bit j%8 of byte j//8, least significant first.
    row0 = bytes([0x00, 0x38, 0b0000_0101, 0b0000_0010] + [0] * 13 + [0b1000_0000])
    row1 = bytes([0x00, 0xC0, 0xFF] + [0] * 15)  # -2.0 is fp16 0xC000
    packed = pack_q1_0(signs, scales)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 18)
    assert bytes(packed[0].tolist()) == row0
    assert bytes(packed[1].tolist()) == row1
    values = dequantize_q1_0(packed, 128)
    assert values[0, 0] == 0.5 and values[0, 1] == -0.5 and values[0, 127] == 0.5
    assert values[1, 0] == -2.0 and values[1, 8] == 2.0


def test_q1_0_rows_are_exact_for_rtn_g128() -> None:
    weight = sign_binarize(torch.randn(5, 384), group_size=128, centred=False)
    assert q1_0_form_problem(weight) is None
    data = q1_0_rows(weight)
    assert data.shape == (5, 3 * 18)
    assert torch.equal(dequantize_q1_0(data, 384), weight.dequantize())


def test_q1_0_form_problems() -> None:
    assert "per-group means" in q1_0_form_problem(sign_binarize(torch.randn(4, 256), 128, centred=True))
    assert "64 wide" in q1_0_form_problem(sign_binarize(torch.randn(4, 256), 64, centred=False))


def test_rope_row_order() -> None:
    # Per head of 4 rows, HF's halves [x0 x1 | y0 y1] become llama.cpp's pairs [x0 y0 x1 y1].
    assert rope_row_order(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def saved_checkpoint(folder: Path, method: str, **options: object) -> dict:
    model = build_tiny_model("llama", **WIDE) if options.pop("wide", True) else build_tiny_model("llama")
    spec = get_method(method)
    config = spec.make_config(**options)
    result = quantize_model(model, get_architecture(model), random_ids(4, 16), spec, config, progress=False)
    save_checkpoint(model, result.weights, folder, tokenizer=build_tiny_tokenizer(), method=method, dtype=torch.float16)
    return result.weights


def gguf_tensor(reader: gguf.GGUFReader, name: str) -> gguf.ReaderTensor:
    return next(t for t in reader.tensors if t.name == name)


def test_export_q1_0_model(tmp_path: Path) -> None:
    weights = saved_checkpoint(tmp_path / "ckpt", "rtn", bits=1, group_size=128)
    out = export_gguf(tmp_path / "ckpt", tmp_path / "model.gguf")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.embedding_length"].contents() == 128
    assert reader.fields["tokenizer.ggml.tokens"].contents()[4] == "w0"
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    names = {t.name: t.tensor_type for t in reader.tensors}
    for block in range(2):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert names[f"blk.{block}.{part}.weight"] == gguf.GGMLQuantizationType.Q1_0
    assert names["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert names["token_embd.weight"] == gguf.GGMLQuantizationType.F16

    down = gguf_tensor(reader, "blk.1.ffn_down.weight")
    stored = torch.from_numpy(np.array(down.data)).reshape(128, -1)
    assert torch.equal(dequantize_q1_0(stored, 256), weights["model.layers.1.mlp.down_proj"].dequantize())
    q = gguf_tensor(reader, "blk.0.attn_q.weight")
    stored = torch.from_numpy(np.array(q.data)).reshape(128, -1)
    hf_q = weights["model.layers.0.self_attn.q_proj"].dequantize()
    assert torch.equal(dequantize_q1_0(stored, 128), hf_q[rope_row_order(128, 4)])  # rows permuted, bits intact


def test_export_f16_fallback_for_narrow_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """64-wide inputs cannot be Q1_0 blocks: those linears go out as F16, exactly."""
    weights = saved_checkpoint(tmp_path / "ckpt", "rtn", bits=1, group_size=128, wide=False)
    assert main(["export", str(tmp_path / "ckpt"), "--gguf", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_v.weight"] == gguf.GGMLQuantizationType.F16
    # down_proj reads the 128-wide MLP activations: Q1_0, as SmolLM2's down_proj (its other linears are 576 wide).
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q1_0
    values = torch.from_numpy(np.array(gguf_tensor(reader, "blk.0.attn_v.weight").data)).float()
    assert torch.equal(values, weights["model.layers.0.self_attn.v_proj"].dequantize())


@pytest.mark.parametrize(
    ("method", "options", "reason"),
    [("billm", {}, "group bitmap"), ("rtn", {"centred": True, "group_size": 128}, "means")],
)
def test_export_refuses_what_q1_0_cannot_hold(tmp_path: Path, method: str, options: dict, reason: str) -> None:
    saved_checkpoint(tmp_path / "ckpt", method, **options)
    with pytest.raises(BinqError) as error:
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    message = str(error.value)
    assert f"cannot export {method} to GGUF Q1_0" in message and reason in message
    assert "--method rtn --bits 1 --group-size 128" in message and "bitmap-free per-group ARB variant" in message
    assert not (tmp_path / "m.gguf").exists()


def test_export_gemma3_with_metadata_like(tmp_path: Path) -> None:
    """gemma3: metadata copied from a GGUF of the model, norms written as llama.cpp's w (HF stores w - 1)."""
    model = build_tiny_model("gemma3_text", **WIDE)
    spec = get_method("rtn")
    result = quantize_model(
        model, get_architecture(model), random_ids(4, 16), spec, spec.make_config(group_size=128), progress=False
    )
    save_checkpoint(model, result.weights, tmp_path / "ckpt", tokenizer=build_tiny_tokenizer(), method="rtn")
    with pytest.raises(BinqError, match="needs --like"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")

    like = gguf.GGUFWriter(str(tmp_path / "like.gguf"), "gemma3")
    like.add_block_count(2)
    like.add_file_type(15)
    like.add_tokenizer_model("llama")
    like.add_token_list(["<pad>", "<eos>", "<bos>"])
    like.write_header_to_file()
    like.write_kv_data_to_file()
    like.write_tensors_to_file()
    like.close()

    reader = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", like=tmp_path / "like.gguf"))
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["gemma3.block_count"].contents() == 2
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["<pad>", "<eos>", "<bos>"]
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q1_0
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.attn_q.weight"] == gguf.GGMLQuantizationType.Q1_0
    norm = torch.from_numpy(np.array(gguf_tensor(reader, "blk.0.post_ffw_norm.weight").data))
    assert torch.equal(norm, model.model.layers[0].post_feedforward_layernorm.weight.detach() + 1)
    q = torch.from_numpy(np.array(gguf_tensor(reader, "blk.0.attn_q.weight").data)).reshape(128, -1)
    # gemma3 uses NeoX rotary in llama.cpp: no row permutation.
    assert torch.equal(dequantize_q1_0(q, 128), result.weights["model.layers.0.self_attn.q_proj"].dequantize())
