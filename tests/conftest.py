"""Shared fixtures: a tiny word-level tokenizer, tiny random models of every architecture, text files.

Everything is built locally (no network): configs from ``AutoConfig.for_model``, random weights from a
fixed seed, and a ``tokenizers`` WordLevel vocabulary ``<pad> <s> </s> <unk> w0 .. w123`` (one token per
whitespace-separated word, so token counts of the text files are exact).

Tests marked ``@pytest.mark.slow`` run by default (CI runs everything); deselect them with
``-m "not slow"``.
"""

from __future__ import annotations

import os

# Triton's kernels run on the CPU under its interpreter (test_triton_kernels.py). The variable is read
# when Triton is first imported, which transformers or torch may do in any test: set it before them all,
# unless a GPU is there to run the kernels for real.
if os.environ.get("BINQ_TEST_TRITON_ON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 64, 128, 4, 2, 16, 128, 2
MAX_POSITIONS = 64
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FIRST_WORD_ID = 4  # ids 0..3 are <pad> <s> </s> <unk>

# The architectures transformers can build a tiny config for (every declared one, today).
TINY_ARCHITECTURES = ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "opt", "qwen2", "qwen3")


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too (pyproject.toml declares it as well) so that `-m "not slow"` works and
    # `--strict-markers` accepts it even when pytest runs without the project's ini options. There is
    # deliberately no skipping hook: slow tests run unless deselected.
    config.addinivalue_line("markers", "slow: long tests (real model, minutes); deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models run fastest on one thread, and far slower when threads fight over busy cores."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_config(arch_name: str, **overrides: object) -> PretrainedConfig:
    """A two-block random config of ``arch_name`` (64 wide, 128 tokens of vocabulary)."""
    if arch_name == "opt":
        config = AutoConfig.for_model(
            "opt",
            hidden_size=HIDDEN,
            ffn_dim=FFN,
            word_embed_proj_dim=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
            **SPECIAL_IDS,
        )
    else:
        config = AutoConfig.for_model(
            arch_name,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
            **SPECIAL_IDS,
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny_model(arch_name: str = "llama", seed: int = 0, **overrides: object) -> nn.Module:
    """A tiny random causal LM in eval mode, fp32, on the CPU."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch_name, **overrides)).eval()
    model.config.use_cache = False
    return model


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - FIRST_WORD_ID)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def word_text(n_words: int, seed: int = 0) -> str:
    """``n_words`` random vocabulary words: exactly ``n_words`` tokens for the tiny tokenizer."""
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(VOCAB - FIRST_WORD_ID)}" for _ in range(n_words))


def random_ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` token ids of ordinary words (no special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_WORD_ID, VOCAB, (n, length), generator=generator)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., nn.Module]:
    """Factory: ``make_tiny_model(arch="llama", seed=0, **config_overrides) -> model``."""
    return build_tiny_model


@pytest.fixture(scope="session")
def make_ids() -> Callable[..., torch.Tensor]:
    """Factory: ``make_ids(n, length, seed=0) -> [n, length]`` ids of ordinary words."""
    return random_ids


SaveTinyModel = Callable[..., Path]


@pytest.fixture
def save_tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> SaveTinyModel:
    """Factory: ``save_tiny_model(arch="llama", edit=None, **config_overrides) -> folder``.

    The folder holds ``config.json``, safetensors weights and the tokenizer, i.e. what
    :func:`binq.models.load_model` accepts; ``edit(model)`` may change the model before it is saved.
    """

    def save(arch_name: str = "llama", edit: Callable[[nn.Module], None] | None = None, **overrides: object) -> Path:
        folder = tmp_path_factory.mktemp(f"tiny-{arch_name}")
        model = build_tiny_model(arch_name, **overrides)
        if edit is not None:
            edit(model)
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        return folder

    return save


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One saved tiny llama shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("tiny-llama-shared")
    build_tiny_model("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """Factory: ``text_file(n_words, seed) -> path`` of a UTF-8 file of ``n_words`` random words."""
    folder = tmp_path_factory.mktemp("texts")

    def make(n_words: int, seed: int = 0) -> Path:
        path = folder / f"words-{n_words}-{seed}.txt"
        if not path.exists():
            path.write_text(word_text(n_words, seed) + "\n", encoding="utf-8")
        return path

    return make
