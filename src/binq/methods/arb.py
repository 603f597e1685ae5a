"""The ARB-LLM family (Li et al., ICLR 2025) on BiLLM's block structure.

Per block of ``block_size`` columns, from the current (compensated) weights:

1. BiLLM's masks (the searches of :mod:`binq.quant.search`): salient columns on the saliency ``T``,
   then the concentrated/sparse break-point; ARB-X scores the break-point candidates by
   ``Tr(R S R^T)`` on the weights, ARB-RC by the error of its own starting point;
2. with ``cgb`` (the column-group bitmap, Eq. 14), a second break-point splits the salient columns too:
   four zones, second order in the salient ones, no extra bitmap;
3. each zone is fitted by the variant's binarizer (:mod:`binq.quant.arb`), picked by the config's class:
   :class:`ARBConfig` (weight-space refinement), :class:`ARBXConfig` (then the closed forms in the
   block's calibration metric ``S = H_bb``, signs frozen), :class:`ARBRCConfig` (row x column scales,
   no mean);
4. block compensation as BiLLM (diagonal, :func:`binq.quant.sweep.sweep_blocks`), or the exact
   triangular solve, optionally after a GPTQ-style pass that re-signs each column of the block on its
   error-updated weights (``intra_block``).

``S`` comes from the undamped Hessian the engine accumulates (``H = 2/T sum x x^T``): the reference stores
every calibration input instead, but its ``mean_s X_s^T X_s`` is ``H * seqlen / 2`` and the closed forms
do not depend on the scale (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from binq.methods.registry import MethodConfig, option, register
from binq.quant.arb import (
    ZoneFit,
    arb_fit,
    arb_x_refine,
    metric_binarization_error,
    rc_fit,
    rc_start_error,
    resign_columns,
)
from binq.quant.compensation import compensated_metric
from binq.quant.hessian import prepare_weight
from binq.quant.search import (
    SALIENT_METRICS,
    block_saliency,
    salient_column_search,
    salient_split_search,
    split_search,
)
from binq.quant.structured import (
    ZONE_CONCENTRATED,
    ZONE_SALIENT,
    ZONE_SALIENT_CONCENTRATED,
    ZONE_SALIENT_CONCENTRATED_RESIDUAL,
    ZONE_SALIENT_RESIDUAL,
    ZONE_SALIENT_SPARSE,
    ZONE_SALIENT_SPARSE_RESIDUAL,
    ZONE_SPARSE,
    BinaryPlanes,
    BinaryWeight,
)
from binq.quant.sweep import Block, sweep_blocks


@dataclass
class ARBConfig(MethodConfig):
    """ARB (weight-space refinement), and the settings every variant shares; the defaults are the
    paper's and the reference's.

    - ``block_size``: columns per block (128); ``salient_metric``: ``hessian`` (``W^2 / U_jj^2``) or
      ``magnitude``; ``max_salient_columns``: BiLLM's K (tries 1 .. K-1 columns).
    - ``cgb``: the column-group bitmap (4 zones); ``iterations``: weight-space refinement rounds (15).
    - ``exact_compensation``: triangular-solve block error instead of the diagonal one.
    - ``intra_block``: re-sign each column of a block GPTQ-style on its error-updated weights before
      the block error is propagated (implies the exact block error, which that loop produces).
    - ``percdamp``: Hessian damping relative to ``mean(diag H)``.
    """

    block_size: int = option(128, low=2)
    salient_metric: str = option("hessian", choices=SALIENT_METRICS)
    max_salient_columns: int = option(50, low=1)
    cgb: bool = False
    iterations: int = option(15, low=0, high=10_000)
    exact_compensation: bool = False
    intra_block: bool = False
    percdamp: float = option(0.01, low=0.0, high=10.0)


@dataclass
class ARBXConfig(ARBConfig):
    """ARB-X adds ``x_iterations`` closed-form rounds in the calibration metric (15), after the
    weight-space ones; ``x_split_metric``: score the break-point candidates in that metric (the
    reference) rather than BiLLM's way; ``x_metric``: ``block`` is the paper's ``S = H_bb``,
    ``compensated`` the metric the block's error is really paid in once later columns compensate it
    (``(U_bb^T U_bb)^-1``, exact with ``--exact-compensation``)."""

    x_iterations: int = option(15, low=0, high=10_000)
    x_split_metric: bool = True
    x_metric: str = option("block", choices=("block", "compensated"))


@dataclass
class ARBRCConfig(ARBConfig):
    """ARB-RC: every zone fitted with row x column scales and no mean (Eq. 12-13); the break-point
    candidates are scored by the error of that fit's starting point."""


@dataclass
class ARBLLMXConfig(ARBXConfig):
    """The paper's ARB-LLM_X: ARB-X with CGB."""

    cgb: bool = True


@dataclass
class ARBLLMRCConfig(ARBRCConfig):
    """The paper's ARB-LLM_RC: ARB-RC with CGB."""

    cgb: bool = True


@dataclass
class Zone:
    name: str  # the first zone's name in BinaryWeight.zone_names
    mask: torch.Tensor
    order: int


def block_zones(
    block: torch.Tensor, saliency: torch.Tensor, config: ARBConfig, metric: torch.Tensor | None = None
) -> list[Zone]:
    """Steps 1-2: the zones of one block, in BinaryWeight's order (``metric``: ARB-X's ``S``)."""
    salient_columns = salient_column_search(saliency, config.max_salient_columns, 2, 2)
    salient = salient_columns.unsqueeze(0).expand_as(block)
    if isinstance(config, ARBXConfig) and config.x_split_metric:
        error_fn = partial(metric_binarization_error, metric=metric)
        breakpoint_value = split_search(saliency, salient, scored=block, error_fn=error_fn)
    elif isinstance(config, ARBRCConfig):
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


def fit_zone(block: torch.Tensor, zone: Zone, config: ARBConfig, metric: torch.Tensor | None = None) -> ZoneFit:
    """Step 3 for one zone, with the scales and means rounded to what is stored."""
    if isinstance(config, ARBRCConfig):
        fit = rc_fit(block, zone.mask, zone.order, config.iterations)
    else:
        fit = arb_fit(block, zone.mask, zone.order, config.iterations)
        if isinstance(config, ARBXConfig):
            fit = arb_x_refine(block, fit, metric, config.x_iterations)
    return fit.rounded()


def calibration_metric(block: Block, hessian: torch.Tensor, config: ARBConfig) -> torch.Tensor | None:
    """ARB-X's ``S`` for one block: the block of the undamped ``hessian`` (the paper's), or the metric
    the block's error is paid in once later columns compensate it; None for the other variants."""
    if not isinstance(config, ARBXConfig):
        return None
    if config.x_metric == "compensated":
        return compensated_metric(block.factor)[1]
    return hessian[block.columns, block.columns]


@register("arb", ARBConfig, "ARB: BiLLM's zones with alternating refined binarization (mean, scale, signs)")
@register("arb-x", ARBXConfig, "ARB-X: ARB, then closed-form mean/scale updates in the calibration metric")
@register("arb-rc", ARBRCConfig, "ARB-RC: row x column scales without mean, alternating updates")
@register("arb-llm-x", ARBLLMXConfig, "ARB-LLM_X preset: ARB-X with the column-group bitmap (CGB)")
@register("arb-llm-rc", ARBLLMRCConfig, "ARB-LLM_RC preset: ARB-RC with the column-group bitmap (CGB)")
def quantize_arb(weight: torch.Tensor, hessian: torch.Tensor, config: ARBConfig) -> BinaryWeight:
    """Every ARB variant; the config's class says which (see the module docstring)."""
    w, u = prepare_weight(weight, hessian, config.percdamp)
    undamped = hessian.to(u.dtype)
    layout = _LayoutBuilder(w, config)

    def fit_block(block: Block) -> torch.Tensor:
        saliency = block_saliency(block.weight, torch.diagonal(block.factor), config.salient_metric)
        metric = calibration_metric(block, undamped, config)
        zones = block_zones(block.weight, saliency, config, metric)
        fits = [fit_zone(block.weight, zone, config, metric) for zone in zones]
        if config.intra_block:
            resign_columns(block.weight, fits, block.factor)
        layout.add_block(block, zones, fits)
        return sum((fit.approximation() for fit in fits), torch.zeros_like(block.weight))

    # The re-signing loop produces the exact block error, not BiLLM's diagonal one.
    sweep_blocks(w, u, config.block_size, fit_block, exact=config.exact_compensation or config.intra_block)
    return layout.build()


class _LayoutBuilder:
    """Collects the fitted zones of every block into one BinaryWeight."""

    def __init__(self, weight: torch.Tensor, config: ARBConfig) -> None:
        zones = 6 if config.cgb else 4
        self.config = config
        self.row_column_scales = isinstance(config, ARBRCConfig)
        self.planes = BinaryPlanes.zeros(weight, config.block_size, zones)
        self.column_scales = torch.zeros(weight.shape[1], zones, dtype=weight.dtype, device=weight.device)
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

    def add_block(self, block: Block, zones: list[Zone], fits: list[ZoneFit]) -> None:
        b, columns, planes = block.index, block.columns, self.planes
        for zone, fit in zip(zones, fits, strict=True):
            mask = zone.mask
            planes.signs[:, columns] = torch.where(mask, fit.signs[0], planes.signs[:, columns])
            if zone.name in (ZONE_SPARSE, ZONE_SALIENT_SPARSE):
                planes.group_bitmap[:, columns] |= mask
            first = self.zone_names.index(zone.name)
            for t in range(fit.order):
                planes.scales[:, b, first + t] = fit.row_scales[t]
                if fit.column_scales is not None:
                    self.column_scales[columns, first + t] = fit.column_scales[t]
            planes.means[:, b, first] = fit.mean
            if zone.order == 2:
                planes.residual_signs[:, columns] = torch.where(mask, fit.signs[1], planes.residual_signs[:, columns])
                planes.salient_columns[columns] |= mask.any(0)

    def build(self) -> BinaryWeight:
        salient = self.planes.salient_columns
        column_scales = salient_column_scales = None
        if self.row_column_scales:
            column_scales = self.column_scales[~salient, :2].half().cpu()
            salient_column_scales = self.column_scales[salient, 2:].half().cpu()
        return self.planes.finish(
            self.config.block_size,
            means=not self.row_column_scales,
            salient=True,
            salient_groups=self.config.cgb,
            column_scales=column_scales,
            salient_column_scales=salient_column_scales,
        )
