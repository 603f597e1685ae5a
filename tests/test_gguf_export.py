"""Tests for the Q1_0 and 32-weight block packers (blocks computed by hand, gguf's dequantizer as the
reference), the choice of an exact type for uniform grids, and the GGUF export of checkpoints: every
architecture read back with gguf's reader and, where llama-cpp-python is installed, run by llama.cpp."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import binq
from binq.checkpoint import save_checkpoint
from binq.cli import main
from binq.engine.calibrate import quantize_model
from binq.errors import BinqError
from binq.export.ggml_blocks import BLOCK_TYPES, BlockType, pack_q4_0, pack_q5_0, pack_q8_0
from binq.export.gguf import export_gguf, rope_row_order
from binq.export.q1_0 import Q1_0_BLOCK_BYTES, QK1_0, dequantize_q1_0, pack_q1_0, q1_0_form_problem, q1_0_rows
from binq.export.uniform import uniform_tensor
from binq.inference.llamacpp import unavailable_reason
from binq.methods import get_method
from binq.methods.rtn import sign_binarize
from binq.models import get_architecture
from binq.quant.structured import UniformWeight
from conftest import VOCAB, build_tiny_model, build_tiny_tokenizer, random_ids, word_text
from test_models import write_tiny_gguf

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


SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def byte_level_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's kind) trained on the tiny words, ``VOCAB`` tokens, the specials first."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIALS.values()), show_progress=False)
    backend.train_from_iterator([word_text(400, seed) for seed in range(10)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIALS)


def sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """BPE with byte fallback and "▁" for spaces, the kind of Gemma's tokenizer.json. Its merges make "23"
    before "12", so "w123" is ``▁w 1 23`` by merge rank but ``▁w 12 3`` left to right."""
    pieces = [*SPECIALS.values(), "▁", "w", *"0123456789"]
    merges = [("2", "3"), ("▁", "w"), ("1", "2")]
    vocab = {piece: index for index, piece in enumerate(pieces + [a + b for a, b in merges])}
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIALS)


def saved_checkpoint(folder: Path, method: str, **options: object) -> dict:
    model = build_tiny_model("llama", **WIDE) if options.pop("wide", True) else build_tiny_model("llama")
    spec = get_method(method)
    config = spec.make_config(**options)
    result = quantize_model(model, get_architecture(model), random_ids(4, 16), spec, config, progress=False)
    tokenizer = byte_level_bpe_tokenizer()
    save_checkpoint(model, result.weights, folder, tokenizer=tokenizer, method=method, dtype=torch.float16)
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
    assert reader.fields["tokenizer.ggml.tokens"].contents() == byte_level_bpe_tokenizer().convert_ids_to_tokens(
        list(range(VOCAB))
    )
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
    # Most weights are F16 here, but the file type names the block type, as llama.cpp's converter does.
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q1_0
    values = torch.from_numpy(np.array(gguf_tensor(reader, "blk.0.attn_v.weight").data)).float()
    assert torch.equal(values, weights["model.layers.0.self_attn.v_proj"].dequantize())


def saved_unquantized(folder: Path, dtype: torch.dtype = torch.float16, **overrides: object) -> torch.nn.Module:
    """A tiny llama saved as a plain Hugging Face folder (no binq quantization_config)."""
    model = build_tiny_model("llama", **(WIDE | overrides)).to(dtype)
    model.save_pretrained(folder)
    byte_level_bpe_tokenizer().save_pretrained(folder)
    return model


@pytest.mark.parametrize(("dtype", "ggml_type"), [(torch.float16, "F16"), (torch.float32, "F32")])
def test_export_unquantized_folder_as_stored(tmp_path: Path, dtype: torch.dtype, ggml_type: str) -> None:
    """An unquantized folder: every linear as stored, bit for bit, q/k rows in llama.cpp's rotary order."""
    model = saved_unquantized(tmp_path / "plain", dtype)
    assert main(["export", str(tmp_path / "plain"), "--gguf", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == torch.float16 else gguf.LlamaFileType.ALL_F32
    assert reader.fields["general.file_type"].contents() == file_type
    hf = dict(model.state_dict())
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj"}
    parts |= {"attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"}
    parts["ffn_down"] = "mlp.down_proj"
    heads = {"attn_q": 4, "attn_k": 2}
    for block in range(2):
        for part, module in parts.items():
            tensor = gguf_tensor(reader, f"blk.{block}.{part}.weight")
            assert tensor.tensor_type.name == ggml_type
            expected = hf[f"model.layers.{block}.{module}.weight"]
            if part in heads:
                expected = expected[rope_row_order(expected.shape[0], heads[part])]
            assert torch.equal(torch.from_numpy(np.array(tensor.data)), expected)
    assert gguf_tensor(reader, "blk.0.attn_norm.weight").tensor_type == gguf.GGMLQuantizationType.F32


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


Q = gguf.GGMLQuantizationType


def as_bits(values: torch.Tensor) -> torch.Tensor:
    """fp32 values as their bit patterns: equal means bit for bit (-0.0 is not +0.0)."""
    return values.float().contiguous().view(torch.int32)


def gguf_values(data: torch.Tensor, ggml_type: gguf.GGMLQuantizationType) -> torch.Tensor:
    """gguf's own dequantization (the independent reference) of a tensor's stored data, as fp32."""
    if ggml_type in (Q.F16, Q.F32):
        return data.float()
    return torch.from_numpy(gguf.quants.dequantize(data.contiguous().numpy(), ggml_type)).reshape(data.shape[0], -1)


@pytest.mark.parametrize("block", BLOCK_TYPES, ids=lambda block: block.name)
def test_block_sizes_are_ggml_s(block: BlockType) -> None:
    assert gguf.GGML_QUANT_SIZES[block.ggml_type] == (32, block.block_bytes)


def test_q4_0_block_by_hand() -> None:
    """The first 16 weights in the low nibbles, the last 16 in the high ones, each stored as x + 8."""
    x = torch.cat([torch.arange(-8, 8), torch.arange(7, -9, -1)]).reshape(1, 32)
    packed = pack_q4_0(x, torch.tensor([[1.0]], dtype=torch.float16))
    # d = 1.0 is fp16 0x3C00, little-endian; byte k = (x[k] + 8) | (x[k + 16] + 8) << 4 = k | (15 - k) << 4.
    assert bytes(packed[0].tolist()) == bytes([0x00, 0x3C] + [k | (15 - k) << 4 for k in range(16)])
    assert torch.equal(gguf_values(packed, Q.Q4_0), x.float())


def test_q5_0_and_q8_0_blocks_by_hand() -> None:
    x = torch.full((1, 32), -16)
    x[0, 1], x[0, 30] = 0, 15  # stored 16 and 31: bit 4 set at weights 1 and 30
    packed = pack_q5_0(x, torch.tensor([[-2.0]], dtype=torch.float16))
    qs = [0] * 16
    qs[14] = 0xF0  # weight 30 = 14 + 16: the high nibble of byte 14; weight 1's low four bits are 0
    assert bytes(packed[0].tolist()) == bytes([0x00, 0xC0, 0x02, 0x00, 0x00, 0x40, *qs])
    assert torch.equal(gguf_values(packed, Q.Q5_0), x.float() * -2)
    x8 = torch.arange(-128, 128, 8).reshape(1, 32)
    packed = pack_q8_0(x8, torch.tensor([[0.5]], dtype=torch.float16))
    assert bytes(packed[0, 2:].tolist()) == bytes((v & 0xFF) for v in x8[0].tolist())


@pytest.mark.parametrize("block", BLOCK_TYPES, ids=lambda block: block.name)
def test_block_packers_against_gguf_dequantize(block: BlockType) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(block.lowest, block.highest + 1, (6, 96), generator=generator)
    x[:, 0], x[:, 33] = block.lowest, block.highest  # the edge integers in every row
    d = (torch.randn(6, 3, generator=generator) * 4).half()
    d[0, 0], d[1, 1], d[2, 2] = 6e-6, 60000.0, -0.0  # a subnormal, a near-maximal and a signed-zero scale
    m = (torch.randn(6, 3, generator=generator)).half() if block.has_min else None
    packed = block.pack(x, d, m)
    assert packed.shape == (6, 3 * block.block_bytes) and packed.dtype == torch.uint8
    mine = block.values(x.float().reshape(6, 3, 32), d.unsqueeze(-1), None if m is None else m.unsqueeze(-1))
    assert torch.equal(as_bits(gguf_values(packed, block.ggml_type)), as_bits(mine.reshape(6, 96)))


def uniform_weight(bits: int, zeros: str | None, cols: int = 128, group_size: int = 32, seed: int = 0) -> UniformWeight:
    """Random codes with both edge codes in every group; positive fp16 scales; zero points as named:
    ``random`` (0..2**bits-1), ``pow2`` (0 and powers of two, so -zero * scale is an fp16 number),
    ``mid`` (all 2**(bits-1)), or None (symmetric)."""
    generator = torch.Generator().manual_seed(seed)
    rows, groups, top = 8, -(-cols // group_size), 2**bits - 1
    codes = torch.randint(0, top + 1, (rows, cols), generator=generator)
    codes[:, ::group_size], codes[:, 1::group_size] = 0, top
    scales = (torch.rand(rows, groups, generator=generator) * 0.05 + 1e-3).half()
    zero_points = None
    if zeros == "random":
        zero_points = torch.randint(0, top + 1, (rows, groups), generator=generator)
    elif zeros == "pow2":
        choices = torch.tensor([0] + [2**k for k in range(bits)])
        zero_points = choices[torch.randint(0, len(choices), (rows, groups), generator=generator)]
    elif zeros == "mid":
        zero_points = torch.full((rows, groups), 2 ** (bits - 1))
    return UniformWeight(
        codes=codes.to(torch.uint8),
        scales=scales,
        bits=bits,
        group_size=group_size,
        zeros=None if zero_points is None else zero_points.to(torch.uint8),
    )


@pytest.mark.parametrize(
    ("bits", "zeros", "group_size", "expected", "own"),
    [
        (4, None, 32, Q.Q4_0, True),
        (5, None, 32, Q.Q5_0, True),
        (8, None, 32, Q.Q8_0, True),
        (4, None, 128, Q.Q4_0, True),  # a group of 128 is four blocks with the same d
        (2, None, 32, Q.Q4_0, False),
        (3, None, 64, Q.Q4_0, False),
        (6, None, 32, Q.Q8_0, False),
        (7, None, 32, Q.Q8_0, False),
        (4, "pow2", 32, Q.Q4_1, True),  # -zero * scale is an fp16 number in every grid
        (4, "random", 32, Q.Q5_0, False),  # it is not in some: x = code - zero fits Q5_0's -16..15
        (4, "mid", 32, Q.Q4_0, False),  # zero 8 everywhere: code - zero fits Q4_0, two bytes smaller
        (5, "pow2", 64, Q.Q5_1, True),
        (5, "random", 32, Q.Q8_0, False),
        (1, "random", 32, Q.Q4_0, False),
        (3, "random", 32, Q.Q4_0, False),
        (7, "random", 32, Q.Q8_0, False),
        (8, "mid", 32, Q.Q8_0, False),
        (8, "random", 32, Q.F32, False),  # code - zero exceeds int8, scale * (code - zero) exceeds fp16
    ],
)
def test_uniform_grids_get_the_smallest_exact_type(
    bits: int, zeros: str | None, group_size: int, expected: gguf.GGMLQuantizationType, own: bool
) -> None:
    weight = uniform_weight(bits, zeros, group_size=group_size)
    tensor = uniform_tensor(weight)
    assert tensor.ggml_type == expected, tensor.note
    assert (tensor.note is None) == own
    assert torch.equal(as_bits(gguf_values(tensor.data, tensor.ggml_type)), as_bits(weight.dequantize()))


def test_asymmetric_fallback_says_why() -> None:
    tensor = uniform_tensor(uniform_weight(4, "random"))
    assert tensor.note == (
        "Q4_1 does not hold it exactly: some (row, group) grids would come out differently "
        "(m = -zero*scale is not an fp16 number); Q5_0 is the smallest type that does"
    )
    assert uniform_tensor(uniform_weight(8, "random")).note == (
        "Q8_0 does not hold it exactly: codes minus zero points exceed its -128..127, "
        "and not all its values are fp16 numbers: F32"
    )


def test_uniform_without_blocks_of_32_goes_dense_and_exact() -> None:
    ragged = uniform_weight(4, None, cols=80, group_size=16)  # neither the width nor the groups fit
    tensor = uniform_tensor(ragged)
    assert tensor.ggml_type in (Q.F16, Q.F32) and tensor.note.startswith("its rows are 80 wide, not a multiple of 32")
    assert torch.equal(as_bits(tensor.data), as_bits(ragged.dequantize()))
    narrow = uniform_weight(4, None, cols=64, group_size=16)
    assert uniform_tensor(narrow).note.startswith("groups of 16 columns do not cover whole blocks of 32")
    # Power-of-two scales: every value scale * (code - 8) is an fp16 number, so F16 holds it.
    exact = UniformWeight(
        codes=ragged.codes, scales=torch.full_like(ragged.scales, 2**-7), bits=4, group_size=16, zeros=None
    )
    tensor = uniform_tensor(exact)
    assert tensor.ggml_type == Q.F16 and tensor.note.endswith("F16 holds its values exactly")
    assert torch.equal(as_bits(tensor.data), as_bits(exact.dequantize()))


def test_act_order_groups() -> None:
    base = uniform_weight(4, None, cols=128)
    shuffled = torch.randperm(128, generator=torch.Generator().manual_seed(0)) // 32
    act_order = UniformWeight(
        codes=base.codes, scales=base.scales, bits=4, group_size=32, zeros=None, group_index=shuffled
    )
    tensor = uniform_tensor(act_order)
    assert tensor.ggml_type in (Q.F16, Q.F32)
    assert tensor.note.startswith("act-order groups are not runs of 32 columns (quantize without --act-order")
    assert torch.equal(as_bits(tensor.data), as_bits(act_order.dequantize()))
    # A group index that is the plain one (GPTQ's --act-order --static-groups) is Q4_0 as without it.
    plain = UniformWeight(
        codes=base.codes, scales=base.scales, bits=4, group_size=32, zeros=None, group_index=torch.arange(128) // 32
    )
    assert uniform_tensor(plain).ggml_type == Q.Q4_0
    assert torch.equal(uniform_tensor(plain).data, uniform_tensor(base).data)


LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def read_linears(path: Path, weights: dict, heads: tuple[int, int]) -> dict[str, gguf.GGMLQuantizationType]:
    """Every linear's GGUF type; checks each one's values (rows in llama.cpp's order) against binq's."""
    reader = gguf.GGUFReader(path)
    types = {}
    for module, weight in weights.items():
        block, part = module.split(".")[2], module.split(".", 3)[3]
        stored = gguf_tensor(reader, f"blk.{block}.{LINEARS[part]}.weight")
        rows = weight.shape[0]
        values = gguf_values(torch.from_numpy(np.array(stored.data)).reshape(rows, -1), stored.tensor_type)
        expected = weight.dequantize()
        if part in ("self_attn.q_proj", "self_attn.k_proj"):
            expected = expected[rope_row_order(rows, heads[part == "self_attn.k_proj"])]
        assert torch.equal(as_bits(values), as_bits(expected)), module
        types[module] = stored.tensor_type
    return types


def tiny_heads() -> tuple[int, int]:
    config = build_tiny_model("llama").config
    return config.num_attention_heads, config.num_key_value_heads


def test_export_rtn_4bit_symmetric_as_q4_0(tmp_path: Path) -> None:
    weights = saved_checkpoint(tmp_path / "ckpt", "rtn", bits=4, group_size=32, sym=True, wide=False)
    out = export_gguf(tmp_path / "ckpt", tmp_path / "q4_0.gguf")
    types = read_linears(out, weights, tiny_heads())
    assert len(types) == 14 and set(types.values()) == {Q.Q4_0}
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0


def test_export_rtn_4bit_asymmetric(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Q4_1 where every grid's -zero * scale is an fp16 number; random weights have grids where it is
    not, so their linears go out as Q5_0, exactly, and the log says why."""
    weights = saved_checkpoint(tmp_path / "ckpt", "rtn", bits=4, group_size=32, wide=False)
    with caplog.at_level(logging.INFO, logger="binq.export.gguf"):
        assert main(["export", str(tmp_path / "ckpt"), "--gguf", str(tmp_path / "m.gguf")]) == 0
    types = read_linears(tmp_path / "m.gguf", weights, tiny_heads())
    assert set(types.values()) <= {Q.Q4_1, Q.Q5_0}
    fallbacks = sum(t == Q.Q5_0 for t in types.values())
    assert fallbacks > 0
    assert f"Q5_0 for {fallbacks} linear(s)" in caplog.text and "Q4_1 does not hold it exactly" in caplog.text
    assert "every linear exact: " in caplog.text and " as Q5_0" in caplog.text


@pytest.mark.parametrize(("static_groups", "expected"), [(False, {Q.F16, Q.F32}), (True, {Q.Q4_0})])
def test_export_gptq_act_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, static_groups: bool, expected: set
) -> None:
    options = {"bits": 4, "group_size": 32, "sym": True, "act_order": True, "static_groups": static_groups}
    weights = saved_checkpoint(tmp_path / "ckpt", "gptq", wide=False, **options)
    with caplog.at_level(logging.INFO, logger="binq.export.gguf"):
        out = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert set(read_linears(out, weights, tiny_heads()).values()) <= expected
    assert ("act-order groups are not runs of 32 columns" in caplog.text) == (not static_groups)


def test_export_refuses_layouts_without_a_ggml_type(tmp_path: Path) -> None:
    saved_checkpoint(tmp_path / "ckpt", "msb", wide=False)
    with pytest.raises(BinqError) as error:
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot export msb to GGUF: ") and "layout 'multiscale' has no llama.cpp type" in message
    assert "`--bits 4 --group-size 32 --sym` for Q4_0" in message
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
@pytest.mark.parametrize(("sym", "expected"), [(True, Q.Q4_0), (False, Q.Q5_0)])
def test_llama_cpp_runs_the_export(tmp_path: Path, sym: bool, expected: gguf.GGMLQuantizationType) -> None:
    """llama.cpp loads the export and its logits follow binq's dequantized model, not the original one.

    Not bit for bit: llama.cpp's CPU matmuls round the activations to Q8_0 blocks for these types.
    """

    model = write_tiny_gguf(tmp_path / "source.gguf")
    ids = [5, 17, 40, 99, 120, 3, 60, 70]
    with torch.no_grad():
        original = model(torch.tensor([ids])).logits[0]
    spec = get_method("rtn")
    config = spec.make_config(bits=4, group_size=32, sym=sym)
    result = quantize_model(model, get_architecture(model), random_ids(2, 8), spec, config, progress=False)
    save_checkpoint(model, result.weights, tmp_path / "ckpt", tokenizer=build_tiny_tokenizer(), method="rtn")
    out = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", like=tmp_path / "source.gguf")
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors if t.name.startswith("blk.0.attn_q")} == {expected}

    with torch.no_grad():
        for module, weight in result.weights.items():
            model.get_submodule(module).weight.data = weight.dequantize()
        quantized = model(torch.tensor([ids])).logits[0]
    assert_llama_cpp_follows(out, ids, quantized, original)


def assert_llama_cpp_follows(gguf_path: Path, ids: list[int], expected: torch.Tensor, original: torch.Tensor) -> None:
    """llama.cpp's logits of ``ids`` are within 2 % of ``expected``'s largest and far closer to it than to
    ``original`` (a Q-type export: llama.cpp rounds the activations to 8 bits, so not bit for bit)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=16, n_batch=16, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        logits = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    finally:
        llm.close()
    error = (logits - expected).abs().max().item()
    assert error < 0.02 * expected.abs().max().item()
    assert error < (logits - original).abs().max().item() / 4


# Every architecture binq exports without --like: llama.cpp's name, whether q/k rows are permuted
# (llama.cpp's llama interleaves rotary pairs; the others use HF's NeoX layout), the norm offset
# (Gemma's norms store w - 1), and the tokenizer kind its tiny checkpoint gets.
ARCHS = {
    "llama": ("llama", True, 0.0, "gpt2"),
    "mistral": ("llama", True, 0.0, "gpt2"),
    "qwen2": ("qwen2", False, 0.0, "gpt2"),
    "qwen3": ("qwen3", False, 0.0, "gpt2"),
    "gemma": ("gemma", False, 1.0, "llama"),
    "gemma2": ("gemma2", False, 1.0, "llama"),
    "gemma3_text": ("gemma3", False, 1.0, "llama"),
}
TOKENIZERS = {"gpt2": byte_level_bpe_tokenizer, "llama": sentencepiece_like_tokenizer}

# HF names (in a block, then outside) and llama.cpp's, written out here, not taken from gguf's map.
HF_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",  # the pre-MLP norm, but in Gemma 2/3
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
HF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
HF_NAMES["lm_head.weight"] = "output.weight"


def llama_cpp_name(hf_name: str, arch: str) -> str:
    if not hf_name.startswith("model.layers."):
        return HF_NAMES[hf_name]
    block, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    if rest == "post_attention_layernorm.weight" and arch in ("gemma2", "gemma3_text"):
        return f"blk.{block}.post_attention_norm.weight"  # Gemma 2/3 normalize the attention output too
    return f"blk.{block}.{HF_BLOCK_NAMES[rest]}"


def noisy_tiny_model(arch: str) -> torch.nn.Module:
    """A tiny model whose norms and biases are not their initial constants (so offsets and copies show);
    Gemma 2/3 with llama.cpp's attention scale (their default query_pre_attn_scalar 256 is not head_dim)."""
    overrides = {"query_pre_attn_scalar": 16} if arch in ("gemma2", "gemma3_text") else {}
    model = build_tiny_model(arch, **overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def arch_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple]:
    """``arch_checkpoint(arch, group_size, dtype) -> (folder, model, weights, tokenizer)``: the noisy tiny
    model, ``rtn --bits 4 --sym`` at that group size, saved in ``dtype`` with its architecture's tiny
    tokenizer; cached for the module."""
    made: dict[tuple[str, int, torch.dtype], tuple] = {}

    def make(arch: str, group_size: int = 32, dtype: torch.dtype = torch.float16) -> tuple:
        if (arch, group_size, dtype) not in made:
            model = noisy_tiny_model(arch)
            spec = get_method("rtn")
            config = spec.make_config(bits=4, group_size=group_size, sym=True)
            result = quantize_model(model, get_architecture(model), random_ids(2, 8), spec, config, progress=False)
            tokenizer = TOKENIZERS[ARCHS[arch][3]]()
            folder = tmp_path_factory.mktemp(f"{arch}-g{group_size}")
            save_checkpoint(model, result.weights, folder, tokenizer=tokenizer, method="rtn", dtype=dtype)
            made[(arch, group_size, dtype)] = (folder, model, result.weights, tokenizer)
        return made[(arch, group_size, dtype)]

    return make


def expected_hparams(arch: str, config: object) -> dict[str, object]:
    """The ``{arch}.*`` keys llama.cpp needs, with the values of the HF config."""
    theta = config.rope_parameters.get("full_attention", config.rope_parameters)["rope_theta"]
    keys = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim,
        "attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "rope.freq_base": theta,
    }
    if arch in ("gemma2", "gemma3_text"):
        local = config.rope_parameters.get("sliding_attention", config.rope_parameters)["rope_theta"]
        keys.update({"attention.sliding_window": config.sliding_window, "rope.freq_base_swa": local})
    if arch == "gemma2":
        keys["attn_logit_softcapping"] = config.attn_logit_softcapping
        keys["final_logit_softcapping"] = config.final_logit_softcapping
    if arch == "gemma3_text":
        keys["attention.sliding_window_pattern"] = 6
    return keys


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_architecture_without_like(arch: str, arch_checkpoint: Callable[..., tuple]) -> None:
    """binq writes the whole file itself: names, shapes, types and values of every tensor, the
    hyperparameters, norm offsets, q/k rows permuted only for llama.cpp's llama, the tokenizer."""
    folder, model, weights, tokenizer = arch_checkpoint(arch)
    name, permuted, offset, tokenizer_model = ARCHS[arch]
    reader = gguf.GGUFReader(export_gguf(folder, folder / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == name

    config = model.config
    for key, value in expected_hparams(arch, config).items():
        stored = reader.fields[f"{name}.{key}"].contents()
        assert stored == pytest.approx(value, rel=1e-7), key

    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    tensors = {t.name: t for t in reader.tensors}
    expected_names = set()
    for hf_name, hf_tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the embedding
        stored = tensors[llama_cpp_name(hf_name, arch)]
        expected_names.add(stored.name)
        assert list(stored.shape) == list(reversed(hf_tensor.shape)), stored.name  # ggml lists dims innermost first
        module = hf_name.rpartition(".")[0]
        head_count = heads.get(module.rpartition(".")[2]) if permuted else None
        if module in weights and hf_name.endswith(".weight"):
            assert stored.tensor_type == Q.Q4_0, stored.name
            rows = hf_tensor.shape[0]
            values = gguf_values(torch.from_numpy(np.array(stored.data)).reshape(rows, -1), Q.Q4_0)
            expected = weights[module].dequantize()
        elif hf_tensor.dim() == 1:
            assert stored.tensor_type == Q.F32, stored.name
            values = torch.from_numpy(np.array(stored.data))
            expected = hf_tensor.half().float() + (offset if hf_name.endswith("norm.weight") else 0.0)
        else:
            assert stored.tensor_type == Q.F16, stored.name
            values = torch.from_numpy(np.array(stored.data)).float().reshape(hf_tensor.shape)
            expected = hf_tensor.half().float()
        if head_count is not None:
            expected = expected[rope_row_order(expected.shape[0], head_count)]
        assert torch.equal(as_bits(values), as_bits(expected)), stored.name
    assert set(tensors) == expected_names

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert reader.fields["tokenizer.ggml.model"].contents() == tokenizer_model
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert tokens[len(tokenizer) :] == [f"[PAD{i}]" for i in range(len(tokenizer), config.vocab_size)]
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False  # as the tiny tokenizers do


def test_sentencepiece_like_scores_follow_merge_ranks(arch_checkpoint: Callable[..., tuple]) -> None:
    folder, _, _, tokenizer = arch_checkpoint("gemma")
    reader = gguf.GGUFReader(export_gguf(folder, folder / "scores.gguf"))
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    by_piece = dict(zip(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), scores, strict=False))
    assert (by_piece["23"], by_piece["▁w"], by_piece["12"]) == (0.0, -1.0, -2.0)
    assert by_piece["w"] == by_piece["<s>"] == -1000.0  # made by no merge
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True  # Metaspace prepends "▁"


def edited_config(folder: Path, tmp_path: Path, **changes: object) -> Path:
    """A copy of the checkpoint ``folder`` with config.json's ``changes``."""
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.gguf"))
    config = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return copy


def test_gemma3_linear_rope_scaling(arch_checkpoint: Callable[..., tuple], tmp_path: Path) -> None:
    """Gemma 3 (4B and up) scales its global layers' RoPE linearly; its sliding layers keep theta 10000."""
    folder = arch_checkpoint("gemma3_text")[0]
    full = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
    rope = {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    reader = gguf.GGUFReader(export_gguf(edited_config(folder, tmp_path, rope_parameters=rope), tmp_path / "m.gguf"))
    assert reader.fields["gemma3.rope.scaling.type"].contents() == "linear"
    assert reader.fields["gemma3.rope.scaling.factor"].contents() == 8.0
    assert reader.fields["gemma3.rope.freq_base_swa"].contents() == 10000.0


@pytest.mark.parametrize(
    ("arch", "changes", "message"),
    [
        ("gemma2", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256 is neither head_dim"),
        ("gemma3_text", {"layer_types": ["full_attention", "sliding_attention"]}, "repeats 5 sliding layers"),
        ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "not 'llama3': pass --like"),
    ],
)
def test_export_refuses_what_llama_cpp_cannot_run(
    arch: str, changes: dict, message: str, arch_checkpoint: Callable[..., tuple], tmp_path: Path
) -> None:
    folder = edited_config(arch_checkpoint(arch)[0], tmp_path, **changes)
    with pytest.raises(BinqError, match=message) as error:
        export_gguf(folder, tmp_path / "m.gguf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "m.gguf").exists()


def test_export_refuses_tokenizers_llama_cpp_cannot_express(tmp_path: Path) -> None:
    """The tiny word-level tokenizer has no llama.cpp model: one line, pointing at --like."""
    model = build_tiny_model("llama")
    spec = get_method("rtn")
    config = spec.make_config(bits=4, group_size=32, sym=True)
    result = quantize_model(model, get_architecture(model), random_ids(2, 8), spec, config, progress=False)
    save_checkpoint(model, result.weights, tmp_path / "ckpt", tokenizer=build_tiny_tokenizer(), method="rtn")
    with pytest.raises(BinqError) as error:
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("the tokenizer (WordLevel) is neither byte-level BPE nor sentencepiece-like")
    assert "--like" in message


def test_export_refuses_other_architectures(tmp_path: Path) -> None:
    model = build_tiny_model("opt")
    spec = get_method("rtn")
    config = spec.make_config(bits=4, group_size=32, sym=True)
    result = quantize_model(model, get_architecture(model), random_ids(2, 8), spec, config, progress=False)
    save_checkpoint(model, result.weights, tmp_path / "ckpt", tokenizer=byte_level_bpe_tokenizer(), method="rtn")
    with pytest.raises(BinqError) as error:
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert str(error.value) == (
        "GGUF export supports model types llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, not 'opt'"
    )


# llama.cpp's CPU GELU reads a table of fp16 values (its input and output rounded to fp16); every
# other operation in these runs is fp32.
GELU_ARCHS = ("gemma", "gemma2", "gemma3_text")


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_runs_each_architecture(arch: str, arch_checkpoint: Callable[..., tuple]) -> None:
    """llama.cpp loads the export (metadata written by binq) and computes binq's own model, and its
    tokenizer splits text as the checkpoint's does.

    The checkpoint is fp32 and its linears go out as F32 (4-bit groups of 16: no block type, exact), the
    KV cache is F32 and flash attention off: llama.cpp's CPU matmuls round the activations to fp16 for
    F16 weights, and its flash attention works in fp16. So llama.cpp multiplies fp32 values as binq
    does and only the order of fp32 sums differs: within 1e-5 of the largest logit. The Gemma
    family goes through llama.cpp's fp16 GELU table; Gemma 2/3 then rescale the MLP output to the
    residual's size in their post-feedforward norm, so one fp16 rounding (2**-11 relative) of the
    activations reaches the logits: within 2**-11 of the largest logit. Quantized (Q-type) linears are
    not run here: llama.cpp rounds their activations to 8 bits (test_llama_cpp_runs_the_export).
    """
    from llama_cpp import GGML_TYPE_F32, Llama

    folder, _, _, tokenizer = arch_checkpoint(arch, group_size=16, dtype=torch.float32)
    out = export_gguf(folder, folder / "dense.gguf")
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors if ".attn_q.weight" in t.name} <= {Q.F16, Q.F32}
    ids = [5, 17, 40, 99, 120, 3, 60, 70]
    with torch.no_grad():
        expected = binq.load(folder)(torch.tensor([ids])).logits[0]
    llm = Llama(
        model_path=str(out),
        n_ctx=16,
        n_batch=16,
        n_threads=1,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
    )
    try:
        llm.eval(ids)
        logits = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
        text = "w123 w12 w3 w45 w1"
        assert llm.tokenize(text.encode(), add_bos=True) == tokenizer(text).input_ids
    finally:
        llm.close()
    error = (logits - expected).abs().max().item()
    largest = expected.abs().max().item()
    tolerance = 2**-11 if arch in GELU_ARCHS else 1e-5
    assert error < tolerance * largest, (
        f"max |llama.cpp - binq| {error:.3g}, {error / largest:.3g} of the largest logit"
    )
