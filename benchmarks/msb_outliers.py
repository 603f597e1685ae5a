"""How MSB's solvers rebuild SmolLM2's largest weights (per tensor, calibration-free).

    OMP_NUM_THREADS=1 python benchmarks/msb_outliers.py [--groups 32] [--blocks 0 1 2 3 28 29]

For the ``o_proj`` and ``down_proj`` of the given blocks: the largest |w|, its reconstruction with the
reference's windowed solver and with ``windowed-lo``, and the relative error over the 20 largest weights.
"""

from __future__ import annotations

import argparse

from binq.methods.msb import MSBConfig, quantize_msb
from binq.models import load_model

SOLVERS = ("windowed", "windowed-lo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 1, 2, 3, 28, 29])
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    model = load_model(args.model).model
    print(f"| linear | max abs w | {' | '.join(f'{s}: at max, top-{args.top} rel. error' for s in SOLVERS)} |")
    print("|---|---|" + "---|" * len(SOLVERS))
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        if not (name.endswith(("o_proj.weight", "down_proj.weight")) and int(parts[2]) in args.blocks):
            continue
        w = parameter.detach().float()
        flat = w.flatten()
        at_max = int(flat.abs().argmax())
        top = flat.abs().topk(args.top).indices
        cells = []
        for solver in SOLVERS:
            q = quantize_msb(w, None, MSBConfig(groups=args.groups, solver=solver)).dequantize().flatten()
            error = float((q[top] - flat[top]).norm() / flat[top].norm())
            cells.append(f"{float(q[at_max]):.3f}, {error:.3f}")
        print(f"| {'.'.join(parts[2:5])} | {float(flat[at_max]):.3f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
