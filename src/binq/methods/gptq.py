"""GPTQ (Frantar et al., ICLR 2023): column-by-column rounding with OBS error feedback.

As the reference implementation: the column sweep with lazy batches of ``block_size`` columns
(:func:`binq.quant.sweep.sweep_columns`); groups re-fit their grid on the error-updated weights when the
column index reaches them (or once up front with ``static_groups``); act-order processes columns by
decreasing ``diag(H)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from binq.methods.registry import MethodConfig, option, register
from binq.quant.grid import Grid, fit_clipped_grid, fit_minmax_grid
from binq.quant.hessian import dead_columns, factor_hessian
from binq.quant.structured import UniformWeight
from binq.quant.sweep import sweep_columns


@dataclass
class GPTQConfig(MethodConfig):
    """GPTQ with the reference's defaults (the binary papers' baselines use group 128).

    - ``bits``: 1 to 8; ``group_size``: 0 = one grid per row; ``sym``: symmetric grid.
    - ``act_order``: columns in decreasing ``diag(H)`` order; ``static_groups``: fit every group's
      grid on the original weights before any update.
    - ``block_size``: the lazy-batch width; ``percdamp``: damping relative to ``mean(diag H)``.
    - ``clip_search``: each group's range shrunk per row to the factor that minimises its rounding error
      weighted by ``diag(H)`` (:func:`binq.quant.grid.fit_clipped_grid`) instead of min-max; the same
      layout and bits.
    """

    bits: int = option(4, low=1, high=8)
    group_size: int = option(128, low=0)
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    block_size: int = option(128, low=1)
    percdamp: float = option(0.01, low=0.0, high=10.0)
    clip_search: bool = False


def _fit_grid(columns: torch.Tensor, config: GPTQConfig, importance: torch.Tensor) -> Grid:
    """One group's grid: min-max, or with ``clip_search`` clipped against ``importance`` (its ``diag(H)``)."""
    if config.clip_search:
        return fit_clipped_grid(columns, config.bits, config.sym, importance)
    return fit_minmax_grid(columns, config.bits, config.sym)


def _fit_static_grids(weight: torch.Tensor, config: GPTQConfig, group_size: int, diag: torch.Tensor) -> list[Grid]:
    return [
        _fit_grid(weight[:, g : g + group_size], config, diag[g : g + group_size])
        for g in range(0, weight.shape[1], group_size)
    ]


@register("gptq", GPTQConfig, "GPTQ: b-bit min-max grid with Hessian-based error compensation")
def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig) -> UniformWeight:
    rows, cols = weight.shape
    group_size = config.group_size or cols
    groups = math.ceil(cols / group_size)
    if config.act_order:
        perm = torch.argsort(torch.diagonal(hessian), descending=True)
    else:
        perm = torch.arange(cols, device=hessian.device)
    # GPTQ factors the permuted Hessian: U of a permuted H is not a permutation of U.
    factor = factor_hessian(hessian[perm][:, perm] if config.act_order else hessian, config.percdamp)
    u = factor.inverse_cholesky_upper
    w = weight.to(u.dtype).clone()
    w[:, dead_columns(hessian)] = 0
    diag = torch.diagonal(hessian).to(u.dtype)
    static = _fit_static_grids(w, config, group_size, diag) if config.static_groups else None
    diag_in_order = diag[perm]
    if config.act_order:
        w = w[:, perm]
    # Group of each column, in the layer's own column order: by position in quantization order,
    # except static groups, which are fixed on the original columns.
    group_of_original = torch.arange(cols, device=w.device) // group_size
    if not config.static_groups:
        group_of_original = torch.empty_like(perm)
        group_of_original[perm] = torch.arange(cols, device=w.device) // group_size

    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)  # whole numbers 0..2^bits-1
    scales = torch.zeros(rows, groups, dtype=w.dtype, device=w.device)
    zeros = torch.zeros(rows, groups, dtype=w.dtype, device=w.device)
    # One grid per group, indexed like the scales: static ones fitted now, the others as the sweep
    # reaches their first column (so in that order).
    grids: list[Grid] = static if static is not None else []
    group_in_order = group_of_original[perm]

    def fit_group(j: int, current: torch.Tensor) -> None:
        grids.append(_fit_grid(current, config, diag_in_order[j : j + current.shape[1]]))

    def quantize_column(j: int, column: torch.Tensor) -> torch.Tensor:
        g = int(group_in_order[j])
        grid = grids[g]
        code = grid.codes(column)
        codes[:, j] = code
        scales[:, g], zeros[:, g] = grid.scale, grid.zero
        return grid.dequantize_codes(code)

    dynamic = None if config.static_groups else fit_group
    sweep_columns(w, u, quantize_column, config.block_size, group_size=group_size, fit_group=dynamic)

    original_codes = codes
    if config.act_order:
        original_codes = torch.empty_like(codes)
        original_codes[:, perm] = codes
    return UniformWeight(
        codes=original_codes.to(torch.uint8).cpu(),
        scales=scales.half().cpu(),
        bits=config.bits,
        group_size=group_size,
        zeros=None if config.sym else zeros.to(torch.uint8).cpu(),
        group_index=group_of_original.cpu() if config.act_order else None,
    )
