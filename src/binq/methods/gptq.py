"""GPTQ (Frantar et al., ICLR 2023): column-by-column rounding with OBS error feedback.

Research notes section 2: lazy batches of ``block_size`` columns, ``U = chol_upper((H + lambda I)^-1)``,
``err_j = (w_j - q_j) / U_jj`` and ``W[:, j+1:] -= err_j U[j, j+1:]``; groups re-fit their grid on
the error-updated weights when the column index reaches them (or once up front with
``static_groups``); act-order processes columns by decreasing ``diag(H)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from binq.methods.registry import check_range, register
from binq.quant.grid import Grid, fit_minmax_grid
from binq.quant.hessian import dead_columns, factor_hessian
from binq.quant.structured import UniformWeight


@dataclass
class GPTQConfig:
    """GPTQ with the reference's defaults (the binary papers' baselines use group 128).

    - ``bits``: 1 to 8; ``group_size``: 0 = one grid per row; ``sym``: symmetric grid.
    - ``act_order``: columns in decreasing ``diag(H)`` order; ``static_groups``: fit every group's
      grid on the original weights before any update.
    - ``block_size``: the lazy-batch width; ``percdamp``: damping relative to ``mean(diag H)``.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        check_range("--bits", self.bits, 1, 8)
        check_range("--group-size", self.group_size, 0, 1 << 30)
        check_range("--block-size", self.block_size, 1, 1 << 30)
        check_range("--percdamp", self.percdamp, 0.0, 10.0)


def _fit_static_grids(weight: torch.Tensor, config: GPTQConfig, group_size: int) -> list[Grid]:
    return [
        fit_minmax_grid(weight[:, g : g + group_size], config.bits, config.sym)
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
    factor = factor_hessian(hessian[perm][:, perm], config.percdamp)
    u = factor.inverse_cholesky_upper
    w = weight.to(u.dtype).clone()
    w[:, dead_columns(hessian)] = 0
    static = _fit_static_grids(w, config, group_size) if config.static_groups else None
    w = w[:, perm]
    # Group of each column, in the layer's own column order: by position in quantization order,
    # except static groups, which are fixed on the original columns.
    group_of_original = torch.arange(cols, device=w.device) // group_size
    if not config.static_groups:
        group_of_original = torch.empty_like(perm)
        group_of_original[perm] = torch.arange(cols, device=w.device) // group_size

    codes = torch.zeros(rows, cols, dtype=w.dtype, device=w.device)
    scales = torch.zeros(rows, groups, dtype=w.dtype, device=w.device)
    zeros = torch.zeros(rows, groups, dtype=w.dtype, device=w.device)
    grid: Grid | None = None
    if static is None and config.group_size == 0:
        grid = fit_minmax_grid(w, config.bits, config.sym)

    for start in range(0, cols, config.block_size):
        end = min(start + config.block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            j = start + i
            if static is not None:
                grid = static[int(perm[j]) // group_size]
            elif j % group_size == 0:
                # Fit on the current (error-updated) weights of the group, inside and past this block;
                # columns past the block have not had this block's pending updates yet: apply them.
                upcoming = block[:, i : i + group_size]
                group_end = min(j + group_size, cols)
                if group_end > end:
                    past = w[:, end:group_end] - errors[:, :i] @ u[start:j, end:group_end]
                    upcoming = torch.cat([upcoming, past], dim=1)
                grid = fit_minmax_grid(upcoming, config.bits, config.sym)
            assert grid is not None
            column = block[:, i]
            code = grid.codes(column)
            quantized = grid.dequantize_codes(code)
            codes[:, j] = code
            g = int(group_of_original[perm[j]])
            scales[:, g], zeros[:, g] = grid.scale, grid.zero
            error = (column - quantized) / u_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        if end < cols:
            w[:, end:] -= errors @ u[start:end, end:]

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
