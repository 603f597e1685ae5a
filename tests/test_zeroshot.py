"""Zero-shot tasks: the item builders (binq.data.zeroshot), the scoring (binq.evaluation.zeroshot) and
``binq eval --tasks``.

The scores are checked against log-likelihoods computed here one token at a time, each from its own
forward pass over the tokens before it, so an off-by-one in the batched slicing, the padding or the
left truncation fails. The tiny word tokenizer makes every ``wN`` word one token.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

import binq
from binq.cli import main
from binq.data import load_text
from binq.data.zeroshot import (
    TASK_SOURCES,
    TASKS,
    LastWordItem,
    NextSentenceItem,
    TaskItems,
    build_task,
    check_task_names,
    items_sha256,
    lastword_items,
    nextsentence_items,
    prose,
    split_sentences,
    write_jsonl,
)
from binq.errors import BinqError
from binq.evaluation.zeroshot import (
    ZeroShotConfig,
    binomial_stderr,
    encode_pair,
    max_length,
    score_continuations,
    score_task,
)
from conftest import MAX_POSITIONS, build_tiny_model, build_tiny_tokenizer, word_text

# The digests of the 500 items of each task: they change only when the recipe or the texts do.
LASTWORD_SHA256 = "4e10e1cbd3f6dc54a8f6a52bd08cc701060354bcb889938b935b8c3cf97c3ec3"
NEXTSENTENCE_SHA256 = "02d5cd6cb664294165e69536509ec1b6e16aef63e4d8d98f19198031436fc29b"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len([line for line in lines if "error:" in line]) == 1, err
    assert re.search(pattern, lines[-1]), lines[-1]


# --- the items ------------------------------------------------------------------------------------------


def test_sentences_end_at_stops_not_at_abbreviations_or_initials() -> None:
    text = (
        'Mr. Elliot met Mrs. Smith at St. Paul. "Oh!" cried Anne. "Is it he?" She asked A. W. Pollard of the '
        "U.S. Navy, etc. and more. The end (at last.) Then quiet"
    )
    assert split_sentences(text) == [
        "Mr. Elliot met Mrs. Smith at St. Paul.",
        '"Oh!" cried Anne.',
        '"Is it he?"',
        "She asked A. W. Pollard of the U.S. Navy, etc. and more.",
        "The end (at last.)",
        "Then quiet",
    ]


def test_lastword_items_of_a_small_text() -> None:
    sentences = ["One two three four.", "Five six seven eight nine.", "Ten eleven well-bred.", "Twelve and sun."]
    items = lastword_items(sentences, "toy", 2, 0, min_context_words=5, max_context_words=8)
    # "four" lacks context; "well-bred" is not a plain word; "nine" and "sun" are the candidates
    assert items == [
        LastWordItem("lastword-toy-1", "toy", "One two three four. Five six seven eight", "nine"),
        LastWordItem("lastword-toy-3", "toy", "Ten eleven well-bred. Twelve and", "sun"),
    ]
    with pytest.raises(BinqError, match="2 candidate items, fewer than the 3 asked for"):
        lastword_items(sentences, "toy", 3, 0, min_context_words=5, max_context_words=8)


@pytest.mark.parametrize("name", list(TASKS))
def test_items_are_deterministic_and_pinned(name: str) -> None:
    task = build_task(name)
    assert task.total == len(task.items) == 500
    assert task.sha256 == {"lastword": LASTWORD_SHA256, "nextsentence": NEXTSENTENCE_SHA256}[name]
    # built again from scratch, the same items (the task cache is not what makes them equal)
    spec = TASKS[name]
    again = [spec.builder(split_sentences(prose(s)), s, 250, spec.seed) for s in TASK_SOURCES]
    assert [item for pair in zip(*again, strict=True) for item in pair] == list(task.items)
    # sources alternate, so that --limit keeps both; --limit keeps the first items
    assert [item.source for item in task.items[:4]] == [*TASK_SOURCES, *TASK_SOURCES]
    assert {s: sum(item.source == s for item in task.items) for s in TASK_SOURCES} == dict.fromkeys(TASK_SOURCES, 250)
    limited = build_task(name, 7)
    assert limited.items == task.items[:7] and limited.total == 500 and limited.sha256 == items_sha256(task.items[:7])
    assert len({item.id for item in task.items}) == 500


def test_another_seed_gives_other_items() -> None:
    sentences = split_sentences(prose("persuasion"))
    assert lastword_items(sentences, "persuasion", 20, 0) != lastword_items(sentences, "persuasion", 20, 1)
    assert nextsentence_items(sentences, "persuasion", 20, 0) != nextsentence_items(sentences, "persuasion", 20, 1)


def test_lastword_targets_are_the_last_word_of_a_sentence_of_the_text() -> None:
    texts = {source: prose(source) for source in TASK_SOURCES}
    for item in build_task("lastword").items:
        assert re.fullmatch(r"[A-Za-z]{3,}", item.target)
        assert 50 <= len(item.context.split()) <= 150 and not item.context.endswith(" ")
        # the passage, the word, then the sentence's closing punctuation, in the text itself
        passage = re.escape(f"{item.context} {item.target}")
        assert re.search(passage + r"[.!?]+[\"'’”)\]]*( [\"'‘“(\[]?[A-Z]|$)", texts[item.source]), item.id


def test_nextsentence_truth_follows_its_context_and_distractors_differ() -> None:
    texts = {source: prose(source) for source in TASK_SOURCES}
    labels = []
    for item in build_task("nextsentence").items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        truth = item.choices[item.label]
        assert f"{item.context} {truth}" in texts[item.source], item.id
        for k, choice in enumerate(item.choices):
            assert 5 <= len(choice.split()) <= 50
            if k != item.label:
                assert choice != truth and f"{item.context} {choice}" not in texts[item.source]
                assert choice in texts[item.source]  # drawn from the same text
        labels.append(item.label)
    assert {labels.count(k) for k in range(4)} <= set(range(100, 151))  # the truth is anywhere, evenly


def test_no_item_comes_from_the_calibration_text() -> None:
    austen = " ".join(load_text("austen").split())
    with pytest.raises(BinqError, match="calibration text"):
        prose("austen")
    with pytest.raises(BinqError, match="calibration text"):
        prose("emma")
    for name in TASKS:
        task = build_task(name)
        assert set(task.spec.sources) == {"persuasion", "brit1911"}
        for item in task.items[:100]:
            assert item.context not in austen


def test_brit1911_items_stop_before_its_bibliography() -> None:
    text = prose("brit1911")
    assert "BIBLIOGRAPHY" not in text and "8vo" not in text
    assert "con-temporary" in text  # a hyphen at a line end joins the next line


def test_jsonl_holds_the_items_and_their_digest(tmp_path: Path) -> None:
    task = build_task("nextsentence", 3)
    path = write_jsonl(task.items, tmp_path / "items.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [item.id for item in task.items]
    assert records[0]["choices"] == list(task.items[0].choices) and records[0]["label"] == task.items[0].label
    assert hashlib.sha256(path.read_bytes()).hexdigest() == task.sha256


def test_bad_task_names() -> None:
    assert check_task_names("nextsentence, lastword,lastword") == ["nextsentence", "lastword"]
    with pytest.raises(BinqError, match=r"unknown task 'hellaswag' \(tasks: lastword, nextsentence\)"):
        check_task_names("lastword,hellaswag")
    with pytest.raises(BinqError, match="names no task"):
        check_task_names(" , ")
    with pytest.raises(BinqError, match="--limit must be at least 1"):
        build_task("lastword", 0)


# --- the scoring ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return build_tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def hand_score(
    model: nn.Module, tokenizer: PreTrainedTokenizerFast, context: str, continuation: str
) -> tuple[float, bool]:
    """Log-likelihood and greediness of ``continuation``, one forward per token over the tokens before it."""
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids) :]
    tokens = context_ids + continuation_ids
    start = max(0, len(tokens) - MAX_POSITIONS - 1)  # lm-eval's window: the last positions + 1 tokens, less one
    total, greedy = 0.0, True
    with torch.no_grad():
        for position in range(len(context_ids), len(tokens)):
            before = tokens[start:position]
            logp = torch.log_softmax(model(torch.tensor([before])).logits[0, -1].double(), dim=-1)
            total += float(logp[tokens[position]])
            greedy = greedy and int(logp.argmax()) == tokens[position]
    return total, greedy


def greedy_word(model: nn.Module, tokenizer: PreTrainedTokenizerFast, context: str) -> str:
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(context)])).logits[0, -1]
    return tokenizer.convert_ids_to_tokens(int(logits.argmax()))


def test_encode_pair_moves_trailing_spaces_to_the_continuation(tokenizer: PreTrainedTokenizerFast) -> None:
    assert encode_pair(tokenizer, "w1 w2 ", "w3") == (tokenizer.encode("w1 w2"), tokenizer.encode("w3"))
    with pytest.raises(BinqError, match="non-empty context"):
        encode_pair(tokenizer, "", " w1")


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_equal_a_token_by_token_computation(
    model: nn.Module, tokenizer: PreTrainedTokenizerFast, batch_size: int
) -> None:
    long_context = word_text(150, seed=5)  # 150 tokens: cut from the left to the model's 64 positions
    requests = [
        (word_text(10, seed=1), " w7"),
        (word_text(3, seed=2), " w9 w10 w11"),
        (long_context, " w1 w2"),
        (word_text(40, seed=4), " w3"),
        (word_text(63, seed=6), " w5"),  # exactly the model's positions, context and continuation together
    ]
    scores = score_continuations(model, tokenizer, requests, batch_size=batch_size, progress=False)
    for (context, continuation), score in zip(requests, scores, strict=True):
        loglik, greedy = hand_score(model, tokenizer, context, continuation)
        assert score.loglik == pytest.approx(loglik, abs=1e-4)
        assert score.greedy == greedy and score.tokens == len(continuation.split())
    assert max_length(model, tokenizer) == MAX_POSITIONS


def test_lastword_accuracy_and_loglik(model: nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    contexts = [word_text(12, seed=s) for s in range(4)]
    greedy = [greedy_word(model, tokenizer, c) for c in contexts]
    wrong = [f"w{(int(g[1:]) + 1) % 100}" for g in greedy]
    targets = [greedy[0], wrong[1], greedy[2], wrong[3]]
    items = tuple(LastWordItem(f"t{k}", "toy", c, t) for k, (c, t) in enumerate(zip(contexts, targets, strict=True)))
    result = score_task(model, tokenizer, TaskItems(TASKS["lastword"], items, 4), batch_size=3, progress=False)
    logliks = [hand_score(model, tokenizer, c, " " + t)[0] for c, t in zip(contexts, targets, strict=True)]
    metrics = result.metrics
    assert metrics["acc"] == 0.5 and metrics["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 3))
    assert metrics["target_loglik_mean"] == pytest.approx(sum(logliks) / 4, abs=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(-sum(logliks) / 4), rel=1e-4)
    assert metrics["target_tokens_mean"] == 1 and metrics["max_length"] == MAX_POSITIONS


def test_nextsentence_acc_and_acc_norm(model: nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    items = []
    for k in range(6):
        choices = tuple(word_text(2 + (k + j) % 5, seed=100 * k + j) for j in range(4))
        items.append(NextSentenceItem(f"t{k}", "toy", word_text(15, seed=k), choices, k % 4))
    result = score_task(model, tokenizer, TaskItems(TASKS["nextsentence"], tuple(items), 6), progress=False)
    hits = hits_norm = 0
    for item, scores in zip(items, result.scores, strict=True):
        logliks = [hand_score(model, tokenizer, item.context, " " + c)[0] for c in item.choices]
        assert [s.loglik for s in scores] == pytest.approx(logliks, abs=1e-4)
        hits += max(range(4), key=lambda j: logliks[j]) == item.label
        hits_norm += max(range(4), key=lambda j: logliks[j] / len(item.choices[j])) == item.label
    assert result.metrics["acc"] == hits / 6 and result.metrics["acc_norm"] == hits_norm / 6
    assert result.metrics["acc_stderr"] == binomial_stderr(hits / 6, 6)


def test_binomial_stderr_is_lm_evals() -> None:
    scores = [1, 0, 0, 1, 1, 1, 0]
    mean = sum(scores) / 7
    sample_std = math.sqrt(sum((x - mean) ** 2 for x in scores) / 6)
    assert binomial_stderr(mean, 7) == pytest.approx(sample_std / math.sqrt(7))
    assert binomial_stderr(1.0, 1) is None


def test_bad_zeroshot_config() -> None:
    with pytest.raises(BinqError, match=r"unknown task 'piqa' \(tasks: lastword, nextsentence\)"):
        ZeroShotConfig(("piqa",))
    with pytest.raises(BinqError, match="--batch-size must be at least 1"):
        ZeroShotConfig(("lastword",), batch_size=0)


# --- binq eval --tasks ----------------------------------------------------------------------------------


def test_eval_tasks_writes_the_report_and_the_table(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, tmp_path: Path
) -> None:
    argv = ["eval", "--model", str(tiny_llama_folder), "--tasks", "lastword,nextsentence", "--limit", "6"]
    argv += ["--batch-size", "4", "--no-progress", "--out", str(tmp_path)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eval"] == {} and report["ppl"] == {}  # --tasks alone: no perplexity
    assert report["command"] == ["binq", *argv]
    for name in TASKS:
        task = report["tasks"][name]
        assert task["items"] == 6 and task["items_total"] == 500
        assert task["items_sha256"] == build_task(name, 6).sha256
        assert task["sources"] == list(TASK_SOURCES) and task["seed"] == 0 and task["batch_size"] == 4
        assert task["acc_stderr"] == pytest.approx(binomial_stderr(task["acc"], 6))
        assert re.search(rf"{name}\s+│ acc\s+│\s+{task['acc']:.4f} │", out), out
    assert report["tasks"]["nextsentence"]["choices"] == 4
    assert {"acc_norm", "acc_norm_stderr"} <= set(report["tasks"]["nextsentence"])
    assert {"target_loglik_mean", "perplexity"} <= set(report["tasks"]["lastword"])
    assert "6 of 500" in out and build_task("lastword", 6).sha256[:12] in out


def test_eval_tasks_beside_perplexity_and_on_a_checkpoint(
    tiny_llama_folder: Path, text_file: Callable[[int, int], Path], tmp_path: Path
) -> None:
    from binq.checkpoint import save_checkpoint
    from binq.engine.calibrate import quantize_model
    from binq.methods import get_method
    from binq.models import get_architecture
    from binq.pipeline import EvaluationConfig
    from conftest import random_ids

    model = build_tiny_model("llama")
    method = get_method("rtn")
    windows = random_ids(2, 16)
    result = quantize_model(model, get_architecture(model), windows, method, method.make_config(), progress=False)
    save_checkpoint(model, result.weights, tmp_path / "ckpt", tokenizer=build_tiny_tokenizer(), method="rtn")
    zeroshot = ZeroShotConfig(("lastword",), limit=3)
    evaluation = EvaluationConfig(sets=(str(text_file(200, 3)),), seqlen=32, windows=2)
    quantized = binq.evaluate(str(tmp_path / "ckpt"), evaluation, zeroshot=zeroshot, progress=False)
    assert quantized.report["model"]["checkpoint"] is True and set(quantized.report["eval"]) == set(evaluation.sets)
    # the checkpoint's scores are the dequantized model's (its linears hold the same weights)
    items = build_task("lastword", 3).items
    expected = score_continuations(model, build_tiny_tokenizer(), [(i.context, " " + i.target) for i in items])
    got = [s[0].loglik for s in quantized.tasks["lastword"].scores]
    assert got == pytest.approx([s.loglik for s in expected], abs=1e-4)
    original = binq.evaluate(str(tiny_llama_folder), zeroshot=zeroshot, progress=False)
    assert original.report["tasks"]["lastword"]["items_sha256"] == quantized.report["tasks"]["lastword"]["items_sha256"]


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--tasks", "lastword,hellaswag"], r"unknown task 'hellaswag' \(tasks: lastword, nextsentence\)"),
        (["--tasks", ","], r"--tasks names no task \(tasks: lastword, nextsentence\)"),
        (["--tasks", "lastword", "--limit", "0"], "--limit must be at least 1"),
        (["--tasks", "lastword", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--limit", "5"], "--limit applies to --tasks"),
    ],
)
def test_eval_task_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], pattern: str) -> None:
    # the model does not exist: the task options are checked before any loading
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "no-model"), *extra, "--no-progress")
    assert_one_line_error(code, err, pattern)
