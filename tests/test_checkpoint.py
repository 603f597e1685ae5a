"""Tests for the packed checkpoint: save, load (binq.load and plain from_pretrained), validation, sizes.

Every model is a tiny random one (tests/conftest.py); quantization runs the real engine on a few random
calibration windows, so the weights saved are what ``binq quantize`` produces.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import binq
from binq.checkpoint import FORMAT_VERSION, WEIGHTS_FILE, checkpoint_entries, read_header, save_checkpoint
from binq.cli import main
from binq.engine.calibrate import EngineResult, quantize_model
from binq.errors import BinqError
from binq.methods import get_method
from binq.models import get_architecture
from binq.nn import BinaryLinear, quantized_weights
from binq.nn.kernels import reference_only, register_kernel, unregister_kernel
from binq.quant.structured import BinaryWeight
from conftest import build_tiny_model, build_tiny_tokenizer, random_ids

METHODS = {
    "rtn 1-bit g32": ("rtn", {"group_size": 32}),
    "rtn centred": ("rtn", {"centred": True}),
    "billm": ("billm", {}),
    "gptq 2-bit act-order": ("gptq", {"bits": 2, "group_size": 32, "act_order": True}),
}


def quantize_tiny(
    method: str, options: dict, arch: str = "llama", **overrides: object
) -> tuple[nn.Module, EngineResult]:
    model = build_tiny_model(arch, **overrides)
    spec = get_method(method)
    result = quantize_model(
        model, get_architecture(model), random_ids(4, 16), spec, spec.make_config(**options), progress=False
    )
    return model, result


def save_tiny(folder: Path, method: str, options: dict, dtype: torch.dtype = torch.float32, **kw: object) -> nn.Module:
    model, result = quantize_tiny(method, options, **kw)
    save_checkpoint(
        model,
        result.weights,
        folder,
        tokenizer=build_tiny_tokenizer(),
        method=method,
        method_config=options,
        dtype=dtype,
    )
    return model


@torch.no_grad()
def logits(model: nn.Module, seed: int = 7) -> torch.Tensor:
    return model(random_ids(2, 16, seed=seed)).logits


@pytest.mark.parametrize("label", list(METHODS))
def test_loaded_logits_equal_the_in_memory_model(tmp_path: Path, label: str) -> None:
    method, options = METHODS[label]
    reference = save_tiny(tmp_path, method, options)
    loaded = binq.load(tmp_path)
    # Same fp32 dequantization, same matmuls: bit-for-bit equal, no tolerance.
    assert torch.equal(logits(loaded), logits(reference))
    linears = [m for m in loaded.modules() if isinstance(m, BinaryLinear)]
    assert len(linears) == 7 * 2
    assert not any(isinstance(m, nn.Linear) for m in loaded.model.layers.modules())


def test_qwen2_biases_and_fp16_storage(tmp_path: Path) -> None:
    """Biased linears round-trip; unquantized tensors stored in fp16 load back exactly when fp16-exact."""
    model, result = quantize_tiny("rtn", {"group_size": 32}, arch="qwen2")
    with torch.no_grad():
        for param in model.parameters():  # as when the source checkpoint is fp16 (SmolLM2)
            param.copy_(param.half().float())
    save_checkpoint(model, result.weights, tmp_path, dtype=torch.float16)
    header = read_header(tmp_path / WEIGHTS_FILE)
    assert header["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16
    assert header["model.embed_tokens.weight"].dtype == torch.float16
    assert header["model.layers.0.self_attn.q_proj.signs"].dtype == torch.uint8
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    assert torch.equal(logits(binq.load(tmp_path)), logits(model))


def test_buffers_are_the_packed_tensors(tmp_path: Path) -> None:
    model, result = quantize_tiny("billm", {})
    save_checkpoint(model, result.weights, tmp_path)
    loaded = binq.load(tmp_path)
    name = "model.layers.1.mlp.down_proj"
    module = loaded.get_submodule(name)
    expected = result.weights[name].packed_tensors()
    assert set(module.packed_tensors()) == set(expected)
    for key, tensor in expected.items():
        assert module.packed_tensors()[key].dtype == tensor.dtype
        assert torch.equal(module.packed_tensors()[key], tensor)
    rebuilt = quantized_weights(loaded)
    assert set(rebuilt) == set(result.weights)
    assert torch.equal(rebuilt[name].dequantize(), result.weights[name].dequantize())


def test_plain_from_pretrained_after_import_binq(tmp_path: Path) -> None:
    """A fresh interpreter: `import binq` alone makes AutoModelForCausalLM build BinaryLinear modules."""
    reference = save_tiny(tmp_path, "rtn", {"group_size": 32})
    ids = random_ids(2, 16, seed=7)
    script = (
        "import sys, json, torch, binq\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "ids = torch.tensor(json.loads(sys.argv[2]))\n"
        "with torch.no_grad(): out = m(ids).logits\n"
        "print(type(m.model.layers[0].mlp.down_proj).__name__, json.dumps(out.flatten()[:50].tolist()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), json.dumps(ids.tolist())],
        capture_output=True,
        text=True,
        check=True,
    )
    kind, values = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert kind == "BinaryLinear"
    # binq.load first in a fresh interpreter: its own import of the registry must not loop through the hook.
    load_first = "import sys, binq; m = binq.load(sys.argv[1]); print(type(m.model.layers[0].mlp.up_proj).__name__)"
    done_load = subprocess.run([sys.executable, "-c", load_first, str(tmp_path)], capture_output=True, text=True)
    assert done_load.returncode == 0, done_load.stderr[-2000:]
    assert done_load.stdout.strip().splitlines()[-1] == "BinaryLinear"
    with torch.no_grad():
        expected = reference(ids).logits.flatten()[:50]
    assert torch.equal(torch.tensor(json.loads(values)), expected)


def test_in_process_from_pretrained(tmp_path: Path) -> None:
    reference = save_tiny(tmp_path, "gptq", {"bits": 2, "group_size": 32})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(logits(loaded), logits(reference))


# --- BinaryLinear -------------------------------------------------------------------------------------------


def test_binary_linear_reference_path_and_dtype_moves() -> None:
    torch.manual_seed(0)
    signs = torch.rand(6, 40) > 0.5
    weight = BinaryWeight(signs=signs, scales=torch.rand(6, 2, 1).half(), block_size=32)
    bias = torch.randn(6)
    module = BinaryLinear.from_weight(weight, bias)
    x = torch.randn(3, 40)
    with reference_only():
        assert torch.equal(module(x), F.linear(x, weight.dequantize(), bias))
    module.half()
    assert module.signs.dtype == torch.uint8 and module.scales.dtype == torch.float16
    assert module.bias.dtype == torch.float16
    module.float()
    assert module.scales.dtype == torch.float16  # never rounded through another dtype
    assert torch.equal(module.scales, weight.scales)
    # The bias did follow the model through fp16, as any parameter would.
    with reference_only():
        assert torch.equal(module(x), F.linear(x, weight.dequantize(), bias.half().float()))


def test_kernel_registry_dispatch() -> None:
    weight = BinaryWeight(signs=torch.ones(4, 8, dtype=torch.bool), scales=torch.ones(4, 1, 1).half(), block_size=8)
    module = BinaryLinear.from_weight(weight)

    class Doubling:
        name, priority = "test-doubling", 1000  # above every built-in kernel

        def supports(self, module: BinaryLinear, x: torch.Tensor) -> bool:
            return x.shape[0] == 2  # only batches of two

        def forward(self, module: BinaryLinear, x: torch.Tensor) -> torch.Tensor:
            return 2 * F.linear(x, module.dense_weight(x.dtype))

    register_kernel(Doubling())
    try:
        x = torch.ones(2, 8)
        assert torch.equal(module(x), torch.full((2, 4), 16.0))
        assert torch.equal(module(torch.ones(1, 8)), torch.full((1, 4), 8.0))  # the next kernel, or the reference
    finally:
        unregister_kernel("test-doubling")


# --- honest size, CLI, perplexity ---------------------------------------------------------------------------


def test_cli_checkpoint_sizes_and_perplexity(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, text_file: Callable[[int, int], Path], tmp_path: Path
) -> None:
    calib, text = text_file(2000, 1), text_file(300, 2)
    out = tmp_path / "run"
    argv = ["quantize", "--model", str(tiny_llama_folder), "--calib", str(calib), "--nsamples", "2", "--seqlen", "16"]
    argv += ["--eval", str(text), "--no-progress", "--no-layer-table", "--method", "billm", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "binq" and quantization["format_version"] == FORMAT_VERSION
    assert quantization["method"] == "billm" and quantization["method_config"] == report["method"]["config"]
    assert quantization["binq_version"] == binq.__version__
    assert (out / "tokenizer.json").is_file()

    # The CLI streams: shards and an index; the entries of every shard together.
    header = {name: entry for name, (_, entry) in checkpoint_entries(out).items()}
    modules = set(quantization["modules"])
    linear_bytes = sum(e.nbytes for n, e in header.items() if n.rpartition(".")[0] in modules)
    params = report["bits"]["linear"]["parameters"]
    assert linear_bytes * 8 / params == report["bits"]["linear"]["storage_bits"]
    # The whole data section is the report's model figure, byte for byte (the source is fp32).
    assert sum(e.nbytes for e in header.values()) == report["bits"]["model"]["storage_bytes"]

    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--seqlen", "16", "--eval", str(text), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    ppl = float(printed.split("PPL ")[1].split()[0])
    assert ppl == pytest.approx(report["eval"][str(text)]["ppl"], abs=5e-4)  # printed with 3 decimals


# --- validation on load -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("valid")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside conftest's one-thread fixture
    try:
        save_tiny(folder, "billm", {})
    finally:
        torch.set_num_threads(threads)
    return folder


def variant(saved: Path, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(saved, folder)
    if edit is not None:
        tensors = load_file(folder / WEIGHTS_FILE)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS_FILE)
    return folder


def edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def test_wrong_format_version(saved: Path, tmp_path: Path) -> None:
    folder = variant(saved, tmp_path)
    edit_config(folder, lambda q: q.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BinqError, match=r"format version 2 is not supported .*upgrade binq"):
        binq.load(folder)
    with pytest.raises(BinqError, match="format version 2"):  # the transformers path checks it too
        AutoModelForCausalLM.from_pretrained(folder)


def test_unknown_layout(saved: Path, tmp_path: Path) -> None:
    folder = variant(saved, tmp_path)
    edit_config(folder, lambda q: q["modules"]["model.layers.0.mlp.up_proj"].update(layout="ternary"))
    with pytest.raises(BinqError, match="unknown weight layout 'ternary'"):
        binq.load(folder)


def test_missing_tensor(saved: Path, tmp_path: Path) -> None:
    folder = variant(saved, tmp_path, lambda t: t.pop("model.layers.1.self_attn.v_proj.residual_signs"))
    with pytest.raises(BinqError, match=r"model\.layers\.1\.self_attn\.v_proj: tensor 'residual_signs' is missing"):
        binq.load(folder)


def test_missing_unquantized_tensor(saved: Path, tmp_path: Path) -> None:
    folder = variant(saved, tmp_path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(BinqError, match=r"tensor 'model\.norm\.weight' is missing"):
        binq.load(folder)


def test_misshaped_tensor(saved: Path, tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.scales"
    folder = variant(saved, tmp_path, lambda t: t.update({name: t[name][:, :, :2].contiguous()}))
    with pytest.raises(BinqError, match=r"q_proj: tensor 'scales' has shape \(64, 1, 2\), expected \(64, 1, 4\)"):
        binq.load(folder)


def test_misshaped_unquantized_tensor(saved: Path, tmp_path: Path) -> None:
    name = "model.layers.0.input_layernorm.weight"
    folder = variant(saved, tmp_path, lambda t: t.update({name: t[name][:10].contiguous()}))
    with pytest.raises(BinqError, match=r"tensor 'model\.layers\.0\.input_layernorm\.weight' has shape \(10,\)"):
        binq.load(folder)


def test_non_finite_scales(saved: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.gate_proj.scales"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name][3, 0, 1] = math.inf

    folder = variant(saved, tmp_path, poison)
    with pytest.raises(BinqError, match=r"gate_proj: tensor 'scales' has non-finite values"):
        binq.load(folder)


def test_truncated_file(saved: Path, tmp_path: Path) -> None:
    folder = variant(saved, tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) - 100])
    with pytest.raises(BinqError, match=r"is truncated: tensor '[\w.]+' ends at byte"):
        binq.load(folder)


def test_not_a_checkpoint(tiny_llama_folder: Path) -> None:
    with pytest.raises(BinqError, match="is not a binq checkpoint"):
        binq.load(tiny_llama_folder)
