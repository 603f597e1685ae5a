"""Tests for the ``binq`` command line: one-line errors with exit code 2, `binq methods`, a full run.

Most calls run ``binq.cli.main`` in-process; one runs ``python -m binq.cli`` in a real subprocess.
All models are tiny random folders; all texts are local files of random vocabulary words.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from binq.cli import main
from binq.methods.gptq import GPTQConfig
from binq.models import ARCHITECTURES

CALIB_WORDS = 2000


@pytest.fixture(scope="module")
def calib(text_file: Callable[[int, int], Path]) -> Path:
    return text_file(CALIB_WORDS, 1)


@pytest.fixture(scope="module")
def eval_text(text_file: Callable[[int, int], Path]) -> Path:
    return text_file(300, 2)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, pattern: str) -> str:
    """Exit code 2, no traceback, and exactly one ``binq: error:`` line, the last one, matching ``pattern``."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0]
    assert errors[0].startswith(("binq: error: ", "binq quantize: error: ", "binq eval: error: ")), err
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def quantize_args(model: Path | str, calib: Path, *extra: str) -> list[str]:
    return [
        "quantize",
        "--model",
        str(model),
        "--calib",
        str(calib),
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--eval",
        "none",
        "--no-progress",
        "--no-layer-table",
        *extra,
    ]


# --- errors ------------------------------------------------------------------------------------------------


def test_unknown_method(capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path) -> None:
    code, _, err = run_cli(capsys, *quantize_args(tiny_llama_folder, calib, "--method", "nope"))
    from binq.methods import available_methods

    names = ", ".join(m.name for m in available_methods())
    assert "arb-llm-rc" in names and "billm" in names
    assert_one_line_error(code, err, r"binq: error: unknown method 'nope' \(available: " + re.escape(names) + r"\)")


def test_method_is_required(capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path) -> None:
    code, _, err = run_cli(capsys, *quantize_args(tiny_llama_folder, calib))
    assert_one_line_error(code, err, "the following arguments are required: --method")


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        (["--method", "rtn", "--act-order"], "unrecognized arguments: --act-order"),
        (["--method", "billm", "--bits", "2"], "unrecognized arguments: --bits 2"),
        (["--method", "gptq", "--bits", "two"], "argument --bits: invalid int value: 'two'"),
        (["--method", "gptq", "--bits", "9"], r"binq: error: --bits must be in \[1, 8\], got 9"),
        (["--method", "billm", "--salient-metric", "x"], "--salient-metric must be one of hessian, magnitude"),
    ],
)
def test_bad_method_options(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path, options: list[str], pattern: str
) -> None:
    code, _, err = run_cli(capsys, *quantize_args(tiny_llama_folder, calib, *options))
    assert_one_line_error(code, err, pattern)


def test_unknown_model_path(capsys: pytest.CaptureFixture[str], tmp_path: Path, calib: Path) -> None:
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(capsys, *quantize_args(missing, calib, "--method", "rtn"))
    assert_one_line_error(code, err, f"binq: error: no such file or directory: '{missing}'")
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path), "--seqlen", "16", "--no-progress")
    assert_one_line_error(code, err, r"binq: error: .* has no config\.json")


def test_missing_calibration_file(capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    code, _, err = run_cli(capsys, *quantize_args(tiny_llama_folder, missing, "--method", "gptq"))
    assert_one_line_error(code, err, rf"binq: error: unknown text '{missing}'.*not an existing file")


def test_calibration_free_method_reads_no_calibration(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, tmp_path: Path
) -> None:
    # RTN needs no calibration: no text is read (a missing file is never opened), no engine pass runs.
    missing = tmp_path / "missing.txt"
    out = tmp_path / "rtn"
    args = quantize_args(tiny_llama_folder, missing, "--method", "rtn", "--workers", "1", "--out", str(out))
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["tokens"] == 0
    assert report["engine"] == {"path": "independent", "workers": 1, "streamed": True}


def test_missing_evaluation_file(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path, tmp_path: Path
) -> None:
    args = quantize_args(tiny_llama_folder, calib, "--method", "rtn")
    args[args.index("--eval") + 1] = str(tmp_path / "nope.txt")
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "binq: error: unknown text")


def test_too_little_calibration_text(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, text_file: Callable[[int, int], Path]
) -> None:
    small = text_file(10, 3)
    args = quantize_args(tiny_llama_folder, small, "--method", "gptq")
    args[args.index("--seqlen") + 1] = "60"
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, r"binq: error: calibration source .* has 10 tokens; windows of 60 tokens")


def test_non_finite_weights(
    capsys: pytest.CaptureFixture[str], save_tiny_model: Callable[..., Path], calib: Path
) -> None:
    def poison(model: nn.Module) -> None:
        with torch.no_grad():
            model.model.layers[0].self_attn.k_proj.weight[1, 2] = float("nan")

    folder = save_tiny_model("llama", edit=poison)
    code, _, err = run_cli(capsys, *quantize_args(folder, calib, "--method", "gptq"))
    assert_one_line_error(code, err, r"NaN or Inf values in model\.layers\.0\.self_attn\.k_proj\.weight")


@pytest.mark.parametrize(
    ("seqlen", "pattern"),
    [
        ("1", "binq: error: --seqlen must be at least 2"),
        ("0", "binq: error: --seqlen must be at least 2"),
        ("-5", "binq: error: --seqlen must be at least 2"),
        ("ten", "argument --seqlen: invalid int value: 'ten'"),
    ],
)
def test_bad_seqlen(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path, seqlen: str, pattern: str
) -> None:
    args = quantize_args(tiny_llama_folder, calib, "--method", "rtn")
    args[args.index("--seqlen") + 1] = seqlen
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, pattern)
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_llama_folder), "--seqlen", seqlen)
    assert_one_line_error(code, err, pattern)


def test_seqlen_longer_than_the_model_context(
    capsys: pytest.CaptureFixture[str], save_tiny_model: Callable[..., Path], calib: Path, eval_text: Path
) -> None:
    # OPT's learned positions end at max_position_embeddings (64 here): a longer window cannot run.
    folder = save_tiny_model("opt")
    args = quantize_args(folder, calib, "--method", "rtn")
    args[args.index("--seqlen") + 1] = "128"
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, r"binq: error: --seqlen 128 .*64")
    code, _, err = run_cli(capsys, "eval", "--model", str(folder), "--seqlen", "128", "--eval", str(eval_text))
    assert_one_line_error(code, err, r"binq: error: --seqlen 128 .*64")


def test_bad_eval_windows(capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path) -> None:
    code, _, err = run_cli(capsys, *quantize_args(tiny_llama_folder, calib, "--method", "rtn", "--eval-windows", "0"))
    assert_one_line_error(code, err, "binq: error: --eval-windows must be at least 1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path, eval_text: Path, device: str
) -> None:
    code, _, err = run_cli(capsys, *quantize_args(tiny_llama_folder, calib, "--method", "rtn", "--device", device))
    assert_one_line_error(code, err, f"binq: error: --device {device} asked for, but no CUDA device is available")
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_llama_folder),
        "--device",
        device,
        "--seqlen",
        "16",
        "--eval",
        str(eval_text),
        "--no-progress",
    )
    assert_one_line_error(code, err, f"binq: error: --device {device} asked for, but no CUDA device is available")


def test_not_a_device(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path, eval_text: Path
) -> None:
    code, _, err = run_cli(capsys, *quantize_args(tiny_llama_folder, calib, "--method", "rtn", "--device", "gpu0"))
    assert_one_line_error(code, err, r"binq: error: --device 'gpu0' is not a device")
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_llama_folder),
        "--device",
        "gpu0",
        "--seqlen",
        "16",
        "--eval",
        str(eval_text),
    )
    assert_one_line_error(code, err, r"binq: error: --device 'gpu0' is not a device")


def test_bad_hessian_dtype(capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path) -> None:
    code, _, err = run_cli(
        capsys, *quantize_args(tiny_llama_folder, calib, "--method", "gptq", "--hessian-dtype", "float16")
    )
    assert_one_line_error(code, err, "argument --hessian-dtype: invalid choice: 'float16'")


def test_error_in_a_real_subprocess(tmp_path: Path, calib: Path) -> None:
    missing = tmp_path / "absent"
    completed = subprocess.run(
        [sys.executable, "-m", "binq.cli", *quantize_args(missing, calib, "--method", "gptq")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.stdout == ""
    assert_one_line_error(completed.returncode, completed.stderr, f"no such file or directory: '{missing}'")
    assert completed.stderr.strip() == f"binq: error: no such file or directory: '{missing}'"


# --- commands ----------------------------------------------------------------------------------------------


def test_methods_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "methods")
    assert code == 0 and err == ""
    first_column = {line.split("│")[1].strip() for line in out.splitlines() if line.count("│") >= 4}
    assert {"rtn", "gptq", "billm"} <= first_column
    assert "--group-size 128" in out and "--salient-metric hessian" in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys)
    assert_one_line_error(code, err, "the following arguments are required: command")


def test_quantize_writes_a_complete_report(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, calib: Path, eval_text: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "run"
    argv = [
        "quantize",
        "--model",
        str(tiny_llama_folder),
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--calib",
        str(calib),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval",
        str(eval_text),
        "--eval-windows",
        "2",
        "--out",
        str(out_dir),
        "--no-progress",
    ]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "Traceback" not in err
    report = json.loads((out_dir / "report.json").read_text())

    assert report["schema"] == "binq.report/1"
    assert report["command"] == ["binq", *argv]
    assert report["model"]["path"] == str(tiny_llama_folder.resolve())
    assert report["model"]["architecture"] == "llama" and report["model"]["dtype"] == "float32"
    assert report["method"] == {"name": "gptq", "config": dataclasses.asdict(GPTQConfig(bits=4, group_size=32))}
    assert report["calibration"] == {"source": str(calib), "nsamples": 4, "seqlen": 32, "seed": 0, "tokens": 4 * 32}
    assert report["seed"] == 0
    assert report["engine"]["hessian_dtype"] == "float32" and report["engine"]["true_sequential"] is False

    arch = ARCHITECTURES["llama"]
    layers = report["layers"]
    assert [(r["block"], r["name"]) for r in layers] == [(b, n) for b in range(2) for n in arch.linear_names]
    assert all(0 < r["relative_error"] < 0.05 and r["compute_bits"] == 4 for r in layers)
    linear_params = sum(r["numel"] for r in layers)

    assert report["compute_bits"] == 4.0
    storage = report["storage_bits"]
    assert storage["linear"] == pytest.approx(4 + 20 / 32)  # 4-bit codes, fp16 scale and 4-bit zero per 32
    assert storage["linear"] > report["compute_bits"]
    assert storage["linear"] == pytest.approx(sum(r["storage_bits_total"] for r in layers) / linear_params)
    # the saved model is fp32, so everything else counts at 32 bits: the model figure lies between
    assert report["bits"]["other_parameters_bits"] == 32
    assert storage["linear"] < storage["model"] < 32
    assert report["bits"]["linear"]["parameters"] == linear_params
    assert report["bits_original"]["model"]["parameters"] == report["bits"]["model"]["parameters"]

    name = str(eval_text)
    assert set(report["ppl"]) == set(report["kl"]) == set(report["eval"]) == {name}
    ppl = report["ppl"][name]
    for value in (ppl["quantized"], ppl["original"]):
        assert math.isfinite(value) and value > 1
    assert ppl["quantized"] != ppl["original"]
    assert math.isfinite(report["kl"][name]) and report["kl"][name] >= 0
    protocol = report["eval"][name]["protocol"]
    assert (protocol["seqlen"], protocol["windows"], protocol["windows_available"], protocol["tokens"]) == (
        32,
        2,
        300 // 32,
        300,
    )

    times = report["time_s"]
    assert 0 < times["quantize"] <= times["total"] and 0 < times["eval"] <= times["total"]
    assert isinstance(report["peak_memory_bytes"], int) and report["peak_memory_bytes"] > 2**20
    assert {"binq", "python", "torch", "transformers", "numpy"} <= set(report["versions"])
    assert report["versions"]["torch"] == torch.__version__
    # the terminal shows the layer table and the comparison table
    assert "self_attn.q_proj" in out and "gptq 4-bit g32" in out


def test_eval_prints_the_perplexity(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, eval_text: Path
) -> None:
    code, out, err = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_llama_folder),
        "--eval",
        str(eval_text),
        "--seqlen",
        "32",
        "--eval-windows",
        "3",
        "--no-progress",
    )
    assert code == 0, err
    match = re.search(rf"{re.escape(str(eval_text))}: PPL ([0-9.]+)  \(.*: 3 x 32 tokens \(of 9 windows\)", out)
    assert match, out
    assert 1 < float(match.group(1)) < 10_000
