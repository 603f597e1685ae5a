"""The end of ``binq demo``: the best 1-bit-class checkpoint writes beside the original, with speeds and memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from binq.cli import main
from binq.commands import DEMO_NEW_TOKENS, _demo_generation
from binq.report import read_report


def test_demo_ends_with_the_best_one_bit_run_writing_beside_the_original(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, text_file: Callable[[int, int], Path], tmp_path: Path
) -> None:
    calib, text = text_file(2000, 1), text_file(300, 2)
    reports = []
    for label, method in (("rtn 1-bit", ["--method", "rtn", "--bits", "1"]), ("gptq 4-bit", ["--method", "gptq"])):
        argv = ["quantize", "--model", str(tiny_llama_folder), "--calib", str(calib), "--nsamples", "2"]
        argv += ["--seqlen", "16", "--eval", str(text), "--no-progress", "--no-layer-table", *method]
        argv += ["--label", label, "--out", str(tmp_path / label.replace(" ", "_"))]
        assert main(argv) == 0
        reports.append(read_report(tmp_path / label.replace(" ", "_") / "report.json"))
    capsys.readouterr()
    _demo_generation(reports, tmp_path, str(tiny_llama_folder))
    printed = capsys.readouterr().out
    assert "rtn 1-bit (the 1-bit-class run of lowest perplexity) beside the original" in printed
    assert "gptq 4-bit" not in printed  # 4 compute bits are not the 1-bit class
    assert "[original (torch fp32)]" in printed and "[rtn 1-bit]" in printed
    assert "decode tok/s" in printed and "peak RSS MiB" in printed
    assert f"{DEMO_NEW_TOKENS} new tokens" in printed
