"""Tests for ``binq plot``: the frontier, gathering points from reports and anchors, the image, bad input.

Reports are written in the schema ``binq quantize`` writes (docs/REPORT.md), less the per-layer records,
which the plot does not read; the committed reports under docs/reports/quick are read as well.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from binq.cli import main
from binq.errors import BinqError
from binq.plot import (
    REPORT_SCHEMA,
    build_panel,
    choose_eval_sets,
    load_anchors,
    load_points,
    pareto_frontier,
    report_files,
)

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_PPL = {"brit1911": 29.23, "persuasion": 36.62}


def make_report(
    label: str,
    method: str,
    storage_bits: float,
    ppl: dict[str, float],
    act_bits: int | None = None,
    original: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A report as ``binq quantize --out`` writes it (without ``layers``)."""
    original = ORIGINAL_PPL if original is None else original
    parameters = 1000

    def block(bits: float) -> dict[str, float]:
        return {"parameters": parameters, "compute_bits": 1.0, "storage_bits": bits, "storage_bytes": bits * 125}

    evaluations = {
        name: {
            "protocol": {"text": name, "seqlen": 512, "windows": 16, "windows_available": 171, "tokens": 88039},
            "ppl": value,
            "ppl_original": original[name],
            "kl": 1.0,
        }
        for name, value in ppl.items()
    }
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "label": label,
        "created": "2026-11-30T01:00:00+00:00",
        "command": ["binq", "quantize", "--model", "smollm2-135m", "--method", method, "--quick"],
        "model": {"spec": "smollm2-135m", "name": "smollm2-135m", "architecture": "llama", "dtype": "float32"},
        "method": {"name": method, "config": {}},
        "engine": {"device": "cpu", "hessian_dtype": "float32", "true_sequential": False},
        "calibration": {"source": "austen", "nsamples": 32, "seqlen": 512, "seed": 0, "tokens": 16384},
        "seed": 0,
        "bits": {"linear": block(storage_bits), "model": block(storage_bits + 3), "other_parameters_bits": 16},
        "bits_original": {"linear": block(16.0), "model": block(16.0), "other_parameters_bits": 16},
        "eval": evaluations,
        "time_s": {"quantize": 1.0, "eval": 1.0, "total": 2.0},
        "peak_memory_bytes": 2**30,
        "peak_memory_kind": "cpu_max_rss",
        "versions": {"binq": "0.1.0"},
        "machine": {"platform": "Linux-test", "processor": "x86_64", "cpu_threads": 1},
        "compute_bits": 1.0,
        "storage_bits": {"linear": storage_bits, "model": storage_bits + 3},
        "ppl": {k: {"quantized": v["ppl"], "original": v["ppl_original"]} for k, v in evaluations.items()},
        "kl": {k: v["kl"] for k, v in evaluations.items()},
    }
    if act_bits is not None:
        report["activations"] = {"config": {"bits": act_bits, "sym": False, "clip": "search"}, "storage_bits": 4.06}
    return report


def eval_report(label: str) -> dict[str, Any]:
    """A ``binq eval --out`` report: no bits, no method."""
    quantized = make_report(label, "none", 16.0, {"brit1911": 30.0})
    keys = ("schema", "label", "created", "command", "model", "eval", "time_s", "peak_memory_bytes", "ppl", "kl")
    return {"kind": "eval", **{k: quantized[k] for k in keys}}


RUNS = {
    "rtn_1-bit": make_report("rtn 1-bit", "rtn", 1.023, {"brit1911": 5.27e5, "persuasion": 4.76e5}),
    "arb-group_g128": make_report("arb-group g128", "arb-group", 1.135, {"brit1911": 2.47e4, "persuasion": 2.09e4}),
    "gptq_2-bit_g128": make_report("gptq 2-bit g128", "gptq", 2.160, {"brit1911": 4.79e4, "persuasion": 3.85e4}),
    "w11": make_report("w11", "w11", 2.271, {"brit1911": 186.07, "persuasion": 128.93}),
    "w11_a4": make_report("w11 a4", "w11", 2.271, {"brit1911": 150.0, "persuasion": 120.0}, act_bits=4),
    "gptq_4-bit_g128": make_report("gptq 4-bit g128", "gptq", 4.174, {"brit1911": 39.95, "persuasion": 46.36}),
}


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A ``binq demo --out``-like folder: one run folder with its report.json per run."""
    for slug, report in RUNS.items():
        write_json(tmp_path / "runs" / slug / "report.json", report)
    return tmp_path / "runs"


# ---------------------------------------------------------------------------------------------------------
# The frontier


def test_frontier_excludes_dominated_points() -> None:
    points = [(1.0, 100.0), (2.0, 150.0), (3.0, 50.0), (4.0, 60.0), (5.0, 10.0)]
    assert pareto_frontier(points) == [0, 2, 4]


def test_frontier_of_unsorted_input_is_sorted_by_bits() -> None:
    points = [(5.0, 10.0), (3.0, 50.0), (4.0, 60.0), (1.0, 100.0), (2.0, 150.0)]
    assert pareto_frontier(points) == [3, 1, 0]
    ppl = [points[i][1] for i in pareto_frontier(points)]
    assert ppl == sorted(ppl, reverse=True) and len(set(ppl)) == len(ppl)  # PPL falls strictly along it


def test_frontier_ties() -> None:
    # Same bits: only the lower PPL. Same PPL at more bits: dominated. Equal in both: the first one.
    assert pareto_frontier([(2.0, 80.0), (2.0, 50.0)]) == [1]
    assert pareto_frontier([(3.0, 50.0), (2.0, 50.0)]) == [1]
    assert pareto_frontier([(2.0, 50.0), (1.0, 90.0), (2.0, 50.0)]) == [1, 0]


def test_frontier_of_one_point_and_of_none() -> None:
    assert pareto_frontier([(1.5, 1e9)]) == [0]
    assert pareto_frontier([]) == []


def test_frontier_is_the_lowest_ppl_within_each_budget() -> None:
    """Against brute force: at every budget, the best reachable PPL is the last frontier point's within it."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.choice([1.0, 1.5, 2.0, 3.0, 4.0]), rng.choice([10.0, 20.0, 40.0, 80.0])) for _ in range(7)]
        on = [points[i] for i in pareto_frontier(points)]
        for budget in {b for b, _ in points}:
            best = min(p for b, p in points if b <= budget)
            assert min(p for b, p in on if b <= budget) == best
        for i, (bits, ppl) in enumerate(points):
            dominated = any(
                (b <= bits and p <= ppl and (b, p) != (bits, ppl)) for j, (b, p) in enumerate(points) if j != i
            )
            assert dominated or (bits, ppl) in on


# ---------------------------------------------------------------------------------------------------------
# Gathering


def test_schema_is_the_reports_schema() -> None:
    from binq.report import REPORT_SCHEMA as written

    assert written == REPORT_SCHEMA


def test_points_from_a_file_a_run_folder_and_a_folder_of_runs(runs: Path) -> None:
    one = load_points([str(runs / "w11" / "report.json")])
    assert len(one) == 1 and one[0].label == "w11" and one[0].family == "w11" and one[0].storage_bits == 2.271
    assert one[0].ppl == {"brit1911": 186.07, "persuasion": 128.93} and one[0].ppl_original == ORIGINAL_PPL
    assert load_points([str(runs / "w11")]) == one
    every = load_points([str(runs)])
    assert [p.label for p in every] == sorted(r["label"] for r in RUNS.values())  # by folder name
    families = {p.label: p.family for p in every}
    assert families["gptq 2-bit g128"] == "gptq" and families["arb-group g128"] == "arb-group"
    assert families["w11 a4"] == "w11 A4" and families["w11"] == "w11"
    assert {p.label for p in every if not p.on_frontier_axis} == {"w11 a4"}
    assert len(load_points([str(runs), str(runs / "w11" / "report.json")])) == len(RUNS)  # counted once


def test_folder_of_report_files_skips_eval_reports(tmp_path: Path) -> None:
    write_json(tmp_path / "quick" / "w11.json", RUNS["w11"])
    write_json(tmp_path / "quick" / "w16_a4.json", eval_report("w16 a4"))
    assert [p.label for p in load_points([str(tmp_path / "quick")])] == ["w11"]


def test_committed_reports() -> None:
    """The real reports of docs/reports/quick: every quantize report is a point with its stored bits."""
    folder = ROOT / "docs" / "reports" / "quick"
    reports = [json.loads(path.read_text()) for path in report_files(str(folder))]
    quantized = {r["label"]: r for r in reports if r.get("kind") != "eval"}
    points = load_points([str(folder)])
    assert {p.label for p in points} == set(quantized)
    for point in points:
        report = quantized[point.label]
        assert point.storage_bits == report["bits"]["linear"]["storage_bits"]
        assert point.family.split(" ")[0] == report["method"]["name"]
        assert point.ppl == {name: e["ppl"] for name, e in report["eval"].items()}
    panel = build_panel(points, [], "brit1911")
    assert panel.reference_ppl == pytest.approx(29.228, abs=1e-3) and panel.reference_bits == 16
    assert all(p.on_frontier_axis for p in panel.frontier)


def test_eval_sets_default_all_and_chosen(tmp_path: Path) -> None:
    only_persuasion = make_report("msb g8", "msb", 4.0, {"persuasion": 50.0, "brit1911": 60.0})
    points = [
        *load_points([str(write_json(tmp_path / "a.json", RUNS["w11"]))]),
        *load_points([str(write_json(tmp_path / "b.json", only_persuasion))]),
    ]
    assert choose_eval_sets(points, None) == ["brit1911"]  # the first report's order
    assert choose_eval_sets(points, "all") == ["brit1911", "persuasion"]
    assert choose_eval_sets(points, "persuasion, brit1911") == ["persuasion", "brit1911"]
    with pytest.raises(BinqError, match=r"'wikitext2' is not in every report"):
        choose_eval_sets(points, "wikitext2")


def test_panel_series_frontier_reference_and_anchors(runs: Path, tmp_path: Path) -> None:
    anchors_file = write_json(
        tmp_path / "anchors.json",
        [
            {"label": "Q4_0", "bits": 4.5, "ppl": {"brit1911": 35.0}},
            {"label": "TQ1_0", "bits": 1.69, "ppl": {"brit1911": 900.0, "persuasion": 800.0}, "series": "ternary"},
            {"label": "Q2_K", "bits": 2.6, "ppl": {"persuasion": 300.0}},
            {"label": "GPTQ paper", "bits": 3.2, "ppl": {"brit1911": 80.0}, "series": "gptq"},
        ],
    )
    points, anchors = load_points([str(runs)]), load_anchors(anchors_file)
    assert [a.family for a in anchors] == ["llama.cpp", "ternary", "llama.cpp", "gptq"]
    assert all(a.anchor for a in anchors)
    panel = build_panel(points, anchors, "brit1911")
    # Anchors after the reports' families; one named like a family stays its own series.
    assert list(panel.series)[-3:] == ["llama.cpp", "ternary", "gptq (anchor)"]
    assert [p.label for p in panel.series["llama.cpp"]] == ["Q4_0"]  # Q2_K has no brit1911 PPL
    assert [p.label for p in panel.series["w11"]] == ["w11"] and [p.label for p in panel.series["w11 A4"]] == ["w11 a4"]
    # w11 a4 has a lower PPL than w11 at the same weight bits, but its activations are quantized too: not on it.
    frontier = ["rtn 1-bit", "arb-group g128", "TQ1_0", "w11", "GPTQ paper", "gptq 4-bit g128", "Q4_0"]
    assert [p.label for p in panel.frontier] == frontier  # anchors take part; gptq 2-bit is beaten by TQ1_0
    assert panel.reference_ppl == 29.23 and panel.reference_bits == 16


def test_reference_only_when_the_reports_agree(tmp_path: Path) -> None:
    other = make_report("gptq 4-bit g128", "gptq", 4.1, {"brit1911": 12.0}, original={"brit1911": 9.5})
    points = load_points(
        [str(write_json(tmp_path / "a.json", RUNS["w11"])), str(write_json(tmp_path / "b.json", other))]
    )
    assert build_panel(points, [], "brit1911").reference_ppl is None
    noise = make_report("w11 a4", "w11", 2.2, {"brit1911": 150.0}, act_bits=4, original={"brit1911": 29.2300035})
    points = load_points([str(tmp_path / "a.json"), str(write_json(tmp_path / "c.json", noise))])
    assert build_panel(points, [], "brit1911").reference_ppl == pytest.approx(29.23)


# ---------------------------------------------------------------------------------------------------------
# The command


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_writes_a_png_with_the_expected_series(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    from binq.plot_figure import write_plot

    out = tmp_path / "frontier.png"
    anchors = write_json(tmp_path / "anchors.json", [{"label": "Q4_0", "bits": 4.5, "ppl": {"brit1911": 35.0}}])
    code = main(["plot", str(runs), "-o", str(out), "--anchors", str(anchors)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == f"wrote {out}"
    width, height = png_size(out)
    assert width > 500 and height > 400 and out.stat().st_size > 20_000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left

    path, shown = write_plot([str(runs)], str(tmp_path / "two.png"), eval_sets="all", anchors=str(anchors))
    assert png_size(path)[0] > width  # two panels side by side
    assert [panel["eval_set"] for panel in shown] == ["brit1911", "persuasion"]
    brit = shown[0]
    assert list(brit["series"]) == ["arb-group", "gptq", "rtn", "w11", "w11 A4", "llama.cpp"]
    assert brit["series"]["gptq"] == ["gptq 2-bit g128", "gptq 4-bit g128"]
    assert brit["frontier"] == ["rtn 1-bit", "arb-group g128", "w11", "gptq 4-bit g128", "Q4_0"]
    assert brit["legend"][:6] == list(brit["series"])
    assert brit["legend"][6].startswith("Pareto frontier") and brit["legend"][7] == "original (16-bit): PPL 29.23"
    assert "llama.cpp" not in shown[1]["series"]  # the anchor has no persuasion PPL
    styles = list(brit["styles"].values())
    assert len(set(styles)) == len(styles) and brit["styles"]["llama.cpp"] == ("*", "0.25")
    assert shown[1]["styles"]["gptq"] == brit["styles"]["gptq"]  # a family looks the same in every panel

    svg = tmp_path / "frontier.svg"
    assert main(["plot", str(runs / "w11"), "-o", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "w11" in svg.read_text()


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    """Exit code 2, no traceback, one ``binq: error:`` line, the last, matching ``pattern`` (as test_cli.py)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("binq: error: "), err
    assert re.search(pattern, errors[0]), errors[0]


def bad_inputs(runs: Path, tmp: Path) -> list[tuple[list[str], str]]:
    no_ppl = make_report("rtn 1-bit", "rtn", 1.0, {})
    no_bits = make_report("rtn 1-bit", "rtn", 1.0, {"brit1911": 10.0})
    del no_bits["storage_bits"], no_bits["bits"]
    nan_ppl = make_report("rtn 1-bit", "rtn", 1.0, {"brit1911": math.nan})
    out = str(tmp / "frontier.png")
    empty = tmp / "empty"
    empty.mkdir()
    folder_png = tmp / "folder.png"
    folder_png.mkdir()
    only_eval = tmp / "only-eval"
    write_json(only_eval / "w16_a4" / "report.json", eval_report("w16 a4"))
    return [
        (["plot", str(only_eval), "-o", out], "no report with quantized weights to plot"),
        (["plot", str(tmp / "missing.json"), "-o", out], r"no such report file or folder: .*missing\.json"),
        (["plot", str(empty), "-o", out], r"empty holds no report\.json"),
        (["plot", str(write_json(tmp / "e" / "report.json", eval_report("w16"))), "-o", out], "a `binq eval` report"),
        (["plot", str(write_json(tmp / "b.json", no_bits)), "-o", out], r"b\.json has no storage bits"),
        (["plot", str(write_json(tmp / "p.json", no_ppl)), "-o", out], r"p\.json has no PPL"),
        (["plot", str(write_json(tmp / "n.json", nan_ppl)), "-o", out], r"no positive finite PPL on brit1911"),
        (["plot", str(write_json(tmp / "s.json", {"schema": "other"})), "-o", out], r"not a binq\.report/1 report"),
        (["plot", str(write_json(tmp / "list.json", [RUNS["w11"]])), "-o", out], r"not a binq\.report/1 report"),
        (["plot", str(runs), "-o", out, "--eval", "wikitext2"], r"evaluation set 'wikitext2' is not in every report"),
        (["plot", str(runs), "-o", out, "--anchors", str(tmp / "none.json")], "no such anchors file"),
        (["plot", str(runs), "-o", str(tmp / "no-folder" / "f.png")], r"no such folder .*no-folder"),
        (["plot", str(runs), "-o", str(tmp / "f.jpeg")], r"must end in \.png, \.svg, \.pdf"),
        (["plot", str(runs), "-o", str(tmp)], "is a folder"),
        (["plot", str(runs), "-o", str(folder_png)], "is a folder"),
    ]


def test_bad_input_is_a_one_line_error(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tmp = tmp_path / "bad"
    tmp.mkdir()
    for argv, pattern in bad_inputs(runs, tmp):
        code = main(argv)
        assert_one_line_error(code, capsys.readouterr().err, pattern)


@pytest.mark.parametrize(
    ("anchors", "pattern"),
    [
        ("{not json", "is not valid JSON"),
        ('{"label": "Q4_0"}', "must hold a JSON list"),
        ('[{"bits": 4.5, "ppl": {"brit1911": 1}}]', r"entry 0: not an object with a string 'label'"),
        ('[{"label": "Q4_0", "bits": "4.5", "ppl": {"brit1911": 1}}]', r"entry 0 \(Q4_0\): 'bits' must be"),
        ('[{"label": "Q4_0", "bits": 4.5, "ppl": {"brit1911": -1}}]', r"'ppl' must map evaluation sets"),
        ('[{"label": "Q4_0", "bits": 4.5, "ppl": {"brit1911": 9}, "series": 3}]', r"'series' must be a string"),
    ],
)
def test_bad_anchors_file(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], anchors: str, pattern: str
) -> None:
    path = tmp_path / "anchors.json"
    path.write_text(anchors)
    code = main(["plot", str(runs), "-o", str(tmp_path / "f.png"), "--anchors", str(path)])
    assert_one_line_error(code, capsys.readouterr().err, pattern)


def test_an_error_keeps_the_earlier_image(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    out = tmp_path / "frontier.png"
    out.write_bytes(b"an earlier image")
    code = main(["plot", str(runs), "-o", str(out), "--eval", "wikitext2"])
    assert_one_line_error(code, capsys.readouterr().err, "wikitext2")
    assert out.read_bytes() == b"an earlier image"

    def full_disk(self: Figure, stream: Any, **kwargs: Any) -> None:
        stream.write(b"half an ima")
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", full_disk)
        code = main(["plot", str(runs), "-o", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, r"cannot write .*frontier\.png: No space left on device")
    assert out.read_bytes() == b"an earlier image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frontier.png", "runs"]  # the partial file is gone


def test_without_matplotlib(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            patch.delitem(sys.modules, name)
        patch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
        code = main(["plot", str(runs), "-o", str(tmp_path / "f.png")])
    assert_one_line_error(code, capsys.readouterr().err, r"pip install 'binq\[plot\]'")
    assert not (tmp_path / "f.png").exists()
