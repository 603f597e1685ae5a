"""GGML's Q1_0 block, packed from binq's sign planes (the ``gguf`` package has the type, no packer).

A Q1_0 block covers 128 consecutive weights of one row in 18 bytes (ggml's ``block_q1_0``):

- bytes 0-1: ``d``, an IEEE fp16 scale, little-endian;
- bytes 2-17: ``qs``, 128 sign bits; weight ``j`` of the block is bit ``j % 8`` (least significant
  first) of byte ``qs[j // 8]``; bit 1 means ``+d``, bit 0 means ``-d`` (``y = (2 * bit - 1) * d``, as
  ggml's ``dequantize_row_q1_0``).

binq's packed sign plane (``binq.quant.packing``) has the same bit order and the same sign convention
(True = +1), so a row of a 128-wide-block binary weight becomes Q1_0 by interleaving each block's fp16
scale with its 16 sign bytes: no re-quantization, no rounding.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from binq.export.ggml_blocks import GgmlTensor, fp16_bytes
from binq.quant.packing import pack_bits
from binq.quant.structured import BinaryWeight, QuantizedWeight

QK1_0 = 128  # weights per block
Q1_0_BLOCK_BYTES = 2 + QK1_0 // 8  # 18


def q1_0_form_problem(weight: QuantizedWeight) -> str | None:
    """Why ``weight`` is not one fp16 scale per 128 weights of a row times a sign, or None if it is.

    A weight in that form whose width is not a multiple of 128 is still exact in F16 (its values are
    fp16 scales with a sign); only its blocks do not fit Q1_0's.
    """
    if not isinstance(weight, BinaryWeight):
        return f"layout '{weight.layout}' is not a sign-times-scale weight"
    if weight.block_size != QK1_0:
        return f"its scale blocks are {weight.block_size} wide, Q1_0's are {QK1_0}"
    extras = [
        label
        for label, present in (
            ("per-group means", weight.means is not None),
            ("a group bitmap (two scales per block)", weight.group_bitmap is not None),
            ("salient columns with residual signs", weight.salient_columns is not None),
            ("column scales", weight.column_scales is not None),
        )
        if present
    ]
    if extras:
        return f"it stores {', '.join(extras)}"
    return None


def pack_q1_0(signs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Q1_0 rows from a boolean ``(rows, cols)`` sign plane and fp16 ``(rows, cols / 128)`` scales.

    Returns ``uint8 (rows, cols / 128 * 18)``: each row's blocks in order, as GGUF stores them.
    """
    rows, cols = signs.shape
    if cols % QK1_0:
        raise ValueError(f"Q1_0 needs rows of a multiple of {QK1_0} weights, got {cols}")
    blocks = cols // QK1_0
    if tuple(scales.shape) != (rows, blocks) or scales.dtype != torch.float16:
        raise ValueError(f"scales must be float16 ({rows}, {blocks}), got {scales.dtype} {tuple(scales.shape)}")
    sign_bytes = pack_bits(signs.cpu()).reshape(rows, blocks, QK1_0 // 8)
    return torch.cat([fp16_bytes(scales), sign_bytes], dim=-1).reshape(rows, blocks * Q1_0_BLOCK_BYTES)


def q1_0_rows(weight: BinaryWeight) -> torch.Tensor:
    """The Q1_0 bytes of a weight in Q1_0's form (see :func:`q1_0_form_problem`)."""
    problem = q1_0_form_problem(weight)
    if problem is not None:
        raise ValueError(f"not a Q1_0 weight: {problem}")
    return pack_q1_0(weight.signs, weight.scales[:, :, 0].to(torch.float16))


def q1_0_tensor(weight: BinaryWeight) -> GgmlTensor:
    """The GGUF tensor of a weight in Q1_0's form: Q1_0, or F16 (exact) where rows are not 128-wide blocks."""
    cols = weight.shape[1]
    if cols % QK1_0 == 0:
        return GgmlTensor(q1_0_rows(weight), GGMLQuantizationType.Q1_0)
    note = f"its rows are {cols} wide, not a multiple of {QK1_0}; F16 holds its values (signed fp16 scales) exactly"
    return GgmlTensor(weight.dequantize(torch.float32).to(torch.float16), GGMLQuantizationType.F16, note)


def dequantize_q1_0(data: torch.Tensor, cols: int) -> torch.Tensor:
    """float32 ``(rows, cols)`` from Q1_0 bytes ``uint8 (rows, cols / 128 * 18)``: ggml's formula."""
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // QK1_0, Q1_0_BLOCK_BYTES).to(torch.int32)
    d_bits = blocks[..., 0] | (blocks[..., 1] << 8)
    d = d_bits.to(torch.int16).view(torch.float16).float()  # two's-complement reinterpretation of the bits
    bits = (blocks[..., 2:].unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    signs = bits.reshape(rows, cols // QK1_0, QK1_0).float() * 2 - 1
    return (signs * d.unsqueeze(-1)).reshape(rows, cols)
