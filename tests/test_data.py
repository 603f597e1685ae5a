"""Tests for binq.data: vendored corpora, GPTQ-exact calibration windows and evaluation streams.

No network: tokenizers are trained here with the ``tokenizers`` library, and the Hub sets are served by
a fake ``load_dataset`` that returns rows with the real field names, splits and shard names.
"""

from __future__ import annotations

import hashlib
import lzma
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import binq.data
from binq.data import available_texts, calibration_windows, describe_eval, evaluation_tokens, hub, load_text
from binq.data.corpora import AUSTEN_ORDER
from binq.errors import BinqError

# The project's shared folder sits beside the checkout (in CI too).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"
VENDORED = Path(binq.data.__file__).parent / "corpora"
NAME_TO_STEM = {
    "emma": "austen-emma",
    "mansfieldpark": "austen-mansfieldpark",
    "northangerabbey": "austen-northangerabbey",
    "persuasion": "austen-persuasion",
    "prideprejudice": "austen-prideprejudice",
    "sensesensibility": "austen-sensesensibility",
    "brit1911": "britannica1911-shakespeare",
}


# ----------------------------------------------------------------------------------------------- helpers


def _with_bos(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer the way Llama-style models behave: BOS prepended on every call."""
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """A real byte-level BPE (vocab 512) trained on a slice of *Emma*."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "[UNK]"],
        show_progress=False,
    )
    tok.train_from_iterator([load_text("emma")[:100_000]], trainer)
    return _with_bos(tok)


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word ``w0``..``w999`` (plus BOS), for exact token counts."""
    vocab = {"<s>": 0, "[UNK]": 1, **{f"w{k}": k + 2 for k in range(1000)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _with_bos(tok)


class ByteTokenizer:
    """Minimal stand-in with the HF call convention, one token per UTF-8 byte: instant on 3.5 MB."""

    def __call__(self, text: str, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        data = bytearray(text.encode("utf-8"))
        return {"input_ids": torch.frombuffer(data, dtype=torch.uint8).long().reshape(1, -1)}


@pytest.fixture(scope="module")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a ~40 kB UTF-8 file (part of the Britannica article), quick to tokenize repeatedly."""
    path = tmp_path_factory.mktemp("text") / "brit-part.txt"
    path.write_text(load_text("brit1911")[:40_000], encoding="utf-8")
    return str(path)


def ids_of(tokenizer: Any, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"]


def gptq_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """IST-DASLab/gptq ``get_wikitext2`` sampling, verbatim, on the global ``random`` module."""
    state = random.getstate()
    try:
        random.seed(seed)
        out = []
        for _ in range(nsamples):
            i = random.randint(0, ids.shape[1] - seqlen - 1)
            j = i + seqlen
            out.append(ids[:, i:j])
        return torch.cat(out)
    finally:
        random.setstate(state)


def gptq_c4_windows(tokenizer: Any, docs: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """IST-DASLab/gptq ``get_c4`` train sampling (rejection of docs with <= seqlen tokens), verbatim."""
    state = random.getstate()
    try:
        random.seed(seed)
        out = []
        for _ in range(nsamples):
            while True:
                i = random.randint(0, len(docs) - 1)
                trainenc = tokenizer(docs[i], return_tensors="pt")
                if trainenc["input_ids"].shape[1] > seqlen:
                    break
            i = random.randint(0, trainenc["input_ids"].shape[1] - seqlen - 1)
            j = i + seqlen
            out.append(trainenc["input_ids"][:, i:j])
        return torch.cat(out)
    finally:
        random.setstate(state)


def is_subsequence(window: torch.Tensor, ids: torch.Tensor) -> bool:
    """True when ``window`` equals ``ids[0, i:i+len(window)]`` for some i."""
    length = window.shape[0]
    if ids.shape[1] < length:
        return False
    return bool((ids[0].unfold(0, length, 1) == window).all(dim=1).any())


class FakeHub:
    """A ``datasets.load_dataset`` stand-in: rows keyed by (path, split), every call recorded."""

    def __init__(self, rows: dict[tuple[str, str], Any]) -> None:
        self.rows = rows
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.rows[(args[0], kwargs["split"])]


def one_line(exc: pytest.ExceptionInfo[BinqError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------- corpora


def test_available_texts() -> None:
    names = available_texts()
    assert names[0] == "austen"
    assert set(names) == {"austen", *NAME_TO_STEM}


def test_vendored_files_are_exactly_the_expected_xz() -> None:
    assert {p.name for p in VENDORED.glob("*.xz")} == {f"{s}.txt.xz" for s in NAME_TO_STEM.values()}
    for stem in NAME_TO_STEM.values():
        assert (VENDORED / f"{stem}.txt.xz").read_bytes()[:6] == b"\xfd7zXZ\x00"  # xz magic


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared corpora folder is not beside this checkout")
@pytest.mark.parametrize("name", sorted(NAME_TO_STEM))
def test_corpora_decompress_to_the_source_files(name: str) -> None:
    stem = NAME_TO_STEM[name]
    original = hashlib.sha256((SHARED / f"{stem}.txt").read_bytes()).hexdigest()
    unpacked = lzma.decompress((VENDORED / f"{stem}.txt.xz").read_bytes())
    assert hashlib.sha256(unpacked).hexdigest() == original
    assert hashlib.sha256(load_text(name).encode("utf-8")).hexdigest() == original


def test_austen_is_five_novels_in_order_without_persuasion() -> None:
    austen = load_text("austen")
    assert set(AUSTEN_ORDER) == {n for n in NAME_TO_STEM if n not in ("persuasion", "brit1911")}
    assert austen == "\n\n".join(load_text(n) for n in AUSTEN_ORDER)
    assert austen.startswith(load_text("sensesensibility"))
    assert "Sir Walter Elliot, of Kellynch Hall" in load_text("persuasion")
    assert "Kellynch" not in austen
    assert "Emma Woodhouse, handsome, clever, and rich" in austen
    assert "Shakespeare, William (1564--1616)" in load_text("brit1911")


def test_builtin_text_is_cached() -> None:
    assert load_text("emma") is load_text("emma")
    assert load_text("austen") is load_text("austen")


def test_load_text_from_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("Qu'il fait beau — naïve café.\n", encoding="utf-8")
    assert load_text(str(path)) == "Qu'il fait beau — naïve café.\n"


@pytest.mark.parametrize("name", ["wikitext", "Austen", "c4", "/no/such/file.txt"])
def test_unknown_text_lists_valid_names(name: str) -> None:
    with pytest.raises(BinqError) as exc:
        load_text(name)
    message = one_line(exc)
    assert repr(name) in message
    for valid in available_texts():
        assert valid in message


def test_directory_and_non_utf8_file_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(BinqError):
        load_text(str(tmp_path))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(BinqError, match="not valid UTF-8") as exc:
        load_text(str(bad))
    one_line(exc)


# ------------------------------------------------------------------------------------------- calibration


def test_calibration_shape_dtype_and_substrings(bpe: PreTrainedTokenizerFast, small_text: str) -> None:
    ids = ids_of(bpe, load_text(small_text))
    windows = calibration_windows(bpe, small_text, nsamples=6, seqlen=48, seed=0)
    assert windows.shape == (6, 48)
    assert windows.dtype == torch.long
    for window in windows:
        assert is_subsequence(window, ids)


def test_calibration_matches_gptq_random_seed_sequence(bpe: PreTrainedTokenizerFast, small_text: str) -> None:
    ids = ids_of(bpe, load_text(small_text))
    for seed in (0, 1, 1234):
        got = calibration_windows(bpe, small_text, nsamples=9, seqlen=33, seed=seed)
        assert torch.equal(got, gptq_windows(ids, 9, 33, seed))


def test_calibration_deterministic_and_seed_dependent(bpe: PreTrainedTokenizerFast, small_text: str) -> None:
    a = calibration_windows(bpe, small_text, nsamples=4, seqlen=64, seed=7)
    b = calibration_windows(bpe, small_text, nsamples=4, seqlen=64, seed=7)
    c = calibration_windows(bpe, small_text, nsamples=4, seqlen=64, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_leaves_global_random_state_alone(bpe: PreTrainedTokenizerFast, small_text: str) -> None:
    random.seed(99)
    expected = random.random()
    random.seed(99)
    calibration_windows(bpe, small_text, nsamples=3, seqlen=16, seed=0)
    assert random.random() == expected


def test_calibration_on_builtin_austen() -> None:
    """The default source, with a byte tokenizer: windows are real byte runs of the five novels."""
    tok = ByteTokenizer()
    text = load_text("austen")
    windows = calibration_windows(tok, "austen", nsamples=16, seqlen=256, seed=0)
    assert windows.shape == (16, 256)
    assert torch.equal(windows, gptq_windows(ids_of(tok, text), 16, 256, 0))
    for window in windows:
        assert bytes(window.to(torch.uint8).tolist()).decode("utf-8", errors="ignore") in text


def test_calibration_exactly_one_spare_token(words: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("w1 w2 w3 w4 w5", encoding="utf-8")  # BOS + 5 words = 6 tokens
    windows = calibration_windows(words, str(path), nsamples=5, seqlen=5, seed=0)
    assert windows.shape == (5, 5)
    assert torch.equal(windows, gptq_windows(ids_of(words, "w1 w2 w3 w4 w5"), 5, 5, 0))
    with pytest.raises(BinqError) as exc:
        calibration_windows(words, str(path), nsamples=5, seqlen=6, seed=0)
    message = one_line(exc)
    assert "has 6 tokens" in message
    assert "at least 7" in message


@pytest.mark.parametrize(("nsamples", "seqlen"), [(0, 16), (-3, 16), (True, 16), (2.0, 16), (4, 1), (4, 0), (4, "16")])
def test_calibration_rejects_bad_numbers(
    bpe: PreTrainedTokenizerFast, small_text: str, nsamples: Any, seqlen: Any
) -> None:
    with pytest.raises(BinqError) as exc:
        calibration_windows(bpe, small_text, nsamples=nsamples, seqlen=seqlen)
    assert "must be an integer" in one_line(exc)


def test_calibration_unknown_source(bpe: PreTrainedTokenizerFast) -> None:
    with pytest.raises(BinqError, match="unknown text 'pile'"):
        calibration_windows(bpe, "pile", nsamples=2, seqlen=16)


# ------------------------------------------------------------------------------------------- evaluation


def test_evaluation_builtin_is_whole_text_tokenized_once(bpe: PreTrainedTokenizerFast) -> None:
    ids = evaluation_tokens(bpe, "brit1911", seqlen=128)
    assert ids.dim() == 2 and ids.shape[0] == 1
    assert ids.dtype == torch.long
    assert torch.equal(ids, ids_of(bpe, load_text("brit1911")))
    assert ids.shape[1] > 100 * 128  # no truncation for built-ins
    assert ids[0, 0].item() == bpe.bos_token_id


def test_evaluation_file_and_too_short(words: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = tmp_path / "eval.txt"
    path.write_text("w1 w2 w3", encoding="utf-8")
    assert evaluation_tokens(words, str(path), seqlen=4).tolist() == [[0, 3, 4, 5]]
    with pytest.raises(BinqError) as exc:
        evaluation_tokens(words, str(path), seqlen=5)
    assert "has 4 tokens" in one_line(exc)
    with pytest.raises(BinqError):
        evaluation_tokens(words, str(path), seqlen=1)
    with pytest.raises(BinqError, match="unknown text"):
        evaluation_tokens(words, "lambada", seqlen=4)


def test_describe_eval() -> None:
    assert describe_eval("wikitext2") == "wikitext2 test (wikitext-2-raw-v1), joined with '\\n\\n', GPTQ protocol"
    assert "ptb" in describe_eval("ptb") and "' '" in describe_eval("ptb")
    c4 = describe_eval("c4")
    assert "c4-validation.00000-of-00008" in c4 and "1100" in c4 and "256" in c4
    for name in available_texts():
        line = describe_eval(name)
        assert line.startswith(name) and "\n" not in line
    assert "Persuasion" in describe_eval("persuasion")
    with pytest.raises(BinqError, match="unknown text"):
        describe_eval("nope")


# ------------------------------------------------------------------------------------------------- hub


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """WikiText-like rows: lines of the Britannica article (including empty ones, as WikiText has)."""
    return load_text("brit1911")[:30_000].split("\n")


def test_wikitext2_calibration_and_eval(bpe: PreTrainedTokenizerFast, paragraphs: list[str]) -> None:
    train, test = paragraphs[:300], paragraphs[300:]
    fake = FakeHub(
        {
            ("wikitext", "train"): [{"text": t} for t in train],
            ("wikitext", "test"): [{"text": t} for t in test],
        }
    )
    windows = calibration_windows(bpe, "wikitext2", nsamples=5, seqlen=40, seed=0, loader=fake)
    assert torch.equal(windows, gptq_windows(ids_of(bpe, "\n\n".join(train)), 5, 40, 0))
    assert fake.calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "train"})

    ids = evaluation_tokens(bpe, "wikitext2", seqlen=40, loader=fake)
    assert torch.equal(ids, ids_of(bpe, "\n\n".join(test)))
    assert fake.calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})


def test_ptb_joins_sentences_with_space(words: PreTrainedTokenizerFast) -> None:
    train = [" ".join(f"w{k + m}" for m in range(5)) for k in range(0, 200, 5)]
    test = ["w900 w901", "w902", "w903 w904 w905"]
    fake = FakeHub(
        {
            ("ptb_text_only", "train"): [{"sentence": s} for s in train],
            ("ptb_text_only", "test"): [{"sentence": s} for s in test],
        }
    )
    windows = calibration_windows(words, "ptb", nsamples=6, seqlen=12, seed=3, loader=fake)
    assert torch.equal(windows, gptq_windows(ids_of(words, " ".join(train)), 6, 12, 3))
    assert fake.calls[-1] == (("ptb_text_only", "penn_treebank"), {"split": "train"})
    ids = evaluation_tokens(words, "ptb", seqlen=2, loader=fake)
    assert ids.tolist() == [[0, *range(902, 908)]]
    assert fake.calls[-1] == (("ptb_text_only", "penn_treebank"), {"split": "test"})


def test_c4_eval_first_1100_docs_joined_and_truncated(words: PreTrainedTokenizerFast) -> None:
    docs = [f"w{k % 500} w{(k + 1) % 500}" for k in range(1100)] + ["w999 w999"] * 100
    fake = FakeHub({("allenai/c4", "validation"): [{"text": d, "url": "u"} for d in docs]})
    full = ids_of(words, " ".join(docs[:1100]))  # 1 + 2200 tokens
    ids = evaluation_tokens(words, "c4", seqlen=16, loader=fake)  # 256*16 = 4096 > 2201: no cut
    assert torch.equal(ids, full)
    assert 999 + 2 not in ids.tolist()[0]  # documents after the 1100th never appear
    assert fake.calls[-1] == (
        ("allenai/c4",),
        {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"},
    )
    ids = evaluation_tokens(words, "c4", seqlen=3, loader=fake)  # 256*3 = 768 tokens
    assert ids.shape == (1, 768)
    assert torch.equal(ids, full[:, :768])


def test_c4_calibration_rejection_sampling(words: PreTrainedTokenizerFast) -> None:
    seqlen = 8
    # Even documents have BOS + 7 words = 8 tokens (== seqlen, so GPTQ rejects them) or fewer;
    # odd documents are longer and use their own block of words, so each window names its document.
    docs = []
    for k in range(30):
        if k % 2 == 0:
            docs.append(" ".join(["w0"] * (7 if k % 4 == 0 else 3)))
        else:
            docs.append(" ".join(f"w{20 * k + m}" for m in range(9 + k % 7)))
    fake = FakeHub({("allenai/c4", "train"): [{"text": d} for d in docs]})
    windows = calibration_windows(words, "c4", nsamples=20, seqlen=seqlen, seed=0, loader=fake)
    assert windows.shape == (20, seqlen)
    assert torch.equal(windows, gptq_c4_windows(words, docs, 20, seqlen, 0))
    assert fake.calls[-1] == (
        ("allenai/c4",),
        {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"},
    )
    short_id = words.convert_tokens_to_ids("w0")
    long_docs = [ids_of(words, d) for k, d in enumerate(docs) if k % 2 == 1]
    for window in windows:
        assert short_id not in window.tolist()
        assert any(is_subsequence(window, doc) for doc in long_docs)
    again = calibration_windows(words, "c4", nsamples=20, seqlen=seqlen, seed=0, loader=fake)
    other = calibration_windows(words, "c4", nsamples=20, seqlen=seqlen, seed=1, loader=fake)
    assert torch.equal(windows, again)
    assert not torch.equal(windows, other)
    assert torch.equal(other, gptq_c4_windows(words, docs, 20, seqlen, 1))


def test_c4_calibration_with_no_long_document_stops(words: PreTrainedTokenizerFast) -> None:
    fake = FakeHub({("allenai/c4", "train"): [{"text": "w1 w2 w3"}, {"text": "w4"}]})
    with pytest.raises(BinqError) as exc:
        calibration_windows(words, "c4", nsamples=2, seqlen=4, loader=fake)
    message = one_line(exc)
    assert "no document is longer than seqlen=4" in message and "longest has 4" in message


def test_hub_sets_accept_a_real_datasets_dataset(words: PreTrainedTokenizerFast) -> None:
    datasets = pytest.importorskip("datasets")
    docs = [" ".join(f"w{k}" for k in range(n, n + 12)) for n in range(0, 120, 12)]
    table = datasets.Dataset.from_dict({"text": docs, "timestamp": ["t"] * len(docs)})
    got = calibration_windows(words, "c4", nsamples=4, seqlen=6, seed=0, loader=lambda *a, **k: table)
    assert torch.equal(got, gptq_c4_windows(words, docs, 4, 6, 0))
    ids = evaluation_tokens(words, "wikitext2", seqlen=4, loader=lambda *a, **k: table)
    assert torch.equal(ids, ids_of(words, "\n\n".join(docs)))


def test_hub_unreachable_is_a_binq_error(words: PreTrainedTokenizerFast) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub\n(LocalEntryNotFoundError)")

    with pytest.raises(BinqError) as exc:
        evaluation_tokens(words, "wikitext2", seqlen=16, loader=offline)
    message = one_line(exc)
    assert "wikitext2" in message and "ConnectionError" in message
    assert "network" in message and "'austen'" in message


def test_missing_datasets_package_is_a_binq_error(
    words: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    for source in hub.HUB_SETS:
        with pytest.raises(BinqError) as exc:
            calibration_windows(words, source, nsamples=1, seqlen=4)
        assert "pip install datasets" in one_line(exc)


def test_wrong_dataset_shape_is_a_binq_error(words: PreTrainedTokenizerFast) -> None:
    fake = FakeHub({("ptb_text_only", "test"): [{"text": "w1 w2"}]})
    with pytest.raises(BinqError, match="no 'sentence' field"):
        evaluation_tokens(words, "ptb", seqlen=2, loader=fake)


# ------------------------------------------------------------------------------------ chunked tokenizing


def _metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece's convention: a leading space marks the start of every text, so no cut is safe."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "[UNK]"], show_progress=False)
    tok.train_from_iterator([load_text("emma")[:50_000]], trainer)
    return _with_bos(tok)


def _with_eos(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The byte-level BPE with BOS before and an end marker after every text."""
    inner = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    bos, unk = inner.token_to_id("<s>"), inner.token_to_id("[UNK]")
    inner.post_processor = processors.TemplateProcessing(
        single="<s> $A [UNK]", special_tokens=[("<s>", bos), ("[UNK]", unk)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", unk_token="[UNK]")


@pytest.mark.parametrize("kind", ["bpe", "words", "eos", "metaspace"])
def test_long_text_tokenized_in_chunks_gives_the_whole_texts_ids(
    kind: str, bpe: PreTrainedTokenizerFast, words: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut only where the tokenizer cuts by itself: the ids, special tokens included, are the whole call's."""
    from binq.data import _tokens

    tokenizer = {"bpe": bpe, "words": words, "eos": _with_eos(bpe), "metaspace": _metaspace()}[kind]
    text = load_text("emma")[:60_000] if kind != "words" else "\n".join(f"w{k % 997} w{k % 13}" for k in range(9000))
    monkeypatch.setattr(_tokens, "CHUNK_CHARS", 4096)
    splits = _tokens.safe_splits(tokenizer, text)
    if kind == "metaspace":
        assert splits == []  # every text starts with its own marker: never cut
    else:
        assert len(splits) >= 8 and all(text[s - 1] == "\n" for s in splits)
    assert torch.equal(_tokens.tokenize_once(tokenizer, text), ids_of(tokenizer, text).long())


def test_smollm2_tokenizes_the_protocol_texts_in_chunks_exactly() -> None:
    """The real tokenizer on the calibration and evaluation texts: cut, and the same ids as one call."""
    from transformers import AutoTokenizer

    from binq.data import _tokens
    from binq.models import ensure_smollm2

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2()))
    for name in ("austen", "brit1911", "persuasion"):
        text = load_text(name)
        assert len(_tokens.safe_splits(tokenizer, text)) == (12 if name == "austen" else 0)  # 3.6 MB, 0.4, 0.5
        assert torch.equal(_tokens.tokenize_once(tokenizer, text), ids_of(tokenizer, text).long()), name
