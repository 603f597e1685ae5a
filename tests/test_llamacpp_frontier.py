"""benchmarks/llamacpp_frontier.py's pieces that need no llama.cpp: bits from GGUF tensor bytes, the anchors
file, the generated tables and the command line's refusals; one end-to-end check where llama-cpp-python is.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import gguf
import numpy as np
import pytest

from binq.errors import BinqError
from binq.export.gguf import export_gguf
from binq.inference.llamacpp import (
    IMATRIX_TYPES,
    QUANT_TYPES,
    gguf_storage,
    is_block_linear,
    quantize_gguf,
    unavailable_reason,
)
from binq.plot import load_anchors
from binq.tables import Reports, llamacpp_section, versus_rows, versus_section
from test_gguf_export import saved_unquantized

ROOT = Path(__file__).resolve().parent.parent
Q8 = gguf.GGMLQuantizationType.Q8_0


def frontier_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llamacpp_frontier", ROOT / "benchmarks" / "llamacpp_frontier.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]]) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, raw) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bits_are_counted_from_the_block_linears_tensor_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q8)  # 4 rows x 2 blocks of 34 B
    path = write_gguf(
        tmp_path / "tiny.gguf",
        {
            "token_embd.weight": (rng.standard_normal((8, 32)).astype(np.float16), None),
            "blk.0.attn_norm.weight": (np.ones(32, dtype=np.float32), None),
            "blk.0.attn_q.weight": (q, Q8),
            "blk.0.ffn_down.weight": (rng.standard_normal((4, 32)).astype(np.float16), None),
        },
    )
    storage = gguf_storage(path)
    linear_bytes = 4 * 2 * 34 + 4 * 32 * 2
    assert storage["linear_bytes"] == linear_bytes
    assert storage["linear_weights"] == 4 * 64 + 4 * 32
    assert storage["bits_linear"] == pytest.approx(8 * linear_bytes / 384)  # 11.0: Q8_0's 8.5 beside F16's 16
    assert storage["linear_types"] == {"F16": 1, "Q8_0": 1}
    assert storage["other_types"] == {"F16": 1, "F32": 1}  # embeddings and norms are not linears
    all_bytes = linear_bytes + 8 * 32 * 2 + 32 * 4
    assert storage["tensor_bytes"] == all_bytes and storage["weights"] == 384 + 256 + 32
    assert storage["bits_all_tensors"] == pytest.approx(8 * all_bytes / 672)
    assert storage["file_bytes"] == path.stat().st_size
    assert storage["bits_file"] > storage["bits_all_tensors"]  # the header and alignment count in the file


def test_a_gguf_without_block_linears_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "none.gguf", {"token_embd.weight": (np.zeros((8, 32), dtype=np.float16), None)})
    with pytest.raises(BinqError, match="no block linear"):
        gguf_storage(path)
    assert is_block_linear("blk.3.ffn_up.weight", (64, 32))
    assert not is_block_linear("blk.3.ffn_norm.weight", (32,))
    assert not is_block_linear("output.weight", (8, 32))


def type_report(name: str, bits: float, ppl: dict[str, float], **extra: Any) -> dict[str, Any]:
    storage = {
        "bits_linear": bits,
        "bits_file": bits + 1,
        "file_bytes": 2**20,
        "linear_types": {"Q4_0": 180, name: 30},
    }
    report = {"kind": "llamacpp-frontier", "type": name, "variant": name.lower(), "made": True, "storage": storage}
    return report | {"ppl": ppl, "imatrix": None} | extra


def test_anchors_round_trip_through_binq_plot(tmp_path: Path) -> None:
    script = frontier_script()
    report = type_report("IQ1_S", 3.79, {"brit1911": 60.5, "persuasion": 70.25})
    path = tmp_path / "anchors.json"
    path.write_text(json.dumps([script.anchor_of(report)]))
    (anchor,) = load_anchors(path)
    assert anchor.label == "IQ1_S" and anchor.family == "llama.cpp" and anchor.anchor
    assert anchor.storage_bits == 3.79
    assert anchor.ppl == {"brit1911": 60.5, "persuasion": 70.25}


def test_the_script_refuses_bad_input_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    script = frontier_script()
    assert script.main(["--types", "q2_k,q9_z"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "q9_z" in err
    assert script.main(["--windows", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert set(script.DEFAULT_TYPES) <= set(QUANT_TYPES)
    assert set(IMATRIX_TYPES) <= set(script.DEFAULT_TYPES)


def test_an_iq_type_without_importance_matrix_is_refused_before_llama_cpp(tmp_path: Path) -> None:
    with pytest.raises(BinqError, match="importance matrix"):
        quantize_gguf(tmp_path / "source.gguf", tmp_path / "out.gguf", "iq2_xxs", 1)


def test_versus_rows_take_each_sides_best_within_each_budget() -> None:
    sets = ("a", "b")
    binq = [("tiny", 1.0, {"a": 500.0, "b": 400.0}), ("mid", 2.2, {"a": 90.0, "b": 80.0})]
    binq += [("worse", 3.0, {"a": 95.0, "b": 85.0}), ("big", 4.2, {"a": 40.0, "b": 45.0})]
    llama = [("L1", 3.8, {"a": 50.0, "b": 60.0}), ("L2", 4.5, {"a": 35.0, "b": 50.0})]
    rows = versus_rows(binq, llama, sets, 1.1, 4.5)
    # 1.0 is under the range; at 3.0 neither side's best changes ("worse" beats nothing cheaper).
    assert [budget for budget, *_ in rows] == [2.2, 3.8, 4.2, 4.5]
    by_budget = {budget: (ours, theirs, verdict) for budget, ours, theirs, verdict in rows}
    assert by_budget[2.2] == (binq[1], None, "binq (no llama.cpp type)")
    assert by_budget[3.8] == (binq[1], llama[0], "llama.cpp")  # 90 > 50 and 80 > 60
    assert by_budget[4.2] == (binq[3], llama[0], "binq")  # 40 < 50 and 45 < 60
    assert by_budget[4.5][1] == llama[1]  # mean log-PPL: 35 x 50 beats 50 x 60
    assert by_budget[4.5][2] == "split"  # 40 > 35 but 45 < 50
    assert math.isclose(rows[0][0], 2.2)


def quick_report(label: str, bits: float, ppl: dict[str, float]) -> dict[str, Any]:
    return {"label": label, "storage_bits": {"linear": bits}, "eval": {s: {"ppl": v} for s, v in ppl.items()}}


def test_llamacpp_sections_from_synthetic_reports() -> None:
    ppl = {"brit1911": 29.3, "persuasion": 36.6}
    source = type_report("F16", 16.0, ppl, variant="f16", imatrix=None)
    source["storage"]["linear_types"] = {"F16": 210}
    source |= {
        "ppl_binq_original": {"brit1911": 29.23, "persuasion": 36.62},
        "ppl_relative_difference": {"brit1911": 2e-3, "persuasion": -5e-4},
        "max_abs_logit_difference_window0": {"brit1911": 0.09, "persuasion": 0.1},
        "protocol": {s: {"windows": 16, "windows_available": 171, "seqlen": 512} for s in ppl},
        "command": ["python", "benchmarks/llamacpp_frontier.py"],
        "created": "2026-11-30T10:00:00+00:00",
        "versions": {"llama_cpp_python": "0.3.36"},
        "machine": {"platform": "Linux", "llama_cpp_threads": 1},
    }
    q2 = type_report("Q2_K", 4.23, {"brit1911": 45.0, "persuasion": 50.0})
    refused = {"kind": "llamacpp-frontier", "type": "Q1_0", "variant": "q1_0", "made": False, "reason": "no fallback"}
    reports = Reports(llamacpp=[q2, refused, source])
    reports.quick = {"gptq 4-bit g128": quick_report("gptq 4-bit g128", 4.17, {"brit1911": 39.9, "persuasion": 46.4})}
    table = llamacpp_section(reports)
    lines = table.splitlines()
    assert lines[2].startswith("| F16 (source) | 210 F16 | 16.000 |")  # the source first, then by bits
    assert lines[3].startswith("| Q2_K | 180 Q4_0, 30 Q2_K | 4.230 | 5.230 | 1.0 | 45.00 | 50.00 | no |")
    assert "29.23 on brit1911" in table and "+2.0e-03 (relative) on brit1911" in table
    assert "- Q1_0: no fallback" in table
    assert "`python benchmarks/llamacpp_frontier.py`" in table

    versus = versus_section(reports)
    assert "| 4.174 |" not in versus  # budgets are the points' own bits, printed to 3 places
    assert "| 4.170 | gptq 4-bit g128 (4.170) | 39.90 | 46.40 | - | - | - | binq (no llama.cpp type) |" in versus
    assert "| 4.230 | gptq 4-bit g128 (4.170) | 39.90 | 46.40 | Q2_K (4.230) | 45.00 | 50.00 | binq |" in versus
    assert "Q2_K at 4.230" in versus


def test_no_llamacpp_report_gives_a_note() -> None:
    assert "No llama.cpp report" in llamacpp_section(Reports())
    assert "No llama.cpp report" in versus_section(Reports())


def test_committed_anchors_match_the_committed_reports() -> None:
    """The anchors file the README's figure was drawn from is the reports' own numbers."""
    folder = ROOT / "docs" / "reports" / "llamacpp"
    anchors = {a.label: a for a in load_anchors(folder / "anchors.json")}
    for path in folder.glob("*.json"):
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not report["made"] or "ppl_binq_original" in report:
            assert not isinstance(report, dict) or report["type"] not in anchors
            continue
        anchor = anchors.pop(report["type"])
        assert anchor.storage_bits == report["storage"]["bits_linear"] and anchor.ppl == report["ppl"]
    assert not anchors


@pytest.mark.skipif(unavailable_reason() is not None, reason="needs llama-cpp-python (pip install llama-cpp-python)")
def test_llama_cpp_makes_an_iq_type_with_the_importance_matrix_given(tmp_path: Path) -> None:
    """A tiny 256-wide llama exported unquantized, then IQ2_XXS by llama.cpp with an importance matrix."""
    saved_unquantized(tmp_path / "plain", hidden_size=256, intermediate_size=512, head_dim=64)
    source = export_gguf(tmp_path / "plain", tmp_path / "source.gguf")
    widths = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(source).tensors if is_block_linear(t.name, t.shape)}
    imatrix = {name: np.ones(width, dtype=np.float32) for name, width in widths.items()}
    quantize_gguf(source, tmp_path / "iq2_xxs.gguf", "iq2_xxs", 1, imatrix)
    storage = gguf_storage(tmp_path / "iq2_xxs.gguf")
    assert storage["linear_tensors"] == 14 and "IQ2_XXS" in storage["linear_types"]
    assert storage["bits_linear"] == pytest.approx(8 * storage["linear_bytes"] / storage["linear_weights"])
    assert 2 < storage["bits_linear"] < 16
    with pytest.raises(BinqError, match="imatrix size"):  # llama.cpp checks each entry against its tensor
        quantize_gguf(source, tmp_path / "bad.gguf", "iq2_xxs", 1, {name: v[:-1] for name, v in imatrix.items()})
