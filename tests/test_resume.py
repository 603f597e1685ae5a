"""Resumable runs (docs/RESUME.md): ``binq quantize --out DIR`` killed at any point continues to the same bits.

Kill points are deterministic test hooks of :mod:`binq.engine.resume`: ``BINQ_TEST_KILL_AFTER_BLOCK=k``
(SIGKILL right after block k's file is in place) and ``BINQ_TEST_KILL_WRITING_BLOCK=k`` (after its
temporary file is written, before the rename). The matrix runs the command in forked children of this
process (``binq.cli.main`` without re-importing torch, killed by the same SIGKILL), chained: each child
resumes what the previous one left and is killed further on, and the last run, in this process, must
write a checkpoint whose every tensor is bit-identical to an uninterrupted run's and a report equal to
its in every field but times. Two tests kill the real ``python -m binq`` in a subprocess, one kills a
two-process ``--nproc 2`` run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from binq.cli import main
from binq.engine.resume import KILL_AFTER_BLOCK_ENV, KILL_WRITING_BLOCK_ENV, Progress, block_file_name
from conftest import build_tiny_model, build_tiny_tokenizer

BLOCKS = 3
SIGKILLED = -9

TUNE = ["--tune", "--tune-steps", "4", "--tune-batch", "2", "--tune-tokens", "12", "--tune-holdout", "1"]

# name: `binq quantize` options; small blocks and groups so that every run takes well under a second.
METHOD_CASES: dict[str, list[str]] = {
    "rtn": ["--method", "rtn", "--bits", "1", "--group-size", "32", "--workers", "1"],
    "gptq": ["--method", "gptq", "--bits", "3", "--group-size", "32"],
    "gptq-true-sequential": ["--method", "gptq", "--bits", "2", "--group-size", "32", "--true-sequential"],
    "billm": ["--method", "billm", "--block-size", "32"],
    "arb": ["--method", "arb", "--block-size", "32", "--iterations", "3"],
    "arb-x": ["--method", "arb-x", "--block-size", "32", "--iterations", "3", "--x-iterations", "3"],
    "arb-rc": ["--method", "arb-rc", "--block-size", "32", "--iterations", "3"],
    "arb-llm-x": ["--method", "arb-llm-x", "--block-size", "32", "--iterations", "3", "--x-iterations", "3"],
    "arb-llm-rc": ["--method", "arb-llm-rc", "--block-size", "32", "--iterations", "3"],
    "arb-group": ["--method", "arb-group", "--group-size", "32"],
    "msb": ["--method", "msb", "--groups", "4", "--granularity", "row", "--workers", "1"],
    "msb-hessian": ["--method", "msb-hessian", "--groups", "4"],
    "w11": ["--method", "w11", "--block-size", "32"],
    "w11-a4": ["--method", "w11", "--block-size", "32", "--act-bits", "4"],  # smoothing recomputed on resume
    # Tuned: the original stream is rebuilt through the finished blocks; rtn goes through the engine.
    "arb-group-tuned": ["--method", "arb-group", "--group-size", "32", *TUNE],
    "rtn-tuned": ["--method", "rtn", "--bits", "1", "--group-size", "32", *TUNE, "--tune-target", "quantized"],
    # Split windows: their two streams are rebuilt through the finished blocks too.
    # The last block's head steps (--tune-head-steps) too.
    "arb-group-tuned-split": [
        *("--method", "arb-group", "--group-size", "32", *TUNE),
        *("--tune-split", "--tune-signs", "--tune-head-steps", "3"),
    ],
}

# Each kill: (hook, block), and what DIR/progress holds afterwards: finished blocks, and the temp file's block.
CHAIN: list[tuple[str, int, list[int], int | None]] = [
    (KILL_WRITING_BLOCK_ENV, 0, [], 0),  # nothing finished, block 0 half written
    (KILL_AFTER_BLOCK_ENV, 0, [0], None),  # ignores the temp file, finishes block 0
    (KILL_WRITING_BLOCK_ENV, 2, [0, 1], 2),  # continues at block 1, block 2 half written
    (KILL_AFTER_BLOCK_ENV, 2, [0, 1, 2], None),  # every block finished; killed before the checkpoint
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-3")
    build_tiny_model("llama", num_hidden_layers=BLOCKS).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts(text_file: Callable[[int, int], Path]) -> tuple[Path, Path]:
    return text_file(2000, 1), text_file(300, 2)


def command(model: Path, calib: Path, eval_text: Path, options: list[str], out: Path) -> list[str]:
    argv = ["quantize", "--model", str(model), "--calib", str(calib), "--nsamples", "4", "--seqlen", "24"]
    argv += ["--eval", str(eval_text), "--eval-windows", "2", "--no-progress", "--no-layer-table"]
    return [*argv, *options, "--out", str(out)]


def _child(argv: list[str], env: dict[str, str]) -> None:
    os.environ.update(env)
    sys.exit(main(argv))


def forked_run(argv: list[str], **env: str) -> int | None:
    """``binq <argv>`` in a forked child with ``env`` set; its exit code (-9: SIGKILL)."""
    child = multiprocessing.get_context("fork").Process(target=_child, args=(argv, env))
    child.start()
    child.join(timeout=300)
    return child.exitcode


def progress_state(out: Path) -> tuple[list[int], list[str]]:
    """The finished blocks in ``out/progress`` and its temporary files."""
    folder = out / "progress"
    blocks = sorted(int(p.name[6:11]) for p in folder.glob("block-*.safetensors"))
    return blocks, sorted(p.name for p in folder.glob("*.tmp"))


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _comparable(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """A report less what differs between two runs of the same command: times, dates, memory, the folder."""
    report = json.loads(json.dumps(report).replace(str(out), "OUT"))
    for key in ("created", "time_s", "peak_memory_bytes", "resumed_from_block"):
        report.pop(key, None)
    for layer in report["layers"] + report.get("tuning", {}).get("blocks", []):
        layer.pop("time_s")
    return report


def assert_same_run(reference: Path, resumed: Path) -> dict[str, Any]:
    """Every tensor bit-identical, the same config.json, the same report but for times; the resumed report."""
    a, b = tensors_of(reference), tensors_of(resumed)
    assert a.keys() == b.keys()
    assert [k for k in a if not same_bits(a[k], b[k])] == []
    assert json.loads((reference / "config.json").read_text()) == json.loads((resumed / "config.json").read_text())
    report_a = json.loads((reference / "report.json").read_text())
    report_b = json.loads((resumed / "report.json").read_text())
    assert "resumed_from_block" not in report_a
    assert _comparable(report_a, reference) == _comparable(report_b, resumed)
    assert not (resumed / "progress").exists()  # deleted once the checkpoint is written
    return report_b


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_killed_at_every_point_resumes_to_the_same_bits(
    case: str, model_folder: Path, texts: tuple[Path, Path], tmp_path: Path
) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(command(model_folder, *texts, METHOD_CASES[case], reference)) == 0
    assert not (reference / "progress").exists()
    argv = command(model_folder, *texts, METHOD_CASES[case], resumed)
    for hook, block, finished, temp in CHAIN:
        assert forked_run(argv, **{hook: str(block)}) == SIGKILLED, (hook, block)
        assert progress_state(resumed) == (finished, [] if temp is None else [block_file_name(temp) + ".tmp"])
        assert (resumed / "progress" / "run.json").is_file()
        assert not (resumed / "report.json").exists()
    assert main(argv) == 0
    assert assert_same_run(reference, resumed)["resumed_from_block"] == BLOCKS


@pytest.mark.parametrize(
    "case", ["gptq-true-sequential", "w11-a4", "msb", "arb-llm-rc", "arb-group-tuned", "arb-group-tuned-split"]
)
def test_resume_from_the_middle(case: str, model_folder: Path, texts: tuple[Path, Path], tmp_path: Path) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(command(model_folder, *texts, METHOD_CASES[case], reference)) == 0
    argv = command(model_folder, *texts, METHOD_CASES[case], resumed)
    assert forked_run(argv, **{KILL_AFTER_BLOCK_ENV: "1"}) == SIGKILLED
    assert progress_state(resumed) == ([0, 1], [])
    assert main(argv) == 0
    assert assert_same_run(reference, resumed)["resumed_from_block"] == 2


def test_calibration_free_blocks_finished_in_any_order(
    model_folder: Path, texts: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two workers finish blocks in any order; whatever was finished when the kill came is taken."""
    options = ["--method", "rtn", "--bits", "1", "--group-size", "32", "--workers", "2"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(command(model_folder, *texts, options, reference)) == 0
    argv = command(model_folder, *texts, options, resumed)
    assert forked_run(argv, **{KILL_AFTER_BLOCK_ENV: "1"}) == SIGKILLED
    assert 1 in progress_state(resumed)[0]
    assert main(argv) == 0
    assert assert_same_run(reference, resumed)["resumed_from_block"] in (0, 2, 3)


def test_the_real_command_killed_in_a_subprocess_resumes(
    model_folder: Path, texts: tuple[Path, Path], tmp_path: Path
) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    options = METHOD_CASES["billm"]
    assert main(command(model_folder, *texts, options, reference)) == 0
    argv = [sys.executable, "-m", "binq", *command(model_folder, *texts, options, resumed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(argv, env={**env, KILL_WRITING_BLOCK_ENV: "1"}, capture_output=True, check=False)
    assert killed.returncode == SIGKILLED
    assert progress_state(resumed) == ([0], [block_file_name(1) + ".tmp"])
    completed = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"resuming {resumed}: block 0 done, continuing at block 1" in completed.stderr
    assert assert_same_run(reference, resumed)["resumed_from_block"] == 1


# --- what is refused, what is ignored ------------------------------------------------------------------------


@pytest.fixture
def killed(model_folder: Path, texts: tuple[Path, Path], tmp_path: Path) -> tuple[list[str], Path, Path, Path]:
    """A gptq run of its own model folder and calibration text, killed after block 0: (argv, out, model, calib)."""
    model, calib = tmp_path / "model", tmp_path / "calib.txt"
    shutil.copytree(model_folder, model)
    shutil.copy(texts[0], calib)
    out = tmp_path / "out"
    argv = command(model, calib, texts[1], METHOD_CASES["gptq"], out)
    assert forked_run(argv, **{KILL_AFTER_BLOCK_ENV: "0"}) == SIGKILLED
    return argv, out, model, calib


def error_line(err: str) -> str:
    """The error a refused command printed: one line, the last of stderr (progress bars may come before)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert sum("binq: error" in line for line in lines) == 1, err
    assert lines[-1].startswith("binq: error: "), err
    return lines[-1]


def _with(argv: list[str], option: str, value: str | None) -> list[str]:
    if value is None:
        return [*argv, option]
    if option in argv:
        argv = list(argv)
        argv[argv.index(option) + 1] = value
        return argv
    return [*argv, option, value]


REFUSALS: dict[str, tuple[Callable[[list[str], Path, Path], list[str]], str]] = {
    "method config": (lambda a, m, c: _with(a, "--bits", "4"), "method.config.bits differs (was 3, now 4)"),
    "method": (lambda a, m, c: _with(a, "--method", "rtn"), 'method.name differs (was "gptq", now "rtn")'),
    "seed": (lambda a, m, c: _with(a, "--seed", "1"), "calibration.seed differs (was 0, now 1)"),
    "nsamples": (lambda a, m, c: _with(a, "--nsamples", "5"), "calibration.nsamples differs (was 4, now 5)"),
    "true sequential": (lambda a, m, c: _with(a, "--true-sequential", None), "engine.true_sequential differs"),
    "activations": (lambda a, m, c: _with(a, "--act-bits", "4"), "activations.bits differs (was 16, now 4)"),
    "hessian dtype": (lambda a, m, c: _with(a, "--hessian-dtype", "float64"), "engine.hessian_dtype differs"),
    "tuning": (lambda a, m, c: [*a, "--tune", "--tune-holdout", "1"], "tune differs (was null, now {"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_different_run_is_refused_naming_the_field(
    case: str, killed: tuple[list[str], Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv, out, model, calib = killed
    change, message = REFUSALS[case]
    capsys.readouterr()
    assert main(change(argv, model, calib)) == 2
    err = capsys.readouterr().err
    line = error_line(err)
    assert line.startswith(f"binq: error: cannot resume {out}: "), err
    assert message in line and line.endswith(f"use another --out or delete {out / 'progress'}"), err
    assert progress_state(out) == ([0], [])  # left as it was
    assert main(argv) == 0  # and the same command still resumes


def test_a_different_model_is_refused(
    killed: tuple[list[str], Path, Path, Path], save_tiny_model, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, _, model, _ = killed
    other = save_tiny_model("llama", num_hidden_layers=BLOCKS)
    capsys.readouterr()
    assert main(_with(argv, "--model", str(other))) == 2
    assert "model.spec differs" in capsys.readouterr().err
    # The same path holding other weights (same config, same file sizes): the blocks' hash tells.
    build_tiny_model("llama", seed=1, num_hidden_layers=BLOCKS).save_pretrained(model)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.first_last_blocks_sha256 differs" in error_line(err), err


def test_other_calibration_text_under_the_same_name_is_refused(
    killed: tuple[list[str], Path, Path, Path],
    text_file: Callable[[int, int], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv, _, _, calib = killed
    shutil.copy(text_file(2000, 3), calib)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "calibration.windows_sha256 differs" in error_line(err), err


def test_leftover_temp_files_are_ignored_and_removed(
    killed: tuple[list[str], Path, Path, Path], texts: tuple[Path, Path], tmp_path: Path
) -> None:
    argv, out, model, calib = killed
    for name in (block_file_name(1) + ".tmp", block_file_name(2) + ".tmp", "run.json.tmp"):
        (out / "progress" / name).write_bytes(b"\x00garbage, as a write cut short leaves it")
    assert main(argv) == 0
    reference = tmp_path / "reference"
    assert main(command(model, calib, texts[1], METHOD_CASES["gptq"], reference)) == 0
    assert assert_same_run(reference, out)["resumed_from_block"] == 1


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "other block's file"])
def test_a_damaged_block_file_is_recomputed(
    damage: str, model_folder: Path, texts: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(command(model_folder, *texts, METHOD_CASES["gptq"], reference)) == 0
    argv = command(model_folder, *texts, METHOD_CASES["gptq"], resumed)
    assert forked_run(argv, **{KILL_AFTER_BLOCK_ENV: "2"}) == SIGKILLED
    file = resumed / "progress" / block_file_name(1)
    data = file.read_bytes()
    if damage == "flipped byte":
        file.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    elif damage == "truncated":
        file.write_bytes(data[: len(data) // 2])
    else:
        shutil.copy(resumed / "progress" / block_file_name(0), file)
    assert main(argv) == 0
    assert "does not read back whole" in caplog.text
    # Block 1 is recomputed, and block 2 after it (its inputs come from block 1).
    assert assert_same_run(reference, resumed)["resumed_from_block"] == 1


def test_a_second_run_on_the_same_folder_is_refused(
    killed: tuple[list[str], Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv, out, _, _ = killed
    context = multiprocessing.get_context("fork")
    locked, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(out, locked, release))  # another run's process
    holder.start()
    try:
        assert locked.wait(60)
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "another binq run is writing its progress" in error_line(err), err
    finally:
        release.set()
        holder.join(60)
    assert main(argv) == 0


def _hold_lock(out: Path, locked: Any, release: Any) -> None:
    progress = Progress.open(out, {})
    locked.set()
    release.wait(60)
    progress.close()


def test_a_run_that_stops_before_it_begins_leaves_no_progress(
    texts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(command(tmp_path / "no-such-model", *texts, METHOD_CASES["gptq"], out)) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not out.exists()


def test_without_out_nothing_is_recorded(
    model_folder: Path, texts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = command(model_folder, *texts, METHOD_CASES["gptq"], tmp_path / "unused")[:-2]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    assert list(tmp_path.iterdir()) == []


# --- two processes -------------------------------------------------------------------------------------------


def _two_processes(argv: list[str], **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command_ = [sys.executable, "-m", "binq", *argv, "--nproc", "2"]
    return subprocess.run(command_, capture_output=True, text=True, env=env, timeout=600, check=False)


def test_nproc_run_killed_resumes_to_the_same_bits(
    model_folder: Path, texts: tuple[Path, Path], tmp_path: Path
) -> None:
    """Rank 0 records the blocks (gathered from both ranks) and, resumed, broadcasts the finished ones."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    options = [*METHOD_CASES["gptq"], "--nsamples", "8"]
    completed = _two_processes(command(model_folder, *texts, options, reference))
    assert completed.returncode == 0, completed.stderr[-3000:]
    argv = command(model_folder, *texts, options, resumed)
    killed = _two_processes(argv, **{KILL_AFTER_BLOCK_ENV: "1"})
    assert killed.returncode != 0
    assert progress_state(resumed) == ([0, 1], [])
    # One process would sum the Hessians in another order, so to other bits: refused.
    assert main(argv) == 2
    completed = _two_processes(argv)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert assert_same_run(reference, resumed)["resumed_from_block"] == 2
