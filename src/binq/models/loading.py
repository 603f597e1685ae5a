"""Turn whatever the user typed (a name, a folder, a .gguf file, a Hub id) into a checked model on the CPU.

Checks that would otherwise fail deep inside a long quantization run happen here, first: the
architecture must be one binq declares (read from the config, before any weights), the block layout
must match the declaration, and every weight must be finite (a NaN would silently poison every
Hessian downstream).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from binq.errors import BinqError
from binq.models.architectures import (
    Architecture,
    architecture_for_model_type,
    block_linears,
    get_architecture,
    get_blocks,
)
from binq.models.embedded import EMBEDDED_MODELS, read_gguf, require_gguf_support
from binq.models.streaming import can_stream, open_streamed

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for calibration: CPU, eval mode, ``use_cache`` off (no KV cache during block passes)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # short name for reports: the embedded name, folder name, GGUF stem or Hub id
    path: str  # where it was read from: folder, .gguf file or Hub id
    streamed: bool = False  # the blocks stay on disk until the walker reads them (binq.models.streaming)

    @property
    def architecture(self) -> Architecture:
        return get_architecture(self.model)


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _looks_like_path(spec: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else with a separator, or a .gguf name, is a path."""
    return (
        spec.lower().endswith(".gguf")
        or spec.startswith((".", "~", "/"))
        or spec.count("/") > 1
        or "\\" in spec
        or (os.sep != "/" and os.sep in spec)
    )


def _folder_architecture(folder: Path) -> Architecture:
    """Read ``model_type`` from config.json directly: an unknown type gets binq's message, not a traceback."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BinqError(f"'{folder}' has no config.json; it is not a Hugging Face model folder")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise BinqError(f"cannot read {config_file} ({_short(error)})") from None
    if not model_type:
        raise BinqError(f"{config_file} has no model_type")
    return architecture_for_model_type(model_type)


def _read(source: str, dtype: torch.dtype, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers fills them with random values: a silent wrong answer
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BinqError(f"'{source}' does not hold the model's tensor {missing[0]}{more}")
    return model, tokenizer


def _load_folder(spec: str, folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    _folder_architecture(folder)
    try:
        return _read(str(folder), dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise BinqError(f"cannot load model '{spec}' from {folder} ({_short(error)})") from error


def _load_gguf(spec: str, file: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    require_gguf_support()
    try:
        get_architecture(AutoConfig.from_pretrained(file.parent, gguf_file=file.name))  # metadata only
        return read_gguf(file, dtype)
    except BinqError:
        raise
    except Exception as error:  # the GGUF reader raises a variety of types for corrupt/unsupported files
        raise BinqError(f"cannot load model '{spec}' ({_short(error)})") from error


def _unpack_gguf(spec: str, file: Path) -> Path:
    """The streamable folder of a ``.gguf`` file (:mod:`binq.models.gguf_unpack`), unpacked on first use."""
    from binq.models.embedded import default_cache_dir
    from binq.models.gguf_unpack import unpacked_gguf

    require_gguf_support()
    try:
        get_architecture(AutoConfig.from_pretrained(file.parent, gguf_file=file.name))  # metadata only
        return unpacked_gguf(file, default_cache_dir())
    except BinqError:
        raise
    except Exception as error:  # the GGUF reader raises a variety of types for corrupt/unsupported files
        raise BinqError(f"cannot load model '{spec}' ({_short(error)})") from error


def _load_hub(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    logger.info("'%s' is not a local path; asking the Hugging Face Hub", spec)
    try:
        get_architecture(AutoConfig.from_pretrained(spec))  # config only, before any weights are fetched
        return _read(spec, dtype)
    except BinqError:
        raise
    except Exception as error:  # network, unknown id, gated repo, ...: all mean "the Hub did not provide it"
        raise BinqError(
            f"cannot load model '{spec}': not a local directory or .gguf file, "
            f"and the Hugging Face Hub did not provide it ({_short(error)})"
        ) from error


def check_finite(model: torch.nn.Module, name: str) -> None:
    """Raise on the first floating parameter holding NaN or Inf."""
    for param_name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise BinqError(f"model '{name}' has NaN or Inf values in {param_name}; binq needs finite weights")


def _open_folder(
    spec: str, folder: Path, dtype: torch.dtype, stream: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, bool]:
    """A folder's model, streamed (its blocks left on disk) when asked and its files allow it."""
    if stream and can_stream(folder):
        _folder_architecture(folder)
        try:
            model = open_streamed(folder, dtype)
            if model is not None:
                return model, AutoTokenizer.from_pretrained(str(folder)), True
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise BinqError(f"cannot load model '{spec}' from {folder} ({_short(error)})") from error
    return *_load_folder(spec, folder, dtype), False


def load_model(spec: str, dtype: torch.dtype = torch.float32, stream: bool = False) -> LoadedModel:
    """Load ``spec``: an embedded name (``smollm2-135m``), a model folder, a ``.gguf`` file, or a Hub id.

    ``stream``: leave the decoder blocks on disk, to be read one at a time by the block walker
    (:mod:`binq.models.streaming`), where the source is a local safetensors folder whose tensor names
    are the model's, or a ``.gguf`` file (unpacked once to a cached folder, a tensor at a time:
    :mod:`binq.models.gguf_unpack`); otherwise (Hub ids, folders that cannot stream) it is loaded whole.
    ``LoadedModel.streamed`` says which happened.
    """
    path = Path(spec).expanduser()
    streamed = False
    if spec in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[spec]()
        model, tokenizer, streamed = _open_folder(spec, folder, dtype, stream)
        name, where = spec, str(folder)
    elif path.is_dir():
        model, tokenizer, streamed = _open_folder(spec, path, dtype, stream)
        name, where = path.resolve().name, str(path.resolve())
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BinqError(f"'{spec}' is a file but not a .gguf file; pass a model folder, a .gguf file or a Hub id")
        if stream:
            model, tokenizer, streamed = _open_folder(spec, _unpack_gguf(spec, path), dtype, stream)
        else:
            model, tokenizer = _load_gguf(spec, path, dtype)
        name, where = path.stem, str(path.resolve())
    elif _looks_like_path(spec):
        raise BinqError(f"no such file or directory: '{spec}'")
    else:
        model, tokenizer = _load_hub(spec, dtype)
        name, where = spec, spec

    if not streamed:
        model = model.to("cpu")
    model = model.eval()
    model.config.use_cache = False
    arch = get_architecture(model)
    for block in get_blocks(model, arch):
        block_linears(block, arch)  # the declared layout must match the real modules, in every block
    if not streamed:  # a streamed model's blocks are checked as they are read
        check_finite(model, name)
    n_params = sum(p.numel() for p in model.parameters())
    how = "blocks read one at a time" if streamed else "in memory"
    logger.info("loaded %s (%s, %.1f M parameters, %s, %s) from %s", name, arch.name, n_params / 1e6, dtype, how, where)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=where, streamed=streamed)
