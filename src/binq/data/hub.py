"""Thin wrappers around ``datasets.load_dataset`` for the GPTQ-family sets (WikiText-2, PTB, C4).

They exist so that results are comparable with published GPTQ / BiLLM / ARB-LLM numbers, which use exactly
these dataset names, splits, shards and joins (IST-DASLab/gptq ``datautils.py``). ``datasets`` is an
optional dependency (``pip install 'binq[hub]'``) and the Hub may be unreachable, so it is imported
lazily and every failure becomes a one-line :class:`~binq.errors.BinqError` that points at the built-in
texts instead.

Every function takes ``loader``: a callable with ``datasets.load_dataset``'s signature. ``None`` means the
real one; tests pass a fake returning rows in the same shape (a sequence of ``{"text": ...}`` /
``{"sentence": ...}`` dicts, or a ``datasets.Dataset``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from binq.errors import BinqError

__all__ = [
    "C4_TRAIN_FILE",
    "C4_VALIDATION_FILE",
    "HUB_SETS",
    "Loader",
    "c4_documents",
    "ptb_text",
    "wikitext2_text",
]

logger = logging.getLogger(__name__)

Loader = Callable[..., Any]

#: Names of the Hub sets, as accepted by ``calibration_windows`` and ``evaluation_tokens``.
HUB_SETS: tuple[str, ...] = ("wikitext2", "ptb", "c4")

#: The single C4 shards GPTQ uses (train for calibration, validation for the "new" C4 evaluation).
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"

_FALLBACK = "or use a built-in source such as 'austen', 'brit1911' or 'persuasion'"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text[:limit]}"


def _load(what: str, loader: Loader | None, *args: Any, **kwargs: Any) -> Any:
    """Call ``loader`` (default ``datasets.load_dataset``), turning any failure into a BinqError."""
    if loader is None:
        try:
            from datasets import load_dataset
        except ImportError as exc:
            raise BinqError(
                f"{what} needs the optional 'datasets' package: pip install datasets "
                f"(or pip install 'binq[hub]'), {_FALLBACK}"
            ) from exc
        loader = load_dataset
    logger.info("loading %s with datasets.load_dataset%r", what, (*args, kwargs))
    try:
        return loader(*args, **kwargs)
    except BinqError:
        raise
    except Exception as exc:  # network, missing dataset, offline mode, script datasets: all user-fixable
        raise BinqError(
            f"could not load {what} from the Hugging Face Hub ({_one_line(exc)}); "
            f"check the network or the datasets cache, {_FALLBACK}"
        ) from exc


def _column(rows: Any, field: str, what: str) -> list[str]:
    """Read one text column from a ``datasets.Dataset``, a mapping of columns, or a sequence of rows."""
    try:
        if isinstance(rows, Mapping) or hasattr(rows, "column_names"):
            return list(rows[field])
        return [row[field] for row in rows]
    except (KeyError, TypeError) as exc:
        raise BinqError(f"{what} has no {field!r} field; is it the right dataset?") from exc


class _Documents(Sequence[str]):
    """Lazy view of one text column: C4's train shard has ~356k documents and GPTQ reads only a few."""

    def __init__(self, rows: Any, field: str, what: str) -> None:
        self._rows, self._field, self._what = rows, field, what

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        try:
            return self._rows[index][self._field]
        except (KeyError, TypeError) as exc:
            raise BinqError(f"{self._what} has no {self._field!r} field; is it the right dataset?") from exc


def _check_split(split: str, allowed: tuple[str, ...], what: str) -> None:
    if split not in allowed:
        raise BinqError(f"{what} split must be one of {', '.join(allowed)}, not {split!r}")


def wikitext2_text(split: str, loader: Loader | None = None) -> str:
    """WikiText-2 (raw) ``split`` joined with ``"\\n\\n"``, as GPTQ does for both train and test."""
    _check_split(split, ("train", "validation", "test"), "wikitext2")
    what = f"wikitext2 ({split})"
    rows = _load(what, loader, "wikitext", "wikitext-2-raw-v1", split=split)
    return "\n\n".join(_column(rows, "text", what))


def ptb_text(split: str, loader: Loader | None = None) -> str:
    """Penn Treebank (``ptb_text_only``) sentences of ``split`` joined with ``" "``, as GPTQ does."""
    _check_split(split, ("train", "validation", "test"), "ptb")
    what = f"ptb ({split})"
    rows = _load(what, loader, "ptb_text_only", "penn_treebank", split=split)
    return " ".join(_column(rows, "sentence", what))


def c4_documents(split: str, loader: Loader | None = None) -> Sequence[str]:
    """Documents of GPTQ's single C4 shard for ``split`` (``train`` or ``validation``), read lazily."""
    _check_split(split, ("train", "validation"), "c4")
    shard = C4_TRAIN_FILE if split == "train" else C4_VALIDATION_FILE
    what = f"c4 ({shard})"
    rows = _load(what, loader, "allenai/c4", data_files={split: shard}, split=split)
    return _Documents(rows, "text", what)
