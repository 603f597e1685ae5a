"""Where a model's residual stream keeps its energy: per block output, the share of the first token and of the
three largest channels, and the first token's norm against the median token's.

    python benchmarks/stream_energy.py [--model smollm2-135m] [--windows 4]

The windows are the quick protocol's calibration windows (512 tokens of ``austen``, seed 0), the first
``--windows`` of them; shares are over all their tokens, norms are medians over windows. It explains
``--tune-loss`` (docs/TUNE.md): where one token holds nearly all the energy, the stream's error
``sum ||Y - T||^2 / sum ||T||^2`` is nearly that token's.
"""

from __future__ import annotations

import argparse

import torch

from binq.data.calibration import calibration_windows
from binq.models import load_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()
    loaded = load_model(args.model)
    windows = calibration_windows(loaded.tokenizer, "austen", args.windows, 512, seed=0)
    with torch.no_grad():
        states = loaded.model(windows, output_hidden_states=True).hidden_states
    print("block output | first token's share | top-3 channels' share | first token's norm | median token's norm")
    for index, state in enumerate(states[1:]):
        energy = state.float().square()  # [windows, tokens, channels]
        per_token = energy.sum(-1)
        first = float(per_token[:, 0].sum() / per_token.sum())
        channels = energy.sum((0, 1))
        top = float(channels.topk(3).values.sum() / channels.sum())
        first_norm = float(per_token[:, 0].sqrt().median())
        median_norm = float(per_token.sqrt().median(-1).values.median())
        print(f"{index:>12} | {first:>19.3f} | {top:>21.3f} | {first_norm:>18.1f} | {median_norm:>19.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
