"""Our own decode loop over a Hugging Face causal LM and its KV cache: prefill once, then one token a step.

``generate`` runs the prompt through the model in one forward (the prefill, which also gives the
first new token), then feeds back one token per forward with the cache (the decode steps), greedy at
temperature 0 or sampled from ``softmax(logits / T)`` with a seeded generator. It times the two phases
apart, calls ``on_token`` after each new token, and stops at an end-of-sequence token unless told to
ignore them (the benchmark needs exactly N tokens). The same loop serves ``binq generate`` and
``binq bench``, so the numbers of one are the speed of the other.

``TextStream`` turns the token callback into text: it decodes the growing sequence and emits the new
suffix, holding back while the text ends in an incomplete UTF-8 character (a byte-level token may
carry half of one), as transformers' ``TextStreamer`` does.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from binq.errors import BinqError

REPLACEMENT_CHARACTER = "\ufffd"  # what decoding shows for an incomplete multi-byte character


@dataclass
class GenerationStats:
    """What one generation did and how long each phase took.

    ``decode_steps`` is the number of one-token forwards: the first new token comes from the
    prefill's logits, so ``new_tokens`` tokens take ``new_tokens - 1`` decode steps.
    """

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    stop_reason: str  # "eos", "max_new_tokens" or "context"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class Generation:
    tokens: list[int]  # the new tokens only (the end-of-sequence token included when it stopped there)
    stats: GenerationStats
    loop: str = "hf"  # which decode loop ran: "lean" or "hf"


def context_length(model: torch.nn.Module) -> int | None:
    """The model's number of positions (``max_position_embeddings``), or None when it does not say."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> set[int]:
    """Every end-of-sequence id the model's generation config, its config or the tokenizer declares.

    Chat models often end a turn with a token other than the tokenizer's EOS (``<|im_end|>``); the
    generation config lists it.
    """
    ids: set[int] = set()
    sources = [getattr(model, "generation_config", None), model.config]
    values = [getattr(source, "eos_token_id", None) for source in sources if source is not None]
    if tokenizer is not None:
        values.append(tokenizer.eos_token_id)
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _forward_arguments(model: torch.nn.Module) -> tuple[str, bool]:
    """The cache keyword of this transformers version (``cache`` since 5.x, ``past_key_values`` before),
    and whether the forward can skip the logits of all but the last position."""
    parameters = inspect.signature(model.forward).parameters
    cache_argument = "cache" if "cache" in parameters else "past_key_values"
    return cache_argument, "logits_to_keep" in parameters


def _new_cache(model: torch.nn.Module) -> Any:
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers before the cache refactor
        return DynamicCache()


class ModelStepper:
    """One model with one KV cache: ``prefill(ids)`` then ``step(token)``, each returning last-position logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache_argument, self.keeps_last_logits = _forward_arguments(model)
        self.cache: Any = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.cache_argument: self.cache, "use_cache": True}
        if self.keeps_last_logits:
            # A 512-token prefill would otherwise project all 512 positions onto the vocabulary.
            kwargs["logits_to_keep"] = 1
        return self.model(ids, **kwargs).logits[0, -1]

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.cache = _new_cache(self.model)
        return self._forward(torch.tensor([ids], dtype=torch.long, device=self.device))

    def step(self, token: int) -> torch.Tensor:
        return self._forward(torch.tensor([[token]], dtype=torch.long, device=self.device))


class LeanStepper:
    """The same interface over :class:`~binq.nn.decoder.LeanDecoder` (LLaMA-family models).

    The decoder (and its preallocated KV cache) is kept on the model and reused while it is long enough.
    """

    def __init__(self, model: torch.nn.Module, max_length: int) -> None:
        from binq.nn.decoder import LeanDecoder

        decoder = getattr(model, "_binq_lean_decoder", None)
        if decoder is None or decoder.max_length < max_length:
            decoder = LeanDecoder(model, max_length)
            model._binq_lean_decoder = decoder
        self.decoder = decoder
        self.device = decoder.device

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.decoder.reset()
        return self.decoder.forward(torch.tensor(ids, dtype=torch.long, device=self.device))[-1]

    def step(self, token: int) -> torch.Tensor:
        return self.decoder.forward(torch.tensor([token], dtype=torch.long, device=self.device))[-1]


LOOPS = ("auto", "lean", "hf")


def make_stepper(model: torch.nn.Module, max_length: int, loop: str = "auto") -> ModelStepper | LeanStepper:
    """``lean`` (:class:`LeanStepper`), ``hf`` (the model's own forward) or ``auto`` (lean where it applies)."""
    from binq.nn.decoder import lean_unsupported

    if loop not in LOOPS:
        raise BinqError(f"unknown decode loop {loop!r} (loops: {', '.join(LOOPS)})")
    reason = lean_unsupported(model, max_length) if loop != "hf" else "asked for"
    if reason is None:
        return LeanStepper(model, max_length)
    if loop == "lean":
        raise BinqError(f"the lean decode loop cannot run this model: {reason}")
    return ModelStepper(model)


def next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else a sample from ``softmax(logits / temperature)``."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probabilities = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def check_generation_options(max_new_tokens: int, temperature: float) -> None:
    """The one-line errors of bad options, checked before a model is loaded."""
    if max_new_tokens < 1:
        raise BinqError(f"the number of new tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:  # also refuses NaN
        raise BinqError(f"the temperature must be 0 (greedy) or positive, got {temperature}")


def check_prompt_length(prompt_tokens: int, context: int | None) -> None:
    if prompt_tokens < 1:
        raise BinqError("the prompt is empty")
    if context is not None and prompt_tokens > context:
        raise BinqError(f"the prompt has {prompt_tokens} tokens, more than the model's context ({context} positions)")


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    ignore_eos: bool = False,
    on_token: Callable[[int], None] | None = None,
    loop: str = "auto",
) -> Generation:
    """Continue ``prompt_ids`` by up to ``max_new_tokens`` tokens (batch 1; see the module docstring).

    Generation also stops when the sequence fills the model's context. ``on_token`` is called with
    each new token as soon as it is chosen, the end-of-sequence token included. ``loop`` picks the decode
    loop (:func:`make_stepper`); both compute the same logits.
    """
    context = context_length(model)
    check_generation_options(max_new_tokens, temperature)
    check_prompt_length(len(prompt_ids), context)
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    max_length = len(prompt_ids) + max_new_tokens
    stepper = make_stepper(model, min(max_length, context) if context is not None else max_length, loop)
    stop_eos = set() if ignore_eos else set(eos_ids)

    started = time.perf_counter()
    logits = stepper.prefill(list(prompt_ids))
    token = next_token(logits, temperature, generator)  # int(): waits for the device as well
    prefill_s = time.perf_counter() - started

    tokens = [token]
    if on_token is not None:
        on_token(token)
    stop_reason = "max_new_tokens"
    decode_started = time.perf_counter()
    decode_steps = 0
    while True:
        if token in stop_eos:
            stop_reason = "eos"
            break
        if len(tokens) >= max_new_tokens:
            break
        if context is not None and len(prompt_ids) + len(tokens) >= context:
            stop_reason = "context"  # the next forward would need a position the model does not have
            break
        logits = stepper.step(token)
        token = next_token(logits, temperature, generator)
        decode_steps += 1
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    decode_s = time.perf_counter() - decode_started
    stats = GenerationStats(len(prompt_ids), len(tokens), prefill_s, decode_s, decode_steps, stop_reason)
    return Generation(tokens, stats, "lean" if isinstance(stepper, LeanStepper) else "hf")


class TextStream:
    """Turns tokens into text as they come: ``push(token)`` returns the newly printable text.

    The whole pending sequence is decoded each time and only the new suffix is returned, so a
    character split over two byte-level tokens appears once complete. After a newline the pending
    tokens are dropped but the last one, which keeps the leading-space context of the next word.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.pending: list[int] = []
        self.printed = 0  # characters of decode(pending) already returned

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self._decode(self.pending)
        if text.endswith(REPLACEMENT_CHARACTER):
            return ""  # an incomplete character: wait for the rest of its bytes
        new_text = text[self.printed :]
        if text.endswith("\n"):
            self.pending = self.pending[-1:]
            self.printed = len(self._decode(self.pending))
        else:
            self.printed = len(text)
        return new_text

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character shows as U+FFFD)."""
        text = self._decode(self.pending)
        new_text = text[self.printed :]
        self.pending, self.printed = [], 0
        return new_text


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = False) -> list[int]:
    """The prompt's token ids; with ``chat``, as one user turn of the tokenizer's chat template."""
    if not prompt.strip():
        raise BinqError("the prompt is empty")
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise BinqError("--chat: this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    # The template writes the special tokens (BOS included) itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
