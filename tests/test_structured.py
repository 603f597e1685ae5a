"""Structured weights: dequantization on hand-built cases, and bit counts checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from binq.quant.packing import pack_uint, unpack_bits, unpack_uint
from binq.quant.structured import BinaryWeight, UniformWeight


def _bool(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _half(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float16)


# --------------------------------------------------------------------------------------------- binary


def test_dense_binary_weight_dequantizes_to_alpha_times_sign() -> None:
    # 3 columns in blocks of 2: the last block has one column.
    weight = BinaryWeight(
        signs=_bool([[1, 0, 1], [0, 0, 1]]),
        scales=_half([[[0.5], [2.0]], [[1.0], [0.25]]]),
        block_size=2,
    )
    assert weight.zone_names == ["dense"]
    expected = torch.tensor([[0.5, -0.5, 2.0], [-1.0, -1.0, 0.25]])
    assert torch.equal(weight.dequantize(), expected)


def test_dense_binary_weight_with_means_adds_the_block_mean() -> None:
    weight = BinaryWeight(
        signs=_bool([[1, 0, 1], [0, 0, 1]]),
        scales=_half([[[0.5], [2.0]], [[1.0], [0.25]]]),
        block_size=2,
        means=_half([[[0.25], [-1.0]], [[0.0], [0.5]]]),
    )
    expected = torch.tensor([[0.75, -0.25, 1.0], [-1.0, -1.0, 0.75]])
    assert torch.equal(weight.dequantize(), expected)
    assert weight.dequantize(torch.float16).dtype == torch.float16


def test_group_bitmap_selects_the_sparse_zone_scale_and_mean() -> None:
    # zones: concentrated (bitmap False), sparse (bitmap True); one block of 4 columns.
    weight = BinaryWeight(
        signs=_bool([[1, 1, 0, 0], [0, 1, 0, 1]]),
        scales=_half([[[0.5, 3.0]], [[0.25, 2.0]]]),
        block_size=4,
        means=_half([[[0.0, 1.0]], [[0.5, -1.0]]]),
        group_bitmap=_bool([[0, 1, 0, 1], [1, 0, 0, 0]]),
    )
    assert weight.zone_names == ["concentrated", "sparse"]
    expected = torch.tensor([[0.5, 4.0, -0.5, -2.0], [-3.0, 0.75, 0.25, 0.75]])
    assert torch.equal(weight.dequantize(), expected)


def _billm_like_weight() -> BinaryWeight:
    """5 columns in blocks of 2 (last block ragged), salient columns 1 and 4, four zones."""
    # zones: concentrated, sparse, salient, salient_residual; (rows, blocks, zones)
    block_scales = [[1.0, 4.0, 8.0, 2.0], [0.5, 3.0, 16.0, 1.0], [0.25, 5.0, 10.0, 3.0]]
    block_means = [[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]]
    return BinaryWeight(
        signs=_bool([[1, 0, 0, 1, 1], [0, 1, 1, 0, 0]]),
        scales=_half([block_scales, block_scales]),
        block_size=2,
        means=_half([block_means, block_means]),
        # Row 1 has its bitmap set on salient column 1: salient columns ignore the bitmap.
        group_bitmap=_bool([[0, 0, 1, 0, 0], [1, 1, 0, 1, 0]]),
        salient_columns=torch.tensor([False, True, False, False, True]),
        residual_signs=_bool([[1, 0], [0, 1]]),  # one column per salient column, in column order
    )


def test_salient_columns_add_the_residual_term_including_in_a_ragged_last_block() -> None:
    weight = _billm_like_weight()
    assert weight.zone_names == ["concentrated", "sparse", "salient", "salient_residual"]
    expected = torch.tensor(
        [
            # conc +1 | sal (-8+1) + res (+2+0.5) | sparse -3 | conc +0.5 | sal (10-2) + res (-3)
            [1.0, -4.5, -3.0, 0.5, 5.0],
            # sparse -4 | sal (8+1) + res (-2+0.5) | conc +0.5 | sparse -3 | sal (-10-2) + res (+3)
            [-4.0, 7.5, 0.5, -3.0, -9.0],
        ]
    )
    assert torch.equal(weight.dequantize(), expected)


def test_salient_columns_without_bitmap_use_the_dense_zone_elsewhere() -> None:
    weight = BinaryWeight(
        signs=_bool([[1, 0, 1]]),
        scales=_half([[[1.0, 4.0, 0.5]]]),  # dense, salient, salient_residual
        block_size=3,
        salient_columns=torch.tensor([False, False, True]),
        residual_signs=_bool([[0]]),
    )
    assert weight.zone_names == ["dense", "salient", "salient_residual"]
    assert torch.equal(weight.dequantize(), torch.tensor([[1.0, -1.0, 3.5]]))


def test_billm_like_storage_bits_match_a_hand_count() -> None:
    weight = _billm_like_weight()
    signs = 2 * 1 * 8  # 2 rows of ceil(5/8) = 1 byte
    scales = means = 2 * 3 * 4 * 16  # rows * blocks * zones fp16 values
    bitmap = 2 * 1 * 8
    column_mask = 1 * 8
    residual = 2 * 1 * 8  # 2 salient columns -> 1 byte per row
    assert weight.storage_bits_total == signs + scales + means + bitmap + column_mask + residual == 824
    assert weight.storage_bits == pytest.approx(824 / 10)
    assert weight.compute_bits == pytest.approx((10 + 4) / 10)


def test_binary_storage_bits_on_a_ragged_random_layout() -> None:
    rows, cols, block_size, n_salient = 7, 200, 128, 11
    blocks = math.ceil(cols / block_size)
    generator = torch.Generator().manual_seed(0)
    salient = torch.zeros(cols, dtype=torch.bool)
    salient[torch.randperm(cols, generator=generator)[:n_salient]] = True
    weight = BinaryWeight(
        signs=torch.rand(rows, cols, generator=generator) < 0.5,
        scales=torch.rand(rows, blocks, 4, generator=generator).half(),
        block_size=block_size,
        means=torch.rand(rows, blocks, 4, generator=generator).half(),
        group_bitmap=torch.rand(rows, cols, generator=generator) < 0.5,
        salient_columns=salient,
        residual_signs=torch.rand(rows, n_salient, generator=generator) < 0.5,
    )
    expected = (
        rows * 25 * 8  # signs: ceil(200/8) = 25 bytes per row
        + rows * 25 * 8  # group bitmap
        + 25 * 8  # salient column mask
        + rows * 2 * 8  # residual signs: ceil(11/8) = 2 bytes per row
        + 2 * 16 * rows * blocks * 4  # fp16 scales and means, 4 zones
    )
    assert weight.storage_bits_total == expected
    assert weight.compute_bits == pytest.approx(1 + n_salient / cols)
    # The packed tensors are the planes themselves, bit-packed.
    packed = weight.packed_tensors()
    assert set(packed) == {"signs", "scales", "means", "group_bitmap", "salient_columns", "residual_signs"}
    assert torch.equal(unpack_bits(packed["signs"], cols), weight.signs)
    assert torch.equal(unpack_bits(packed["residual_signs"], n_salient), weight.residual_signs)
    assert torch.equal(unpack_bits(packed["salient_columns"], cols)[0], salient)


def test_xnor_binary_weight_costs_one_bit_plus_one_fp16_scale_per_group() -> None:
    rows, cols, block_size = 5, 320, 128
    weight = BinaryWeight(
        signs=torch.ones(rows, cols, dtype=torch.bool),
        scales=torch.ones(rows, 3, 1, dtype=torch.float16),
        block_size=block_size,
    )
    assert weight.storage_bits_total == rows * 40 * 8 + rows * 3 * 16
    assert weight.compute_bits == 1.0


def test_binary_weight_rejects_inconsistent_shapes() -> None:
    signs = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="scales shape"):
        BinaryWeight(signs=signs, scales=torch.zeros(2, 2, 1, dtype=torch.float16), block_size=2)
    scales = torch.zeros(2, 3, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="go together"):
        BinaryWeight(signs=signs, scales=scales, block_size=2, salient_columns=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="residual_signs"):
        BinaryWeight(
            signs=signs,
            scales=scales,
            block_size=2,
            salient_columns=torch.tensor([True, False, False, True, False]),
            residual_signs=torch.zeros(2, 3, dtype=torch.bool),
        )


# -------------------------------------------------------------------------------------------- uniform


def _uniform(zeros: bool = True, group_index: torch.Tensor | None = None) -> UniformWeight:
    return UniformWeight(
        codes=torch.tensor([[0, 3, 1], [2, 2, 0]], dtype=torch.uint8),
        scales=_half([[0.5, 2.0], [1.0, 0.25]]),
        bits=2,
        group_size=2,
        zeros=torch.tensor([[1, 2], [0, 3]], dtype=torch.uint8) if zeros else None,
        group_index=group_index,
    )


def test_uniform_weight_dequantizes_with_per_group_scale_and_zero() -> None:
    # Groups of 2 columns over 3 columns: column 2 is alone in group 1.
    expected = torch.tensor([[0.5 * -1, 0.5 * 2, 2.0 * -1], [1.0 * 2, 1.0 * 2, 0.25 * -3]])
    assert torch.equal(_uniform().dequantize(), expected)


def test_symmetric_uniform_weight_uses_the_constant_zero_point() -> None:
    # 2 bits: zero = 2**(2-1) = 2.
    expected = torch.tensor([[0.5 * -2, 0.5 * 1, 2.0 * -1], [0.0, 0.0, 0.25 * -2]])
    assert torch.equal(_uniform(zeros=False).dequantize(), expected)


def test_group_index_overrides_contiguous_groups() -> None:
    weight = _uniform(group_index=torch.tensor([1, 0, 1]))
    expected = torch.tensor([[2.0 * -2, 0.5 * 2, 2.0 * -1], [0.25 * -1, 1.0 * 2, 0.25 * -3]])
    assert torch.equal(weight.dequantize(), expected)


def test_uniform_storage_bits_match_a_hand_count() -> None:
    codes = 2 * 1 * 8  # 3 values of 2 bits -> 1 byte per row
    scales = 2 * 2 * 16
    zeros = 2 * 1 * 8  # 2 zero points of 2 bits -> 1 byte per row
    group_index = 3 * 16  # int16 per column
    assert _uniform().storage_bits_total == codes + scales + zeros
    assert _uniform(zeros=False).storage_bits_total == codes + scales
    assert _uniform(group_index=torch.tensor([1, 0, 1])).storage_bits_total == (codes + scales + zeros + group_index)
    assert _uniform().compute_bits == 2.0


def test_uniform_storage_bits_on_a_ragged_layout() -> None:
    rows, cols, bits, group_size = 5, 200, 3, 64
    groups = math.ceil(cols / group_size)
    generator = torch.Generator().manual_seed(1)
    weight = UniformWeight(
        codes=torch.randint(0, 8, (rows, cols), generator=generator, dtype=torch.uint8),
        scales=torch.rand(rows, groups, generator=generator).half(),
        bits=bits,
        group_size=group_size,
        zeros=torch.randint(0, 8, (rows, groups), generator=generator, dtype=torch.uint8),
    )
    # codes: ceil(200 * 3 / 8) = 75 bytes per row; zeros: ceil(4 * 3 / 8) = 2 bytes per row.
    assert weight.storage_bits_total == rows * 75 * 8 + rows * groups * 16 + rows * 2 * 8
    assert weight.storage_bits == pytest.approx(weight.storage_bits_total / (rows * cols))
    packed = weight.packed_tensors()
    assert torch.equal(packed["codes"], pack_uint(weight.codes, bits))
    assert torch.equal(unpack_uint(packed["zeros"], groups, bits), weight.zeros)


# ------------------------------------------------------------------ CGB zones, RC column scales, round trips


def test_cgb_splits_salient_columns_by_the_bitmap_into_two_second_order_zones() -> None:
    # 3 columns, one block; column 1 salient. Zones: conc, sparse, sal_conc, sal_conc_res, sal_sparse, sal_sparse_res
    scales = [[1.0, 2.0, 4.0, 0.5, 8.0, 0.25]]
    means = [[0.0, 0.0, 1.0, 0.0, -1.0, 0.5]]
    weight = BinaryWeight(
        signs=_bool([[1, 1, 0], [0, 0, 1]]),
        scales=_half([scales, scales]),
        block_size=4,
        means=_half([means, means]),
        group_bitmap=_bool([[0, 1, 1], [1, 0, 0]]),
        salient_columns=torch.tensor([False, True, False]),
        residual_signs=_bool([[0], [1]]),
        salient_groups=True,
    )
    assert weight.zone_names[2:] == [
        "salient_concentrated",
        "salient_concentrated_residual",
        "salient_sparse",
        "salient_sparse_residual",
    ]
    # (0,1): bitmap set -> salient_sparse: 8*(+1) - 1 + residual 0.25*(-1) + 0.5 = 7.25
    # (1,1): bitmap clear -> salient_concentrated: 4*(-1) + 1 + residual 0.5*(+1) + 0 = -2.5
    expected = torch.tensor([[1.0, 7.25, -2.0], [-2.0, -2.5, 1.0]])
    assert torch.equal(weight.dequantize(), expected)
    # CGB stores no extra plane: same bitmaps and signs as BiLLM's layout, only more scales.
    assert set(weight.packed_tensors()) == {
        "signs",
        "scales",
        "means",
        "group_bitmap",
        "salient_columns",
        "residual_signs",
    }


def test_row_column_scales_multiply_per_zone_and_cost_their_fp16_bits() -> None:
    # 2 rows x 3 columns, column 2 salient; zones: dense, salient, salient_residual (no means: ARB-RC).
    row_scales = _half([[[2.0, 1.0, 0.5]], [[1.0, 4.0, 1.0]]])
    weight = BinaryWeight(
        signs=_bool([[1, 0, 1], [0, 1, 0]]),
        scales=row_scales,
        block_size=3,
        salient_columns=torch.tensor([False, False, True]),
        residual_signs=_bool([[0], [1]]),
        column_scales=_half([[0.5], [3.0]]),  # non-salient columns 0 and 1, zone dense
        salient_column_scales=_half([[2.0, 0.25]]),  # salient column 2: salient, salient_residual
    )
    expected = torch.tensor(
        [
            [2.0 * 0.5, -2.0 * 3.0, 1.0 * 2.0 - 0.5 * 0.25],
            [-1.0 * 0.5, 1.0 * 3.0, -4.0 * 2.0 + 1.0 * 0.25],
        ]
    )
    assert torch.equal(weight.dequantize(), expected)
    bits = 2 * 8 + 2 * 1 * 3 * 16 + 8 + 2 * 8 + 2 * 16 + 2 * 16  # signs, scales, column mask, residual, col scales
    assert weight.storage_bits_total == bits


def test_column_scales_are_checked_against_the_zones() -> None:
    signs = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="column_scales"):
        BinaryWeight(signs=signs, scales=torch.ones(2, 1, 1, dtype=torch.float16), block_size=3,
                     column_scales=torch.ones(3, 2, dtype=torch.float16))  # fmt: skip
    with pytest.raises(ValueError, match="go together"):
        BinaryWeight(
            signs=signs, scales=torch.ones(2, 1, 3, dtype=torch.float16), block_size=3,
            salient_columns=torch.tensor([True, False, False]), residual_signs=torch.ones(2, 1, dtype=torch.bool),
            column_scales=torch.ones(2, 1, dtype=torch.float16),
        )  # fmt: skip


def _roundtrip_cases() -> list:
    gen = torch.Generator().manual_seed(0)
    rows, cols = 5, 21
    signs = torch.rand(rows, cols, generator=gen) > 0.5
    bitmap = torch.rand(rows, cols, generator=gen) > 0.7
    salient = torch.zeros(cols, dtype=torch.bool)
    salient[[2, 9, 20]] = True
    residual = torch.rand(rows, 3, generator=gen) > 0.5

    def half(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).half()

    return [
        BinaryWeight(signs=signs, scales=half(rows, 3, 1), block_size=8),
        BinaryWeight(signs=signs, scales=half(rows, 3, 1), block_size=8, means=half(rows, 3, 1)),
        BinaryWeight(
            signs=signs, scales=half(rows, 2, 6), block_size=16, means=half(rows, 2, 6), group_bitmap=bitmap,
            salient_columns=salient, residual_signs=residual, salient_groups=True,
        ),
        BinaryWeight(
            signs=signs, scales=half(rows, 2, 4), block_size=16, group_bitmap=bitmap, salient_columns=salient,
            residual_signs=residual, column_scales=half(cols - 3, 2), salient_column_scales=half(3, 2),
        ),
        _billm_like_weight(),
        _uniform(),
        _uniform(zeros=False),
        _uniform(group_index=torch.tensor([1, 0, 1])),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(8))
def test_every_layout_round_trips_through_its_packed_tensors(index: int) -> None:
    from binq.quant.structured import layout_class

    weight = _roundtrip_cases()[index]
    rebuilt = layout_class(weight.layout).from_packed(weight.packed_tensors(), weight.metadata())
    assert torch.equal(rebuilt.dequantize(), weight.dequantize())
    assert rebuilt.storage_bits_total == weight.storage_bits_total
    assert rebuilt.metadata() == weight.metadata()


def test_from_packed_names_the_bad_tensor() -> None:
    from binq.errors import BinqError

    weight = _roundtrip_cases()[3]
    tensors = weight.packed_tensors()
    bad = dict(tensors, scales=tensors["scales"][:, :1])
    with pytest.raises(BinqError, match="'scales' has shape"):
        BinaryWeight.from_packed(bad, weight.metadata())
    missing = {k: v for k, v in tensors.items() if k != "salient_column_scales"}
    with pytest.raises(BinqError, match="'salient_column_scales' is missing"):
        BinaryWeight.from_packed(missing, weight.metadata())
    nan = dict(tensors, column_scales=torch.full_like(tensors["column_scales"], float("nan")))
    with pytest.raises(BinqError, match="'column_scales' has non-finite"):
        BinaryWeight.from_packed(nan, weight.metadata())
    with pytest.raises(BinqError, match="unexpected tensor"):
        BinaryWeight.from_packed(dict(tensors, extra=torch.zeros(1)), weight.metadata())
    with pytest.raises(BinqError, match="'shape'"):
        BinaryWeight.from_packed(tensors, {"shape": [5], "block_size": 16})
    with pytest.raises(BinqError, match="unknown weight layout"):
        from binq.quant.structured import layout_class

        layout_class("nope")
