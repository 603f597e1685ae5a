"""Tune a checkpoint's last block again, under other settings, and measure the whole model each time.

    python benchmarks/retune_last_block.py runs/tok/sp_1 --seed 1 'token:{}' 'kl30:{"steps": 0, "head_steps": 30}'

Rebuilds the checkpoint run's calibration windows (the quick protocol's: 32 x 512 tokens of ``austen`` at
``--seed``; the last 4 held out, the others cut into 128-token windows of their own as ``--tune-split``
does), runs them through the checkpoint's quantized blocks and the original model's to get the last
block's inputs and targets, then tunes the last block once per setting (a
:class:`~binq.engine.tune.TuneConfig` field override of the split settings, given as ``name:json``), each
from the checkpoint's own last block. For each it prints the block's held-out errors and the perplexity of
the whole quantized model with that last block on the first 16 windows of 512 tokens of brit1911 and
persuasion (the quick protocol's evaluation). A development tool (the numbers of docs/TUNE.md's "The
model's head" section came from it), not a benchmark with a report file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import torch

import binq
from binq.data.calibration import calibration_windows
from binq.engine.capture import block_output, capture_block_inputs
from binq.engine.tune import TuneConfig, tune_block
from binq.models import ModelHead, load_model
from binq.models.architectures import get_architecture, get_blocks
from binq.nn.binary_linear import quantized_weights
from block_damage import block_weights, perplexity, swapped, text_windows

SPLIT = TuneConfig(steps=60, batch=4, tokens=128, patience=4, loss="token", signs=True, split=True)
TEXTS = ("brit1911", "persuasion")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("settings", nargs="+", help="name:json, TuneConfig fields over the split settings")
    parser.add_argument("--seed", type=int, default=0, help="the checkpoint run's calibration seed")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    loaded = load_model(args.model)
    model = loaded.model.eval()
    arch = get_architecture(model)
    blocks = get_blocks(model, arch)
    last = len(blocks) - 1
    weights = quantized_weights(binq.load(args.checkpoint))

    def own(index: int) -> dict:
        return block_weights(weights, arch.blocks, index)

    calibration = calibration_windows(loaded.tokenizer, "austen", 32, 512, args.seed)
    held = calibration.shape[0] - SPLIT.holdout

    def streams(tokens: torch.Tensor) -> tuple[list, list, tuple]:
        """The last block's quantized inputs and original outputs for ``tokens``, and its arguments."""
        captured = capture_block_inputs(model, blocks, tokens)
        quantized = original = list(captured.hidden_states)
        with torch.no_grad():
            for index in range(last):
                a, k = captured.args[index], captured.kwargs[index]
                original = [block_output(blocks[index](x, *a, **k)) for x in original]
                with swapped(blocks[index], own(index)):
                    quantized = [block_output(blocks[index](x, *a, **k)) for x in quantized]
            a, k = captured.args[last], captured.kwargs[last]
            targets = [block_output(blocks[last](x, *a, **k)) for x in original]
        return quantized, targets, (a, k)

    inputs, targets, arguments = streams(calibration[held:])
    pieces, piece_targets, piece_arguments = streams(calibration[:held].reshape(-1, SPLIT.tokens))
    windows = {text: text_windows(loaded.tokenizer, text, 16) for text in TEXTS}

    def whole(last_weights: dict) -> str:
        with contextlib.ExitStack() as stack:
            for index in range(last):
                stack.enter_context(swapped(blocks[index], own(index)))
            stack.enter_context(swapped(blocks[last], last_weights))
            return " ".join(f"{text} {perplexity(model, w):.2f}" for text, w in windows.items())

    print(f"checkpoint as is: {whole(own(last))}", flush=True)
    head = ModelHead(model, arch)
    for name, override in (a.split(":", 1) for a in args.settings):
        config = dataclasses.replace(SPLIT, **json.loads(override))
        started = time.perf_counter()
        tuned, record = tune_block(
            last, blocks[last], own(last), inputs, targets, arguments, piece_arguments,
            torch.device("cpu"), config, torch.Generator().manual_seed(args.seed * 1_000_003 + last),
            (pieces, piece_targets), head,
        )  # fmt: skip
        kl = "" if record.head_before is None else f", KL {record.head_before:.4f} -> {record.head_after:.4f}"
        print(f"{name}: block error {record.error_before:.4e} -> {record.error_after:.4e}{kl}, steps {record.steps}"
              f" + {record.head_steps}, flipped {record.flipped}, {time.perf_counter() - started:.0f}s | whole model:"
              f" {whole(tuned)}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
