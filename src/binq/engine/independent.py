"""The calibration-free path: every declared linear quantized on its own, in parallel worker processes.

A calibration-free method (``Method.calibration_free``, e.g. ``msb``) needs neither calibration data nor
the block-sequential engine: each weight matrix depends on nothing but itself, so matrices are
embarrassingly parallel. Workers are processes (the solvers are Python and numpy, which threads would
serialize), each limited to one torch thread (forked like torch's DataLoader workers, spawned once CUDA is
initialised); ``workers=1`` runs in this process.

The outputs are the engine's (:class:`~binq.engine.calibrate.EngineResult` with one
:class:`~binq.engine.calibrate.LayerRecord` per linear, in model order), so reports and tables work
unchanged. With no calibration inputs, ``relative_error`` is the weight-space error
``||W - Q||^2 / ||W||^2``.

With a :class:`~binq.engine.resume.Progress` (``binq quantize --out DIR``), a block's file is written as
soon as all its linears are done (blocks finish in any order with several workers), and a resumed run
takes every finished block from there, whatever the order (docs/RESUME.md).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from binq.engine.calibrate import EngineResult, LayerRecord
from binq.engine.resume import block_item
from binq.errors import BinqError
from binq.methods.registry import Method, get_method
from binq.models.architectures import Architecture, NamedLinear, named_linears
from binq.quant.structured import QuantizedWeight

if TYPE_CHECKING:
    from binq.engine.resume import Progress

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl(2)


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def relative_weight_error(weight: torch.Tensor, dequantized: torch.Tensor, rows: int = 256) -> float:
    """``||W - Q||^2 / ||W||^2`` in float64, ``rows`` rows at a time (so a large matrix never has a
    float64 copy in memory)."""
    num = den = 0.0
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].to(torch.float64)
        den += float(w.square().sum())
        num += float((w - dequantized[start : start + rows].to(torch.float64)).square().sum())
    return num / den if den > 0 else float("nan")


def quantize_weight(method_name: str, config: Any, weight: torch.Tensor) -> tuple[QuantizedWeight, float, float]:
    """One linear (in a worker): the structured weight, its relative weight error, and the time it took."""
    started = time.perf_counter()
    method = get_method(method_name)
    quantized = method.quantize(weight, None, config)
    error = relative_weight_error(weight, quantized.dequantize())
    quantized.packed_tensors()  # pack in the worker: the bit figures need the packed planes
    return quantized, error, time.perf_counter() - started


def _init_worker(parent: int | None = None) -> None:
    torch.set_num_threads(1)
    if parent is not None:
        _die_with(parent)


def _die_with(parent: int) -> None:
    """On Linux, have this worker killed when ``parent`` (the process that started it) dies, even by
    SIGKILL: an orphaned worker would otherwise wait on its queue for ever, holding its memory."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def _start_method() -> str:
    """fork where it is safe (as torch's DataLoader does: workers start in milliseconds, not after
    re-importing torch), spawn where it is not (no fork, or CUDA already initialised in this process)."""
    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def quantize_independent(
    model: nn.Module,
    arch: Architecture,
    method: Method,
    method_config: Any,
    workers: int | None = None,
    on_layer: Callable[[LayerRecord], None] | None = None,
    progress: bool = True,
    resume: Progress | None = None,
) -> EngineResult:
    """Quantize every declared linear of every block of ``model`` in place, each independently.

    ``workers`` processes (default: all cores) take one matrix at a time; at most two matrices per
    worker are in flight, so memory stays bounded on large models. ``on_layer`` sees each record as it
    completes (completion order); the result lists records in model order. ``resume``: where finished
    blocks are recorded and taken from.
    """
    if not method.calibration_free:
        raise BinqError(f"method '{method.name}' needs calibration: it cannot run on the independent path")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise BinqError(f"--workers must be at least 1, got {workers}")
    started = time.perf_counter()
    jobs = named_linears(model, arch)
    for job in jobs:
        if not torch.isfinite(job.linear.weight).all():
            raise BinqError(f"{job.full_name}: the weight has NaN or Inf entries")
    records: dict[int, LayerRecord] = {}
    result = EngineResult()
    by_block: dict[int, list[int]] = {}  # each block's positions, in model order
    for position, job in enumerate(jobs):
        by_block.setdefault(job.block, []).append(position)
    remaining = {block: len(positions) for block, positions in by_block.items()}
    bar = tqdm(total=len(jobs), desc=f"{method.name} x{workers}", unit="linear", disable=not progress)

    def finish(position: int, outcome: tuple[QuantizedWeight, float, float], record: LayerRecord | None = None) -> None:
        job = jobs[position]
        quantized, error, seconds = outcome
        job.linear.weight.data = quantized.dequantize().to(job.linear.weight.dtype)  # new tensor: originals stay valid
        result.weights[job.full_name] = quantized
        if record is None:
            record = LayerRecord.of(job.block, job.name, quantized, error, seconds)
        records[position] = record
        if on_layer is not None:
            on_layer(record)
        bar.update()
        remaining[job.block] -= 1
        if resume is not None and remaining[job.block] == 0 and job.block not in resume.finished:
            names = [jobs[p].full_name for p in by_block[job.block]]
            records_ = [records[p] for p in by_block[job.block]]
            resume.save(job.block, [block_item(n, r, result.weights[n]) for n, r in zip(names, records_, strict=True)])

    def weight_of(position: int) -> torch.Tensor:
        return jobs[position].linear.weight.detach().to(torch.float32).cpu()

    try:
        todo = _resume_blocks(resume, jobs, by_block, finish)
        if workers == 1:
            for position in todo:
                finish(position, _run_here(method, method_config, weight_of(position), jobs[position]))
        elif todo:
            context = multiprocessing.get_context(_start_method())
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)
            ) as pool:
                pending: dict[Future, int] = {}
                for position in todo:
                    pending[pool.submit(quantize_weight, method.name, method_config, weight_of(position))] = position
                    if len(pending) >= 2 * workers:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            position = pending.pop(future)
                            finish(position, _outcome(future, jobs[position]))
                for future in list(pending):
                    position = pending.pop(future)
                    finish(position, _outcome(future, jobs[position]))
    finally:
        bar.close()
    result.records = [records[p] for p in sorted(records)]
    result.time_s = time.perf_counter() - started
    return result


def _resume_blocks(
    resume: Progress | None,
    jobs: list[NamedLinear],
    by_block: dict[int, list[int]],
    finish: Callable[..., None],
) -> list[int]:
    """Put every finished block recorded in ``resume`` in place (through ``finish``); the positions left to do."""
    if resume is None or not resume.finished:
        return list(range(len(jobs)))
    resume.announce(len(by_block))
    for block in sorted(resume.finished):
        positions = by_block.get(block)
        if positions is None:  # the run.json check makes this impossible: the model has these blocks
            resume.discard(block)
            continue
        expected = {jobs[p].full_name: tuple(jobs[p].linear.weight.shape) for p in positions}
        loaded = resume.load(block, expected)  # type: ignore[arg-type]
        if loaded is None:
            continue
        weights, records = loaded
        by_name = {jobs[p].full_name: p for p in positions}
        for record, (full_name, weight) in zip(records, weights.items(), strict=True):
            finish(by_name[full_name], (weight, record.relative_error, record.time_s), record)
    done = resume.finished
    if done:
        resume.resumed_from = min(set(by_block) - done, default=len(by_block))
    return [p for p, job in enumerate(jobs) if job.block not in done]


def _run_here(
    method: Method, config: Any, weight: torch.Tensor, job: NamedLinear
) -> tuple[QuantizedWeight, float, float]:
    try:
        return quantize_weight(method.name, config, weight)
    except BinqError as err:
        raise BinqError(f"{job.full_name}: {err}") from err


def _outcome(future: Future, job: NamedLinear) -> tuple[QuantizedWeight, float, float]:
    try:
        return future.result()
    except BinqError as err:
        raise BinqError(f"{job.full_name}: {err}") from err
