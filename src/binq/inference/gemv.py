"""GEMV timings (one token, ``M = 1``): each distinct linear of a model, and binq's layouts on 7B shapes.

Decoding one token is a chain of matrix-vector products, so the time of ``y = W x`` per linear shape
is where a quantized format wins or loses against fp32 / bf16 (or fp16 on a GPU). Every time here is
the median of several calls after warm-up calls (the first also compiles a JIT kernel).

The micro-benchmark builds each layout form directly from random packed tensors (no quantization
runs): the kernels do not look at the values, only at the layout, so random bits time the same as
real ones. Its ``BinaryLinear`` keeps no dense copy: without a kernel, the reference path unpacks
the weight on every call, and that is what is timed and labelled ``reference``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from binq.nn import BinaryLinear
from binq.nn.decoder import HalfLinear
from binq.nn.kernels import select_kernel
from binq.quant.multiscale import MultiScaleWeight
from binq.quant.structured import BinaryWeight, QuantizedWeight, UniformWeight

# LLaMA-7B's linears as (out_features, in_features): q/k/v/o, gate/up, down.
SHAPES_7B = ((4096, 4096), (11008, 4096), (4096, 11008))
GROUP = 128
REFERENCE = "reference"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_call_s(
    call: Callable[[], Any],
    device: torch.device,
    warmup: int = 2,
    min_runs: int = 5,
    max_runs: int = 25,
    budget_s: float = 0.5,
) -> float:
    """Median seconds of ``call()`` after ``warmup`` calls: at least ``min_runs`` runs, more while the
    total stays under ``budget_s`` (up to ``max_runs``), so slow reference paths stay affordable. The
    median, not the mean: other processes on a shared CPU delay single runs."""
    for _ in range(warmup):
        call()
    _synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < min_runs or (len(times) < max_runs and spent < budget_s):
        started = time.perf_counter()
        call()
        _synchronize(device)
        elapsed = time.perf_counter() - started
        times.append(elapsed)
        spent += elapsed
    return statistics.median(times)


def kernel_name(module: nn.Module, x: torch.Tensor) -> str:
    """Which path a call of ``module`` on ``x`` takes: a registered kernel's name, ``reference`` or ``torch``."""
    if isinstance(module, HalfLinear) and x.device.type == "cpu":
        from binq.nn.cpu_kernels import load_library

        return "cpu-half" if load_library() is not None else "torch"
    if not isinstance(module, BinaryLinear):
        return "torch"
    kernel = select_kernel(module, x)
    return REFERENCE if kernel is None else kernel.name


def _linear_signature(module: nn.Module) -> tuple[int, int, str] | None:
    if isinstance(module, BinaryLinear):
        return module.out_features, module.in_features, module.layout
    if isinstance(module, HalfLinear):  # a head binq keeps in fp16 (compact_embeddings)
        return module.out_features, module.in_features, "fp16"
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, "dense"
    return None


@torch.inference_mode()
def model_gemv_times(model: nn.Module, dtype: torch.dtype, device: torch.device) -> list[dict[str, Any]]:
    """One record per distinct (out, in, layout) linear of ``model``: how many, which path, median µs."""
    groups: dict[tuple[int, int, str], list[nn.Module]] = {}
    names: dict[tuple[int, int, str], str] = {}
    for name, module in model.named_modules():
        signature = _linear_signature(module)
        if signature is not None:
            groups.setdefault(signature, []).append(module)
            names.setdefault(signature, name)
    records = []
    for (rows, cols, layout), modules in groups.items():
        module = modules[0]
        x = torch.randn(1, 1, cols, dtype=dtype, device=device)
        seconds = median_call_s(lambda module=module, x=x: module(x), device)
        records.append(
            {
                "shape": [rows, cols],
                "layout": layout,
                "count": len(modules),
                "example": names[(rows, cols, layout)],
                "kernel": kernel_name(module, x),
                "median_us": seconds * 1e6,
            }
        )
    return records


# --- the 7B-shape micro-benchmark ----------------------------------------------------------------------------


def _random_signs(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.uint8).bool()


def _random_scales(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return (0.01 + 0.02 * torch.rand(shape, generator=generator)).to(torch.float16)


def _binary(rows: int, cols: int, generator: torch.Generator, *, zones: int, bitmap: bool, salient: int, means: bool):
    blocks = math.ceil(cols / GROUP)
    salient_columns = residual = None
    if salient:
        # BiLLM keeps a few salient columns in every block of 128.
        salient_columns = torch.zeros(cols, dtype=torch.bool)
        salient_columns[torch.randperm(cols, generator=generator)[: salient * blocks]] = True
        residual = _random_signs(rows, int(salient_columns.sum()), generator)
    return BinaryWeight(
        signs=_random_signs(rows, cols, generator),
        scales=_random_scales((rows, blocks, zones), generator),
        block_size=GROUP,
        means=_random_scales((rows, blocks, zones), generator) if means else None,
        group_bitmap=_random_signs(rows, cols, generator) if bitmap else None,
        salient_columns=salient_columns,
        residual_signs=residual,
    )


def _uniform(rows: int, cols: int, generator: torch.Generator, bits: int) -> UniformWeight:
    groups = math.ceil(cols / GROUP)
    return UniformWeight(
        codes=torch.randint(0, 2**bits, (rows, cols), generator=generator, dtype=torch.uint8),
        scales=_random_scales((rows, groups), generator),
        bits=bits,
        group_size=GROUP,
        zeros=torch.randint(0, 2**bits, (rows, groups), generator=generator, dtype=torch.uint8),
    )


def _multiscale(rows: int, cols: int, generator: torch.Generator, groups: int) -> MultiScaleWeight:
    scales = torch.sort(_random_scales((groups,), generator).float()).values.to(torch.float16)
    return MultiScaleWeight(
        signs=_random_signs(rows, cols, generator),
        group_index=torch.randint(0, groups, (rows, cols), generator=generator, dtype=torch.uint8),
        scales=scales.reshape(1, 1, groups),
        block_size=cols,
    )


# Each binq layout form of the issue, built at (rows, cols): what the methods write for it.
LAYOUT_FORMS: dict[str, Callable[[int, int, torch.Generator], QuantizedWeight]] = {
    "arb-group g128 (1 zone)": lambda r, c, g: _binary(r, c, g, zones=1, bitmap=False, salient=0, means=False),
    "billm (bitmap, salient + residual)": lambda r, c, g: _binary(r, c, g, zones=4, bitmap=True, salient=4, means=True),
    "w11 (2 zones)": lambda r, c, g: _binary(r, c, g, zones=2, bitmap=True, salient=0, means=False),
    "uniform 2-bit g128": lambda r, c, g: _uniform(r, c, g, 2),
    "uniform 4-bit g128": lambda r, c, g: _uniform(r, c, g, 4),
    "multiscale per-tensor g8": lambda r, c, g: _multiscale(r, c, g, 8),
}


def baseline_dtypes(device: torch.device) -> dict[str, torch.dtype]:
    """The dense references: fp32 and bf16 on a CPU; fp16 (cuBLAS) and bf16 on a GPU."""
    if device.type == "cuda":
        return {"fp16": torch.float16, "bf16": torch.bfloat16}
    return {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


@torch.inference_mode()
def layout_microbenchmark(
    device: torch.device,
    shapes: tuple[tuple[int, int], ...] = SHAPES_7B,
    forms: tuple[str, ...] | None = None,
    seed: int = 0,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """For each shape: the dense baselines' GEMV, then each layout form's through ``BinaryLinear``.

    Records: ``form`` (a layout form or ``torch <dtype>``), ``shape`` [out, in], ``kernel``,
    ``median_us``, ``storage_bits`` (per weight, forms only) and ``speedup_vs_<baseline>``: baseline
    time over this time, above 1 when the form is faster.
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = compute_dtype(device)
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    for rows, cols in shapes:
        x = torch.randn(1, cols, generator=generator).to(device=device, dtype=dtype)
        baselines: dict[str, float] = {}
        for label, baseline_dtype in baseline_dtypes(device).items():
            weight = torch.randn(rows, cols, generator=generator).to(device=device, dtype=baseline_dtype)
            xb = x.to(baseline_dtype)
            baselines[label] = median_call_s(lambda w=weight, xb=xb: F.linear(xb, w), device)
            emit(
                {
                    "form": f"torch {label}",
                    "shape": [rows, cols],
                    "kernel": "torch",
                    "median_us": 1e6 * baselines[label],
                }
            )
            del weight
        for form in forms or tuple(LAYOUT_FORMS):
            weight = LAYOUT_FORMS[form](rows, cols, generator)
            module = BinaryLinear.from_weight(weight).to(device)
            seconds = median_call_s(lambda module=module, x=x: module(x), device)
            record = {
                "form": form,
                "shape": [rows, cols],
                "kernel": kernel_name(module, x),
                "median_us": seconds * 1e6,
                "storage_bits": weight.storage_bits,
            }
            record.update({f"speedup_vs_{label}": base / seconds for label, base in baselines.items()})
            emit(record)
            del module, weight
    return records
