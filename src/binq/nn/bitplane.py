"""The exact bit-plane linear of W(1+1)A(1x4): AND and popcount on 64-bit words (reference, numpy, CPU).

Weight ``W[o, j] = mu[o, b, g] + a[o, b, g] * s[o, j]`` (``b`` the column block, ``g`` the group bit,
``s`` in {-1, +1}); activation ``x^[t, j] = scale_t (q[t, j] - z_t)`` with ``q = sum_k 2^k p_k``
(:mod:`binq.activations.int4`). With ``P`` the positive-sign bits, ``M_g`` the group-``g`` bits and
``B_k`` plane ``k``, per (token, output, block):

    sum_j p_k[j] W[o, j] = sum_g a_g (2 popc(B_k & P & M_g) - popc(B_k & M_g)) + mu_g popc(B_k & M_g)

and ``y[t, o] = scale_t (sum_k 2^k sum_b (...) - z_t R_o)`` with ``R_o = sum_j W[o, j]`` precomputed. Every
popcount is an exact integer; only the final weighting by the fp16 scales is floating point, so the
result equals the dequantize-then-matmul simulation up to float rounding.

Word layout: each (row, column block) is packed on its own into ``ceil(block_size / 64)`` little-endian
64-bit words, column ``j`` of the block at bit ``j % 64`` of word ``j // 64``; padding bits are zero in
the activation planes and the group masks, so they never count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from binq.activations.int4 import TokenCodes, bit_planes
from binq.quant.structured import BinaryWeight


def pack_words(bits: torch.Tensor, block_size: int) -> np.ndarray:
    """Bool ``(..., n)`` -> uint64 ``(..., blocks, words_per_block)``, each column block packed on its own."""
    *lead, n = bits.shape
    blocks = math.ceil(n / block_size)
    words = math.ceil(block_size / 64)
    padded = torch.zeros(*lead, blocks * block_size, dtype=torch.bool)
    padded[..., :n] = bits.cpu()
    per_block = padded.reshape(*lead, blocks, block_size).numpy()
    if words * 64 != block_size:
        fill = np.zeros((*lead, blocks, words * 64 - block_size), dtype=bool)
        per_block = np.concatenate([per_block, fill], axis=-1)
    packed = np.packbits(per_block, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8")


@dataclass
class PackedTwoGroupWeight:
    """A two-zone :class:`BinaryWeight` as words for the popcount linear."""

    positive: np.ndarray  # uint64 (rows, blocks, words): sign bits
    groups: tuple[np.ndarray, np.ndarray]  # uint64 (rows, blocks, words): M_0 (concentrated), M_1 (sparse)
    scales: np.ndarray  # float64 (rows, blocks, 2)
    means: np.ndarray | None  # float64 (rows, blocks, 2)
    row_sums: np.ndarray  # float64 (rows,): R_o = sum_j W[o, j]
    block_size: int


def pack_two_group_weight(weight: BinaryWeight) -> PackedTwoGroupWeight:
    """Pack a W(1+1) weight (sign plane, group bitmap, per-(row, block, group) scales and optional means)."""
    if weight.group_bitmap is None or weight.salient_columns is not None or weight.column_scales is not None:
        raise ValueError("the bit-plane linear takes two-zone weights: a group bitmap, no salient or column scales")
    valid = torch.ones_like(weight.signs)
    sparse = weight.group_bitmap
    dequantized = weight.dequantize(torch.float64)
    return PackedTwoGroupWeight(
        positive=pack_words(weight.signs, weight.block_size),
        groups=(pack_words(valid & ~sparse, weight.block_size), pack_words(sparse, weight.block_size)),
        scales=weight.scales.double().numpy(),
        means=None if weight.means is None else weight.means.double().numpy(),
        row_sums=dequantized.sum(1).numpy(),
        block_size=weight.block_size,
    )


def plane_counts(planes: np.ndarray, packed: PackedTwoGroupWeight) -> tuple[np.ndarray, np.ndarray]:
    """Integer popcounts for one activation plane: ``popc(B & M_g)`` and ``popc(B & P & M_g)``.

    ``planes`` uint64 ``(tokens, blocks, words)``; returns two int64 arrays ``(tokens, rows, blocks, 2)``.
    """
    plane = planes[:, None]  # (tokens, 1, blocks, words)
    in_group, positive = [], []
    for mask in packed.groups:
        selected = plane & mask[None]
        in_group.append(np.bitwise_count(selected).sum(-1, dtype=np.int64))
        positive.append(np.bitwise_count(selected & packed.positive[None]).sum(-1, dtype=np.int64))
    return np.stack(in_group, -1), np.stack(positive, -1)


def bitplane_linear(codes: TokenCodes, packed: PackedTwoGroupWeight, token_chunk: int = 16) -> torch.Tensor:
    """``y = x^ W^T`` (float64 ``(tokens, rows)``) from activation bit planes and packed weight bits only."""
    flat = codes.codes.reshape(-1, codes.codes.shape[-1])
    scale = codes.scale.reshape(-1, 1).double().numpy()
    zero = codes.zero.reshape(-1, 1).double().numpy()
    planes = [pack_words(p, packed.block_size) for p in bit_planes(flat, codes.bits)]
    tokens, rows = flat.shape[0], packed.row_sums.shape[0]
    accumulated = np.zeros((tokens, rows))
    for start in range(0, tokens, token_chunk):
        chunk = slice(start, start + token_chunk)
        for k, plane in enumerate(planes):
            in_group, positive = plane_counts(plane[chunk], packed)
            term = packed.scales[None] * (2 * positive - in_group)
            if packed.means is not None:
                term = term + packed.means[None] * in_group
            accumulated[chunk] += float(2**k) * term.sum((-2, -1))
    out = scale * (accumulated - zero * packed.row_sums[None])
    return torch.from_numpy(out).reshape(*codes.codes.shape[:-1], rows)
