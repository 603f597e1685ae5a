"""Bitmap-free per-group binarization: a sign per weight and one fp16 scale per group of the row.

``W[i, j] ~ alpha[i, g] * s[i, j] (+ mu[i, g])`` with ``g = j // group_size``: no bitmap, no salient
columns, so it is exactly GGUF's Q1_0 (group 128, no mean: 1.125 bits per weight) and the simplest
layout a kernel can read. Quality comes from the fitting, group by group along the columns:

1. ARB's weight-space refinement (:func:`binq.quant.arb.arb_fit`) gives a start;
2. the scales (and means) are re-fitted in closed form, signs frozen, in the metric the group's error
   is really paid in once later columns compensate it: with ``U`` the upper inverse-Hessian factor,
   fixing the group costs ``||(W_g - Q_g) U_gg^-1||_F^2`` (GPTQ's identity), i.e. ARB-X's closed forms
   with ``S = U_gg^-1 U_gg^-T`` instead of the block of ``H``;
3. GPTQ's column loop re-signs each column on its error-updated weights with the scales fixed, then
   step 2 again; ``rounds`` alternations, keeping the best;
4. the group's exact error moves the later columns (GPTQ's compensation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from binq.methods.arb import resign_columns
from binq.methods.registry import check_range, register
from binq.quant.arb import ZoneFit, arb_fit, arb_x_refine
from binq.quant.compensation import block_error, compensated_metric, propagate_block_error
from binq.quant.hessian import prepare_weight
from binq.quant.structured import BinaryWeight


@dataclass
class ARBGroupConfig:
    """Sign + per-group scale (Q1_0 with ``group_size`` 128 and no mean).

    - ``group_size``: weights per scale along a row; ``mean``: also one fp16 mean per group (not Q1_0).
    - ``iterations``: ARB weight-space rounds for the start; ``rounds``: alternations of GPTQ re-signing
      and closed-form metric scales (0 = start plus one metric fit, no re-signing).
    - ``percdamp``: Hessian damping relative to ``mean(diag H)``.
    """

    group_size: int = 128
    mean: bool = False
    iterations: int = 15
    rounds: int = 3
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        check_range("--group-size", self.group_size, 1, 1 << 30)
        check_range("--iterations", self.iterations, 0, 10_000)
        check_range("--rounds", self.rounds, 0, 1000)
        check_range("--percdamp", self.percdamp, 0.0, 10.0)


def fit_group(group: torch.Tensor, u_block: torch.Tensor, config: ARBGroupConfig) -> ZoneFit:
    """Steps 1-3 for one group of columns; returns the best fit, rounded to what is stored."""
    mask = torch.ones_like(group, dtype=torch.bool)
    inverse, metric = compensated_metric(u_block)

    def metric_fit(fit: ZoneFit) -> tuple[ZoneFit, float]:
        # One mean-and-scale pair per row: a few coordinate rounds reach the joint optimum.
        refined = arb_x_refine(group, fit, metric, iterations=8 if config.mean else 1, centred=config.mean)
        refined = refined.rounded()
        return refined, float(((group - refined.approximation()) @ inverse).square().sum())

    best, best_loss = metric_fit(arb_fit(group, mask, 1, config.iterations, centred=config.mean))
    current = best
    for _ in range(config.rounds):
        candidate = ZoneFit(mask, [s.clone() for s in current.signs], current.row_scales, current.mean)
        resign_columns(group, [candidate], u_block)
        current, loss = metric_fit(candidate)
        if loss < best_loss:
            best, best_loss = current, loss
    return best


@register("arb-group", ARBGroupConfig, "Sign + one fp16 scale per group (Q1_0 form): ARB start, Hessian-metric fit")
def quantize_arb_group(weight: torch.Tensor, hessian: torch.Tensor, config: ARBGroupConfig) -> BinaryWeight:
    rows, cols = weight.shape
    w, u = prepare_weight(weight, hessian, config.percdamp)
    groups = math.ceil(cols / config.group_size)
    signs = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    scales = torch.zeros(rows, groups, 1, dtype=w.dtype, device=w.device)
    means = torch.zeros_like(scales)
    for g, start in enumerate(range(0, cols, config.group_size)):
        end = min(start + config.group_size, cols)
        group = w[:, start:end]
        u_block = u[start:end, start:end]
        fit = fit_group(group, u_block, config)
        propagate_block_error(w, block_error(group, fit.approximation(), u_block, exact=True), u, start, end)
        signs[:, start:end] = fit.signs[0]
        scales[:, g, 0] = fit.row_scales[0]
        means[:, g, 0] = fit.mean
    return BinaryWeight(
        signs=signs.cpu(),
        scales=scales.half().cpu(),
        block_size=config.group_size,
        means=means.half().cpu() if config.mean else None,
    )
