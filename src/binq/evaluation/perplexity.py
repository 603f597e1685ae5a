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


ROWS = 64  # positions whose logits and log-probabilities are alive at once while a window is scored
HEAD_ROWS = 4096  # vocabulary rows of the head multiplied (and, when stored narrow, widened) at a time


def row_chunks(positions: int) -> list[slice]:
    """The slices of a window's ``positions`` put through the head and scored together: :data:`ROWS` at a
    time, a short tail (under half of :data:`ROWS`) joined to the chunk before it. A chunk is never a
    single row (a matrix product computes one as a matrix-vector product, which rounds differently), and
    a chunk's own chunks are itself, so a window split here and put through :func:`chunked_head` meets
    the same products as the whole window put through it."""
    starts = list(range(0, positions, ROWS))
    if len(starts) > 1 and positions - starts[-1] < ROWS // 2:
        starts.pop()
    ends = [*starts[1:], positions]
    return [slice(start, end) for start, end in zip(starts, ends, strict=True)]


def _head_by_chunks(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` computed :func:`row_chunks` positions by :data:`HEAD_ROWS` vocabulary rows at a
    time, the weight widened to ``hidden``'s type per chunk (exact: widening a float loses nothing)."""
    rows = head.weight.shape[0]
    out = hidden.new_empty(*hidden.shape[:-1], rows)
    for positions in row_chunks(hidden.shape[-2]):
        x = hidden[..., positions, :]
        for start in range(0, rows, HEAD_ROWS):
            end = min(start + HEAD_ROWS, rows)
            bias = None if head.bias is None else head.bias[start:end].to(hidden.dtype)
            out[..., positions, start:end] = F.linear(x, head.weight[start:end].to(hidden.dtype), bias)
    return out


@contextmanager
def chunked_head(model: nn.Module) -> Iterator[bool]:
    """Within the block, the model's output head (a plain linear one) computes its logits by chunks
    (:func:`_head_by_chunks`): the same products for a whole window and for the window cut by
    :func:`row_chunks`, and never a widened copy of a head stored narrow (503 MB for a 49152 x 2560
    head in fp32). Yields whether the head is chunked (a head of another kind is left as it is)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.weight.dim() != 2:
        yield False
        return
    head.forward = lambda hidden: _head_by_chunks(head, hidden)  # type: ignore[method-assign]
    try:
        yield True
    finally:
        del head.forward


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token from ``logits`` ``[1, rows, vocab]``."""
    return F.log_softmax(logits.float(), dim=-1)


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
    with chunked_head(model):
        _score_windows(model, tokens, seqlen, windows, scores, swap, device, progress, protocol.text)
    return scores.result()


def _score_windows(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    windows: int,
    scores: WindowScores,
    swap: WeightSwap | None,
    device: str,
    progress: bool,
    text: str,
) -> None:
    for i in tqdm(range(windows), desc=f"eval {text}", unit="window", disable=not progress):
        x = tokens[:, i * seqlen : (i + 1) * seqlen].to(device)

        def original(x: torch.Tensor = x) -> torch.Tensor:
            assert swap is not None
            with swap.original():
                return model(x, use_cache=False).logits

        scores.add(x, lambda x=x: model(x, use_cache=False).logits, original if swap is not None else None)


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
        """Score window ``x`` (``[1, L]``): ``logits()`` are the model's whole-window logits, ``original()``
        the original's (both alive at once, each scored a chunk of positions at a time)."""
        quantized = logits()
        reference = original() if original is not None else None
        self.add_rows(
            x,
            lambda rows: quantized[:, rows],
            None if reference is None else lambda rows: reference[:, rows],
        )

    def add_rows(
        self,
        x: torch.Tensor,
        logits: Callable[[slice], torch.Tensor],
        original: Callable[[slice], torch.Tensor] | None = None,
    ) -> None:
        """Score window ``x`` (``[1, L]``) from the logits of its positions ``rows``, asked for chunk by
        chunk (:func:`row_chunks` of ``L``): ``logits(rows)`` the model's, ``original(rows)`` the
        original's, each ``[1, rows, vocab]``; the last position, which predicts nothing, is dropped.

        Every position's value is what the whole window's computation gives (row by row), and the means
        are taken over all positions at once, so the numbers are the same while only one chunk of
        logits and log-probabilities per model is alive."""
        length = x.shape[1]
        nll_rows, nll_original_rows, kl_rows = [], [], []
        for rows in row_chunks(length):
            keep = min(rows.stop, length - 1) - rows.start  # positions of the chunk that predict a token
            if keep <= 0:
                continue
            targets = x[:, rows.start + 1 : rows.start + 1 + keep]
            logp = _log_probs(logits(rows)[:, :keep])
            nll_rows.append(_target_nll(logp, targets))
            if original is not None:
                logp_original = _log_probs(original(rows)[:, :keep])
                nll_original_rows.append(_target_nll(logp_original, targets))
                kl_rows.append((logp_original.exp() * (logp_original - logp)).sum(-1))
        self.nll_sum += float(torch.cat(nll_rows, dim=1).mean())
        if original is not None:
            self.with_original = True
            self.nll_original_sum += float(torch.cat(nll_original_rows, dim=1).mean())
            self.kl_sum += float(torch.cat(kl_rows, dim=1).mean())

    def result(self) -> EvalResult:
        result = EvalResult(protocol=self.protocol, ppl=math.exp(self.nll_sum / self.windows))
        if self.with_original:
            result.ppl_original = math.exp(self.nll_original_sum / self.windows)
            result.kl = self.kl_sum / self.windows
        return result
