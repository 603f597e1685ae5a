"""From an accumulated Hessian to the factor GPTQ-style methods use: dead columns, damping, Cholesky.

``H = 2 X X^T / tokens`` is the Hessian of ``||W X - Q X||^2`` in each row of ``Q`` (GPTQ's objective). The
methods use ``U = chol_upper((H + lambda I)^-1)`` with ``lambda = percdamp * mean(diag H)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from binq.errors import BinqError

log = logging.getLogger(__name__)

# Each failed factorization multiplies the damping by this (0.01 -> 0.1 -> 1.0 by default).
DAMPING_GROWTH = 10.0
DAMPING_ATTEMPTS = 3


class HessianError(BinqError):
    """The Hessian could not be factored even with the largest damping."""


@dataclass
class HessianFactor:
    """What the GPTQ-family methods need from the Hessian."""

    inverse_cholesky_upper: torch.Tensor  # U with (H + lambda I)^-1 = U^T U
    dead_columns: torch.Tensor  # bool (cols,): inputs that were always zero
    percdamp: float  # the relative damping that worked


def dead_columns(hessian: torch.Tensor) -> torch.Tensor:
    """Inputs never seen non-zero during calibration (GPTQ sets their weights to zero)."""
    return torch.diagonal(hessian) == 0


def factor_hessian(hessian: torch.Tensor, percdamp: float = 0.01) -> HessianFactor:
    """Damp and factor ``hessian``, retrying with more damping when Cholesky fails.

    Works in at least fp32 (fp64 if the Hessian is fp64). TF32 must be off for reproducible factors;
    the engine turns it off.
    """
    if not _finite(hessian):
        raise HessianError("the Hessian has non-finite entries (NaN/Inf activations in calibration?)")
    work_dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    dead = dead_columns(hessian)
    mean_diag = None
    damp = percdamp
    for attempt in range(DAMPING_ATTEMPTS):
        # H + lambda I, made afresh from H on each attempt with lambda added to the diagonal: the same
        # sums as adding lambda times an identity matrix, and at most two matrices of H's size at once.
        damped = hessian.to(work_dtype, copy=True)
        damped[dead, dead] = 1.0
        if mean_diag is None:
            mean_diag = torch.diagonal(damped).mean()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and _finite(upper):
                if attempt:
                    log.warning("Hessian factored only with damping %.3g (asked %.3g)", damp, percdamp)
                return HessianFactor(upper, dead, damp)
        log.warning("Cholesky failed with damping %.3g; retrying with %.3g", damp, damp * DAMPING_GROWTH)
        damp *= DAMPING_GROWTH
    raise HessianError(
        f"the Hessian is not positive definite even with damping {damp / DAMPING_GROWTH:.3g}: "
        "use more calibration samples or a larger --percdamp"
    )


def _finite(matrix: torch.Tensor, rows: int = 1024) -> bool:
    """Whether every entry is finite, ``rows`` rows at a time (no matrix-sized mask)."""
    return all(bool(torch.isfinite(matrix[i : i + rows]).all()) for i in range(0, matrix.shape[0], rows))


def relative_output_error(
    weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor, rows: int = 256, cols: int = 1024
) -> float:
    """``||(W - Q) X||^2 / ||W X||^2`` on the calibration inputs, exactly, from the undamped Hessian.

    In float64, ``rows`` rows of the weight and ``cols`` columns of the Hessian at a time, so that no
    full-size float64 copy of either is ever made (``sum_i d_i H d_i^T`` summed over blocks)."""
    num = den = 0.0
    for col in range(0, hessian.shape[1], cols):
        h = hessian[:, col : col + cols].to(torch.float64)
        for start in range(0, weight.shape[0], rows):
            w = weight[start : start + rows].to(torch.float64)
            delta = w - quantized[start : start + rows].to(torch.float64)
            num += float((delta @ h * delta[:, col : col + cols]).sum())
            den += float((w @ h * w[:, col : col + cols]).sum())
    return num / den if den > 0 else float("nan")


def prepare_weight(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What every Hessian-based method starts from: ``(W, U)``, a working copy of the weight in the
    factor's dtype with its dead columns zeroed (no input ever reaches them), and the upper factor
    ``U`` of the damped inverse Hessian."""
    u = factor_hessian(hessian, percdamp).inverse_cholesky_upper
    w = weight.to(u.dtype).clone()
    w[:, dead_columns(hessian)] = 0
    return w, u
