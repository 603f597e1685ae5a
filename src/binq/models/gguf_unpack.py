"""A ``.gguf`` model made streamable: its tensors unpacked to a safetensors folder one at a time.

transformers reads a GGUF file whole: every tensor de-quantized to float at once, the model in memory
before binq sees a block. :func:`unpacked_gguf` instead writes the file's model once to a cache folder
(``$BINQ_CACHE/gguf/<stem>-<bytes>-<mtime>``): ``config.json`` and the tokenizer as transformers reads
them from the file's metadata, then each tensor read from the file on its own, de-quantized, renamed
and reordered exactly as transformers' own GGUF loader does it (its tensor-name map and per-architecture
processors, e.g. LLaMA's q/k row order), in float32 (a de-quantized value is generally not an fp16
number). Tensors are grouped into one shard per decoder block and one per other tensor, with
``model.safetensors.index.json`` written last and the folder renamed into place only when whole, so
a crash never leaves a folder that looks complete. The streamed model (:mod:`binq.models.streaming`)
then reads that folder block by block: resident memory is one tensor while unpacking, one block after.

The tensor data are read with plain file reads, not through a memory map: a map's pages would stay
resident for the life of the reader, and the whole file would end up counted in the process's memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binq.checkpoint.save import write_tensors
from binq.errors import BinqError
from binq.memory import trim_free_memory

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_BLOCK = re.compile(r"^(.*\.layers)\.(\d+)\.")


def cache_folder(file: Path, cache: Path) -> Path:
    """Where ``file``'s unpacked model lives: named by the file's stem, size and modification time."""
    stat = file.stat()
    return cache / "gguf" / f"{file.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def unpacked_gguf(file: Path, cache: Path) -> Path:
    """The safetensors folder of ``file``'s model, unpacked now unless an earlier run did (module docstring)."""
    folder = cache_folder(file, cache)
    if (folder / INDEX_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".partial", dir=folder.parent))
    try:
        log.info("unpacking %s to %s, one tensor at a time", file.name, folder)
        unpack_gguf(file, scratch)
        if folder.exists():  # another process finished first: keep its folder
            shutil.rmtree(scratch)
        else:
            os.replace(scratch, folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return folder


def unpack_gguf(file: Path, dest: Path) -> None:
    """Write ``file``'s model to the existing folder ``dest`` (config, tokenizer, float32 shards, index)."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    parsed = load_gguf_checkpoint(str(file), return_tensors=False)  # metadata only
    reader = GGUFReader(str(file))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied head is stored once (as the embedding) and named once below
    mapping = get_gguf_hf_weights_map(model, processor)
    expected = {name for name, _ in model.named_parameters()}  # a tied head once
    # Everything the reader needs later, without touching the mapped data: then the map is let go.
    entries = [(t.name, t.tensor_type, t.data.dtype, tuple(t.data.shape), int(t.data_offset), int(t.n_bytes))
               for t in reader.tensors]  # fmt: skip
    del reader

    def hf_name(gguf_name: str, weights: np.ndarray) -> tuple[str | None, np.ndarray]:
        result = processor.process(
            weights=weights, name=gguf_name, tensor_key_mapping=mapping, parsed_parameters=parsed
        )
        return mapping.get(result.name), result.weights

    # One shard per block (its tensors are consecutive in the GGUF files llama.cpp writes) or per other
    # tensor; a cache of binq's own, so the shards are simply numbered in the order they are written.
    weight_map: dict[str, str] = {}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    sizes = 0

    def write(tensors: dict[str, torch.Tensor]) -> None:
        nonlocal sizes
        shard = f"part-{len(set(weight_map.values())) + 1:05d}.safetensors"
        write_tensors(dest / shard, tensors)
        for name, tensor in tensors.items():
            weight_map[name] = shard
            sizes += tensor.numel() * tensor.element_size()

    per_block: dict[int, set[str]] = {}  # each block's parameters, to know when its shard is complete
    for name in expected:
        if match := _BLOCK.match(name):
            per_block.setdefault(int(match.group(2)), set()).add(name)
    with open(file, "rb") as handle:
        for gguf_name, kind, dtype, shape, offset, size in entries:
            handle.seek(offset)
            raw = np.frombuffer(handle.read(size), dtype=dtype).reshape(shape)
            name, weights = hf_name(gguf_name, dequantize(raw, kind))
            del raw
            if name is None:
                continue
            tensor = torch.from_numpy(np.array(weights, dtype=np.float32))  # a writable copy
            match = _BLOCK.match(name)
            if match is None:
                write({name: tensor})
                continue
            index = int(match.group(2))
            for earlier in [k for k in pending if k < index]:  # blocks come in order: an earlier one is done
                write(pending.pop(earlier))
            pending.setdefault(index, {})[name] = tensor
            if set(pending[index]) >= per_block[index]:
                write(pending.pop(index))
                trim_free_memory()
    for _, tensors in sorted(pending.items()):
        write(tensors)
    missing = sorted(expected - set(weight_map))
    if missing:
        raise BinqError(f"{file.name}: the model's tensor {missing[0]} is not in the file")
    config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    index: dict[str, Any] = {"metadata": {"total_size": sizes}, "weight_map": dict(sorted(weight_map.items()))}
    partial = dest / (INDEX_FILE + ".partial")
    partial.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    partial.replace(dest / INDEX_FILE)
