"""BiLLM and its building blocks: the residual binarizer, the searches, the block driver, the bits."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from binq.errors import BinqError
from binq.methods.billm import BiLLMConfig, billm_block_masks, quantize_billm
from binq.methods.rtn import RTNConfig, quantize_rtn
from binq.quant.binarize import binarization_error, residual_binarize
from binq.quant.hessian import factor_hessian, relative_output_error
from binq.quant.search import BILLM_SPLIT_QUANTILES, salient_column_search, sorted_quantiles, split_search
from binq.quant.structured import BinaryWeight

# ------------------------------------------------------------------------------------------ binarizer


def test_order_one_uses_the_masked_mean_and_mean_absolute_deviation() -> None:
    weight = torch.tensor([[1.0, 2.0, 3.0, 6.0], [1.0, 2.0, 100.0, 6.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, True]])
    approx, (term,) = residual_binarize(weight, mask, order=1)
    # row 0: mu = 3, alpha = mean(2, 1, 0, 3) = 1.5; a zero deviation gets sign +1.
    # row 1: the masked-out 100 is ignored: mu = 3, alpha = mean(2, 1, 3) = 2; zero outside the mask.
    assert term.mean.tolist() == [3.0, 3.0]
    assert term.scale.tolist() == [1.5, 2.0]
    assert approx.tolist() == [[1.5, 1.5, 4.5, 4.5], [1.0, 1.0, 0.0, 5.0]]
    assert term.signs[0].tolist() == [False, False, True, True]


def test_uncentred_order_one_is_xnor_mean_abs() -> None:
    weight = torch.tensor([[-1.0, 2.0, -3.0, 6.0]])
    approx, (term,) = residual_binarize(weight, torch.ones_like(weight, dtype=torch.bool), centred=False)
    assert term.mean.tolist() == [0.0]
    assert term.scale.tolist() == [3.0]
    assert approx.tolist() == [[-3.0, 3.0, -3.0, 3.0]]


def test_scales_and_means_are_rounded_to_fp16_before_use() -> None:
    weight = torch.tensor([[0.1, 0.2, 0.7]], dtype=torch.float64)
    approx, (term,) = residual_binarize(weight, torch.ones_like(weight, dtype=torch.bool))
    assert term.mean.item() == torch.tensor(1.0 / 3.0).half().item()
    assert term.scale.item() == term.scale.half().double().item()
    assert torch.equal(approx, torch.where(term.signs, term.scale, -term.scale) + term.mean)


def test_rows_with_an_empty_mask_give_zeros() -> None:
    weight = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1] = False
    approx, terms = residual_binarize(weight, mask, order=2)
    assert (approx[1] == 0).all()
    for term in terms:
        assert term.scale[1] == 0 and term.mean[1] == 0
    assert (approx[0] != 0).all()
    assert torch.isfinite(approx).all()


def test_second_order_error_is_at_most_the_first_order_error_per_row() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 1, 200, generator=generator)  # batch of rows: one error per row
    mask = torch.rand(64, 1, 200, generator=generator) < 0.6
    first = binarization_error(weight, mask, order=1)
    second = binarization_error(weight, mask, order=2)
    assert first.shape == (64,)
    assert (second <= first).all()
    assert second.sum() < 0.5 * first.sum()


def test_second_order_reconstructs_two_values_per_row() -> None:
    # Two masked values per row: the first order alone is exact (mean +- half the gap), up to fp16.
    weight = torch.tensor([[0.25, -3.0, 7.0], [10.0, 0.0, 2.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    approx, _ = residual_binarize(weight, mask, order=2)
    assert torch.equal(approx, weight * mask)


# ------------------------------------------------------------------------------------------- searches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 6400])
def test_sorted_quantiles_equal_torch_quantile(dtype: torch.dtype, n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=generator, dtype=dtype).reshape(-1, 1) * 3
    quantiles = torch.cat([BILLM_SPLIT_QUANTILES, torch.rand(20, generator=generator, dtype=torch.float64)])
    quantiles = torch.cat([quantiles, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    got = sorted_quantiles(values, quantiles)
    expected = torch.quantile(values.flatten(), quantiles.to(dtype))
    assert got.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance)


def test_billm_split_quantiles_are_the_81_from_ten_to_ninety_percent() -> None:
    assert BILLM_SPLIT_QUANTILES.numel() == 81
    assert torch.allclose(BILLM_SPLIT_QUANTILES, torch.arange(10, 91, dtype=torch.float64) / 100)


@pytest.mark.parametrize("seed", range(4))
def test_salient_column_search_picks_exactly_the_two_huge_columns(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    metric = torch.randn(64, 128, generator=generator)
    metric[:, 17] = 50 + torch.randn(64, generator=generator)
    metric[:, 90] = -40 * torch.randn(64, generator=generator).sign()
    salient = salient_column_search(metric, max_columns=50)
    assert salient.dtype == torch.bool and salient.shape == (128,)
    assert salient.nonzero().flatten().tolist() == [17, 90]


def test_salient_column_search_is_capped_at_max_columns_minus_one() -> None:
    generator = torch.Generator().manual_seed(5)
    metric = torch.randn(32, 100, generator=generator)
    huge = torch.tensor([3, 20, 41, 62, 77, 98])
    signs = torch.randn(32, 6, generator=generator).sign()
    metric[:, huge] = signs * torch.tensor([100.0, 90.0, 80.0, 70.0, 60.0, 50.0])  # column scores 32 * scale
    # Six huge columns but at most 4 may be salient: the 4 with the largest column scores.
    assert salient_column_search(metric, max_columns=5).nonzero().flatten().tolist() == [3, 20, 41, 62]
    assert not salient_column_search(metric, max_columns=1).any()
    assert not salient_column_search(metric[:, :1], max_columns=50).any()  # one column: nothing to split


@pytest.mark.parametrize("exponent", [-24, -12, 12, 20])
def test_searches_do_not_depend_on_the_scale_of_the_metric(exponent: int) -> None:
    # BiLLM searches on T = W^2 / U_jj^2, whose scale follows the activations': it can sit far outside
    # fp16's range. Scaling by a power of two is exact in float32, so the searches must not change.
    generator = torch.Generator().manual_seed(6)
    block = torch.randn(64, 128, generator=generator)
    block[:, [7, 8]] *= 6
    saliency = block.square() / (1 + torch.rand(128, generator=generator)).square()
    factor = 2.0**exponent
    salient = salient_column_search(saliency, 50)
    assert torch.equal(salient_column_search(saliency * factor, 50), salient)
    mask = salient.expand_as(saliency)
    assert split_search(saliency * factor, mask) == split_search(saliency, mask) * factor


def _two_clusters(rows: int, cols: int, n_small: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitudes in [0.5, 1.5] (n_small entries) or [9, 11] (the rest), random signs and positions."""
    generator = torch.Generator().manual_seed(seed)
    n = rows * cols
    big = torch.zeros(n, dtype=torch.bool)
    big[torch.randperm(n, generator=generator)[n_small:]] = True
    magnitude = torch.where(big, 9 + 2 * torch.rand(n, generator=generator), 0.5 + torch.rand(n, generator=generator))
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    return (magnitude * sign).reshape(rows, cols), big.reshape(rows, cols)


def test_split_search_separates_two_magnitude_clusters() -> None:
    # Half small, half big: the 50% candidate falls between the clusters, and it is the best split.
    metric, big = _two_clusters(64, 100, n_small=3200, seed=0)
    breakpoint_value = split_search(metric, torch.zeros_like(big))
    assert torch.equal(metric.abs() >= breakpoint_value, big)


def test_split_search_quantiles_count_salient_entries_as_zeros() -> None:
    # 4 salient columns (256 entries) of huge values: zeroed, they join the small half of the quantiles,
    # so 2944 small + 256 zeros put the 50% candidate between the clusters again. (Were they removed,
    # no candidate on the 1% grid would fall between the clusters.)
    metric, big = _two_clusters(64, 100, n_small=3200, seed=1)
    salient_columns = torch.zeros(100, dtype=torch.bool)
    salient_columns[[2, 30, 31, 99]] = True
    salient = salient_columns.expand(64, -1)
    metric = metric.clone()
    big = big.clone()
    # Make the salient columns huge, and turn small non-salient entries big until 2944 remain.
    small_positions = (~big & ~salient).nonzero()
    extra = small_positions.shape[0] - 2944
    big[small_positions[:extra, 0], small_positions[:extra, 1]] = True
    metric[small_positions[:extra, 0], small_positions[:extra, 1]] = 10.0
    metric[salient] = 1000.0
    assert int((~big & ~salient).sum()) == 2944 and int((big & ~salient).sum()) == 3200
    breakpoint_value = split_search(metric, salient)
    assert torch.equal((metric.abs() >= breakpoint_value) & ~salient, big & ~salient)


# --------------------------------------------------------------------------------------------- BiLLM


@functools.cache
def _problem(seed: int, cols: int, rows: int = 64, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs ``X = Z M`` (``M`` = identity + rank-8 mixing)."""
    generator = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(cols, 8, generator=generator) @ torch.randn(8, cols, generator=generator)
    x = torch.randn(tokens, cols, generator=generator) @ (torch.eye(cols) + low_rank / 8**0.5)
    return torch.randn(rows, cols, generator=generator), 2 * x.T @ x / tokens


@functools.cache
def _billm(seed: int, cols: int, exact: bool = False) -> BinaryWeight:
    weight, hessian = _problem(seed, cols)
    return quantize_billm(weight, hessian, BiLLMConfig(exact_compensation=exact))


def _binarize_block(block: torch.Tensor, factor_diagonal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BiLLM's quantization of one block from its current weights: (approximation, salient columns)."""
    masks = billm_block_masks(block, factor_diagonal, BiLLMConfig())
    salient = masks.salient_columns.expand_as(block)
    approx = (
        residual_binarize(block, salient, order=2)[0]
        + residual_binarize(block, ~salient & ~masks.sparse, order=1)[0]
        + residual_binarize(block, masks.sparse, order=1)[0]
    )
    return approx, masks.salient_columns


def test_hessian_saliency_divides_by_the_squared_factor_diagonal() -> None:
    # Equal-magnitude weights: only the factor diagonal can make columns 5 and 77 salient (T = W^2 / U_jj^2).
    generator = torch.Generator().manual_seed(2)
    block = torch.randn(64, 128, generator=generator).sign() * (1 + 0.1 * torch.rand(64, 128, generator=generator))
    diagonal = torch.ones(128)
    diagonal[[5, 77]] = 0.02
    masks = billm_block_masks(block, diagonal, BiLLMConfig())
    assert masks.salient_columns.nonzero().flatten().tolist() == [5, 77]
    assert not masks.sparse[:, masks.salient_columns].any()


def test_hessian_split_is_a_threshold_on_the_saliency_across_columns() -> None:
    generator = torch.Generator().manual_seed(4)
    block = torch.randn(64, 128, generator=generator)
    diagonal = 1 + torch.rand(128, generator=generator)  # columns weighted differently
    masks = billm_block_masks(block, diagonal, BiLLMConfig())
    saliency = block.square() / diagonal.square()
    nonsalient = ~masks.salient_columns.expand_as(block)
    sparse, concentrated = masks.sparse & nonsalient, ~masks.sparse & nonsalient
    assert sparse.any() and concentrated.any()
    assert saliency[sparse].min() >= saliency[concentrated].max()
    assert not masks.sparse[:, masks.salient_columns].any()


def test_factor_diagonal_is_clamped_before_dividing() -> None:
    block = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    diagonal = torch.ones(128)
    diagonal[[9, 40]] = 0.0
    clamped = diagonal.clone()
    clamped[[9, 40]] = 1e-8
    masks = billm_block_masks(block, diagonal, BiLLMConfig())
    expected = billm_block_masks(block, clamped, BiLLMConfig())
    assert masks.salient_columns.nonzero().flatten().tolist() == [9, 40]
    assert torch.equal(masks.salient_columns, expected.salient_columns)
    assert torch.equal(masks.sparse, expected.sparse)


def test_magnitude_saliency_uses_the_weights_and_ignores_the_factor() -> None:
    generator = torch.Generator().manual_seed(3)
    block = torch.randn(64, 128, generator=generator)
    block[:, [11, 100]] = 30 * torch.randn(64, 2, generator=generator).sign()
    diagonal = torch.ones(128)
    diagonal[[5, 77]] = 0.02  # would make 5 and 77 salient under the hessian metric
    masks = billm_block_masks(block, diagonal, BiLLMConfig(salient_metric="magnitude"))
    assert masks.salient_columns.nonzero().flatten().tolist() == [11, 100]


@pytest.mark.parametrize("cols", [200, 320])
def test_first_block_is_the_binarization_of_the_untouched_weights(cols: int) -> None:
    weight, hessian = _problem(0, cols)
    result = _billm(0, cols)
    u = factor_hessian(hessian).inverse_cholesky_upper
    block = weight[:, :128]
    masks = billm_block_masks(block, torch.diagonal(u)[:128], BiLLMConfig())
    expected, salient_columns = _binarize_block(block, torch.diagonal(u)[:128])
    assert torch.equal(result.dequantize()[:, :128], expected)
    assert torch.equal(result.salient_columns[:128], salient_columns)
    assert torch.equal(result.group_bitmap[:, :128], masks.sparse)


def test_later_blocks_are_binarized_after_diagonal_block_compensation() -> None:
    weight, hessian = _problem(0, 200)
    result = _billm(0, 200)
    u = factor_hessian(hessian).inverse_cholesky_upper
    w = weight.clone()
    approx0, _ = _binarize_block(w[:, :128], torch.diagonal(u)[:128])
    # err_j = (w_j - q_j) / U_jj for the block's columns, then W[:, 128:] -= E U[:128, 128:].
    error = (w[:, :128] - approx0) / torch.diagonal(u)[:128]
    w[:, 128:] -= error @ u[:128, 128:]
    approx1, salient_columns = _binarize_block(w[:, 128:], torch.diagonal(u)[128:])
    assert torch.allclose(result.dequantize()[:, 128:], approx1, rtol=0, atol=1e-6)
    assert torch.equal(result.salient_columns[128:], salient_columns)
    # ... which differs from binarizing the uncompensated block.
    uncompensated, _ = _binarize_block(weight[:, 128:], torch.diagonal(u)[128:])
    assert not torch.allclose(result.dequantize()[:, 128:], uncompensated, atol=1e-3)


def test_exact_compensation_uses_the_triangular_solve() -> None:
    weight, hessian = _problem(0, 200)
    hessian = hessian.double()  # float64 end to end, so both computations agree to rounding
    result = quantize_billm(weight, hessian, BiLLMConfig(exact_compensation=True))
    u = factor_hessian(hessian).inverse_cholesky_upper
    w = weight.double()
    approx0, _ = _binarize_block(w[:, :128], torch.diagonal(u)[:128])
    error = (w[:, :128] - approx0) @ torch.linalg.inv(u[:128, :128])  # E = (W_b - Q_b) U_bb^-1
    w[:, 128:] -= error @ u[:128, 128:]
    approx1, _ = _binarize_block(w[:, 128:], torch.diagonal(u)[128:])
    assert torch.allclose(result.dequantize(torch.float64)[:, 128:], approx1, rtol=0, atol=1e-6)


def test_bitmap_is_off_on_salient_columns_and_salient_counts_are_in_range() -> None:
    for cols in (200, 320):
        result = _billm(0, cols)
        assert not result.group_bitmap[:, result.salient_columns].any()
        assert result.group_bitmap.any()  # both zones are used
        for start in range(0, cols, 128):
            assert 1 <= int(result.salient_columns[start : start + 128].sum()) <= 49
        assert result.zone_names == ["concentrated", "sparse", "salient", "salient_residual"]


@pytest.mark.parametrize("cols", [200, 320])
def test_storage_bits_match_the_hand_formula(cols: int) -> None:
    result = _billm(0, cols)
    rows = result.shape[0]
    blocks = math.ceil(cols / 128)
    n_salient = int(result.salient_columns.sum())
    expected = (
        rows * math.ceil(cols / 8) * 8  # signs
        + rows * math.ceil(cols / 8) * 8  # concentrated/sparse bitmap
        + math.ceil(cols / 8) * 8  # salient column mask
        + rows * math.ceil(n_salient / 8) * 8  # residual signs of the salient columns
        + 2 * 16 * rows * blocks * 4  # fp16 scale and mean per (row, block, zone)
    )
    assert result.storage_bits_total == expected
    assert result.storage_bits == pytest.approx(expected / (rows * cols))
    assert result.compute_bits == pytest.approx(1 + n_salient / cols)


def test_exact_compensation_beats_the_diagonal_one() -> None:
    diagonal, exact = [], []
    for seed in range(3):
        weight, hessian = _problem(seed, 200)
        diagonal.append(relative_output_error(weight, _billm(seed, 200).dequantize(), hessian))
        exact.append(relative_output_error(weight, _billm(seed, 200, exact=True).dequantize(), hessian))
    assert sum(exact) < sum(diagonal)
    assert all(e < d for e, d in zip(exact, diagonal, strict=True))


def test_error_is_far_below_one_bit_rtn() -> None:
    for seed in range(3):
        weight, hessian = _problem(seed, 200)
        billm = relative_output_error(weight, _billm(seed, 200).dequantize(), hessian)
        rtn = relative_output_error(weight, quantize_rtn(weight, None, RTNConfig(bits=1)).dequantize(), hessian)
        assert billm < 0.5 * rtn


@pytest.mark.parametrize("metric", ["hessian", "magnitude"])
def test_weights_of_dead_inputs_are_ignored(metric: str) -> None:
    weight, hessian = _problem(0, 200)
    hessian = hessian.clone()
    hessian[[4, 150]] = 0
    hessian[:, [4, 150]] = 0
    config = BiLLMConfig(salient_metric=metric)
    q = quantize_billm(weight, hessian, config).dequantize()
    assert torch.isfinite(q).all()
    assert relative_output_error(weight, q, hessian) < 0.3
    # Dead inputs' weights are zeroed before quantization: their values cannot matter.
    changed = weight.clone()
    changed[:, [4, 150]] = 100.0
    assert torch.equal(quantize_billm(changed, hessian, config).dequantize(), q)


@pytest.mark.parametrize(
    "options",
    [{"block_size": 1}, {"salient_metric": "foo"}, {"max_salient_columns": 0}, {"search_order": 3}, {"percdamp": -1}],
)
def test_invalid_configs_raise_binq_error(options: dict) -> None:
    with pytest.raises(BinqError):
        BiLLMConfig(**options)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("centred", [True, False])
def test_closed_form_search_error_equals_the_error_of_the_built_approximation(order: int, centred: bool) -> None:

    gen = torch.Generator().manual_seed(order)
    weight = torch.randn(20, 33, generator=gen).double() * 3 + 1
    masks = torch.rand(5, 20, 33, generator=gen) > 0.4
    masks[0, 4] = False  # an empty row
    approx, _ = residual_binarize(weight, masks, order, centred, rounded=False)
    built = ((weight - approx) * masks).square().sum((-2, -1))
    assert torch.allclose(binarization_error(weight, masks, order, centred), built, rtol=1e-10, atol=1e-10)
