"""Structured quantized weights: what a method really produces, and the bits it really costs.

Every method returns one of these instead of a fake-quantized float matrix. Each knows how to
``dequantize()`` itself, which packed tensors it stores (``packed_tensors()``), and two bit figures:

- ``storage_bits``: every stored bit (sign and residual planes, bitmaps, column masks, codes, fp16
  scales and means, permutations), counted from the packed tensors themselves;
- ``compute_bits``: the papers' convention (signs per weight, or the grid width), for comparison with
  published tables. It is never the storage figure.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from binq.errors import BinqError
from binq.quant.packing import pack_bits, pack_uint, packed_row_bytes, unpack_bits, unpack_uint


class QuantizedWeight(ABC):
    """A quantized ``(out_features, in_features)`` weight matrix.

    Serialization contract (the checkpoint format builds on it): ``packed_tensors()`` are the stored
    tensors, ``metadata()`` the JSON-able rest, and ``from_packed(tensors, metadata)`` rebuilds an equal
    weight, raising :class:`~binq.errors.BinqError` naming the tensor when one is missing or mis-shaped.
    Each subclass registers its ``layout`` name with :func:`register_layout`.
    """

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

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """What besides the packed tensors is needed to rebuild the weight (JSON-able)."""

    @classmethod
    @abstractmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> QuantizedWeight:
        """Rebuild a weight from :meth:`packed_tensors` and :meth:`metadata`."""

    @property
    @abstractmethod
    def compute_bits(self) -> float:
        """Bits per weight in the papers' convention (see the module docstring)."""

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

    def extra_bit_figures(self) -> dict[str, float]:
        """Further per-weight bit figures a layout reports beside the two above (none by default)."""
        return {}

    def tunable_tensors(self) -> dict[str, str]:
        """The continuous stored tensors that block-wise tuning may change (:mod:`binq.engine.tune`), each
        with its kind: ``"scale"`` (a magnitude, tuned relative to itself) or ``"offset"`` (a shift, tuned
        in units of the layout's scales). Bit planes, bitmaps, codes and indices are never listed: a tuned
        weight has the layout, shapes and storage bits of the one it started from. None by default.

        :meth:`dequantize` must be differentiable in these tensors when they are float32 tensors that
        require grad, and :meth:`with_tensors` must accept them."""
        return {}

    def sign_planes(self) -> tuple[str, ...]:
        """The sign planes (bool, True = +1) that block-wise tuning may flip (``--tune-signs``): a flipped
        plane keeps its shape, so the weight keeps its layout and storage bits. Bitmaps, salient columns,
        codes and indices are never listed. None by default.

        :meth:`with_tensors` must accept a plane either as bool or as a float tensor of sign values
        (``+-1``, see :func:`sign_values`), and :meth:`dequantize` must be differentiable in the latter."""
        return ()

    def with_tensors(self, **tensors: torch.Tensor) -> QuantizedWeight:
        """A copy of this weight with the named tensors (of :meth:`tunable_tensors` or :meth:`sign_planes`)
        replaced."""
        unknown = sorted(set(tensors) - set(self.tunable_tensors()) - set(self.sign_planes()))
        if unknown:
            raise ValueError(f"{self.layout} weights do not tune {', '.join(unknown)}")
        return dataclasses.replace(self, **tensors)  # type: ignore[type-var]


@dataclass(frozen=True)
class WeightSummary:
    """What the report needs of a quantized weight once its tensors are on disk (a streamed run keeps
    these, not the weights): the same bit figures as the :class:`QuantizedWeight` it was made from."""

    layout: str
    shape: tuple[int, int]
    compute_bits: float
    storage_bits_total: int
    layout_metadata: dict[str, Any]
    extra_figures: dict[str, float]

    @classmethod
    def of(cls, weight: QuantizedWeight) -> WeightSummary:
        return cls(
            weight.layout, tuple(weight.shape), weight.compute_bits, weight.storage_bits_total,
            weight.metadata(), weight.extra_bit_figures(),
        )  # fmt: skip

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def storage_bits(self) -> float:
        return self.storage_bits_total / self.numel

    def metadata(self) -> dict[str, Any]:
        return self.layout_metadata

    def extra_bit_figures(self) -> dict[str, float]:
        return self.extra_figures


_LAYOUTS: dict[str, type[QuantizedWeight]] = {}


def register_layout(cls: type[QuantizedWeight]) -> type[QuantizedWeight]:
    """Class decorator: make ``cls`` loadable by its ``layout`` name."""
    name = cls.layout
    if name in _LAYOUTS:
        raise ValueError(f"layout {name!r} registered twice")
    _LAYOUTS[name] = cls
    return cls


def layout_class(name: str) -> type[QuantizedWeight]:
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise BinqError(f"unknown weight layout '{name}' (known: {', '.join(sorted(_LAYOUTS))})") from None


def require_tensor(
    tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """``tensors[name]``, checked for presence, shape, dtype and (floats) finiteness."""
    if name not in tensors:
        raise BinqError(f"tensor '{name}' is missing")
    tensor = tensors[name]
    if tuple(tensor.shape) != tuple(shape):
        raise BinqError(f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if tensor.dtype != dtype:
        raise BinqError(f"tensor '{name}' has dtype {tensor.dtype}, expected {dtype}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BinqError(f"tensor '{name}' has non-finite values")
    return tensor


def _unexpected_tensors(tensors: dict[str, torch.Tensor], known: set[str]) -> None:
    extra = sorted(set(tensors) - known)
    if extra:
        raise BinqError(f"unexpected tensor(s) {', '.join(extra)}")


def sign_values(plane: torch.Tensor) -> torch.Tensor:
    """A sign plane as float ``+-1`` values: a bool plane maps True to +1 and False to -1; a float plane
    (sign values being tuned, :meth:`QuantizedWeight.sign_planes`) is taken as it is, gradient included."""
    if plane.dtype == torch.bool:
        return plane.float() * 2 - 1
    return plane.float()


def _block_index(cols: int, block_size: int) -> torch.Tensor:
    return torch.arange(cols) // block_size


ZONE_DENSE = "dense"
ZONE_CONCENTRATED = "concentrated"
ZONE_SPARSE = "sparse"
ZONE_SALIENT = "salient"
ZONE_SALIENT_RESIDUAL = "salient_residual"
ZONE_SALIENT_CONCENTRATED = "salient_concentrated"
ZONE_SALIENT_CONCENTRATED_RESIDUAL = "salient_concentrated_residual"
ZONE_SALIENT_SPARSE = "salient_sparse"
ZONE_SALIENT_SPARSE_RESIDUAL = "salient_sparse_residual"


@register_layout
@dataclass
class BinaryWeight(QuantizedWeight):
    """Sign-based weight with per-(row, column block, zone) fp16 scales, optional means and column scales.

    Zones: non-salient columns use ``concentrated`` / ``sparse`` (picked by ``group_bitmap``) or one
    ``dense`` zone without a bitmap; salient columns use ``salient`` plus ``salient_residual``, or, with
    ``salient_groups`` (ARB's column-group bitmap, CGB), the bitmap splits them too into
    ``salient_concentrated`` / ``salient_sparse``, each with its own residual zone. ``zone_names`` gives
    the order of the last axis of ``scales`` and ``means``.

    A weight ``W[i, j]`` in column block ``b = j // block_size`` is one term per order,
    ``alpha[i, b, z] * c[j, z] * s[i, j] + mu[i, b, z]``: non-salient columns have one term (sign plane
    ``signs``), salient columns two (``signs``, then ``residual_signs``). ``c`` is 1 unless column scales
    are stored (ARB-RC): ``column_scales[k, z]`` for the k-th non-salient column and non-salient zone z,
    ``salient_column_scales[k, z']`` for the k-th salient column and salient zone z' (zones counted
    from the first salient one). Signs are bits (True = +1; a zero maps to +1); the residual plane holds
    the salient columns only, in column order.

    This one layout covers XNOR sign binarization (one zone), Q1_0-style sign + per-group scale,
    BiLLM (four zones), W(1+1) (two zones) and the ARB family (means or row x column scales, CGB).
    """

    signs: torch.Tensor  # bool (rows, cols)
    scales: torch.Tensor  # float16 (rows, blocks, zones)
    block_size: int
    means: torch.Tensor | None = None  # float16 (rows, blocks, zones)
    group_bitmap: torch.Tensor | None = None  # bool (rows, cols): True = sparse zone
    salient_columns: torch.Tensor | None = None  # bool (cols,)
    residual_signs: torch.Tensor | None = None  # bool (rows, n_salient)
    salient_groups: bool = False  # CGB: the bitmap splits salient columns too
    column_scales: torch.Tensor | None = None  # float16 (cols - n_salient, non-salient zones)
    salient_column_scales: torch.Tensor | None = None  # float16 (n_salient, salient zones)
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
        if self.salient_groups and (self.salient_columns is None or self.group_bitmap is None):
            raise ValueError("salient_groups needs salient columns and a group bitmap")
        n_salient = 0 if self.salient_columns is None else int(self.salient_columns.sum())
        if self.residual_signs is not None and tuple(self.residual_signs.shape) != (rows, n_salient):
            raise ValueError("residual_signs must be (rows, number of salient columns)")
        needs_salient_scales = self.column_scales is not None and self.salient_columns is not None
        if needs_salient_scales != (self.salient_column_scales is not None):
            raise ValueError(
                "column_scales and salient_column_scales go together (the latter only with salient columns)"
            )
        if self.column_scales is not None:
            expected = (cols - n_salient, len(self._nonsalient_zones()))
            if tuple(self.column_scales.shape) != expected:
                raise ValueError(f"column_scales shape {tuple(self.column_scales.shape)} != {expected}")
        if self.salient_column_scales is not None:
            expected = (n_salient, len(self._salient_zones()))
            if tuple(self.salient_column_scales.shape) != expected:
                raise ValueError(f"salient_column_scales shape {tuple(self.salient_column_scales.shape)} != {expected}")

    def _nonsalient_zones(self) -> list[str]:
        return [ZONE_CONCENTRATED, ZONE_SPARSE] if self.group_bitmap is not None else [ZONE_DENSE]

    def _salient_zones(self) -> list[str]:
        if self.salient_columns is None:
            return []
        if self.salient_groups:
            return [
                ZONE_SALIENT_CONCENTRATED,
                ZONE_SALIENT_CONCENTRATED_RESIDUAL,
                ZONE_SALIENT_SPARSE,
                ZONE_SALIENT_SPARSE_RESIDUAL,
            ]
        return [ZONE_SALIENT, ZONE_SALIENT_RESIDUAL]

    @property
    def zone_names(self) -> list[str]:
        return self._nonsalient_zones() + self._salient_zones()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)  # type: ignore[return-value]

    def _column_scale_table(self) -> torch.Tensor | None:
        """``c[j, z]`` for every column and zone (1 where a zone does not apply), or None."""
        if self.column_scales is None:
            return None
        cols = self.shape[1]
        n_plain = len(self._nonsalient_zones())
        table = torch.ones(cols, len(self.zone_names))
        salient = self._salient_mask()
        table[~salient, :n_plain] = self.column_scales.float()
        if self.salient_column_scales is not None:
            table[salient, n_plain:] = self.salient_column_scales.float()
        return table

    def _salient_mask(self) -> torch.Tensor:
        if self.salient_columns is None:
            return torch.zeros(self.shape[1], dtype=torch.bool)
        return self.salient_columns.cpu()

    def _zone_term(
        self, signs: torch.Tensor, zone: torch.Tensor, columns: torch.Tensor, column_table: torch.Tensor | None
    ) -> torch.Tensor:
        """alpha * c * s + mu for the given columns, zone index per element."""
        block = _block_index(self.shape[1], self.block_size)[columns]
        rows = signs.shape[0]
        idx = block.unsqueeze(0).expand(rows, -1) * self.scales.shape[2] + zone
        scale = torch.gather(self.scales.float().reshape(rows, -1), 1, idx)
        if column_table is not None:
            scale = scale * column_table[columns.unsqueeze(0).expand(rows, -1), zone]
        term = scale * sign_values(signs)
        if self.means is not None:
            term = term + torch.gather(self.means.float().reshape(rows, -1), 1, idx)
        return term

    def element_zones(self) -> torch.Tensor:
        """The zone (index into ``zone_names``) of every element's first term, ``(rows, cols)``."""
        rows, cols = self.shape
        names = self.zone_names
        bitmap = self.group_bitmap.cpu() if self.group_bitmap is not None else torch.zeros(rows, cols, dtype=torch.bool)
        zone = bitmap.long() * (1 if self.group_bitmap is not None else 0)
        if self.salient_columns is not None:
            salient = self._salient_mask().unsqueeze(0).expand(rows, -1)
            if self.salient_groups:
                salient_zone = torch.where(
                    bitmap, names.index(ZONE_SALIENT_SPARSE), names.index(ZONE_SALIENT_CONCENTRATED)
                )
            else:
                salient_zone = torch.full_like(zone, names.index(ZONE_SALIENT))
            zone = torch.where(salient, salient_zone, zone)
        return zone

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        cols = self.shape[1]
        table = self._column_scale_table()
        zone = self.element_zones()
        out = self._zone_term(self.signs.cpu(), zone, torch.arange(cols), table)
        if self.salient_columns is not None:
            sal = torch.nonzero(self._salient_mask()).flatten()
            # Each salient zone's residual zone follows it in zone_names.
            out[:, sal] = out[:, sal] + self._zone_term(self.residual_signs.cpu(), zone[:, sal] + 1, sal, table)
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
        if self.column_scales is not None:
            tensors["column_scales"] = self.column_scales.to(torch.float16)
        if self.salient_column_scales is not None:
            tensors["salient_column_scales"] = self.salient_column_scales.to(torch.float16)
        return tensors

    def metadata(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "block_size": self.block_size, "salient_groups": self.salient_groups}

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> BinaryWeight:
        rows, cols = _metadata_shape(metadata)
        block_size = _metadata_int(metadata, "block_size")
        salient_groups = metadata.get("salient_groups", False)
        if not isinstance(salient_groups, bool):
            raise BinqError(f"metadata 'salient_groups' must be true or false, got {salient_groups!r}")
        _unexpected_tensors(
            tensors,
            {
                "signs",
                "scales",
                "means",
                "group_bitmap",
                "salient_columns",
                "residual_signs",
                "column_scales",
                "salient_column_scales",
            },
        )
        row_bytes = packed_row_bytes(cols)
        signs = unpack_bits(require_tensor(tensors, "signs", (rows, row_bytes), torch.uint8), cols)
        bitmap = None
        if "group_bitmap" in tensors:
            bitmap = unpack_bits(require_tensor(tensors, "group_bitmap", (rows, row_bytes), torch.uint8), cols)
        salient = residual = None
        n_salient = 0
        if "salient_columns" in tensors or "residual_signs" in tensors:
            salient = unpack_bits(require_tensor(tensors, "salient_columns", (1, row_bytes), torch.uint8), cols)[0]
            n_salient = int(salient.sum())
            packed = require_tensor(tensors, "residual_signs", (rows, packed_row_bytes(n_salient)), torch.uint8)
            residual = unpack_bits(packed, n_salient)
        n_plain = 2 if bitmap is not None else 1
        n_salient_zones = 0 if salient is None else (4 if salient_groups else 2)
        scale_shape = (rows, math.ceil(cols / block_size), n_plain + n_salient_zones)
        scales = require_tensor(tensors, "scales", scale_shape, torch.float16)
        means = require_tensor(tensors, "means", scale_shape, torch.float16) if "means" in tensors else None
        column_scales = salient_column_scales = None
        if "column_scales" in tensors:
            column_scales = require_tensor(tensors, "column_scales", (cols - n_salient, n_plain), torch.float16)
            if salient is not None:
                salient_column_scales = require_tensor(
                    tensors, "salient_column_scales", (n_salient, n_salient_zones), torch.float16
                )
        if "salient_column_scales" in tensors and salient_column_scales is None:  # never silently ignored
            raise BinqError("tensor 'salient_column_scales' needs 'column_scales' and salient columns")
        try:
            return cls(
                signs=signs, scales=scales, block_size=block_size, means=means, group_bitmap=bitmap,
                salient_columns=salient, residual_signs=residual, salient_groups=salient_groups,
                column_scales=column_scales, salient_column_scales=salient_column_scales,
            )  # fmt: skip
        except ValueError as exc:
            raise BinqError(str(exc)) from None

    def tunable_tensors(self) -> dict[str, str]:
        kinds = {"scales": "scale", "means": "offset", "column_scales": "scale", "salient_column_scales": "scale"}
        return {name: kind for name, kind in kinds.items() if getattr(self, name) is not None}

    def sign_planes(self) -> tuple[str, ...]:
        return ("signs",) if self.residual_signs is None else ("signs", "residual_signs")

    @property
    def compute_bits(self) -> float:
        """BiLLM's Eq. 14 convention: one sign per weight plus one per residual (salient) weight."""
        residual = 0 if self.residual_signs is None else self.residual_signs.numel()
        return (self.numel + residual) / self.numel


@dataclass
class BinaryPlanes:
    """A :class:`BinaryWeight` being filled in block by block, on the working device and in its dtype.

    Every plane starts at zero (False); a method writes the columns and blocks it fits, then
    :meth:`finish` stores what its layout has (scales and means rounded to fp16, on the CPU).
    """

    signs: torch.Tensor  # bool (rows, cols)
    group_bitmap: torch.Tensor  # bool (rows, cols)
    residual_signs: torch.Tensor  # bool (rows, cols); only the salient columns are stored
    salient_columns: torch.Tensor  # bool (cols,)
    scales: torch.Tensor  # (rows, blocks, zones)
    means: torch.Tensor  # (rows, blocks, zones)

    @classmethod
    def zeros(cls, weight: torch.Tensor, block_size: int, zones: int) -> BinaryPlanes:
        """Empty planes for ``weight`` (rows, cols) in blocks of ``block_size`` columns."""
        rows, cols = weight.shape
        signs = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
        blocks = math.ceil(cols / block_size)
        scales = torch.zeros(rows, blocks, zones, dtype=weight.dtype, device=weight.device)
        return cls(
            signs=signs,
            group_bitmap=torch.zeros_like(signs),
            residual_signs=torch.zeros_like(signs),
            salient_columns=torch.zeros(cols, dtype=torch.bool, device=weight.device),
            scales=scales,
            means=torch.zeros_like(scales),
        )

    def finish(
        self, block_size: int, means: bool = True, group_bitmap: bool = True, salient: bool = False, **layout: Any
    ) -> BinaryWeight:
        """The stored weight, with means, the group bitmap and the salient planes only where the layout
        has them; ``layout`` passes the other fields of :class:`BinaryWeight` through."""
        return BinaryWeight(
            signs=self.signs.cpu(),
            scales=self.scales.half().cpu(),
            block_size=block_size,
            means=self.means.half().cpu() if means else None,
            group_bitmap=self.group_bitmap.cpu() if group_bitmap else None,
            salient_columns=self.salient_columns.cpu() if salient else None,
            residual_signs=self.residual_signs[:, self.salient_columns].cpu() if salient else None,
            **layout,
        )


def _metadata_int(metadata: dict[str, Any], key: str) -> int:
    value = metadata.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BinqError(f"metadata '{key}' must be a positive integer, got {value!r}")
    return value


def _metadata_shape(metadata: dict[str, Any]) -> tuple[int, int]:
    shape = metadata.get("shape")
    # type(v) is int: a JSON true is not a size, although Python's bool is an int.
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v > 0 for v in shape)):
        raise BinqError(f"metadata 'shape' must be [rows, cols] of positive integers, got {shape!r}")
    return shape[0], shape[1]


@register_layout
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
        out = torch.empty(self.shape, dtype=dtype, device=self.codes.device)
        # Row by row block: the expanded scales and zeros are each as large as the matrix.
        step = max(1, (1 << 22) // max(1, self.shape[1]))
        for start in range(0, self.shape[0], step):
            rows = slice(start, start + step)
            scale = self.scales[rows].float()[:, group]
            if self.zeros is None:
                zero = torch.full_like(scale, 2 ** (self.bits - 1))
            else:
                zero = self.zeros[rows].float()[:, group]
            out[rows] = scale * (self.codes[rows].float() - zero)
        return out

    def tunable_tensors(self) -> dict[str, str]:
        return {"scales": "scale"}  # zero points are grid codes: they stay

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"codes": pack_uint(self.codes, self.bits), "scales": self.scales.to(torch.float16)}
        if self.zeros is not None:
            tensors["zeros"] = pack_uint(self.zeros, self.bits)
        if self.group_index is not None:
            # int16 holds every group index of layers up to 32767 groups wide.
            dtype = torch.int16 if self.scales.shape[1] <= 32767 else torch.int32
            tensors["group_index"] = self.group_index.to(dtype)
        return tensors

    def metadata(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> UniformWeight:
        rows, cols = _metadata_shape(metadata)
        bits = _metadata_int(metadata, "bits")
        if bits > 8:
            raise BinqError(f"metadata 'bits' must be at most 8, got {bits}")
        group_size = _metadata_int(metadata, "group_size")
        _unexpected_tensors(tensors, {"codes", "scales", "zeros", "group_index"})
        codes = unpack_uint(
            require_tensor(tensors, "codes", (rows, packed_row_bytes(cols, bits)), torch.uint8), cols, bits
        )
        group_index = None
        if "group_index" in tensors:
            raw = tensors["group_index"]
            if raw.dtype not in (torch.int16, torch.int32) or tuple(raw.shape) != (cols,):
                raise BinqError(f"tensor 'group_index' must be int16/int32 of shape ({cols},)")
            group_index = raw.long()
            if group_index.numel() and int(group_index.min()) < 0:
                raise BinqError("tensor 'group_index' has negative entries")
            groups = int(group_index.max()) + 1 if group_index.numel() else 0
            stored = tensors.get("scales")
            if stored is not None and stored.dim() == 2 and stored.shape[1] < groups:
                raise BinqError(f"tensor 'group_index' names group {groups - 1}, but 'scales' holds {stored.shape[1]}")
        else:
            groups = math.ceil(cols / group_size)
        scales = require_tensor(tensors, "scales", (rows, groups), torch.float16)
        zeros = None
        if "zeros" in tensors:
            packed = require_tensor(tensors, "zeros", (rows, packed_row_bytes(groups, bits)), torch.uint8)
            zeros = unpack_uint(packed, groups, bits)
        return cls(codes=codes, scales=scales, bits=bits, group_size=group_size, zeros=zeros, group_index=group_index)

    @property
    def compute_bits(self) -> float:
        """The grid width, as GPTQ tables print it (scales and zero points not counted)."""
        return float(self.bits)
