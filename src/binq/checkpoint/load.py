"""``binq.load``: a binq checkpoint folder as a transformers model with ``BinaryLinear`` linears."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from binq.checkpoint.format import QUANT_METHOD, check_quantization_config
from binq.errors import BinqError

log = logging.getLogger(__name__)


def read_quantization_config(folder: Path | str) -> dict[str, Any]:
    """The validated ``quantization_config`` of a checkpoint folder (a BinqError if it is not one)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise BinqError(f"'{folder}' has no config.json; it is not a binq checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BinqError(f"cannot read {config_file} ({error})") from None
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
        raise BinqError(f"'{folder}' is not a binq checkpoint (config.json has no binq quantization_config)")
    check_quantization_config(quantization)
    return quantization


def is_checkpoint(folder: Path | str) -> bool:
    """True for a folder whose config.json declares ``quant_method: binq``."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return False
    try:
        quantization = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def load(
    folder: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu", cache_weight: bool = False
) -> Any:
    """Load a binq checkpoint: a transformers causal LM whose quantized linears are ``BinaryLinear``.

    The same path as ``AutoModelForCausalLM.from_pretrained(folder)`` after ``import binq``, with the
    checkpoint's config checked first. ``dtype`` is the compute dtype of everything that is not packed
    (float32 by default, as binq evaluates on CPUs); ``cache_weight`` keeps each dequantized weight.
    """
    from transformers import AutoModelForCausalLM

    from binq.integration.transformers import register
    from binq.nn import set_weight_cache

    read_quantization_config(folder)
    register()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model = model.to(device).eval()
    set_weight_cache(model, cache_weight)
    return model
