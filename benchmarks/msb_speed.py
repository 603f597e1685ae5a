"""MSB speed: one matrix on one core, and a whole model on the calibration-free path.

    OMP_NUM_THREADS=1 python benchmarks/msb_speed.py matrix [--rows 3072 --cols 8192 --groups 32 --window 64]
    OMP_NUM_THREADS=1 python benchmarks/msb_speed.py matrix --solver windowed-lo   # our WGM-LO reading
    python benchmarks/msb_speed.py model [--model smollm2-135m --workers 1 2]

``matrix`` times the paper's setting (per tensor, windowed greedy, w = 64, g = 32, lambda = 0.75) on a
random heavy-tailed matrix of the LLaMA-3.2-3B MLP shape, on one thread; the paper quotes 14 s per matrix
on one core. It also times the packing of the planes (not part of the paper's figure). ``model`` times
the whole-model calibration-free path (:func:`binq.engine.independent.quantize_independent`) for each
``--workers`` value. Both print wall and CPU seconds and the load average: on a shared machine wall
times are only comparable at equal load, and CPU time is the fairer one-core figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from binq.methods import get_method
from binq.methods.msb import MSBConfig


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_matrix(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # Student-t with 3 degrees of freedom: heavy tails like LLM weights.
    weight = torch.distributions.StudentT(3.0).sample((args.rows, args.cols)) * 0.02
    config = MSBConfig(groups=args.groups, window=args.window, solver=args.solver)
    method = get_method("msb")
    times, cpu_times = [], []
    for _ in range(args.repeat):
        started, cpu_started = time.perf_counter(), time.process_time()
        quantized = method.quantize(weight, None, config)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    started = time.perf_counter()
    storage = quantized.storage_bits
    pack_s = time.perf_counter() - started
    error = float((quantized.dequantize() - weight).square().sum() / weight.square().sum())
    figures = quantized.extra_bit_figures()
    print(
        f"matrix {args.rows}x{args.cols}, g={args.groups}, w={args.window}, solver {args.solver}, one thread; "
        f"load average {_load()}"
    )
    print(f"  quantize: {min(times):.2f} s wall (best of {args.repeat}; all: {', '.join(f'{t:.2f}' for t in times)})")
    print(
        f"  quantize: {min(cpu_times):.2f} s CPU time of this process (all: {', '.join(f'{t:.2f}' for t in cpu_times)})"
    )
    print(f"  packing the planes: {pack_s:.2f} s; groups used {quantized.groups}; relative weight error {error:.4e}")
    print(
        f"  storage {storage:.4f} bits/weight; index entropy {figures['index_entropy_bits']:.3f}; "
        f"paper's convention {figures['paper_convention_bits']:.5f} (index not counted)"
    )


def bench_model(args: argparse.Namespace) -> None:
    from binq.engine.independent import quantize_independent
    from binq.models import get_architecture, load_model
    from binq.report import extra_bit_summary

    method = get_method("msb")
    config = MSBConfig(groups=args.groups, window=args.window, granularity=args.granularity, solver=args.solver)
    for workers in args.workers:
        loaded = load_model(args.model)
        arch = get_architecture(loaded.model)
        started, cpu_started = time.perf_counter(), _cpu_s()
        result = quantize_independent(loaded.model, arch, method, config, workers, progress=False)
        wall, cpu = time.perf_counter() - started, _cpu_s() - cpu_started
        print(
            f"{args.model}: {len(result.records)} linears, workers={workers}: {wall:.1f} s wall, "
            f"{cpu:.1f} s CPU (this process and its workers); load average {_load()}"
        )
        params = sum(r.numel for r in result.records)
        storage = sum(r.storage_bits_total for r in result.records) / params
        extra = extra_bit_summary(result.weights)["linear"]
        print(
            f"  linear layers: storage {storage:.4f} bits/weight; index entropy {extra['index_entropy_bits']:.3f}; "
            f"paper's convention {extra['paper_convention_bits']:.5f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    matrix = sub.add_parser("matrix")
    matrix.add_argument("--rows", type=int, default=3072)
    matrix.add_argument("--cols", type=int, default=8192)
    matrix.add_argument("--repeat", type=int, default=2)
    model = sub.add_parser("model")
    model.add_argument("--model", default="smollm2-135m")
    model.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    model.add_argument("--granularity", default="tensor", choices=("tensor", "row", "block"))
    for p in (matrix, model):
        p.add_argument("--groups", type=int, default=32)
        p.add_argument("--window", type=int, default=64)
        p.add_argument("--solver", default="auto", help="auto (windowed per tensor), windowed-lo, ...")
    args = parser.parse_args()
    if args.what == "matrix":
        bench_matrix(args)
    else:
        bench_model(args)


if __name__ == "__main__":
    main()
