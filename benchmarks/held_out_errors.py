"""How far a quantized checkpoint's hidden states stray from the original model's, on the windows it was
tuned on against windows it never saw.

    python benchmarks/held_out_errors.py CHECKPOINT [--seed 0] [--windows 4] [--model smollm2-135m]

For four sets of ``--windows`` windows of 512 tokens: the first calibration windows (``austen`` at
``--seed``, as the run drew them: tuning trained on them), the last ones (the tuning's held-out windows
with the default ``--tune-holdout 4``), and the first windows of ``brit1911`` and ``persuasion`` (the
quick protocol's evaluation texts), it prints each token's relative error ``||h_q - h||^2 / ||h||^2``
at a few blocks' outputs, averaged over the positions 0, 1-15, 16-255 and 256-511 of the windows, and
the per-token KL of the quantized model's next-token distribution from the original's. It shows where a
tuned model's error is: on the calibration windows, or on text it never saw (docs/TUNE.md).
"""

from __future__ import annotations

import argparse

import torch

import binq
from binq.data.calibration import calibration_windows
from binq.data.evaluation import evaluation_tokens
from binq.models import load_model

SEQLEN = 512
BLOCKS = (1, 6, 12, 24, 30)  # hidden_states indices: the output of block i - 1
SPANS = ((0, 1), (1, 16), (16, 256), (256, SEQLEN))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0, help="the run's calibration seed")
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()
    loaded = load_model(args.model)
    quantized = binq.load(args.checkpoint).eval()
    calibration = calibration_windows(loaded.tokenizer, "austen", 32, SEQLEN, seed=args.seed)
    sets = {"calibration (trained)": calibration[: args.windows]}
    sets["calibration (held out)"] = calibration[-args.windows :]
    for name in ("brit1911", "persuasion"):
        ids = evaluation_tokens(loaded.tokenizer, name, SEQLEN)[0]
        sets[name] = torch.stack([ids[i * SEQLEN : (i + 1) * SEQLEN] for i in range(args.windows)])
    spans = " ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in SPANS)
    print(f"relative error per token at block outputs, positions {spans}; KL in nats per token")
    for name, windows in sets.items():
        with torch.no_grad():
            original = loaded.model(windows, output_hidden_states=True)
            tuned = quantized(windows, output_hidden_states=True)
        cells = []
        for index in BLOCKS:
            if index >= len(original.hidden_states):
                continue
            reference, state = original.hidden_states[index], tuned.hidden_states[index]
            error = (state - reference).square().sum(-1) / reference.square().sum(-1)
            cells.append(f"block {index - 1}: " + " ".join(f"{float(error[:, a:b].mean()):.2f}" for a, b in SPANS))
        log_p, log_q = original.logits.log_softmax(-1), tuned.logits.log_softmax(-1)
        kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        print(f"{name:>22} | " + " | ".join(cells) + f" | KL {kl:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
