"""Evaluation token streams built exactly as the GPTQ perplexity protocol builds them.

Perplexities are only comparable when the text, its join and its truncation match, so each Hub set is
loaded the way IST-DASLab/gptq does it (``wikitext2``/``ptb`` test splits, the "new" C4 evaluation), and
:func:`describe_eval` names the protocol so reports can state it. The caller cuts the stream into
``T // seqlen`` non-overlapping windows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from binq.data import hub
from binq.data._tokens import check_int, tokenize_once
from binq.data.corpora import AUSTEN_ORDER, is_builtin, load_text
from binq.errors import BinqError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["C4_EVAL_DOCUMENTS", "C4_EVAL_WINDOWS", "describe_eval", "evaluation_tokens"]

logger = logging.getLogger(__name__)

#: GPTQ's "new" C4 evaluation: the first 1100 validation documents, cut to 256 windows of seqlen.
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256

_HUB_DESCRIPTIONS = {
    "wikitext2": "wikitext2 test (wikitext-2-raw-v1), joined with '\\n\\n', GPTQ protocol",
    "ptb": "ptb test (ptb_text_only/penn_treebank), sentences joined with ' ', GPTQ protocol",
    "c4": (
        f"c4 validation ({hub.C4_VALIDATION_FILE}), first {C4_EVAL_DOCUMENTS} documents joined with ' ', "
        f"truncated to {C4_EVAL_WINDOWS} x seqlen tokens, GPTQ 'new' C4 protocol"
    ),
}

_BUILTIN_DESCRIPTIONS = {
    "austen": f"austen (built-in: {', '.join(AUSTEN_ORDER)} joined with '\\n\\n'), tokenized once",
    "persuasion": "persuasion (built-in: Jane Austen's Persuasion), whole text tokenized once",
    "brit1911": "brit1911 (built-in: Britannica 1911 'Shakespeare, William'), whole text tokenized once",
}


def describe_eval(name: str) -> str:
    """One line naming the evaluation protocol for ``name``, for reports and logs."""
    if name in _HUB_DESCRIPTIONS:
        return _HUB_DESCRIPTIONS[name]
    if name in _BUILTIN_DESCRIPTIONS:
        return _BUILTIN_DESCRIPTIONS[name]
    if is_builtin(name):
        return f"{name} (built-in Jane Austen novel), whole text tokenized once"
    if Path(name).expanduser().is_file():
        return f"file {name}, whole text tokenized once"
    load_text(name)  # raises the standard "unknown text" error
    raise AssertionError("unreachable")  # pragma: no cover


def evaluation_tokens(
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    seqlen: int,
    *,
    loader: hub.Loader | None = None,
) -> torch.LongTensor:
    """Return the evaluation text ``name`` tokenized once, as a ``[1, T]`` tensor.

    ``name`` is a Hub set (``wikitext2``, ``ptb``, ``c4``), a built-in text or a path to a UTF-8 file.
    ``seqlen`` sets C4's truncation (256 x seqlen tokens) and the minimum length: a stream shorter than
    one window cannot give a perplexity, so it is an error. ``loader`` replaces ``datasets.load_dataset``.
    """
    check_int(seqlen, "seqlen", 2)
    if name == "wikitext2":
        ids = tokenize_once(tokenizer, hub.wikitext2_text("test", loader))
    elif name == "ptb":
        ids = tokenize_once(tokenizer, hub.ptb_text("test", loader))
    elif name == "c4":
        docs = hub.c4_documents("validation", loader)
        ids = tokenize_once(tokenizer, " ".join(docs[:C4_EVAL_DOCUMENTS]))
        ids = ids[:, : C4_EVAL_WINDOWS * seqlen]
    else:
        ids = tokenize_once(tokenizer, load_text(name))
    if ids.shape[1] < seqlen:
        raise BinqError(f"evaluation text {name!r} has {ids.shape[1]} tokens, fewer than one window of seqlen={seqlen}")
    logger.info("evaluation: %s -> %d tokens (%d windows of %d)", name, ids.shape[1], ids.shape[1] // seqlen, seqlen)
    return ids  # type: ignore[return-value]
