"""Which blocks of a quantized checkpoint cost the most: the original model with one block's linears
taken from the checkpoint, all others original.

    python benchmarks/block_damage.py CHECKPOINT [--text brit1911] [--windows 16] [--model smollm2-135m]

For each block ``b`` it puts the checkpoint's dequantized linears of block ``b`` (and only those) into the
original model and prints the perplexity on the first ``--windows`` windows of 512 tokens of ``--text``
(the quick protocol's windows) and its cost over the original in nats per token. The costs do not add up
to the whole checkpoint's (the blocks' errors interact), but they show where its error hurts most
(docs/TUNE.md, "Where the damage is").
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator

import torch

import binq
from binq.data.evaluation import evaluation_tokens
from binq.models import load_model
from binq.models.architectures import get_architecture, get_blocks
from binq.nn.binary_linear import quantized_weights

SEQLEN = 512


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(8):
            log_p = model(batch).logits.float()[:, :-1].log_softmax(-1)
            nll += float(-log_p.gather(-1, batch[:, 1:, None]).sum())
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def text_windows(tokenizer, text: str, count: int) -> torch.Tensor:
    """The first ``count`` windows of ``SEQLEN`` tokens of an evaluation text, ``[count, SEQLEN]``."""
    ids = evaluation_tokens(tokenizer, text, SEQLEN)[0]
    return torch.stack([ids[i * SEQLEN : (i + 1) * SEQLEN] for i in range(count)])


def block_weights(weights: dict, blocks_path: str, index: int) -> dict:
    """A checkpoint's quantized weights of block ``index`` (``blocks_path``: the architecture's ``blocks``), by
    their name in the block."""
    prefix = f"{blocks_path}.{index}."
    return {name[len(prefix) :]: w for name, w in weights.items() if name.startswith(prefix)}


@contextlib.contextmanager
def swapped(block: torch.nn.Module, weights: dict) -> Iterator[None]:
    """``block`` with its linears named in ``weights`` (quantized weights, by name in the block) dequantized
    in place of their own, restored on exit."""
    originals = {name: block.get_submodule(name).weight.data for name in weights}
    for name, weight in weights.items():
        block.get_submodule(name).weight.data = weight.dequantize().to(originals[name].dtype)
    try:
        yield
    finally:
        for name, original in originals.items():
            block.get_submodule(name).weight.data = original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default="brit1911")
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    loaded = load_model(args.model)
    model = loaded.model.eval()
    weights = quantized_weights(binq.load(args.checkpoint))
    windows = text_windows(loaded.tokenizer, args.text, args.windows)
    base = perplexity(model, windows)
    print(f"{args.text}, {args.windows} x {SEQLEN} tokens: original {base:.2f}")
    print("block | PPL with only this block quantized | cost (nats per token)")
    arch = get_architecture(model)
    for index, block in enumerate(get_blocks(model, arch)):
        with swapped(block, block_weights(weights, arch.blocks, index)):
            value = perplexity(model, windows)
        print(f"{index:5d} | {value:10.2f} | {math.log(value / base):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
