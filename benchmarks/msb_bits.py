"""MSB's bit figures on SmolLM2-135M's real weights, without evaluation (seconds, not an hour).

    python benchmarks/msb_bits.py            # the 21 linears of blocks 0, 15 and 29

Per setting: parameter-weighted storage bits, index entropy (an entropy coder's bound, not stored),
the paper's convention (index not counted) and the relative weight error ``||W - Q||^2 / ||W||^2``.
"""

from __future__ import annotations

import argparse

import torch

from binq.methods.msb import MSBConfig, quantize_msb
from binq.models import block_linears, get_architecture, get_blocks, load_model

SETTINGS = {
    "tensor g32": MSBConfig(),
    "tensor g8": MSBConfig(groups=8),
    "tensor g4": MSBConfig(groups=4),
    "block g4": MSBConfig(granularity="block", groups=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="0,15,29")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m")
    arch = get_architecture(loaded.model)
    blocks = get_blocks(loaded.model, arch)
    for label, config in SETTINGS.items():
        weights = stored = entropy = paper = error = 0.0
        for index in (int(b) for b in args.blocks.split(",")):
            for linear in block_linears(blocks[index], arch).values():
                w = linear.weight.detach().float()
                q = quantize_msb(w, None, config)
                figures = q.extra_bit_figures()
                weights += q.numel
                stored += q.storage_bits_total
                entropy += figures["index_entropy_bits"] * q.numel
                paper += figures["paper_convention_bits"] * q.numel
                error += float((q.dequantize() - w).square().sum() / w.square().sum()) * q.numel
        print(
            f"{label}: storage {stored / weights:.4f}  index entropy {entropy / weights:.3f}  "
            f"paper convention {paper / weights:.5f}  rel weight err {error / weights:.4e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
