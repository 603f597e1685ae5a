"""Cost of the reference bit-plane (AND + popcount) linear against the simulated fp32 linear, on the CPU.

Usage: python benchmarks/bitplane_cost.py [--tokens 64] [--threads 1]. Prints one row per layer shape of
SmolLM2-135M: word operations per output, wall time per token of both paths, and their agreement.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from binq.activations.int4 import quantize_per_token
from binq.nn.bitplane import bitplane_linear, pack_two_group_weight
from binq.quant.structured import BinaryWeight

SHAPES = {"q/o (576 x 576)": (576, 576), "gate/up (1536 x 576)": (1536, 576), "down (576 x 1536)": (576, 1536)}


def random_w11(rows: int, cols: int, block_size: int = 128) -> BinaryWeight:
    blocks = math.ceil(cols / block_size)
    return BinaryWeight(
        signs=torch.rand(rows, cols) < 0.5,
        scales=(torch.rand(rows, blocks, 2) * 0.05).sort(-1).values.half(),
        block_size=block_size,
        group_bitmap=torch.rand(rows, cols) < 0.3,
    )


def best_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.tokens} tokens, {args.threads} thread(s), block 128, INT4 asymmetric activations")
    print("| layer | AND+popcount word ops per token | bit-plane ms/token | fp32 matmul ms/token | max rel. diff |")
    print("|---|---|---|---|---|")
    for name, (rows, cols) in SHAPES.items():
        weight = random_w11(rows, cols)
        packed = pack_two_group_weight(weight)
        x = torch.randn(args.tokens, cols)
        codes = quantize_per_token(x)
        dense = weight.dequantize()
        words = packed.positive.shape[1] * packed.positive.shape[2]
        # Per token and output: 4 planes x 2 groups x (AND + AND + 2 popcounts) per word.
        ops = rows * words * 4 * 2 * 4
        exact = bitplane_linear(codes, packed)
        simulated = codes.dequantize().double() @ weight.dequantize(torch.float64).T
        diff = float((exact - simulated).abs().max() / simulated.abs().max())
        t_bits = best_time(lambda c=codes, p=packed: bitplane_linear(c, p), 2) / args.tokens * 1e3
        xq = codes.dequantize()
        t_dense = best_time(lambda a=xq, w=dense: a @ w.T, 5) / args.tokens * 1e3
        print(f"| {name} | {ops:,} | {t_bits:.3f} | {t_dense:.4f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
