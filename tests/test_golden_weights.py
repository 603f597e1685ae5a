"""Every method's quantized weights are bit-identical to the digests recorded in ``tests/golden_weights.json``.

The digests were recorded before the pipeline was reorganised into one column sweep, one block walker
and ``binq.quantize`` (issue 13), so these tests say that the reorganisation changed no bit. Three levels:

- ``method``: each method configuration on one synthetic weight (ragged last block, outlier input
  channels, one dead input) with its Hessian: the maths alone.
- ``pipeline``: ``binq quantize`` on a tiny llama folder, digest of every tensor of the written
  checkpoint: calibration, the block walker, the method, activation calibration (smoothing folded into
  the norms) and saving, end to end.
- ``smollm2``: every method at its defaults on the first block of the embedded SmolLM2-135M with
  Hessians from real text (slow).

A deliberate change of results rewrites the file: ``python tests/test_golden_weights.py --write``
(the command says which digests changed). Digests cover dtype, shape and bytes of every tensor.

Bits depend on the machine's floating point as well as on binq: BLAS picks other kernels (other
summation orders) on other CPUs, and a 1-bit method turns a last-bit difference in a Hessian into other
signs. The file therefore records a fingerprint of the arithmetic the methods rely on (matrix products,
Cholesky, triangular solves, at 1 and 2 threads); where this machine's fingerprint differs, the digests
cannot be compared and the tests say so and skip (record this machine's own with ``--write``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from binq.engine.resume import tensor_digest

GOLDEN = Path(__file__).with_name("golden_weights.json")

# name: (method, options); small blocks and groups so that the 200-column weight has several, one ragged.
METHOD_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn-1": ("rtn", {}),
    "rtn-1-g32-centred": ("rtn", {"group_size": 32, "centred": True}),
    "rtn-4-g32-sym": ("rtn", {"bits": 4, "group_size": 32, "sym": True}),
    "rtn-3-g48-uniform": ("rtn", {"bits": 3, "group_size": 48}),
    "gptq-4-g32": ("gptq", {"bits": 4, "group_size": 32, "block_size": 48}),
    "gptq-2-g32-act": ("gptq", {"bits": 2, "group_size": 32, "act_order": True}),
    "gptq-3-g32-static-act": ("gptq", {"bits": 3, "group_size": 32, "act_order": True, "static_groups": True}),
    "gptq-2-row-sym": ("gptq", {"bits": 2, "group_size": 0, "sym": True, "block_size": 48}),
    "gptq-1-g64": ("gptq", {"bits": 1, "group_size": 64}),
    "billm": ("billm", {"block_size": 64}),
    "billm-exact-magnitude": ("billm", {"block_size": 64, "exact_compensation": True, "salient_metric": "magnitude"}),
    "billm-order1": ("billm", {"block_size": 64, "search_order": 1, "max_salient_columns": 10}),
    "arb": ("arb", {"block_size": 64, "iterations": 5}),
    "arb-cgb-intra": ("arb", {"block_size": 64, "iterations": 5, "cgb": True, "intra_block": True}),
    "arb-x": ("arb-x", {"block_size": 64, "iterations": 5, "x_iterations": 5}),
    "arb-x-compensated-exact": (
        "arb-x",
        {"block_size": 64, "iterations": 5, "x_metric": "compensated", "exact_compensation": True},
    ),
    "arb-x-billm-split": ("arb-x", {"block_size": 64, "iterations": 5, "x_split_metric": False}),
    "arb-rc": ("arb-rc", {"block_size": 64, "iterations": 5}),
    "arb-llm-x": ("arb-llm-x", {"block_size": 64, "iterations": 5, "x_iterations": 5}),
    "arb-llm-rc": ("arb-llm-rc", {"block_size": 64, "iterations": 5}),
    "arb-llm-rc-intra": ("arb-llm-rc", {"block_size": 64, "iterations": 5, "intra_block": True}),
    "arb-group": ("arb-group", {"group_size": 64}),
    "arb-group-mean": ("arb-group", {"group_size": 48, "mean": True, "rounds": 2}),
    "arb-group-no-rounds": ("arb-group", {"group_size": 64, "rounds": 0}),
    "msb-tensor": ("msb", {"groups": 8}),
    "msb-row-lo": ("msb", {"groups": 4, "granularity": "row", "solver": "windowed-lo", "window": 16}),
    "msb-block-dp": ("msb", {"groups": 4, "granularity": "block", "block_size": 32}),
    "msb-row-greedy-ward": ("msb", {"groups": 4, "granularity": "row", "solver": "greedy", "criterion": "ward"}),
    "msb-hessian": ("msb-hessian", {"groups": 4}),
    "msb-hessian-block": ("msb-hessian", {"groups": 4, "granularity": "block", "block_size": 32}),
    "w11": ("w11", {"block_size": 64}),
    "w11-offsets-median-obs": ("w11", {"block_size": 64, "offsets": True, "init": "median", "importance": "obs"}),
    "w11-salience-review": ("w11", {"block_size": 48, "init": "salience", "importance": "review"}),
    "w11-no-em-uniform": ("w11", {"block_size": 64, "em_iterations": 0, "importance": "uniform"}),
}

# name: extra `binq quantize` options on the tiny llama folder.
PIPELINE_CASES: dict[str, list[str]] = {
    "gptq": ["--method", "gptq", "--bits", "3", "--group-size", "32"],
    "gptq-true-sequential": ["--method", "gptq", "--bits", "2", "--group-size", "32", "--true-sequential"],
    "billm": ["--method", "billm", "--block-size", "32"],
    "arb-llm-x": ["--method", "arb-llm-x", "--block-size", "32", "--iterations", "4", "--x-iterations", "4"],
    "arb-group": ["--method", "arb-group", "--group-size", "32"],
    "w11-a4": ["--method", "w11", "--block-size", "32", "--act-bits", "4"],
    "gptq-a4-token": ["--method", "gptq", "--bits", "4", "--act-bits", "4", "--smooth", "token"],
    "rtn": ["--method", "rtn", "--bits", "1", "--group-size", "32"],
    "msb": ["--method", "msb", "--groups", "4", "--granularity", "row", "--workers", "1"],
    "msb-hessian": ["--method", "msb-hessian", "--groups", "4"],
}

SMOLLM2_METHODS = ("rtn", "gptq", "billm", "arb", "arb-x", "arb-rc", "arb-llm-x", "arb-llm-rc", "arb-group")
SMOLLM2_METHODS += ("msb-hessian", "w11")


def numerics_fingerprint(threads: int) -> str:
    """sha256 of the operations the methods' results depend on, on fixed inputs, at ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(700, 300, generator=generator)
        w = torch.randn(96, 300, generator=generator)
        hessian = torch.zeros(300, 300)
        hessian.addmm_(x.T, x)
        hessian = hessian * (2.0 / 700) + 0.01 * torch.eye(300)
        lower = torch.linalg.cholesky(hessian)
        upper = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        solved = torch.linalg.solve_triangular(upper[:128, :128], w[:, :128], upper=True, left=False)
        outputs = {"h": hessian, "u": upper, "s": solved, "wx": w @ x.T, "update": solved @ upper[:128, 128:]}
        return tensor_digest(outputs)
    finally:
        torch.set_num_threads(previous)


def check_numerics(threads: int) -> None:
    """Skip, saying why, where this machine's arithmetic differs from the recording machine's."""
    recorded_print = recorded().get("numerics", {}).get(str(threads))
    here = numerics_fingerprint(threads)
    if recorded_print != here:
        pytest.skip(
            f"this machine's float arithmetic ({threads} threads) differs from the machine that recorded "
            f"tests/golden_weights.json (fingerprint {here[:12]} vs {str(recorded_print)[:12]}): bit-identity "
            "is checked where the digests were recorded; `python tests/test_golden_weights.py --write` records "
            "this machine's own"
        )


def synthetic_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A 40 x 200 weight and the Hessian of 600 inputs with four outlier channels and one dead input."""
    generator = torch.Generator().manual_seed(13)
    weight = torch.randn(40, 200, generator=generator)
    weight[:, 7] *= 6.0
    weight[3, :] *= 3.0
    x = torch.randn(600, 200, generator=generator) @ (torch.eye(200) + 0.1 * torch.randn(200, 200, generator=generator))
    x[:, [5, 60, 131, 190]] *= 12.0
    x[:, 99] = 0.0
    hessian = 2.0 * x.T @ x / x.shape[0]
    return weight, hessian


def method_digest(method_name: str, options: dict[str, Any]) -> str:
    from binq.methods import get_method

    weight, hessian = synthetic_problem()
    method = get_method(method_name)
    quantized = method.quantize(weight, None if method.calibration_free else hessian, method.make_config(**options))
    return tensor_digest(quantized.packed_tensors())


def checkpoint_digest(folder: Path) -> str:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensor_digest(tensors)


def pipeline_digest(model_folder: Path, calib: Path, out: Path, options: list[str]) -> str:
    from binq.cli import main

    argv = ["quantize", "--model", str(model_folder), "--calib", str(calib), "--nsamples", "4", "--seqlen", "24"]
    argv += ["--eval", "none", "--no-progress", "--no-layer-table", "--out", str(out), *options]
    assert main(argv) == 0
    return checkpoint_digest(out)


def smollm2_digests() -> dict[str, str]:
    """Each method at its defaults on block 0 of SmolLM2-135M, Hessians from 4 x 128 tokens of Austen."""
    from binq.data import calibration_windows
    from binq.engine.calibrate import quantize_model
    from binq.methods import get_method
    from binq.models import get_architecture, load_model

    digests = {}
    for method_name in SMOLLM2_METHODS:
        loaded = load_model("smollm2-135m")
        model = loaded.model
        del model.model.layers[1:]
        model.config.num_hidden_layers = 1
        calibration = calibration_windows(loaded.tokenizer, "austen", 4, 128, seed=0)
        method = get_method(method_name)
        result = quantize_model(
            model, get_architecture(model), calibration, method, method.make_config(), progress=False
        )
        digests[method_name] = tensor_digest(
            {f"{name}.{key}": t for name, q in result.weights.items() for key, t in q.packed_tensors().items()}
        )
    return digests


def recorded() -> dict[str, dict[str, str]]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_method_weights_are_bit_identical(case: str) -> None:
    check_numerics(1)
    method_name, options = METHOD_CASES[case]
    assert method_digest(method_name, options) == recorded()["method"][case]


@pytest.mark.parametrize("case", sorted(PIPELINE_CASES))
def test_pipeline_checkpoint_is_bit_identical(case: str, tiny_llama_folder: Path, text_file, tmp_path: Path) -> None:
    check_numerics(1)
    calib = text_file(2000, 1)
    digest = pipeline_digest(tiny_llama_folder, calib, tmp_path / "out", PIPELINE_CASES[case])
    assert digest == recorded()["pipeline"][case]


@pytest.mark.slow
def test_smollm2_block_weights_are_bit_identical() -> None:
    check_numerics(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as recorded: BLAS results depend on the thread count
    try:
        assert smollm2_digests() == recorded()["smollm2"]
    finally:
        torch.set_num_threads(threads)


def test_the_fingerprint_is_deterministic() -> None:
    assert numerics_fingerprint(1) == numerics_fingerprint(1)
    assert numerics_fingerprint(2) == numerics_fingerprint(2)


def _write() -> None:
    """Record every digest (the pipeline cases on the test suite's own tiny llama and text)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny_model, build_tiny_tokenizer, word_text

    torch.set_num_threads(1)  # as the test suite runs the tiny cases
    golden: dict[str, dict[str, str]] = {"method": {}, "pipeline": {}, "smollm2": {}}
    golden["numerics"] = {str(threads): numerics_fingerprint(threads) for threads in (1, 2)}
    for case, (method_name, options) in METHOD_CASES.items():
        golden["method"][case] = method_digest(method_name, options)
        print("method", case, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder, calib = Path(tmp) / "tiny", Path(tmp) / "calib.txt"
        build_tiny_model("llama").save_pretrained(folder)
        build_tiny_tokenizer().save_pretrained(folder)
        calib.write_text(word_text(2000, 1) + "\n", encoding="utf-8")
        for case, options in PIPELINE_CASES.items():
            golden["pipeline"][case] = pipeline_digest(folder, calib, Path(tmp) / case, options)
            print("pipeline", case, flush=True)
    torch.set_num_threads(2)
    golden["smollm2"] = smollm2_digests()
    if GOLDEN.is_file():
        old = recorded()
        for level, digests in golden.items():
            for case, digest in digests.items():
                if old.get(level, {}).get(case) not in (None, digest):
                    print(f"changed: {level} {case}")
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden_weights.py --write")
    _write()
