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

from dataclasses import dataclass

import torch

from binq.methods.registry import MethodConfig, option, register
from binq.quant.arb import ZoneFit, arb_fit, arb_x_refine, resign_columns
from binq.quant.compensation import compensated_metric
from binq.quant.hessian import prepare_weight
from binq.quant.structured import BinaryPlanes, BinaryWeight
from binq.quant.sweep import Block, sweep_blocks


@dataclass
class ARBGroupConfig(MethodConfig):
    """Sign + per-group scale (Q1_0 with ``group_size`` 128 and no mean).

    - ``group_size``: weights per scale along a row; ``mean``: also one fp16 mean per group (not Q1_0).
    - ``iterations``: ARB weight-space rounds for the start; ``rounds``: alternations of GPTQ re-signing
      and closed-form metric scales (0 = start plus one metric fit, no re-signing).
    - ``percdamp``: Hessian damping relative to ``mean(diag H)``.
    """

    group_size: int = option(128, low=1)
    mean: bool = False
    iterations: int = option(15, low=0, high=10_000)
    rounds: int = option(3, low=0, high=1000)
    percdamp: float = option(0.01, low=0.0, high=10.0)


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
    w, u = prepare_weight(weight, hessian, config.percdamp)
    planes = BinaryPlanes.zeros(w, config.group_size, zones=1)

    def fit_block(group: Block) -> torch.Tensor:
        fit = fit_group(group.weight, group.factor, config)
        planes.signs[:, group.columns] = fit.signs[0]
        planes.scales[:, group.index, 0] = fit.row_scales[0]
        planes.means[:, group.index, 0] = fit.mean
        return fit.approximation()

    sweep_blocks(w, u, config.group_size, fit_block, exact=True)
    return planes.finish(config.group_size, means=config.mean, group_bitmap=False)
