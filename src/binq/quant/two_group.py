"""Two-group binarization, the weight side of W(1+1) (our reconstruction of Song et al., ACL Findings 2025).

Each row of a column block is approximated by one of four levels: weight ``j`` gets a group
``g_j`` in {0, 1} (the stored group bit) and a sign ``s_j``, and stands for ``mu_g + a_g * s_j``.
The fit minimises the importance-weighted error

    L = sum_j h_j * (w_j - mu_{g_j} - a_{g_j} * s_j)^2

with ``h_j`` the importance of input column ``j`` (from the Hessian, see :func:`importance_weights`).
:func:`em_two_group` alternates an E-step (each weight to its nearest level, where ``h_j`` cancels)
and an M-step (exact coordinate minimisation of the scales and offsets); every step minimises ``L``
over its variables, so ``L`` never increases. Without offsets the best assignment for any two
scales is a threshold on ``|w|``, so scanning every split of the sorted magnitudes
(:func:`exact_two_group_split`) gives the global optimum: EM's oracle.

Group 0 is the smaller-scale ("concentrated") group, group 1 the larger ("sparse") one, as in
:class:`~binq.quant.structured.BinaryWeight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from binq.quant.binarize import round_to_storage
from binq.quant.search import split_search

IMPORTANCE_KINDS = ("obs", "diag", "review", "uniform")


@dataclass
class TwoGroupFit:
    """Per-row two-group parameters of one block and the assignment."""

    scales: torch.Tensor  # (rows, 2): a_0 <= a_1
    means: torch.Tensor  # (rows, 2): offsets mu_g (zero without offsets)
    groups: torch.Tensor  # bool (rows, cols): True = group 1 (larger scale)
    objective: torch.Tensor  # (rows,): the weighted error L of this fit
    history: list[float]  # total L after each EM iteration (the initial fit first)


def importance_weights(hessian: torch.Tensor, inverse_cholesky_upper: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-column importance ``h_j`` (float, positive).

    - ``obs``: ``1 / [H^-1]_jj``, the OBS cost of an error in column ``j`` (GPTQ-consistent);
    - ``diag``: ``H_jj`` (damped only where a column is dead);
    - ``review``: ``[H^-1]_jj``, the formula the secondary review attributes to the paper (probably garbled);
    - ``uniform``: all ones (plain squared error).

    ``[H^-1]_jj`` comes from the damped factor: ``H^-1 = U^T U``, so it is the squared norm of column ``j`` of U.
    """
    inverse_diagonal = inverse_cholesky_upper.square().sum(0)
    if kind == "obs":
        weights = 1.0 / inverse_diagonal
    elif kind == "review":
        weights = inverse_diagonal
    elif kind == "diag":
        diagonal = torch.diagonal(hessian).to(inverse_diagonal.dtype)
        weights = torch.where(diagonal > 0, diagonal, 1.0 / inverse_diagonal)
    elif kind == "uniform":
        weights = torch.ones_like(inverse_diagonal)
    else:
        raise ValueError(f"unknown importance {kind!r}")
    # Relative floor: a column with (numerically) zero importance would leave a group's scale undefined.
    return weights.clamp_min(float(weights.max()) * 1e-12 + torch.finfo(weights.dtype).tiny)


def two_group_objective(
    weight: torch.Tensor, importance: torch.Tensor, groups: torch.Tensor, scales: torch.Tensor, means: torch.Tensor
) -> torch.Tensor:
    """``L`` per row for the assignment ``groups`` (signs taken as ``sign(w - mu_g)``)."""
    return (importance * (weight - reconstruct(weight, groups, scales, means)).square()).sum(-1)


def reconstruct(weight: torch.Tensor, groups: torch.Tensor, scales: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``mu_g + a_g * sign(w - mu_g)`` for every element (sign(0) = +1, as the packed format)."""
    a = torch.where(groups, scales[:, 1:2], scales[:, 0:1])
    mu = torch.where(groups, means[:, 1:2], means[:, 0:1])
    return mu + torch.where(weight >= mu, a, -a)


def nearest_levels(
    weight: torch.Tensor, scales: torch.Tensor, means: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step: (group, positive sign) of the nearest of the four levels ``mu_g +- a_g`` per element.

    The distance to group ``g``'s nearer level is ``| |w - mu_g| - a_g |``. Ties go to group 0.
    ``weight`` is ``(rows, cols)``, ``scales``/``means`` ``(rows, 2)``.
    """
    error_0 = ((weight - means[:, 0:1]).abs() - scales[:, 0:1]).abs()
    error_1 = ((weight - means[:, 1:2]).abs() - scales[:, 1:2]).abs()
    groups = error_1 < error_0
    return groups, weight >= torch.where(groups, means[:, 1:2], means[:, 0:1])


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean along the last dim; 0 where the weights sum to 0 (an empty group)."""
    total = weights.sum(-1)
    return torch.where(total > 0, (values * weights).sum(-1) / total.clamp_min(torch.finfo(values.dtype).tiny), 0.0)


def m_step(
    weight: torch.Tensor,
    importance: torch.Tensor,
    groups: torch.Tensor,
    means: torch.Tensor,
    offsets: bool,
    sweeps: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (and offsets) for a fixed assignment: exact coordinate minimisation of ``L``.

    Without offsets ``a_g`` is the weighted mean of ``|w|`` over the group. With offsets each sweep
    takes the optimal ``(a_g, signs)`` for the current ``mu_g`` (``a_g`` = weighted mean of
    ``|w - mu_g|``), then the optimal ``mu_g`` for those (weighted mean of ``w - a_g s``): neither can
    raise ``L``, which keeps EM monotone (the plain weighted mean is *not* the optimal offset when the
    signs are unbalanced).
    """
    h = importance.expand_as(weight)
    scales = torch.zeros(weight.shape[0], 2, dtype=weight.dtype, device=weight.device)
    means = means.clone() if offsets else torch.zeros_like(scales)
    for _ in range(sweeps if offsets else 1):
        for g in range(2):
            member = (groups == bool(g)).to(weight.dtype) * h
            centred = weight - means[:, g : g + 1]
            scales[:, g] = _weighted_mean(centred.abs(), member)
            if offsets:
                signed = torch.where(centred >= 0, scales[:, g : g + 1], -scales[:, g : g + 1])
                means[:, g] = _weighted_mean(weight - signed, member)
    return scales, means


def _order_groups(fit_scales: torch.Tensor, fit_means: torch.Tensor, groups: torch.Tensor) -> tuple:
    """Relabel so that group 0 has the smaller scale in every row."""
    swap = fit_scales[:, 0] > fit_scales[:, 1]
    scales = torch.where(swap.unsqueeze(1), fit_scales.flip(1), fit_scales)
    means = torch.where(swap.unsqueeze(1), fit_means.flip(1), fit_means)
    return scales, means, groups ^ swap.unsqueeze(1)


def median_split(weight: torch.Tensor) -> torch.Tensor:
    """Init: the larger half of ``|w|`` in each row goes to group 1."""
    magnitude = weight.abs()
    return magnitude > magnitude.median(dim=1, keepdim=True).values


def salience_split(weight: torch.Tensor, factor_diagonal: torch.Tensor) -> torch.Tensor:
    """Init: BiLLM's concentrated/sparse break-point on the saliency ``w^2 / U_jj^2`` of the block."""
    metric = weight.square() / factor_diagonal.clamp_min(1e-8).square().unsqueeze(0)
    breakpoint_value = split_search(metric, torch.zeros_like(weight, dtype=torch.bool))
    return metric.abs() >= breakpoint_value


def exact_two_group_split(weight: torch.Tensor, importance: torch.Tensor) -> TwoGroupFit:
    """The global optimum of ``L`` without offsets, per row: a scan over the splits of sorted ``|w|``.

    For any scales ``a_0 <= a_1`` the best assignment puts ``|w| < (a_0 + a_1) / 2`` in group 0, so the
    optimum is a split of the sorted magnitudes; for a split the best scales are the weighted means,
    and ``L = sum h w^2 - S_0^2 / H_0 - S_1^2 / H_1`` with ``S_g = sum h |w|`` and ``H_g = sum h`` over
    group ``g``: prefix sums give every split at once (the empty-group splits included).
    """
    rows, cols = weight.shape
    work = weight.to(torch.float64)
    magnitude, order = work.abs().sort(dim=1)
    h = importance.to(torch.float64).expand(rows, cols)
    h_sorted = torch.gather(h, 1, order)
    zero = torch.zeros(rows, 1, dtype=torch.float64, device=weight.device)
    prefix_h = torch.cat([zero, h_sorted.cumsum(1)], 1)  # (rows, cols + 1): split k = first k in group 0
    prefix_s = torch.cat([zero, (h_sorted * magnitude).cumsum(1)], 1)
    total_h, total_s = prefix_h[:, -1:], prefix_s[:, -1:]

    def explained(s: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
        return torch.where(hh > 0, s.square() / hh.clamp_min(1e-300), 0.0)

    gain = explained(prefix_s, prefix_h) + explained(total_s - prefix_s, total_h - prefix_h)
    best = gain.argmax(1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=weight.device).expand(rows, cols))
    groups = ranks >= best.unsqueeze(1)
    no_offsets = torch.zeros(rows, 2, dtype=weight.dtype, device=weight.device)
    scales, means = m_step(weight, importance, groups, no_offsets, offsets=False)
    scales, means, groups = _order_groups(scales, means, groups)
    objective = two_group_objective(weight, importance, groups, scales, means)
    return TwoGroupFit(scales, means, groups, objective, [float(objective.sum())])


def em_two_group(
    weight: torch.Tensor,
    importance: torch.Tensor,
    groups: torch.Tensor,
    iterations: int = 10,
    offsets: bool = False,
    rounded: bool = True,
) -> TwoGroupFit:
    """Hard EM from the assignment ``groups``; stops early when no assignment changes.

    ``weight`` ``(rows, cols)``, ``importance`` ``(cols,)``. With ``rounded`` the final scales and offsets
    are rounded to the stored fp16 values and the assignment re-chosen for them (what is stored).
    """
    means = torch.zeros(weight.shape[0], 2, dtype=weight.dtype, device=weight.device)
    if offsets:
        # Start the offsets at each group's weighted mean (zero-offset start would pin them at 0 for a
        # symmetric group, which is fine, but the mean is the natural centre of a one-sided group).
        h = importance.expand_as(weight)
        for g in range(2):
            means[:, g] = _weighted_mean(weight, (groups == bool(g)).to(weight.dtype) * h)
    scales, means = m_step(weight, importance, groups, means, offsets)
    history = [float(two_group_objective(weight, importance, groups, scales, means).sum())]
    for _ in range(iterations):
        new_groups, _ = nearest_levels(weight, scales, means)
        if torch.equal(new_groups, groups):
            break
        groups = new_groups
        scales, means = m_step(weight, importance, groups, means, offsets)
        history.append(float(two_group_objective(weight, importance, groups, scales, means).sum()))
    if rounded:
        scales, means = round_to_storage(scales), round_to_storage(means)
        groups, _ = nearest_levels(weight, scales, means)
    scales, means, groups = _order_groups(scales, means, groups)
    objective = two_group_objective(weight, importance, groups, scales, means)
    return TwoGroupFit(scales, means, groups, objective, history)
