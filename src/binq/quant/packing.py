"""Bit packing, one pack and one unpack per layout (the HQQ habit), all little-endian.

Layout of a packed plane: each row of ``k`` values becomes ``ceil(k * bits / 8)`` bytes; value ``j`` of a
row occupies bits ``j*bits .. j*bits + bits - 1`` of the row's bit stream, and bit ``t`` of the stream is
bit ``t % 8`` (least significant first) of byte ``t // 8``. Padding bits at the end of a row are zero.
"""

from __future__ import annotations

import math

import torch

_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def packed_row_bytes(k: int, bits: int = 1) -> int:
    """Bytes one packed row of ``k`` values of ``bits`` bits takes."""
    return math.ceil(k * bits / 8)


def pack_bits(plane: torch.Tensor) -> torch.Tensor:
    """Pack a boolean ``(rows, k)`` plane into ``uint8 (rows, ceil(k/8))``."""
    return pack_uint(plane.to(torch.uint8), bits=1)


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a boolean ``(rows, k)`` plane."""
    return unpack_uint(packed, k, bits=1).bool()


def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``< 2**bits`` of shape ``(rows, k)`` into ``uint8 (rows, ceil(k*bits/8))``."""
    if values.dim() != 2:
        raise ValueError(f"pack_uint expects a 2-D tensor, got shape {tuple(values.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, k = values.shape
    values = values.cpu()
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    nbytes = packed_row_bytes(k, bits)
    out = torch.empty(rows, nbytes, dtype=torch.uint8)
    step = _rows_per_chunk(k * bits)
    for start in range(0, rows, step):  # rows are packed independently: chunks bound the int32 expansion
        out[start : start + step] = _pack_rows(values[start : start + step], bits, nbytes)
    return out


def _rows_per_chunk(bits_per_row: int) -> int:
    """Rows whose int32 bit stream stays near 1 MB, at least one: the few stream-sized temporaries of a
    chunk stay small beside what a run holds (at 16 MB, then 4 MB, they showed in a streamed run's peak)."""
    return max(1, (1 << 18) // max(1, bits_per_row))


def _pack_rows(values: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    rows, k = values.shape
    v = values.to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((v.unsqueeze(-1) >> shifts) & 1).reshape(rows, k * bits)
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.int32)
    padded[:, : k * bits] = stream
    return (padded.reshape(rows, nbytes, 8) * _BIT_WEIGHTS).sum(-1).to(torch.uint8)


def unpack_uint(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: ``uint8 (rows, k)`` values."""
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(k, bits):
        raise ValueError(f"packed rows have {nbytes} bytes, expected {packed_row_bytes(k, bits)} for k={k}")
    out = torch.empty(rows, k, dtype=torch.uint8, device=packed.device)
    step = _rows_per_chunk(nbytes * 8)
    for start in range(0, rows, step):
        out[start : start + step] = _unpack_rows(packed[start : start + step], k, bits)
    return out


def _unpack_rows(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    rows = packed.shape[0]
    eight = torch.arange(8, dtype=torch.int32, device=packed.device)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> eight) & 1).reshape(rows, -1)
    stream = stream[:, : k * bits].reshape(rows, k, bits)
    return (stream << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1).to(torch.uint8)
