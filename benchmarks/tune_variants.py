"""Compare block-wise tuning settings block by block, every setting from the same quantized start.

    python benchmarks/tune_variants.py 1 'scales:{}' 'signs:{"signs": true, "steps": 60, "patience": 4, "batch": 4}'
    FROM=11 python benchmarks/tune_variants.py 12 'scales:{}' ...      # tune only from block 11, then compare
    PPL=1 python benchmarks/tune_variants.py 1 'base:{}' 'steps180:{"steps": 180, "patience": 12}'

Runs ``binq quantize --model smollm2-135m --method arb-group --tune --quick`` (plus ``$EXTRA`` options) and,
for each of the first ``K`` blocks (from block ``$FROM``), tunes the block once per setting (a
:class:`~binq.engine.tune.TuneConfig` field override, given as ``name:json``), each from the same generator
state, and prints each setting's held-out error before and after, its steps and kept sign flips. With
``PPL=1`` it also prints the perplexity of the original model with only that block's linears replaced by
the setting's tuned ones, on the first 16 windows of 512 tokens of brit1911 and persuasion (the quick
protocol's windows; what ``benchmarks/block_damage.py`` measures for a whole checkpoint). The walk
continues with the first setting's result, so later blocks see that setting's quantized inputs. A
development tool (the numbers of docs/TUNE.md's "Sign flips" and "Where the damage is" sections came from
it), not a benchmark with a report file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time

import torch

import binq.engine.calibrate as calibrate
from binq.cli import main as binq_main
from binq.engine.tune import tune_block
from binq.models import load_model
from binq.models.architectures import get_architecture, get_blocks
from block_damage import perplexity, swapped, text_windows

TEXTS = ("brit1911", "persuasion")


class _Stop(Exception):
    pass


class _SingleBlock:
    """The original model, whose blocks' linears are swapped for tuned ones, and the evaluation windows."""

    def __init__(self) -> None:
        loaded = load_model("smollm2-135m")
        self.model = loaded.model.eval()
        self.blocks = get_blocks(self.model, get_architecture(self.model))
        self.windows = {text: text_windows(loaded.tokenizer, text, 16) for text in TEXTS}

    def perplexities(self, index: int, weights: dict) -> str:
        with swapped(self.blocks[index], weights):
            return " ".join(f"{text} {perplexity(self.model, w):.2f}" for text, w in self.windows.items())


def main() -> int:
    blocks = int(sys.argv[1])
    first = int(os.environ.get("FROM", "0"))
    settings = [(a.split(":", 1)[0], json.loads(a.split(":", 1)[1])) for a in sys.argv[2:]]
    single = _SingleBlock() if os.environ.get("PPL") == "1" else None

    def compare(index, block, weights, inputs, targets, arguments, prefix, device, config, generator, windows=None,
                head=None):  # fmt: skip
        if index < first:
            return tune_block(index, block, weights, inputs, targets, arguments, prefix, device, config, generator,
                              windows, head)  # fmt: skip
        state = generator.get_state()
        results = []
        for name, override in settings:
            own = torch.Generator()
            own.set_state(state)
            tuned, record = tune_block(
                index, block, weights, inputs, targets, arguments, prefix, device,
                dataclasses.replace(config, **override), own, windows, head,
            )  # fmt: skip
            ratio = record.error_after / record.error_before
            ppl = "" if single is None else " | only this block: PPL " + single.perplexities(index, tuned)
            print(f"block {index} {name:>14}: {record.error_before:.4e} -> {record.error_after:.4e} ({ratio:.4f})"
                  f" steps {record.steps} flipped {record.flipped} {record.time_s:.1f}s{ppl}", flush=True)  # fmt: skip
            results.append((tuned, record))
        if index + 1 >= blocks:
            raise _Stop
        generator.set_state(state)
        return results[0]

    calibrate.tune_block = compare
    started = time.time()
    with contextlib.suppress(_Stop):
        binq_main([
            "quantize", "--model", "smollm2-135m", "--method", "arb-group", "--tune", "--device", "cpu",
            *os.environ.get("EXTRA", "").split(), "--quick", "--no-progress", "--no-layer-table", "--eval", "none",
        ])  # fmt: skip
    print(f"total {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
