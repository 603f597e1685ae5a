"""MSB, multi-scale binary by dynamic grouping (Zheng et al., arXiv 2509.03054).

Two registered methods share one codebook (signs, a group index per weight, fp16 group scales):

- ``msb``: the paper's calibration-free quantizer. Every unit (the tensor, a row, or a 64-element
  row block) is grouped on its sorted magnitudes by :mod:`binq.quant.grouping`, and each weight becomes
  ``sign(w) * mean |w|`` of its group. It needs no Hessian, so the engine's independent path runs it
  (every linear on its own, in worker processes).
- ``msb-hessian`` (beyond the paper): the same codebook inside the calibration engine. Levels are
  fitted as above (per tensor or row up front; block-wise when the GPTQ column loop reaches the block,
  on the error-updated weights), columns are rounded to the nearest level with GPTQ's error feedback,
  and finally the scales are re-fitted in the Hessian metric, ``min tr((W - Q) H (W - Q)^T)`` over the
  scales with the assignments fixed (a linear least-squares problem, solved by conjugate gradients).

Two method names rather than one option because calibration-free is a property of the method the
command line must know before it decides whether to read calibration data and run the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from binq.methods.registry import MethodConfig, check_range, option, register
from binq.quant.binarize import round_to_storage
from binq.quant.grouping import CRITERIA, group_means, refine_boundaries, solve_dp, solve_greedy
from binq.quant.hessian import dead_columns, factor_hessian
from binq.quant.multiscale import MultiScaleWeight
from binq.quant.sweep import sweep_columns

GRANULARITIES = ("tensor", "row", "block")
SOLVERS = ("auto", "dp", "greedy", "windowed", "windowed-lo")
# "auto" runs the exact DP on units up to this long (a 64-weight block: 4 x 65^2 table entries) and
# the windowed greedy solver above it.
AUTO_DP_MAX_LENGTH = 256
# The reference's lambda: an absolute amount of squared weight, negligible beside the error of a whole
# tensor (millions of weights) but larger than the whole error of a 64-weight block.
REFERENCE_LAMBDA = 0.75


@dataclass
class MSBConfig(MethodConfig):
    """MSB's settings; the defaults are the reference's per-tensor run (g = 32, w = 64, lambda = 0.75).

    - ``groups``: g, the most groups (scales) per unit; the index costs ``ceil(log2 g)`` bits per weight.
    - ``granularity``: ``tensor`` (the first version), ``row``, or ``block`` (``block_size`` weights of
      one row: the later version's 4-bit setting is ``--granularity block --groups 4``).
    - ``solver``: ``dp`` (exact), ``greedy`` (merging from single weights), ``windowed`` (from windows
      of ``window`` sorted weights), ``windowed-lo`` (windowed, then a local optimisation of the group
      boundaries: our reading of the paper's WGM-LO, whose definition could not be read), or ``auto``
      (``dp`` for units of at most 256 weights, else windowed).
    - ``lambda_reg``: the penalty ``lambda / |G|``; -1 = auto: 0.75 per tensor, 0 for rows and blocks
      (where 0.75 would outweigh the error term and leave one group); with ``normalized_lambda`` it is
      the relative position between the reference's ``lambda_min`` and ``lambda_max``.
    - ``criterion``: the greedy merge key, ``merged`` (the reference's absolute cost of the merged
      group) or ``ward`` (the increase of the total cost).
    - ``lo_sweeps``: the most boundary sweeps of ``windowed-lo`` (on a 576 x 1536 tensor, 10 sweeps reach
      99 % of the converged gain, 30 sweeps 99.8 %; convergence takes about 300).
    """

    groups: int = option(32, low=1, high=256)
    granularity: str = option("tensor", choices=GRANULARITIES)
    block_size: int = option(64, low=1)
    solver: str = option("auto", choices=SOLVERS)
    window: int = option(64, low=1)
    lambda_reg: float = -1.0
    normalized_lambda: bool = False
    criterion: str = option("merged", choices=CRITERIA)
    lo_sweeps: int = option(30, low=1, high=1 << 20)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lambda_reg != -1.0:  # -1 is "auto"
            check_range("--lambda-reg", self.lambda_reg, 0.0, 1e12)

    @property
    def lam(self) -> float:
        if self.lambda_reg >= 0:
            return self.lambda_reg
        return REFERENCE_LAMBDA if self.granularity == "tensor" else 0.0


@dataclass
class UnitCodebook:
    """The grouping of a batch of equal-length units: labels in the units' own order, and scales."""

    labels: np.ndarray  # int64 (units, length), 0 for exact zeros (listed apart)
    scales: np.ndarray  # float64 (units, groups): ascending; unused slots repeat the largest
    zeros: np.ndarray  # bool (units, length)


def fit_units(values: np.ndarray, config: MSBConfig) -> UnitCodebook:
    """Group every row of ``values`` (units, length) on its sorted magnitudes; zeros stay out of groups."""
    units, length = values.shape
    magnitudes = np.abs(values)
    solver = config.solver
    if solver == "auto":
        solver = "dp" if length <= AUTO_DP_MAX_LENGTH else "windowed"
    if solver == "dp":
        labels, scales = _fit_units_dp(magnitudes, config)
    else:
        labels = np.zeros((units, length), dtype=np.int64)
        tables = []
        for unit in range(units):
            labels[unit], unit_scales = _fit_unit_greedy(magnitudes[unit], config, solver)
            tables.append(unit_scales[None, :])
        scales = np.concatenate(_pad_groups(tables), axis=0)
    return UnitCodebook(labels, scales, magnitudes == 0)


def _fit_units_dp(magnitudes: np.ndarray, config: MSBConfig) -> tuple[np.ndarray, np.ndarray]:
    units, length = magnitudes.shape
    order = np.argsort(magnitudes, axis=1, kind="stable")
    ordered = np.take_along_axis(magnitudes, order, axis=1).astype(np.float64)
    zero_counts = (magnitudes == 0).sum(axis=1)  # zeros sort first
    sorted_labels = np.zeros((units, length), dtype=np.int64)
    # One batched DP per count of zeros: the units of a batch must have equal lengths.
    for zeros in np.unique(zero_counts):
        if zeros < length:
            batch = np.flatnonzero(zero_counts == zeros)
            sorted_labels[batch, zeros:] = solve_dp(
                ordered[batch, zeros:], config.groups, config.lam, config.normalized_lambda
            )
    groups = int(sorted_labels.max()) + 1 if sorted_labels.size else 1
    scales = np.zeros((units, groups))
    for unit in range(units):
        zeros = zero_counts[unit]
        if zeros < length:
            means = group_means(ordered[unit, zeros:], sorted_labels[unit, zeros:])
            scales[unit, : len(means)] = means
            scales[unit, len(means) :] = means[-1]
    labels = np.empty_like(sorted_labels)
    np.put_along_axis(labels, order, sorted_labels, axis=1)
    return labels, scales


def _fit_unit_greedy(magnitudes: np.ndarray, config: MSBConfig, solver: str) -> tuple[np.ndarray, np.ndarray]:
    """One unit with a greedy solver; labels come from the group thresholds (no argsort of 25 M weights).

    Weights tied at a threshold magnitude all go to the upper group, so the partition can differ from the
    solver's positional one by tied weights only; the scales are the means of the groups as assigned.
    """
    ordered = np.sort(magnitudes)
    nonzero = ordered[np.searchsorted(ordered, 0, side="right") :]
    if nonzero.size == 0:
        return np.zeros(magnitudes.shape, dtype=np.int64), np.zeros(1)
    window = 1 if solver == "greedy" else config.window
    boundaries = solve_greedy(nonzero, config.groups, config.lam, window, config.criterion, config.normalized_lambda)
    if solver == "windowed-lo":
        boundaries = refine_boundaries(nonzero, boundaries, config.lam, config.normalized_lambda, config.lo_sweeps)
    thresholds = nonzero[boundaries[1:-1]]
    labels = np.searchsorted(thresholds, magnitudes, side="right")
    groups = len(boundaries) - 1
    kept = magnitudes != 0
    counts = np.bincount(labels[kept], minlength=groups)
    sums = np.bincount(labels[kept], weights=magnitudes[kept].astype(np.float64), minlength=groups)
    # A group emptied by ties keeps its threshold as a scale; no weight points at it.
    floor = np.concatenate([[nonzero[0]], thresholds]).astype(np.float64)
    return labels, np.where(counts > 0, sums / np.maximum(counts, 1), floor)


def _unit_batches(cols: int, config: MSBConfig) -> list[tuple[int, int]]:
    """Column ranges whose units have one length: the whole row, or full blocks then the ragged last one."""
    if config.granularity != "block" or config.block_size >= cols:
        return [(0, cols)]
    full = cols // config.block_size * config.block_size
    return [(0, full)] + ([(full, cols)] if full < cols else [])


def _pad_groups(scales: list[np.ndarray]) -> list[np.ndarray]:
    groups = max(s.shape[-1] for s in scales)
    return [np.concatenate([s, np.repeat(s[..., -1:], groups - s.shape[-1], axis=-1)], axis=-1) for s in scales]


def _scale_block_size(cols: int, config: MSBConfig) -> int:
    return min(config.block_size, cols) if config.granularity == "block" else cols


def msb_codebook(weight: torch.Tensor, config: MSBConfig) -> MultiScaleWeight:
    """The calibration-free MSB weight: ``sign(w) * mean |w|`` of its magnitude group, per unit."""
    rows, cols = weight.shape
    w = weight.detach().cpu().to(torch.float32).numpy()
    group_index = np.zeros((rows, cols), dtype=np.int64)
    zero = np.zeros((rows, cols), dtype=bool)
    tables = []
    if config.granularity == "tensor":
        book = fit_units(w.reshape(1, -1), config)
        group_index, zero = book.labels.reshape(rows, cols), book.zeros.reshape(rows, cols)
        tables.append(book.scales.reshape(1, 1, -1))
    else:
        for start, end in _unit_batches(cols, config):
            width = min(end - start, _scale_block_size(cols, config))
            blocks = (end - start) // width
            book = fit_units(w[:, start:end].reshape(rows * blocks, width), config)
            group_index[:, start:end] = book.labels.reshape(rows, end - start)
            zero[:, start:end] = book.zeros.reshape(rows, end - start)
            tables.append(book.scales.reshape(rows, blocks, -1))
    scales = np.concatenate(_pad_groups(tables), axis=1)
    zero_positions = np.flatnonzero(zero)
    return MultiScaleWeight(
        signs=torch.from_numpy(w >= 0),
        group_index=torch.from_numpy(group_index.astype(np.uint8)),
        scales=torch.from_numpy(scales).to(torch.float16),
        block_size=_scale_block_size(cols, config),
        zero_positions=torch.from_numpy(zero_positions) if zero_positions.size else None,
    )


@register(
    "msb",
    MSBConfig,
    "MSB: sign x per-group scale, groups by dynamic grouping of |w| (no calibration)",
    calibration_free=True,
)
def quantize_msb(weight: torch.Tensor, hessian: torch.Tensor | None, config: MSBConfig) -> MultiScaleWeight:
    return msb_codebook(weight, config)


@dataclass
class MSBHessianConfig(MSBConfig):
    """MSB's codebook with GPTQ's error feedback and a Hessian-metric scale fit (not in the paper).

    - ``refit_iterations``: conjugate-gradient steps of the final scale fit (0 = keep the mean scales).
    - ``percdamp``: Hessian damping relative to ``mean(diag H)``.
    - ``lazy_block``: GPTQ's lazy-batch width (rounded up to a multiple of ``block_size`` block-wise).
    """

    refit_iterations: int = option(16, low=0, high=10_000)
    percdamp: float = option(0.01, low=0.0, high=10.0)
    lazy_block: int = option(128, low=1)


def _nearest_level(column: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the level (``levels``: rows x groups) nearest to ``|column|``; ties go to the smaller index."""
    index = (column.abs().unsqueeze(1) - levels).abs().argmin(dim=1)
    quantized = torch.where(column >= 0, 1.0, -1.0).to(column.dtype) * levels.gather(1, index.unsqueeze(1))[:, 0]
    return index, torch.where(column == 0, torch.zeros_like(quantized), quantized)


def _scatter_to_scales(values: torch.Tensor, flat_slot: torch.Tensor, slots: int) -> torch.Tensor:
    return torch.zeros(slots, dtype=values.dtype, device=values.device).index_add_(0, flat_slot, values.reshape(-1))


def refit_scales_hessian(
    target: torch.Tensor,
    signs: torch.Tensor,
    flat_slot: torch.Tensor,
    scales: torch.Tensor,
    hessian: torch.Tensor,
    iterations: int,
) -> torch.Tensor:
    """Scales minimising ``tr((T - Q) H (T - Q)^T)`` for ``Q = signs * scales[flat_slot]``, assignments fixed.

    ``signs`` is +-1 (0 for exact zeros), ``flat_slot`` the scale slot of every element, ``scales`` the
    flat starting point (warm start). Conjugate gradients on the normal equations ``A s = b`` with
    ``A s = P^T((P s) H)`` and ``b = P^T(T H)``, ``P`` the linear map from scales to ``Q``; one
    ``rows x cols x cols`` product per step. Converges in at most ``len(scales)`` steps in exact arithmetic.
    """
    slots = scales.numel()

    def apply(s: torch.Tensor) -> torch.Tensor:
        return _scatter_to_scales((signs * s[flat_slot].reshape(signs.shape)) @ hessian * signs, flat_slot, slots)

    x = scales.clone()
    b = _scatter_to_scales(target @ hessian * signs, flat_slot, slots)
    r = b - apply(x)
    p = r.clone()
    rr = r @ r
    tolerance = 1e-20 * max(float(b @ b), 1e-300)
    for _ in range(iterations):
        if float(rr) <= tolerance:
            break
        ap = apply(p)
        curvature = p @ ap
        if float(curvature) <= 0:
            break
        step = rr / curvature
        x += step * p
        r -= step * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


@register(
    "msb-hessian",
    MSBHessianConfig,
    "MSB codebook with GPTQ error feedback and Hessian-metric scales (beyond the paper)",
)
def quantize_msb_hessian(weight: torch.Tensor, hessian: torch.Tensor, config: MSBHessianConfig) -> MultiScaleWeight:
    rows, cols = weight.shape
    factor = factor_hessian(hessian, config.percdamp)
    u = factor.inverse_cholesky_upper
    dead = dead_columns(hessian)
    original = weight.to(u.dtype).clone()
    original[:, dead] = 0
    w = original.clone()
    block_size = _scale_block_size(cols, config)
    blockwise = config.granularity == "block" and block_size < cols
    lazy = block_size * math.ceil(config.lazy_block / block_size) if blockwise else config.lazy_block

    # Per tensor or row the whole unit must be known first: fit the levels on the original weights.
    table_rows = 1 if config.granularity == "tensor" else rows
    blocks = math.ceil(cols / block_size)
    level_blocks: list[torch.Tensor | None] = [None] * blocks
    if not blockwise:
        book = msb_codebook(w, config)
        level_blocks[0] = book.scales[:, 0, :].to(w.dtype)

    def fit_block_levels(j: int, current: torch.Tensor) -> None:
        # Block-wise: fit this block's levels on its error-updated weights (GPTQ's group refit).
        codebook = fit_units(current.cpu().to(torch.float32).numpy(), config)
        level_blocks[j // block_size] = torch.from_numpy(codebook.scales).to(torch.float16).to(w)

    index = torch.zeros(rows, cols, dtype=torch.long, device=w.device)
    positive = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    zero = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)

    def quantize_column(j: int, column: torch.Tensor) -> torch.Tensor:
        levels = round_to_storage(level_blocks[j // block_size].to(w.dtype))
        levels = levels.expand(rows, -1) if levels.shape[0] == 1 else levels
        index[:, j], quantized = _nearest_level(column, levels)
        positive[:, j] = column >= 0
        zero[:, j] = column == 0  # dead columns, and any weight compensation left at exactly 0
        return quantized

    sweep_columns(w, u, quantize_column, lazy, group_size=block_size, fit_group=fit_block_levels if blockwise else None)

    groups = max(t.shape[1] for t in level_blocks if t is not None)
    table = torch.stack(
        [torch.cat([t, t[:, -1:].expand(-1, groups - t.shape[1])], dim=1) for t in level_blocks if t is not None],
        dim=1,
    ).to(w.dtype)  # (table_rows, blocks, groups)
    sign_values = torch.where(positive, 1.0, -1.0).to(w.dtype)
    sign_values[zero] = 0
    if config.refit_iterations:
        row_unit = (
            torch.arange(rows, device=w.device).unsqueeze(1) if table_rows > 1 else torch.zeros_like(index[:, :1])
        )
        block_of = (torch.arange(cols, device=w.device) // block_size).unsqueeze(0)
        flat_slot = ((row_unit * blocks + block_of) * groups + index).reshape(-1)
        damped = hessian.to(w.dtype).clone()
        damped[dead, dead] = 1.0
        damped += factor.percdamp * torch.diagonal(damped).mean() * torch.eye(cols, dtype=w.dtype, device=w.device)
        fitted = refit_scales_hessian(
            original, sign_values, flat_slot, table.reshape(-1), damped, config.refit_iterations
        )
        # fp16 rounding could in principle undo a tiny gain: keep whichever stored table is better.
        table = _better_table(original, sign_values, flat_slot, table, fitted.reshape(table.shape), damped)
    zero_positions = torch.nonzero(zero.reshape(-1)).flatten().cpu()
    return MultiScaleWeight(
        signs=positive.cpu(),
        group_index=index.to(torch.uint8).cpu(),
        scales=table.to(torch.float16).cpu(),
        block_size=block_size,
        zero_positions=zero_positions if zero_positions.numel() else None,
    )


def _better_table(
    target: torch.Tensor,
    signs: torch.Tensor,
    flat_slot: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    hessian: torch.Tensor,
) -> torch.Tensor:
    def loss(table: torch.Tensor) -> float:
        delta = target - signs * round_to_storage(table).reshape(-1)[flat_slot].reshape(target.shape)
        return float((delta @ hessian * delta).sum())

    return after if loss(after) <= loss(before) else before
