"""Tests for ``binq bench`` (binq.inference.bench, bench_worker, gemv, llamacpp) on tiny models.

One end-to-end run, shared by the module: a tiny llama written as an F32 GGUF (tests/test_models.py),
quantized by ``binq quantize --out`` (so the checkpoint's report.json names its source), then benched
against torch fp32 and bf16 and, when llama-cpp-python is installed, llama.cpp on the source GGUF, its
Q4_0 and Q1_0 quantizations and binq's own export. Assertions are about what was measured (fields,
token counts, sizes, shapes, the same greedy tokens), never about how fast it went.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binq
from binq.cli import main
from binq.errors import BinqError
from binq.inference import llamacpp
from binq.inference.bench import BenchConfig, parse_against, plan_engines, run_worker, source_model
from binq.inference.gemv import LAYOUT_FORMS, layout_microbenchmark, model_gemv_times
from binq.nn import BinaryLinear
from binq.nn.decoder import HalfLinear
from conftest import MAX_POSITIONS, build_tiny_model, word_text
from test_models import write_tiny_gguf

NEW_TOKENS, PREFILL = 6, 16
# bf16 runs the same worker as original (another dtype): planned in a test below, not run, to save seconds.
AGAINST = "original,llamacpp-source,llamacpp-q4_0,llamacpp-q1_0,llamacpp-binq"
LLAMA_CPP_MISSING = llamacpp.unavailable_reason()


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    kinds = nn.Linear | BinaryLinear | HalfLinear
    return [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, kinds)]


@pytest.fixture(scope="module")
def source_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench-source") / "tiny-llama.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, source_gguf: Path) -> Path:
    """``binq quantize --out`` of the GGUF: 1-bit signs with one scale per row's 64 (Q1_0's form)."""
    folder = tmp_path_factory.mktemp("bench-ckpt") / "ckpt"
    calib = folder.parent / "calib.txt"
    calib.write_text(word_text(400, seed=1), encoding="utf-8")
    argv = ["quantize", "--model", str(source_gguf), "--method", "rtn", "--bits", "1", "--group-size", "128"]
    argv += ["--calib", str(calib), "--nsamples", "2", "--seqlen", "16", "--eval", "none"]
    with pytest.MonkeyPatch.context() as patch:  # the .gguf is unpacked to a cache: this test's own
        patch.setenv("BINQ_CACHE", str(folder.parent / "cache"))
        assert main([*argv, "--no-progress", "--no-layer-table", "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-out")
    argv = ["bench", "--model", str(checkpoint), "--against", AGAINST, "--threads", "1"]
    argv += ["--new-tokens", str(NEW_TOKENS), "--prefill", str(PREFILL), "--gguf-dir", str(out / "gguf")]
    argv += ["--json", str(out / "bench.json")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    records = json.loads((out / "bench.json").read_text())
    return {
        "code": code,
        "records": {r["engine"]: r for r in records},
        "order": [r["engine"] for r in records],
        "stdout": stdout.getvalue(),
    }


def ran(record: dict[str, Any]) -> bool:
    return record["decode_tokens_per_s"] is not None


# --- the end-to-end run ------------------------------------------------------------------------------------


def test_every_engine_has_a_record(bench_run: dict[str, Any]) -> None:
    assert bench_run["code"] == 0
    assert bench_run["order"] == ["binq", *parse_against(AGAINST)]


@pytest.mark.parametrize("engine", ["binq", "original"])
def test_torch_engine_records(bench_run: dict[str, Any], engine: str) -> None:
    record = bench_run["records"][engine]
    assert ran(record), record["note"]
    assert record["threads"] == record["torch_threads"] == 1
    assert (record["prompt_tokens"], record["new_tokens"], record["decode_steps"]) == (PREFILL, NEW_TOKENS, 5)
    assert len(record["generated"]) == NEW_TOKENS
    assert record["decode_tokens_per_s"] == pytest.approx(record["decode_steps"] / record["decode_s"])
    assert record["prefill_tokens_per_s"] == pytest.approx(PREFILL / record["prefill_s"])
    assert record["peak_rss_bytes"] >= record["baseline_rss_bytes"] > 0
    assert record["model_bytes"] > 0


def test_the_source_is_found_from_report_json(bench_run: dict[str, Any], source_gguf: Path) -> None:
    assert Path(bench_run["records"]["original"]["model"]).resolve() == source_gguf.resolve()
    assert bench_run["records"]["original"]["format"] == "fp32"


def test_model_bytes_follow_the_format(bench_run: dict[str, Any], checkpoint: Path) -> None:
    records = bench_run["records"]
    assert records["binq"]["model_bytes"] < records["original"]["model_bytes"]
    shards = sorted(checkpoint.glob("model-*-of-*.safetensors"))  # the .gguf source streamed: one shard per block
    assert len(shards) == 3 and not (checkpoint / "model.safetensors").exists()
    assert records["binq"]["file_bytes"] == sum(file.stat().st_size for file in shards)


def test_gemv_covers_every_linear_shape(bench_run: dict[str, Any], checkpoint: Path) -> None:
    expected = linear_shapes(binq.load(checkpoint))
    for engine in ("binq", "original"):
        gemv = bench_run["records"][engine]["gemv"]
        assert sorted({tuple(g["shape"]) for g in gemv}) == sorted(set(expected))
        assert sum(g["count"] for g in gemv) == len(expected)
        assert all(g["median_us"] > 0 for g in gemv)
    binq_gemv = bench_run["records"]["binq"]["gemv"]
    # the LM head stays unquantized: fp16 when its weights are exactly fp16 (compact_embeddings), else dense
    assert {g["layout"] for g in binq_gemv} in ({"binary", "dense"}, {"binary", "fp16"})
    assert all(g["kernel"] == "torch" for g in binq_gemv if g["layout"] == "dense")


@pytest.mark.skipif(LLAMA_CPP_MISSING is None, reason="llama-cpp-python is installed")
def test_llama_cpp_engines_are_skipped_with_a_note(bench_run: dict[str, Any]) -> None:
    for name in parse_against(AGAINST):
        if name.startswith("llamacpp-"):
            record = bench_run["records"][name]
            assert not ran(record) and record["note"].startswith("skipped: llama-cpp-python")


@pytest.mark.skipif(LLAMA_CPP_MISSING is not None, reason=str(LLAMA_CPP_MISSING))
def test_llama_cpp_engine_records(bench_run: dict[str, Any], source_gguf: Path) -> None:
    records = bench_run["records"]
    for name in ("llamacpp-source", "llamacpp-q4_0", "llamacpp-binq"):
        record = records[name]
        assert ran(record), record["note"]
        assert (record["prompt_tokens"], record["new_tokens"], record["decode_steps"]) == (PREFILL, NEW_TOKENS, 5)
        assert record["model_bytes"] == Path(record["gguf"]).stat().st_size
        assert record["peak_rss_bytes"] > 0 and record["gemv"] == []
    assert records["llamacpp-source"]["gguf"] == str(source_gguf)
    assert records["llamacpp-q4_0"]["model_bytes"] < records["llamacpp-source"]["model_bytes"]
    # 64-wide rows: llama.cpp has no fallback for Q1_0's 128-blocks, and says so.
    assert records["llamacpp-q1_0"]["note"].startswith("skipped: llama.cpp cannot quantize tiny-llama.gguf to Q1_0")
    # The same F32 weights and token ids: llama.cpp continues exactly as torch does.
    assert records["llamacpp-source"]["generated"] == records["original"]["generated"]


def test_tables_are_printed(bench_run: dict[str, Any]) -> None:
    out = bench_run["stdout"]
    assert "binq bench" in out and "GEMV (one token)" in out and "wrote " in out
    for engine in bench_run["order"]:
        assert engine in out


# --- errors ------------------------------------------------------------------------------------------------


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if "error:" in line]) == 1, err
    assert lines[-1].startswith(("binq: error: ", "binq bench: error: ")), err
    assert re.search(pattern, lines[-1]), lines[-1]


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--prefill", str(MAX_POSITIONS + 1)], "longer than the model's context"),
        (["--prefill", "8", "--new-tokens", str(MAX_POSITIONS)], "does not fit the model's context"),
        (["--new-tokens", "1"], "at least 2"),
        (["--threads", "0"], "--threads"),
        (["--against", "original,vllm"], "unknown engine 'vllm'"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_options(capsys: pytest.CaptureFixture[str], checkpoint: Path, extra: list[str], pattern: str) -> None:
    code = main(["bench", "--model", str(checkpoint), "--against", "none", *extra])
    assert_one_line_error(code, capsys.readouterr().err, pattern)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_cuda(capsys: pytest.CaptureFixture[str], checkpoint: Path) -> None:
    code = main(["bench", "--model", str(checkpoint), "--device", "cuda"])
    assert_one_line_error(code, capsys.readouterr().err, "CUDA is not available")


def test_missing_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["bench", "--model", str(tmp_path / "nothing")])
    assert_one_line_error(code, capsys.readouterr().err, "no such file or directory")


# --- planning ----------------------------------------------------------------------------------------------


def test_parse_against() -> None:
    assert parse_against("original,bf16") == ("original", "bf16")
    assert parse_against("fp32, llamacpp-q4_0,original") == ("original", "llamacpp-q4_0")
    assert parse_against("llamacpp") == tuple(f"llamacpp-{v}" for v in llamacpp.DEFAULT_VARIANTS)
    assert parse_against("none") == ()
    with pytest.raises(BinqError, match="unknown engine 'llamacpp-q3'"):
        parse_against("llamacpp-q3")


def _copy_config(checkpoint: Path, folder: Path, report: dict | None, source: str | None = None) -> Path:
    folder.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    if source is not None:
        config["quantization_config"]["source_model"] = source
    (folder / "config.json").write_text(json.dumps(config))
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_source_model(checkpoint: Path, tmp_path: Path, tiny_llama_folder: Path) -> None:
    def source(name: str, report: dict | None, recorded: str | None = None) -> str | None:
        return source_model(_copy_config(checkpoint, tmp_path / name, report, recorded))

    embedded = {"model": {"spec": "smollm2-135m", "path": "/somewhere/smollm2-135m"}}
    assert source("embedded", embedded) == "smollm2-135m"  # the name: its GGUF is found from it
    moved = {"model": {"spec": "./old/place", "path": str(tiny_llama_folder)}}
    assert source("moved", moved) == str(tiny_llama_folder)
    assert source("hub", {"model": {"spec": "org/model", "path": "org/model"}}) == "org/model"
    assert source("gone", {"model": {"spec": "/gone/folder", "path": "/gone/folder"}}) is None
    assert source("none", None) is None
    assert source("recorded", None, recorded="smollm2-135m") == "smollm2-135m"


def test_without_a_source_the_torch_engines_say_why(checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_config(checkpoint, tmp_path / "ckpt", None)
    engines = plan_engines(BenchConfig(model=str(folder), against=("original,bf16",)), [5] * 16)
    assert [e.name for e in engines] == ["binq", "original", "bf16"]
    assert engines[0].job["task"] == "binq" and engines[0].note is None
    assert all("--original" in e.note for e in engines[1:])
    engines = plan_engines(BenchConfig(model=str(folder), against=("bf16",), original="smollm2-135m"), [5] * 16)
    assert engines[1].job["model"] == "smollm2-135m" and engines[1].job["dtype"] == "bfloat16"
    assert engines[1].job["decode_prompt_ids"] == [5] * 16 and engines[1].job["task"] == "torch"


def test_without_llama_cpp_its_engines_are_notes(
    checkpoint: Path, source_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llamacpp, "unavailable_reason", lambda: "llama-cpp-python is not installed (pip install ...)")
    config = BenchConfig(model=str(checkpoint), against=("bf16,llamacpp",), original=str(source_gguf))
    engines = plan_engines(config, [5] * 16)
    assert [e.name for e in engines] == ["binq", "bf16", *(f"llamacpp-{v}" for v in llamacpp.DEFAULT_VARIANTS)]
    assert all(e.note is None for e in engines[:2])
    assert all(e.note == "skipped: llama-cpp-python is not installed (pip install ...)" for e in engines[2:])


def test_a_plain_model_is_its_own_original(tiny_llama_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engines = plan_engines(BenchConfig(model=str(tiny_llama_folder), against=("original,llamacpp-binq",)), [5] * 16)
    assert [e.name for e in engines] == ["original", "llamacpp-binq"]
    assert engines[0].job["model"] == str(tiny_llama_folder) and engines[0].job["dtype"] == "float32"
    assert engines[1].note.startswith("skipped: ")  # no checkpoint to export (or no llama.cpp at all)
    code = main(["bench", "--model", str(tiny_llama_folder), "--against", "none"])
    assert_one_line_error(code, capsys.readouterr().err, "nothing to measure")


# --- GEMV ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", list(LAYOUT_FORMS))
def test_layout_forms_compute_their_dequantized_weight(form: str) -> None:
    weight = LAYOUT_FORMS[form](16, 384, torch.Generator().manual_seed(0))
    module = BinaryLinear.from_weight(weight)
    x = torch.randn(1, 384, generator=torch.Generator().manual_seed(1))
    reference = F.linear(x, weight.dequantize())
    torch.testing.assert_close(module(x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_layout_microbenchmark_records() -> None:
    records = layout_microbenchmark(torch.device("cpu"), shapes=((16, 256),))
    assert [r["form"] for r in records] == ["torch fp32", "torch bf16", *LAYOUT_FORMS]
    for record in records[2:]:
        assert record["shape"] == [16, 256] and record["storage_bits"] > 0 and record["median_us"] > 0
        assert record["speedup_vs_fp32"] == pytest.approx(records[0]["median_us"] / record["median_us"])
        assert record["speedup_vs_bf16"] == pytest.approx(records[1]["median_us"] / record["median_us"])


def test_gemv_worker() -> None:
    result = run_worker({"task": "gemv", "device": "cpu", "threads": 1, "shapes": [[8, 128]]}, threads=1)
    assert len(result["results"]) == 2 + len(LAYOUT_FORMS)
    assert result["peak_rss_bytes"] > 0


def test_model_gemv_times() -> None:
    model = build_tiny_model("opt")
    records = model_gemv_times(model, torch.float32, torch.device("cpu"))
    shapes = linear_shapes(model)
    assert sum(r["count"] for r in records) == len(shapes)
    assert sorted(tuple(r["shape"]) for r in records) == sorted(set(shapes))
