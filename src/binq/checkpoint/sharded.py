"""A checkpoint written one block at a time: safetensors shards and ``model.safetensors.index.json``.

A streamed run (:mod:`binq.models.streaming`) never holds the whole quantized model: as soon as a block
is done, :meth:`ShardedCheckpoint.write_block` writes its packed linears and its other tensors (norms)
to shard ``k`` of ``n`` (``n`` = blocks + 1), and forgets them. :meth:`ShardedCheckpoint.finish` writes
the last shard (embeddings, final norm, LM head: every tensor outside the blocks, tied ones once), the
index transformers reads (``weight_map``: tensor -> shard, ``metadata.total_size``), config.json with
the ``quantization_config`` and the tokenizer, and removes the weight files of any earlier checkpoint
in the folder. The tensors are exactly those :func:`~binq.checkpoint.save.save_checkpoint` writes to one
file; only their placement differs (docs/FORMAT.md).

Each shard is written atomically. The index is written last: a folder without it (a run killed
before the end) is not a checkpoint a loader would read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from binq.checkpoint.format import INDEX_FILE
from binq.checkpoint.save import (
    _quantized_tensors,
    _unquantized_tensors,
    remove_stale_files,
    write_config,
    write_tensors,
)
from binq.quant.structured import QuantizedWeight

log = logging.getLogger(__name__)


def shard_name(index: int, total: int) -> str:
    """transformers' shard naming: ``model-00003-of-00031.safetensors`` for ``index`` 2."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class ShardedCheckpoint:
    """Writes a checkpoint to ``out`` block by block (see the module docstring)."""

    def __init__(self, out: Path | str, model: nn.Module, blocks: str, count: int, dtype: torch.dtype | None) -> None:
        """``blocks``: the dotted path of the model's decoder blocks (``model.layers``), ``count`` of them."""
        self.out = Path(out)
        self.model, self.prefix, self.dtype = model, blocks + ".", dtype
        self.blocks = count
        self.total = self.blocks + 1
        self.weight_map: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.modules: dict[str, tuple[str, dict[str, Any]]] = {}
        self.out.mkdir(parents=True, exist_ok=True)

    def write_block(self, index: int, block: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
        """Block ``index`` (in memory, its quantized linears ``weights`` by full module name) to its shard."""
        tensors = _quantized_tensors(self.model, weights, self.dtype)
        prefix = f"{self.prefix}{index}."
        for name, tensor in block.state_dict().items():
            full = prefix + name
            if full.rpartition(".")[0] in weights:
                continue
            if self.dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            tensors[full] = tensor.detach().cpu().contiguous()
        self._write(shard_name(index, self.total), tensors)
        for name, weight in weights.items():
            self.modules[name] = (weight.layout, weight.metadata())

    def _write(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        write_tensors(self.out / file, tensors)
        for name, tensor in tensors.items():
            self.weight_map[name] = file
            self.sizes[name] = tensor.numel() * tensor.element_size()

    def finish(
        self,
        *,
        tokenizer: Any = None,
        method: str | None = None,
        method_config: dict[str, Any] | None = None,
    ) -> Path:
        """The last shard, the index, config.json and the tokenizer; returns the index's path."""
        missing = [i for i in range(self.blocks) if shard_name(i, self.total) not in self.weight_map.values()]
        if missing:
            raise RuntimeError(f"block {missing[0]} was never written")  # a bug, not a user error
        last = shard_name(self.blocks, self.total)
        self._write(last, _unquantized_tensors(self.model, set(), self.dtype, skip_prefix=self.prefix))
        index = {
            "metadata": {"total_size": sum(self.sizes.values())},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        path = self.out / INDEX_FILE
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        partial.replace(path)
        remove_stale_files(self.out, keep={INDEX_FILE, *self.weight_map.values()})
        write_config(self.out, self.model, self.modules, method, method_config, self.dtype, None, tokenizer)
        size = sum(f.stat().st_size for f in self.out.glob("model-*-of-*.safetensors"))
        log.info("wrote checkpoint %s (%d shards, %.1f MiB)", self.out, self.total, size / 2**20)
        return path
