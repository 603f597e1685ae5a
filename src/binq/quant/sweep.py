"""The two loops of Hessian error compensation, written once: GPTQ's column sweep and the block sweep.

Both walk the columns of a working weight ``W`` (rows, cols) with ``U = chol_upper((H + lambda I)^-1)``
(:func:`binq.quant.hessian.prepare_weight`) and leave what a weight is rounded to to a callback:

- :func:`sweep_columns`, GPTQ's loop (Frantar et al., ICLR 2023): column ``j`` is rounded on its
  error-updated value, its scaled error ``e_j = (w_j - q_j) / U_jj`` moves the later columns of its lazy
  batch at once (``W[:, j:] -= e_j U[j, j:]``), and the batch's errors move every column after it in
  one product (GPTQ's lazy-batch update ``W[:, end:] -= E U[start:end, end:]``). Used by GPTQ,
  msb-hessian, W(1+1) and ARB's re-signing of a block's columns.
- :func:`sweep_blocks`, BiLLM's loop (Huang et al., ICML 2024): each block of columns is fitted as a
  whole on its current weights, then its error (:func:`~binq.quant.compensation.block_error`, diagonal
  or exact) moves the columns after it. Used by BiLLM, ARB and arb-group.

Floating point: each update is one fixed sequence of tensor operations, so every method that goes
through here rounds exactly as its own loop did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from binq.quant.compensation import block_error, propagate_block_error

# ``quantize_column(j, column)``: what column ``j`` (its current, error-updated values) is rounded to.
ColumnQuantizer = Callable[[int, torch.Tensor], torch.Tensor]
# ``fit_group(j, current)``: fit what the group starting at column ``j`` is rounded with.
GroupFitter = Callable[[int, torch.Tensor], None]


def column_blocks(cols: int, block_size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of consecutive blocks of ``block_size`` columns; the last may be ragged."""
    return [(start, min(start + block_size, cols)) for start in range(0, cols, block_size)]


def sweep_columns(
    weight: torch.Tensor,
    factor: torch.Tensor,
    quantize_column: ColumnQuantizer,
    lazy_block: int | None = None,
    group_size: int = 0,
    fit_group: GroupFitter | None = None,
) -> None:
    """GPTQ's column loop over ``weight`` with the upper factor ``factor`` (``U``).

    ``quantize_column(j, column)`` gets column ``j`` as the earlier columns' errors left it and returns
    what it is rounded to; it may record codes or signs itself. With ``fit_group``, the sweep first calls
    ``fit_group(j, current)`` at every ``j`` that is a multiple of ``group_size``, ``current`` being the
    columns ``[j, j + group_size)`` as they stand then (GPTQ re-fits a group's grid there).

    In place: the columns after each lazy batch of ``lazy_block`` columns take that batch's error. A
    batch's own columns are swept on a copy and keep their values, so with the default (one batch of
    all columns) ``weight`` is not changed at all.
    """
    cols = weight.shape[1]
    for start, end in column_blocks(cols, lazy_block or max(cols, 1)):
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        block_factor = factor[start:end, start:end]
        for i in range(end - start):
            j = start + i
            if fit_group is not None and j % group_size == 0:
                fit_group(j, _current_columns(weight, factor, block, errors, start, j, group_size))
            column = block[:, i]
            quantized = quantize_column(j, column)
            error = (column - quantized) / block_factor[i, i]
            block[:, i:] -= error.unsqueeze(1) * block_factor[i, i:].unsqueeze(0)
            errors[:, i] = error
        propagate_block_error(weight, errors, factor, start, end)


def _current_columns(
    weight: torch.Tensor,
    factor: torch.Tensor,
    block: torch.Tensor,
    errors: torch.Tensor,
    start: int,
    j: int,
    width: int,
) -> torch.Tensor:
    """Columns ``[j, j + width)`` before column ``j`` is rounded: inside the batch the sweep's copy; past
    it the columns have not had this batch's update yet, so it is applied to them here."""
    i = j - start
    end = start + block.shape[1]
    group_end = min(j + width, weight.shape[1])
    current = block[:, i : i + width]
    if group_end > end:
        past = weight[:, end:group_end] - errors[:, :i] @ factor[start:j, end:group_end]
        current = torch.cat([current, past], dim=1)
    return current


@dataclass(frozen=True)
class Block:
    """One block of columns as :func:`sweep_blocks` hands it to the fit."""

    index: int
    start: int
    end: int
    weight: torch.Tensor  # (rows, end - start): a view of the current weights, not to be written
    factor: torch.Tensor  # U[start:end, start:end]

    @property
    def columns(self) -> slice:
        return slice(self.start, self.end)


# ``fit_block(block)``: the block's quantized value (rows, end - start); it records what it stores itself.
BlockFitter = Callable[[Block], torch.Tensor]


def sweep_blocks(
    weight: torch.Tensor, factor: torch.Tensor, block_size: int, fit_block: BlockFitter, exact: bool = False
) -> None:
    """BiLLM's block loop: fit each block of ``block_size`` columns with ``fit_block`` on its current
    weights, then spread its error over the later columns (in place): BiLLM's diagonal error, or with
    ``exact`` the triangular solve that GPTQ's column loop would produce for the same quantized block."""
    for index, (start, end) in enumerate(column_blocks(weight.shape[1], block_size)):
        block = Block(index, start, end, weight[:, start:end], factor[start:end, start:end])
        error = block_error(block.weight, fit_block(block), block.factor, exact=exact)
        propagate_block_error(weight, error, factor, start, end)
