"""GPTQ's uniform min-max grid (the reference implementation's), shared by GPTQ and b-bit RTN, and its
clipped variant: the range shrunk per row to minimise a weighted rounding error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from binq.quant.binarize import round_to_storage

# Smallest positive fp16 (subnormal): a scale below it would be stored as zero.
_MIN_SCALE = 2.0**-24


@dataclass
class Grid:
    """Per-row scale (fp16-representable) and integer zero point of a ``bits``-bit grid."""

    scale: torch.Tensor  # (rows,)
    zero: torch.Tensor  # (rows,), integers in [0, 2**bits - 1]
    bits: int

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``w`` (rows, k) or (rows,), as float."""
        scale, zero = self._expand(w)
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    def dequantize_codes(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self._expand(codes)
        return scale * (codes - zero)

    def _expand(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.dim() == 2:
            return self.scale.unsqueeze(1), self.zero.unsqueeze(1)
        return self.scale, self.zero


def fit_minmax_grid(w: torch.Tensor, bits: int, symmetric: bool = False) -> Grid:
    """GPTQ's ``find_params`` per row: the range always includes 0; an all-zero row gets [-1, 1]."""
    maxq = 2**bits - 1
    zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(1).values, zeros)
    xmax = torch.maximum(w.max(1).values, zeros)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = round_to_storage(((xmax - xmin) / maxq).clamp_min(_MIN_SCALE))
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return Grid(scale=scale, zero=zero, bits=bits)


# The shrink factors the clipped grid tries: 1 (min-max), then down to 1 - CLIP_MAX_SHRINK in steps of
# 1 / CLIP_STEPS of the full range.
CLIP_STEPS = 100
CLIP_MAX_SHRINK = 0.8


def fit_clipped_grid(
    w: torch.Tensor, bits: int, symmetric: bool = False, column_weights: torch.Tensor | None = None
) -> Grid:
    """The min-max grid with each row's range shrunk by the factor that minimises its weighted rounding error.

    For each shrink factor ``p`` in ``1, 0.99, ..., 0.2`` the range ``[p * min, p * max]`` (0 always in it)
    gives a grid as :func:`fit_minmax_grid` builds one, and each row keeps the grid with the least
    ``sum_j c_j (w_ij - q_ij)^2``, ``c_j`` = ``column_weights`` (e.g. ``diag(H)`` of these columns, the
    output error of a rounding error alone in column ``j``; all ones when omitted). ``p = 1`` is tried
    first and kept on ties, so the result is never worse than the min-max grid on that objective. Scales
    are fp16-representable, zero points whole numbers, exactly as stored.
    """
    rows = w.shape[0]
    weights = torch.ones(w.shape[1], dtype=w.dtype, device=w.device) if column_weights is None else column_weights
    weights = weights.to(w.dtype).clamp_min(0).unsqueeze(0)
    best = fit_minmax_grid(w, bits, symmetric)
    best_error = _weighted_error(w, best, weights)
    zeros = torch.zeros(rows, dtype=w.dtype, device=w.device)
    low = torch.minimum(w.min(1).values, zeros)
    high = torch.maximum(w.max(1).values, zeros)
    for step in range(1, round(CLIP_STEPS * CLIP_MAX_SHRINK) + 1):
        shrink = 1 - step / CLIP_STEPS
        # The shrunk range's min-max grid, computed on its two ends (the grid only sees min and max).
        ends = torch.stack([low * shrink, high * shrink], dim=1)
        grid = fit_minmax_grid(ends, bits, symmetric)
        error = _weighted_error(w, grid, weights)
        better = error < best_error
        if bool(better.any()):
            best = Grid(
                scale=torch.where(better, grid.scale, best.scale),
                zero=torch.where(better, grid.zero, best.zero),
                bits=bits,
            )
            best_error = torch.where(better, error, best_error)
    return best


def _weighted_error(w: torch.Tensor, grid: Grid, weights: torch.Tensor) -> torch.Tensor:
    return ((grid.dequantize_codes(grid.codes(w)) - w).square() * weights).sum(1)
