"""GGML's 32-weight block types, packed from integers binq already holds (no re-quantization).

Each block covers 32 consecutive weights of one row; GGUF stores a row as its blocks in order. The
layouts (ggml's ``block_q4_0`` ... ``block_q8_0``; every fp16 little-endian), with ``x[j]`` the integer
of weight ``j`` of the block and ``y[j]`` its value as ggml's ``dequantize_row_*`` computes it in fp32:

=======  =====  ====================================  ======================  =========================
type     bytes  fields, in order                      integer stored          value
=======  =====  ====================================  ======================  =========================
Q4_0     18     ``d``, ``qs[16]``                     ``x + 8`` in 0..15      ``x * d``, x in -8..7
Q4_1     20     ``d``, ``m``, ``qs[16]``              ``x`` in 0..15          ``x * d + m``
Q5_0     22     ``d``, ``qh[4]``, ``qs[16]``          ``x + 16`` in 0..31     ``x * d``, x in -16..15
Q5_1     24     ``d``, ``m``, ``qh[4]``, ``qs[16]``   ``x`` in 0..31          ``x * d + m``
Q8_0     34     ``d``, ``qs[32]`` (int8)              ``x`` in -128..127      ``x * d``
=======  =====  ====================================  ======================  =========================

- ``qs`` of the 4- and 5-bit types holds the low four bits of the stored integers in nibbles: byte
  ``k`` (0..15) has weight ``k`` in its low nibble and weight ``k + 16`` in its high nibble (the first
  16 weights in the low nibbles, the last 16 in the high ones; not neighbouring pairs).
- ``qh`` (5-bit types) is a little-endian uint32 whose bit ``j`` is bit 4 of weight ``j``'s stored
  integer: bit ``j % 8`` of byte ``j // 8``, the order of :func:`binq.quant.packing.pack_bits`.
- ``x * d`` is exact in fp32 (an 11-bit fp16 significand times an integer of at most 8 bits), so an
  offset type reproduces ``scale * (code - zero)`` exactly when ``x = code - zero`` and ``d = scale``.
  ``x * d + m`` rounds once, at the addition (also with a fused multiply-add, the product being exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from binq.quant.packing import pack_bits

QK = 32  # weights per block of every type here


@dataclass(frozen=True)
class GgmlTensor:
    """A linear's GGUF tensor: ``data`` is ``uint8 (rows, row_bytes)`` for a block type, else the
    values as ``float16``/``float32 (rows, cols)``; ``note`` says why this type, when it is not the
    one the layout names (for the export's log), else None."""

    data: torch.Tensor
    ggml_type: GGMLQuantizationType
    note: str | None = None


def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """``uint8 (..., 2)``: each fp16 value's two bytes, little-endian (GGUF's order) whatever the host's."""
    bits = values.to(torch.float16).cpu().contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.stack([bits & 0xFF, bits >> 8], dim=-1).to(torch.uint8)


def _blocks(stored: torch.Tensor) -> torch.Tensor:
    rows, cols = stored.shape
    if cols % QK:
        raise ValueError(f"ggml block types need rows of a multiple of {QK} weights, got {cols}")
    return stored.cpu().to(torch.int32).reshape(rows, cols // QK, QK)


def _nibbles(blocks: torch.Tensor) -> torch.Tensor:
    """``qs``: weight k of a block in the low nibble of byte k, weight k + 16 in its high nibble."""
    low = blocks & 0x0F
    return (low[..., : QK // 2] | (low[..., QK // 2 :] << 4)).to(torch.uint8)


def _high_bits(blocks: torch.Tensor) -> torch.Tensor:
    """``qh``: bit 4 of each weight's stored integer, a little-endian uint32 per block."""
    rows, count, _ = blocks.shape
    plane = ((blocks >> 4) & 1).reshape(rows * count, QK).bool()
    return pack_bits(plane).reshape(rows, count, QK // 8)


def _check(stored: torch.Tensor, low: int, high: int, name: str) -> None:
    if stored.numel() and (int(stored.min()) < low or int(stored.max()) > high):
        raise ValueError(f"{name} integers must lie in {low}..{high}")


def _rows(parts: list[torch.Tensor]) -> torch.Tensor:
    block = torch.cat(parts, dim=-1)
    return block.reshape(block.shape[0], -1)


def pack_q4_0(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_0 rows from integers ``x`` in -8..7 ``(rows, cols)`` and fp16 ``d`` ``(rows, cols / 32)``."""
    _check(x, -8, 7, "Q4_0")
    return _rows([fp16_bytes(d), _nibbles(_blocks(x + 8))])


def pack_q4_1(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_1 rows from integers ``x`` in 0..15 and fp16 ``d``, ``m`` ``(rows, cols / 32)``."""
    _check(x, 0, 15, "Q4_1")
    if m is None:
        raise ValueError("Q4_1 needs its block minimums m")
    return _rows([fp16_bytes(d), fp16_bytes(m), _nibbles(_blocks(x))])


def pack_q5_0(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Q5_0 rows from integers ``x`` in -16..15 and fp16 ``d``."""
    _check(x, -16, 15, "Q5_0")
    blocks = _blocks(x + 16)
    return _rows([fp16_bytes(d), _high_bits(blocks), _nibbles(blocks)])


def pack_q5_1(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Q5_1 rows from integers ``x`` in 0..31 and fp16 ``d``, ``m``."""
    _check(x, 0, 31, "Q5_1")
    if m is None:
        raise ValueError("Q5_1 needs its block minimums m")
    blocks = _blocks(x)
    return _rows([fp16_bytes(d), fp16_bytes(m), _high_bits(blocks), _nibbles(blocks)])


def pack_q8_0(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Q8_0 rows from integers ``x`` in -128..127 and fp16 ``d``."""
    _check(x, -128, 127, "Q8_0")
    return _rows([fp16_bytes(d), (_blocks(x) & 0xFF).to(torch.uint8)])


@dataclass(frozen=True)
class BlockType:
    """One ggml block type: the integers it holds and how its values are made of them."""

    ggml_type: GGMLQuantizationType
    block_bytes: int
    lowest: int  # the integer x of a weight lies in lowest..highest
    highest: int
    has_min: bool  # value x * d + m (fp16 m per block), else x * d
    pack: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

    @property
    def name(self) -> str:
        return self.ggml_type.name

    def values(self, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """ggml's fp32 dequantization of integers ``x`` (float32) with broadcastable fp16 ``d``, ``m``."""
        y = x * d.float()
        return y + m.float() if self.has_min else y


# Smallest first: the export writes a linear as the first of these that holds it exactly.
BLOCK_TYPES: tuple[BlockType, ...] = (
    BlockType(GGMLQuantizationType.Q4_0, 18, -8, 7, False, pack_q4_0),
    BlockType(GGMLQuantizationType.Q4_1, 20, 0, 15, True, pack_q4_1),
    BlockType(GGMLQuantizationType.Q5_0, 22, -16, 15, False, pack_q5_0),
    BlockType(GGMLQuantizationType.Q5_1, 24, 0, 31, True, pack_q5_1),
    BlockType(GGMLQuantizationType.Q8_0, 34, -128, 127, False, pack_q8_0),
)
BLOCK_TYPE = {block.ggml_type: block for block in BLOCK_TYPES}
