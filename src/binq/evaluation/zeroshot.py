"""Zero-shot accuracy by log-likelihood, computed the way lm-evaluation-harness's HF model computes it.

Every task is a list of ``(context, continuation)`` requests, each scored by one forward pass:

- the pair is encoded as lm-eval encodes it (:func:`encode_pair`): trailing spaces of the context move
  to the continuation, ``context + continuation`` is tokenized whole (the tokenizer's default special
  tokens) and the continuation's tokens are what follows the context's own tokens;
- the input is ``(context + continuation)[-(max_length + 1):][:-1]``, cut from the left when too long,
  ``max_length`` being the model's positions (:func:`max_length`);
- the continuation's log-likelihood is the sum of its tokens' log-probabilities, and it is *greedy* when
  each of its tokens is the argmax at its position (so greedy decoding would write it).

Batches are right-padded (with id 0, as lm-eval does): a causal model's logits at the real positions do
not see the padding. Metrics (:func:`score_task`) follow lm-eval's: ``acc`` for a ``loglikelihood`` task
(LAMBADA) is the share of greedy targets; for a multiple-choice task, ``acc`` takes the choice of largest
log-likelihood, ``acc_norm`` the largest log-likelihood per character of the choice. Standard errors are
lm-eval's ``mean_stderr`` of the 0/1 scores, ``sqrt(p (1 - p) / (n - 1))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from binq.data.zeroshot import LastWordItem, NextSentenceItem, TaskItems, check_task_names
from binq.errors import BinqError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ContinuationScore",
    "TaskResult",
    "ZeroShotConfig",
    "binomial_stderr",
    "encode_pair",
    "max_length",
    "score_continuations",
    "score_task",
]

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for a model whose config and tokenizer name no length
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


@dataclass
class ZeroShotConfig:
    """Which tasks ``binq eval --tasks`` runs, on how many items (the first ``limit``, or all), and how many
    requests go through the model at once."""

    tasks: tuple[str, ...] = ()
    limit: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.tasks = tuple(check_task_names(",".join(self.tasks))) if self.tasks else ()
        if self.limit is not None and self.limit < 1:
            raise BinqError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise BinqError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class ContinuationScore:
    """One request's result: the continuation's log-likelihood (nats), whether it is the greedy one, and
    its number of tokens."""

    loglik: float
    greedy: bool
    tokens: int


@dataclass
class TaskResult:
    """One task's metrics (``report.json``'s ``tasks[name]``) and the score of every request, item by item."""

    task: TaskItems
    metrics: dict[str, Any]
    scores: list[list[ContinuationScore]]

    def to_dict(self) -> dict[str, Any]:
        return {**self.task.describe(), **self.metrics}


def binomial_stderr(p: float, n: int) -> float | None:
    """Standard error of a share ``p`` of ``n`` 0/1 scores, as lm-eval reports it (``None`` for ``n < 2``)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def max_length(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input, as lm-eval's HF model resolves it: the config's ``n_positions``,
    ``max_position_embeddings`` or ``n_ctx`` (its ``text_config``'s first), then the tokenizer's
    ``model_max_length``, then 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attribute, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != _TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The context's and the continuation's token ids, split as lm-eval splits them (module docstring)."""
    if not context:
        raise BinqError("a zero-shot request needs a non-empty context")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer.encode(context + continuation))
    context_ids = list(tokenizer.encode(context))
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids:
        raise BinqError(f"the continuation {continuation!r} encodes to no token after its context")
    return context_ids, continuation_ids


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "requests",
) -> list[ContinuationScore]:
    """The score of each ``(context, continuation)`` request, in the order given (module docstring)."""
    limit = max_length(model, tokenizer)
    inputs, targets = [], []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if len(continuation_ids) > limit:
            raise BinqError(f"a continuation of {len(continuation_ids)} tokens is longer than the model's {limit}")
        inputs.append((context_ids + continuation_ids)[-(limit + 1) :][:-1])
        targets.append(continuation_ids)
    # Longest first, as lm-eval orders them: batches of similar lengths, little padding.
    order = sorted(range(len(inputs)), key=lambda k: -len(inputs[k]))
    scores: list[ContinuationScore | None] = [None] * len(inputs)
    bar = tqdm(total=len(inputs), desc=desc, unit="request", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(inputs[k]) for k in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, k in enumerate(batch):
            ids[row, : len(inputs[k])] = torch.tensor(inputs[k])
        logits = model(ids.to(device), use_cache=False).logits
        for row, k in enumerate(batch):
            end, count = len(inputs[k]), len(targets[k])
            logp = F.log_softmax(logits[row, end - count : end].float(), dim=-1)
            target = torch.tensor(targets[k], device=logp.device)
            loglik = float(logp.gather(-1, target.unsqueeze(-1)).sum())
            scores[k] = ContinuationScore(loglik, bool((logp.argmax(-1) == target).all()), count)
        bar.update(len(batch))
    bar.close()
    return scores  # type: ignore[return-value]


def score_task(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskItems,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
) -> TaskResult:
    """Run every item of ``task`` through ``model`` and compute the task's metrics."""
    items = task.items
    if all(isinstance(item, LastWordItem) for item in items):
        requests = [(item.context, " " + item.target) for item in items]
        per_item = 1
    elif all(isinstance(item, NextSentenceItem) for item in items):
        requests = [(item.context, " " + choice) for item in items for choice in item.choices]
        per_item = len(items[0].choices) if items else 0
        if any(len(item.choices) != per_item for item in items):
            raise BinqError(f"{task.spec.name}: items with different numbers of choices")
    else:
        raise BinqError(f"{task.spec.name}: items of mixed or unknown kinds")
    flat = score_continuations(
        model, tokenizer, requests, batch_size=batch_size, device=device, progress=progress, desc=task.spec.name
    )
    scores = [flat[k : k + per_item] for k in range(0, len(flat), per_item)]
    if per_item == 1:
        metrics = _lastword_metrics([s[0] for s in scores])
    else:
        metrics = _choice_metrics(items, scores)  # type: ignore[arg-type]
    return TaskResult(task, {**metrics, "batch_size": batch_size, "max_length": max_length(model, tokenizer)}, scores)


def _share(hits: list[bool], name: str) -> dict[str, Any]:
    p = sum(hits) / len(hits)
    return {name: p, f"{name}_stderr": binomial_stderr(p, len(hits))}


def _lastword_metrics(scores: list[ContinuationScore]) -> dict[str, Any]:
    """``acc`` (greedy targets), the targets' mean log-likelihood and lm-eval's ``perplexity`` of it."""
    mean_loglik = sum(s.loglik for s in scores) / len(scores)
    return {
        **_share([s.greedy for s in scores], "acc"),
        "target_loglik_mean": mean_loglik,
        "target_tokens_mean": sum(s.tokens for s in scores) / len(scores),
        "perplexity": math.exp(-mean_loglik),
    }


def _choice_metrics(items: Sequence[NextSentenceItem], scores: list[list[ContinuationScore]]) -> dict[str, Any]:
    """``acc`` and ``acc_norm`` (log-likelihood per character of the choice, lm-eval's), first maximum wins."""
    hits, hits_norm = [], []
    for item, item_scores in zip(items, scores, strict=True):
        logliks = [s.loglik for s in item_scores]
        per_char = [ll / len(choice) for ll, choice in zip(logliks, item.choices, strict=True)]
        hits.append(_argmax(logliks) == item.label)
        hits_norm.append(_argmax(per_char) == item.label)
    return {**_share(hits, "acc"), **_share(hits_norm, "acc_norm"), "choices": len(items[0].choices)}


def _argmax(values: Sequence[float]) -> int:
    """The index of the first largest value (``numpy.argmax``'s tie rule, which lm-eval relies on)."""
    return max(range(len(values)), key=lambda k: (values[k], -k))
