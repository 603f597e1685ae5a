"""The engine across two processes (gloo on the CPU): Hessians reduced, linears spread over ranks.

Each rank calibrates on its own half of the samples; after the all-reduce every rank must hold the
model that one process calibrated on all of them would produce.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from binq.engine.calibrate import EngineConfig, quantize_model
from binq.methods import get_method
from binq.models import block_linears, get_architecture, get_blocks
from conftest import build_tiny_model, random_ids

WORLD = 2


def _quantized_weights(samples: torch.Tensor) -> tuple[dict[str, torch.Tensor], set[str]]:
    model = build_tiny_model("llama", seed=0)
    arch = get_architecture(model)
    method = get_method("gptq")
    engine = EngineConfig(hessian_dtype="float64")
    result = quantize_model(
        model, arch, samples, method, method.make_config(bits=4, group_size=32), engine, progress=False
    )
    weights = {
        f"{index}.{name}": linear.weight.detach().clone()
        for index, block in enumerate(get_blocks(model, arch))
        for name, linear in block_linears(block, arch).items()
    }
    return weights, set(result.weights)


def _worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        samples = random_ids(4, 16, seed=1)[rank::WORLD]
        weights, names = _quantized_weights(samples)
        # Files, not a queue: tensors in a queue live in the child's shared memory, gone when it exits.
        save_file(weights, out / f"rank{rank}.safetensors")
        (out / f"rank{rank}.json").write_text(json.dumps(sorted(names)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_reproduce_one_process_on_all_samples(tmp_path):
    expected, all_names = _quantized_weights(random_ids(4, 16, seed=1))
    mp.start_processes(_worker, args=(_free_port(), tmp_path), nprocs=WORLD, start_method="spawn", join=True)
    results = {
        rank: (
            load_file(tmp_path / f"rank{rank}.safetensors"),
            set(json.loads((tmp_path / f"rank{rank}.json").read_text())),
        )
        for rank in range(WORLD)
    }
    # The linears are spread over the ranks: each makes about half, together all of them, once.
    made = [results[rank][1] for rank in range(WORLD)]
    assert made[0].isdisjoint(made[1]) and made[0] | made[1] == all_names
    assert all(len(names) >= len(all_names) // WORLD for names in made)
    for rank in range(WORLD):
        weights = results[rank][0]
        for name, weight in expected.items():
            # Summation order differs across processes; a grid code may flip on a tie, nothing more.
            agree = torch.isclose(weights[name], weight, rtol=1e-4, atol=1e-6).float().mean()
            assert agree > 0.999, (rank, name, float(agree))
