"""The ARB-LLM family (Li et al., ICLR 2025; research notes section 4) on BiLLM's block structure.

Per block of ``block_size`` columns, from the current (compensated) weights:

1. BiLLM's masks (:func:`binq.methods.billm.billm_block_masks`' searches): salient columns on the
   saliency ``T``, then the concentrated/sparse break-point; ARB-X scores the break-point candidates by
   ``Tr(R S R^T)`` on the weights, ARB-RC by the error of its own starting point;
2. with ``cgb`` (the column-group bitmap, Eq. 14), a second break-point splits the salient columns too:
   four zones, second order in the salient ones, no extra bitmap;
3. each zone is fitted by the variant's binarizer (:mod:`binq.quant.arb`): ``arb`` (weight-space
   refinement), ``arb-x`` (then the closed forms in the block's calibration metric ``S = H_bb``, signs
   frozen), ``arb-rc`` (row x column scales, no mean);
4. block compensation as BiLLM (diagonal), or the exact triangular solve, optionally after a GPTQ-style
   pass that re-signs each column of the block on its error-updated weights (``intra_block``).

``S`` comes from the undamped Hessian the engine accumulates (``H = 2/T sum x x^T``): the reference stores
every calibration input instead, but its ``mean_s X_s^T X_s`` is ``H * seqlen / 2`` and the closed forms
do not depend on the scale (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from binq.methods.billm import block_saliency
from binq.methods.registry import check_choice, check_range, register
from binq.quant.arb import (
    ZoneFit,
    arb_fit,
    arb_x_refine,
    choose_signs,
    metric_binarization_error,
    rc_fit,
    rc_start_error,
)
from binq.quant.compensation import block_error, compensated_metric, propagate_block_error
from binq.quant.hessian import prepare_weight
from binq.quant.search import salient_column_search, salient_split_search, split_search
from binq.quant.structured import (
    ZONE_CONCENTRATED,
    ZONE_SALIENT,
    ZONE_SALIENT_CONCENTRATED,
    ZONE_SALIENT_CONCENTRATED_RESIDUAL,
    ZONE_SALIENT_RESIDUAL,
    ZONE_SALIENT_SPARSE,
    ZONE_SALIENT_SPARSE_RESIDUAL,
    ZONE_SPARSE,
    BinaryWeight,
)

VARIANTS = ("arb", "arb-x", "arb-rc")


@dataclass
class ARBConfig:
    """Settings shared by the ARB variants; the defaults are the paper's and the reference's.

    - ``block_size``: columns per block (128); ``salient_metric``: ``hessian`` (``W^2 / U_jj^2``) or
      ``magnitude``; ``max_salient_columns``: BiLLM's K (tries 1 .. K-1 columns).
    - ``cgb``: the column-group bitmap (4 zones); ``iterations``: weight-space refinement rounds (15).
    - ``exact_compensation``: triangular-solve block error instead of the diagonal one.
    - ``intra_block``: re-sign each column of a block GPTQ-style on its error-updated weights before
      the block error is propagated (implies the exact block error, which that loop produces).
    - ``percdamp``: Hessian damping relative to ``mean(diag H)``.
    """

    block_size: int = 128
    salient_metric: str = "hessian"
    max_salient_columns: int = 50
    cgb: bool = False
    iterations: int = 15
    exact_compensation: bool = False
    intra_block: bool = False
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        check_range("--block-size", self.block_size, 2, 1 << 30)
        check_choice("--salient-metric", self.salient_metric, ("hessian", "magnitude"))
        check_range("--max-salient-columns", self.max_salient_columns, 1, 1 << 30)
        check_range("--iterations", self.iterations, 0, 10_000)
        check_range("--percdamp", self.percdamp, 0.0, 10.0)


@dataclass
class ARBXConfig(ARBConfig):
    """ARB-X adds ``x_iterations`` closed-form rounds in the calibration metric (15), after the
    weight-space ones; ``x_split_metric``: score the break-point candidates in that metric (the
    reference) rather than BiLLM's way; ``x_metric``: ``block`` is the paper's ``S = H_bb``,
    ``compensated`` the metric the block's error is really paid in once later columns compensate it
    (``(U_bb^T U_bb)^-1``, exact with ``--exact-compensation``)."""

    x_iterations: int = 15
    x_split_metric: bool = True
    x_metric: str = "block"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("--x-iterations", self.x_iterations, 0, 10_000)
        check_choice("--x-metric", self.x_metric, ("block", "compensated"))


@dataclass
class ARBLLMXConfig(ARBXConfig):
    """The paper's ARB-LLM_X: ARB-X with CGB."""

    cgb: bool = True


@dataclass
class ARBLLMRCConfig(ARBConfig):
    """The paper's ARB-LLM_RC: ARB-RC with CGB."""

    cgb: bool = True


@dataclass
class Zone:
    name: str  # the first zone's name in BinaryWeight.zone_names
    mask: torch.Tensor
    order: int


def block_zones(
    block: torch.Tensor, saliency: torch.Tensor, config: ARBConfig, variant: str, metric: torch.Tensor | None
) -> list[Zone]:
    """Steps 1-2: the zones of one block, in BinaryWeight's order."""
    salient_columns = salient_column_search(saliency, config.max_salient_columns, 2, 2)
    salient = salient_columns.unsqueeze(0).expand_as(block)
    if variant == "arb-x" and getattr(config, "x_split_metric", False):
        error_fn = partial(metric_binarization_error, metric=metric)
        breakpoint_value = split_search(saliency, salient, scored=block, error_fn=error_fn)
    elif variant == "arb-rc":
        breakpoint_value = split_search(saliency, salient, error_fn=rc_start_error)
    else:
        breakpoint_value = split_search(saliency, salient)
    magnitude = saliency.abs()
    sparse = (magnitude >= breakpoint_value) & ~salient
    zones = [Zone(ZONE_CONCENTRATED, ~salient & ~sparse, 1), Zone(ZONE_SPARSE, sparse, 1)]
    if config.cgb:
        salient_sparse = salient & (magnitude >= salient_split_search(saliency, salient))
        zones += [
            Zone(ZONE_SALIENT_CONCENTRATED, salient & ~salient_sparse, 2),
            Zone(ZONE_SALIENT_SPARSE, salient_sparse, 2),
        ]
    else:
        zones.append(Zone(ZONE_SALIENT, salient, 2))
    return zones


def fit_zone(block: torch.Tensor, zone: Zone, config: ARBConfig, variant: str, metric: torch.Tensor | None) -> ZoneFit:
    """Step 3 for one zone, with the scales and means rounded to what is stored."""
    if variant == "arb-rc":
        fit = rc_fit(block, zone.mask, zone.order, config.iterations)
    else:
        fit = arb_fit(block, zone.mask, zone.order, config.iterations)
        if variant == "arb-x":
            fit = arb_x_refine(block, fit, metric, config.x_iterations)
    return fit.rounded()


def resign_columns(block: torch.Tensor, fits: list[ZoneFit], u_block: torch.Tensor) -> None:
    """GPTQ's column loop inside a block with the zones' scales fixed: each column takes the signs
    nearest to its error-updated weights, then its error moves the block's later columns. In place."""
    w = block.clone()
    for j in range(w.shape[1]):
        quantized = torch.zeros_like(w[:, j])
        for fit in fits:
            rows = fit.mask[:, j]
            if not bool(rows.any()):
                continue
            for t, signs in enumerate(choose_signs(fit, j, w[:, j])):
                fit.signs[t][:, j] = torch.where(rows, signs, fit.signs[t][:, j])
            quantized += _column(fit, j)
        error = (w[:, j] - quantized) / u_block[j, j]
        w[:, j + 1 :] -= error.unsqueeze(1) * u_block[j, j + 1 :].unsqueeze(0)


def _column(fit: ZoneFit, j: int) -> torch.Tensor:
    """Column ``j`` of a zone's approximation (same operations as ``fit.approximation()``), without
    building the whole block."""
    value = fit.mean.clone()
    for t in range(fit.order):
        scale = fit.row_scales[t] if fit.column_scales is None else fit.row_scales[t] * fit.column_scales[t][j]
        value = value + scale * (fit.signs[t][:, j].float() * 2 - 1)
    return value * fit.mask[:, j].to(value.dtype)


def quantize_arb(weight: torch.Tensor, hessian: torch.Tensor, config: ARBConfig, variant: str) -> BinaryWeight:
    if variant not in VARIANTS:
        raise ValueError(f"unknown ARB variant {variant!r}")
    rows, cols = weight.shape
    w, u = prepare_weight(weight, hessian, config.percdamp)
    undamped = hessian.to(u.dtype)
    builder = _LayoutBuilder(rows, cols, config, variant, w.device, w.dtype)

    for b, start in enumerate(range(0, cols, config.block_size)):
        end = min(start + config.block_size, cols)
        block = w[:, start:end]
        u_block = u[start:end, start:end]
        saliency = block_saliency(block, torch.diagonal(u_block), config.salient_metric)
        metric = None
        if variant == "arb-x":
            compensated = getattr(config, "x_metric", "block") == "compensated"
            metric = compensated_metric(u_block)[1] if compensated else undamped[start:end, start:end]
        zones = block_zones(block, saliency, config, variant, metric)
        fits = [fit_zone(block, zone, config, variant, metric) for zone in zones]
        if config.intra_block:
            resign_columns(block, fits, u_block)
        quantized = sum((fit.approximation() for fit in fits), torch.zeros_like(block))
        exact = config.exact_compensation or config.intra_block
        propagate_block_error(w, block_error(block, quantized, u_block, exact=exact), u, start, end)
        builder.add_block(b, start, end, zones, fits)
    return builder.build()


class _LayoutBuilder:
    """Collects the fitted zones of every block into one BinaryWeight."""

    def __init__(self, rows: int, cols: int, config: ARBConfig, variant: str, device, dtype) -> None:
        blocks = math.ceil(cols / config.block_size)
        zones = 6 if config.cgb else 4
        self.config, self.variant = config, variant
        self.signs = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        self.residual = torch.zeros_like(self.signs)
        self.bitmap = torch.zeros_like(self.signs)
        self.salient_columns = torch.zeros(cols, dtype=torch.bool, device=device)
        self.scales = torch.zeros(rows, blocks, zones, dtype=dtype, device=device)
        self.means = torch.zeros_like(self.scales)
        self.column_scales = torch.zeros(cols, zones, dtype=dtype, device=device)
        self.zone_names = [ZONE_CONCENTRATED, ZONE_SPARSE] + (
            [
                ZONE_SALIENT_CONCENTRATED,
                ZONE_SALIENT_CONCENTRATED_RESIDUAL,
                ZONE_SALIENT_SPARSE,
                ZONE_SALIENT_SPARSE_RESIDUAL,
            ]
            if config.cgb
            else [ZONE_SALIENT, ZONE_SALIENT_RESIDUAL]
        )

    def add_block(self, b: int, start: int, end: int, zones: list[Zone], fits: list[ZoneFit]) -> None:
        for zone, fit in zip(zones, fits, strict=True):
            mask = zone.mask
            columns = slice(start, end)
            self.signs[:, columns] = torch.where(mask, fit.signs[0], self.signs[:, columns])
            if zone.name in (ZONE_SPARSE, ZONE_SALIENT_SPARSE):
                self.bitmap[:, columns] |= mask
            first = self.zone_names.index(zone.name)
            for t in range(fit.order):
                self.scales[:, b, first + t] = fit.row_scales[t]
                if fit.column_scales is not None:
                    self.column_scales[columns, first + t] = fit.column_scales[t]
            self.means[:, b, first] = fit.mean
            if zone.order == 2:
                self.residual[:, columns] = torch.where(mask, fit.signs[1], self.residual[:, columns])
                self.salient_columns[columns] |= mask.any(0)

    def build(self) -> BinaryWeight:
        salient = self.salient_columns
        column_scales = salient_column_scales = None
        if self.variant == "arb-rc":
            column_scales = self.column_scales[~salient, :2].half().cpu()
            salient_column_scales = self.column_scales[salient, 2:].half().cpu()
        return BinaryWeight(
            signs=self.signs.cpu(),
            scales=self.scales.half().cpu(),
            block_size=self.config.block_size,
            means=None if self.variant == "arb-rc" else self.means.half().cpu(),
            group_bitmap=self.bitmap.cpu(),
            salient_columns=salient.cpu(),
            residual_signs=self.residual[:, salient].cpu(),
            salient_groups=self.config.cgb,
            column_scales=column_scales,
            salient_column_scales=salient_column_scales,
        )


def _register(name: str, config_class: type, variant: str, summary: str) -> None:
    register(name, config_class, summary)(partial(quantize_arb, variant=variant))


_register("arb", ARBConfig, "arb", "ARB: BiLLM's zones with alternating refined binarization (mean, scale, signs)")
_register("arb-x", ARBXConfig, "arb-x", "ARB-X: ARB, then closed-form mean/scale updates in the calibration metric")
_register("arb-rc", ARBConfig, "arb-rc", "ARB-RC: row x column scales without mean, alternating updates")
_register("arb-llm-x", ARBLLMXConfig, "arb-x", "ARB-LLM_X preset: ARB-X with the column-group bitmap (CGB)")
_register("arb-llm-rc", ARBLLMRCConfig, "arb-rc", "ARB-LLM_RC preset: ARB-RC with the column-group bitmap (CGB)")
