"""The block compensation step: spread a block's quantization error over the columns not yet quantized.

With ``U`` the upper inverse-Hessian factor and a block ``[s, e)`` quantized to ``Q_b``, the OBS-optimal
error is ``E = (W_b - Q_b) U_bb^-1`` (a triangular solve; exactly what GPTQ's column loop produces when
``Q_b`` is fixed up front) and the rest of the matrix moves by ``W[:, e:] -= E U[s:e, e:]``. BiLLM and
ARB use the diagonal approximation ``E = (W_b - Q_b) / diag(U_bb)``, as BiLLM's reference implementation does.
"""

from __future__ import annotations

import torch


def block_error(
    block_weight: torch.Tensor, block_quantized: torch.Tensor, block_factor: torch.Tensor, exact: bool = False
) -> torch.Tensor:
    """The scaled error of one block: diagonal (BiLLM's) or exact (triangular solve)."""
    residual = block_weight - block_quantized
    if exact:
        return torch.linalg.solve_triangular(block_factor, residual, upper=True, left=False)
    return residual / torch.diagonal(block_factor).unsqueeze(0)


def propagate_block_error(
    weight: torch.Tensor, error: torch.Tensor, factor: torch.Tensor, start: int, end: int
) -> None:
    """In place: ``W[:, end:] -= E @ U[start:end, end:]``."""
    if end < weight.shape[1]:
        weight[:, end:] -= error @ factor[start:end, end:]


def compensated_metric(block_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, S)`` with ``L = U_bb^-1`` and ``S = L L^T``: once the later columns compensate (exactly),
    fixing the block at ``Q_b`` costs ``||(W_b - Q_b) L||_F^2 = Tr(R S R^T)`` (GPTQ's identity).
    ``S`` is the inverse of ``[(H + lambda I)^-1]_bb``, the metric a block's own error is really paid in."""
    eye = torch.eye(block_factor.shape[0], dtype=block_factor.dtype, device=block_factor.device)
    inverse = torch.linalg.solve_triangular(block_factor, eye, upper=True)
    return inverse, inverse @ inverse.T
