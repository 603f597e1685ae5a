"""The block-sequential calibration engine (GPTQ's layer-sequential pipeline, which BiLLM and ARB share).

1. The block walker (:mod:`binq.engine.walker`) captures block 0's inputs for every calibration sample
   (and every block's extra arguments).
2. For each block, moved alone to the compute device:
   - hook the first linear of each group of linears that share an input, and run the samples through
     the block to accumulate one Hessian per group (groups share it: q/k/v need one, not three);
   - quantize every linear with the method (a pure function of weight, Hessian and config), and
     put the dequantized weight in place;
   - re-run the samples through the quantized block: its outputs are the next block's inputs.
3. The model stays on the CPU; calibration activations stay on the CPU unless they fit on the device.

In a multi-process run (``torch.distributed`` initialised by the caller, each rank with its own share of
the calibration samples) two steps join in: an all-reduce of each accumulator
(:meth:`HessianAccumulator.reduce_`, called here and a no-op in one process) and a broadcast of each
quantized weight from the rank that made it (:func:`owner_rank` spreads the linears, :func:`_share_weight`
broadcasts; both are no-ops in one process, and each rank's result holds the structured weights and
records it made; :func:`binq.engine.distributed.gather_result` collects them on rank 0). Each rank first
quantizes all its linears of a stage, then the stage's weights are broadcast in model order, so the
ranks work on a stage's linears at the same time. docs/DISTRIBUTED.md has the whole picture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from binq.engine.walker import walk_blocks
from binq.errors import BinqError
from binq.methods.registry import Method
from binq.models.architectures import Architecture
from binq.quant.hessian import relative_output_error
from binq.quant.structured import QuantizedWeight

log = logging.getLogger(__name__)

HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_device(device: str) -> None:
    """Refuse a device torch cannot parse, or CUDA without CUDA, with a one-line error."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise BinqError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BinqError(f"--device {device} asked for, but no CUDA device is available")


@dataclass
class EngineConfig:
    """How the engine runs (not what the method does).

    - ``device``: where one block at a time is computed (``cpu``, ``cuda``, ``cuda:1``).
    - ``hessian_dtype``: ``float32`` (GPTQ's) or ``float64`` (advised for inputs wider than 8192).
    - ``true_sequential``: quantize groups of linears one after another inside a block, each seeing
      the already-quantized earlier ones (GPTQ's ``--true-sequential``; BiLLM and ARB do not).
    - ``activations_on_device``: keep calibration activations on the device; ``None`` decides by
      free memory.
    """

    device: str = "cpu"
    hessian_dtype: str = "float32"
    true_sequential: bool = False
    activations_on_device: bool | None = None

    def __post_init__(self) -> None:
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise BinqError(f"--hessian-dtype must be one of {', '.join(HESSIAN_DTYPES)}")
        check_device(self.device)


@dataclass
class LayerRecord:
    """One quantized linear: what the per-module table and report.json show."""

    block: int
    name: str
    shape: tuple[int, int]
    relative_error: float  # ||(W - Q) X||^2 / ||W X||^2 on the calibration inputs
    compute_bits: float
    storage_bits: float
    storage_bits_total: int
    numel: int
    time_s: float

    @classmethod
    def of(cls, block: int, name: str, quantized: QuantizedWeight, error: float, time_s: float) -> LayerRecord:
        return cls(
            block=block,
            name=name,
            shape=quantized.shape,
            relative_error=error,
            compute_bits=quantized.compute_bits,
            storage_bits=quantized.storage_bits,
            storage_bits_total=quantized.storage_bits_total,
            numel=quantized.numel,
            time_s=time_s,
        )


@dataclass
class EngineResult:
    """What the engine (or the calibration-free path) made: a record per linear, the structured weights by
    full module name, and the seconds it took."""

    records: list[LayerRecord] = field(default_factory=list)
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    time_s: float = 0.0


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes of the ``torch.distributed`` run (``(0, 1)`` outside one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def owner_rank(index: int) -> int:
    """Round-robin assignment of a block's linears to ranks (always rank 0 in one process)."""
    return index % rank_and_world()[1]


def _share_weight(linear: nn.Linear, owner: int) -> None:
    """In a multi-process run, every rank takes the quantized weight from the rank that made it."""
    rank, world = rank_and_world()
    if world == 1:
        return
    if rank != owner:
        # A fresh tensor: callers may hold the original (for KL), which must not be overwritten.
        linear.weight.data = linear.weight.data.clone()
    dist.broadcast(linear.weight.data, src=owner)


def _quantize_linear(
    full_name: str, linear: nn.Linear, hessian: torch.Tensor, method: Method, config: Any
) -> tuple[QuantizedWeight, float]:
    weight = linear.weight.detach().to(torch.float32)
    if not torch.isfinite(weight).all():
        raise BinqError(f"{full_name}: the weight has NaN or Inf entries")
    try:
        quantized = method.quantize(weight, hessian.to(weight.device), config)
    except BinqError as err:
        raise BinqError(f"{full_name}: {err}") from err
    dequantized = quantized.dequantize().to(weight.device)
    error = relative_output_error(weight, dequantized, hessian)
    # A new tensor, not an in-place copy: callers may hold the original for reference evaluations.
    linear.weight.data = dequantized.to(linear.weight.dtype)
    return quantized, error


def quantize_model(
    model: nn.Module,
    arch: Architecture,
    calibration: torch.Tensor,
    method: Method,
    method_config: Any,
    engine: EngineConfig | None = None,
    on_layer: Callable[[LayerRecord], None] | None = None,
    progress: bool = True,
) -> EngineResult:
    """Quantize every declared linear of every block of ``model`` (on the CPU) in place.

    ``calibration`` is ``[N, L]`` token ids. Returns the structured weights by full module name and a
    record per linear; ``on_layer`` sees each record as soon as it exists.
    """
    engine = engine or EngineConfig()
    device = torch.device(engine.device)
    hessian_dtype = HESSIAN_DTYPES[engine.hessian_dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # reproducible Hessian factors (GPTQ's setting)
    torch.backends.cudnn.allow_tf32 = False
    result = EngineResult()
    started = time.perf_counter()

    groups = list(arch.linear_groups)
    position = 0  # linears spread over ranks in model order, round-robin
    stages = [[g] for g in groups] if engine.true_sequential else [groups]
    rank = rank_and_world()[0]
    index = 0
    walk = walk_blocks(
        model, arch, calibration, device, engine.activations_on_device, progress=progress, desc=method.name
    )
    try:
        for step in walk:
            index = step.index
            for stage in stages:
                accumulators = step.hessians(stage, hessian_dtype)
                owners: list[tuple[str, int]] = []  # every linear of the stage and the rank that makes it
                for group in stage:
                    group_owners = [owner_rank(position + i) for i in range(len(group))]
                    position += len(group)
                    owners += zip(group, group_owners, strict=True)
                    if rank not in group_owners:
                        continue
                    hessian = accumulators[group].hessian()
                    for name, owner in zip(group, group_owners, strict=True):
                        if owner != rank:
                            continue
                        linear = step.linears[name]
                        full_name = step.full_name(name)
                        t0 = time.perf_counter()
                        quantized, error = _quantize_linear(full_name, linear, hessian, method, method_config)
                        record = LayerRecord.of(index, name, quantized, error, time.perf_counter() - t0)
                        result.weights[full_name] = quantized
                        result.records.append(record)
                        if on_layer is not None:
                            on_layer(record)
                    del hessian
                # Only now, so that no rank waits for another's linear before starting on its own.
                for name, owner in owners:
                    _share_weight(step.linears[name], owner)
    except torch.cuda.OutOfMemoryError as err:
        raise BinqError(
            f"out of memory on {device} in block {index}: use fewer or shorter calibration samples, "
            "--hessian-dtype float32, or --device cpu"
        ) from err
    result.time_s = time.perf_counter() - started
    return result
