"""The mean-centred sign binarizer shared by BiLLM, ARB, W(1+1) and XNOR-style RTN.

For a mask ``M`` and order ``k``, each row is binarized on its masked entries only (BiLLM's
``high_order_residual`` in the reference implementation):

    r <- W on M
    repeat k times:
        mu    <- mean of r over the row's masked entries     (0 if not centred, 0 for an empty row)
        alpha <- mean of |r - mu| over the same entries
        s     <- sign(r - mu), with sign(0) = +1 (the packed format has no zero)
        r     <- r - (alpha * s + mu)

Scales and means are rounded to fp16 *before* they are used, so the float approximation a method
compensates for is exactly what the stored weight dequantizes to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BinaryTerm:
    """One order of the binarization: signs over the masked entries, and per-row scale and mean."""

    signs: torch.Tensor  # bool, shape of the input
    scale: torch.Tensor  # (..., rows)
    mean: torch.Tensor  # (..., rows)


def round_to_storage(x: torch.Tensor) -> torch.Tensor:
    """Round to the fp16 values that are stored, keeping the working dtype."""
    return x.to(torch.float16).to(x.dtype)


def residual_binarize(
    weight: torch.Tensor, mask: torch.Tensor, order: int = 1, centred: bool = True, rounded: bool = True
) -> tuple[torch.Tensor, list[BinaryTerm]]:
    """Binarize ``weight`` (``(..., rows, cols)``) on ``mask`` with ``order`` residual terms.

    Leading dimensions batch independent problems (the searches score many candidate masks at once).
    Returns the approximation (zero outside the mask) and the terms. ``rounded=False`` skips the fp16
    rounding of scales and means (for scoring metrics that are never stored).
    """
    store = round_to_storage if rounded else torch.Tensor.clone
    maskf = mask.to(weight.dtype)
    count = maskf.sum(-1, keepdim=True).clamp_min(1.0)
    residual = weight * maskf
    approx = torch.zeros_like(residual)
    terms = []
    for _ in range(order):
        if centred:
            mean = store(residual.sum(-1, keepdim=True) / count)
        else:
            mean = torch.zeros_like(count)
        centred_residual = residual - mean
        scale = store((centred_residual.abs() * maskf).sum(-1, keepdim=True) / count)
        signs = centred_residual >= 0
        term = (torch.where(signs, scale, -scale) + mean) * maskf
        approx = approx + term
        residual = residual - term
        terms.append(BinaryTerm(signs=signs, scale=scale.squeeze(-1), mean=mean.squeeze(-1)))
    return approx, terms


def binarization_error(weight: torch.Tensor, mask: torch.Tensor, order: int = 1, centred: bool = True) -> torch.Tensor:
    """Squared error of :func:`residual_binarize` on the masked entries, summed over the last two dims.

    Scored without the fp16 rounding: the searches score metrics such as BiLLM's ``W^2 / U_jj^2``, whose
    scale follows the activations' and can leave fp16's range (overflow to inf, or subnormal steps),
    which would make the search depend on that scale. The reference searches in fp32.

    Computed in closed form instead of building the approximation (the searches' hot spot, about 3x
    faster at order 1): with ``d = r - mu`` and ``alpha = mean |d|`` over a row's ``n`` masked entries,
    ``sum (d - alpha sign(d))^2 = sum d^2 - n alpha^2`` because ``sum sign(d) d = n alpha``; only the
    last order's residual is left, earlier orders just update ``r``.
    """
    maskf = mask.to(weight.dtype)
    count = maskf.sum(-1)
    safe_count = count.clamp_min(1.0)
    residual = weight
    for t in range(order):
        mean = (maskf * residual).sum(-1) / safe_count if centred else torch.zeros_like(count)
        shifted = residual - mean.unsqueeze(-1)
        scale = (maskf * shifted.abs()).sum(-1) / safe_count
        if t == order - 1:
            squares = (maskf * shifted.square()).sum(-1)
            return (squares - count * scale.square()).clamp_min(0.0).sum(-1)
        step = scale.unsqueeze(-1)
        residual = torch.where(shifted >= 0, shifted - step, shifted + step)
    raise ValueError(f"order must be at least 1, got {order}")
