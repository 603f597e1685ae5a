"""Quantization-error-driven smoothing and clipping of activations (Song et al., ACL Findings 2025).

The paper says the activations' scaling factors are "smoothed based on quantization errors"; its
formula could not be read. Primary reading (implemented here): SmoothQuant-style per-input-channel
factors ``f_j = amax_x[j]^alpha / amax_w[j]^(1 - alpha)``, with ``alpha`` chosen on calibration inputs
to minimise the *quantized* output error ``||X W^T - Q_a(X / f) Q_w(W f)^T||^2``; ``1/f`` is folded into
the producer of ``X`` and ``f`` into the weight columns, so the full-precision layer is unchanged
(:func:`fold_smoothing`). Leaving the layer unsmoothed is always a candidate, so the search never
does worse than no smoothing on its own objective. The other reading (per-token scales shrunk to
minimise each token's error) is :func:`binq.activations.int4.token_scale_fake_quantize`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from binq.quant.two_group import em_two_group, median_split, reconstruct

SMOOTHING_ALPHAS = tuple(i / 10 for i in range(11))
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
# SmoothQuant's clamp: keeps factors of dead or tiny channels finite.
_MIN_ABSMAX = 1e-5


@dataclass
class SmoothingChoice:
    factors: torch.Tensor | None  # (d,), None = leave unsmoothed
    alpha: float | None
    error: float  # quantized output error with the choice
    error_unsmoothed: float


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's migration factors ``amax_x^alpha / amax_w^(1 - alpha)``, clamped to [1e-5, 1e5]."""
    factors = act_absmax.clamp_min(_MIN_ABSMAX).pow(alpha) / weight_absmax.clamp_min(_MIN_ABSMAX).pow(1 - alpha)
    return factors.clamp(1e-5, 1e5)


def two_group_proxy(weight: torch.Tensor, block_size: int = 128, iterations: int = 5) -> torch.Tensor:
    """A cheap W(1+1) stand-in for the smoothing search: EM per row block, no Hessian, no compensation."""
    out = torch.empty_like(weight)
    ones = torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device)
    for start in range(0, weight.shape[1], block_size):
        block = weight[:, start : start + block_size]
        fit = em_two_group(block, ones[: block.shape[1]], median_split(block), iterations, rounded=False)
        out[:, start : start + block_size] = reconstruct(block, fit.groups, fit.scales, fit.means)
    return out


def quantized_output_error(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    act_quant: Callable[[torch.Tensor], torch.Tensor],
    factors: torch.Tensor | None = None,
    weight_proxy: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """``sum_W ||X W^T - Q_a(X / f) Q_w(W f)^T||^2`` (``f = 1`` without factors, ``Q_w`` = identity without proxy)."""
    quantized_x = act_quant(x if factors is None else x / factors)
    total = 0.0
    for weight in weights:
        scaled = weight if factors is None else weight * factors
        if weight_proxy is not None:
            scaled = weight_proxy(scaled)
        total += float((x @ weight.T - quantized_x @ scaled.T).square().sum())
    return total


def search_smoothing(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    act_quant: Callable[[torch.Tensor], torch.Tensor],
    weight_proxy: Callable[[torch.Tensor], torch.Tensor] | None = None,
    alphas: Sequence[float] = SMOOTHING_ALPHAS,
) -> SmoothingChoice:
    """The migration strength of smallest quantized output error on ``x`` (``(tokens, d)``), or none."""
    act_absmax = x.abs().amax(0)
    weight_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    unsmoothed = quantized_output_error(x, weights, act_quant, None, weight_proxy)
    best = SmoothingChoice(None, None, unsmoothed, unsmoothed)
    for alpha in alphas:
        factors = smoothing_factors(act_absmax, weight_absmax, alpha)
        error = quantized_output_error(x, weights, act_quant, factors, weight_proxy)
        if error < best.error:
            best = SmoothingChoice(factors, alpha, error, unsmoothed)
    return best


def search_clip_ratio(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    quantizer: Callable[[torch.Tensor, float], torch.Tensor],
    ratios: Sequence[float] = CLIP_RATIOS,
) -> float:
    """The clipping ratio of smallest output error ``sum_W ||(X - Q(X, r)) W^T||^2`` on ``x``."""
    errors = [quantized_output_error(x, weights, lambda t, r=ratio: quantizer(t, r)) for ratio in ratios]
    return float(ratios[min(range(len(ratios)), key=errors.__getitem__)])


@torch.no_grad()
def fold_smoothing(source: nn.Module, linears: Sequence[nn.Linear], factors: torch.Tensor) -> None:
    """In place: the producer's output channel ``j`` divided by ``f_j``, the linears' column ``j`` times ``f_j``.

    ``source`` is a norm whose output is ``weight * normalized (+ bias)`` (RMSNorm, LayerNorm) or a
    linear whose output feeds the linears through an elementwise product (LLaMA's ``up_proj`` before
    ``down_proj``): dividing its output rows is then exact.
    """
    f = factors.to(torch.float64)
    if isinstance(source, nn.Linear):
        source.weight.data = (source.weight.data.double() / f.unsqueeze(1)).to(source.weight.dtype)
    else:
        weight = getattr(source, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise TypeError(f"cannot fold smoothing into a {type(source).__name__}")
        source.weight.data = (weight.data.double() / f).to(weight.dtype)
    bias = getattr(source, "bias", None)
    if isinstance(bias, torch.Tensor):
        source.bias.data = (bias.data.double() / f).to(bias.dtype)
    for linear in linears:
        linear.weight.data = (linear.weight.data.double() * f.unsqueeze(0)).to(linear.weight.dtype)
