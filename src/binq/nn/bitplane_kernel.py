"""The W(1+1)A(1x4) bit-plane kernel: AND and popcount on 64-bit words, on the CPU (numba).

For a :class:`~binq.nn.BinaryLinear` with an ``activation_quantizer`` (a checkpoint's activation plan)
and a two-zone ``binary`` weight (group bitmap; no salient columns, no column scales; means optional).
The kernel quantizes ``x`` itself with that quantizer (the integer codes of the evaluation hooks, per
token: ``x^ = s_t (q - z_t)``, ``q = sum_k 2^k B_k``) and computes ``y = x^ W^T`` as
:mod:`binq.nn.bitplane` explains, with all counts exact integers. Per (token ``t``, row ``o``,
column block ``b``), with ``P`` the positive-sign bits and ``G`` the group bits of the row's block:

    C1 = sum_k 2^k popc(B_k & G)        P1 = sum_k 2^k popc(B_k & P & G)        PA = sum_k 2^k popc(B_k & P)
    T  = sum_k 2^k popc(B_k)   (the block's code sum, per token)      C0 = T - C1,  P0 = PA - P1

    y[t, o] = s_t ( sum_b [ a0 (2 P0 - C0) + a1 (2 P1 - C1) + mu0 C0 + mu1 C1 ] - z_t R_o )

(``a_g``, ``mu_g`` the block's fp16 scales and means of group ``g``, ``R_o = sum_j W[o, j]``). Only that
last line is floating point (float64); three popcounts per 64 weights, activation plane and token.

Weight words (:class:`PackedBitplaneWeight`, built once per module in ``module.kernel_state``): each
(row, column block) packed on its own into ``ceil(block_size / 64)`` uint64 words, column ``j`` of the
block at bit ``j % 64`` of word ``j // 64`` (:func:`binq.nn.bitplane.pack_words`), padding bits zero;
``P``, ``G`` and ``P & G`` are stored. Activation planes are packed the same way per call.

numba is imported on first use; without it ``supports`` is False (one warning) and the module runs
its reference path (fake-quantize, dequantize, ``F.linear``), which computes the same numbers.

Threads: the compiled functions are serial (``parallel=False``) and release the GIL; the rows are split
over ``torch.get_num_threads()`` Python threads. numba's own parallel loops were tried and dropped:
its OpenMP threads spin beside torch's, and after one parallel call every torch op on the 2-core test
machine ran about 700x slower (0.08 ms -> 56 ms to quantize 64 tokens).
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from binq.nn.binary_linear import BinaryLinear

log = logging.getLogger(__name__)

# Tensors a two-zone weight must not have (salient columns, per-column scales).
_UNSUPPORTED_TENSORS = frozenset({"salient_columns", "residual_signs", "column_scales", "salient_column_scales"})
_TOKEN_TILE = 64  # tokens whose planes stay in cache while every row passes over them
_MIN_WORDS_PER_THREAD = 1 << 16  # below this many word steps per call, threads cost more than they save

# Set by _load_numba(): the popcount intrinsic the compiled functions refer to, and the compiled functions.
_popcount: Any = None
_compiled: dict[str, Any] | None = None
_numba_missing = False
_executors: dict[int, ThreadPoolExecutor] = {}  # by thread count


@dataclass
class PackedBitplaneWeight:
    """A two-zone binary weight as 64-bit words (module docstring), plus its float per-block factors."""

    positive: np.ndarray  # uint64 (rows, blocks, words): P
    sparse: np.ndarray  # uint64 (rows, blocks, words): G (zone 1, 'sparse')
    positive_sparse: np.ndarray  # uint64 (rows, blocks, words): P & G
    scales: np.ndarray  # float64 (rows, blocks, 2): a0, a1
    means: np.ndarray  # float64 (rows, blocks, 2): mu0, mu1 (zeros without means)
    row_sums: np.ndarray  # float64 (rows,): R_o
    block_size: int

    @property
    def words(self) -> int:
        return self.positive.shape[2]


def pack_bitplane_weight(module: BinaryLinear) -> PackedBitplaneWeight:
    """Re-pack a module's two-zone weight into words (the one-time ``kernel_state``)."""
    from binq.nn.bitplane import pack_words

    weight = module.quantized_weight()
    assert weight.group_bitmap is not None  # supports() checked the layout
    cols = weight.shape[1]
    block_size = weight.block_size
    positive = pack_words(weight.signs, block_size)
    sparse = pack_words(weight.group_bitmap, block_size)
    positive_sparse = positive & sparse
    scales = weight.scales.double().numpy()
    means = np.zeros_like(scales) if weight.means is None else weight.means.double().numpy()
    # R_o from the same counts as the kernel, over the whole row: sum_b a0 (2 p0 - n0) + a1 (2 p1 - n1) + mu n.
    blocks = positive.shape[1]
    valid = np.minimum(block_size, cols - block_size * np.arange(blocks)).astype(np.int64)
    n1 = np.bitwise_count(sparse).sum(-1, dtype=np.int64)
    p1 = np.bitwise_count(positive_sparse).sum(-1, dtype=np.int64)
    p0 = np.bitwise_count(positive).sum(-1, dtype=np.int64) - p1
    n0 = valid[None] - n1
    per_block = (
        scales[..., 0] * (2 * p0 - n0) + scales[..., 1] * (2 * p1 - n1) + means[..., 0] * n0 + means[..., 1] * n1
    )
    return PackedBitplaneWeight(
        positive=positive,
        sparse=sparse,
        positive_sparse=positive_sparse,
        scales=np.ascontiguousarray(scales),
        means=np.ascontiguousarray(means),
        row_sums=per_block.sum(-1),
        block_size=block_size,
    )


# ----------------------------------------------------------------------------------- numba functions
# Plain functions at module level, compiled on first use by _load_numba (numba's on-disk cache needs a
# module-level function); they read the global ``_popcount`` set there.


def _pack_planes(codes, bits, block_size, planes, code_sums):  # pragma: no cover - runs compiled
    """uint8 codes (tokens, cols) -> planes uint64 (tokens, bits, blocks, words), code sums (tokens, blocks)."""
    tokens, cols = codes.shape
    for t in range(tokens):
        for j in range(cols):
            code = np.int64(codes[t, j])
            block = j // block_size
            offset = j - block * block_size
            word = offset >> 6
            bit = np.uint64(1) << np.uint64(offset & 63)
            code_sums[t, block] += code
            for k in range(bits):
                if (code >> k) & 1:
                    planes[t, k, block, word] |= bit


def _bitplane_matmul(
    planes, code_sums, scale, zero, positive, sparse, positive_sparse, scales, means, row_sums, out, first, last
):  # pragma: no cover - runs compiled
    """``out[t, o]`` (float64) for rows ``first <= o < last``, from the activation planes and weight words."""
    tokens, bits, blocks, words = planes.shape
    for start in range(0, tokens, _TOKEN_TILE):
        stop = min(start + _TOKEN_TILE, tokens)
        for o in range(first, last):
            for t in range(start, stop):
                total = 0.0
                for b in range(blocks):
                    c1 = np.int64(0)
                    p1 = np.int64(0)
                    pa = np.int64(0)
                    for k in range(bits):
                        ck = np.int64(0)
                        p1k = np.int64(0)
                        pak = np.int64(0)
                        for w in range(words):
                            plane = planes[t, k, b, w]
                            ck += np.int64(_popcount(plane & sparse[o, b, w]))
                            p1k += np.int64(_popcount(plane & positive_sparse[o, b, w]))
                            pak += np.int64(_popcount(plane & positive[o, b, w]))
                        c1 += ck << k
                        p1 += p1k << k
                        pa += pak << k
                    c0 = code_sums[t, b] - c1
                    p0 = pa - p1
                    total += (
                        scales[o, b, 0] * (2 * p0 - c0)
                        + scales[o, b, 1] * (2 * p1 - c1)
                        + means[o, b, 0] * c0
                        + means[o, b, 1] * c1
                    )
                out[t, o] = scale[t] * (total - zero[t] * row_sums[o])


def _load_numba() -> dict[str, Any] | None:
    """Compile the two functions once (numba's cache makes later processes fast); None without numba."""
    global _popcount, _compiled, _numba_missing
    if _compiled is not None or _numba_missing:
        return _compiled
    try:
        import numba as numba_module
        from numba import types
        from numba.extending import intrinsic
    except ImportError:
        _numba_missing = True
        log.warning("numba is not installed: W(1+1)A(1x4) linears run the reference path (pip install numba)")
        return None

    @intrinsic
    def popcount(typingctx, value):  # LLVM's ctpop: one POPCNT instruction on x86-64 and arm64
        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])

        return types.uint64(types.uint64), codegen

    _popcount = popcount
    jit = numba_module.njit(cache=True, parallel=False, nogil=True)
    _compiled = {"pack_planes": jit(_pack_planes), "matmul": jit(_bitplane_matmul)}
    return _compiled


# ----------------------------------------------------------------------------------------- the kernel


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _executors:
        _executors[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="binq-bitplane")
    return _executors[threads]


def bitplane_linear(module: BinaryLinear, x: torch.Tensor) -> torch.Tensor:
    """``y = Q(x) W^T + b`` for a supported module (``Q`` its activation quantizer), in ``x``'s dtype."""
    compiled = _load_numba()
    quantizer = module.activation_quantizer
    if compiled is None or quantizer is None:
        raise RuntimeError("bitplane_linear needs numba and a module with an activation_quantizer")
    packed = module.kernel_state("bitplane", pack_bitplane_weight)
    if x.shape[-1] != module.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer {module.in_features}")
    flat = x.detach().reshape(-1, x.shape[-1])
    codes = quantizer.codes(flat)
    tokens, blocks = flat.shape[0], packed.positive.shape[1]
    planes = np.zeros((tokens, quantizer.bits, blocks, packed.words), dtype=np.uint64)
    code_sums = np.zeros((tokens, blocks), dtype=np.int64)
    rows = module.out_features
    out = np.empty((tokens, rows), dtype=np.float64)
    compiled["pack_planes"](codes.codes.contiguous().numpy(), quantizer.bits, packed.block_size, planes, code_sums)
    arguments = (
        planes,
        code_sums,
        codes.scale.reshape(-1).double().numpy(),
        codes.zero.reshape(-1).double().numpy(),
        packed.positive,
        packed.sparse,
        packed.positive_sparse,
        packed.scales,
        packed.means,
        packed.row_sums,
        out,
    )
    threads = min(torch.get_num_threads(), max(1, planes.size * rows // _MIN_WORDS_PER_THREAD), rows)
    if threads == 1:
        compiled["matmul"](*arguments, 0, rows)
    else:
        bounds = [rows * i // threads for i in range(threads + 1)]
        pool = _thread_pool(threads - 1)
        chunks = list(itertools.pairwise(bounds))
        jobs = [pool.submit(compiled["matmul"], *arguments, a, b) for a, b in chunks[1:]]
        compiled["matmul"](*arguments, *chunks[0])  # the calling thread takes the first rows
        for job in jobs:
            job.result()
    y = torch.from_numpy(out).to(x.dtype).reshape(*x.shape[:-1], module.out_features)
    return y if module.bias is None else y + module.bias.to(x.dtype)


class BitplaneKernel:
    """Registry entry (:mod:`binq.nn.kernels`): W(1+1) weights with INT-b activations, CPU, numba."""

    name = "bitplane-w11-a4-numba"
    priority = 50  # before any kernel that would take the fake-quantized input instead
    quantizes_input = True  # BinaryLinear hands over the raw x: the kernel needs the integer codes

    def supports(self, module: BinaryLinear, x: torch.Tensor) -> bool:
        quantizer = getattr(module, "activation_quantizer", None)
        if quantizer is None or module.layout != "binary" or not 2 <= quantizer.bits <= 8:
            return False
        if x.device.type != "cpu" or not x.is_floating_point() or (x.requires_grad and torch.is_grad_enabled()):
            return False
        if x.dim() == 0 or x.shape[-1] != module.in_features:  # the compiled loops do not check bounds
            return False
        names = set(module.packed_names)
        if "group_bitmap" not in names or names & _UNSUPPORTED_TENSORS:
            return False
        if module.scales.shape[-1] != 2 or module.scales.device.type != "cpu":
            return False
        return _load_numba() is not None

    def forward(self, module: BinaryLinear, x: torch.Tensor) -> torch.Tensor:
        return bitplane_linear(module, x)


KERNELS = [BitplaneKernel()]
