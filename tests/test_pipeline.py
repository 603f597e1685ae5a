"""``binq.quantize`` and ``binq.evaluate``: the library calls the command line is made of.

Tiny random llama folders and local word texts only. The command line and the API must give the same
run: the report's recorded command, replayed through the CLI, writes a bit-identical checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import binq
from binq.cli import main
from binq.errors import BinqError
from binq.methods.gptq import GPTQConfig
from binq.pipeline import CalibrationConfig, EvaluationConfig, QuantizationResult

CALIBRATION = CalibrationConfig(nsamples=4, seqlen=24)


@pytest.fixture(scope="module")
def texts(text_file: Callable[[int, int], Path]) -> tuple[Path, Path]:
    return text_file(2000, 1), text_file(300, 2)


def run(folder: Path, calib: Path, eval_text: Path, method: str, config, **kwargs) -> QuantizationResult:
    calibration = CalibrationConfig(source=str(calib), nsamples=4, seqlen=24)
    evaluation = EvaluationConfig(sets=(str(eval_text),), seqlen=24, windows=3)
    return binq.quantize(
        str(folder), method, config, calibration=calibration, evaluation=evaluation, progress=False, **kwargs
    )


def test_quantize_returns_model_records_bits_and_evaluation(tiny_llama_folder: Path, texts, tmp_path: Path) -> None:
    result = run(tiny_llama_folder, *texts, "gptq", {"bits": 3, "group_size": 32}, out=tmp_path / "q")
    assert isinstance(result.config, GPTQConfig) and result.config.bits == 3
    assert len(result.records) == len(result.weights) == 2 * 7  # two blocks of seven linears
    assert set(result.weights) == {f"model.layers.{r.block}.{r.name}" for r in result.records}
    evaluation = result.evaluations[str(texts[1])]
    assert evaluation["ppl"] > 0 and evaluation["kl"] > 0 and evaluation["protocol"]["windows"] == 3
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["label"] == "gptq 3-bit g32"
    assert report["bits"] == json.loads(json.dumps(result.report["bits"]))
    assert report["calibration"]["tokens"] == 4 * 24
    # The model in memory holds the dequantized weights the checkpoint packs.
    for name, weight in result.weights.items():
        linear = result.model.model.get_submodule(name)
        assert torch.equal(linear.weight.data, weight.dequantize())


def test_the_recorded_command_replays_to_the_same_checkpoint(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, texts, tmp_path: Path
) -> None:
    config = {"bits": 2, "group_size": 32, "act_order": True, "sym": True}
    api = run(tiny_llama_folder, *texts, "gptq", config, out=tmp_path / "api")
    command = api.report["command"]
    assert command[:2] == ["binq", "quantize"] and "--act-order" in command and "--sym" in command
    argv = [*command[1:], "--out", str(tmp_path / "cli"), "--no-progress", "--no-layer-table"]
    assert main(argv) == 0
    capsys.readouterr()
    assert (
        load_file(str(tmp_path / "api" / "model.safetensors")).keys()
        == load_file(str(tmp_path / "cli" / "model.safetensors")).keys()
    )
    for key, tensor in load_file(str(tmp_path / "api" / "model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(tmp_path / "cli" / "model.safetensors"))[key]), key
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert cli["eval"] == json.loads(json.dumps(api.report["eval"]))


def test_calibration_free_method_skips_calibration(tiny_llama_folder: Path, texts, tmp_path: Path) -> None:
    missing = tmp_path / "never-read.txt"  # RTN reads no calibration text at all
    result = run(tiny_llama_folder, missing, texts[1], "rtn", {"bits": 1}, workers=1)
    assert result.report["calibration"]["tokens"] == 0
    assert result.report["engine"] == {"path": "independent", "workers": 1}
    # Its per-layer error is the weight-space one: ||W - Q||^2 / ||W||^2.
    record = result.records[0]
    original = binq.pipeline.load_model(str(tiny_llama_folder)).model.get_submodule(
        f"model.layers.{record.block}.{record.name}"
    )
    weight = original.weight.detach().double()
    dequantized = result.weights[f"model.layers.{record.block}.{record.name}"].dequantize().double()
    expected = float((weight - dequantized).square().sum() / weight.square().sum())
    assert record.relative_error == pytest.approx(expected, rel=1e-9)


def test_config_of_another_method_is_refused(tiny_llama_folder: Path, texts) -> None:
    from binq.methods.rtn import RTNConfig

    with pytest.raises(BinqError, match="method 'gptq' takes a GPTQConfig, not a RTNConfig"):
        run(tiny_llama_folder, *texts, "gptq", RTNConfig())
    with pytest.raises(BinqError, match="has no option"):
        run(tiny_llama_folder, *texts, "gptq", {"bitz": 2})


def test_no_evaluation_sets(tiny_llama_folder: Path, texts) -> None:
    result = binq.quantize(
        str(tiny_llama_folder), "rtn", calibration=CALIBRATION, evaluation=EvaluationConfig(sets=()),
        workers=1, progress=False,
    )  # fmt: skip
    assert result.evaluations == {} and result.report["ppl"] == {}


def test_evaluate_writes_a_report(tiny_llama_folder: Path, texts, tmp_path: Path) -> None:
    evaluation = EvaluationConfig(sets=(str(texts[1]),), seqlen=24, windows=2)
    result = binq.evaluate(str(tiny_llama_folder), evaluation, out=tmp_path / "e", progress=False)
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["kind"] == "eval" and report["schema"] == "binq.report/1"
    assert report["eval"][str(texts[1])]["ppl"] == result.evaluations[str(texts[1])]["ppl"]
    assert report["kl"] == {str(texts[1]): None}  # no reference: the model is the original


def test_evaluate_a_checkpoint_gives_the_quantized_perplexity(tiny_llama_folder: Path, texts, tmp_path: Path) -> None:
    quantized = run(tiny_llama_folder, *texts, "arb-group", {"group_size": 32}, out=tmp_path / "q")
    evaluation = EvaluationConfig(sets=(str(texts[1]),), seqlen=24, windows=3)
    loaded = binq.evaluate(str(tmp_path / "q"), evaluation, progress=False)
    assert loaded.report["model"]["checkpoint"] is True
    expected = quantized.evaluations[str(texts[1])]["ppl"]
    assert loaded.evaluations[str(texts[1])]["ppl"] == pytest.approx(expected, rel=1e-5)


def test_eval_out_from_the_command_line(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, texts, tmp_path: Path
) -> None:
    argv = ["eval", "--model", str(tiny_llama_folder), "--eval", str(texts[1]), "--seqlen", "24"]
    argv += ["--eval-windows", "2", "--no-progress", "--out", str(tmp_path / "e"), "--label", "tiny fp"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["label"] == "tiny fp" and report["command"] == ["binq", *argv]
    assert f"{report['eval'][str(texts[1])]['ppl']:.3f}" in out


def test_bad_protocol_values_are_one_line_errors() -> None:
    with pytest.raises(BinqError, match="--nsamples must be at least 1"):
        CalibrationConfig(nsamples=0)
    with pytest.raises(BinqError, match="--eval-windows must be at least 1"):
        EvaluationConfig(windows=0)
