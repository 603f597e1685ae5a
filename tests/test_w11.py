"""W(1+1): the two-group EM, its exact-split oracle, the importance weights and the ``w11`` method."""

from __future__ import annotations

import itertools

import pytest
import torch

from binq.errors import BinqError
from binq.methods import get_method
from binq.methods.w11 import W11Config, quantize_w11
from binq.quant.hessian import factor_hessian, relative_output_error
from binq.quant.structured import BinaryWeight
from binq.quant.two_group import (
    em_two_group,
    exact_two_group_split,
    importance_weights,
    median_split,
    nearest_levels,
    reconstruct,
    two_group_objective,
)


def _problem(rows: int = 16, cols: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed weights and positive, spread-out importances."""
    gen = torch.Generator().manual_seed(seed)
    weight = _heavy_tailed(rows, cols, gen)
    importance = torch.rand(cols, generator=gen) * 10 + 0.1
    return weight.double(), importance.double()


def _heavy_tailed(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A Gaussian scale mixture: LLM-like weights with a few large magnitudes."""
    return 0.02 * torch.randn(rows, cols, generator=gen) * torch.exp(0.7 * torch.randn(rows, cols, generator=gen))


def _hessian(cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=gen) * (torch.rand(cols, generator=gen) * 3 + 0.1)
    return 2 * x.T @ x / x.shape[0]


# ------------------------------------------------------------------------------------------ EM maths


@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_em_objective_never_increases(offsets: bool, seed: int) -> None:
    weight, importance = _problem(seed=seed)
    fit = em_two_group(weight, importance, median_split(weight), iterations=50, offsets=offsets, rounded=False)
    assert len(fit.history) >= 2  # it really iterated
    for before, after in itertools.pairwise(fit.history):
        assert after <= before * (1 + 1e-12)
    assert fit.objective.sum().item() == pytest.approx(fit.history[-1], rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_em_lies_between_the_median_start_and_the_exact_oracle(seed: int) -> None:
    weight, importance = _problem(seed=seed)
    start = em_two_group(weight, importance, median_split(weight), iterations=0, rounded=False)
    converged = em_two_group(weight, importance, median_split(weight), iterations=100, rounded=False)
    oracle = exact_two_group_split(weight, importance)
    # Per row, not just in total: each row is its own problem.
    assert (converged.objective <= start.objective * (1 + 1e-12)).all()
    assert (converged.objective >= oracle.objective * (1 - 1e-12)).all()
    assert converged.objective.sum() < start.objective.sum()  # EM moved
    # Started from the oracle, EM stays there.
    from_oracle = em_two_group(weight, importance, oracle.groups, iterations=100, rounded=False)
    assert torch.allclose(from_oracle.objective, oracle.objective, rtol=1e-12)


def test_exact_split_equals_brute_force_over_all_assignments() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    importance = torch.rand(8, generator=gen, dtype=torch.float64) + 0.1
    oracle = exact_two_group_split(weight, importance)
    for row in range(3):
        best = float("inf")
        for code in range(2**8):
            groups = torch.tensor([[(code >> j) & 1 for j in range(8)]], dtype=torch.bool)
            h = importance
            scales = torch.stack(
                [
                    ((h * weight[row].abs())[groups[0] == g].sum() / h[groups[0] == g].sum().clamp_min(1e-300))
                    for g in (0, 1)
                ]
            ).unsqueeze(0)
            cost = two_group_objective(weight[row : row + 1], importance, groups, scales, torch.zeros_like(scales))
            best = min(best, float(cost))
        assert float(oracle.objective[row]) == pytest.approx(best, rel=1e-10)


def test_oracle_orders_groups_and_scales_are_weighted_means() -> None:
    weight, importance = _problem(rows=4, cols=32, seed=3)
    fit = exact_two_group_split(weight, importance)
    assert (fit.scales[:, 0] <= fit.scales[:, 1]).all()
    for row in range(4):
        for g in (0, 1):
            member = fit.groups[row] == bool(g)
            expected = (importance[member] * weight[row, member].abs()).sum() / importance[member].sum()
            assert float(fit.scales[row, g]) == pytest.approx(float(expected), rel=1e-6)
        # Threshold structure: every group-1 magnitude is at least every group-0 magnitude.
        magnitude = weight[row].abs()
        assert magnitude[fit.groups[row]].min() >= magnitude[~fit.groups[row]].max()


def test_offsets_never_hurt_from_the_same_start() -> None:
    weight, importance = _problem(seed=5)
    weight = weight + 0.01  # a shifted row distribution: offsets should help
    plain = em_two_group(weight, importance, median_split(weight), iterations=30, rounded=False)
    shifted = em_two_group(weight, importance, median_split(weight), iterations=30, offsets=True, rounded=False)
    assert shifted.objective.sum() < plain.objective.sum()


def test_nearest_levels_picks_the_closest_of_four_levels() -> None:
    scales = torch.tensor([[1.0, 4.0]])
    means = torch.tensor([[0.5, -1.0]])
    weight = torch.tensor([[-6.0, -0.6, 0.0, 1.4, 2.0, 2.9]])
    groups, positive = nearest_levels(weight, scales, means)
    levels = torch.tensor([-0.5, 1.5, -5.0, 3.0])
    expected = levels[(weight.T - levels).abs().argmin(1)]
    assert torch.equal(reconstruct(weight, groups, scales, means)[0], expected)
    assert torch.equal(positive[0], expected > torch.where(groups[0], -1.0, 0.5))


def test_rounded_fit_stores_fp16_values() -> None:
    weight, importance = _problem(seed=2)
    fit = em_two_group(weight.float(), importance.float(), median_split(weight.float()))
    assert torch.equal(fit.scales, fit.scales.half().float())
    assert (fit.scales[:, 0] <= fit.scales[:, 1]).all()


def test_importance_weights_match_their_definitions() -> None:
    hessian = _hessian(24).double()
    u = factor_hessian(hessian, 0.01).inverse_cholesky_upper
    damped = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(24, dtype=torch.float64)
    inverse_diagonal = torch.diagonal(torch.linalg.inv(damped))
    assert torch.allclose(importance_weights(hessian, u, "obs"), 1 / inverse_diagonal, rtol=1e-8)
    assert torch.allclose(importance_weights(hessian, u, "review"), inverse_diagonal, rtol=1e-8)
    assert torch.equal(importance_weights(hessian, u, "diag"), torch.diagonal(hessian))
    assert torch.equal(importance_weights(hessian, u, "uniform"), torch.ones(24, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ the method


def test_w11_stores_sign_group_bit_and_fp16_scales() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 200, generator=gen)
    hessian = _hessian(200)
    quantized = quantize_w11(weight, hessian, W11Config())
    assert isinstance(quantized, BinaryWeight)
    assert quantized.zone_names == ["concentrated", "sparse"]
    assert quantized.means is None and quantized.group_bitmap is not None
    # 2 bits per weight + two fp16 scales per (row, block): blocks 128 + 72 wide.
    assert quantized.storage_bits_total == 32 * 200 * 2 + 32 * 2 * 2 * 16
    with_offsets = quantize_w11(weight, hessian, W11Config(offsets=True))
    assert with_offsets.storage_bits_total == quantized.storage_bits_total + 32 * 2 * 2 * 16
    # Every element is one of its row block's four levels.
    dequantized = quantized.dequantize()
    scales = quantized.scales.float()
    for b, start in enumerate((0, 128)):
        levels = torch.cat([scales[:, b], -scales[:, b]], 1)
        block = dequantized[:, start : start + 128]
        assert ((block.unsqueeze(-1) - levels.unsqueeze(1)).abs().amin(-1) == 0).all()
    # The larger scale is the bitmap's (sparse) group.
    assert (scales[:, :, 0] <= scales[:, :, 1]).all()


def test_w11_beats_gptq_2bit_and_em_beats_no_em_on_output_error() -> None:
    weight = _heavy_tailed(64, 256, torch.Generator().manual_seed(1))
    hessian = _hessian(256, seed=1)
    errors = {}
    for name, config in {
        "median": W11Config(init="median", em_iterations=0),
        "em": W11Config(init="median"),
        "offsets": W11Config(offsets=True),
    }.items():
        errors[name] = relative_output_error(weight, quantize_w11(weight, hessian, config).dequantize(), hessian)
    gptq = get_method("gptq")
    errors["gptq2"] = relative_output_error(
        weight, gptq.quantize(weight, hessian, gptq.make_config(bits=2)).dequantize(), hessian
    )
    assert errors["em"] < errors["median"] < errors["gptq2"]
    assert errors["offsets"] < errors["em"]


def test_w11_compensation_beats_plain_rounding() -> None:
    """The GPTQ sweep must lower the output error against fitting and rounding each block without it."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 128, generator=gen)
    hessian = _hessian(128, seed=2)
    compensated = quantize_w11(weight, hessian, W11Config(block_size=128))
    factor = factor_hessian(hessian, 0.01)
    importance = importance_weights(hessian, factor.inverse_cholesky_upper, "obs")
    fit = em_two_group(weight, importance, median_split(weight))
    plain = reconstruct(weight, fit.groups, fit.scales, fit.means)
    assert relative_output_error(weight, compensated.dequantize(), hessian) < relative_output_error(
        weight, plain, hessian
    )


@pytest.mark.parametrize("init", ["median", "exact", "salience"])
@pytest.mark.parametrize("importance", ["obs", "diag", "review", "uniform"])
def test_every_option_runs_and_handles_dead_columns(init: str, importance: str) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 96, generator=gen)
    hessian = _hessian(96, seed=3)
    hessian[5, :] = 0
    hessian[:, 5] = 0
    quantized = quantize_w11(weight, hessian, W11Config(block_size=64, init=init, importance=importance))
    dequantized = quantized.dequantize()
    assert torch.isfinite(dequantized).all()
    assert relative_output_error(weight, dequantized, hessian) < 0.5


def test_config_errors_are_user_errors() -> None:
    with pytest.raises(BinqError, match="--init"):
        W11Config(init="kmeans")
    with pytest.raises(BinqError, match="--importance"):
        W11Config(importance="fisher")
    with pytest.raises(BinqError, match="--em-iterations"):
        get_method("w11").make_config(em_iterations=-1)
