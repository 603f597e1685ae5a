"""Per-token integer activations and their exact bit planes: the A(1x4) of Song et al. (ACL Findings 2025).

Only the paper's abstract could be read, so the format below is a reconstruction: per-token
asymmetric INT4 by default (the common practice of QuaRot and Atom), the clipping ratio searched per
linear group on calibration data (:func:`binq.activations.smoothing.search_clip_ratio`), and the
codes split into four exact binary planes, which is what "1x4" names.

Format of one token ``x`` (a row of ``d`` inputs), ``b`` bits (4 for A(1x4)):

- asymmetric (default): ``lo = clip * min(x, 0)``, ``hi = clip * max(x, 0)``, ``s = (hi - lo) / (2^b - 1)``,
  ``z = round(-lo / s)`` (an integer in ``[0, 2^b - 1]``, since ``lo <= 0 <= hi``),
  ``q = clamp(round(x / s) + z, 0, 2^b - 1)`` and ``x^ = s (q - z)``;
- symmetric: ``s = clip * max|x| / (2^(b-1) - 1)``, ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)``,
  stored in offset binary: code ``q + 2^(b-1)`` with the constant zero point ``z = 2^(b-1)`` (the same
  planes as two's complement with the top plane inverted).

Either way the code is an unsigned integer ``q = sum_k 2^k p_k`` with ``p_k`` in {0, 1}: :func:`bit_planes`
gives the ``b`` planes, and ``x^ = s (sum_k 2^k p_k - z)``, which is what makes a linear layer a sum of
binary-by-binary products (:mod:`binq.nn.bitplane`). Stored per token: ``b`` bits per value, an fp16
scale and (asymmetric) a ``b``-bit zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenCodes:
    """Integer codes with per-token scale and zero point: ``x^ = scale * (codes - zero)``."""

    codes: torch.Tensor  # uint8 (..., d), values < 2**bits
    scale: torch.Tensor  # float (..., 1)
    zero: torch.Tensor  # float (..., 1), integer-valued
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.scale * (self.codes.to(self.scale.dtype) - self.zero)


def quantize_per_token(
    x: torch.Tensor, bits: int = 4, sym: bool = False, clip_ratio: float | torch.Tensor = 1.0
) -> TokenCodes:
    """Quantize each row (token) of ``x`` (``(..., d)``); ``clip_ratio`` may be per token ``(..., 1)``."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    top = 2**bits - 1
    if sym:
        half = 2 ** (bits - 1)
        bound = work.abs().amax(-1, keepdim=True) * clip_ratio
        # The scale is stored in fp16: round it before use so the codes match what is stored.
        scale = (bound / (half - 1)).clamp_min(1e-8).half().to(work.dtype)
        zero = torch.full_like(scale, float(half))
        signed = torch.clamp(torch.round(work / scale), -half, half - 1)
        codes = signed + half
    else:
        lo = work.amin(-1, keepdim=True).clamp_max(0) * clip_ratio
        hi = work.amax(-1, keepdim=True).clamp_min(0) * clip_ratio
        scale = ((hi - lo) / top).clamp_min(1e-8).half().to(work.dtype)
        zero = torch.clamp(torch.round(-lo / scale), 0, top)
        codes = torch.clamp(torch.round(work / scale) + zero, 0, top)
    return TokenCodes(codes.to(torch.uint8), scale, zero, bits)


def fake_quantize(
    x: torch.Tensor, bits: int = 4, sym: bool = False, clip_ratio: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """``x^`` in ``x``'s dtype (simulated quantization: what the evaluation feeds the linears)."""
    return quantize_per_token(x, bits, sym, clip_ratio).dequantize().to(x.dtype)


def token_clip_ratios(x: torch.Tensor, bits: int, sym: bool, ratios: tuple[float, ...]) -> torch.Tensor:
    """Per token ``(..., 1)``: the candidate clip ratio of smallest quantization error (the first on ties).

    The other reading of the paper's smoothing: each token's scale is shrunk to the ratio that minimises
    its own error, at run time, without calibration.
    """
    work_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    best_ratio = best_error = None
    for ratio in ratios:
        error = (fake_quantize(x, bits, sym, ratio) - x).float().square().sum(-1, keepdim=True)
        candidate = torch.full_like(error, ratio, dtype=work_dtype)
        if best_ratio is None or best_error is None:
            best_ratio, best_error = candidate, error
        else:
            better = error < best_error
            best_ratio = torch.where(better, candidate, best_ratio)
            best_error = torch.where(better, error, best_error)
    if best_ratio is None:
        raise ValueError("token_clip_ratios needs at least one candidate ratio")
    return best_ratio


def token_scale_fake_quantize(x: torch.Tensor, bits: int, sym: bool, ratios: tuple[float, ...]) -> torch.Tensor:
    """``x^`` with each token quantized at its own best clip ratio (:func:`token_clip_ratios`)."""
    # A per-token ratio tensor gives bit for bit the codes of the same ratio passed as a number.
    return fake_quantize(x, bits, sym, token_clip_ratios(x, bits, sym, ratios))


@dataclass(frozen=True)
class ActivationQuantizer:
    """The quantizer of one linear's input: what the evaluation hooks apply and a loaded checkpoint keeps.

    Per token, ``bits``-bit codes (:func:`quantize_per_token`) at ``clip_ratio``; with ``token_candidates``
    (``--smooth token``) each token uses its best ratio among the candidates not above ``clip_ratio``
    (``clip_ratio`` alone if none is). ``codes`` gives the integer codes (the bit-plane kernel's input),
    calling it gives ``x^`` in ``x``'s dtype.
    """

    bits: int = 4
    sym: bool = False
    clip_ratio: float = 1.0
    token_candidates: tuple[float, ...] | None = None

    def codes(self, x: torch.Tensor) -> TokenCodes:
        if self.token_candidates is None:
            return quantize_per_token(x, self.bits, self.sym, self.clip_ratio)
        ratios = tuple(r for r in self.token_candidates if r <= self.clip_ratio) or (self.clip_ratio,)
        return quantize_per_token(x, self.bits, self.sym, token_clip_ratios(x, self.bits, self.sym, ratios))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x).dequantize().to(x.dtype)


def bit_planes(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The ``bits`` binary planes of unsigned codes: bool ``(bits, *codes.shape)``, plane k = bit k."""
    shifts = torch.arange(bits, dtype=torch.int32).view(-1, *([1] * codes.dim()))
    return ((codes.to(torch.int32).unsqueeze(0) >> shifts) & 1).bool()


def codes_from_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`bit_planes`: ``sum_k 2^k p_k`` as uint8."""
    weights = (2 ** torch.arange(planes.shape[0], dtype=torch.int32)).view(-1, *([1] * (planes.dim() - 1)))
    return (planes.to(torch.int32) * weights).sum(0).to(torch.uint8)


def activation_storage_bits(features: int, bits: int = 4, sym: bool = False) -> float:
    """Bits per activation value: the code, plus the token's fp16 scale (and zero point) spread over it."""
    return bits + (16 + (0 if sym else bits)) / features
