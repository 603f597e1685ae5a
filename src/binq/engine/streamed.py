"""A run whose model is never whole in memory: each block is quantized, evaluated and written while it is read.

With a streamed model (:mod:`binq.models.streaming`) every block is read from the source files once.
While it is in memory, :class:`StreamedRun` (the engine's block observer):

1. advances the evaluation's original stream through it (:class:`~binq.evaluation.layerwise.LayerwiseEvaluation`);
2. lets the method quantize it (the block-sequential engine, or :func:`quantize_free_streamed` for a
   calibration-free method), its quantized weights put in place as the in-memory run puts them;
3. advances the quantized stream through it, and writes its shard of the checkpoint
   (:class:`~binq.checkpoint.sharded.ShardedCheckpoint`);
4. keeps only a :class:`~binq.quant.structured.WeightSummary` per weight (for the report's bits), and
   the walker drops the block.

Peak memory is one block, its Hessians, the calibration activations, the evaluation's two streams and
the embeddings and head: independent of depth. The weights, records and evaluation are those of the
in-memory run, bit for bit (``tests/test_streaming.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from binq.checkpoint.sharded import ShardedCheckpoint
from binq.engine.calibrate import EngineResult, LayerRecord
from binq.engine.independent import quantize_weight
from binq.engine.resume import Progress, block_item
from binq.errors import BinqError
from binq.evaluation.layerwise import LayerwiseEvaluation
from binq.memory import trim_free_memory
from binq.methods.registry import Method
from binq.models.architectures import Architecture, block_linears, get_blocks, module_name
from binq.models.streaming import block_store
from binq.quant.structured import QuantizedWeight, WeightSummary


class StreamedRun:
    """The block observer of a streamed run (see the module docstring)."""

    keeps_weights = False

    def __init__(self, evaluation: LayerwiseEvaluation | None, checkpoint: ShardedCheckpoint | None) -> None:
        self.evaluation, self.checkpoint = evaluation, checkpoint

    def before(self, index: int, block: nn.Module) -> None:
        if self.evaluation is not None:
            self.evaluation.before(index, block)

    def after(self, index: int, block: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
        if self.evaluation is not None:
            self.evaluation.after(index, block)
        if self.checkpoint is not None:
            self.checkpoint.write_block(index, block, weights)


def quantize_free_streamed(
    model: nn.Module,
    arch: Architecture,
    method: Method,
    config: Any,
    observer: StreamedRun,
    on_layer: Callable[[LayerRecord], None] | None = None,
    progress: bool = True,
    resume: Progress | None = None,
) -> EngineResult:
    """A calibration-free method on a streamed model: block by block in this process, each linear as
    :func:`~binq.engine.independent.quantize_independent`'s workers quantize it (the same weights);
    finished blocks are recorded in, and taken from, ``resume``."""
    store = block_store(model)
    if store is None:
        raise RuntimeError("quantize_free_streamed needs a streamed model")  # a bug, not a user error
    started = time.perf_counter()
    result = EngineResult()
    blocks = get_blocks(model, arch)
    finished = resume.keep_prefix() if resume is not None else 0
    if resume is not None:
        resume.announce(len(blocks), finished)
    loaded_blocks = 0
    for index in tqdm(range(len(blocks)), desc=method.name, unit="block", disable=not progress):
        with store.block(index) as block:
            observer.before(index, block)
            linears = block_linears(block, arch)
            names = {name: module_name(arch, index, name) for name in linears}
            loaded = None
            if resume is not None and index < finished:
                expected = {names[n]: (linear.out_features, linear.in_features) for n, linear in linears.items()}
                loaded = resume.load(index, expected)
                if loaded is None:  # a damaged file: this block and every later one are recomputed
                    finished = index
                    for later in range(index + 1, len(blocks)):
                        resume.discard(later)
            weights: dict[str, QuantizedWeight] = {}
            records: list[LayerRecord] = []
            if loaded is not None:
                weights, records = loaded
                loaded_blocks += 1
            else:
                for name, linear in linears.items():
                    try:
                        quantized, error, seconds = quantize_weight(method.name, config, linear.weight.detach().float())
                    except BinqError as err:
                        raise BinqError(f"{names[name]}: {err}") from err
                    weights[names[name]] = quantized
                    records.append(LayerRecord.of(index, name, quantized, error, seconds))
            for record in records:
                linear = linears[record.name]
                linear.weight.data = weights[names[record.name]].dequantize().to(linear.weight.dtype)
                result.records.append(record)
                if on_layer is not None:
                    on_layer(record)
            if resume is not None and loaded is None:
                resume.save(index, [block_item(names[r.name], r, weights[names[r.name]]) for r in records])
            observer.after(index, block, weights)
            for name, weight in weights.items():
                result.weights[name] = WeightSummary.of(weight)  # type: ignore[assignment]
        trim_free_memory()  # as the walker does after each block
    if resume is not None and loaded_blocks:
        resume.resumed_from = loaded_blocks
    result.time_s = time.perf_counter() - started
    return result
