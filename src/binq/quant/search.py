"""Vectorized searches shared by the binarization methods: saliency, one-sort quantiles, salient columns, splits."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from binq.quant.binarize import binarization_error

# Candidates scored at once: small enough batches stay in cache (about 4x faster than all at once).
_CANDIDATE_CHUNK = 8

# BiLLM's split candidates: the quantiles 0.10, 0.11, ..., 0.90 (81 of them).
BILLM_SPLIT_QUANTILES = torch.linspace(0.10, 0.90, 81, dtype=torch.float64)


# What the searches of BiLLM and ARB can run on: the Hessian saliency or the weights themselves.
SALIENT_METRICS = ("hessian", "magnitude")
# Columns whose factor diagonal is this small would blow the saliency up: clamp it.
_MIN_FACTOR_DIAGONAL = 1e-8


def block_saliency(block: torch.Tensor, factor_diagonal: torch.Tensor, salient_metric: str) -> torch.Tensor:
    """The matrix BiLLM's searches run on (the reference searches on it, not on ``W``): the saliency
    ``W^2 / U_jj^2`` (``hessian``, ``U_jj`` the block's factor diagonal) or ``W`` itself (``magnitude``)."""
    if salient_metric == "hessian":
        return block.square() / factor_diagonal.clamp_min(_MIN_FACTOR_DIAGONAL).square().unsqueeze(0)
    return block


def sorted_quantiles(values: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(values.flatten(), quantiles)`` (linear interpolation) from one sort.

    ``torch.quantile`` refuses inputs above about 16 M elements and sorts once per call; here one
    sort serves every candidate.
    """
    flat = values.flatten().sort().values
    n = flat.numel()
    pos = quantiles.to(torch.float64) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = pos.ceil().long().clamp(0, n - 1)
    frac = (pos - lo.to(torch.float64)).to(flat.dtype)
    return flat[lo] + (flat[hi] - flat[lo]) * frac


def salient_column_search(
    metric: torch.Tensor, max_columns: int, order: int = 2, nonsalient_order: int = 2
) -> torch.Tensor:
    """BiLLM's structural search (Eq. 5): how many top-scored columns to binarize with the residual.

    Columns are ranked by ``sum_i |metric_ij|``; for k = 1 .. max_columns - 1 the top-k columns are
    binarized with ``order`` and the rest with ``nonsalient_order`` (the reference scores both with
    order 2), and the k with the smallest squared error wins. Returns a boolean column mask.
    """
    rows, cols = metric.shape
    k_max = min(max_columns - 1, cols - 1)
    if k_max < 1:
        return torch.zeros(cols, dtype=torch.bool, device=metric.device)
    ranking = metric.abs().sum(0).argsort(descending=True)
    ranked = metric[:, ranking]
    # Candidate k's salient set is ranked columns [0, k), its complement [k, cols): the salient part
    # lives in the first k_max columns and the complement in all but the first one, so neither is
    # evaluated over the whole block.
    head, tail = ranked[:, :k_max], ranked[:, 1:]
    head_position = torch.arange(k_max, device=metric.device)
    tail_position = torch.arange(1, cols, device=metric.device)
    ks = torch.arange(1, k_max + 1, device=metric.device)
    errors = []
    for chunk in ks.split(_CANDIDATE_CHUNK):
        salient = (head_position < chunk.unsqueeze(1)).unsqueeze(1).expand(-1, rows, -1)
        rest = (tail_position >= chunk.unsqueeze(1)).unsqueeze(1).expand(-1, rows, -1)
        errors.append(binarization_error(head, salient, order) + binarization_error(tail, rest, nonsalient_order))
    best_k = int(ks[torch.cat(errors).argmin()])
    mask = torch.zeros(cols, dtype=torch.bool, device=metric.device)
    mask[ranking[:best_k]] = True
    return mask


ErrorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def score_splits(
    magnitude: torch.Tensor, scored: torch.Tensor, region: torch.Tensor, candidates: torch.Tensor, error_fn: ErrorFn
) -> torch.Tensor:
    """The error of every candidate break-point at once: ``region`` is cut into ``magnitude < p`` and
    ``magnitude >= p`` and ``error_fn(scored, masks)`` scores each part (masks batched on a leading dim).
    Candidates go through in chunks only to stay in cache; within a chunk they are one tensor expression.
    """
    errors = []
    for chunk in candidates.split(_CANDIDATE_CHUNK):
        below = magnitude.unsqueeze(0) < chunk.view(-1, 1, 1)
        errors.append(error_fn(scored, below & region) + error_fn(scored, ~below & region))
    return torch.cat(errors)


def split_search(
    metric: torch.Tensor,
    salient_mask: torch.Tensor,
    quantiles: torch.Tensor = BILLM_SPLIT_QUANTILES,
    scored: torch.Tensor | None = None,
    error_fn: ErrorFn = binarization_error,
) -> torch.Tensor:
    """BiLLM's concentrated/sparse break-point search (Eq. 9-13), vectorized over candidates.

    Candidates are quantiles of ``|metric|`` over the block with salient entries zeroed, not removed
    (the reference's behaviour), all from one sort. Each candidate ``p`` splits the non-salient entries
    into ``|m| < p`` and ``|m| >= p``, each binarized with order 1 and scored by ``error_fn`` on
    ``scored`` (``metric`` itself by default, as the reference does; ARB-X scores the weights in its
    calibration metric); the salient part does not depend on ``p`` and is left out. Returns the break-point.
    """
    magnitude = metric.abs()
    nonsalient = ~salient_mask
    candidates = sorted_quantiles(magnitude * nonsalient, quantiles.to(metric.device))
    errors = score_splits(magnitude, metric if scored is None else scored, nonsalient, candidates, error_fn)
    return candidates[errors.argmin()]


def salient_split_search(
    metric: torch.Tensor, salient_mask: torch.Tensor, quantiles: torch.Tensor = BILLM_SPLIT_QUANTILES
) -> torch.Tensor:
    """ARB's CGB break-point inside the salient columns (ARB-LLM's column-group bitmap, Eq. 14).

    Candidates are quantiles of the *non-zero* ``|metric|`` inside the salient columns; each splits them
    into two parts binarized with order 2 (BiLLM's residual), scored on ``metric``. Returns the break-point
    (``inf`` when there is nothing to split: every salient entry then stays in the concentrated part).
    """
    magnitude = metric.abs()
    values = magnitude[salient_mask & (magnitude > 0)]
    if values.numel() == 0:
        return torch.tensor(float("inf"), dtype=metric.dtype, device=metric.device)
    candidates = sorted_quantiles(values, quantiles.to(metric.device))
    # Only the salient columns can score: slicing them out gives the same errors, far cheaper.
    columns = salient_mask.any(0)
    scored = metric[:, columns]
    error_fn = partial(binarization_error, order=2)
    errors = score_splits(scored.abs(), scored, salient_mask[:, columns], candidates, error_fn)
    return candidates[errors.argmin()]
