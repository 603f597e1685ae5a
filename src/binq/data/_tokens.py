"""Shared helpers: tokenize the GPTQ way and validate the numbers a user passes."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from binq.errors import BinqError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


CHUNK_CHARS = 1 << 18  # a long text is tokenized about this many characters at a time
_CONTEXT = 512  # characters either side of a split that the tokenizer must cut there by itself


def tokenize_once(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a ``[1, T]`` int64 tensor, with the tokenizer's default special tokens.

    The ids are those of ``tokenizer(text, return_tensors="pt").input_ids`` (BOS included where the
    tokenizer adds one), so windows and perplexities match the GPTQ-style protocol. A long text is
    tokenized a chunk at a time (:func:`safe_splits`): one call on five novels holds hundreds of MB
    of the tokenizer's buffers for a moment, a chunk a few tens.
    """
    from binq.memory import trim_free_memory

    long_text = len(text) > 2 * CHUNK_CHARS and getattr(tokenizer, "is_fast", False)
    affixes = _special_affixes(tokenizer) if long_text else None
    splits = safe_splits(tokenizer, text) if affixes is not None else []
    if not splits:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    else:
        prefix, suffix = affixes  # type: ignore[misc]
        bounds = [0, *splits, len(text)]
        parts = [torch.tensor(prefix, dtype=torch.long)]
        for start, end in itertools.pairwise(bounds):
            parts.append(torch.tensor(_plain_ids(tokenizer, text[start:end]), dtype=torch.long))
            trim_free_memory()
        parts.append(torch.tensor(suffix, dtype=torch.long))
        ids = torch.cat(parts)
    trim_free_memory()  # the tokenizer's transient buffers are hundreds of MB on a long text
    # An empty text gives a float tensor of shape [1, 0]; ids are always int64 downstream.
    return ids.to(torch.long).reshape(1, -1)


def safe_splits(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Positions, about :data:`CHUNK_CHARS` apart, where ``text`` can be cut without changing its ids.

    A candidate is the start of a line. It is taken only if the tokenizer cuts there by itself:
    the ids of the :data:`_CONTEXT` characters either side, tokenized together, are the ids of each
    side tokenized alone. Byte-level BPE tokenizers (GPT-2, LLaMA-3, Qwen, SmolLM) cut at most line
    starts; a tokenizer that marks the start of a text (SentencePiece's leading space) never passes,
    and its text is tokenized whole.
    """
    splits: list[int] = []
    target = CHUNK_CHARS
    while target < len(text) - CHUNK_CHARS:
        split = _split_near(tokenizer, text, target, min(len(text) - _CONTEXT, target + CHUNK_CHARS // 2))
        if split is None:
            break
        splits.append(split)
        target = split + CHUNK_CHARS
    return splits


def _split_near(tokenizer: PreTrainedTokenizerBase, text: str, start: int, stop: int) -> int | None:
    for _ in range(16):  # the first few line starts after ``start``
        newline = text.find("\n", start, stop)
        if newline < 0:
            return None
        split = newline + 1
        left, right = text[max(0, split - _CONTEXT) : split], text[split : split + _CONTEXT]
        if (
            left
            and right
            and _plain_ids(tokenizer, left + right) == _plain_ids(tokenizer, left) + _plain_ids(tokenizer, right)
        ):
            return split
        start = split
    return None


def _plain_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer adds before and after a text's own, or None if they are not just that."""
    probe = "The probe.\nA second line."
    full, plain = list(tokenizer(probe)["input_ids"]), _plain_ids(tokenizer, probe)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain) :]
            other = "Another text."
            if list(tokenizer(other)["input_ids"]) == prefix + _plain_ids(tokenizer, other) + suffix:
                return prefix, suffix
            return None
    return None


def check_int(value: object, name: str, minimum: int) -> int:
    """Reject non-integers (bool included) and values below ``minimum`` with a clear message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BinqError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
