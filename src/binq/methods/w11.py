"""W(1+1): a sign and a group bit per weight, two scales per (row, column block), fitted by EM.

A reconstruction of the weight side of Song et al., "Achieving binary weight and activation for LLMs
using Post-Training Quantization" (ACL Findings 2025): the paper's method section could not be read, so
each uncertain choice is an option:

1. per column block of ``block_size`` columns, from the current (error-compensated) weights, an
   initial split of each row (``median`` of ``|w|``, the ``exact`` best split, or BiLLM's ``salience``
   break-point), then hard EM on the importance-weighted error (:mod:`binq.quant.two_group`);
2. a GPTQ column sweep with those scales fixed: each column is rounded to its row's nearest of the
   four levels ``mu_g +- a_g`` (so the group bit is re-chosen on the compensated value) and its error
   is spread over the later columns through ``U = chol_upper((H + lambda I)^-1)``.

Stored: sign plane, group bitmap, fp16 scales (and offsets with ``offsets``) per (row, block, group):
``2 + 32 / block_size`` bits per weight (``+ 32 / block_size`` with offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from binq.methods.registry import MethodConfig, option, register
from binq.quant.hessian import prepare_weight
from binq.quant.structured import BinaryPlanes, BinaryWeight
from binq.quant.sweep import sweep_columns
from binq.quant.two_group import (
    IMPORTANCE_KINDS,
    TwoGroupFit,
    em_two_group,
    exact_two_group_split,
    importance_weights,
    median_split,
    nearest_levels,
    reconstruct,
    salience_split,
)

INIT_KINDS = ("median", "exact", "salience")


@dataclass
class W11Config(MethodConfig):
    """W(1+1) settings (defaults chosen by measurement, docs/W11.md).

    - ``block_size``: columns per block; each (row, block) has two scales.
    - ``importance``: column weight of the EM objective: ``obs`` (``1/[H^-1]_jj``), ``diag`` (``H_jj``),
      ``review`` (``[H^-1]_jj``, the review's literal formula) or ``uniform``. ``diag`` by measurement:
      at model level it gave 35 % lower perplexity than ``obs`` (docs/W11.md); at layer level they tie.
    - ``init``: EM start: ``exact`` best split (the oracle; measured best and fastest), ``median`` split
      of ``|w|``, ``salience`` (BiLLM's break-point on ``w^2 / U_jj^2``).
    - ``em_iterations``: at most this many E/M rounds (stops when no group bit changes).
    - ``offsets``: an fp16 offset per group as well (``mu_g + a_g s``).
    - ``percdamp``: Hessian damping relative to ``mean(diag H)``.
    """

    block_size: int = option(128, low=2)
    importance: str = option("diag", choices=IMPORTANCE_KINDS)
    init: str = option("exact", choices=INIT_KINDS)
    em_iterations: int = option(10, low=0, high=1000)
    offsets: bool = False
    percdamp: float = option(0.01, low=0.0, high=10.0)


def initial_groups(block: torch.Tensor, importance: torch.Tensor, factor_diagonal: torch.Tensor, init: str):
    """The EM start for one block (bool ``(rows, cols)``, True = larger-scale group)."""
    if init == "median":
        return median_split(block)
    if init == "exact":
        return exact_two_group_split(block, importance).groups
    return salience_split(block, factor_diagonal)


@register("w11", W11Config, "W(1+1): sign + group bit, two scales per row block fitted by Hessian-weighted EM")
def quantize_w11(weight: torch.Tensor, hessian: torch.Tensor, config: W11Config) -> BinaryWeight:
    w, u = prepare_weight(weight, hessian, config.percdamp)
    importance = importance_weights(hessian, u, config.importance)
    planes = BinaryPlanes.zeros(w, config.block_size, zones=2)
    fits: list[TwoGroupFit] = []  # one per block, in column order

    def fit_block(j: int, block: torch.Tensor) -> None:
        # The block's two scales, from its weights as the earlier blocks' errors left them.
        columns = slice(j, j + block.shape[1])
        groups = initial_groups(block, importance[columns], torch.diagonal(u[columns, columns]), config.init)
        fit = em_two_group(block, importance[columns], groups, config.em_iterations, config.offsets)
        planes.scales[:, len(fits)], planes.means[:, len(fits)] = fit.scales, fit.means
        fits.append(fit)

    def quantize_column(j: int, column: torch.Tensor) -> torch.Tensor:
        # The nearest of the row's four levels, so the group bit is re-chosen on the compensated value.
        fit = fits[j // config.block_size]
        column = column.unsqueeze(1)
        group, positive = nearest_levels(column, fit.scales, fit.means)
        planes.signs[:, j], planes.group_bitmap[:, j] = positive.squeeze(1), group.squeeze(1)
        return reconstruct(column, group, fit.scales, fit.means).squeeze(1)

    sweep_columns(w, u, quantize_column, config.block_size, group_size=config.block_size, fit_group=fit_block)

    return planes.finish(config.block_size, means=config.offsets)
