"""GPTQ's uniform min-max grid (the reference implementation's), shared by GPTQ and b-bit RTN."""

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
