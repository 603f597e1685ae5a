"""llama.cpp's metadata for a GGUF export: one :class:`GGUFArch` per HF ``model_type``, the
hyperparameters from config.json, the tokenizer from the checkpoint's tokenizer files.

Every key is written with gguf's own ``GGUFWriter.add_*`` methods and every tokenizer is read with
gguf's own vocabulary readers (``gguf.vocab``), as llama.cpp's converter does; what binq adds is the
table of which pieces each architecture needs (docs/FORMAT.md, "GGUF export").
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gguf

from binq.errors import BinqError

log = logging.getLogger(__name__)

LIKE_HINT = "pass --like a GGUF of the same model for its metadata"

HparamWriter = Callable[[gguf.GGUFWriter, dict[str, Any]], None]


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_parameters(config: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The rotary parameters of one kind of layer: transformers 5's ``rope_parameters`` (one dict, or
    one per layer type as Gemma 3's), else the older ``rope_theta``/``rope_scaling``/``rope_local_base_freq``."""
    params = config.get("rope_parameters")
    if params:
        return params if "rope_theta" in params else params[layer_type]
    if layer_type == "sliding_attention" and "rope_local_base_freq" in config:
        return {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]}
    return {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 10000.0)}


def common_hparams(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """The keys every architecture here reads: sizes, head counts and lengths, rotary base and scaling, RMS eps."""
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise BinqError(
            f"binq writes llama.cpp's RoPE metadata for default and linear RoPE, not {rope_type!r}: {LIKE_HINT}"
        )


def sliding_window(period: int, write_pattern: bool, writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """llama.cpp's Gemma 2/3 hard-code their layers' pattern, ``period - 1`` sliding-window layers then one
    global one: the window, the sliding layers' rotary base, and a check that config.json has that pattern."""
    layers = config.get("layer_types")
    expected = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(len(layers or []))]
    if layers is not None and layers != expected:
        raise BinqError(
            f"llama.cpp's {config['model_type']} repeats {period - 1} sliding layers and a global one; "
            f"config.json's layer_types differ ({layers})"
        )
    local = rope_parameters(config, "sliding_attention")
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise BinqError(f"llama.cpp's {config['model_type']} runs its sliding-window layers with unscaled RoPE")
    writer.add_sliding_window(config["sliding_window"])
    if write_pattern:
        writer.add_sliding_window_pattern(period)
    writer.add_rope_freq_base_swa(float(local["rope_theta"]))


def logit_softcapping(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    if config.get("attn_logit_softcapping") is not None:
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])


def gemma_attention_scale(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    """Gemma 2/3 scale queries by ``query_pre_attn_scalar ** -0.5``; llama.cpp has no key for it and uses
    ``head_dim`` (``hidden_size / heads`` for the layer counts of the 27B models): refuse any other."""
    scalar = config.get("query_pre_attn_scalar")
    allowed = (head_dim(config), config["hidden_size"] / config["num_attention_heads"])
    if scalar is not None and not any(math.isclose(scalar, value) for value in allowed):
        raise BinqError(
            f"query_pre_attn_scalar {scalar} is neither head_dim nor hidden_size / heads: "
            "llama.cpp would scale attention differently"
        )


@dataclass(frozen=True)
class GGUFArch:
    """How one HF ``model_type`` maps to llama.cpp."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's llama interleaves rotary pairs: undo HF's half-split layout
    norm_offset: float = 0.0  # added to RMSNorm weights (Gemma stores w - 1, llama.cpp uses w)
    hparams: tuple[HparamWriter, ...] = (common_hparams,)  # writers of the ``{arch}.*`` keys, in order


GEMMA2_HPARAMS = (common_hparams, gemma_attention_scale, partial(sliding_window, 2, False), logit_softcapping)
GEMMA3_HPARAMS = (common_hparams, gemma_attention_scale, partial(sliding_window, 6, True), logit_softcapping)

GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": GGUFArch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": GGUFArch(gguf.MODEL_ARCH.QWEN2),
    "qwen3": GGUFArch(gguf.MODEL_ARCH.QWEN3),
    "gemma": GGUFArch(gguf.MODEL_ARCH.GEMMA, norm_offset=1.0),
    "gemma2": GGUFArch(gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, hparams=GEMMA2_HPARAMS),
    "gemma3_text": GGUFArch(gguf.MODEL_ARCH.GEMMA3, norm_offset=1.0, hparams=GEMMA3_HPARAMS),
}


class MergeRankedVocab(gguf.vocab.LlamaHfVocab):
    """gguf's reader of a sentencepiece-like tokenizer.json (BPE with byte fallback), with scores.

    ``LlamaHfVocab`` scores every piece -1000, so llama.cpp's ``llama`` tokenizer, which merges first the
    pair whose joined piece scores highest, would merge left to right. A tokenizer.json converted from
    sentencepiece lists its merges in sentencepiece's score order, so the piece made by the merge of
    rank ``r`` scores ``-r``; pieces no merge makes keep -1000 (they are never a merge's result).
    """

    def __init__(self, base_path: Path) -> None:
        super().__init__(base_path)
        merges = json.loads(self.fname_tokenizer.read_text(encoding="utf-8"))["model"].get("merges") or []
        self.merge_scores: dict[str, float] = {}
        for rank, merge in enumerate(merges):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            self.merge_scores.setdefault(left + right, -float(rank))
        self.pieces = {index: piece for piece, index in self.tokenizer.get_vocab().items()}

    def get_token_score(self, token_id: int) -> float:
        return self.merge_scores.get(self.pieces.get(token_id, ""), -1000.0)


def sentencepiece_vocab(folder: Path) -> gguf.vocab.Vocab:
    if not (folder / "tokenizer.model").is_file():  # gguf's reader would also look in the parent folder
        raise FileNotFoundError("no tokenizer.model")
    return gguf.vocab.SentencePieceVocab(folder)


# Tried in order; each raises when the files are not its kind. tokenizer.model (with the sentencepiece
# package) carries the real scores; tokenizer.json is byte-level BPE (llama.cpp's gpt2) or sentencepiece-like.
VocabReader = Callable[[Path], gguf.vocab.Vocab]
VOCAB_READERS: tuple[VocabReader, ...] = (sentencepiece_vocab, gguf.vocab.BpeVocab, MergeRankedVocab)


def _adds_space_prefix(folder: Path) -> bool:
    """Whether tokenizer.json prefixes text with "▁" (sentencepiece's dummy prefix)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return True  # llama.cpp's default for its llama tokenizer
    data = json.loads(path.read_text(encoding="utf-8"))
    steps = []
    for part in (data.get("normalizer"), data.get("pre_tokenizer")):
        if part:
            steps.extend(part.get("normalizers") or part.get("pretokenizers") or [part])
    return any(
        step.get("type") == "Prepend" or (step.get("type") == "Metaspace" and step.get("prepend_scheme") != "never")
        for step in steps
    )


def tokenizer_metadata(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """``tokenizer.ggml.*`` from the checkpoint's tokenizer, padded to ``vocab_size`` as llama.cpp's converter pads.

    A byte-level BPE's pre-tokenizer is written as ``default``: llama.cpp names pre-tokenizers by a hash
    of its converter's own test text, which binq does not carry; token ids are the same either way.
    """
    vocab = None
    for reader in VOCAB_READERS:
        try:
            vocab = reader(folder)
            break
        except (FileNotFoundError, RuntimeError, TypeError, KeyError) as error:  # not this reader's kind
            log.debug("tokenizer is not %s: %s", getattr(reader, "__name__", reader), error)
        except ValueError as error:  # its kind, but inconsistent (added ids with gaps, bad merges)
            raise BinqError(f"cannot write the tokenizer for llama.cpp ({error}): {LIKE_HINT}") from None
    if vocab is None:
        model = _tokenizer_json_model(folder)
        raise BinqError(f"the tokenizer ({model}) is neither byte-level BPE nor sentencepiece-like: {LIKE_HINT}")
    log.info("tokenizer written as llama.cpp's %r model (%r)", vocab.tokenizer_model, vocab)
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    if len(tokens) > vocab_size:
        raise BinqError(f"the tokenizer has {len(tokens)} tokens, the model's embedding {vocab_size} rows")
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if vocab.tokenizer_model == "llama":
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_adds_space_prefix(folder))
    special = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
    special.add_special_token.update(_added_special_tokens(folder))
    special.add_to_gguf(writer, quiet=True)


def _added_special_tokens(folder: Path) -> dict[str, bool]:
    """Whether the tokenizer puts BOS/EOS around a text, as it does it (gguf's SpecialVocab guesses from
    tokenizer_config.json and the post-processor; llama.cpp's llama tokenizer adds BOS when not told)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and ids[:1] == [bos], "eos": eos is not None and ids[-1:] == [eos]}


def _tokenizer_json_model(folder: Path) -> str:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return "no tokenizer.json"
    return str(json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("type", "unknown model"))


def write_metadata(writer: gguf.GGUFWriter, arch: GGUFArch, config: dict[str, Any], folder: Path) -> None:
    """Everything llama.cpp reads besides the file type: name, hyperparameters, tokenizer."""
    writer.add_name(folder.resolve().name)
    for write in arch.hparams:
        write(writer, config)
    tokenizer_metadata(writer, folder, config["vocab_size"])


_SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def copy_metadata(writer: gguf.GGUFWriter, like: Path) -> None:
    """Every key-value pair of the GGUF ``like`` (hyperparameters, tokenizer), but its file type."""
    reader = gguf.GGUFReader(like)
    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_KEYS):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if sub == gguf.GGUFValueType.STRING:
            value = [v.encode("utf-8") if isinstance(v, str) else v for v in value]
        writer.add_key_value(key, value, main, sub_type=sub)
