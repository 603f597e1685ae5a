"""Hessian factoring (dead columns, damping, retries, failures) and the relative output error."""

from __future__ import annotations

import logging

import pytest
import torch

from binq.errors import BinqError
from binq.quant.hessian import HessianError, dead_columns, factor_hessian, relative_output_error


def _inputs(tokens: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    return torch.randn(tokens, cols, generator=generator, dtype=torch.float64) @ mixing.double()


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("percdamp", [0.01, 0.1])
def test_factor_is_upper_cholesky_of_the_damped_inverse(dtype: torch.dtype, percdamp: float) -> None:
    hessian = _hessian(_inputs(400, 96, seed=0)).to(dtype)
    factor = factor_hessian(hessian, percdamp)
    u = factor.inverse_cholesky_upper
    assert u.dtype == dtype
    assert torch.equal(u, u.triu())
    assert (torch.diagonal(u) > 0).all()
    h = hessian.double()
    expected = torch.linalg.inv(h + percdamp * torch.diagonal(h).mean() * torch.eye(96, dtype=torch.float64))
    tolerance = 1e-10 if dtype == torch.float64 else 2e-4
    assert torch.allclose((u.T @ u).double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max())
    assert factor.percdamp == percdamp
    assert not factor.dead_columns.any()


def test_dead_columns_are_detected_and_get_unit_diagonal() -> None:
    x = _inputs(300, 100, seed=1)
    dead = torch.zeros(100, dtype=torch.bool)
    dead[[0, 13, 57, 99]] = True
    x[:, dead] = 0
    hessian = _hessian(x)
    assert torch.equal(dead_columns(hessian), dead)

    factor = factor_hessian(hessian, 0.01)
    assert torch.equal(factor.dead_columns, dead)
    fixed = hessian.clone()
    fixed[dead.nonzero().flatten(), dead.nonzero().flatten()] = 1.0  # only the diagonal entries
    assert fixed[0, 13] == 0 and fixed[13, 13] == 1
    damp = 0.01 * torch.diagonal(fixed).mean()
    expected = torch.linalg.inv(fixed + damp * torch.eye(100, dtype=torch.float64))
    u = factor.inverse_cholesky_upper
    assert torch.allclose(u.T @ u, expected, rtol=1e-10, atol=1e-12)
    # A dead input is decoupled from every other input in the factor.
    off_diagonal = u[:, dead].clone()
    off_diagonal[dead.nonzero().flatten(), torch.arange(4)] = 0
    assert (off_diagonal == 0).all()
    assert (u[dead][:, ~dead] == 0).all()


def test_factor_hessian_does_not_modify_its_input() -> None:
    x = _inputs(200, 64, seed=2)
    x[:, 5] = 0
    hessian = _hessian(x)
    before = hessian.clone()
    factor_hessian(hessian)
    assert torch.equal(hessian, before)


def test_indefinite_hessian_factors_after_retrying_with_more_damping(caplog: pytest.LogCaptureFixture) -> None:
    # H = A A^T - c I with A of rank 32 < 96: its smallest eigenvalue is -c. With c = 5% of mean(diag H),
    # 1% damping leaves it indefinite and 10% makes it positive definite.
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(96, 32, generator=generator, dtype=torch.float64)
    gram = a @ a.T
    c = 0.05 * torch.diagonal(gram).mean() / 1.05  # so that c = 0.05 * mean(diag(gram - c I))
    eye = torch.eye(96, dtype=torch.float64)
    hessian = gram - c * eye
    assert torch.linalg.eigvalsh(hessian).min() < -0.04 * torch.diagonal(hessian).mean()
    assert torch.linalg.cholesky_ex(hessian + 0.01 * torch.diagonal(hessian).mean() * eye)[1] != 0

    with caplog.at_level(logging.WARNING, logger="binq.quant.hessian"):
        factor = factor_hessian(hessian, 0.01)
    assert factor.percdamp == pytest.approx(0.1)
    assert "damping" in caplog.text
    u = factor.inverse_cholesky_upper
    expected = torch.linalg.inv(hessian + 0.1 * torch.diagonal(hessian).mean() * eye)
    assert torch.allclose(u.T @ u, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())


def test_negative_definite_hessian_raises_hessian_error() -> None:
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(64, 64, generator=generator)
    hessian = -(a @ a.T) - torch.eye(64)
    with pytest.raises(HessianError, match="not positive definite"):
        factor_hessian(hessian, 0.01)
    assert issubclass(HessianError, BinqError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_raises_hessian_error(bad: float) -> None:
    hessian = _hessian(_inputs(100, 32, seed=5))
    hessian[3, 7] = bad
    with pytest.raises(HessianError, match="non-finite"):
        factor_hessian(hessian)


def test_relative_output_error_matches_a_direct_computation_on_the_inputs() -> None:
    generator = torch.Generator().manual_seed(6)
    x = _inputs(500, 200, seed=6)
    weight = torch.randn(64, 200, generator=generator)
    quantized = weight + 0.1 * torch.randn(64, 200, generator=generator)
    direct = ((weight - quantized).double() @ x.T).square().sum() / (weight.double() @ x.T).square().sum()
    for hessian in (_hessian(x), _hessian(x).float()):
        assert relative_output_error(weight, quantized, hessian) == pytest.approx(float(direct), rel=1e-5)
    assert relative_output_error(weight, weight, _hessian(x)) == 0.0
    assert relative_output_error(weight, torch.zeros_like(weight), _hessian(x)) == pytest.approx(1.0)
    # The error is a property of the outputs: with a rank-deficient input it ignores unseen directions.
    x_low = x.clone()
    x_low[:, 100:] = 0
    assert relative_output_error(weight, weight * (torch.arange(200) < 100), _hessian(x_low)) == 0.0
