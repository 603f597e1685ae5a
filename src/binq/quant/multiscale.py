"""The multi-scale binary weight of MSB (dynamic grouping): a sign and a group index per weight.

``W[i, j] = sign[i, j] * scales[u(i), j // block_size, group_index[i, j]]`` with ``u(i) = i`` when the
scale tables are per row (row and block-wise granularities) and ``u(i) = 0`` for one table per tensor;
listed exact zeros are 0. Stored tensors:

- ``signs``: 1 bit per weight (:func:`~binq.quant.packing.pack_bits`; True = +1);
- ``group_index``: ``ceil(log2 g)`` bits per weight (:func:`~binq.quant.packing.pack_uint`, absent for
  ``g = 1``); groups are numbered in increasing magnitude, so the index means the same in every unit;
- ``scales``: float16 ``(1 or rows, blocks, g)``; units with fewer than ``g`` groups repeat their
  largest scale in the unused slots (no index points there);
- ``zero_positions``: int32 flat indices of the exact zeros (only when there are any).

So a per-tensor ``g = 32`` weight stores about 6 bits per weight, not the "1.007" of the first version
of the paper, which counted the signs and scales but not the index (the reference prints ``(16 g + n) / n``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from binq.errors import BinqError
from binq.quant.grouping import index_bits
from binq.quant.packing import pack_bits, pack_uint, packed_row_bytes, unpack_bits, unpack_uint
from binq.quant.structured import QuantizedWeight, register_layout, require_tensor, sign_values

SCALE_BITS = 16


@register_layout
@dataclass
class MultiScaleWeight(QuantizedWeight):
    """Sign + group index per weight, fp16 group scales per tensor, row or row block (see module docstring)."""

    signs: torch.Tensor  # bool (rows, cols)
    group_index: torch.Tensor  # uint8 (rows, cols), values < groups
    scales: torch.Tensor  # float16 (1 or rows, blocks, groups)
    block_size: int
    zero_positions: torch.Tensor | None = None  # int64 (k,) flat indices of exact zeros
    layout: str = "multiscale"
    _packed: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows, cols = self.signs.shape
        if tuple(self.group_index.shape) != (rows, cols):
            raise ValueError(f"group_index shape {tuple(self.group_index.shape)} != {(rows, cols)}")
        blocks = math.ceil(cols / self.block_size)
        if self.scales.dim() != 3 or self.scales.shape[0] not in (1, rows) or self.scales.shape[1] != blocks:
            raise ValueError(f"scales shape {tuple(self.scales.shape)} != (1 or {rows}, {blocks}, groups)")
        if self.group_index.numel() and int(self.group_index.max()) >= self.groups:
            raise ValueError(f"group_index has entries >= the {self.groups} groups")
        if self.zero_positions is not None and self.zero_positions.numel():
            lo, hi = int(self.zero_positions.min()), int(self.zero_positions.max())
            if lo < 0 or hi >= rows * cols:
                raise ValueError("zero_positions out of range")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)  # type: ignore[return-value]

    @property
    def groups(self) -> int:
        return int(self.scales.shape[2])

    @property
    def index_bits(self) -> int:
        return index_bits(self.groups)

    def element_scales(self) -> torch.Tensor:
        """The magnitude of every element, ``(rows, cols)`` float32 (zeros not applied)."""
        rows, cols = self.shape
        table_rows, blocks, groups = self.scales.shape
        row_unit = torch.arange(rows).unsqueeze(1) if table_rows > 1 else torch.zeros(rows, 1, dtype=torch.long)
        block = (torch.arange(cols) // self.block_size).unsqueeze(0)
        flat = (row_unit * blocks + block) * groups + self.group_index.long()
        return self.scales.float().reshape(-1)[flat]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = self.element_scales() * sign_values(self.signs)
        if self.zero_positions is not None:
            out.view(-1)[self.zero_positions.long()] = 0.0
        return out.to(dtype)

    def tunable_tensors(self) -> dict[str, str]:
        return {"scales": "scale"}

    def sign_planes(self) -> tuple[str, ...]:
        return ("signs",)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        # Packing a large index plane takes seconds; the records ask for the bits more than once.
        if self._packed is None:
            tensors = {"signs": pack_bits(self.signs), "scales": self.scales.to(torch.float16)}
            if self.index_bits:
                tensors["group_index"] = pack_uint(self.group_index, self.index_bits)
            if self.zero_positions is not None and self.zero_positions.numel():
                tensors["zero_positions"] = self.zero_positions.to(torch.int32)
            self._packed = tensors
        return dict(self._packed)

    def metadata(self) -> dict[str, Any]:
        rows, cols = self.shape
        return {
            "shape": [rows, cols],
            "block_size": self.block_size,
            "per_row": self.scales.shape[0] > 1,
            "groups": self.groups,
        }

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> MultiScaleWeight:
        rows, cols = _positive_pair(metadata.get("shape"))
        block_size = _positive_int(metadata, "block_size")
        groups = _positive_int(metadata, "groups")
        if groups > 256:
            raise BinqError(f"metadata 'groups' must be at most 256, got {groups}")
        per_row = metadata.get("per_row")
        if not isinstance(per_row, bool):
            raise BinqError(f"metadata 'per_row' must be true or false, got {per_row!r}")
        extra = sorted(set(tensors) - {"signs", "group_index", "scales", "zero_positions"})
        if extra:
            raise BinqError(f"unexpected tensor(s) {', '.join(extra)}")
        signs = unpack_bits(require_tensor(tensors, "signs", (rows, packed_row_bytes(cols)), torch.uint8), cols)
        bits = index_bits(groups)
        if bits:
            packed = require_tensor(tensors, "group_index", (rows, packed_row_bytes(cols, bits)), torch.uint8)
            group_index = unpack_uint(packed, cols, bits)
        elif "group_index" in tensors:
            raise BinqError("tensor 'group_index' is stored for a single group")
        else:
            group_index = torch.zeros(rows, cols, dtype=torch.uint8)
        scale_shape = (rows if per_row else 1, math.ceil(cols / block_size), groups)
        scales = require_tensor(tensors, "scales", scale_shape, torch.float16)
        zeros = None
        if "zero_positions" in tensors:
            raw = tensors["zero_positions"]
            if raw.dtype != torch.int32 or raw.dim() != 1:
                raise BinqError("tensor 'zero_positions' must be a 1-D int32 tensor")
            zeros = raw.long()
        try:
            return cls(signs=signs, group_index=group_index, scales=scales, block_size=block_size, zero_positions=zeros)
        except ValueError as exc:
            raise BinqError(str(exc)) from None

    @property
    def compute_bits(self) -> float:
        """The code width a decoder reads per weight: the sign plus the fixed-length group index."""
        return float(1 + self.index_bits)

    def index_entropy_bits(self) -> float:
        """Entropy of the group indices (bits per weight an ideal entropy coder of them would reach).

        One distribution pooled over the whole weight: groups are numbered by magnitude in every unit.
        """
        index = self.group_index.reshape(-1)
        if self.zero_positions is not None and self.zero_positions.numel():
            keep = torch.ones(index.numel(), dtype=torch.bool)
            keep[self.zero_positions.long()] = False
            index = index[keep]
        if index.numel() == 0:
            return 0.0
        p = torch.bincount(index.long(), minlength=self.groups).double() / index.numel()
        p = p[p > 0]
        return float(-(p * p.log2()).sum())

    def paper_convention_bits(self) -> float:
        """The first version's "average bit length": one sign per weight plus 16-bit scales, no index."""
        return 1 + SCALE_BITS * self.scales.numel() / self.numel

    def extra_bit_figures(self) -> dict[str, float]:
        return {"index_entropy_bits": self.index_entropy_bits(), "paper_convention_bits": self.paper_convention_bits()}


def _positive_int(metadata: dict[str, Any], key: str) -> int:
    value = metadata.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BinqError(f"metadata '{key}' must be a positive integer, got {value!r}")
    return value


def _positive_pair(shape: Any) -> tuple[int, int]:
    # type(v) is int: a JSON true is not a size, although Python's bool is an int.
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v > 0 for v in shape)):
        raise BinqError(f"metadata 'shape' must be [rows, cols] of positive integers, got {shape!r}")
    return shape[0], shape[1]
