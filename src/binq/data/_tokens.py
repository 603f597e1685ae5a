"""Shared helpers: tokenize the GPTQ way and validate the numbers a user passes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from binq.errors import BinqError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def tokenize_once(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a ``[1, T]`` int64 tensor, with the tokenizer's default special tokens.

    This is GPTQ's ``tokenizer(text, return_tensors="pt").input_ids``; the call is kept identical (BOS
    included where the tokenizer adds one) so windows and perplexities match the published protocol.
    """
    from binq.memory import trim_free_memory

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    trim_free_memory()  # the tokenizer's transient buffers are hundreds of MB on a long text
    # An empty text gives a float tensor of shape [1, 0]; ids are always int64 downstream.
    return ids.to(torch.long).reshape(1, -1)


def check_int(value: object, name: str, minimum: int) -> int:
    """Reject non-integers (bool included) and values below ``minimum`` with a clear message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BinqError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
