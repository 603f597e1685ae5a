"""Calibration windows drawn exactly as GPTQ draws them, so seeds reproduce the reference code.

GPTQ (IST-DASLab/gptq ``datautils.py``, copied by BiLLM and ARB-LLM) tokenizes a source once and takes
``nsamples`` random windows after one ``random.seed(seed)``. binq makes the same calls on a private
``random.Random(seed)``, which yields the same numbers without touching the global random state.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from binq.data import hub
from binq.data._tokens import check_int, tokenize_once
from binq.data.corpora import load_text
from binq.errors import BinqError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["calibration_windows"]

logger = logging.getLogger(__name__)


def _random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """GPTQ's sampler for a joined text: ``i = randint(0, T - seqlen - 1)``, window ``ids[i:i+seqlen]``."""
    total = ids.shape[1]
    if total <= seqlen:
        raise BinqError(
            f"calibration source {source!r} has {total} tokens; windows of {seqlen} tokens need at least "
            f"{seqlen + 1}: use a longer text or a smaller seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[0, i : i + seqlen] for i in starts])


def _c4_windows(
    tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """GPTQ's C4 sampler: draw random documents until one is longer than ``seqlen``, then a random window.

    GPTQ loops forever when no document is long enough; here documents already found too short are
    remembered (the random calls stay the same), and once every document has been rejected it stops
    with an error.
    """
    if len(docs) == 0:
        raise BinqError("calibration source 'c4' has no documents")
    rng = random.Random(seed)
    too_short: set[int] = set()
    longest = 0
    windows = []
    for _ in range(nsamples):
        while True:
            d = rng.randint(0, len(docs) - 1)
            if d in too_short:
                continue
            ids = tokenize_once(tokenizer, docs[d])
            if ids.shape[1] > seqlen:
                break
            too_short.add(d)
            longest = max(longest, ids.shape[1])
            if len(too_short) == len(docs):
                raise BinqError(
                    f"calibration source 'c4': no document is longer than seqlen={seqlen} tokens "
                    f"(longest has {longest}); use a smaller seqlen"
                )
        i = rng.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[0, i : i + seqlen])
    return torch.stack(windows)


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    *,
    loader: hub.Loader | None = None,
) -> torch.LongTensor:
    """Return ``nsamples`` random ``seqlen``-token windows of ``source`` as a ``[nsamples, seqlen]`` tensor.

    ``source`` is a Hub set (``c4``: GPTQ's train shard with rejection sampling; ``wikitext2``: train split
    joined with ``"\\n\\n"``; ``ptb``: train sentences joined with ``" "``), a built-in text name
    (``austen`` is the intended default) or a path to a UTF-8 file. Hub names win over files of the same
    name. ``loader`` replaces ``datasets.load_dataset`` (tests, local mirrors).
    """
    check_int(nsamples, "nsamples", 1)
    check_int(seqlen, "seqlen", 2)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BinqError(f"seed must be an integer, got {seed!r}")
    if source == "c4":
        windows = _c4_windows(tokenizer, hub.c4_documents("train", loader), nsamples, seqlen, seed)
    else:
        if source == "wikitext2":
            text = hub.wikitext2_text("train", loader)
        elif source == "ptb":
            text = hub.ptb_text("train", loader)
        else:
            text = load_text(source)
        windows = _random_windows(tokenize_once(tokenizer, text), nsamples, seqlen, seed, source)
    logger.info("calibration: %d windows of %d tokens from %s (seed %d)", nsamples, seqlen, source, seed)
    return windows  # type: ignore[return-value]
