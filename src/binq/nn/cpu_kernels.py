"""CPU kernels for every packed layout: ``y = x W^T + b`` from the bits, never from a dense weight.

The kernels are C (``binq/nn/cpu/kernels.c``, AVX-512 where the CPU has it, plain C elsewhere),
compiled once per machine on first use with the system C compiler (``cc -O3 -march=native -fopenmp``)
into ``$BINQ_CACHE/kernels`` and called through ctypes. The library links the OpenMP runtime that torch
already loaded, so kernel threads and torch's threads are one pool. Why C and not numba: measured on
this project's CPU, numba's loops over bit planes did not vectorize (scalar table look-ups, slower than
torch fp32 on 4096-wide matrices), while one AVX-512 masked add sums 16 columns of a sign plane.

Each layout is re-packed once per module (``BinaryLinear.kernel_state``) into rows of 16-column chunks
(uint16, column ``16 t + k`` at bit ``k`` of chunk ``t``): the same bits as the checkpoint, only
aligned, plus fp32 copies of the fp16 scales. The decode path (``M <= DECODE_TOKENS``) runs the
bit-plane kernels; prefill dequantizes ``TILE_ROWS`` rows at a time into one scratch tile and
multiplies it with torch (sgemm), so no whole dense weight ever exists.

``BINQ_CPU_KERNELS=off`` disables them, ``=portable`` builds the plain-C path (tests check both).
Without a C compiler binq warns once and runs the reference path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binq.nn.binary_linear import BinaryLinear
from binq.quant.grouping import index_bits
from binq.quant.packing import unpack_bits, unpack_uint

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "cpu" / "kernels.c"
DECODE_TOKENS = 8  # up to this many tokens per call the bit-plane kernels run; above, dequantized tiles
TILE_ROWS = 1024  # rows per dequantized tile in the prefill path (4 MiB of fp32 at 1024 columns)

_c_int, _c_ptr = ctypes.c_int, ctypes.c_void_p


class _BinaryPart(ctypes.Structure):
    _fields_ = [
        ("chunks", _c_int),
        *[(n, _c_ptr) for n in ("colmap", "block_chunk", "signs", "bitmap")],
        ("zone0", _c_int),
        ("zone1", _c_int),
        ("colscale", _c_ptr),
    ]


class _Binary(ctypes.Structure):
    _fields_ = [
        *[(n, _c_int) for n in ("rows", "blocks", "zones", "cols", "nparts")],
        ("scales", _c_ptr),
        ("means", _c_ptr),
        ("parts", _BinaryPart * 3),
    ]


class _Uniform(ctypes.Structure):
    _fields_ = [
        *[(n, _c_int) for n in ("rows", "chunks", "bits", "groups", "cols", "mode")],
        *[(n, _c_ptr) for n in ("planes", "group_chunk", "colmap", "scales", "zeros", "nibbles")],
    ]


class _MultiScale(ctypes.Structure):
    _fields_ = [
        *[(n, _c_int) for n in ("rows", "chunks", "ibits", "groups", "blocks", "block_chunks", "per_row")],
        *[(n, _c_ptr) for n in ("signs", "index", "scales", "zrow", "zcol")],
    ]


# --------------------------------------------------------------------------- building the library

_library: ctypes.CDLL | None = None
_library_tried = False


def kernel_variant() -> str:
    """``native`` (default), ``portable`` (plain C, no AVX-512) or ``off``, from ``BINQ_CPU_KERNELS``."""
    variant = os.environ.get("BINQ_CPU_KERNELS", "native").strip().lower() or "native"
    return variant if variant in ("native", "portable", "off") else "native"


def _cache_dir() -> Path:
    root = os.environ.get("BINQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "binq")
    return Path(root) / "kernels"


def _torch_openmp() -> Path | None:
    candidate = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    return candidate if candidate.is_file() else None


def _compile(target: Path, variant: str) -> None:
    """Build the kernels into ``target``; with OpenMP (torch's runtime) where the compiler has it, else
    single-threaded (Apple's clang, for one, has no ``-fopenmp``)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) found")
    flags = ["-O3", "-fPIC", "-shared", "-std=c11"]
    flags += ["-march=native"] if variant == "native" else ["-mno-avx512f"]
    gomp = _torch_openmp()
    openmp = ["-fopenmp", *([str(gomp), f"-Wl,-rpath,{gomp.parent}"] if gomp is not None else [])]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        out = Path(scratch) / target.name
        failures = []
        for extra in (openmp, []):
            command = [compiler, *flags, "-o", str(out), str(SOURCE), *extra, "-lm"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                if not extra:
                    log.warning("binq CPU kernels built without OpenMP: they run on one thread (%s)", failures[0])
                os.replace(out, target)  # atomic: a concurrent process sees the old file or the whole new one
                return
            failures.append(f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}")
        raise RuntimeError(failures[-1])


def load_library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None with one warning when they cannot be had."""
    global _library, _library_tried
    if _library_tried:
        return _library
    _library_tried = True
    variant = kernel_variant()
    if variant == "off":
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + variant.encode()).hexdigest()[:16]
    target = _cache_dir() / f"binq_kernels-{digest}-{variant}.so"
    try:
        if not target.is_file():
            _compile(target, variant)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as error:
        log.warning("binq CPU kernels unavailable, quantized linears run the slow reference path (%s)", error)
        return None
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    library.binq_binary_gemm.argtypes = [ptr, i32, ptr, ptr, ptr, i32]
    library.binq_uniform_gemm.argtypes = [ptr, i32, ptr, ptr, ptr, i32]
    library.binq_multiscale_gemm.argtypes = [ptr, i32, i32, ptr, ptr, ptr, i32]
    library.binq_half_gemm.argtypes = [i32, i32, i32, ptr, ptr, ptr, ptr, i32]
    for name in ("binq_binary_gemm", "binq_uniform_gemm", "binq_multiscale_gemm"):
        getattr(library, name).restype = i32
    for name in ("binq_binary_dequant", "binq_uniform_dequant", "binq_multiscale_dequant"):
        getattr(library, name).argtypes = [ptr, i32, i32, ptr, i32]
        getattr(library, name).restype = None
    library.binq_half_gemm.restype = None
    f32 = ctypes.c_float
    library.binq_add_rms_norm.argtypes = [i32, i32, ptr, ptr, ptr, f32, ptr]
    library.binq_add_rms_norm.restype = None
    library.binq_silu_mul.argtypes = [i32, ptr, ptr, ptr]
    library.binq_silu_mul.restype = None
    library.binq_attention_step.argtypes = [i32, i32, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, f32, ptr, i32]
    library.binq_attention_step.restype = i32
    _library = library
    return library


def isa() -> str:
    """Which path the loaded kernels run: ``avx512``, ``portable`` or ``none``."""
    library = load_library()
    if library is None:
        return "none"
    return "avx512" if library.binq_isa() == 512 else "portable"


# --------------------------------------------------------------------------- re-packing


def chunk_plane(bits: np.ndarray, width: int) -> np.ndarray:
    """Bool ``(rows, n)`` -> uint16 ``(rows, width // 16)``: column ``16 t + k`` at bit ``k`` of chunk ``t``."""
    rows, n = bits.shape
    padded = np.zeros((rows, width), dtype=bool)
    padded[:, :n] = bits
    return np.ascontiguousarray(np.packbits(padded, axis=1, bitorder="little")).view("<u2")


def _chunks(cols: int) -> int:
    return math.ceil(cols / 16)


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().float().numpy())


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _block_chunks(block_size: int, cols: int) -> int | None:
    """Chunks per column block, or None when blocks do not start on chunk boundaries (reference path)."""
    if block_size >= cols:
        return _chunks(cols)
    return block_size // 16 if block_size % 16 == 0 else None


@dataclass
class Prepared:
    """A layout re-packed for the C kernels; ``arrays`` keeps the memory the struct points to alive."""

    kind: str
    struct: ctypes.Structure
    arrays: dict[str, np.ndarray]
    rows: int
    cols: int
    width: int  # padded activation width the dequantized tiles have (the source width for uniform)

    @property
    def address(self) -> int:
        return ctypes.addressof(self.struct)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def block_runs(columns: np.ndarray, block_of: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather ``columns`` per block (``block_of`` each column's block, non-decreasing), each block's run
    padded to whole chunks.

    Returns ``colmap`` (the source column at each position, -1 for padding) and ``block_chunk``
    (``blocks + 1`` chunk offsets). Column blocks of the binary layout and groups of the uniform one
    (act-order groups included) are laid out this way.
    """
    counts = np.bincount(block_of, minlength=blocks)
    block_chunk = np.zeros(blocks + 1, dtype=np.int32)
    block_chunk[1:] = np.cumsum((counts + 15) // 16)
    colmap = np.full(int(block_chunk[-1]) * 16, -1, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(columns.size) - starts[block_of]  # position of each column within its block
    colmap[block_chunk[block_of] * 16 + rank] = columns
    return colmap, block_chunk


def _gather_plane(plane: np.ndarray, colmap: np.ndarray) -> np.ndarray:
    """A bool ``(rows, n)`` plane at the part's positions (padding False), as uint16 chunks."""
    gathered = plane[:, np.maximum(colmap, 0)] & (colmap >= 0)
    return chunk_plane(gathered, colmap.size)


def prepare_binary(module: BinaryLinear) -> Prepared | None:
    t = module.packed_tensors()
    meta = module.weight_metadata
    rows, cols = module.out_features, module.in_features
    block_size = int(meta["block_size"])
    scales = _f32(t["scales"])
    blocks, zones = scales.shape[1], scales.shape[2]
    signs = unpack_bits(t["signs"], cols).numpy()
    bitmap = unpack_bits(t["group_bitmap"], cols).numpy() if "group_bitmap" in t else None
    nplain = 1 if bitmap is None else 2
    salient = np.zeros(cols, dtype=bool)
    if "salient_columns" in t:
        salient = unpack_bits(t["salient_columns"], cols)[0].numpy()
    plain_cols, salient_cols = np.flatnonzero(~salient), np.flatnonzero(salient)
    a: dict[str, np.ndarray] = {"scales": scales}
    if "means" in t:
        a["means"] = _f32(t["means"])
    parts = []  # (columns, sign plane over all columns, bitmap or None, zone0, zone1, column scales (n, 2) or None)
    plain_scales = _f32(t["column_scales"]) if "column_scales" in t else None
    if plain_scales is not None and nplain == 1:
        plain_scales = np.concatenate([plain_scales, np.zeros_like(plain_scales)], axis=1)
    parts.append((plain_cols, signs, bitmap, 0, 1, plain_scales))
    if salient_cols.size:
        n_sal = salient_cols.size
        residual = np.zeros((rows, cols), dtype=bool)
        residual[:, salient_cols] = unpack_bits(t["residual_signs"], n_sal).numpy()
        sal_scales = _f32(t["salient_column_scales"]) if "salient_column_scales" in t else None
        if meta.get("salient_groups", False):  # CGB: the bitmap picks concentrated/sparse, each + residual
            first = sal_scales[:, [0, 2]] if sal_scales is not None else None
            second = sal_scales[:, [1, 3]] if sal_scales is not None else None
            parts.append((salient_cols, signs, bitmap, nplain, nplain + 2, first))
            parts.append((salient_cols, residual, bitmap, nplain + 1, nplain + 3, second))
        else:
            pad = None if sal_scales is None else np.zeros((n_sal, 1), np.float32)
            first = None if sal_scales is None else np.concatenate([sal_scales[:, :1], pad], axis=1)
            second = None if sal_scales is None else np.concatenate([sal_scales[:, 1:2], pad], axis=1)
            parts.append((salient_cols, signs, None, nplain, nplain, first))
            parts.append((salient_cols, residual, None, nplain + 1, nplain + 1, second))
    structs = []
    for index, (columns, plane, zone_plane, zone0, zone1, column_scales) in enumerate(parts):
        colmap, block_chunk = block_runs(columns, columns // block_size, blocks)
        a[f"colmap{index}"], a[f"block_chunk{index}"] = colmap, block_chunk
        a[f"signs{index}"] = _gather_plane(plane, colmap)
        if zone_plane is not None:
            a[f"bitmap{index}"] = _gather_plane(zone_plane, colmap)
        if column_scales is not None:  # (n, 2) per column of this part -> (2, positions)
            rank = np.full(cols, -1, dtype=np.int64)
            rank[columns] = np.arange(columns.size)
            full = np.zeros((2, colmap.size), dtype=np.float32)
            valid = colmap >= 0
            full[:, valid] = column_scales[rank[colmap[valid]]].T
            a[f"colscale{index}"] = np.ascontiguousarray(full)
        structs.append(
            _BinaryPart(
                chunks=colmap.size // 16,
                colmap=_ptr(colmap),
                block_chunk=_ptr(block_chunk),
                signs=_ptr(a[f"signs{index}"]),
                bitmap=_ptr(a.get(f"bitmap{index}")),
                zone0=zone0,
                zone1=zone1,
                colscale=_ptr(a.get(f"colscale{index}")),
            )
        )
    struct = _Binary(
        rows=rows, blocks=blocks, zones=zones, cols=cols, nparts=len(structs), scales=_ptr(scales),
        means=_ptr(a.get("means")), parts=(_BinaryPart * 3)(*structs),
    )  # fmt: skip
    return Prepared("binary", struct, a, rows, cols, cols)


def prepare_uniform(module: BinaryLinear) -> Prepared | None:
    t = module.packed_tensors()
    meta = module.weight_metadata
    rows, cols = module.out_features, module.in_features
    bits, group_size = int(meta["bits"]), int(meta["group_size"])
    codes = unpack_uint(t["codes"], cols, bits).numpy()
    scales = _f32(t["scales"])
    groups = scales.shape[1]
    if "group_index" in t:
        column_group = t["group_index"].long().numpy()
    else:
        column_group = np.arange(cols) // group_size
    order = np.argsort(column_group, kind="stable")  # each group's columns, in their order
    colmap, group_chunk = block_runs(order, column_group[order], groups)
    width = colmap.size
    placed = np.zeros((rows, width), dtype=np.uint8)
    valid = colmap >= 0
    placed[:, valid] = codes[:, colmap[valid]]
    if bits == 4:  # per chunk, byte q = column q (low nibble) | column q + 8 (high nibble)
        chunked = placed.reshape(rows, width // 16, 2, 8)
        codes_array = np.ascontiguousarray(chunked[:, :, 0] | (chunked[:, :, 1] << 4))
        key, mode = "nibbles", 4
    else:
        codes_array = np.stack([chunk_plane((placed >> k & 1).astype(bool), width) for k in range(bits)], axis=-1)
        key, mode = "planes", 0
    if "zeros" in t:
        zeros = unpack_uint(t["zeros"], groups, bits).numpy().astype(np.float32)
    else:
        zeros = np.full((rows, groups), 2.0 ** (bits - 1), dtype=np.float32)
    a = {
        key: np.ascontiguousarray(codes_array),
        "group_chunk": group_chunk,
        "colmap": colmap,
        "scales": scales,
        "zeros": np.ascontiguousarray(zeros),
    }
    struct = _Uniform(
        rows=rows, chunks=width // 16, bits=bits, groups=groups, cols=cols, mode=mode, planes=_ptr(a.get("planes")),
        group_chunk=_ptr(group_chunk), colmap=_ptr(colmap), scales=_ptr(scales), zeros=_ptr(a["zeros"]),
        nibbles=_ptr(a.get("nibbles")),
    )  # fmt: skip
    return Prepared("uniform", struct, a, rows, cols, cols)


def prepare_multiscale(module: BinaryLinear) -> Prepared | None:
    t = module.packed_tensors()
    meta = module.weight_metadata
    rows, cols = module.out_features, module.in_features
    block_size, groups = int(meta["block_size"]), int(meta["groups"])
    block_chunks = _block_chunks(block_size, cols)
    if block_chunks is None:
        return None
    chunks = _chunks(cols)
    width = chunks * 16
    ibits = index_bits(groups)
    index = unpack_uint(t["group_index"], cols, ibits).numpy() if ibits else np.zeros((rows, cols), np.uint8)
    planes = [chunk_plane((index >> k & 1).astype(bool), width) for k in range(ibits)]
    zero_rows = np.zeros(rows + 1, dtype=np.int64)
    zero_cols = np.zeros(0, dtype=np.int32)
    if "zero_positions" in t:
        flat = np.sort(t["zero_positions"].long().numpy())
        zero_rows[1:] = np.cumsum(np.bincount(flat // cols, minlength=rows))
        zero_cols = (flat % cols).astype(np.int32)
    scales = _f32(t["scales"])
    a = {
        "signs": chunk_plane(unpack_bits(t["signs"], cols).numpy(), width),
        "index": np.ascontiguousarray(np.stack(planes, -1) if planes else np.zeros((rows, chunks, 1), np.uint16)),
        "scales": scales,
        "zrow": zero_rows,
        "zcol": np.ascontiguousarray(zero_cols) if zero_cols.size else np.zeros(1, np.int32),
    }
    struct = _MultiScale(
        rows=rows, chunks=chunks, ibits=ibits, groups=groups, blocks=scales.shape[1], block_chunks=block_chunks,
        per_row=int(scales.shape[0] > 1), signs=_ptr(a["signs"]), index=_ptr(a["index"]), scales=_ptr(scales),
        zrow=_ptr(zero_rows), zcol=_ptr(a["zcol"]),
    )  # fmt: skip
    return Prepared("multiscale", struct, a, rows, cols, width)


# Per layout, the arrays indexed by row (row-concatenated when linears are fused) and the struct fields
# that point to them; every other array describes the columns and must be equal to fuse.
_ROW_ARRAYS = {
    "binary": ("scales", "means", "signs0", "signs1", "signs2", "bitmap0", "bitmap1", "bitmap2"),
    "uniform": ("planes", "nibbles", "scales", "zeros"),
}


def concat_prepared(prepared: list[Prepared]) -> Prepared | None:
    """One kernel for several linears of one input (q/k/v, gate/up): their rows stacked, or None.

    Possible when they share the layout and every column-side array (column maps, blocks, groups,
    column scales); the outputs come out concatenated in the given order.
    """
    first = prepared[0]
    if first.kind not in _ROW_ARRAYS or any(p.kind != first.kind or p.cols != first.cols for p in prepared):
        return None
    if any(set(p.arrays) != set(first.arrays) for p in prepared):
        return None
    row_keys = [k for k in first.arrays if k in _ROW_ARRAYS[first.kind]]
    for key in first.arrays:
        if key not in row_keys and not all(np.array_equal(p.arrays[key], first.arrays[key]) for p in prepared):
            return None
    if first.kind == "binary" and any(
        (a.zone0, a.zone1, a.chunks) != (b.zone0, b.zone1, b.chunks)
        for p in prepared
        for a, b in zip(p.struct.parts[: p.struct.nparts], first.struct.parts[: first.struct.nparts], strict=True)
    ):
        return None
    arrays = dict(first.arrays)
    for key in row_keys:
        arrays[key] = np.ascontiguousarray(np.concatenate([p.arrays[key] for p in prepared], axis=0))
    rows = sum(p.rows for p in prepared)
    struct = type(first.struct).from_buffer_copy(first.struct)
    struct.rows = rows
    if first.kind == "binary":
        struct.scales, struct.means = _ptr(arrays["scales"]), _ptr(arrays.get("means"))
        for index in range(struct.nparts):
            struct.parts[index].signs = _ptr(arrays[f"signs{index}"])
            struct.parts[index].bitmap = _ptr(arrays.get(f"bitmap{index}"))
    else:
        struct.planes, struct.nibbles = _ptr(arrays.get("planes")), _ptr(arrays.get("nibbles"))
        struct.scales, struct.zeros = _ptr(arrays["scales"]), _ptr(arrays["zeros"])
    return Prepared(first.kind, struct, arrays, rows, first.cols, first.width)


_PREPARE = {"binary": prepare_binary, "uniform": prepare_uniform, "multiscale": prepare_multiscale}
_UNSUPPORTED = object()


# --------------------------------------------------------------------------- running


def _gemm(library: ctypes.CDLL, prepared: Prepared, tokens: int) -> tuple[Any, tuple[int, ...]]:
    """The layout's C entry point and its leading arguments (then ``x, bias, out, threads``)."""
    head = (prepared.address, tokens) if prepared.kind != "multiscale" else (prepared.address, tokens, prepared.cols)
    return getattr(library, f"binq_{prepared.kind}_gemm"), head


def run_prepared(prepared: Prepared, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d (M, cols)`` float32 contiguous -> ``(M, rows)`` float32 through the C kernels."""
    library = load_library()
    assert library is not None
    m = x2d.shape[0]
    if m > DECODE_TOKENS:
        return _tiled(library, prepared, x2d, bias)
    out = torch.empty(m, prepared.rows)
    function, head = _gemm(library, prepared, m)
    bias_ptr = None if bias is None else bias.data_ptr()
    status = function(*head, x2d.data_ptr(), bias_ptr, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("binq CPU kernel: out of memory for its scratch buffers")
    return out


def _padded(x2d: torch.Tensor, width: int) -> torch.Tensor:
    if x2d.shape[1] == width:
        return x2d
    x = torch.zeros(x2d.shape[0], width)
    x[:, : x2d.shape[1]] = x2d
    return x


def _tiled(library: ctypes.CDLL, prepared: Prepared, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Prefill: dequantize ``TILE_ROWS`` rows into one scratch tile, multiply, next tile."""
    dequant = getattr(library, f"binq_{prepared.kind}_dequant")
    x = _padded(x2d, prepared.width)
    rows = prepared.rows
    out = torch.empty(x.shape[0], rows)
    tile = torch.empty(min(TILE_ROWS, rows), prepared.width)
    struct = ctypes.byref(prepared.struct)
    threads = torch.get_num_threads()
    for r0 in range(0, rows, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, rows)
        part = tile[: r1 - r0]
        dequant(struct, r0, r1, part.data_ptr(), threads)
        if r0 == 0 and r1 == rows:
            torch.mm(x, part.t(), out=out)
        else:
            out[:, r0:r1] = x @ part.t()
    if bias is not None:
        out += bias
    return out


def prepared_for(module: Any) -> Prepared | None:
    """The module's CPU-kernel state when its plain kernel path applies, else None."""
    if not isinstance(module, BinaryLinear) or getattr(module, "activation_quantizer", None) is not None:
        return None
    kernel = next((k for k in KERNELS if k.layout == module.layout), None)
    probe = torch.empty(1, module.in_features)
    if kernel is None or not kernel.supports(module, probe):
        return None
    return kernel.prepared(module)


@dataclass
class FusedCall:
    """One kernel for linears sharing an input: their rows stacked, outputs of ``sizes`` in order."""

    prepared: Prepared
    sizes: list[int]


def fused_call(modules: list[Any]) -> FusedCall | None:
    """One kernel for linears sharing an input, or None when they cannot fuse.

    The modules' own kernel states are dropped once fused (rebuilt if a module is called directly), so the
    re-packed bits exist once.
    """
    prepared = [prepared_for(m) for m in modules]
    if any(p is None for p in prepared) or any(m.bias is not None for m in modules):
        return None
    fused = concat_prepared(prepared)
    if fused is None:
        return None
    for module in modules:
        module._kernel_state.clear()
    return FusedCall(fused, [m.out_features for m in modules])


class GemvInto:
    """One token through a prepared kernel into a caller's buffer: ``(x_ptr, out_ptr, threads) -> status``."""

    def __init__(self, prepared: Prepared, bias: torch.Tensor | None) -> None:
        library = load_library()
        assert library is not None
        self.prepared, self.bias = prepared, bias  # kept alive: the call passes their addresses
        self.rows = prepared.rows
        self.function, self.head = _gemm(library, prepared, 1)
        self.bias_ptr = None if bias is None else bias.data_ptr()

    def __call__(self, x_ptr: int, out_ptr: int, threads: int) -> int:
        return self.function(*self.head, x_ptr, self.bias_ptr, out_ptr, threads)


def gemv_plan(modules: list[Any]) -> list[GemvInto] | None:
    """Kernel calls computing ``modules`` (sharing one input) into consecutive slices of one output buffer:
    one fused call when they can fuse, else one per module; None when one of them has no CPU kernel."""
    fused = fused_call(modules)
    if fused is not None:
        return [GemvInto(fused.prepared, None)]
    calls = []
    for module in modules:
        prepared = prepared_for(module)
        if prepared is None:
            return None
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        calls.append(GemvInto(prepared, bias))
    return calls


def kernel_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the CPU kernels' re-packed weights held by ``model``'s modules and its lean decoder (each once)."""
    found: dict[int, Prepared] = {}
    for module in model.modules():
        if isinstance(module, BinaryLinear):
            found.update({id(s): s for s in module._kernel_state.values() if isinstance(s, Prepared)})
    decoder = getattr(model, "_binq_lean_decoder", None)
    for step in getattr(decoder, "steps", []):
        for call in step.values():
            for item in call if isinstance(call, list) else [call]:
                prepared = getattr(item, "prepared", None)
                if isinstance(prepared, Prepared):
                    found[id(prepared)] = prepared
    return sum(p.nbytes for p in found.values())


class CpuKernel:
    """The registered kernel of one layout family (``binary``, ``uniform`` or ``multiscale``)."""

    priority = 10

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.name = f"cpu-{layout}"

    def prepared(self, module: BinaryLinear) -> Prepared | None:
        state = module.kernel_state(self.name, lambda m: _PREPARE[self.layout](m) or _UNSUPPORTED)
        return None if state is _UNSUPPORTED else state

    def supports(self, module: BinaryLinear, x: torch.Tensor) -> bool:
        if module.layout != self.layout or x.device.type != "cpu":
            return False
        state = module._kernel_state.get(self.name)
        if state is not None:  # prepared (buffers on the CPU then; a move clears the state)
            return state is not _UNSUPPORTED and x.is_floating_point()
        if not x.is_floating_point() or getattr(module, module.packed_names[0]).device.type != "cpu":
            return False
        return load_library() is not None and self.prepared(module) is not None

    def forward(self, module: BinaryLinear, x: torch.Tensor) -> torch.Tensor:
        prepared = module._kernel_state[self.name]
        x2d = x.reshape(-1, module.in_features)
        if x2d.dtype != torch.float32:
            x2d = x2d.float()
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        bias = module.bias
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        out = run_prepared(prepared, x2d, bias)
        if x.dim() != 2:
            out = out.reshape(*x.shape[:-1], module.out_features)
        return out if x.dtype == torch.float32 else out.to(x.dtype)


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` for an fp16 ``weight`` and float32 ``x``: exact fp16 values, fp32 accumulation.

    For the embedding / lm_head matrices binq keeps in fp16: half the memory and bandwidth of fp32 and the
    same products as upcasting them. Falls back to an fp32 matmul without the compiled kernels.
    """
    library = load_library()
    x2d = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    if library is None or x2d.shape[0] > DECODE_TOKENS:
        out = torch.empty(x2d.shape[0], weight.shape[0])
        for r0 in range(0, weight.shape[0], 4 * TILE_ROWS * 16):
            r1 = min(r0 + 4 * TILE_ROWS * 16, weight.shape[0])
            out[:, r0:r1] = x2d @ weight[r0:r1].float().t()
        if bias is not None:
            out += bias.float()
    else:
        out = torch.empty(x2d.shape[0], weight.shape[0])
        b = None if bias is None else bias.float().contiguous()
        library.binq_half_gemm(
            x2d.shape[0], weight.shape[0], weight.shape[1], x2d.data_ptr(), weight.contiguous().data_ptr(),
            None if b is None else b.data_ptr(), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], weight.shape[0])


KERNELS: list[Any] = [CpuKernel("binary"), CpuKernel("uniform"), CpuKernel("multiscale")]
