"""GPTQ with and without ``--clip-search`` on real layers: each layer's relative output error, and the mean ratio.

    python benchmarks/clip_layers.py [--model smollm2-135m] [--blocks 0,7,15,23,29] [--bits 3,4]

The Hessians are the original model's on the quick protocol's calibration windows (32 x 512 tokens of
``austen``, seed 0), in float64; every linear of the chosen blocks is quantized by GPTQ (group 128) both
ways from the same Hessian, and ``||(W - Q) X||^2 / ||W X||^2`` is printed for each, then the ratio of the
summed errors (clipped over min-max) per width. Layer-level only: what a whole run's perplexity does is a
catalogue run's business (``gptq 3-bit g128 clip``).
"""

from __future__ import annotations

import argparse

import torch

from binq.data.calibration import calibration_windows
from binq.engine.walker import block_hessians
from binq.methods.gptq import GPTQConfig, quantize_gptq
from binq.models import load_model
from binq.models.architectures import get_architecture
from binq.quant.hessian import relative_output_error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", default="0,7,15,23,29")
    parser.add_argument("--bits", default="3,4")
    args = parser.parse_args()
    loaded = load_model(args.model)
    arch = get_architecture(loaded.model)
    windows = calibration_windows(loaded.tokenizer, "austen", 32, 512, 0)
    blocks = [int(b) for b in args.blocks.split(",")]
    layers = block_hessians(loaded.model, arch, windows, blocks, dtype=torch.float64)
    print(f"{'bits':>4}  {'layer':<36} {'min-max':>10} {'clipped':>10} {'ratio':>6}")
    for bits in (int(b) for b in args.bits.split(",")):
        totals = [0.0, 0.0]
        better = 0
        for name, (weight, hessian) in layers.items():
            quantized = [quantize_gptq(weight, hessian, GPTQConfig(bits=bits, clip_search=c)) for c in (False, True)]
            errors = [relative_output_error(weight, q.dequantize(), hessian) for q in quantized]
            totals[0] += errors[0]
            totals[1] += errors[1]
            better += errors[1] < errors[0]
            ratio = errors[1] / errors[0]
            print(f"{bits:>4}  {name:<36} {errors[0]:>10.4e} {errors[1]:>10.4e} {ratio:>6.3f}", flush=True)
        summary = f"summed error clipped / min-max = {totals[1] / totals[0]:.3f}"
        print(f"{bits}-bit: {summary}; {better} of {len(layers)} layers lower")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
