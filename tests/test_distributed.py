"""Multi-process runs: the engine across two gloo processes, and ``binq quantize --nproc 2`` end to end.

The engine test calls :func:`quantize_model` in two processes, each rank on its own half of the samples:
after the all-reduce every rank must hold the model that one process calibrated on all of them would
produce. The ``--nproc`` tests run the real command (torchrun, two gloo processes on the CPU) on a tiny
llama and compare the written checkpoint with a one-process run's:

- a calibration-free method (RTN): each linear depends on its weight alone, so the checkpoint is
  bit-identical;
- GPTQ: each Hessian is the same sum of per-window terms, added in another order (each rank sums its
  windows, the all-reduce adds the partial sums), so its float32 rounding may differ in the last bits.
  Anything computed from it may then land on the other side of a rounding: an fp16 scale one ulp away
  (this test's run, measured: 1 of its 2,304 scales), or, rarely, a grid code one step away (none seen). The
  test allows exactly that: codes equal but for at most 0.1% of them, each off by at most one step,
  every dequantized weight within one grid step, everything else bit-identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from binq.checkpoint.load import read_quantization_config
from binq.cli import _without_nproc, main
from binq.engine.calibrate import EngineConfig, quantize_model
from binq.methods import get_method
from binq.models import block_linears, get_architecture, get_blocks
from binq.quant.structured import QuantizedWeight, UniformWeight, layout_class
from binq.report import LAYER_HEADER
from conftest import LAYERS, build_tiny_model, random_ids

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
    # The linears are spread over the ranks by their cost: together all of them, once, and in every
    # block neither rank has much more than half the work (n k^2 for n outputs, k inputs).
    made = [results[rank][1] for rank in range(WORLD)]
    assert made[0].isdisjoint(made[1]) and made[0] | made[1] == all_names
    model = build_tiny_model("llama", seed=0)
    cost = {
        name: module.out_features * module.in_features**2
        for name in all_names
        for module in [model.get_submodule(name)]
    }
    for index in range(LAYERS):
        share = [sum(cost[n] for n in names if n.startswith(f"model.layers.{index}.")) for names in made]
        assert max(share) <= 0.6 * sum(share), share
    for rank in range(WORLD):
        weights = results[rank][0]
        for name, weight in expected.items():
            # Summation order differs across processes; a grid code may flip on a tie, nothing more.
            agree = torch.isclose(weights[name], weight, rtol=1e-4, atol=1e-6).float().mean()
            assert agree > 0.999, (rank, name, float(agree))


# --- binq quantize --nproc 2 ---------------------------------------------------------------------------------


def _common_args(model: Path, calib: Path, *method: str) -> list[str]:
    return ["quantize", "--model", str(model), "--calib", str(calib), "--nsamples", "8", "--seqlen", "24",
            "--eval", "none", "--no-progress", *method]  # fmt: skip


def _two_processes(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m binq <argv> --nproc 2`` with one thread per process, as the in-process run has."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "binq", *argv, "--nproc", "2"]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def _one_and_two(tmp_path: Path, argv: list[str]) -> tuple[Path, Path, str]:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*argv, "--no-layer-table", "--out", str(one)]) == 0
    completed = _two_processes([*argv, "--out", str(two)])
    return one, two, completed.stdout


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _weights(folder: Path) -> dict[str, QuantizedWeight]:
    """The structured weights of a checkpoint, rebuilt from their packed tensors."""
    tensors = _tensors(folder)
    weights = {}
    for name, entry in read_quantization_config(folder)["modules"].items():
        own = {key.removeprefix(name + "."): t for key, t in tensors.items() if key.startswith(name + ".")}
        weights[name] = layout_class(entry["layout"]).from_packed(own, entry["metadata"])
    return weights


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _check_reports(one: Path, two: Path, world_size_engine: dict) -> None:
    report1 = json.loads((one / "report.json").read_text())
    report2 = json.loads((two / "report.json").read_text())
    assert "world_size" not in report1["engine"]  # one-process reports are unchanged
    assert report2["engine"] == world_size_engine
    assert report2["calibration"] == report1["calibration"]  # tokens: the total over the ranks
    assert report2["command"][:4] == ["binq", "quantize", "--model", report1["command"][3]]
    assert report2["command"][-2:] == ["--nproc", "2"]
    # Every linear once, in model order (the one-process engine's order), from whichever rank made it.
    arch = get_architecture(build_tiny_model("llama"))
    order = [[block, name] for block in range(LAYERS) for name in arch.linear_names]
    assert [[r["block"], r["name"]] for r in report1["layers"]] == order
    assert [[r["block"], r["name"]] for r in report2["layers"]] == order
    for row1, row2 in zip(report1["layers"], report2["layers"], strict=True):
        assert row2["shape"] == row1["shape"] and row2["storage_bits_total"] == row1["storage_bits_total"]
        assert row2["relative_error"] == pytest.approx(row1["relative_error"], rel=1e-3)
    assert report2["bits"] == report1["bits"]


def _assert_one_table(stdout: str, label: str) -> None:
    """Rank 0 prints the layer table and the result once; the other rank prints nothing."""
    assert stdout.count(LAYER_HEADER) == 1
    assert stdout.count(f"{label} on ") == 1
    assert len([line for line in stdout.splitlines() if "self_attn.q_proj" in line]) == LAYERS


def test_nproc_calibration_free_checkpoint_is_bit_identical(
    tiny_llama_folder: Path, text_file: Callable[[int, int], Path], tmp_path: Path
) -> None:
    argv = _common_args(tiny_llama_folder, text_file(2000, 1), "--method", "rtn", "--bits", "1", "--group-size", "32")
    one, two, stdout = _one_and_two(tmp_path, argv)
    _assert_one_table(stdout, "rtn 1-bit g32")
    tensors1, tensors2 = _tensors(one), _tensors(two)
    assert tensors1.keys() == tensors2.keys()
    assert [name for name in tensors1 if not _same_bits(tensors1[name], tensors2[name])] == []
    assert read_quantization_config(one) == read_quantization_config(two)
    _check_reports(one, two, {"path": "independent", "workers": 1, "world_size": 2})


def test_nproc_gptq_checkpoint_equals_one_process_up_to_the_reduction_order(
    tiny_llama_folder: Path, text_file: Callable[[int, int], Path], tmp_path: Path
) -> None:
    argv = _common_args(tiny_llama_folder, text_file(2000, 1), "--method", "gptq", "--bits", "3", "--group-size", "32")
    one, two, stdout = _one_and_two(tmp_path, argv)
    _assert_one_table(stdout, "gptq 3-bit g32")
    assert read_quantization_config(one) == read_quantization_config(two)
    tensors1, tensors2 = _tensors(one), _tensors(two)
    assert tensors1.keys() == tensors2.keys()
    weights1, weights2 = _weights(one), _weights(two)
    assert len(weights1) == LAYERS * 7
    packed = {f"{name}.{key}" for name, weight in weights1.items() for key in weight.packed_tensors()}
    # The tensors the method does not touch (embeddings, norms, head) are bit-identical.
    assert [name for name in tensors1 if name not in packed and not _same_bits(tensors1[name], tensors2[name])] == []
    codes = flipped = scales = scales_moved = 0
    for name, w1 in weights1.items():
        w2 = weights2[name]
        assert isinstance(w1, UniformWeight) and isinstance(w2, UniformWeight)
        delta = (w1.codes.int() - w2.codes.int()).abs()
        assert int(delta.max()) <= 1, name
        codes, flipped = codes + delta.numel(), flipped + int((delta > 0).sum())
        assert torch.equal(w1.zeros, w2.zeros) or int((w1.zeros.int() - w2.zeros.int()).abs().max()) <= 1, name
        scales, scales_moved = scales + w1.scales.numel(), scales_moved + int((w1.scales != w2.scales).sum())
        step = torch.maximum(w1.scales.float(), w2.scales.float())[:, w1._groups()]
        off = (w1.dequantize() - w2.dequantize()).abs() / step
        assert float(off.max()) <= 1 + 2**-8, (name, float(off.max()))
    assert flipped <= codes // 1000, (flipped, codes)
    assert scales_moved <= scales // 100, (scales_moved, scales)
    engine = {"device": "cpu", "hessian_dtype": "float32", "true_sequential": False}
    _check_reports(one, two, {**engine, "activations_on_device": None, "world_size": 2})


@pytest.mark.parametrize("value", ["0", "-1"])
def test_nproc_must_be_positive(
    value: str, tiny_llama_folder: Path, text_file: Callable[[int, int], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _common_args(tiny_llama_folder, text_file(2000, 1), "--method", "gptq", "--nproc", value)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"binq: error: --nproc must be at least 1, got {value}"


def test_nproc_errors_before_launching(
    tiny_llama_folder: Path,
    text_file: Callable[[int, int], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calib = text_file(2000, 1)
    few = [*_common_args(tiny_llama_folder, calib, "--method", "gptq"), "--nsamples", "2", "--nproc", "4"]
    assert main(few) == 2
    assert capsys.readouterr().err.strip() == "binq: error: --nsamples 2 is fewer than the 4 processes that share them"
    workers = [*_common_args(tiny_llama_folder, calib, "--method", "rtn"), "--workers", "2", "--nproc", "2"]
    assert main(workers) == 2
    assert "--workers does not combine with --nproc" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # already under torchrun
    assert main([*_common_args(tiny_llama_folder, calib, "--method", "gptq"), "--nproc", "2"]) == 2
    assert (
        capsys.readouterr().err.strip() == "binq: error: --nproc starts torchrun itself: under torchrun, leave it out"
    )


def test_without_nproc_drops_the_option_in_every_spelling() -> None:
    tail = ["--method", "gptq", "--nsamples", "8"]
    for spelling in (["--nproc", "2"], ["--nproc=2"], ["--npro", "2"], ["--np=2"]):
        assert _without_nproc(["quantize", *spelling, *tail]) == ["quantize", *tail]
    assert _without_nproc(["quantize", *tail, "--no-progress"]) == ["quantize", *tail, "--no-progress"]


def test_a_llama_block_is_split_by_cost_not_by_count() -> None:
    from binq.engine.calibrate import balance

    hidden, ffn = 2560, 7168  # the synthetic LLaMA-3B-class block of benchmarks/scale.py
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden)}
    shapes |= {"gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
    costs = {name: n * k**2 for name, (n, k) in shapes.items()}
    for world in (2, 3, 4):
        owners = balance(costs, world)
        assert set(owners) == set(costs) and set(owners.values()) <= set(range(world))
        load = [sum(c for name, c in costs.items() if owners[name] == r) for r in range(world)]
        # No rank waits on another for more than the largest single linear (down_proj) forces.
        assert max(load) <= max(sum(costs.values()) / world, costs["down"]) * 1.1, (world, load)
    round_robin = [sum(c for i, c in enumerate(costs.values()) if i % 2 == r) for r in range(2)]
    by_cost = [sum(c for name, c in costs.items() if balance(costs, 2)[name] == r) for r in range(2)]
    assert max(by_cost) / sum(costs.values()) < 0.55 < 0.7 < max(round_robin) / sum(costs.values())
    assert balance(costs, 2) == balance(dict(costs), 2)  # the same answer on every rank
