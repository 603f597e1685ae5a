"""Layer-level comparison of the 1-bit methods on SmolLM2-135M's real weights and activations.

    python benchmarks/arb_layers.py                      # blocks 0, 15, 29; 16 windows of 512 tokens
    python benchmarks/arb_layers.py --blocks 3 --samples 8

For each chosen linear, the Hessian of its real inputs (original model, Austen calibration windows)
and, per method, the relative output error ``||(W - Q) X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T)``,
storage bits and seconds. It isolates the methods from error accumulation across blocks, so it runs in
minutes where a perplexity row takes an hour; the perplexity tables are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date

import torch

from binq.data import calibration_windows
from binq.engine.walker import block_hessians
from binq.methods import get_method
from binq.models import load_model
from binq.report import machine

METHODS = {
    "billm": ("billm", {}),
    "arb": ("arb", {}),
    "arb cgb": ("arb", {"cgb": True}),
    "arb-x": ("arb-x", {}),
    "arb-llm-x": ("arb-llm-x", {}),
    "arb-rc": ("arb-rc", {}),
    "arb-llm-rc": ("arb-llm-rc", {}),
    "arb-llm-x exact": ("arb-llm-x", {"exact_compensation": True}),
    "arb-llm-x exact comp-metric": ("arb-llm-x", {"exact_compensation": True, "x_metric": "compensated"}),
    "arb-llm-x intra": ("arb-llm-x", {"intra_block": True}),
    "arb-llm-rc exact": ("arb-llm-rc", {"exact_compensation": True}),
    "arb-llm-rc intra": ("arb-llm-rc", {"intra_block": True}),
    "rtn 1-bit g128": ("rtn", {"bits": 1, "group_size": 128}),
    "arb-group g128": ("arb-group", {}),
    "arb-group g128 mean": ("arb-group", {"mean": True}),
}
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def layer_hessians(
    model_name: str, blocks: list[int], samples: int, seqlen: int, names: tuple[str, ...] = LINEARS
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (weight, Hessian)}`` of the chosen linears, from the original model's real inputs."""
    loaded = load_model(model_name)
    ids = calibration_windows(loaded.tokenizer, "austen", samples, seqlen, seed=0)
    layers = block_hessians(loaded.model, loaded.architecture, ids, blocks, names, dtype=torch.float64)
    return {name: (weight, hessian.float()) for name, (weight, hessian) in layers.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", default="0,15,29")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--linears", default=",".join(LINEARS), help="linears of each block")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    layers = layer_hessians(args.model, blocks, args.samples, args.seqlen, tuple(args.linears.split(",")))
    labels = args.methods.split(",")
    errors = {label: [] for label in labels}
    bits = {label: [] for label in labels}
    seconds = {label: 0.0 for label in labels}
    for key, (weight, hessian) in layers.items():
        reference = float(((weight @ hessian) * weight).sum())
        row = []
        for label in labels:
            name, options = METHODS[label]
            method = get_method(name)
            started = time.perf_counter()
            quantized = method.quantize(weight, hessian, method.make_config(**options))
            seconds[label] += time.perf_counter() - started
            d = weight - quantized.dequantize()
            errors[label].append(float(((d @ hessian) * d).sum()) / reference)
            bits[label].append((quantized.storage_bits_total, quantized.numel))
            row.append(f"{label}={errors[label][-1]:.4f}")
        print(key, " ".join(row), flush=True)
    keys = list(layers)
    command = " ".join(["python", "benchmarks/arb_layers.py", *sys.argv[1:]])
    print(
        f"\nMade by `{command}` on {date.today()}; machine: {machine()}. Relative output error "
        f"||(W-Q)X||^2 / ||WX||^2 on {args.samples} x {args.seqlen} Austen tokens (lower is better); "
        "storage bits per weight over these layers; method seconds in total.\n"
    )
    print("| method | " + " | ".join(keys) + " | mean | storage bits | seconds |")
    print("|---|" + "---|" * (len(keys) + 3))
    for label in labels:
        total_bits = sum(b for b, _ in bits[label]) / sum(n for _, n in bits[label])
        mean = sum(errors[label]) / len(errors[label])
        cells = " | ".join(f"{e:.4f}" for e in errors[label])
        print(f"| {label} | {cells} | {mean:.4f} | {total_bits:.3f} | {seconds[label]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
