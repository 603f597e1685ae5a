"""The items of binq's offline zero-shot tasks, built deterministically from the held-out built-in texts.

Two tasks, each a list of items made by a pure function of a text, a seed and a few documented numbers
(no model, no tokenizer: every model sees the same items, whose sha256 the report records):

- ``lastword`` (LAMBADA-style, Paperno et al. 2016): a passage that stops just before the last word of
  a sentence; the model must continue it with that word. Scored as lm-eval scores LAMBADA: the
  continuation is ``" " + target``, accuracy is whether the greedy token at every position of the
  target equals the target's token (so greedy decoding would write the word), and the target's
  log-likelihood is reported beside it.
- ``nextsentence`` (multiple choice): a context of a few consecutive sentences and four candidate next
  sentences, the true one and three drawn from elsewhere in the same text. Scored as lm-eval's
  multiple-choice tasks: the log-likelihood of ``" " + choice`` after the context, ``acc`` from the
  largest total, ``acc_norm`` from the largest total per character of the choice.

The texts are ``persuasion`` and ``brit1911`` (:data:`TASK_SOURCES`): never ``austen``, the calibration
text, nor one of its five novels, which the builders refuse. Recipe, in order:

1. :func:`prose`: the built-in text, cut before ``brit1911``'s bibliography (OCR'd citations, not
   prose), one-line paragraphs without closing punctuation dropped (title lines, chapter headings),
   a hyphen at a line end joined to the next line (``con-\\ntemporary`` -> ``con-temporary``), and every
   run of whitespace made one space.
2. :func:`split_sentences`: a sentence ends at ``.``, ``!`` or ``?`` (and any closing quotes or
   brackets) followed by a space and a capital (after an optional opening quote), except after an
   abbreviation (:data:`ABBREVIATIONS`), a single-letter initial or a dotted token such as ``U.S.``.
3. The candidates of each task (below) in text order; ``items // len(sources)`` of them drawn per source
   by ``random.Random(f"binq-{task}-{source}-{seed}").sample`` (the first sources take one more each while
   a remainder is left), kept in text order; then the sources interleaved, one item of each in turn, so
   that a ``--limit`` keeps both.

Words are counted by whitespace, so the items do not depend on a tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from binq.data.corpora import AUSTEN_ORDER, load_text
from binq.errors import BinqError

__all__ = [
    "ABBREVIATIONS",
    "TASKS",
    "TASK_SOURCES",
    "LastWordItem",
    "NextSentenceItem",
    "TaskItems",
    "TaskSpec",
    "build_task",
    "check_task_names",
    "items_sha256",
    "lastword_items",
    "nextsentence_items",
    "prose",
    "split_sentences",
    "write_jsonl",
]

#: The held-out texts the tasks are built from (``austen``, the calibration text, is not one of them).
TASK_SOURCES: tuple[str, ...] = ("persuasion", "brit1911")

#: Tokens after which a full stop does not end a sentence (compared in lower case, without the stop).
ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "messrs", "capt", "col", "gen", "rev", "esq", "viz", "cf", "vol", "vols",
     "ed", "eds", "pp", "no", "fol", "ch", "chap", "sect", "ibid", "etc", "sc", "ll", "sq", "ff"}
)  # fmt: skip

# Where a built-in text stops being prose: brit1911 ends in 70 kB of OCR'd bibliography.
_PROSE_ENDS = {"brit1911": "\nBIBLIOGRAPHY"}

_SENTENCE_END = re.compile(r"""([.!?]+)["'’”)\]]* (?=["'‘“(\[]?[A-Z])""")
_LEADING_PUNCTUATION = "\"'‘“(["
_LAST_WORD = re.compile(r""" ([A-Za-z]{3,})[.!?]+["'’”)\]]*$""")
_CLOSING = ".!?,;:\"'’”)]-—"


@dataclass(frozen=True)
class LastWordItem:
    """A passage without its last word: the model should continue ``context`` with ``" " + target``."""

    id: str
    source: str
    context: str
    target: str


@dataclass(frozen=True)
class NextSentenceItem:
    """A context and four candidate next sentences; ``choices[label]`` is the one the text has."""

    id: str
    source: str
    context: str
    choices: tuple[str, ...]
    label: int


Item = LastWordItem | NextSentenceItem


@dataclass(frozen=True)
class TaskSpec:
    """A task's recipe: its builder, sources, seed and number of items (``binq eval --tasks NAME``)."""

    name: str
    builder: Callable[..., list[Any]]
    summary: str
    items: int = 500
    seed: int = 0
    sources: tuple[str, ...] = TASK_SOURCES


@dataclass(frozen=True)
class TaskItems:
    """The items of one task as evaluated: the first ``len(items)`` of ``total`` (``--limit``)."""

    spec: TaskSpec
    items: tuple[Any, ...]
    total: int

    @property
    def sha256(self) -> str:
        return items_sha256(self.items)

    def describe(self) -> dict[str, Any]:
        """The task's record in ``report.json``: recipe, sources, seed, counts and the items' digest."""
        return {
            "description": self.spec.summary,
            "sources": list(self.spec.sources),
            "seed": self.spec.seed,
            "items": len(self.items),
            "items_total": self.total,
            "items_sha256": self.sha256,
        }


def prose(name: str) -> str:
    """The built-in text ``name`` made into one line of prose (step 1 of the module's recipe)."""
    if name == "austen" or name in AUSTEN_ORDER:
        raise BinqError(f"'{name}' is calibration text (austen): zero-shot items come from held-out texts only")
    return _prose(name)


@functools.cache
def _prose(name: str) -> str:
    text = load_text(name)
    end = _PROSE_ENDS.get(name)
    if end is not None and end in text:
        text = text[: text.index(end)]
    text = re.sub(r"(?<=[A-Za-z])-\n(?=[a-z])", "-", text)
    paragraphs = re.split(r"\n\s*\n", text)
    kept = [p for p in paragraphs if "\n" in p.strip() or p.strip().endswith(tuple(_CLOSING))]
    return " ".join(" ".join(kept).split())


def split_sentences(text: str) -> list[str]:
    """``text`` (one line, single spaces) cut into sentences (step 2 of the module's recipe)."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if match.group(1) == "." and _is_abbreviation(text[start : match.start()]):
            continue
        sentences.append(text[start : match.end() - 1])
        start = match.end()
    if text[start:].strip():
        sentences.append(text[start:].strip())
    return sentences


def _is_abbreviation(before_stop: str) -> bool:
    """Whether the token before a full stop is an abbreviation, an initial or a dotted token (U.S.)."""
    token = before_stop.rsplit(" ", 1)[-1].lstrip(_LEADING_PUNCTUATION)
    return len(token) <= 1 or "." in token or token.lower() in ABBREVIATIONS


def _words(text: str) -> int:
    return len(text.split())


def lastword_items(
    sentences: Sequence[str],
    source: str,
    n: int,
    seed: int,
    *,
    min_context_words: int = 50,
    max_context_words: int = 150,
) -> list[LastWordItem]:
    """``n`` LAMBADA-style items of one text, given as its sentences.

    Candidates: every sentence whose last word, before its closing punctuation, is a real word (ASCII
    letters only, at least 3 of them, after a space: not ``Anne's``, not ``well-bred``, not an
    abbreviation). The context is that sentence up to the space before the word, preceded by as few
    whole sentences as make it ``min_context_words`` words or more; a candidate whose context would need
    sentences before the first, or comes to more than ``max_context_words`` words, is skipped.
    """
    candidates = []
    for k, sentence in enumerate(sentences):
        match = _LAST_WORD.search(sentence)
        if match is None or match.group(1).lower() in ABBREVIATIONS:
            continue
        parts = [sentence[: match.start()]]
        words, first = _words(parts[0]), k
        while words < min_context_words and first > 0:
            first -= 1
            parts.insert(0, sentences[first])
            words += _words(sentences[first])
        if min_context_words <= words <= max_context_words:
            candidates.append(LastWordItem(f"lastword-{source}-{k}", source, " ".join(parts), match.group(1)))
    return _draw(candidates, n, f"binq-lastword-{source}-{seed}", source)


def nextsentence_items(
    sentences: Sequence[str],
    source: str,
    n: int,
    seed: int,
    *,
    context_sentences: int = 3,
    choices: int = 4,
    min_words: int = 5,
    max_words: int = 50,
    min_context_words: int = 20,
) -> list[NextSentenceItem]:
    """``n`` multiple-choice items of one text, given as its sentences.

    Candidates: every sentence of ``min_words`` to ``max_words`` words after ``context_sentences``
    sentences of at least ``min_context_words`` words in all (the context). The wrong choices are drawn
    (one random generator per source, in item order) from the sentences of the same length bounds more
    than ``context_sentences`` sentences away from the true one, each of a text unlike the true one's and
    each other's; the choices are then shuffled by the same generator and ``label`` says where the true
    one went.
    """
    if choices < 2:
        raise BinqError(f"a multiple-choice item needs at least 2 choices, got {choices}")
    fitting = [j for j, s in enumerate(sentences) if min_words <= _words(s) <= max_words]
    candidates = [
        i
        for i in fitting
        if i >= context_sentences and _words(" ".join(sentences[i - context_sentences : i])) >= min_context_words
    ]
    rng = random.Random(f"binq-nextsentence-choices-{source}-{seed}")
    chosen = _draw(candidates, n, f"binq-nextsentence-{source}-{seed}", source)
    if len({sentences[j] for j in fitting}) < choices + 2 * context_sentences + 1:
        raise BinqError(f"{source}: too few distinct sentences to draw {choices - 1} wrong choices from")
    items = []
    for i in chosen:
        truth = sentences[i]
        options = [truth]
        while len(options) < choices:
            j = rng.choice(fitting)
            if abs(j - i) > context_sentences and sentences[j] not in options:
                options.append(sentences[j])
        rng.shuffle(options)
        context = " ".join(sentences[i - context_sentences : i])
        items.append(
            NextSentenceItem(f"nextsentence-{source}-{i}", source, context, tuple(options), options.index(truth))
        )
    return items


def _draw(candidates: list[Any], n: int, seed: str, source: str) -> list[Any]:
    """``n`` of ``candidates`` drawn with the string ``seed``, in their original order."""
    if n > len(candidates):
        raise BinqError(f"{source}: {len(candidates)} candidate items, fewer than the {n} asked for")
    picked = sorted(random.Random(seed).sample(range(len(candidates)), n))
    return [candidates[k] for k in picked]


def _from_sources(
    builder: Callable[..., list[Any]], sources: Sequence[str], n: int, seed: int, **options: Any
) -> list[Any]:
    """``n`` items over ``sources`` (step 3 of the module's recipe): shares per source, interleaved."""
    shares = [n // len(sources) + (k < n % len(sources)) for k in range(len(sources))]
    per_source = [
        builder(split_sentences(prose(source)), source, share, seed, **options)
        for source, share in zip(sources, shares, strict=True)
    ]
    interleaved = []
    for k in range(max(shares)):
        interleaved += [items[k] for items in per_source if k < len(items)]
    return interleaved


TASKS: dict[str, TaskSpec] = {
    "lastword": TaskSpec(
        "lastword",
        lastword_items,
        "LAMBADA-style: continue a passage of 50-150 words with the last word of its sentence (letters, >= 3); "
        "acc = greedy tokens equal the target's, as lm-eval's lambada",
    ),
    "nextsentence": TaskSpec(
        "nextsentence",
        nextsentence_items,
        "multiple choice: after 3 sentences, the true next sentence against 3 drawn from elsewhere in the same "
        "text (5-50 words each); acc, acc_norm (log-likelihood per character) as lm-eval's multiple_choice",
    ),
}


def check_task_names(spec: str) -> list[str]:
    """The task names of a comma-separated ``--tasks`` value; an unknown one is a one-line error."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        what = f"unknown task {unknown[0]!r}" if unknown else "--tasks names no task"
        raise BinqError(f"{what} (tasks: {', '.join(TASKS)})")
    return list(dict.fromkeys(names))


def build_task(name: str, limit: int | None = None) -> TaskItems:
    """The items of task ``name`` (all of them, or the first ``limit``)."""
    (name,) = check_task_names(name)
    if limit is not None and limit < 1:
        raise BinqError(f"--limit must be at least 1, got {limit}")
    items = _all_items(name)
    return TaskItems(TASKS[name], items if limit is None else items[:limit], len(items))


@functools.cache
def _all_items(name: str) -> tuple[Any, ...]:
    spec = TASKS[name]
    return tuple(_from_sources(spec.builder, spec.sources, spec.items, spec.seed))


def item_record(item: Item) -> dict[str, Any]:
    """An item as a JSON object (``choices`` a list): what the digest and the JSONL files hold."""
    record = asdict(item)
    if "choices" in record:
        record["choices"] = list(record["choices"])
    return record


def items_sha256(items: Sequence[Item]) -> str:
    """sha256 of the items as UTF-8 JSON Lines, keys sorted: the bytes :func:`write_jsonl` writes."""
    return hashlib.sha256(_jsonl(items).encode("utf-8")).hexdigest()


def _jsonl(items: Sequence[Item]) -> str:
    return "".join(json.dumps(item_record(item), sort_keys=True, ensure_ascii=False) + "\n" for item in items)


def write_jsonl(items: Sequence[Item], path: Path) -> Path:
    """Write ``items`` as JSON Lines (one object per line, keys sorted); its sha256 is :func:`items_sha256`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_jsonl(items), encoding="utf-8")
    return path
