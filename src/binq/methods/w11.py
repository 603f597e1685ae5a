"""W(1+1): a sign and a group bit per weight, two scales per (row, column block), fitted by EM.

A reconstruction of the weight side of Song et al., "Achieving binary weight and activation for LLMs
using Post-Training Quantization" (ACL Findings 2025; research notes papers-w1a1x4-msb.md, spec A1;
the paper's method section could not be read, so each uncertain choice is an option):

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

import math
from dataclasses import dataclass

import torch

from binq.methods.registry import check_choice, check_range, register
from binq.quant.compensation import propagate_block_error
from binq.quant.hessian import prepare_weight
from binq.quant.structured import BinaryWeight
from binq.quant.two_group import (
    IMPORTANCE_KINDS,
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
class W11Config:
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

    block_size: int = 128
    importance: str = "diag"
    init: str = "exact"
    em_iterations: int = 10
    offsets: bool = False
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        check_range("--block-size", self.block_size, 2, 1 << 30)
        check_choice("--importance", self.importance, IMPORTANCE_KINDS)
        check_choice("--init", self.init, INIT_KINDS)
        check_range("--em-iterations", self.em_iterations, 0, 1000)
        check_range("--percdamp", self.percdamp, 0.0, 10.0)


def initial_groups(block: torch.Tensor, importance: torch.Tensor, factor_diagonal: torch.Tensor, init: str):
    """The EM start for one block (bool ``(rows, cols)``, True = larger-scale group)."""
    if init == "median":
        return median_split(block)
    if init == "exact":
        return exact_two_group_split(block, importance).groups
    return salience_split(block, factor_diagonal)


@register("w11", W11Config, "W(1+1): sign + group bit, two scales per row block fitted by Hessian-weighted EM")
def quantize_w11(weight: torch.Tensor, hessian: torch.Tensor, config: W11Config) -> BinaryWeight:
    rows, cols = weight.shape
    w, u = prepare_weight(weight, hessian, config.percdamp)
    importance = importance_weights(hessian, u, config.importance)
    blocks = math.ceil(cols / config.block_size)

    signs = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    bitmap = torch.zeros_like(signs)
    scales = torch.zeros(rows, blocks, 2, dtype=w.dtype, device=w.device)
    means = torch.zeros_like(scales)

    for b, start in enumerate(range(0, cols, config.block_size)):
        end = min(start + config.block_size, cols)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        groups = initial_groups(block, importance[start:end], torch.diagonal(u_block), config.init)
        fit = em_two_group(block, importance[start:end], groups, config.em_iterations, config.offsets)
        scales[:, b], means[:, b] = fit.scales, fit.means

        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = block[:, i : i + 1]
            group, positive = nearest_levels(column, fit.scales, fit.means)
            quantized = reconstruct(column, group, fit.scales, fit.means).squeeze(1)
            signs[:, start + i], bitmap[:, start + i] = positive.squeeze(1), group.squeeze(1)
            error = (column.squeeze(1) - quantized) / u_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        propagate_block_error(w, errors, u, start, end)

    return BinaryWeight(
        signs=signs.cpu(),
        scales=scales.half().cpu(),
        block_size=config.block_size,
        means=means.half().cpu() if config.offsets else None,
        group_bitmap=bitmap.cpu(),
    )
