"""Multi-process runs of ``binq quantize`` (``torchrun``, or ``binq quantize --nproc N``): docs/DISTRIBUTED.md.

What a run of N ranks splits and what it gathers:

- every rank reads the same calibration windows and keeps its share ``windows[rank::N]``
  (:func:`share_windows`); the engine sums each Hessian over the ranks (an all-reduce) and spreads a
  block's linears over them by their cost (:func:`~binq.engine.calibrate.stage_owners`), each
  quantized weight broadcast from the rank that made it (:mod:`binq.engine.calibrate`);
- a calibration-free method deals the model's linears out round-robin, ``linears[rank::N]``, with no
  wait between blocks (:func:`quantize_independent_share`);
- :func:`gather_result` sends every rank's structured weights (their packed tensors and metadata, as a
  checkpoint stores them) and records to rank 0, which rebuilds them in model order; rank 0 alone
  evaluates and writes the report and the checkpoint.

The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): :func:`process_group` initialises it with gloo for the CPU or NCCL
for CUDA, each rank on ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from binq.engine.calibrate import EngineResult, LayerRecord, rank_and_world
from binq.engine.independent import quantize_weight
from binq.errors import BinqError
from binq.methods.registry import Method
from binq.models.architectures import Architecture, module_name, named_linears
from binq.quant.structured import QuantizedWeight, layout_class

log = logging.getLogger(__name__)

__all__ = [
    "gather_result",
    "launched_world_size",
    "process_group",
    "quantize_independent_share",
    "rank_and_world",
    "rank_device",
    "share_windows",
]

# Ranks wait for each other at every block (and rank 0 for the slowest rank's share at the gather): a
# long bound, since torchrun stops every rank as soon as one fails.
TIMEOUT = timedelta(hours=24)


def launched_world_size() -> int:
    """The number of processes torchrun started (its ``WORLD_SIZE``; 1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise BinqError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def process_group(device: str) -> Iterator[tuple[int, int]]:
    """Initialise ``torch.distributed`` from torchrun's environment for the ``with`` body and yield
    ``(rank, world size)``: gloo when ``device`` is the CPU, NCCL (each rank on ``cuda:LOCAL_RANK``)
    when it is CUDA. Outside torchrun, with one process, or when the caller already initialised a group,
    it changes nothing."""
    if launched_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        yield rank_and_world()
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local, count = _local_rank(), torch.cuda.device_count()
        if local >= count:
            raise BinqError(f"process {local} of this machine has no GPU of its own ({count} CUDA devices here)")
        torch.cuda.set_device(local)
    elif not dist.is_gloo_available():
        raise BinqError("this build of torch has no gloo backend: a multi-process run on the CPU needs it")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield rank_and_world()
    finally:
        dist.destroy_process_group()


def rank_device(device: str) -> str:
    """The compute device of this rank: ``cuda:LOCAL_RANK`` for a CUDA device in a multi-process run."""
    if rank_and_world()[1] > 1 and torch.device(device).type == "cuda":
        return f"cuda:{_local_rank()}"
    return device


def share_windows(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows, ``windows[rank::world]`` (all of them in one process)."""
    rank, world = rank_and_world()
    if windows.shape[0] < world:
        raise BinqError(f"{windows.shape[0]} calibration windows cannot be shared by {world} processes")
    return windows[rank::world]


def quantize_independent_share(
    model: nn.Module, arch: Architecture, method: Method, method_config: Any, progress: bool = True
) -> EngineResult:
    """A calibration-free method in a multi-process run: this rank quantizes linears ``rank::world`` (in
    model order) in its own process, each as :func:`binq.engine.independent.quantize_independent` would;
    :func:`gather_result` then puts the others' weights into rank 0's model."""
    if not method.calibration_free:
        raise BinqError(f"method '{method.name}' needs calibration: it cannot run on the independent path")
    rank, world = rank_and_world()
    started = time.perf_counter()
    result = EngineResult()
    jobs = named_linears(model, arch)[rank::world]
    for job in tqdm(jobs, desc=f"{method.name} /{world}", unit="linear", disable=not progress):
        weight = job.linear.weight.detach().to(torch.float32).cpu()
        if not torch.isfinite(weight).all():
            raise BinqError(f"{job.full_name}: the weight has NaN or Inf entries")
        try:
            quantized, error, seconds = quantize_weight(method.name, method_config, weight)
        except BinqError as err:
            raise BinqError(f"{job.full_name}: {err}") from err
        job.linear.weight.data = quantized.dequantize().to(job.linear.weight.dtype)  # new tensor: originals stay
        result.weights[job.full_name] = quantized
        result.records.append(LayerRecord.of(job.block, job.name, quantized, error, seconds))
    result.time_s = time.perf_counter() - started
    return result


def _payload(result: EngineResult, arch: Architecture) -> list[tuple[Any, ...]]:
    """What a rank sends: ``(full name, record, layout, packed tensors, metadata)`` per linear it made."""
    records = {module_name(arch, record.block, record.name): record for record in result.records}
    payload = []
    for full_name, weight in result.weights.items():
        tensors = {key: tensor.detach().cpu() for key, tensor in weight.packed_tensors().items()}
        payload.append((full_name, records[full_name], weight.layout, tensors, weight.metadata()))
    return payload


def gather_result(
    result: EngineResult, model: nn.Module, arch: Architecture, fill_weights: bool = False
) -> EngineResult | None:
    """Every rank's structured weights and records on rank 0, in model order (``None`` on other ranks).

    The weights travel as a checkpoint stores them (packed tensors and metadata) and are rebuilt with
    their layout's ``from_packed``; rank 0 keeps its own objects. ``fill_weights``: also put the
    dequantized weights made elsewhere into rank 0's model (the calibration-free path; the engine
    already broadcast them). Rank 0's ``time_s`` is its own time plus the wait for the gather.
    """
    rank, world = rank_and_world()
    if world == 1:
        return result
    started = time.perf_counter()
    payload = _payload(result, arch)
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if rank != 0:
        return None
    assert gathered is not None
    made: dict[str, tuple[QuantizedWeight, LayerRecord]] = {}
    for source, items in enumerate(gathered):
        for full_name, record, layout, tensors, metadata in items:
            if full_name in made:
                raise RuntimeError(f"{full_name} was quantized by more than one rank")
            weight = result.weights[full_name] if source == 0 else layout_class(layout).from_packed(tensors, metadata)
            made[full_name] = (weight, record)
    merged = EngineResult(time_s=result.time_s + time.perf_counter() - started)
    for job in named_linears(model, arch):
        if job.full_name not in made:
            raise RuntimeError(f"{job.full_name} was quantized by no rank")
        weight, record = made[job.full_name]
        merged.weights[job.full_name] = weight
        merged.records.append(record)
        if fill_weights and job.full_name not in result.weights:
            job.linear.weight.data = weight.dequantize().to(job.linear.weight.dtype)
    return merged
