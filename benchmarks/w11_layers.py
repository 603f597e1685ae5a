"""Layer-level ablation of the ``w11`` options on the real calibration Hessians of SmolLM2-135M.

A fast stand-in for full perplexity runs (one of those costs tens of minutes on the shared 2-core CPU):
the full-precision model runs once over the quick calibration set (32 x 512 tokens of austen, seed 0),
the Hessians of the chosen blocks' linears are kept, and each configuration quantizes those linears
from the *same* (unquantized) inputs. Reported: the mean over linears of ``||(W - Q) X||^2 / ||W X||^2``
and the stored bits per weight. Usage: ``python benchmarks/w11_layers.py [--blocks 0,10,20,29]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from binq.data import calibration_windows
from binq.engine.walker import block_hessians
from binq.methods import get_method
from binq.models import load_model
from binq.quant.hessian import relative_output_error

CONFIGS: dict[str, tuple[str, dict]] = {
    # The ablations below keep the median start (the first default) and change one thing each.
    "w11 obs; median; EM 10": ("w11", {"init": "median"}),
    "w11 no EM (median split only)": ("w11", {"init": "median", "em_iterations": 0}),
    "w11 init exact (default)": ("w11", {}),
    "w11 init salience": ("w11", {"init": "salience"}),
    "w11 importance diag": ("w11", {"init": "median", "importance": "diag"}),
    "w11 importance review": ("w11", {"init": "median", "importance": "review"}),
    "w11 importance uniform": ("w11", {"init": "median", "importance": "uniform"}),
    "w11 offsets": ("w11", {"init": "median", "offsets": True}),
    "w11 block 64": ("w11", {"init": "median", "block_size": 64}),
    "gptq 2-bit g128": ("gptq", {"bits": 2, "group_size": 128}),
    "billm": ("billm", {}),
}


def collect_hessians(
    blocks_wanted: list[int], nsamples: int, seqlen: int
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(module, weight, Hessian)`` of every linear of the chosen blocks, from the original model."""
    loaded = load_model("smollm2-135m")
    calibration = calibration_windows(loaded.tokenizer, "austen", nsamples, seqlen, 0)
    layers = block_hessians(loaded.model, loaded.architecture, calibration, blocks_wanted)
    return [(name, weight, hessian) for name, (weight, hessian) in layers.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", default="0,10,20,29")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--only", default=None, help="comma-separated config names (default: all)")
    args = parser.parse_args()
    names = list(CONFIGS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown} (known: {list(CONFIGS)})")
    layers = collect_hessians([int(b) for b in args.blocks.split(",")], args.nsamples, args.seqlen)
    print(f"blocks {args.blocks}: {len(layers)} linears; {args.nsamples} x {args.seqlen} calibration tokens")
    print("| configuration | storage bits | mean rel. output error | median | time s |")
    print("|---|---|---|---|---|")
    for name in names:
        method_name, options = CONFIGS[name]
        method = get_method(method_name)
        config = method.make_config(**options)
        errors, bits, numel = [], 0, 0
        started = time.perf_counter()
        for _key, weight, hessian in layers:
            quantized = method.quantize(weight, hessian, config)
            errors.append(relative_output_error(weight, quantized.dequantize(), hessian))
            bits += quantized.storage_bits_total
            numel += quantized.numel
        errors_t = torch.tensor(errors)
        print(
            f"| {name} | {bits / numel:.3f} | {errors_t.mean():.4f} | {errors_t.median():.4f} |"
            f" {time.perf_counter() - started:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
