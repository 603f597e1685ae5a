"""ARB-LLM's alternating refined binarization (Li et al., ICLR 2025), as pure functions.

Each function fits one *zone* (a boolean mask over a block of weights, rows binarized independently on
their masked entries) and returns a :class:`ZoneFit`. The element value of a fitted zone is

    sum over orders t of  r_t[i] * c_t[j] * s_t[i, j]   +   mu[i]

with ``r_t`` per-row scales, ``c_t`` per-column scales (ARB-RC only, else 1), signs ``s_t`` in {-1, +1}
and one shared per-row mean ``mu`` (zero for ARB-RC).

- :func:`arb_fit`: ARB in weight space (Alg. 1, Eq. 1-5; second order Eq. 6-8), starting from BiLLM's
  residual binarizer; ``iterations=0`` *is* BiLLM's binarizer with the two means summed.
- :func:`arb_x_refine`: ARB-X's calibration-aware closed forms (Eq. 9-11) with the signs frozen, in a
  metric ``S`` (the block of the undamped Hessian; any positive multiple gives the same fit).
- :func:`rc_fit`: ARB-RC's row x column scales without mean (Eq. 12-13).

Details as the reference implementation has them: eps = 1e-8 in ARB's alpha denominators and 1e-10 in ARB-X's;
the mean is refined by accumulation; alpha is updated with the previous signs, then the signs are
re-taken; sign(0) = +1 (the packed format has no zero).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from binq.quant.binarize import residual_binarize, round_to_storage
from binq.quant.sweep import sweep_columns

ARB_EPS = 1e-8
ARB_X_EPS = 1e-10


@dataclass
class ZoneFit:
    """A fitted zone: ``mask`` (rows, cols) and one (signs, row scales, column scales) triple per order."""

    mask: torch.Tensor  # bool (rows, cols)
    signs: list[torch.Tensor]  # bool (rows, cols) per order; True = +1
    row_scales: list[torch.Tensor]  # (rows,) per order
    mean: torch.Tensor  # (rows,)
    column_scales: list[torch.Tensor] | None = None  # (cols,) per order (ARB-RC)

    @property
    def order(self) -> int:
        return len(self.signs)

    def term_scales(self, t: int) -> torch.Tensor:
        """``r_t[i] * c_t[j]`` as a (rows, cols) tensor (or (rows, 1) without column scales)."""
        scale = self.row_scales[t].unsqueeze(-1)
        if self.column_scales is not None:
            scale = scale * self.column_scales[t].unsqueeze(-2)
        return scale

    def approximation(self) -> torch.Tensor:
        """The zone's reconstruction, zero outside the mask."""
        out = self.mean.unsqueeze(-1).expand(self.mask.shape).clone()
        for t in range(self.order):
            out = out + self.term_scales(t) * _pm(self.signs[t])
        return out * self.mask.to(out.dtype)

    def rounded(self) -> ZoneFit:
        """Scales and means rounded to the fp16 values that are stored."""
        columns = None if self.column_scales is None else [round_to_storage(c) for c in self.column_scales]
        return replace(
            self,
            row_scales=[round_to_storage(r) for r in self.row_scales],
            mean=round_to_storage(self.mean),
            column_scales=columns,
        )


def _pm(signs: torch.Tensor) -> torch.Tensor:
    """Boolean signs as -1.0 / +1.0."""
    return signs.float() * 2 - 1


def _sign(x: torch.Tensor) -> torch.Tensor:
    return x >= 0


def _row_mean(x: torch.Tensor, maskf: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (x * maskf).sum(-1) / count


def weight_space_loss(weight: torch.Tensor, fit: ZoneFit) -> torch.Tensor:
    """ARB's L1 on the zone: ``||(W - W_hat) * M||_F^2``."""
    return ((weight - fit.approximation()) * fit.mask.to(weight.dtype)).square().sum()


def metric_loss(weight: torch.Tensor, fit: ZoneFit, metric: torch.Tensor) -> torch.Tensor:
    """ARB-X's L2 on the zone: ``Tr(R S R^T)`` with ``R = (W - W_hat) * M``."""
    residual = (weight - fit.approximation()) * fit.mask.to(weight.dtype)
    return ((residual @ metric) * residual).sum()


# ------------------------------------------------------------------------------------------------ ARB


def arb_fit(
    weight: torch.Tensor, mask: torch.Tensor, order: int = 1, iterations: int = 15, centred: bool = True
) -> ZoneFit:
    """ARB (first or second order) in weight space, ``iterations`` refinement rounds after BiLLM's start.

    ``centred=False`` fits no mean (a sign-times-scale format such as GGUF's Q1_0 has none).
    """
    if order not in (1, 2):
        raise ValueError(f"ARB is defined for orders 1 and 2, got {order}")
    maskf = mask.to(weight.dtype)
    count = maskf.sum(-1).clamp_min(1.0)
    # BiLLM's residual start: each order centred on its own residual; the means add up.
    residual = weight * maskf
    signs, scales, mean = [], [], torch.zeros_like(count)
    for _ in range(order):
        mu = _row_mean(residual, maskf, count) if centred else torch.zeros_like(count)
        shifted = residual - mu.unsqueeze(-1)
        alpha = _row_mean(shifted.abs(), maskf, count)
        s = _sign(shifted)
        residual = (shifted - alpha.unsqueeze(-1) * _pm(s)) * maskf
        signs.append(s)
        scales.append(alpha)
        mean = mean + mu
    fit = ZoneFit(mask, signs, scales, mean)
    for _ in range(iterations):
        fit = _arb_step(weight, fit, maskf, count, centred)
    return fit


def _arb_step(
    weight: torch.Tensor, fit: ZoneFit, maskf: torch.Tensor, count: torch.Tensor, centred: bool = True
) -> ZoneFit:
    """One refinement round: mean, then each scale with the previous signs, then the signs."""
    mean = fit.mean + _row_mean(weight - fit.approximation(), maskf, count) if centred else fit.mean
    shifted = weight - mean.unsqueeze(-1)
    scales = list(fit.row_scales)
    denominator = maskf.sum(-1) + ARB_EPS  # sum of B^2 over the mask
    for t in range(fit.order):
        others = sum((scales[u].unsqueeze(-1) * _pm(fit.signs[u]) for u in range(fit.order) if u != t), 0.0)
        scales[t] = (_pm(fit.signs[t]) * (shifted - others) * maskf).sum(-1) / denominator
    if fit.order == 1:
        signs = [_sign(shifted)]
    else:
        signs = _nearest_pair(shifted, scales[0].unsqueeze(-1), scales[1].unsqueeze(-1))
    return ZoneFit(fit.mask, signs, scales, mean)


def _nearest_pair(target: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> list[torch.Tensor]:
    """Per element, the signs (s0, s1) whose ``s0 c0 + s1 c1`` is nearest to ``target`` (ARB Eq. 8).

    The reference takes an argmin over the four candidates; comparing the four distances pairwise gives
    the same choice (ties to +1 first) several times faster than an argmin over a stacked axis.
    """
    d_pp, d_pm = (target - c0 - c1).abs(), (target - c0 + c1).abs()
    d_mp, d_mm = (target + c0 - c1).abs(), (target + c0 + c1).abs()
    first = torch.minimum(d_pp, d_pm) <= torch.minimum(d_mp, d_mm)
    second = torch.where(first, d_pp <= d_pm, d_mp <= d_mm)
    return [first, second]


# ---------------------------------------------------------------------------------------------- ARB-X


def arb_x_refine(
    weight: torch.Tensor, fit: ZoneFit, metric: torch.Tensor, iterations: int = 15, centred: bool = True
) -> ZoneFit:
    """ARB-X: ``iterations`` rounds of the closed-form mean and scale updates in the metric, signs frozen.

    Per row, with ``m`` the mask row and ``b_t = s_t * m``: ``mu = m S (w - sum_t a_t b_t)^T / (m S m^T)``,
    then each ``a_t = b_t S (w - mu m - sum_{u != t} a_u b_u)^T / (b_t S b_t^T)`` (Eq. 10-11).
    ``centred=False`` keeps the mean at zero.
    """
    if fit.column_scales is not None:
        raise ValueError("ARB-X refines mean-and-scale fits, not row x column ones")
    maskf = fit.mask.to(weight.dtype)
    w = weight * maskf
    planes = [_pm(s) * maskf for s in fit.signs]
    mask_metric = maskf @ metric
    plane_metric = [p @ metric for p in planes]
    mask_norm = (mask_metric * maskf).sum(-1) + ARB_X_EPS
    plane_norm = [(pm * p).sum(-1) + ARB_X_EPS for pm, p in zip(plane_metric, planes, strict=True)]
    mean, scales = fit.mean, list(fit.row_scales)
    for _ in range(iterations):
        binary = sum((scales[t].unsqueeze(-1) * planes[t] for t in range(fit.order)), 0.0)
        if centred:
            mean = (mask_metric * (w - binary)).sum(-1) / mask_norm
        for t in range(fit.order):
            others = sum((scales[u].unsqueeze(-1) * planes[u] for u in range(fit.order) if u != t), 0.0)
            scales[t] = (plane_metric[t] * (w - mean.unsqueeze(-1) * maskf - others)).sum(-1) / plane_norm[t]
    return replace(fit, row_scales=scales, mean=mean)


# --------------------------------------------------------------------------------------------- ARB-RC


def rc_fit(weight: torch.Tensor, mask: torch.Tensor, order: int = 1, iterations: int = 15) -> ZoneFit:
    """ARB-RC: ``W_hat = sum_t (r_t c_t^T) * B_t`` on the mask, no mean (Eq. 12-13).

    First order keeps ``B = sign(W)`` (optimal for non-negative scales) and alternates the row then the
    column scales. Second order alternates (r_0, c_0) against term 1, (r_1, c_1) against term 0, then
    re-picks both sign planes as the nearest of ``{+-c_0 +- c_1}``.
    """
    if order not in (1, 2):
        raise ValueError(f"ARB-RC is defined for orders 1 and 2, got {order}")
    maskf = mask.to(weight.dtype)
    signs, rows_, cols_ = [], [], []
    residual = weight * maskf
    for _ in range(order):
        s = _sign(residual)
        r, c = _rc_start(residual, maskf)
        signs.append(s)
        rows_.append(r)
        cols_.append(c)
        residual = (residual - r.unsqueeze(-1) * c.unsqueeze(-2) * _pm(s)) * maskf
    fit = ZoneFit(mask, signs, rows_, torch.zeros_like(rows_[0]), cols_)
    for _ in range(iterations):
        fit = _rc_step(weight, fit, maskf)
    return fit


def _rc_start(x: torch.Tensor, maskf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RC's start: ``r_i = mean_j |x_ij|``, ``c_j = mean_i |x_ij / r_i|`` over the mask."""
    row_count = maskf.sum(-1).clamp_min(1.0)
    col_count = maskf.sum(-2).clamp_min(1.0)
    r = (x.abs() * maskf).sum(-1) / row_count
    ratio = x.abs() / torch.where(r > 0, r, torch.ones_like(r)).unsqueeze(-1)
    c = (ratio * maskf).sum(-2) / col_count
    return r, c


def _rc_scales(target: torch.Tensor, plane: torch.Tensor, r: torch.Tensor, c: torch.Tensor, maskf: torch.Tensor):
    """One exact alternation for ``target ~ (r c^T) * plane`` on the mask: rows given columns, then columns."""
    signed = plane * target * maskf
    r = (c.unsqueeze(-2) * signed).sum(-1) / ((c.square().unsqueeze(-2) * maskf).sum(-1) + ARB_EPS)
    c = (r.unsqueeze(-1) * signed).sum(-2) / ((r.square().unsqueeze(-1) * maskf).sum(-2) + ARB_EPS)
    return r, c


def _rc_step(weight: torch.Tensor, fit: ZoneFit, maskf: torch.Tensor) -> ZoneFit:
    rows_, cols_ = list(fit.row_scales), list(fit.column_scales)
    for t in range(fit.order):
        others = sum(
            (rows_[u].unsqueeze(-1) * cols_[u].unsqueeze(-2) * _pm(fit.signs[u]) for u in range(fit.order) if u != t),
            0.0,
        )
        rows_[t], cols_[t] = _rc_scales(weight - others, _pm(fit.signs[t]), rows_[t], cols_[t], maskf)
    signs = list(fit.signs)
    if fit.order == 2:
        c0 = rows_[0].unsqueeze(-1) * cols_[0].unsqueeze(-2)
        c1 = rows_[1].unsqueeze(-1) * cols_[1].unsqueeze(-2)
        signs = _nearest_pair(weight, c0, c1)
    return ZoneFit(fit.mask, signs, rows_, fit.mean, cols_)


# --------------------------------------------------------------------------------- intra-block updates


def choose_signs(fit: ZoneFit, column: int, values: torch.Tensor) -> list[torch.Tensor]:
    """The signs of one column for new ``values`` (rows,) with the zone's fitted scales held fixed.

    Used by the GPTQ-style intra-block loop: each column is re-signed on its error-updated weights.
    """
    target = values - fit.mean
    scales = [fit.term_scales(t) for t in range(fit.order)]
    per_row = [s[:, column] if s.shape[-1] > 1 else s[:, 0] for s in scales]
    if fit.order == 1:
        # The nearest of {+c, -c}: the target's sign, flipped where a scale came out negative.
        return [_sign(target) == _sign(per_row[0])]
    first, second = _nearest_pair(target, per_row[0], per_row[1])
    return [first, second]


def resign_columns(block: torch.Tensor, fits: list[ZoneFit], block_factor: torch.Tensor) -> None:
    """GPTQ's column loop inside a block with the zones' scales fixed: each column takes the signs
    nearest to its error-updated weights, then its error moves the block's later columns. Changes the
    signs of ``fits`` in place; ``block`` is left as it is."""

    def resign(j: int, column: torch.Tensor) -> torch.Tensor:
        quantized = torch.zeros_like(column)
        for fit in fits:
            rows = fit.mask[:, j]
            if not bool(rows.any()):
                continue
            for t, signs in enumerate(choose_signs(fit, j, column)):
                fit.signs[t][:, j] = torch.where(rows, signs, fit.signs[t][:, j])
            quantized += _column(fit, j)
        return quantized

    sweep_columns(block, block_factor, resign)


def _column(fit: ZoneFit, j: int) -> torch.Tensor:
    """Column ``j`` of a zone's approximation (same operations as ``fit.approximation()``), without
    building the whole block."""
    value = fit.mean.clone()
    for t in range(fit.order):
        scale = fit.row_scales[t] if fit.column_scales is None else fit.row_scales[t] * fit.column_scales[t][j]
        value = value + scale * (fit.signs[t][:, j].float() * 2 - 1)
    return value * fit.mask[:, j].to(value.dtype)


# ------------------------------------------------------------------------- batched scores for the searches


def metric_binarization_error(weight: torch.Tensor, masks: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """``Tr(R S R^T)`` of BiLLM's first-order binarizer on each mask (masks batched on a leading dim)."""
    approx, _ = residual_binarize(weight, masks, order=1, rounded=False)
    residual = (weight - approx) * masks.to(weight.dtype)
    return ((residual @ metric) * residual).sum((-2, -1))


def rc_start_error(weight: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Squared error of ARB-RC's starting point (no refinement) on each mask, batched like the searches."""
    maskf = masks.to(weight.dtype)
    x = weight * maskf
    r, c = _rc_start(x, maskf)
    approx = r.unsqueeze(-1) * c.unsqueeze(-2) * _pm(_sign(x))
    return ((x - approx) * maskf).square().sum((-2, -1))
