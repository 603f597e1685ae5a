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
from collections.abc import Iterator
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


def _window_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, targets[:, 1:].unsqueeze(-1)).squeeze(-1).mean()
    return nll, logp


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
    available = tokens.shape[1] // seqlen
    if available < 1:
        raise BinqError(f"{protocol.text}: {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    windows = available if max_windows is None else min(max_windows, available)
    protocol.windows, protocol.windows_available, protocol.tokens = windows, available, tokens.shape[1]
    nll_sum = nll_original_sum = kl_sum = 0.0
    for i in tqdm(range(windows), desc=f"eval {protocol.text}", unit="window", disable=not progress):
        x = tokens[:, i * seqlen : (i + 1) * seqlen].to(device)
        nll, logp = _window_stats(model(x, use_cache=False).logits, x)
        nll_sum += float(nll)
        if swap is not None:
            with swap.original():
                nll_original, logp_original = _window_stats(model(x, use_cache=False).logits, x)
            nll_original_sum += float(nll_original)
            kl = (logp_original.exp() * (logp_original - logp)).sum(-1).mean()
            kl_sum += float(kl)
            del logp_original
        del logp
    result = EvalResult(protocol=protocol, ppl=math.exp(nll_sum / windows))
    if swap is not None:
        result.ppl_original = math.exp(nll_original_sum / windows)
        result.kl = kl_sum / windows
    return result
