"""Round-to-nearest baselines: XNOR sign binarization, and plain b-bit min-max rounding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from binq.methods.registry import MethodConfig, check_range, option, register
from binq.quant.binarize import residual_binarize
from binq.quant.grid import fit_minmax_grid
from binq.quant.structured import BinaryWeight, QuantizedWeight, UniformWeight


@dataclass
class RTNConfig(MethodConfig):
    """Round-to-nearest, no calibration.

    - ``bits``: 1 to 8.
    - ``group_size``: columns sharing one scale along a row; 0 means one group per row.
    - ``grid``: ``sign`` is XNOR binarization, ``alpha * sign(w)`` with ``alpha = mean |w|`` per group
      (1 bit only); ``uniform`` is GPTQ's asymmetric min-max grid; ``auto`` picks sign at 1 bit.
    - ``sym``: symmetric uniform grid (no stored zero points).
    - ``centred``: sign grid around the group mean (stores an fp16 mean per group).
    """

    bits: int = option(1, low=1, high=8)
    group_size: int = option(0, low=0)
    grid: str = option("auto", choices=("auto", "sign", "uniform"))
    sym: bool = False
    centred: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid == "sign" and self.bits != 1:
            check_range("--bits (sign grid)", self.bits, 1, 1)

    @property
    def resolved_grid(self) -> str:
        if self.grid != "auto":
            return self.grid
        return "sign" if self.bits == 1 else "uniform"


def _group_view(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pad columns to whole groups: returns (rows, groups, group_size) values, the validity mask, groups."""
    rows, cols = weight.shape
    groups = math.ceil(cols / group_size)
    padded = weight.new_zeros(rows, groups * group_size)
    padded[:, :cols] = weight
    valid = torch.zeros(groups * group_size, dtype=torch.bool, device=weight.device)
    valid[:cols] = True
    shape = (rows, groups, group_size)
    return padded.view(shape), valid.view(1, groups, group_size).expand(shape), groups


def sign_binarize(weight: torch.Tensor, group_size: int, centred: bool) -> BinaryWeight:
    """XNOR binarization per (row, group), the mean-centred binarizer with order 1."""
    rows, cols = weight.shape
    values, valid, _ = _group_view(weight, group_size)
    # Batch groups first: the binarizer works per row of its last two dims.
    _, (term,) = residual_binarize(values.transpose(0, 1), valid.transpose(0, 1), order=1, centred=centred)
    signs = term.signs.transpose(0, 1).reshape(rows, -1)[:, :cols]
    scales = term.scale.transpose(0, 1).unsqueeze(-1)  # (rows, groups, 1 zone)
    means = term.mean.transpose(0, 1).unsqueeze(-1) if centred else None
    return BinaryWeight(
        signs=signs.cpu(),
        scales=scales.half().cpu(),
        block_size=group_size,
        means=None if means is None else means.half().cpu(),
    )


def uniform_round(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> UniformWeight:
    """Min-max rounding per (row, group) on GPTQ's grid."""
    rows, cols = weight.shape
    groups = math.ceil(cols / group_size)
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(rows, groups)
    zeros = torch.empty(rows, groups)
    for g in range(groups):
        block = weight[:, g * group_size : (g + 1) * group_size]
        grid = fit_minmax_grid(block, bits, symmetric)
        codes[:, g * group_size : (g + 1) * group_size] = grid.codes(block).to(torch.uint8).cpu()
        scales[:, g], zeros[:, g] = grid.scale.cpu(), grid.zero.cpu()
    return UniformWeight(
        codes=codes,
        scales=scales.half(),
        bits=bits,
        group_size=group_size,
        zeros=None if symmetric else zeros.to(torch.uint8),
    )


RTN_SUMMARY = "round-to-nearest: XNOR sign binarization at 1 bit, min-max b-bit otherwise (no calibration)"


@register("rtn", RTNConfig, RTN_SUMMARY, calibration_free=True)
def quantize_rtn(weight: torch.Tensor, hessian: torch.Tensor | None, config: RTNConfig) -> QuantizedWeight:
    del hessian  # no calibration
    group_size = config.group_size or weight.shape[1]
    if config.resolved_grid == "sign":
        return sign_binarize(weight, group_size, config.centred)
    return uniform_round(weight, config.bits, group_size, config.sym)
