"""The exact bit-plane (AND + popcount) linear against the dequantize-then-matmul simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from binq.activations.int4 import bit_planes, quantize_per_token
from binq.nn.bitplane import bitplane_linear, pack_two_group_weight, pack_words, plane_counts
from binq.quant.structured import BinaryWeight


def _random_w11(rows: int, cols: int, block_size: int, offsets: bool, seed: int) -> BinaryWeight:
    gen = torch.Generator().manual_seed(seed)
    blocks = math.ceil(cols / block_size)
    scales = (torch.rand(rows, blocks, 2, generator=gen) * 0.1).sort(-1).values.half()
    means = (torch.randn(rows, blocks, 2, generator=gen) * 0.01).half() if offsets else None
    return BinaryWeight(
        signs=torch.rand(rows, cols, generator=gen) < 0.5,
        scales=scales,
        block_size=block_size,
        means=means,
        group_bitmap=torch.rand(rows, cols, generator=gen) < 0.3,
    )


SHAPES = [
    # rows, cols, block size: word-aligned, ragged last block, blocks narrower and wider than a word.
    (8, 128, 128),
    (5, 576, 128),
    (3, 200, 64),
    (7, 130, 100),
    (4, 96, 32),
    (1, 1, 16),
    (6, 300, 192),
]


@pytest.mark.parametrize(("rows", "cols", "block_size"), SHAPES)
@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_popcount_linear_equals_the_simulated_linear(rows: int, cols: int, block_size: int, offsets: bool, sym: bool):
    weight = _random_w11(rows, cols, block_size, offsets, seed=rows * cols)
    gen = torch.Generator().manual_seed(cols)
    activations = torch.randn(2, 9, cols, generator=gen) * torch.rand(cols, generator=gen) * 3
    activations[0, 0] = activations[0, 0].abs() + 0.1  # an all-positive token: its zero point is 0
    codes = quantize_per_token(activations, 4, sym)
    exact = bitplane_linear(codes, pack_two_group_weight(weight))
    simulated = codes.dequantize().double() @ weight.dequantize(torch.float64).T
    assert exact.shape == (2, 9, rows)
    torch.testing.assert_close(exact, simulated, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("rows", "cols", "block_size"), SHAPES[:4])
def test_popcounts_are_the_integer_products_of_the_planes(rows: int, cols: int, block_size: int) -> None:
    weight = _random_w11(rows, cols, block_size, False, seed=1)
    packed = pack_two_group_weight(weight)
    codes = quantize_per_token(torch.randn(5, cols, generator=torch.Generator().manual_seed(2)))
    block_of = torch.arange(cols) // block_size
    blocks = math.ceil(cols / block_size)
    for k, plane in enumerate(bit_planes(codes.codes)):
        in_group, positive = plane_counts(pack_words(plane, block_size), packed)
        for g, member in enumerate((~weight.group_bitmap, weight.group_bitmap)):
            # Reference: integer matmuls of {0,1} matrices, summed per column block.
            for b in range(blocks):
                cols_b = block_of == b
                p = plane[:, cols_b].long()
                m = member[:, cols_b].long()
                assert np.array_equal(in_group[:, :, b, g], (p @ m.T).numpy()), (k, g, b)
                pos = (member & weight.signs)[:, cols_b].long()
                assert np.array_equal(positive[:, :, b, g], (p @ pos.T).numpy()), (k, g, b)


@pytest.mark.parametrize(("n", "block_size"), [(1, 64), (64, 64), (65, 64), (200, 128), (130, 100), (7, 3)])
def test_word_packing_keeps_every_bit_and_pads_with_zeros(n: int, block_size: int) -> None:
    bits = torch.rand(3, n, generator=torch.Generator().manual_seed(n)) < 0.5
    words = pack_words(bits, block_size)
    blocks, per_block = math.ceil(n / block_size), math.ceil(block_size / 64)
    assert words.shape == (3, blocks, per_block) and words.dtype == np.uint64
    unpacked = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little").reshape(3, blocks, per_block * 64)
    padded = np.zeros((3, blocks * block_size), dtype=np.uint8)
    padded[:, :n] = bits.numpy()
    assert np.array_equal(unpacked[..., :block_size].reshape(3, -1), padded)
    assert not unpacked[..., block_size:].any()
    assert int(np.bitwise_count(words).sum()) == int(bits.sum())


def test_refuses_weights_that_are_not_two_zone() -> None:
    weight = BinaryWeight(signs=torch.ones(2, 8, dtype=torch.bool), scales=torch.ones(2, 1, 1).half(), block_size=8)
    with pytest.raises(ValueError, match="two-zone"):
        pack_two_group_weight(weight)
