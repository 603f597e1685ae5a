"""Triton kernels for CUDA: ``y = x W^T + b`` straight from the packed tensors of every layout binq writes.

One kernel per layout (``binary``, ``uniform``, ``multiscale``; the bit layouts are in
:mod:`binq.quant.structured`, :mod:`binq.quant.multiscale` and :mod:`binq.quant.packing`). Each program
computes ``BLOCK_N`` output features for ``BLOCK_M`` rows of ``x`` and walks the input features in steps
of ``BLOCK_G`` groups of 8 columns. The 8 values of column group ``g`` fill exactly ``bits`` bytes of a
packed row (bytes ``g * bits .. g * bits + bits - 1`` of the little-endian stream), so a step loads those
bytes once as one integer and takes value ``t`` of every group at the compile-time shift ``t * bits``.
The weight tile is rebuilt in float32 exactly as the layout's ``dequantize`` computes it, then

- ``BLOCK_M == 1`` (decode, the W1A16 GEMV): float32 multiply-adds, summed across the row at the end;
- ``BLOCK_M == 16`` (any larger M, in blocks of 16 rows): ``tl.dot`` with float32 accumulation, in
  float32 with ``input_precision="ieee"`` for float32 ``x`` (Triton's default would be TF32) and with
  the weight tile rounded to ``x``'s dtype for fp16/bf16 ``x`` (tensor cores; the reference path
  rounds its dense weight the same way). Prefill (M in the hundreds) runs the same kernel, re-decoding
  the weight for every 16 rows: correct, not tuned.

Nothing dense is ever kept. The one-time preparation (``BinaryLinear.kernel_state``) holds views of the
packed tensors plus, for ``binary``, the salient column list (int32) and, with column scales, one fp16
``(in_features, zones)`` table; for ``multiscale`` with exact zeros, the values of those weights (the
kernel multiplies them like any other weight, and the launch subtracts them again).

The registered kernels take CUDA inputs whose module has its packed tensors on the same device (and
never inside ``kernels.reference_only()``). Triton is imported on the first such input, never when binq
is imported: the functions below are plain Python until :func:`_build` decorates them with
``triton.jit`` and puts the decorated functions (and ``triton.language`` as ``tl``) in this module's
globals, where Triton resolves a kernel's helpers. Triton's CPU interpreter (``TRITON_INTERPRET=1``,
which runs the kernels on CPU tensors; the tests use it through :func:`triton_linear`) is chosen when
Triton defines a function, its own ``triton.language`` helpers included, so it must be set before
Triton is first imported in the process. docs/TRITON.md says what is verified and what waits for a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from binq.quant.grouping import index_bits
from binq.quant.packing import packed_row_bytes, unpack_bits

if TYPE_CHECKING:
    import triton.language as tl

    from binq.nn.binary_linear import BinaryLinear

logger = logging.getLogger(__name__)

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------------
# Device code (plain functions until _build() decorates them).
# --------------------------------------------------------------------------------------------------------


def _load_word(row_ptrs, group, row_bytes, row_ok, BITS: tl.constexpr):
    """Values ``8g .. 8g+7`` of each row of a ``BITS``-bit plane, as one integer of ``8 * BITS`` bits."""
    byte = group * BITS
    word = tl.load(row_ptrs + byte, mask=row_ok & (byte < row_bytes), other=0)
    if BITS <= 4:
        word = word.to(tl.int32)
    else:
        word = word.to(tl.int64)
    for j in tl.static_range(1, BITS):
        part = tl.load(row_ptrs + byte + j, mask=row_ok & (byte + j < row_bytes), other=0)
        word = word | (part.to(word.dtype) << (8 * j))
    return word


def _load_field(row_ptrs, index, row_bytes, mask, BITS: tl.constexpr):
    """Value ``index`` of each row of a ``BITS``-bit plane, ``index`` varying per element (a gather)."""
    bit = index * BITS
    byte = bit >> 3
    word = tl.load(row_ptrs + byte, mask=mask & (byte < row_bytes), other=0).to(tl.int32)
    if 8 % BITS != 0:  # the value may straddle two bytes
        high = tl.load(row_ptrs + byte + 1, mask=mask & (byte + 1 < row_bytes), other=0).to(tl.int32)
        word = word | (high << 8)
    return (word >> (bit & 7)) & ((1 << BITS) - 1)


def _load_x(x_ptr, rows, cols, col_ok, M, stride_xm):
    """``x[rows, cols]`` (zero outside), ``(BLOCK_M, BLOCK_G)``."""
    return tl.load(x_ptr + rows * stride_xm + cols, mask=(rows < M) & col_ok, other=0.0)


def _new_accumulator(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    if BLOCK_M == 1:  # the GEMV keeps per-column partial sums and reduces them once, at the end
        acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


def _accumulate(acc, x, w, BLOCK_M: tl.constexpr, DOT_FP32: tl.constexpr):
    """``acc += x w^T`` for one column of every group: ``x`` is ``(BLOCK_M, BLOCK_G)``, ``w`` float32."""
    if BLOCK_M == 1:
        acc = acc + w * x.to(tl.float32)
    elif DOT_FP32:
        # "ieee": for float32 operands Triton's default is TF32, which keeps 10 bits of mantissa.
        acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    return acc


def _store_output(y_ptr, bias_ptr, acc, rows, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr):
    if BLOCK_M == 1:
        out = tl.sum(acc, axis=1)[None, :]
    else:
        out = acc
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (rows < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + rows * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


def _binary_weights(
    sign, zone, n, col, ok, scales_ptr, means_ptr, column_table_ptr, blocks,
    BLOCK_SIZE: tl.constexpr, ZONES: tl.constexpr, HAS_MEANS: tl.constexpr, HAS_COLUMN_SCALES: tl.constexpr,
):  # fmt: skip
    """One term ``alpha[n, b, z] * c[col, z] * s + mu[n, b, z]`` per element (``BinaryWeight._zone_term``)."""
    index = (n * blocks + col // BLOCK_SIZE) * ZONES + zone
    scale = tl.load(scales_ptr + index, mask=ok, other=0.0).to(tl.float32)
    if HAS_COLUMN_SCALES:
        scale = scale * tl.load(column_table_ptr + col * ZONES + zone, mask=ok, other=0.0).to(tl.float32)
    w = tl.where(sign != 0, scale, -scale)
    if HAS_MEANS:
        w = w + tl.load(means_ptr + index, mask=ok, other=0.0).to(tl.float32)
    return w


def _binary_kernel(
    x_ptr, y_ptr, bias_ptr, M, N, K, stride_xm, stride_ym,
    signs_ptr, bitmap_ptr, salient_ptr, residual_ptr, salient_index_ptr, scales_ptr, means_ptr, column_table_ptr,
    row_bytes, residual_row_bytes, n_salient, blocks,
    BLOCK_SIZE: tl.constexpr, ZONES: tl.constexpr, SALIENT_ZONE: tl.constexpr, HAS_BITMAP: tl.constexpr,
    HAS_SALIENT: tl.constexpr, SALIENT_GROUPS: tl.constexpr, HAS_MEANS: tl.constexpr,
    HAS_COLUMN_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    n = offs_n.to(tl.int64)[:, None]
    n_ok = n < N
    sign_rows = signs_ptr + n * row_bytes
    bitmap_rows = bitmap_ptr + n * row_bytes
    step = tl.arange(0, BLOCK_G)[None, :]
    acc = _new_accumulator(BLOCK_M, BLOCK_N, BLOCK_G)
    # First-order term of every column (sign plane `signs`). Zone: the bitmap bit for plain columns (one
    # dense zone without a bitmap); SALIENT_ZONE for salient ones, plus 2 for sparse ones under CGB.
    for g0 in range(0, tl.cdiv(K, 8), BLOCK_G):
        group = g0 + step
        sign_bits = _load_word(sign_rows, group, row_bytes, n_ok, 1)
        if HAS_BITMAP:
            sparse_bits = _load_word(bitmap_rows, group, row_bytes, n_ok, 1)
        if HAS_SALIENT:
            salient_bits = tl.load(salient_ptr + group, mask=group < row_bytes, other=0).to(tl.int32)
        for t in tl.static_range(8):
            col = group * 8 + t
            col_ok = col < K
            if HAS_BITMAP:
                zone = (sparse_bits >> t) & 1
            else:
                zone = tl.zeros((1, BLOCK_G), dtype=tl.int32)
            if HAS_SALIENT:
                if SALIENT_GROUPS:
                    salient_zone = SALIENT_ZONE + 2 * zone
                else:
                    salient_zone = tl.full((1, BLOCK_G), SALIENT_ZONE, dtype=tl.int32)
                zone = tl.where(((salient_bits >> t) & 1) != 0, salient_zone, zone)
            w = _binary_weights(
                (sign_bits >> t) & 1, zone, n, col, n_ok & col_ok, scales_ptr, means_ptr, column_table_ptr,
                blocks, BLOCK_SIZE, ZONES, HAS_MEANS, HAS_COLUMN_SCALES,
            )  # fmt: skip
            acc = _accumulate(acc, _load_x(x_ptr, rows, col, col_ok, M, stride_xm), w, BLOCK_M, DOT_FP32)
    if HAS_SALIENT:
        # Second-order term of the salient columns only: the residual plane holds them in column order
        # (rank r is column salient_index[r]); each salient zone's residual zone follows it.
        residual_rows = residual_ptr + n * residual_row_bytes
        for r0 in range(0, tl.cdiv(n_salient, 8), BLOCK_G):
            rank_group = r0 + step
            residual_bits = _load_word(residual_rows, rank_group, residual_row_bytes, n_ok, 1)
            for t in tl.static_range(8):
                rank = rank_group * 8 + t
                rank_ok = rank < n_salient
                salient_col = tl.load(salient_index_ptr + rank, mask=rank_ok, other=0)
                if SALIENT_GROUPS:
                    sparse = _load_field(bitmap_rows, salient_col, row_bytes, n_ok & rank_ok, 1)
                    residual_zone = SALIENT_ZONE + 1 + 2 * sparse
                else:
                    residual_zone = tl.full((1, BLOCK_G), SALIENT_ZONE + 1, dtype=tl.int32)
                w = _binary_weights(
                    (residual_bits >> t) & 1, residual_zone, n, salient_col, n_ok & rank_ok, scales_ptr,
                    means_ptr, column_table_ptr, blocks, BLOCK_SIZE, ZONES, HAS_MEANS, HAS_COLUMN_SCALES,
                )  # fmt: skip
                x = _load_x(x_ptr, rows, salient_col, rank_ok, M, stride_xm)
                acc = _accumulate(acc, x, w, BLOCK_M, DOT_FP32)
    _store_output(y_ptr, bias_ptr, acc, rows, offs_n, M, N, stride_ym, HAS_BIAS, BLOCK_M)


def _uniform_kernel(
    x_ptr, y_ptr, bias_ptr, M, N, K, stride_xm, stride_ym,
    codes_ptr, scales_ptr, zeros_ptr, group_index_ptr, code_row_bytes, zero_row_bytes, groups,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, ACT_ORDER: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    n = offs_n.to(tl.int64)[:, None]
    n_ok = n < N
    code_rows = codes_ptr + n * code_row_bytes
    zero_rows = zeros_ptr + n * zero_row_bytes
    step = tl.arange(0, BLOCK_G)[None, :]
    acc = _new_accumulator(BLOCK_M, BLOCK_N, BLOCK_G)
    for g0 in range(0, tl.cdiv(K, 8), BLOCK_G):
        group = g0 + step
        code_word = _load_word(code_rows, group, code_row_bytes, n_ok, BITS)
        for t in tl.static_range(8):
            col = group * 8 + t
            col_ok = col < K
            ok = n_ok & col_ok
            if ACT_ORDER:
                quant_group = tl.load(group_index_ptr + col, mask=col_ok, other=0).to(tl.int32)
            else:
                quant_group = col // GROUP_SIZE
            scale = tl.load(scales_ptr + n * groups + quant_group, mask=ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = _load_field(zero_rows, quant_group, zero_row_bytes, ok, BITS).to(tl.float32)
            else:
                zero = tl.full((1, BLOCK_G), 2 ** (BITS - 1), dtype=tl.float32)
            code = ((code_word >> (t * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            w = scale * (code - zero)
            acc = _accumulate(acc, _load_x(x_ptr, rows, col, col_ok, M, stride_xm), w, BLOCK_M, DOT_FP32)
    _store_output(y_ptr, bias_ptr, acc, rows, offs_n, M, N, stride_ym, HAS_BIAS, BLOCK_M)


def _multiscale_kernel(
    x_ptr, y_ptr, bias_ptr, M, N, K, stride_xm, stride_ym,
    signs_ptr, index_ptr, scales_ptr, sign_row_bytes, index_row_bytes, blocks, groups,
    INDEX_BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    n = offs_n.to(tl.int64)[:, None]
    n_ok = n < N
    sign_rows = signs_ptr + n * sign_row_bytes
    index_rows = index_ptr + n * index_row_bytes
    if PER_ROW:
        table = scales_ptr + n * (blocks * groups)
    else:
        table = scales_ptr + tl.zeros((BLOCK_N, 1), dtype=tl.int64)
    step = tl.arange(0, BLOCK_G)[None, :]
    acc = _new_accumulator(BLOCK_M, BLOCK_N, BLOCK_G)
    for g0 in range(0, tl.cdiv(K, 8), BLOCK_G):
        group = g0 + step
        sign_bits = _load_word(sign_rows, group, sign_row_bytes, n_ok, 1)
        if INDEX_BITS > 0:
            index_word = _load_word(index_rows, group, index_row_bytes, n_ok, INDEX_BITS)
        for t in tl.static_range(8):
            col = group * 8 + t
            col_ok = col < K
            slot = (col // BLOCK_SIZE) * groups
            if INDEX_BITS > 0:
                slot = slot + ((index_word >> (t * INDEX_BITS)) & ((1 << INDEX_BITS) - 1))
            scale = tl.load(table + slot, mask=n_ok & col_ok, other=0.0).to(tl.float32)
            w = tl.where(((sign_bits >> t) & 1) != 0, scale, -scale)
            acc = _accumulate(acc, _load_x(x_ptr, rows, col, col_ok, M, stride_xm), w, BLOCK_M, DOT_FP32)
    _store_output(y_ptr, bias_ptr, acc, rows, offs_n, M, N, stride_ym, HAS_BIAS, BLOCK_M)


_DEVICE_FUNCTIONS = (
    "_load_word", "_load_field", "_load_x", "_new_accumulator", "_accumulate", "_store_output",
    "_binary_weights", "_binary_kernel", "_uniform_kernel", "_multiscale_kernel",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Host side: build once, prepare per module, launch.
# --------------------------------------------------------------------------------------------------------


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (asked on the first CUDA input; importing binq never imports Triton)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        logger.warning("Triton is not installed: CUDA layers run binq's reference path (dequantize, then matmul)")
        return False
    return True


@functools.cache
def _build() -> SimpleNamespace:
    """Import Triton and turn the device functions above into Triton functions (once per process)."""
    import triton
    import triton.language

    namespace = globals()
    namespace["tl"] = triton.language
    for name in _DEVICE_FUNCTIONS:
        namespace[name] = triton.jit(namespace[name])
    # Triton 3.9's interpreter multiplies bf16 dot operands as their raw uint16 bits, so under
    # TRITON_INTERPRET bf16 inputs take the float32 dot (see _dot_in_float32).
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return SimpleNamespace(triton=triton, interpreted=interpreted)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one launch: rows of ``x`` per program (1 = the GEMV form; else 16 or more, as
    ``tl.dot`` needs), output features per program, and 8-column groups per reduction step."""

    block_m: int
    block_n: int
    block_g: int
    num_warps: int = 4


def default_tiles(m: int) -> Tiles:
    """Untuned first choices (no GPU measurement yet, docs/TRITON.md)."""
    return Tiles(1, 16, 32) if m == 1 else Tiles(16, 32, 16)


def _dot_in_float32(dtype: torch.dtype, interpreted: bool) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted)


def _launch(
    kernel_name: str,
    x2d: torch.Tensor,
    rows: int,
    bias: torch.Tensor | None,
    layout_args: tuple,
    layout_constants: dict[str, Any],
    tiles: Tiles,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    built = _build()
    m, k = x2d.shape
    y = torch.empty(m, rows, dtype=out_dtype, device=x2d.device)
    if m == 0:
        return y
    grid = (math.ceil(rows / tiles.block_n), math.ceil(m / tiles.block_m))
    kernel = globals()[kernel_name]  # by name: _build() replaced the plain function there
    # Triton launches on the current CUDA device, which need not be x's.
    with torch.cuda.device(x2d.device) if x2d.is_cuda else contextlib.nullcontext():
        kernel[grid](
            x2d, y, x2d if bias is None else bias, m, rows, k, x2d.stride(0), y.stride(0), *layout_args,
            **layout_constants, HAS_BIAS=bias is not None, DOT_FP32=_dot_in_float32(x2d.dtype, built.interpreted),
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_G=tiles.block_g, num_warps=tiles.num_warps,
        )  # fmt: skip
    return y


def _metadata_shape(metadata: dict[str, Any]) -> tuple[int, int]:
    rows, cols = metadata["shape"]
    return int(rows), int(cols)


@dataclass
class BinaryPlan:
    """A ``binary`` weight ready to launch: its packed tensors plus the salient column list and the column
    scale table ``c[j, z]`` (fp16 ``(cols, zones)``, 1 where a zone does not apply), when there are some."""

    shape: tuple[int, int]
    block_size: int
    zones: int
    plain_zones: int
    salient_groups: bool
    signs: torch.Tensor
    scales: torch.Tensor
    means: torch.Tensor | None
    group_bitmap: torch.Tensor | None
    salient_columns: torch.Tensor | None
    residual_signs: torch.Tensor | None
    salient_index: torch.Tensor | None
    column_table: torch.Tensor | None

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> BinaryPlan:
        rows, cols = _metadata_shape(metadata)
        scales = tensors["scales"].contiguous()
        bitmap = tensors.get("group_bitmap")
        plain_zones = 2 if bitmap is not None else 1
        salient_index = column_table = None
        salient_mask = torch.zeros(cols, dtype=torch.bool)
        if "salient_columns" in tensors:
            salient_mask = unpack_bits(tensors["salient_columns"].cpu(), cols)[0]
            salient_index = torch.nonzero(salient_mask).flatten().to(torch.int32).to(scales.device)
        if "column_scales" in tensors:
            column_table = torch.ones(cols, scales.shape[2], dtype=torch.float16, device=scales.device)
            mask = salient_mask.to(scales.device)
            column_table[~mask, :plain_zones] = tensors["column_scales"]
            if salient_index is not None:
                column_table[mask, plain_zones:] = tensors["salient_column_scales"]
        return cls(
            shape=(rows, cols), block_size=int(metadata["block_size"]), zones=scales.shape[2],
            plain_zones=plain_zones, salient_groups=bool(metadata.get("salient_groups", False)),
            signs=tensors["signs"].contiguous(), scales=scales, means=_contiguous(tensors.get("means")),
            group_bitmap=_contiguous(bitmap), salient_columns=_contiguous(tensors.get("salient_columns")),
            residual_signs=_contiguous(tensors.get("residual_signs")), salient_index=salient_index,
            column_table=column_table,
        )  # fmt: skip

    def linear(self, x2d: torch.Tensor, bias: torch.Tensor | None, tiles: Tiles) -> torch.Tensor:
        rows, cols = self.shape
        n_salient = 0 if self.salient_index is None else self.salient_index.numel()
        signs = self.signs
        layout_args = (
            signs, _or(self.group_bitmap, signs), _or(self.salient_columns, signs), _or(self.residual_signs, signs),
            _or(self.salient_index, signs), self.scales, _or(self.means, self.scales),
            _or(self.column_table, self.scales), packed_row_bytes(cols), packed_row_bytes(n_salient), n_salient,
            self.scales.shape[1],
        )  # fmt: skip
        constants = {
            "BLOCK_SIZE": self.block_size, "ZONES": self.zones, "SALIENT_ZONE": self.plain_zones,
            "HAS_BITMAP": self.group_bitmap is not None, "HAS_SALIENT": n_salient > 0,
            "SALIENT_GROUPS": self.salient_groups, "HAS_MEANS": self.means is not None,
            "HAS_COLUMN_SCALES": self.column_table is not None,
        }  # fmt: skip
        return _launch("_binary_kernel", x2d, rows, bias, layout_args, constants, tiles, x2d.dtype)


@dataclass
class UniformPlan:
    """A ``uniform`` weight ready to launch (its packed tensors; nothing is re-packed)."""

    shape: tuple[int, int]
    bits: int
    group_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_index: torch.Tensor | None

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> UniformPlan:
        return cls(
            shape=_metadata_shape(metadata), bits=int(metadata["bits"]), group_size=int(metadata["group_size"]),
            codes=tensors["codes"].contiguous(), scales=tensors["scales"].contiguous(),
            zeros=_contiguous(tensors.get("zeros")), group_index=_contiguous(tensors.get("group_index")),
        )  # fmt: skip

    def linear(self, x2d: torch.Tensor, bias: torch.Tensor | None, tiles: Tiles) -> torch.Tensor:
        rows, cols = self.shape
        groups = self.scales.shape[1]
        layout_args = (
            self.codes, self.scales, _or(self.zeros, self.codes), _or(self.group_index, self.codes),
            packed_row_bytes(cols, self.bits), packed_row_bytes(groups, self.bits), groups,
        )  # fmt: skip
        constants = {
            "BITS": self.bits, "GROUP_SIZE": self.group_size, "HAS_ZEROS": self.zeros is not None,
            "ACT_ORDER": self.group_index is not None,
        }  # fmt: skip
        return _launch("_uniform_kernel", x2d, rows, bias, layout_args, constants, tiles, x2d.dtype)


@dataclass
class MultiScalePlan:
    """A ``multiscale`` weight ready to launch: its packed tensors, plus, when it lists exact zeros, their
    (row, column) and the value the kernel gives them (sign times scale), which the launch subtracts."""

    shape: tuple[int, int]
    block_size: int
    groups: int
    index_bits: int
    signs: torch.Tensor
    group_index: torch.Tensor | None
    scales: torch.Tensor
    zero_rows: torch.Tensor | None = None
    zero_cols: torch.Tensor | None = None
    zero_values: torch.Tensor | None = None

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> MultiScalePlan:
        rows, cols = _metadata_shape(metadata)
        scales = tensors["scales"].contiguous()
        plan = cls(
            shape=(rows, cols), block_size=int(metadata["block_size"]), groups=scales.shape[2],
            index_bits=index_bits(scales.shape[2]), signs=tensors["signs"].contiguous(),
            group_index=_contiguous(tensors.get("group_index")), scales=scales,
        )  # fmt: skip
        positions = tensors.get("zero_positions")
        if positions is not None and positions.numel():
            positions = positions.long()
            plan.zero_rows, plan.zero_cols = positions // cols, positions % cols
            plan.zero_values = plan._values_at(plan.zero_rows, plan.zero_cols)
        return plan

    def _values_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``sign * scale`` at the given elements, float32, computed as the kernel does."""
        sign = _gather_fields(self.signs, rows, cols, 1)
        slot = cols // self.block_size * self.groups
        if self.group_index is not None:
            slot = slot + _gather_fields(self.group_index, rows, cols, self.index_bits)
        table_rows = rows if self.scales.shape[0] > 1 else torch.zeros_like(rows)
        scale = self.scales.reshape(self.scales.shape[0], -1)[table_rows, slot].float()
        return torch.where(sign != 0, scale, -scale)

    def linear(self, x2d: torch.Tensor, bias: torch.Tensor | None, tiles: Tiles) -> torch.Tensor:
        rows, cols = self.shape
        layout_args = (
            self.signs, _or(self.group_index, self.signs), self.scales, packed_row_bytes(cols),
            packed_row_bytes(cols, max(self.index_bits, 1)), self.scales.shape[1], self.groups,
        )  # fmt: skip
        constants = {"INDEX_BITS": self.index_bits, "BLOCK_SIZE": self.block_size, "PER_ROW": self.scales.shape[0] > 1}
        if self.zero_values is None:
            return _launch("_multiscale_kernel", x2d, rows, bias, layout_args, constants, tiles, x2d.dtype)
        y = _launch("_multiscale_kernel", x2d, rows, bias, layout_args, constants, tiles, torch.float32)
        values = self.zero_values
        if tiles.block_m > 1 and not _dot_in_float32(x2d.dtype, _build().interpreted):
            values = values.to(x2d.dtype).float()  # what the tensor-core dot multiplied
        y.index_add_(1, self.zero_rows, -(x2d[:, self.zero_cols].float() * values))
        return y.to(x2d.dtype)


def _gather_fields(plane: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, bits: int) -> torch.Tensor:
    """Value ``index`` of row ``rows`` of a packed ``bits``-bit plane, element by element (int64)."""
    bit = index * bits
    byte = bit // 8
    low = plane[rows, byte].long()
    high = plane[rows, (byte + 1).clamp(max=plane.shape[1] - 1)].long()
    return ((low | (high << 8)) >> (bit % 8)) & ((1 << bits) - 1)


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.contiguous()


def _or(tensor: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a tensor to pass for an absent one (its kernel argument is never read)."""
    return placeholder if tensor is None else tensor


_PLANS = {"binary": BinaryPlan, "uniform": UniformPlan, "multiscale": MultiScalePlan}


def build_plan(layout: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Any:
    """The launch-ready form of a layout's packed tensors (kept by ``BinaryLinear.kernel_state``)."""
    return _PLANS[layout].from_packed(tensors, metadata)


def triton_linear(module: BinaryLinear, x: torch.Tensor, tiles: Tiles | None = None) -> torch.Tensor:
    """``y = x W^T + b`` by the Triton kernel of ``module``'s layout, on ``x``'s device (any device under
    ``TRITON_INTERPRET=1``, CUDA otherwise). ``x`` is fp16, bf16 or fp32; ``y`` has its dtype."""
    plan = module.kernel_state("triton", lambda m: build_plan(m.layout, m.packed_tensors(), m.weight_metadata))
    x2d = x.reshape(-1, module.in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    bias = None if module.bias is None else module.bias.to(x.dtype)
    y = plan.linear(x2d, bias, tiles or default_tiles(x2d.shape[0]))
    return y.reshape(*x.shape[:-1], module.out_features)


class TritonKernel:
    """The registered kernel of one layout family: CUDA inputs, packed tensors on the same device."""

    priority = 20

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.name = f"triton-{layout}"

    def supports(self, module: BinaryLinear, x: torch.Tensor) -> bool:
        if module.layout != self.layout or not x.is_cuda or x.dtype not in INPUT_DTYPES:
            return False
        if x.shape[-1] != module.in_features:
            return False
        if any(t.device != x.device for t in module.packed_tensors().values()):
            return False
        return triton_available()

    def forward(self, module: BinaryLinear, x: torch.Tensor) -> torch.Tensor:
        return triton_linear(module, x)


KERNELS: list[Any] = [TritonKernel("binary"), TritonKernel("uniform"), TritonKernel("multiscale")]
