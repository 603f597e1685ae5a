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
import math

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
    ids = evaluation_tokens(loaded.tokenizer, args.text, SEQLEN)[0]
    windows = torch.stack([ids[i * SEQLEN : (i + 1) * SEQLEN] for i in range(args.windows)])
    base = perplexity(model, windows)
    print(f"{args.text}, {args.windows} x {SEQLEN} tokens: original {base:.2f}")
    print("block | PPL with only this block quantized | cost (nats per token)")
    arch = get_architecture(model)
    prefix = f"{arch.blocks}."
    for index, block in enumerate(get_blocks(model, arch)):
        names = {
            name[len(f"{prefix}{index}.") :]: w for name, w in weights.items() if name.startswith(f"{prefix}{index}.")
        }
        originals = {name: block.get_submodule(name).weight.data for name in names}
        for name, weight in names.items():
            block.get_submodule(name).weight.data = weight.dequantize().to(originals[name].dtype)
        value = perplexity(model, windows)
        for name, original in originals.items():
            block.get_submodule(name).weight.data = original
        print(f"{index:5d} | {value:10.2f} | {math.log(value / base):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
