"""Perplexity by the GPTQ protocol, and KL divergence from the original model on the same windows.

Protocol: GPTQ's (Frantar et al., ICLR 2023: WikiText-2's test split joined with blank lines, windows
of 2048 tokens), which BiLLM evaluates with too. One joined text tokenized once, cut into
non-overlapping windows of ``seqlen`` tokens (the tail dropped), shifted cross-entropy per window,
``PPL = exp(mean over windows of the window's mean NLL)`` (every window has ``seqlen - 1`` targets, so
this is the token average, the same number as GPTQ's ``exp(sum of loss * seqlen / (windows * seqlen))``).
``max_windows`` keeps the first windows only (the quick protocol).

KL is ``KL(P_original || P_quantized)`` of the next-token distributions, averaged over the same
predicted positions. The original model is not kept twice in memory: :class:`WeightSwap` swaps the
original weights of the quantized linears in and out around each window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from binq.errors import BinqError


class WeightSwap:
    """Holds the original weights of some linears, to evaluate the original model on demand."""

    def __init__(self, originals: dict[nn.Module, torch.Tensor]):
        self.originals = originals

    @contextmanager
    def original(self) -> Iterator[None]:
        saved = {}
        for module, weight in self.originals.items():
            saved[module] = module.weight.data
            module.weight.data = weight.to(module.weight.device, module.weight.dtype)
        try:
            yield
        finally:
            for module, weight in saved.items():
                module.weight.data = weight


@dataclass
class Protocol:
    text: str
    description: str
    tokenizer: str
    seqlen: int
    windows: int
    windows_available: int
    tokens: int

    def summary(self) -> str:
        return (
            f"{self.text}: {self.windows} x {self.seqlen} tokens"
            f" (of {self.windows_available} windows), tokenizer {self.tokenizer}"
        )


@dataclass
class EvalResult:
    protocol: Protocol
    ppl: float
    ppl_original: float | None = None
    kl: float | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "protocol": asdict(self.protocol)}


ROWS = 64  # positions whose log-probabilities are alive at once while a window is scored


def _log_probs(logits: torch.Tensor, rows: slice) -> torch.Tensor:
    """Log-probabilities of the next token at positions ``rows`` (of the ``L - 1`` that predict one)."""
    return F.log_softmax(logits[:, rows].float(), dim=-1)


def _target_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each position's negative log-likelihood of its target, ``[1, rows]``."""
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    protocol: Protocol,
    max_windows: int | None = None,
    swap: WeightSwap | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` (and, with ``swap``, the original model and the KL) on ``tokens`` ``[1, T]``."""
    windows = check_windows(tokens, seqlen, protocol, max_windows)
    scores = WindowScores(protocol, windows)
    for i in tqdm(range(windows), desc=f"eval {protocol.text}", unit="window", disable=not progress):
        x = tokens[:, i * seqlen : (i + 1) * seqlen].to(device)

        def original(x: torch.Tensor = x) -> torch.Tensor:
            assert swap is not None
            with swap.original():
                return model(x, use_cache=False).logits

        scores.add(x, lambda x=x: model(x, use_cache=False).logits, original if swap is not None else None)
    return scores.result()


def check_windows(tokens: torch.Tensor, seqlen: int, protocol: Protocol, max_windows: int | None) -> int:
    """The number of windows of ``seqlen`` evaluated on ``tokens`` ``[1, T]`` (recorded in ``protocol``)."""
    available = tokens.shape[1] // seqlen
    if available < 1:
        raise BinqError(f"{protocol.text}: {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    windows = available if max_windows is None else min(max_windows, available)
    protocol.windows, protocol.windows_available, protocol.tokens = windows, available, tokens.shape[1]
    return windows


class WindowScores:
    """The running sums of one evaluation: NLL per window, and with the original's logits its NLL and the KL."""

    def __init__(self, protocol: Protocol, windows: int) -> None:
        self.protocol, self.windows = protocol, windows
        self.nll_sum = self.nll_original_sum = self.kl_sum = 0.0
        self.with_original = False

    def add(
        self,
        x: torch.Tensor,
        logits: Callable[[], torch.Tensor],
        original: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        """Score window ``x`` (``[1, L]``): ``logits()`` are the model's, ``original()`` the original's.

        The log-probabilities are computed :data:`ROWS` positions at a time: every position's value is
        what the whole window's computation gives (row by row), and the means are taken over all
        positions at once, so the numbers are the same while only the two sets of logits and one slice
        of log-probabilities are ever alive."""
        quantized = logits()
        reference = original() if original is not None else None
        targets = x[:, 1:]
        nll_rows, nll_original_rows, kl_rows = [], [], []
        for start in range(0, targets.shape[1], ROWS):
            rows = slice(start, min(start + ROWS, targets.shape[1]))
            logp = _log_probs(quantized, rows)
            nll_rows.append(_target_nll(logp, targets[:, rows]))
            if reference is not None:
                logp_original = _log_probs(reference, rows)
                nll_original_rows.append(_target_nll(logp_original, targets[:, rows]))
                kl_rows.append((logp_original.exp() * (logp_original - logp)).sum(-1))
        self.nll_sum += float(torch.cat(nll_rows, dim=1).mean())
        if reference is not None:
            self.with_original = True
            self.nll_original_sum += float(torch.cat(nll_original_rows, dim=1).mean())
            self.kl_sum += float(torch.cat(kl_rows, dim=1).mean())

    def result(self) -> EvalResult:
        result = EvalResult(protocol=self.protocol, ppl=math.exp(self.nll_sum / self.windows))
        if self.with_original:
            result.ppl_original = math.exp(self.nll_original_sum / self.windows)
            result.kl = self.kl_sum / self.windows
        return result
