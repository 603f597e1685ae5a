"""Structured quantized weights: what a method really produces, and the bits it really costs.

Every method returns one of these instead of a fake-quantized float matrix. Each knows how to
``dequantize()`` itself, which packed tensors it stores (``packed_tensors()``), and two bit figures:

- ``storage_bits``: every stored bit (sign and residual planes, bitmaps, column masks, codes, fp16
  scales and means, permutations), counted from the packed tensors themselves;
- ``compute_bits``: the papers' convention (signs per weight, or the grid width), for comparison with
  published tables. It is never the storage figure.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from binq.quant.packing import pack_bits, pack_uint


class QuantizedWeight(ABC):
    """A quantized ``(out_features, in_features)`` weight matrix."""

    layout: str

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix this weight stands for."""

    @abstractmethod
    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that are stored, bit-packed, exactly as they would be written to disk."""

    @property
    @abstractmethod
    def compute_bits(self) -> float:
        """Bits per weight in the papers' convention (see the class docstring)."""

    @property
    def numel(self) -> int:
        rows, cols = self.shape
        return rows * cols

    @property
    def storage_bits_total(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.packed_tensors().values())

    @property
    def storage_bits(self) -> float:
        """Stored bits per weight, from the packed tensors."""
        return self.storage_bits_total / self.numel


def _block_index(cols: int, block_size: int) -> torch.Tensor:
    return torch.arange(cols) // block_size


ZONE_DENSE = "dense"
ZONE_CONCENTRATED = "concentrated"
ZONE_SPARSE = "sparse"
ZONE_SALIENT = "salient"
ZONE_SALIENT_RESIDUAL = "salient_residual"


@dataclass
class BinaryWeight(QuantizedWeight):
    """Sign-based weight with per-(row, column block, zone) fp16 scales and optional means.

    A weight ``W[i, j]`` in column block ``b = j // block_size`` is reconstructed as

    - non-salient column: ``alpha[i, b, z] * s[i, j] + mu[i, b, z]`` with zone ``z`` = ``sparse`` where
      ``group_bitmap[i, j]`` is set, else ``concentrated`` (``dense`` when there is no bitmap);
    - salient column (``salient_columns[j]``): the first-order term in zone ``salient`` plus the
      residual term ``alpha[i, b, r] * s_r[i, j] + mu[i, b, r]`` in zone ``salient_residual``.

    Signs are stored as bits (True = +1; a zero maps to +1). The residual plane is stored only for
    salient columns, in column order. This one layout covers XNOR sign binarization (one zone),
    BiLLM (four zones) and the ARB family.
    """

    signs: torch.Tensor  # bool (rows, cols)
    scales: torch.Tensor  # float16 (rows, blocks, zones)
    block_size: int
    means: torch.Tensor | None = None  # float16 (rows, blocks, zones)
    group_bitmap: torch.Tensor | None = None  # bool (rows, cols): True = sparse zone
    salient_columns: torch.Tensor | None = None  # bool (cols,)
    residual_signs: torch.Tensor | None = None  # bool (rows, n_salient)
    layout: str = "binary"

    def __post_init__(self) -> None:
        rows, cols = self.signs.shape
        blocks = math.ceil(cols / self.block_size)
        zones = len(self.zone_names)
        if tuple(self.scales.shape) != (rows, blocks, zones):
            raise ValueError(f"scales shape {tuple(self.scales.shape)} != {(rows, blocks, zones)}")
        if self.means is not None and self.means.shape != self.scales.shape:
            raise ValueError("means must have the shape of scales")
        if (self.salient_columns is None) != (self.residual_signs is None):
            raise ValueError("salient_columns and residual_signs go together")
        if self.residual_signs is not None:
            n_salient = int(self.salient_columns.sum())
            if tuple(self.residual_signs.shape) != (rows, n_salient):
                raise ValueError("residual_signs must be (rows, number of salient columns)")

    @property
    def zone_names(self) -> list[str]:
        names = [ZONE_CONCENTRATED, ZONE_SPARSE] if self.group_bitmap is not None else [ZONE_DENSE]
        if self.salient_columns is not None:
            names += [ZONE_SALIENT, ZONE_SALIENT_RESIDUAL]
        return names

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)  # type: ignore[return-value]

    def _zone_term(self, signs: torch.Tensor, zone: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """alpha * s + mu for the given columns, zone index per element."""
        block = _block_index(self.shape[1], self.block_size)[columns].to(signs.device)
        rows = signs.shape[0]
        idx = block.unsqueeze(0).expand(rows, -1) * self.scales.shape[2] + zone
        flat_scales = self.scales.float().reshape(rows, -1)
        term = torch.gather(flat_scales, 1, idx) * (signs.float() * 2 - 1)
        if self.means is not None:
            term = term + torch.gather(self.means.float().reshape(rows, -1), 1, idx)
        return term

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape
        names = self.zone_names
        all_cols = torch.arange(cols)
        if self.group_bitmap is not None:
            zone = self.group_bitmap.long() * names.index(ZONE_SPARSE)
        else:
            zone = torch.zeros(rows, cols, dtype=torch.long)
        out = self._zone_term(self.signs, zone, all_cols)
        if self.salient_columns is not None:
            sal = torch.nonzero(self.salient_columns).flatten()
            z1 = torch.full((rows, sal.numel()), names.index(ZONE_SALIENT), dtype=torch.long)
            z2 = torch.full_like(z1, names.index(ZONE_SALIENT_RESIDUAL))
            out[:, sal] = self._zone_term(self.signs[:, sal], z1, sal) + self._zone_term(self.residual_signs, z2, sal)
        return out.to(dtype)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"signs": pack_bits(self.signs), "scales": self.scales.to(torch.float16)}
        if self.means is not None:
            tensors["means"] = self.means.to(torch.float16)
        if self.group_bitmap is not None:
            tensors["group_bitmap"] = pack_bits(self.group_bitmap)
        if self.salient_columns is not None:
            tensors["salient_columns"] = pack_bits(self.salient_columns.unsqueeze(0))
            tensors["residual_signs"] = pack_bits(self.residual_signs)
        return tensors

    @property
    def compute_bits(self) -> float:
        """BiLLM's Eq. 14 convention: one sign per weight plus one per residual (salient) weight."""
        residual = 0 if self.residual_signs is None else self.residual_signs.numel()
        return (self.numel + residual) / self.numel


@dataclass
class UniformWeight(QuantizedWeight):
    """A b-bit integer grid with per-(row, group) fp16 scale and b-bit zero point (GPTQ's format).

    ``W[i, j] = scale[i, g] * (code[i, j] - zero[i, g])`` with ``g = group_index[j]``, or
    ``j // group_size`` when no group index is stored (act-order stores one, as GPTQ's ``g_idx``).
    Codes are in the layer's own column order. Symmetric grids store no zero points: their zero is
    the constant ``2**(bits-1)``.
    """

    codes: torch.Tensor  # uint8 (rows, cols), values < 2**bits
    scales: torch.Tensor  # float16 (rows, groups)
    bits: int
    group_size: int
    zeros: torch.Tensor | None = None  # uint8 (rows, groups); None = symmetric
    group_index: torch.Tensor | None = None  # int64 (cols,): group of each column (act-order)
    layout: str = "uniform"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def _groups(self) -> torch.Tensor:
        if self.group_index is not None:
            return self.group_index
        return _block_index(self.shape[1], self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        group = self._groups()
        scale = self.scales.float()[:, group]
        if self.zeros is None:
            zero = torch.full_like(scale, 2 ** (self.bits - 1))
        else:
            zero = self.zeros.float()[:, group]
        return (scale * (self.codes.float() - zero)).to(dtype)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"codes": pack_uint(self.codes, self.bits), "scales": self.scales.to(torch.float16)}
        if self.zeros is not None:
            tensors["zeros"] = pack_uint(self.zeros, self.bits)
        if self.group_index is not None:
            # int16 holds every group index of layers up to 32767 groups wide.
            dtype = torch.int16 if self.scales.shape[1] <= 32767 else torch.int32
            tensors["group_index"] = self.group_index.to(dtype)
        return tensors

    @property
    def compute_bits(self) -> float:
        """The grid width, as GPTQ tables print it (scales and zero points not counted)."""
        return float(self.bits)
