"""Hessian accumulation for one linear layer's input, reducible across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist


class HessianAccumulator:
    """Accumulates ``sum_t x_t x_t^T`` over calibration tokens; ``hessian()`` is ``2/T`` times that.

    GPTQ's running average weights sequences, not tokens; the two differ only by a constant factor,
    which damping (relative to ``mean(diag H)``) and every error ratio cancel. Keeping the raw sum and
    count makes the statistic an all-reduce away from a multi-process run (:meth:`reduce_`).
    """

    def __init__(self, columns: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def reduce_(self) -> None:
        """Sum the statistics of every process of a ``torch.distributed`` run (no-op otherwise)."""
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([self.tokens], dtype=torch.float64, device=self.sum.device)
            dist.all_reduce(self.sum)
            dist.all_reduce(count)
            self.tokens = int(count.item())

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return self.sum * (2.0 / self.tokens)

    def take_hessian(self) -> torch.Tensor:
        """:meth:`hessian` made in place of the running sum (no second matrix): the accumulator is spent."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        hessian, self.sum = self.sum.mul_(2.0 / self.tokens), None  # type: ignore[assignment]
        return hessian
