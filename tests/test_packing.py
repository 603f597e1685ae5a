"""Bit packing: round trips, the exact LSB-first byte layout, zero padding, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from binq.quant.packing import pack_bits, pack_uint, packed_row_bytes, unpack_bits, unpack_uint

RAGGED_WIDTHS = (1, 7, 9, 576, 1000)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", RAGGED_WIDTHS)
def test_pack_uint_round_trips_on_ragged_widths(bits: int, k: int) -> None:
    generator = torch.Generator().manual_seed(bits * 1000 + k)
    values = torch.randint(0, 2**bits, (3, k), generator=generator, dtype=torch.int64)
    values[0, 0] = 2**bits - 1  # the largest code always appears
    packed = pack_uint(values, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (3, math.ceil(k * bits / 8)) == (3, packed_row_bytes(k, bits))
    unpacked = unpack_uint(packed, k, bits)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked.long(), values)


@pytest.mark.parametrize("k", RAGGED_WIDTHS)
def test_pack_bits_round_trips_booleans(k: int) -> None:
    plane = torch.rand(4, k, generator=torch.Generator().manual_seed(k)) < 0.5
    packed = pack_bits(plane)
    assert tuple(packed.shape) == (4, math.ceil(k / 8))
    assert torch.equal(unpack_bits(packed, k), plane)


def test_one_bit_layout_is_least_significant_bit_first() -> None:
    # Values 0..7 fill bits 0..7 of byte 0; value 8 is bit 0 of byte 1.
    plane = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert pack_bits(plane).tolist() == [[0b00001101, 0b00000001]]
    single = torch.zeros(1, 8, dtype=torch.bool)
    single[0, 7] = True
    assert pack_bits(single).tolist() == [[0b10000000]]


def test_multi_bit_layout_is_a_little_endian_bit_stream() -> None:
    # 3 bits: the stream is 5 | 3 << 3 | 6 << 6 = 413 = 0x19D, split into little-endian bytes.
    assert pack_uint(torch.tensor([[5, 3, 6]]), 3).tolist() == [[0x9D, 0x01]]
    # 4 bits: the first value is the low nibble.
    assert pack_uint(torch.tensor([[0xA, 0x3, 0xF]]), 4).tolist() == [[0x3A, 0x0F]]
    # 8 bits: bytes are the values themselves.
    assert pack_uint(torch.tensor([[0, 255, 17]]), 8).tolist() == [[0, 255, 17]]
    # 5 bits across a byte boundary: 31 | 1 << 5 = 63, then bits 8..9 hold the top of 1 (none).
    assert pack_uint(torch.tensor([[31, 1]]), 5).tolist() == [[63, 0]]
    assert pack_uint(torch.tensor([[0, 31]]), 5).tolist() == [[0b11100000, 0b00000011]]


@pytest.mark.parametrize(("bits", "k"), [(1, 9), (3, 7), (5, 9), (7, 1), (1, 1001), (3, 577)])
def test_padding_bits_are_zero(bits: int, k: int) -> None:
    values = torch.full((2, k), 2**bits - 1)  # every value bit set
    packed = pack_uint(values, bits)
    used = k * bits % 8
    assert used != 0  # the cases are chosen so the last byte is partly padding
    assert torch.equal(packed[:, -1], torch.full((2,), 2**used - 1, dtype=torch.uint8))
    assert (packed[:, :-1] == 255).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_values_out_of_range_raise(bits: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack_uint(torch.tensor([[0, 2**bits]]), bits)
    with pytest.raises(ValueError, match="out of range"):
        pack_uint(torch.tensor([[-1, 0]]), bits)


@pytest.mark.parametrize("bits", [0, 9])
def test_bit_widths_outside_1_to_8_raise(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_uint(torch.zeros(1, 4, dtype=torch.int64), bits)


def test_non_2d_input_and_wrong_packed_width_raise() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pack_uint(torch.zeros(4, dtype=torch.int64), 2)
    packed = pack_uint(torch.zeros(2, 9, dtype=torch.int64), 3)  # 27 bits -> 4 bytes
    with pytest.raises(ValueError, match="bytes"):
        unpack_uint(packed, 11, 3)  # 33 bits would need 5 bytes


def test_empty_rows_pack_to_no_bytes() -> None:
    packed = pack_uint(torch.zeros(3, 0, dtype=torch.int64), 4)
    assert tuple(packed.shape) == (3, 0)
    assert tuple(unpack_uint(packed, 0, 4).shape) == (3, 0)
