"""``binq.load``: a binq checkpoint folder as a transformers model with ``BinaryLinear`` linears."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from binq.checkpoint.files import checkpoint_entries
from binq.checkpoint.format import QUANT_METHOD, check_quantization_config
from binq.checkpoint.header import TensorEntry
from binq.errors import BinqError

log = logging.getLogger(__name__)


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (some span several), or its type when it has none."""
    text = " ".join(str(error).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(error).__name__


def _read_config_json(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BinqError(f"'{folder}' has no config.json; it is not a binq checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # a decoding error is a ValueError
        raise BinqError(f"cannot read {config_file} ({_one_line(error)})") from None
    if not isinstance(config, dict):
        raise BinqError(f"{config_file} is not a JSON object")
    return config


def read_quantization_config(folder: Path | str) -> dict[str, Any]:
    """The validated ``quantization_config`` of a checkpoint folder (a BinqError if it is not one)."""
    quantization = _read_config_json(Path(folder)).get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
        raise BinqError(f"'{folder}' is not a binq checkpoint (config.json has no binq quantization_config)")
    check_quantization_config(quantization)
    return quantization


def is_checkpoint(folder: Path | str) -> bool:
    """True for a folder whose config.json declares ``quant_method: binq``."""
    try:
        quantization = _read_config_json(Path(folder)).get("quantization_config")
    except BinqError:
        return False
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def _check_model_config(folder: Path) -> None:
    """Build the model config.json describes, on the meta device: a refusal there is one line naming the file.

    transformers validates the model's own fields (sizes, activation, rope) as it builds the config or
    the modules, with its own exception types; this runs the same steps without memory or weights, so
    that a damaged config.json fails here instead of as a traceback from inside ``from_pretrained``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except BinqError:
        raise
    except Exception as error:  # whatever transformers raises, the cause is config.json
        reason = f"{type(error).__name__}: {_one_line(error)}"
        config_file = folder / "config.json"
        raise BinqError(f"{config_file} does not describe a model transformers can build ({reason})") from None


def load(
    folder: Path | str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    cache_weight: bool = False,
    fp16_embeddings: bool = False,
) -> Any:
    """Load a binq checkpoint: a transformers causal LM whose quantized linears are ``BinaryLinear``.

    The same path as ``AutoModelForCausalLM.from_pretrained(folder)`` after ``import binq``, with the
    checkpoint's config checked first. ``dtype`` is the compute dtype of everything that is not packed
    (float32 by default, as binq evaluates on CPUs); ``cache_weight`` keeps each dequantized weight.

    ``fp16_embeddings`` (fp32 on the CPU only): keep the token embedding and the head in fp16, as
    :func:`~binq.nn.decoder.compact_embeddings` does, without ever holding them in fp32. When every
    unquantized tensor is stored in fp16 the model is read in fp16 and all but those two are widened to
    fp32 (exactly); otherwise it is read in fp32 and compacted where that is exact. Same numbers either way.
    """
    from transformers import AutoModelForCausalLM

    from binq.integration.transformers import register
    from binq.nn import set_weight_cache
    from binq.nn.decoder import compact_embeddings, widen_except_embeddings

    folder = Path(folder)
    modules = set(read_quantization_config(folder)["modules"])
    # every tensor's byte range checked before any loader maps a file
    entries = {name: entry for name, (_, entry) in checkpoint_entries(folder).items()}
    _check_model_config(folder)
    register()
    direct = fp16_embeddings and dtype == torch.float32 and device == "cpu" and _unquantized_all_fp16(entries, modules)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16 if direct else dtype)
    model = model.to(device).eval()
    if direct:
        widen_except_embeddings(model, torch.float32)
    elif fp16_embeddings and dtype == torch.float32 and device == "cpu":
        compact_embeddings(model)
    set_weight_cache(model, cache_weight)
    return model


def _unquantized_all_fp16(entries: dict[str, TensorEntry], modules: set[str]) -> bool:
    """Whether every floating-point tensor outside the quantized modules is stored in fp16."""
    plain = [e for name, e in entries.items() if name.rpartition(".")[0] not in modules and e.dtype.is_floating_point]
    return bool(plain) and all(e.dtype == torch.float16 for e in plain)
