"""The multiple-choice knapsack behind ``--target-bits``: one option per item, least total error, total cost
within a budget.

Each item (a linear layer) has a few options (a method and its settings), each with a cost (the stored
bits of the weight it makes) and an error (its measured, sensitivity-weighted output error). The
exact problem is NP-hard in general but pseudo-polynomial in the budget, so it is solved exactly by
dynamic programming over an integer budget (:func:`solve_exact`): ``best[r]`` is the least error of
the items seen so far with extra cost at most ``r``, and each item replaces it by
``min_j best[r - cost_j] + error_j``. Costs are taken relative to each item's cheapest option, so the
cheapest allocation always costs 0 and the table only spans the budget above it.

Real bit counts run to hundreds of millions, so :func:`allocate` counts them in units of ``unit`` bits,
each option's extra cost rounded **up** and the budget rounded **down**: whatever it returns fits the
budget in exact bits. It is exact for the rounded costs; against the exact-bit optimum it can only
lose the bits lost to rounding (less than one unit per item: with the default ``resolution`` about
``items / 100,000`` of the largest allocation). The unit depends on the items, never on the budget,
so a larger budget never gives a larger error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from binq.errors import BinqError

DEFAULT_RESOLUTION = 100_000  # units in the span between the cheapest and the dearest allocation


def solve_exact(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], capacity: int) -> list[int] | None:
    """The option of each item that minimises the summed error with summed cost at most ``capacity``.

    ``costs`` are non-negative integers; ``errors`` finite numbers, one per option. Returns the chosen
    option index per item, or ``None`` when even the cheapest options exceed ``capacity``. Ties go to
    the lower option index at the last item that decides them (deterministic).
    """
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors, strict=True)):
        raise ValueError("every item needs at least one option, with a cost and an error each")
    base = sum(min(c) for c in costs)
    if capacity < base:
        return None
    span = capacity - base
    best = torch.zeros(span + 1, dtype=torch.float64)  # no item yet: error 0 at every budget
    choices = torch.zeros(len(costs), span + 1, dtype=torch.int16)
    for item, (item_costs, item_errors) in enumerate(zip(costs, errors, strict=True)):
        cheapest = min(item_costs)
        candidates = torch.full((len(item_costs), span + 1), math.inf, dtype=torch.float64)
        for option, (cost, error) in enumerate(zip(item_costs, item_errors, strict=True)):
            extra = cost - cheapest
            if extra <= span:
                candidates[option, extra:] = best[: span + 1 - extra] + float(error)
        best, chosen = candidates.min(dim=0)  # the first minimum: the lowest option index on ties
        choices[item] = chosen.to(torch.int16)
    allocation = [0] * len(costs)
    budget = span
    for item in range(len(costs) - 1, -1, -1):
        option = int(choices[item, budget])
        allocation[item] = option
        budget -= costs[item][option] - min(costs[item])
    return allocation


def allocate(
    bits: Sequence[Sequence[int]],
    errors: Sequence[Sequence[float]],
    budget_bits: int,
    resolution: int = DEFAULT_RESOLUTION,
) -> list[int]:
    """One option per item with summed ``bits`` at most ``budget_bits`` and the least summed error.

    Solved by :func:`solve_exact` in units of ``unit = ceil(span / resolution)`` bits, ``span`` being the
    extra bits of the dearest allocation over the cheapest (see the module docstring for what rounding
    costs). Raises :class:`BinqError` when the cheapest allocation already exceeds the budget.
    """
    for item_errors in errors:
        if not all(math.isfinite(e) for e in item_errors):
            raise ValueError("errors must be finite")
    cheapest = [min(item_bits) for item_bits in bits]
    spare = budget_bits - sum(cheapest)
    if spare < 0:
        raise BinqError(f"the budget of {budget_bits} bits is below the cheapest allocation ({sum(cheapest)} bits)")
    span = sum(max(item_bits) - low for item_bits, low in zip(bits, cheapest, strict=True))
    unit = max(1, math.ceil(span / resolution))
    units = [[math.ceil((b - low) / unit) for b in item_bits] for item_bits, low in zip(bits, cheapest, strict=True)]
    allocation = solve_exact(units, errors, spare // unit)
    assert allocation is not None  # the cheapest options cost 0 units
    return allocation
