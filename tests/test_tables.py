"""The generated tables: the committed docs equal what the committed reports give, and the rendering rules.

No model runs here: the unit tests use small synthetic report dicts, the first tests the files in
docs/reports/ and the committed README.md and docs/*.md.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from binq.runs import (
    CATALOGUE,
    DEMO_DEFAULT,
    DEMO_RUNS,
    ORIGINAL,
    RUNS,
    demo_command,
    run_command,
    same_run,
    same_zeroshot_run,
    slug,
    zeroshot_command,
    zeroshot_model,
)
from binq.tables import (
    AGREEMENT_DIR,
    MIB,
    QUICK_DIR,
    SECTIONS,
    ZEROSHOT_DIR,
    Reports,
    agreement_section,
    collect,
    compact_section,
    fmt_ppl,
    frontier,
    frontier_section,
    load_reports,
    quality_section,
    regenerate,
    section_body,
    seed_groups,
    seeds_section,
    stale_sections,
    tune_section,
    w11_section,
    zeroshot_section,
)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# The committed docs and reports


def test_committed_sections_equal_their_reports() -> None:
    """Fails when a generated number was edited by hand, or a report was added without regenerating."""
    stale = stale_sections(ROOT)
    assert not stale, f"regenerate with `python benchmarks/tables.py`: {stale}"


def test_committed_reports_are_catalogue_runs() -> None:
    reports = load_reports(ROOT)  # raises on a report that is not its file's catalogue run
    for label, report in reports.quick.items():
        assert same_run(report["command"], label)
        assert "--quick" in report["command"]
        assert "layers" not in report
        assert report["collected"]["layers_dropped"] > 0 or report.get("kind") == "eval"  # eval: no layers
    for name, records in reports.bench:
        assert records and all("kind" in r and "command" in r for r in records), name


def test_every_section_has_its_markers_once() -> None:
    for section in SECTIONS:
        text = (ROOT / section.doc).read_text(encoding="utf-8")
        assert text.count(f"<!-- begin {section.name} -->") == 1, section
        assert text.count(f"<!-- end {section.name} -->") == 1, section
        assert all(label in CATALOGUE for label in section.labels), section


# ---------------------------------------------------------------------------------------------------------
# The catalogue


def test_catalogue_commands() -> None:
    assert run_command("gptq 2-bit g128", "smollm2-135m", "cpu", False, Path("runs/x")) == [
        "binq", "quantize", "--model", "smollm2-135m", "--method", "gptq", "--bits", "2", "--group-size", "128",
        "--label", "gptq 2-bit g128", "--device", "cpu", "--out", "runs/x/gptq_2-bit_g128", "--quick",
    ]  # fmt: skip
    assert run_command("w16 a4", "m", "cuda", True, Path("o")) == [
        "binq", "eval", "--model", "m", "--act-bits", "4", "--smooth", "none", "--label", "w16 a4",
        "--device", "cuda", "--out", "o/w16_a4",
    ]  # fmt: skip
    assert demo_command is run_command
    assert set(DEMO_DEFAULT) <= set(DEMO_RUNS) and "w16 a4" not in DEMO_RUNS
    assert slug("arb-llm-x intra") == "arb-llm-x_intra"
    assert len({run.slug for run in RUNS}) == len(RUNS)
    assert not any("|" in run.label + run.description for run in RUNS)  # both land in Markdown cells
    with pytest.raises(KeyError, match="unknown run"):
        run_command("nope", "m", "cpu", False, Path("o"))


def test_same_run_ignores_where_and_how_it_printed() -> None:
    command = run_command("billm", "smollm2-135m", "cpu", False, Path("runs/demo"))
    assert same_run(command, "billm")
    moved = [w if w != "runs/demo/billm" else "elsewhere/b" for w in command]
    assert same_run([*moved, "--no-layer-table", "--no-progress", "--workers", "2"], "billm")
    assert same_run(command[:-1], "billm")  # the full protocol is read from the command (collect refuses it)
    assert not same_run([*command, "--intra-block"], "billm")
    assert not same_run(command, "arb")
    assert not same_run(command, "not in the catalogue")


# ---------------------------------------------------------------------------------------------------------
# Rendering, on synthetic reports


def fake_report(
    label: str,
    storage: float = 1.0,
    ppl: tuple[float, float] = (100.0, 200.0),
    kl: tuple[float | None, float | None] = (1.0, 2.0),
    transformers: str = "5.24.0",
    quiet: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """A report with the fields the tables read (the shape ``binq quantize`` writes, after --collect)."""
    bits_block = {"parameters": 1000, "compute_bits": 1.0, "storage_bits": storage, "storage_bytes": storage * 125}
    original = {"parameters": 1000, "compute_bits": 16.0, "storage_bits": 16.0, "storage_bytes": 2000.0}
    sets = ("brit1911", "persuasion")
    return {
        "schema": "binq.report/1",
        "label": label,
        "created": "2026-11-30T01:00:00+00:00",
        "command": [*run_command(label, "smollm2-135m", "cpu", False, Path("runs/catalogue")), "--no-progress"],
        "model": {"spec": "smollm2-135m", "dtype": "float32"},
        "calibration": {"source": "austen", "nsamples": 32, "seqlen": 512, "seed": 0, "tokens": 16384},
        "seed": 0,
        "bits": {"linear": bits_block, "model": dict(bits_block), "other_parameters_bits": 16},
        "bits_original": {"linear": original, "model": dict(original), "other_parameters_bits": 16},
        "compute_bits": 1.0,
        "storage_bits": {"linear": storage, "model": storage},
        "eval": {
            name: {
                "protocol": {"text": name, "seqlen": 512, "windows": 16, "windows_available": 171},
                "ppl": p,
                "ppl_original": 30.0,
                "kl": k,
            }
            for name, p, k in zip(sets, ppl, kl, strict=True)
        },
        "time_s": {"quantize": 10.0, "eval": 5.0, "total": 20.0},
        "peak_memory_bytes": 2**30,
        "versions": {"binq": "0.1.0", "transformers": transformers},
        "machine": {"platform": "Linux-test", "processor": "x86_64", "cpu_threads": 1},
        "collected": {"source": "runs/catalogue/x/report.json", "layers_dropped": 3, "quiet_machine": quiet},
        **extra,
    }


def test_ppl_format() -> None:
    assert fmt_ppl(29.228159) == "29.23"
    assert fmt_ppl(7385.149) == "7385.15"
    assert fmt_ppl(11523.0) == "1.15e+04"
    assert fmt_ppl(5.71e9) == "5.71e+09"
    assert fmt_ppl(None) == "-"


def test_frontier_marks_runs_no_cheaper_run_beats() -> None:
    reports = [
        fake_report("arb-group g128", 1.1, kl=(5.0, 5.0)),
        fake_report("rtn 1-bit g128", 1.1, kl=(9.0, 9.0)),  # same bits, worse: off
        fake_report("gptq 2-bit g128", 2.2, kl=(7.0, 7.0)),  # more bits, worse than 1.1: off
        fake_report("gptq 3-bit g128", 3.2, kl=(1.0, 1.0)),
        fake_report("msb g32", 6.0, kl=(1.0, 1.0)),  # ties the cheaper run, is not beaten strictly: on
        fake_report("msb g2", 2.0, kl=(None, 1.0)),  # no KL: never on it, beats nobody
    ]
    assert frontier(reports) == [True, False, False, True, True, False]


def test_frontier_section_bolds_and_sorts() -> None:
    reports = Reports(
        quick={
            "gptq 3-bit g128": fake_report("gptq 3-bit g128", 3.163, ppl=(85.63, 74.54), kl=(1.0, 1.0)),
            "arb-group g128": fake_report("arb-group g128", 1.135, ppl=(11500.0, 7385.15), kl=(6.0, 5.0)),
            "arb-llm-x": fake_report("arb-llm-x", 3.694, ppl=(191.32, 141.78), kl=(2.0, 1.5)),
            "w11 a4": fake_report("w11 a4", 2.271, kl=(0.1, 0.1), activations={"config": {}, "storage_bits": 4.0}),
        }
    )
    text = frontier_section(reports)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| original | 16 | 16 | 30.00 | 30.00 | 0 |")
    assert lines[2] == "| **arb-group g128 (Q1_0's form)** | 1.135 | 1.000 | 1.15e+04 | 7385.15 | 5.500 | yes |"
    assert lines[3].startswith("| **gptq 3-bit g128** | 3.163 |") and lines[3].endswith("| yes |")
    assert lines[4] == "| arb-llm-x (arb-x + CGB) | 3.694 | 1.000 | 191.32 | 141.78 | 1.750 |  |"
    assert "w11 a4" not in text.split("Not rerun")[0]  # simulated activations are another axis
    assert "- billm: `binq quantize --model smollm2-135m --method billm" in text  # not rerun: listed
    short = frontier_section(reports, only_frontier=True)
    assert "arb-llm-x" not in short.split("Commands")[0] and "gptq 3-bit g128" in short
    assert "weight-only runs of the catalogue are not rerun" in short


def test_missing_report_is_listed_as_not_rerun() -> None:
    reports = Reports(quick={"rtn 1-bit": fake_report("rtn 1-bit", 1.023, ppl=(5.27e5, 4.76e5))})
    text = quality_section(reports, ("rtn 1-bit", "billm"))
    table, rest = text.split("Not rerun in this environment", 1)
    assert "| rtn 1-bit | 1.000 | 1.023 |" in table and "5.27e+05" in table and "billm" not in table
    assert (
        "- billm: `binq quantize --model smollm2-135m --method billm --label billm --device cpu "
        "--out runs/catalogue/billm --quick`" in rest
    )
    assert "- rtn 1-bit: `binq quantize --model smollm2-135m --method rtn --bits 1 --label 'rtn 1-bit'" in rest
    assert "`docs/reports/quick/rtn_1-bit.json`" in rest and "transformers 5.24.0" in rest and "2026-11-30" in rest
    assert "1 torch thread (`OMP_NUM_THREADS=1`) on a CPU shared with development work" in rest
    nothing = quality_section(Reports(), ("billm",))
    assert nothing.startswith("No report of these runs is committed yet.") and "| " not in nothing


def test_timing_note_only_for_shared_machines_and_environments_grouped() -> None:
    quiet = Reports(quick={"billm": fake_report("billm", quiet=True)})
    assert "shared with development work" not in quality_section(quiet, ("billm",))
    mixed = Reports(quick={"billm": fake_report("billm"), "arb": fake_report("arb", transformers="5.23.0", quiet=True)})
    text = quality_section(mixed, ("billm", "arb"))
    assert "billm: binq 0.1.0, transformers 5.24.0" in text and "arb: binq 0.1.0, transformers 5.23.0" in text
    assert "billm were made with 1 torch thread" in text


def test_compact_and_w11_sections() -> None:
    reports = Reports(
        quick={
            "billm": fake_report("billm", 3.179, ppl=(2.08e4, 1.19e4), kl=(6.776, 5.968)),
            "w11 obs a4": fake_report(
                "w11 obs a4",
                2.271,
                activations={
                    "config": {"bits": 4, "sym": False, "smooth": "none", "clip": "search"},
                    "storage_bits": 4.035,
                },
            ),
        }
    )
    compact = compact_section(reports, ("billm", "arb"))
    assert "| billm | 3.179 | 1.000 | 2.08e+04 | 1.19e+04 | 6.372 |" in compact
    assert "- arb: `binq quantize --model smollm2-135m --method arb --label arb" in compact
    assert "quantize time" not in compact
    w11 = w11_section(reports, ("billm", "w11 obs a4", "w16 a4"))
    assert "| w11 obs a4 |  | INT4 asym, smooth none, clip search (4.035 bits) | 2.271 |" in w11
    assert "| billm |  | fp | 3.179 |" in w11
    assert (
        "- w16 a4: `binq eval --model smollm2-135m --act-bits 4 --smooth none --label 'w16 a4' --device cpu "
        "--out runs/catalogue/w16_a4 --quick`" in w11
    )


# ---------------------------------------------------------------------------------------------------------
# Collect, regenerate, detect a hand edit: on a scratch repository


def test_seed_groups_come_from_the_catalogue() -> None:
    groups = seed_groups()
    assert groups["arb-group g128"] == ["arb-group g128", "arb-group g128 seed 1", "arb-group g128 seed 2"]
    assert groups["arb-group g128 tuned"][0] == "arb-group g128 tuned" and len(groups["arb-group g128 tuned"]) == 3


def test_seeds_section_medians_ranges_and_the_claim() -> None:
    def seeded(label: str, seed: int, ppl: tuple[float, float]) -> dict[str, Any]:
        return fake_report(label, ppl=ppl) | {"seed": seed}

    plain = {
        "arb-group g128": (1e4, 900.0),
        "arb-group g128 seed 1": (3e4, 500.0),
        "arb-group g128 seed 2": (2e4, 700.0),
    }
    tuned = {"arb-group g128 tuned": (900.0, 600.0), "arb-group g128 tuned seed 1": (800.0, 650.0),
             "arb-group g128 tuned seed 2": (1e3, 400.0)}  # fmt: skip
    quick = {label: seeded(label, n, ppl) for runs in (plain, tuned) for n, (label, ppl) in enumerate(runs.items())}
    text = seeds_section(Reports(quick=quick), [("arb-group g128", "arb-group g128 tuned")])
    assert "| arb-group g128 | 0, 1, 2 | 2e+04 [1e+04 - 3e+04] | 700.00 [500.00 - 900.00] |" in text
    assert "| arb-group g128 tuned | 0, 1, 2 | 900.00 [800.00 - 1000.00] | 600.00 [400.00 - 650.00] |" in text
    # brit1911: the tuned worst (1000) beats the one-shot best (1e4); persuasion: the ranges overlap.
    assert "better beyond both seed ranges on brit1911." in text


def test_tune_section_measures_the_cost_inside_the_tuned_run() -> None:
    blocks = [{"block": 0, "time_s": 30.0, "kept": True}, {"block": 1, "time_s": 20.0, "kept": False}]
    quick = {
        "w11": fake_report("w11"),
        "w11 tuned": fake_report("w11 tuned", time_s={"quantize": 150.0, "eval": 5.0, "total": 160.0},
                                 tuning={"config": {}, "blocks": blocks}),
    }  # fmt: skip
    text = tune_section(Reports(quick=quick), [("w11", "w11 tuned")])
    assert "| w11 tuned | 1.000 | 100.00 | 200.00 | 1.500 | 150 s | 50 s | 1.50x | 1 of 2 |" in text
    assert "| w11 | 1.000 | 100.00 | 200.00 | 1.500 | 10 s | - | - | - |" in text


def _write(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_collect_then_regenerate_then_detect_a_hand_edit(tmp_path: Path) -> None:
    source, root = tmp_path / "runs", tmp_path / "repo"
    good = fake_report("gptq 4-bit g128", 4.174, ppl=(39.95, 46.36), kl=(0.33, 0.26))
    del good["collected"]
    good["layers"] = [{"block": 0}, {"block": 1}]
    good["extra_bits"] = {"linear": {"index_entropy_bits": 4.5}, "layers": {"a": {}, "b": {}, "c": {}}}
    _write(source / "gptq_4-bit_g128" / "report.json", good)
    _write(source / "stranger" / "report.json", {**good, "label": "not a catalogue run"})
    _write(source / "billm" / "report.json", {**good, "label": "billm"})  # gptq's command under billm's label
    full = {**good, "command": [w for w in good["command"] if w != "--quick"]}
    _write(source / "gptq_4-bit_g128_full" / "report.json", full)
    machine = {"platform": "Linux-test", "processor": "x86_64", "cpu_count": 2, "binq_cpu_kernels": "avx512"}
    bench = [
        {
            "kind": "engine", "engine": engine, "format": engine, "threads": 2, "decode_tokens_per_s": speed,
            "prefill_tokens_per_s": 500.0, "model_bytes": 2**20, "peak_rss_bytes": 2**29, "baseline_rss_bytes": 2**28,
            "gemv": [{"shape": [4, 8], "count": 2, "kernel": "k", "median_us": us}], "machine": machine,
            "versions": {"binq": "0.1.0"}, "command": "binq bench --model runs/ckpt/b --json runs/bench/b.json",
            "date": "2026-11-30",
        }
        for engine, speed, us in (("binq", 100.0, 10.0), ("original", 20.0, 30.0))
    ]  # fmt: skip
    _write(source / "b.json", bench)
    _write(source / "other.json", {"not": "bench"})
    messages = collect(source, root)
    assert sum("->" in m for m in messages) == 2 and sum(m.startswith("skipped") for m in messages) == 4
    committed = json.loads((root / QUICK_DIR / "gptq_4-bit_g128.json").read_text())
    assert "layers" not in committed and committed["collected"]["layers_dropped"] == 2
    assert committed["extra_bits"] == {"linear": {"index_entropy_bits": 4.5}}
    assert committed["collected"]["extra_bits_layers_dropped"] == 3 and committed["collected"]["quiet_machine"] is False
    assert committed["eval"] == good["eval"] and committed["command"] == good["command"]
    assert json.loads((root / "docs/reports/bench/b.json").read_text()) == bench

    changed = regenerate(root)  # the docs do not exist yet: every section is appended to its doc
    assert len(changed) == len(SECTIONS) and stale_sections(root) == []
    readme = (root / "README.md").read_text()
    assert "| gptq 4-bit g128 | 1.000 | 4.174 |" in section_body(readme, "results")
    (root / "README.md").write_text(readme.replace("| 39.95 |", "| 40.33 |", 1))
    assert stale_sections(root) == ["README.md#results"]
    assert regenerate(root) == ["README.md#results"] and stale_sections(root) == []
    assert section_body((root / "README.md").read_text(), "results") == section_body(readme, "results")
    speed = section_body(readme, "inference-speed")
    assert speed.startswith("| checkpoint | decode tok/s |") and "| b | 100.0 | 5.00x | - | 1.0 | 256 |" in speed
    assert "    binq bench --model runs/ckpt/b --json runs/bench/b.json" in speed
    gemv = section_body((root / "docs/BENCHMARKS.md").read_text(), "inference-gemv")
    assert "| b | 4x8 | 2 | k | 10 | 30 | 3.00x |" in gemv


# ---------------------------------------------------------------------------------------------------------
# Zero-shot rows and llama.cpp agreement


def fake_zeroshot(label: str, model: str, acc: float = 0.25, limit: int = 100, **extra: Any) -> dict[str, Any]:
    """A ``binq eval --tasks`` report as it is written (before --collect), tasks and items as binq records them."""
    items = {"items": limit, "items_total": 500}
    return {
        "schema": "binq.report/1",
        "kind": "eval",
        "label": label,
        "created": "2026-11-30T11:00:00+00:00",
        "command": [*zeroshot_command(label, model, "cpu", Path("runs/zeroshot"), limit), "--no-progress"],
        "model": {"spec": model, "path": model, "dtype": "float32", "checkpoint": label != ORIGINAL},
        "eval": {},
        "tasks": {
            "lastword": {
                **items,
                "items_sha256": "a" * 64,
                "acc": acc,
                "acc_stderr": 0.0435,
                "target_loglik_mean": -5.5,
            },
            "nextsentence": {
                **items,
                "items_sha256": "b" * 64,
                "acc": 0.3,
                "acc_stderr": 0.0461,
                "acc_norm": 0.7,
                "acc_norm_stderr": 0.0461,
                "choices": 4,
            },
        },
        "time_s": {"eval": 300.0, "total": 300.0},
        "versions": {"binq": "0.1.0", "transformers": "5.24.0"},
        "machine": {"platform": "Linux-test", "processor": "x86_64", "cpu_threads": 1},
        **extra,
    }


def test_zeroshot_commands() -> None:
    assert zeroshot_command("gptq 4-bit g128", "runs/catalogue/gptq_4-bit_g128", "cpu", Path("o")) == [
        "binq", "eval", "--model", "runs/catalogue/gptq_4-bit_g128", "--tasks", "lastword,nextsentence",
        "--limit", "100", "--label", "gptq 4-bit g128", "--device", "cpu", "--out", "o/gptq_4-bit_g128",
    ]  # fmt: skip
    assert zeroshot_model(ORIGINAL, "smollm2-135m", Path("runs/catalogue")) == "smollm2-135m"
    assert zeroshot_model("billm", "smollm2-135m", Path("runs/catalogue")) == str(Path("runs/catalogue/billm"))
    command = zeroshot_command("billm", "/abs/runs/catalogue/billm", "cpu", Path("x"))
    assert same_zeroshot_run([*command, "--no-progress"], "billm", "smollm2-135m")
    assert same_zeroshot_run(zeroshot_command("billm", "billm", "cpu", Path("x"), None), "billm", "smollm2-135m")
    assert not same_zeroshot_run(command, "arb", "smollm2-135m")  # another run's label
    assert not same_zeroshot_run(zeroshot_command("billm", "ckpt/arb", "cpu", Path("x")), "billm", "smollm2-135m")
    assert not same_zeroshot_run([*command, "--eval", "brit1911"], "billm", "smollm2-135m")
    original = zeroshot_command(ORIGINAL, "smollm2-135m", "cpu", Path("x"))
    assert same_zeroshot_run(original, ORIGINAL, "smollm2-135m")
    assert not same_zeroshot_run(original, ORIGINAL, "other-model")
    assert not same_zeroshot_run(original, "not in the catalogue", "smollm2-135m")


def test_zeroshot_section() -> None:
    made_by = run_command("billm", "smollm2-135m", "cpu", False, Path("runs/catalogue"))
    billm = fake_zeroshot("billm", "runs/catalogue/billm", acc=0.04)
    billm["collected"] = {"checkpoint_command": made_by}
    original = fake_zeroshot(ORIGINAL, "smollm2-135m", acc=0.31)
    original["collected"] = {"checkpoint_command": None}
    reports = Reports(quick={"billm": fake_report("billm", 3.188)}, zeroshot={ORIGINAL: original, "billm": billm})
    text = zeroshot_section(reports, (ORIGINAL, "billm", "w11"))
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == (
        "| model | storage bits linear | lastword acc | nextsentence acc | nextsentence acc_norm "
        "| lastword word log-lik |"
    )
    assert table[1] == "| original | 16 | 0.310 ± 0.043 | 0.300 ± 0.046 | 0.700 ± 0.046 | -5.500 |"
    assert table[2].startswith("| billm | 3.188 | 0.040 ± 0.043 |")
    assert f"`lastword` the first 100 of 500 items (sha256 `{'a' * 64}`)" in text
    assert (
        "- w11: `binq eval --model runs/catalogue/w11 --tasks lastword,nextsentence --limit 100 --label w11 "
        "--device cpu --out runs/zeroshot/w11`" in text
    )
    assert f"checkpoint: `{shlex.join(made_by)}`" in text and "`docs/reports/zeroshot/billm.json`" in text


def test_collect_zeroshot_and_llamacpp(tmp_path: Path) -> None:
    source, root = tmp_path / "runs", tmp_path / "repo"
    checkpoint = tmp_path / "catalogue" / "billm"
    made_by = run_command("billm", "smollm2-135m", "cpu", False, tmp_path / "catalogue")
    _write(checkpoint / "report.json", {"command": made_by})
    _write(source / "billm" / "report.json", fake_zeroshot("billm", str(checkpoint)))
    _write(source / "original" / "report.json", fake_zeroshot(ORIGINAL, "smollm2-135m"))
    no_report = tmp_path / "elsewhere" / "w11"
    no_report.mkdir(parents=True)
    _write(source / "w11" / "report.json", fake_zeroshot("w11", str(no_report)))  # whose checkpoint is unknown
    wrong = tmp_path / "other" / "arb"
    _write(wrong / "report.json", {"command": made_by})  # billm's checkpoint under arb's folder name
    _write(source / "arb" / "report.json", fake_zeroshot("arb", str(wrong)))
    record = {"kind": "llamacpp-agreement", "ppl_binq": 30.0}
    _write(source / "q.json", record)
    messages = collect(source, root)
    assert sum("->" in m for m in messages) == 3, messages
    assert any("w11" in m and "no report.json beside the checkpoint" in m for m in messages)
    assert any("arb" in m and "not the catalogue's quick run 'arb'" in m for m in messages)
    committed = json.loads((root / ZEROSHOT_DIR / "billm.json").read_text())
    assert committed["collected"]["checkpoint_command"] == made_by
    assert json.loads((root / AGREEMENT_DIR / "q.json").read_text()) == record
    (root / AGREEMENT_DIR / "q.json").unlink()
    loaded = load_reports(root)
    assert set(loaded.zeroshot) == {ORIGINAL, "billm"}
    (root / ZEROSHOT_DIR / "billm.json").rename(root / ZEROSHOT_DIR / "arb.json")
    with pytest.raises(ValueError, match="is not the row of slug 'arb'"):
        load_reports(root)


def test_agreement_section() -> None:
    base = {
        "kind": "llamacpp-agreement", "gguf_bytes": 3 * MIB, "protocol": "brit1911: first 4 windows of 512 tokens",
        "greedy_tokens": 24, "prompt": "The history", "threads": 1, "created": "2026-11-30T11:00:00+00:00",
        "versions": {"binq": "0.1.0", "llama_cpp_python": "0.3.36"}, "machine": {"platform": "Linux-test"},
        "largest_abs_logit_binq": 40.0, "argmax_positions": 2048,
    }  # fmt: skip
    gptq = {
        **base, "checkpoint": "runs/catalogue/gptq_4-bit_g128", "gguf_tensor_types": {"F16": 1, "Q5_0": 210},
        "checkpoint_command": run_command("gptq 4-bit g128", "smollm2-135m", "cpu", False, Path("runs/catalogue")),
        "ppl_binq": 31.6, "ppl_llama_cpp": 31.9, "max_abs_logit_difference": 2.0, "mean_abs_logit_difference": 0.16,
        "argmax_agreement": 0.971, "greedy_identical_tokens": 24, "command": ["python", "benchmarks/llamacpp.py"],
    }  # fmt: skip
    original = {
        **gptq, "checkpoint": "smollm2-135m", "checkpoint_command": None, "gguf_tensor_types": {"F16": 211},
        "ppl_llama_cpp": 31.6, "max_abs_logit_difference": 0.1, "greedy_identical_tokens": 20,
    }  # fmt: skip
    text = agreement_section(Reports(agreement=[("gptq_4-bit_g128", gptq), ("original", original)]))
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| original (source GGUF as F16) | 3.0 MiB: 211 F16 | 31.60 | 31.60 | +0.000% |")
    assert rows[2] == (
        "| gptq 4-bit g128 | 3.0 MiB: 210 Q5_0, 1 F16 | 31.60 | 31.90 | +0.949% | 2.000 (5.0%) | 0.1600 "
        "| 97.1% of 2048 | 24 of 24 |"
    )
    assert "llama_cpp_python 0.3.36" in text and "llama.cpp threads: 1" in text
    assert agreement_section(Reports()).startswith("No llama.cpp result is committed yet")
