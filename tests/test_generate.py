"""Tests for the decode loop (binq.inference.generate) and ``binq generate``.

The loop must give exactly transformers' greedy continuation (``generate(do_sample=False)``), token for
token, on plain models of several architectures and on a packed checkpoint; the text stream must
print what the tokenizer decodes, multi-byte characters included; bad input is one line and exit 2.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

import binq
from binq.checkpoint import save_checkpoint
from binq.cli import main
from binq.engine.calibrate import quantize_model
from binq.errors import BinqError
from binq.inference.generate import TextStream, encode_prompt, eos_token_ids, generate
from binq.methods import get_method
from binq.models import get_architecture
from conftest import MAX_POSITIONS, build_tiny_model, build_tiny_tokenizer, random_ids, word_text

CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> {% endif %}"
)


def reference_greedy(model: nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding (its KV cache, its stopping at EOS)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with its linears binarized (RTN, groups of 32), saved as a binq checkpoint."""
    folder = tmp_path_factory.mktemp("generate-ckpt")
    model = build_tiny_model("llama")
    method = get_method("rtn")
    config = method.make_config(group_size=32)
    result = quantize_model(model, get_architecture(model), random_ids(2, 16), method, config, progress=False)
    save_checkpoint(model, result.weights, folder, tokenizer=build_tiny_tokenizer(), method="rtn")
    return folder


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the loop ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3_text", "qwen3"])
def test_greedy_equals_transformers_generate(arch: str) -> None:
    model = build_tiny_model(arch)
    prompt = random_ids(1, 9, seed=3)[0].tolist()
    expected = reference_greedy(model, prompt, 24)
    result = generate(model, prompt, 24, eos_ids=eos_token_ids(model))
    assert result.tokens == expected
    stats = result.stats
    assert (stats.prompt_tokens, stats.new_tokens) == (9, len(expected))
    assert stats.decode_steps == len(expected) - 1  # the first token comes from the prefill
    assert stats.prefill_s > 0 and stats.decode_s > 0


def test_greedy_equals_transformers_generate_on_a_checkpoint(checkpoint: Path) -> None:
    model = binq.load(checkpoint)
    prompt = random_ids(1, 7, seed=5)[0].tolist()
    assert generate(model, prompt, 20, eos_ids=eos_token_ids(model)).tokens == reference_greedy(model, prompt, 20)


def test_stops_at_eos_unless_told_not_to() -> None:
    model = build_tiny_model("llama")
    prompt = random_ids(1, 6, seed=1)[0].tolist()
    free = generate(model, prompt, 12, ignore_eos=True).tokens
    eos = free[4]
    first = free.index(eos)  # the loop must stop at the first occurrence
    stopped = generate(model, prompt, 12, eos_ids={eos})
    assert stopped.tokens == free[: first + 1]
    assert stopped.stats.stop_reason == "eos"
    ignored = generate(model, prompt, 12, eos_ids={eos}, ignore_eos=True)
    assert ignored.tokens == free and ignored.stats.stop_reason == "max_new_tokens"


def test_stops_when_the_context_is_full() -> None:
    model = build_tiny_model("llama")
    prompt = random_ids(1, MAX_POSITIONS - 3, seed=2)[0].tolist()
    result = generate(model, prompt, 10, ignore_eos=True)
    assert len(prompt) + len(result.tokens) == MAX_POSITIONS
    assert result.stats.stop_reason == "context"
    assert result.tokens == reference_greedy(model, prompt, 3)[:3]


def test_sampling_is_seeded() -> None:
    model = build_tiny_model("llama")
    prompt = random_ids(1, 5, seed=4)[0].tolist()
    first = generate(model, prompt, 16, temperature=1.5, seed=7, ignore_eos=True).tokens
    assert generate(model, prompt, 16, temperature=1.5, seed=7, ignore_eos=True).tokens == first
    others = {tuple(generate(model, prompt, 16, temperature=1.5, seed=s, ignore_eos=True).tokens) for s in range(4)}
    assert len(others) > 1  # a flat distribution over 128 tokens: different seeds, different texts


def test_on_token_sees_every_token_as_it_comes() -> None:
    model = build_tiny_model("llama")
    seen: list[int] = []
    result = generate(model, [5, 6, 7], 8, ignore_eos=True, on_token=seen.append)
    assert seen == result.tokens


@pytest.mark.parametrize(
    ("max_new_tokens", "temperature", "prompt", "message"),
    [
        (0, 0.0, [5], "at least 1"),
        (4, -0.5, [5], "temperature"),
        (4, float("nan"), [5], "temperature"),
        (4, 0.0, [], "empty"),
        (4, 0.0, [5] * (MAX_POSITIONS + 1), "context"),
    ],
)
def test_bad_requests(max_new_tokens: int, temperature: float, prompt: list[int], message: str) -> None:
    with pytest.raises(BinqError, match=message):
        generate(build_tiny_model("llama"), prompt, max_new_tokens, temperature=temperature)


# --- streaming text ----------------------------------------------------------------------------------------


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (GPT-2's byte alphabet, no merges): 'é' is two tokens, '日' three."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({symbol: i for i, symbol in enumerate(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_stream_holds_back_incomplete_characters() -> None:
    tokenizer = byte_level_tokenizer()
    text = "naïve café\n日本語 ok"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) + stream.flush() == text
    assert not any("\ufffd" in piece for piece in pieces)
    first_byte_of_e_acute = len("naïve caf".encode())
    assert pieces[first_byte_of_e_acute] == "" and pieces[first_byte_of_e_acute + 1] == "é"


def test_stream_of_words_keeps_the_spaces(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tiny_tokenizer(word_text(30, seed=9))["input_ids"]
    stream = TextStream(tiny_tokenizer)
    assert "".join(stream.push(token) for token in ids) + stream.flush() == tiny_tokenizer.decode(ids)


def test_chat_prompt_uses_the_template(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(BinqError, match="no chat template"):
        encode_prompt(tiny_tokenizer, "w1 w2", chat=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    assert encode_prompt(tokenizer, "w1 w2", chat=True) == tokenizer("<s> w1 w2 </s> <s>")["input_ids"]


# --- the command line --------------------------------------------------------------------------------------


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if "error:" in line]) == 1, err
    assert lines[-1].startswith(("binq: error: ", "binq generate: error: ")), err
    assert re.search(pattern, lines[-1]), lines[-1]


def stats_line(err: str) -> str:
    return [line for line in err.splitlines() if line.startswith("binq generate:")][-1]


@pytest.mark.parametrize("source", ["folder", "checkpoint"])
def test_cli_streams_the_greedy_continuation(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, checkpoint: Path, source: str
) -> None:
    folder = tiny_llama_folder if source == "folder" else checkpoint
    prompt = word_text(6, seed=11)
    code, out, err = run_cli(capsys, "generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "9")
    assert code == 0, err
    tokenizer = build_tiny_tokenizer()
    model = binq.load(folder) if source == "checkpoint" else build_tiny_model("llama")
    expected = reference_greedy(model, tokenizer(prompt)["input_ids"], 9)
    assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    line = stats_line(err)
    assert re.search(rf"6 prompt tokens, prefill .* {len(expected)} new tokens, decode [\d.]+ tokens/s", line), line
    assert re.search(r"peak RSS [\d,]+ MiB", line), line


def test_cli_chat_and_threads(
    capsys: pytest.CaptureFixture[str], save_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    folder = save_tiny_model("llama")
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    argv = ["generate", "--model", str(folder), "--prompt", "w3 w4", "--chat", "--max-new-tokens", "5"]
    code, out, err = run_cli(capsys, *argv, "--threads", "1")
    assert code == 0, err
    prompt = tokenizer("<s> w3 w4 </s> <s>")["input_ids"]
    assert (
        out == tokenizer.decode(reference_greedy(build_tiny_model("llama"), prompt, 5), skip_special_tokens=True) + "\n"
    )
    assert f"{len(prompt)} prompt tokens" in stats_line(err) and "1 threads" in stats_line(err)


def test_cli_sampling_is_reproducible(capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path) -> None:
    argv = ["generate", "--model", str(tiny_llama_folder), "--prompt", "w1 w2", "--temperature", "1.2", "--seed", "3"]
    first = run_cli(capsys, *argv)
    second = run_cli(capsys, *argv)
    assert first[0] == second[0] == 0 and first[1] == second[1]


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", "w1", "--max-new-tokens", "0"], "at least 1"),
        (["--prompt", "w1", "--temperature", "-1"], "temperature"),
        (["--prompt", "w1", "--threads", "0"], "--threads"),
        (["--prompt", word_text(MAX_POSITIONS + 1)], rf"{MAX_POSITIONS + 1} tokens, more than the model's context"),
        (["--prompt", "w1", "--chat"], "no chat template"),
        (["--prompt", "w1", "--max-new-tokens", "many"], "invalid int value"),
    ],
)
def test_cli_bad_input(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, extra: list[str], pattern: str
) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_llama_folder), *extra)
    assert_one_line_error(code, err, pattern)


def test_cli_missing_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nothing"), "--prompt", "w1")
    assert_one_line_error(code, err, "no such file or directory")
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "w1")
    assert_one_line_error(code, err, "no config.json")
