"""What the full protocol costs on this machine: one forward of the model over one evaluation window.

    python benchmarks/forward_time.py [--model smollm2-135m --seqlen 2048 --repeat 3]

Prints the seconds of one fp32 forward (best of ``--repeat``, after a warm-up), the windows of the two
built-in evaluation texts at that length, and the evaluation time of one full-protocol row that follows
(two forwards per window: the quantized and the original model, for KL). docs/BENCHMARKS.md, "Full
protocol", quotes it.
"""

from __future__ import annotations

import argparse
import time

import torch

from binq.data.evaluation import evaluation_tokens
from binq.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(args.model)
    windows = {
        name: evaluation_tokens(loaded.tokenizer, name, args.seqlen).shape[1] // args.seqlen
        for name in ("brit1911", "persuasion")
    }
    x = evaluation_tokens(loaded.tokenizer, "brit1911", args.seqlen)[:, : args.seqlen]
    times = []
    with torch.no_grad():
        loaded.model(x, use_cache=False)
        for _ in range(args.repeat):
            started = time.perf_counter()
            loaded.model(x, use_cache=False)
            times.append(time.perf_counter() - started)
    best, total = min(times), sum(windows.values())
    threads = torch.get_num_threads()
    print(f"{args.model}: one fp32 forward of {args.seqlen} tokens, {threads} threads: {best:.2f} s")
    minutes = 2 * total * best / 60
    print(f"windows of {args.seqlen}: {windows}; one full-protocol evaluation (2 forwards each): {minutes:.1f} min")


if __name__ == "__main__":
    main()
