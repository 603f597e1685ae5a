"""Dynamic grouping of magnitudes (MSB, Zheng et al., arXiv 2509.03054): objective and solvers.

A unit of weights (a tensor, a row, or a 64-element row block) is split into groups of contiguous runs
of its sorted magnitudes ``a``; each weight is rebuilt as ``sign(w) * mean(a in its group)``. The cost
of a partition is ``sum_G |G| Var(a in G) + lambda / |G|`` (the paper's objective: the squared error of
the XNOR scale plus a penalty on small groups). With the normalized variant (the reference's ``-ln``) the
error term is divided by ``n`` and ``lambda`` depends on the candidate group (see :func:`segment_costs`).

Solvers, all on ascending magnitudes with exact zeros already removed (they stay zero, outside any group):

- :func:`solve_dp`: exact dynamic programming over ``k <= max_groups`` groups, batched over units of
  equal length (``O(g n^2)`` per unit: block-wise units and the test oracle);
- :func:`solve_greedy`: bottom-up merging of adjacent groups from initial segments (singletons for
  ``greedy``, windows of ``w`` sorted elements for ``windowed``), keyed by the merged group's absolute
  cost as the reference does, or by Ward's increase;
- :func:`refine_boundaries`: local optimisation of a partition's boundaries (our reading of WGM-LO).

Prefix sums are float64: the reference's float32 sums over millions of weights lose the variance to
cancellation.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import numpy as np

from binq.errors import BinqError

CRITERIA = ("merged", "ward")
# Batched DP works on (units, n+1, n+1) float64 cost tables: cap one batch at about 64 MiB.
_DP_BATCH_BYTES = 64 * 2**20
# Single units longer than this would need a cost table of over 130 MiB: refuse, point at the greedy solvers.
DP_MAX_LENGTH = 4096


def prefix_sums(sorted_magnitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 prefix sums of ``a`` and ``a^2`` along the last axis, with a leading 0: shape ``(..., n+1)``."""
    a = np.asarray(sorted_magnitudes, dtype=np.float64)
    pad = [(0, 0)] * (a.ndim - 1) + [(1, 0)]
    return np.pad(np.cumsum(a, axis=-1), pad), np.pad(np.cumsum(a * a, axis=-1), pad)


def normalized_lambda_min(sorted_magnitudes: np.ndarray) -> np.ndarray:
    """``lambda_min = (a_(1) - a_(2))^2 / (3 n)`` per unit (0 for units of one element)."""
    a = np.asarray(sorted_magnitudes, dtype=np.float64)
    n = a.shape[-1]
    if n < 2:
        return np.zeros(a.shape[:-1])
    return (a[..., 1] - a[..., 0]) ** 2 / (3 * n)


def segment_costs(
    p1: np.ndarray,
    p2: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    lam: float,
    normalized: bool = False,
    lam_min: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Cost of groups ``[starts, ends)`` of sorted magnitudes, from :func:`prefix_sums`.

    ``p1``/``p2`` are ``(n+1,)`` or ``(units, n+1)``; ``starts``/``ends`` are index arrays that
    broadcast against each other (a leading units axis when the sums are batched). Plain cost:
    ``|G| Var + lam / |G|``. Normalized (the reference's ``lambda_nor``): ``|G| Var / n + L / |G|`` with
    ``L = lam_min + lam (lam_max - lam_min)`` and ``lam_max = n (mean(G) - mean(P))^2 / 12``, ``P`` the
    equal-length run just below ``G``, clipped at 0 (the reference wraps a negative index round: a bug
    we do not copy); for a group starting at 0, ``L = lam_min``.
    """
    p1 = np.asarray(p1, dtype=np.float64)
    p2 = np.asarray(p2, dtype=np.float64)
    n = p1.shape[-1] - 1
    starts = np.asarray(starts)
    ends = np.asarray(ends)

    def take(p: np.ndarray, idx: np.ndarray) -> np.ndarray:
        if p.ndim == 1:
            return p[idx]
        units = p.shape[0]
        rows = np.arange(units).reshape((units,) + (1,) * (idx.ndim - 1))
        return p[rows, idx]

    size = (ends - starts).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s1 = take(p1, ends) - take(p1, starts)
        s2 = take(p2, ends) - take(p2, starts)
        # |G| Var = S2 - S1^2 / |G|; exactly 0 for a singleton, and rounding residue never below 0.
        spread = np.where(size > 1, np.maximum(s2 - s1 * s1 / size, 0.0), 0.0)
        if not normalized:
            return spread + lam / size
        prev_start = np.maximum(2 * starts - ends, 0)
        prev_size = (starts - prev_start).astype(np.float64)
        prev_mean = (take(p1, starts) - take(p1, prev_start)) / prev_size
        lam_min = np.asarray(lam_min, dtype=np.float64)
        if lam_min.ndim and p1.ndim > 1:
            lam_min = lam_min.reshape((-1,) + (1,) * (np.broadcast(starts, ends).ndim - 1))
        lam_max = np.where(prev_size > 0, n * (s1 / size - prev_mean) ** 2 / 12, lam_min)
        return spread / n + (lam_min + lam * (lam_max - lam_min)) / size


def partition_cost(
    sorted_magnitudes: np.ndarray, boundaries: np.ndarray, lam: float, normalized: bool = False
) -> float:
    """The objective of one unit partitioned at ``boundaries`` (``0 = b_0 < ... < b_k = n``)."""
    p1, p2 = prefix_sums(sorted_magnitudes)
    b = np.asarray(boundaries)
    costs = segment_costs(p1, p2, b[:-1], b[1:], lam, normalized, normalized_lambda_min(sorted_magnitudes))
    return float(costs.sum())


def solve_dp(sorted_magnitudes: np.ndarray, max_groups: int, lam: float, normalized: bool = False) -> np.ndarray:
    """Exact optimum over partitions into at most ``max_groups`` contiguous groups.

    ``sorted_magnitudes`` is ``(n,)`` or ``(units, n)`` (each row ascending, ``n >= 1``). Returns the group
    label of every sorted position, ``(n,)`` or ``(units, n)`` int64, labels ``0 .. k*-1`` ascending with
    the magnitudes; among equal-cost optima the fewest groups win.
    """
    a = np.asarray(sorted_magnitudes, dtype=np.float64)
    single = a.ndim == 1
    a = a.reshape(1, -1) if single else a
    units, n = a.shape
    if n == 0:
        raise ValueError("solve_dp needs at least one magnitude per unit")
    if n > DP_MAX_LENGTH:
        raise BinqError(f"the exact solver is O(g n^2): {n} weights per unit is too many (use --solver windowed)")
    per_unit = 8 * (n + 1) ** 2 * 3
    step = max(1, _DP_BATCH_BYTES // per_unit)
    labels = np.concatenate([_dp_batch(a[s : s + step], max_groups, lam, normalized) for s in range(0, units, step)])
    return labels[0] if single else labels


def _dp_batch(a: np.ndarray, max_groups: int, lam: float, normalized: bool) -> np.ndarray:
    units, n = a.shape
    g = min(max_groups, n)
    p1, p2 = prefix_sums(a)
    idx = np.arange(n + 1)
    starts, ends = idx.reshape(1, -1, 1), idx.reshape(1, 1, -1)
    valid = starts < ends
    safe_starts = np.where(valid, starts, 0)
    safe_ends = np.where(valid, ends, n)
    cost = segment_costs(p1, p2, safe_starts, safe_ends, lam, normalized, normalized_lambda_min(a))
    cost = np.where(valid, cost, np.inf)  # cost[u, i, j] of group [i, j)
    best = np.full((units, n + 1), np.inf)
    best[:, 0] = 0.0
    choices = np.empty((g, units, n + 1), dtype=np.int64)
    totals = np.empty((g, units))
    for k in range(g):
        candidates = best[:, :, None] + cost  # best[u, i] with k groups + group [i, j)
        choices[k] = candidates.argmin(axis=1)
        best = np.take_along_axis(candidates, choices[k][:, None, :], axis=1)[:, 0, :]
        totals[k] = best[:, n]
    groups = totals.argmin(axis=0) + 1  # first minimum: the fewest groups
    labels = np.empty((units, n), dtype=np.int64)
    end = np.full(units, n)
    positions = np.arange(n).reshape(1, -1)
    rows = np.arange(units)
    for k in range(g, 0, -1):
        active = groups >= k
        start = np.where(active, choices[k - 1, rows, end], end)
        inside = (positions >= start[:, None]) & (positions < end[:, None]) & active[:, None]
        labels = np.where(inside, (k - 1), labels)
        end = start
    return labels


def window_bounds(n: int, window: int) -> np.ndarray:
    """Initial segments of the windowed solver: ``[0, w, 2w, ..., n]``.

    As in the reference, a window that is not smaller than ``n`` (or not positive) falls back to 2.
    """
    if window >= n or window <= 0:
        window = 2
    return np.unique(np.append(np.arange(0, n, window), n))


def solve_greedy(
    sorted_magnitudes: np.ndarray,
    max_groups: int,
    lam: float,
    window: int = 1,
    criterion: str = "merged",
    normalized: bool = False,
) -> np.ndarray:
    """Bottom-up merging of adjacent groups until ``max_groups`` remain (GG for ``window=1``, else WGM).

    The heap key is the merged group's absolute cost (``criterion="merged"``, the reference's rule, not
    Ward's) or the increase of the total cost (``"ward"``). Stale heap entries (a side already merged
    away) are skipped. Returns the group boundaries ``0 = b_0 < ... < b_k = n`` on the sorted magnitudes.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}")
    a = np.asarray(sorted_magnitudes)
    n = a.shape[0]
    if n == 0:
        raise ValueError("solve_greedy needs at least one magnitude")
    bounds = np.arange(n + 1) if window == 1 else window_bounds(n, window)
    if n == 1:
        bounds = np.array([0, 1])
    cost = _scalar_cost(a, bounds, lam, normalized)
    ends = _merge(len(bounds) - 1, max_groups, cost, criterion == "ward")
    return bounds[[0, *ends]]


def refine_boundaries(
    sorted_magnitudes: np.ndarray,
    boundaries: np.ndarray,
    lam: float,
    normalized: bool = False,
    max_sweeps: int = 1000,
) -> np.ndarray:
    """Local optimisation of a partition (our reading of WGM-LO: the paper's definition could not be
    read): move each inner boundary, its neighbours held, to the position that minimises the
    two adjacent groups' joint cost; sweep until no boundary moves (or ``max_sweeps``).

    Every accepted move lowers the objective, so the result is never worse than the start (WGM's
    partition) and, keeping the number of groups, never better than the exact optimum. Groups stay
    non-empty. Returns the new boundaries ``0 = b_0 < ... < b_k = n``.
    """
    a = np.asarray(sorted_magnitudes, dtype=np.float64)
    b = np.asarray(boundaries, dtype=np.int64).copy()
    if len(b) <= 2:
        return b
    p1, p2 = prefix_sums(a)
    lam_min = normalized_lambda_min(a)

    def joint_costs(left: int, right: int) -> np.ndarray:
        """Cost of ``[left, p) + [p, right)`` for every ``p`` in ``left+1 .. right-1``."""
        if normalized:
            p = np.arange(left + 1, right)
            return segment_costs(p1, p2, np.full_like(p, left), p, lam, True, lam_min) + segment_costs(
                p1, p2, p, np.full_like(p, right), lam, True, lam_min
            )
        # Plain cost from contiguous slices of the prefix sums (no gathers): the hot loop of a large tensor.
        inner1, inner2 = p1[left + 1 : right], p2[left + 1 : right]
        size_left = np.arange(1, right - left, dtype=np.float64)
        size_right = (right - left) - size_left
        s1, s2 = inner1 - p1[left], inner2 - p2[left]
        t1, t2 = p1[right] - inner1, p2[right] - inner2
        spread = np.maximum(s2 - s1 * s1 / size_left, 0.0) + np.maximum(t2 - t1 * t1 / size_right, 0.0)
        # A singleton's spread is exactly 0 (the residue of S2 - S1^2/1 is not).
        spread[0] -= max(s2[0] - s1[0] * s1[0], 0.0)
        spread[-1] -= max(t2[-1] - t1[-1] * t1[-1], 0.0)
        return spread + lam / size_left + lam / size_right

    # A boundary's best position depends on its two neighbours only: after the first sweep, revisit a
    # boundary only when a neighbour has moved (the same result as full sweeps, at a fraction of the work).
    dirty = np.ones(len(b), dtype=bool)  # the two ends are never visited: only [1:-1] counts
    for _ in range(max_sweeps):
        if not dirty[1:-1].any():
            break
        for i in range(1, len(b) - 1):
            if not dirty[i]:
                continue
            dirty[i] = False
            left, right = b[i - 1], b[i + 1]
            if right - left < 3:
                continue  # both groups hold one weight: nowhere to move
            joint = joint_costs(int(left), int(right))
            best = int(joint.argmin())
            current = joint[b[i] - left - 1]
            # Strictly lower only (with a relative margin against rounding), so the sweeps terminate.
            if best != b[i] - left - 1 and joint[best] < current - 1e-12 * max(abs(current), 1e-300):
                b[i] = left + 1 + best
                dirty[[i - 1, i + 1]] = True
    return b


def boundaries_to_labels(boundaries: np.ndarray) -> np.ndarray:
    """The group label of every sorted position, from ``0 = b_0 < ... < b_k = n``."""
    return np.repeat(np.arange(len(boundaries) - 1), np.diff(boundaries))


def labels_to_boundaries(labels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`boundaries_to_labels` for labels that rise in steps of one."""
    return np.concatenate([[0], np.flatnonzero(np.diff(labels)) + 1, [len(labels)]])


def _scalar_cost(a: np.ndarray, bounds: np.ndarray, lam: float, normalized: bool) -> Callable[[int, int], float]:
    """Cost of the run of initial segments ``[s, e)`` (indices into ``bounds``), in plain Python floats.

    The greedy solvers call this a few times per merge: numpy's per-call overhead would dominate.
    Same formulas as :func:`segment_costs` (the tests check both through the DP oracle). Without the
    normalized key only the sums at the segment bounds are needed: the windowed solver on a tensor of
    25 M weights never forms the full prefix sums.
    """
    n = len(a)
    pos = bounds.tolist()
    if normalized:
        p1, p2 = prefix_sums(a)
        q1, q2 = p1[bounds].tolist(), p2[bounds].tolist()
        lam_min = float(normalized_lambda_min(a))
    else:
        a64 = a.astype(np.float64)
        starts = bounds[:-1]
        q1 = np.concatenate([[0.0], np.cumsum(np.add.reduceat(a64, starts))]).tolist()
        q2 = np.concatenate([[0.0], np.cumsum(np.add.reduceat(a64 * a64, starts))]).tolist()

    def cost(s: int, e: int) -> float:
        size = pos[e] - pos[s]
        s1 = q1[e] - q1[s]
        spread = max(q2[e] - q2[s] - s1 * s1 / size, 0.0) if size > 1 else 0.0
        if not normalized:
            return spread + lam / size
        start, end = pos[s], pos[e]
        prev = max(2 * start - end, 0)
        if start > prev:
            prev_mean = (float(p1[start]) - float(p1[prev])) / (start - prev)
            lam_max = n * (s1 / size - prev_mean) ** 2 / 12
        else:
            lam_max = lam_min
        return spread / n + (lam_min + lam * (lam_max - lam_min)) / size

    return cost


def _merge(segments: int, max_groups: int, cost: Callable[[int, int], float], ward: bool) -> list[int]:
    """Merge adjacent segments ``0..segments-1`` down to ``max_groups``; returns each group's end index."""
    end = list(range(1, segments + 1))  # end[s]: end of the group starting at segment s (if alive)
    prev = list(range(-1, segments - 1))  # prev[s]: start of the group before it
    alive = [True] * segments
    own = [cost(s, s + 1) for s in range(segments)] if ward else []

    def key(s: int, m: int, e: int) -> float:
        merged = cost(s, e)
        return merged - own[s] - own[m] if ward else merged

    heap = [(key(s, s + 1, s + 2), s, s + 1, s + 2) for s in range(segments - 1)]
    heapq.heapify(heap)
    groups = segments
    while groups > max_groups and heap:
        _, s, m, e = heapq.heappop(heap)
        if not (alive[s] and alive[m] and end[s] == m and end[m] == e):
            continue  # stale: one side has merged since this entry was pushed
        end[s] = e
        alive[m] = False
        groups -= 1
        if ward:
            own[s] = cost(s, e)
        if e < segments:
            prev[e] = s
            heapq.heappush(heap, (key(s, e, end[e]), s, e, end[e]))
        if prev[s] >= 0:
            heapq.heappush(heap, (key(prev[s], s, e), prev[s], s, e))
    ends, s = [], 0
    while s < segments:
        ends.append(end[s])
        s = end[s]
    return ends


def group_means(sorted_magnitudes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean magnitude of each group (the XNOR-optimal scale), from float64 sums."""
    a = np.asarray(sorted_magnitudes, dtype=np.float64)
    count = np.bincount(labels)
    return np.bincount(labels, weights=a) / np.maximum(count, 1)


def index_bits(groups: int) -> int:
    """Fixed-length bits of a group index: ``ceil(log2 g)`` (0 for one group)."""
    return math.ceil(math.log2(groups)) if groups > 1 else 0
