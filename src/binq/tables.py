"""Every generated table of README.md and docs/*.md, rendered from the committed reports.

The reports live in the repository: ``docs/reports/quick/<slug>.json`` (``report.json`` of a quick-protocol
``binq quantize`` run of the catalogue, ``binq.runs``) and ``docs/reports/bench/<name>.json`` (the
records of one ``binq bench --json`` run), ``docs/reports/scale/<name>.json`` (one lane of
``benchmarks/scale.py``), ``docs/reports/llamacpp/<type>.json`` (one llama.cpp type of
``benchmarks/llamacpp_frontier.py``; its ``anchors.json`` is the plot's input, not read here),
``docs/reports/zeroshot/<slug>.json`` (``binq eval --tasks`` of a catalogue run's checkpoint, or of the
source model: ``original.json``) and ``docs/reports/llamacpp-agreement/<name>.json`` (one
``benchmarks/llamacpp.py --out`` result). ``collect`` copies finished runs there; ``regenerate`` rewrites
every section between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` from them; ``stale_sections``
says which committed sections differ from what the reports give. Nothing here runs a model: every
number in a section is read from a report, and each section names the command of each of its rows.

``benchmarks/tables.py`` is the command line.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from binq.report import REPORT_SCHEMA, comparison_rows, extra_bit_line, fmt, fmt_ppl, markdown_grid, write_section
from binq.runs import (
    CATALOGUE,
    DEMO_DEFAULT,
    ORIGINAL,
    Run,
    get_run,
    run_command,
    same_run,
    same_zeroshot_run,
    slug,
    zeroshot_command,
    zeroshot_model,
)

QUICK_DIR = Path("docs/reports/quick")
BENCH_DIR = Path("docs/reports/bench")
SCALE_DIR = Path("docs/reports/scale")
LLAMACPP_DIR = Path("docs/reports/llamacpp")
LLAMACPP_KIND = "llamacpp-frontier"  # the ``kind`` of a benchmarks/llamacpp_frontier.py report
# The storage budgets (bits per linear weight) over which binq's runs are set against llama.cpp's types.
VERSUS_BITS = (1.1, 4.5)
ZEROSHOT_DIR = Path("docs/reports/zeroshot")
AGREEMENT_DIR = Path("docs/reports/llamacpp-agreement")
AGREEMENT_KIND = "llamacpp-agreement"  # the ``kind`` of a benchmarks/llamacpp.py result
MIB = 2**20
COMMAND = "python benchmarks/tables.py"
# Where the not-rerun commands of the tables write (the folder `--collect` reads by default).
CATALOGUE_OUT = Path("runs/catalogue")
ZEROSHOT_OUT = Path("runs/zeroshot")
MODEL = "smollm2-135m"

Report = dict[str, Any]
BenchFile = tuple[str, list[dict[str, Any]]]


@dataclass
class Reports:
    """The committed reports: quick-protocol quantize reports by label, the bench files by name, the scale
    lanes, the zero-shot reports by label and the llama.cpp agreement results by file name."""

    quick: dict[str, Report] = field(default_factory=dict)
    bench: list[BenchFile] = field(default_factory=list)
    scale: list[Report] = field(default_factory=list)
    llamacpp: list[Report] = field(default_factory=list)
    zeroshot: dict[str, Report] = field(default_factory=dict)
    agreement: list[tuple[str, Report]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Loading and collecting


def load_reports(root: Path) -> Reports:
    """Read ``docs/reports`` under ``root``; a quick report must be the catalogue's run of its file name."""
    reports = Reports()
    for path in sorted((root / QUICK_DIR).glob("*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        label = report.get("label")
        if label not in CATALOGUE or CATALOGUE[label].slug != path.stem:
            raise ValueError(f"{path}: label {label!r} is not the catalogue run of slug {path.stem!r}")
        if not same_run(report["command"], label):
            raise ValueError(
                f"{path}: its command is not the catalogue's run {label!r}: {shlex.join(report['command'])}"
            )
        reports.quick[label] = report
    for path in sorted((root / BENCH_DIR).glob("*.json")):
        reports.bench.append((path.stem, json.loads(path.read_text(encoding="utf-8"))))
    for path in sorted((root / SCALE_DIR).glob("*.json")):
        reports.scale.append(json.loads(path.read_text(encoding="utf-8")))
    for path in sorted((root / LLAMACPP_DIR).glob("*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(report, dict) and report.get("kind") == LLAMACPP_KIND:  # anchors.json is a list
            reports.llamacpp.append(report)
    for path in sorted((root / ZEROSHOT_DIR).glob("*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        checkpoint_command = report.get("collected", {}).get("checkpoint_command")
        problem = zeroshot_problem(report, checkpoint_command)
        if problem is None and slug(report["label"]) != path.stem:
            problem = f"label {report['label']!r} is not the row of slug {path.stem!r}"
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        reports.zeroshot[report["label"]] = report
    for path in sorted((root / AGREEMENT_DIR).glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("kind") != AGREEMENT_KIND:
            raise ValueError(f"{path}: not a benchmarks/llamacpp.py result (kind {AGREEMENT_KIND!r})")
        reports.agreement.append((path.stem, record))
    return reports


def zeroshot_problem(report: Report, checkpoint_command: list[str] | None) -> str | None:
    """Why ``report`` is not a zero-shot row (None when it is): its command must be ``zeroshot_command`` of its
    label, and a checkpoint's row needs the command that made the checkpoint, the catalogue's quick run."""
    label = report.get("label")
    if not report.get("tasks"):
        return "no zero-shot tasks in it"
    if not same_zeroshot_run(report["command"], label, MODEL):
        return f"its command is not the zero-shot row {label!r}: {shlex.join(report['command'])}"
    if label == ORIGINAL:
        return None
    if checkpoint_command is None:
        return "the command that made its checkpoint is unknown (no report.json beside the checkpoint)"
    if not same_run(checkpoint_command, label) or "--quick" not in checkpoint_command:
        return f"its checkpoint is not the catalogue's quick run {label!r}: {shlex.join(checkpoint_command)}"
    return None


def slim_report(report: Report, source: str, quiet_machine: bool) -> Report:
    """The committed form of a report: without the per-layer records (their count kept), plus a ``collected`` note.

    Dropped: ``layers`` (one record per linear) and ``extra_bits.layers`` (per-linear side figures);
    every figure the tables use (bits, eval, times, memory, versions, machine, command) is kept as written.
    """
    slim = {key: value for key, value in report.items() if key != "layers"}
    collected: dict[str, Any] = {"source": source, "layers_dropped": len(report.get("layers", []))}
    extra = report.get("extra_bits")
    if extra and "layers" in extra:
        slim["extra_bits"] = {key: value for key, value in extra.items() if key != "layers"}
        collected["extra_bits_layers_dropped"] = len(extra["layers"])
    allocation = report.get("allocation")
    if allocation and any("measured" in row for row in allocation.get("linears", [])):  # every candidate's figures
        slim["allocation"] = allocation | {
            "linears": [{k: v for k, v in row.items() if k != "measured"} for row in allocation["linears"]]
        }
        collected["allocation_measurements_dropped"] = len(allocation["linears"])
    collected["quiet_machine"] = quiet_machine
    slim["collected"] = collected
    return slim


def _is_bench(records: Any) -> bool:
    return isinstance(records, list) and bool(records) and all(isinstance(r, dict) and "kind" in r for r in records)


def collect(source: Path, root: Path, quiet_machine: bool = False) -> list[str]:
    """Copy the finished runs under ``source`` into ``root/docs/reports``; one message per file considered.

    ``source/<slug>/report.json`` of a catalogue run (same command, quick protocol) goes to
    ``docs/reports/quick/<slug>.json`` (see ``slim_report``); one of a zero-shot row (``binq eval --tasks``,
    ``zeroshot_problem``) to ``docs/reports/zeroshot/<slug>.json``, with the command that made its checkpoint
    (from the checkpoint's own report.json) under ``collected``; ``source/<name>.json`` holding ``binq bench``
    records goes to ``docs/reports/bench/<name>.json`` unchanged, and a ``benchmarks/llamacpp.py`` result
    to ``docs/reports/llamacpp-agreement/<name>.json`` unchanged. ``quiet_machine`` records that the
    runs had the machine to themselves (their times are then stated as comparable).
    """
    messages = []
    for path in sorted(source.glob("*/report.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        label = report.get("label")
        if report.get("schema") != REPORT_SCHEMA:
            messages.append(f"skipped {path}: not a {REPORT_SCHEMA} report")
        elif report.get("tasks"):
            messages.append(_collect_zeroshot(path, report, root, quiet_machine))
        elif label not in CATALOGUE:
            messages.append(f"skipped {path}: label {label!r} is not in the catalogue (binq.runs)")
        elif not same_run(report["command"], label):
            messages.append(f"skipped {path}: not the catalogue's command for {label!r}")
        elif "--quick" not in report["command"]:
            messages.append(f"skipped {path}: only quick-protocol reports have tables")
        else:
            target = root / QUICK_DIR / f"{CATALOGUE[label].slug}.json"
            _write_json(target, slim_report(report, str(path), quiet_machine))
            messages.append(f"{path} -> {target.relative_to(root)}")
    for path in sorted(source.glob("*.json")):
        records = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(records, dict) and records.get("kind") == AGREEMENT_KIND:
            target = root / AGREEMENT_DIR / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            messages.append(f"{path} -> {target.relative_to(root)}")
            continue
        if not _is_bench(records):
            messages.append(f"skipped {path}: not a list of binq bench records")
            continue
        target = root / BENCH_DIR / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        messages.append(f"{path} -> {target.relative_to(root)}")
    return messages


def _collect_zeroshot(path: Path, report: Report, root: Path, quiet_machine: bool) -> str:
    """Copy one zero-shot report (``collect``), adding the command that made its checkpoint; the message."""
    checkpoint_command = None
    if report.get("model", {}).get("checkpoint"):
        made_by = Path(report["model"]["path"]) / "report.json"
        if made_by.is_file():
            checkpoint_command = json.loads(made_by.read_text(encoding="utf-8")).get("command")
    problem = zeroshot_problem(report, checkpoint_command)
    if problem is not None:
        return f"skipped {path}: {problem}"
    collected = {"source": str(path), "checkpoint_command": checkpoint_command, "quiet_machine": quiet_machine}
    target = root / ZEROSHOT_DIR / f"{slug(report['label'])}.json"
    _write_json(target, {**report, "collected": collected})
    return f"{path} -> {target.relative_to(root)}"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Number formatting and the pieces every quality section shares


def mean_kl(report: Report) -> float | None:
    values = [e["kl"] for e in report["eval"].values()]
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def protocol_of(report: Report) -> tuple:
    """What makes two runs' figures comparable: calibration windows and each evaluation's windows."""
    calibration = report.get("calibration", {})  # a `binq eval` report without activations has none
    windows = tuple((name, e["protocol"]["windows"], e["protocol"]["seqlen"]) for name, e in report["eval"].items())
    seed = calibration.get("seed")
    return calibration.get("source"), calibration.get("nsamples"), calibration.get("seqlen"), seed, windows


def frontier(reports: Sequence[Report]) -> list[bool]:
    """True where no other run stores at most as many linear bits with a lower mean KL."""
    bits = [r["storage_bits"]["linear"] for r in reports]
    kl = [mean_kl(r) for r in reports]
    return [
        kl[i] is not None
        and not any(bits[j] <= bits[i] and kl[j] is not None and kl[j] < kl[i] for j in range(len(reports)) if j != i)
        for i in range(len(reports))
    ]


def _cmd(command: Sequence[str]) -> str:
    return f"`{shlex.join(command)}`"


def not_rerun_command(run: Run) -> list[str]:
    """The command that would make a run's report where ``--collect`` looks by default."""
    return run_command(run.label, MODEL, "cpu", False, CATALOGUE_OUT)


def _grouped(reports: Sequence[Report], key: Callable[[Report], Any], describe: Callable[[Report], str]) -> list[str]:
    """One description per distinct ``key``; with several, each names its rows."""
    groups: dict[Any, list[Report]] = {}
    for report in reports:
        groups.setdefault(key(report), []).append(report)
    if len(groups) == 1:
        return [describe(reports[0])]
    return [f"{', '.join(r['label'] for r in rows)}: {describe(rows[0])}" for rows in groups.values()]


def _dates(reports: Sequence[Report]) -> str:
    days = sorted({r["created"][:10] for r in reports})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _environment(report: Report) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    machine = report["machine"]
    threads = machine.get("cpu_threads")
    device = f", {machine['cuda_device']}" if machine.get("cuda_device") else ""
    return (
        f"{versions}; {machine.get('platform', '?')} ({machine.get('processor', '?')}{device}), "
        f"{threads} torch thread{'s' if threads != 1 else ''}"
    )


def _environment_key(report: Report) -> tuple:
    machine = report["machine"]
    return (
        tuple(report["versions"].items()),
        machine.get("platform"),
        machine.get("processor"),
        machine.get("cpu_threads"),
        machine.get("cuda_device"),
    )


def _protocol_text(report: Report) -> str:
    calibration = report.get("calibration")
    evaluations = "; ".join(
        f"`{name}` first {e['protocol']['windows']} of {e['protocol']['windows_available']} windows of "
        f"{e['protocol']['seqlen']} tokens"
        for name, e in report["eval"].items()
    )
    calibrated = (
        "no calibration"
        if calibration is None
        else f"calibration {calibration['nsamples']} x {calibration['seqlen']} tokens of `{calibration['source']}`, "
        f"seed {calibration['seed']}"
    )
    return f"{calibrated}; evaluation {evaluations}; evaluation dtype {report['model']['dtype']}"


def _provenance(reports: Sequence[Report], timed: bool) -> list[str]:
    """Where the rows come from: report files, dates, versions, machine, threads, protocol, timing caveat."""
    files = ", ".join(f"`{(QUICK_DIR / (CATALOGUE[r['label']].slug + '.json')).as_posix()}`" for r in reports)
    lines = [
        f"Generated by `{COMMAND}` from the committed reports {files}; made {_dates(reports)} (UTC) with "
        + "; ".join(_grouped(reports, _environment_key, _environment))
        + ".",
        "Protocol: " + "; ".join(_grouped(reports, protocol_of, _protocol_text)) + ". "
        "KL is KL(original ‖ quantized) per token, in nats.",
    ]
    if timed:
        shared = [r for r in reports if not r.get("collected", {}).get("quiet_machine", False)]
        totals = [r["time_s"]["total"] for r in reports]
        timing = (
            "`quantize time` is the engine alone (capture, Hessians, the method, block re-runs); each run's whole "
            f"command (model loading and both evaluations included) took {min(totals):.0f}-{max(totals):.0f} s."
        )
        if shared:
            threads = sorted({r["machine"].get("cpu_threads") for r in shared}, key=str)
            which = "These runs" if len(shared) == len(reports) else ", ".join(r["label"] for r in shared)
            count = "/".join(str(t) for t in threads)
            timing += (
                f" {which} were made with {count} torch thread{'' if threads == [1] else 's'}"
                + (" (`OMP_NUM_THREADS=1`)" if threads == [1] else "")
                + " on a CPU shared with development work: their times are not comparable with a quiet "
                "machine's, nor exactly between rows. Peak memory is each run's own process and is meaningful."
            )
        lines.append(timing)
    return [part for line in lines for part in (line, "")][:-1]


def _footer(reports: Sequence[Report], missing: Sequence[Run], timed: bool) -> list[str]:
    lines: list[str] = []
    if missing:
        lines += ["Not rerun in this environment (no committed report; left out of the table):", ""]
        lines += [f"- {run.label}: {_cmd(not_rerun_command(run))}" for run in missing]
        lines.append("")
    if reports:
        lines += ["Commands, one per row (each report's `command`):", ""]
        lines += [f"- {r['label']}: {_cmd(r['command'])}" for r in reports]
        lines += ["", *_provenance(reports, timed)]
    return lines


def _split(reports: Reports, labels: Sequence[str]) -> tuple[list[Report], list[Run]]:
    present = [reports.quick[label] for label in labels if label in reports.quick]
    missing = [get_run(label) for label in labels if label not in reports.quick]
    return present, missing


def _no_rows() -> list[str]:
    return ["No report of these runs is committed yet.", ""]


# ---------------------------------------------------------------------------------------------------------
# Quality sections


def quality_section(reports: Reports, labels: Sequence[str]) -> str:
    """The comparison ``binq demo`` prints (bits, model size, PPL and KL per text, time, memory), as Markdown."""
    present, missing = _split(reports, labels)
    lines = [] if present else _no_rows()
    if present:
        lines += [markdown_grid(*comparison_rows(present)), ""]
        extra = [r for r in present if r.get("extra_bits")]
        if extra:
            lines += ["Side bit figures of some layouts (not what is stored; the storage column is):", ""]
            lines += [f"- {r['label']}: {extra_bit_line(r['extra_bits'])}" for r in extra]
            lines.append("")
    lines += _footer(present, missing, timed=True)
    return "\n".join(lines)


TUNE_PAIRS = (
    ("arb-group g128", "arb-group g128 tuned"),
    ("w11", "w11 tuned"),
    ("gptq 2-bit g128", "gptq 2-bit g128 tuned"),
    ("target 2.5 bits", "target 2.5 bits tuned"),
    ("arb-group g128", "arb-group g128 tuned signs"),
    ("gptq 4-bit g128", "gptq 4-bit g128 tuned"),
    ("target 3.78 bits gptq", "target 3.78 bits gptq tuned"),
)
TUNE_ROWS = tuple(dict.fromkeys(label for pair in TUNE_PAIRS for label in pair))
# The residual stream's error against each token's (--tune-loss), at seed 0 (docs/TUNE.md).
LOSS_PAIRS = (
    ("arb-group g128 tuned", "arb-group g128 tuned token"),
    ("arb-group g128 tuned signs", "arb-group g128 tuned signs token"),
    ("arb-group g128 tuned signs", "arb-group g128 tuned signs token whole"),
    ("arb-group g128 tuned signs", "arb-group g128 tuned signs token 256"),
    ("arb-group g128 tuned signs token 256", "arb-group g128 tuned signs token 256 target quantized"),
    ("arb-group g128 tuned signs token 256", "arb-group g128 tuned signs token split"),
    ("arb-group g128 tuned signs token split", "arb-group g128 tuned signs token split edges"),
    ("arb-group g128 tuned signs token split", "arb-group g128 tuned signs token split head"),
    ("gptq 4-bit g128 tuned", "gptq 4-bit g128 tuned token"),
    ("target 3.78 bits gptq tuned", "target 3.78 bits gptq tuned token"),
)
LOSS_ROWS = tuple(dict.fromkeys(label for pair in LOSS_PAIRS for label in pair))
# seeds_section judges only the pairs whose two runs both have seed variants.
SEED_PAIRS = (
    *TUNE_PAIRS,
    ("arb-group g128 tuned", "arb-group g128 tuned signs"),
    ("arb-group g128 tuned signs", "arb-group g128 tuned signs token 256"),
    ("arb-group g128 tuned signs token 256", "arb-group g128 tuned signs token 256 target quantized"),
    ("arb-group g128 tuned signs token 256", "arb-group g128 tuned signs token split"),
    ("arb-group g128 tuned signs token split", "arb-group g128 tuned signs token split edges"),
    ("arb-group g128 tuned signs token split", "arb-group g128 tuned signs token split head"),
    ("gptq 4-bit g128 tuned", "gptq 4-bit g128 tuned token"),
)


def tune_section(reports: Reports, pairs: Sequence[tuple[str, str]]) -> str:
    """Each method alone and with ``--tune``: bits, PPL, KL, and what tuning cost inside the tuned run itself
    (its blocks' tuning seconds against the rest of its quantize time, measured side by side in one process)."""
    labels = list(dict.fromkeys(label for pair in pairs for label in pair))
    present, missing = _split(reports, labels)
    if not present:
        return "\n".join([*_no_rows(), *_footer(present, missing, timed=True)])
    sets = list(present[0]["eval"])
    header = ["run", "storage bits linear", *(f"PPL {s}" for s in sets), "mean KL", "quantize time"]
    header += ["of which tuning", "cost vs one-shot", "blocks improved"]
    body = []
    for report in present:
        cells = [report["label"], f"{report['storage_bits']['linear']:.3f}"]
        cells += [fmt_ppl(report["eval"][s]["ppl"]) for s in sets] + [fmt(mean_kl(report), ".3f")]
        quantize_s = report["time_s"]["quantize"]
        cells.append(f"{quantize_s:.0f} s")
        tuning = report.get("tuning")
        if tuning:
            tuned_s = sum(block["time_s"] for block in tuning["blocks"])
            kept = sum(block["kept"] for block in tuning["blocks"])
            ratio = quantize_s / (quantize_s - tuned_s)
            cells += [f"{tuned_s:.0f} s", f"{ratio:.2f}x", f"{kept} of {len(tuning['blocks'])}"]
        else:
            cells += ["-", "-", "-"]
        body.append(cells)
    lines = [
        markdown_grid(header, body),
        "",
        "`cost vs one-shot`: the tuned run's quantize time over the same run's time less its tuning (the method, "
        "Hessians and block re-runs), both measured in the one process; `blocks improved`: blocks whose held-out "
        "output error tuning lowered (the others keep the method's weights).",
        "",
    ]
    lines += _footer(present, missing, timed=True)
    return "\n".join(lines)


def seed_groups() -> dict[str, list[str]]:
    """Each catalogue run that has seed variants (``<label> seed N``): its label first (seed 0), then theirs."""
    groups: dict[str, list[str]] = {}
    for label in CATALOGUE:
        base, _, seed = label.rpartition(" seed ")
        if base in CATALOGUE and seed.isdigit():
            groups.setdefault(base, [base]).append(label)
    return groups


def seeds_section(reports: Reports, pairs: Sequence[tuple[str, str]]) -> str:
    """Median and range over calibration seeds of each run with seed variants, and whether tuning's gain
    holds beyond both ranges (the tuned run's worst seed better than the one-shot run's best)."""
    groups = seed_groups()
    labels = [label for group in groups.values() for label in group]
    present, missing = _split(reports, labels)
    if not present:
        return "\n".join([*_no_rows(), *_footer(present, missing, timed=False)])
    sets = list(present[0]["eval"])
    header = ["run", "seeds", *(f"PPL {s} median [range]" for s in sets)]
    ranges: dict[str, dict[str, tuple[float, float]]] = {}
    body = []
    for base, group in groups.items():
        runs = [reports.quick[label] for label in group if label in reports.quick]
        if not runs:
            continue
        cells = [base, ", ".join(str(r["seed"]) for r in runs)]
        ranges[base] = {}
        for name in sets:
            values = sorted(r["eval"][name]["ppl"] for r in runs)
            ranges[base][name] = (values[0], values[-1])
            cells.append(f"{fmt_ppl(statistics.median(values))} [{fmt_ppl(values[0])} - {fmt_ppl(values[-1])}]")
        body.append(cells)
    lines = [markdown_grid(header, body), ""]
    for plain, tuned in pairs:
        if plain in ranges and tuned in ranges:
            holds = [name for name in sets if ranges[tuned][name][1] < ranges[plain][name][0]]
            verdict = ", ".join(holds) if holds else "none"
            lines.append(f"- `{tuned}` against `{plain}`: better beyond both seed ranges on {verdict}.")
    lines += ["", "The median of an even count is the mean of the middle two.", ""]
    lines += _footer(present, missing, timed=False)
    return "\n".join(lines)


def _compact_header(sets: Sequence[str]) -> list[str]:
    return ["method", "storage bits linear", "compute bits", *(f"PPL {s}" for s in sets), "mean KL"]


def _compact_cells(report: Report, sets: Sequence[str], name: str) -> list[str]:
    return [
        name,
        f"{report['storage_bits']['linear']:.3f}",
        f"{report['compute_bits']:.3f}",
        *(fmt_ppl(report["eval"][s]["ppl"]) for s in sets),
        fmt(mean_kl(report), ".3f"),
    ]


def _original_cells(report: Report, sets: Sequence[str]) -> list[str]:
    original = report["bits_original"]["linear"]
    return [
        "original",
        f"{original['storage_bits']:.0f}",
        f"{original['compute_bits']:.0f}",
        *(fmt_ppl(report["eval"][s]["ppl_original"]) for s in sets),
        "0",
    ]


def _named(report: Report) -> str:
    description = CATALOGUE[report["label"]].description
    return f"{report['label']} ({description})" if description else report["label"]


def compact_section(reports: Reports, labels: Sequence[str]) -> str:
    """Storage bits, compute bits, PPL per text and the mean KL of the texts, in the given order."""
    present, missing = _split(reports, labels)
    lines = [] if present else _no_rows()
    if present:
        sets = list(present[0]["eval"])
        rows = [_original_cells(present[0], sets)] + [_compact_cells(r, sets, _named(r)) for r in present]
        lines += [markdown_grid(_compact_header(sets), rows), ""]
    lines += _footer(present, missing, timed=False)
    return "\n".join(lines)


def _weight_only(run: Run) -> bool:
    """A weight-only quantize run at the default calibration seed: the frontier and the comparisons never pick a
    run's luckiest seed (the seed variants have their own table of medians and ranges)."""
    return run.quantizes and "--act-bits" not in run.options and "--seed" not in run.options


def frontier_section(reports: Reports, only_frontier: bool = False) -> str:
    """Every weight-only run of one protocol, sorted by stored linear bits, the frontier in bold.

    With ``only_frontier`` (the README's short form), the frontier rows only, and the runs not rerun
    are counted, not listed.
    """
    candidates = [r for label, r in reports.quick.items() if _weight_only(CATALOGUE[label])]
    if not candidates:
        return "\n".join(_no_rows() + _footer([], [r for r in CATALOGUE.values() if _weight_only(r)], timed=False))
    protocol = protocol_of(candidates[0])
    other = [r["label"] for r in candidates if protocol_of(r) != protocol]
    ordered = sorted(
        (r for r in candidates if protocol_of(r) == protocol),
        key=lambda r: (r["storage_bits"]["linear"], r["label"]),
    )
    best = frontier(ordered)
    sets = list(ordered[0]["eval"])
    header = [*_compact_header(sets), "frontier"]
    rows = [[*_original_cells(ordered[0], sets), ""]]
    shown = []
    for report, on in zip(ordered, best, strict=True):
        if only_frontier and not on:
            continue
        name = f"**{_named(report)}**" if on and not only_frontier else _named(report)
        rows.append([*_compact_cells(report, sets, name), "yes" if on else ""])
        shown.append(report)
    if only_frontier:
        header, rows = header[:-1], [row[:-1] for row in rows]
    lines = [
        markdown_grid(header, rows),
        "",
        "Sorted by the stored bits of the linear layers; "
        + (
            "the runs no other committed run beats with at most as many stored bits (lower mean KL of the two texts)."
            if only_frontier
            else "**bold** = on the frontier (no other run stores at most as many bits with a lower mean KL of "
            "the two texts). Compute bits use BiLLM's convention for every binary layout (signs only; a group "
            "bitmap is not counted)."
        ),
        "",
    ]
    if other:
        lines += [f"Left out (another protocol): {', '.join(other)}.", ""]
    missing = [run for label, run in CATALOGUE.items() if _weight_only(run) and label not in reports.quick]
    if only_frontier:
        if missing:
            lines += [
                f"{len(missing)} weight-only runs of the catalogue are not rerun in this environment; the whole "
                "table in docs/BENCHMARKS.md lists them with their commands.",
                "",
            ]
        lines += ["Commands, one per row (each report's `command`):", ""]
        lines += [f"- {r['label']}: {_cmd(r['command'])}" for r in shown]
        lines += ["", *_provenance(shown, timed=False)]
    else:
        lines += _footer(ordered, missing, timed=False)
    return "\n".join(lines)


def _activations(report: Report) -> str:
    act = report.get("activations")
    if not act:
        return "fp"
    config = act["config"]
    grid = "sym" if config.get("sym") else "asym"
    return (
        f"INT{config['bits']} {grid}, smooth {config.get('smooth')}, clip {config.get('clip')} "
        f"({act['storage_bits']:.3f} bits)"
    )


def w11_section(reports: Reports, labels: Sequence[str]) -> str:
    """W(1+1) and W(1+1)A(1x4) runs beside their references: weights, activations, PPL, KL, time."""
    present, missing = _split(reports, labels)
    lines = [] if present else _no_rows()
    if present:
        sets = list(present[0]["eval"])
        header = ["run", "what", "activations", "weight storage bits", *(f"PPL {s}" for s in sets)]
        header += [*(f"KL {s}" for s in sets), "quantize time", "peak memory"]
        rows = [
            [
                r["label"],
                CATALOGUE[r["label"]].description,
                _activations(r),
                f"{r['storage_bits']['linear']:.3f}" if "storage_bits" in r else "16 (fp)",
                *(fmt_ppl(r["eval"][s]["ppl"]) for s in sets),
                *(fmt(r["eval"][s]["kl"], ".3f") for s in sets),
                f"{r['time_s']['quantize']:.0f} s" if "quantize" in r["time_s"] else "-",
                f"{r['peak_memory_bytes'] / MIB:,.0f} MiB",
            ]
            for r in present
        ]
        original = ["original", "", "fp", "16", *(fmt_ppl(present[0]["eval"][s]["ppl_original"]) for s in sets)]
        original += ["0" for _ in sets] + ["-", "-"]
        lines += [markdown_grid(header, [original, *rows]), ""]
        lines += [
            "For a run with INT4 activations, KL is to the model with the original weights and full-precision "
            "activations; the fp-weight rows are `binq eval` runs (no quantize time).",
            "",
        ]
    lines += _footer(present, missing, timed=True)
    return "\n".join(lines)


def sizes_section(reports: Reports, labels: Sequence[str]) -> str:
    """What each run's checkpoint stores: bits per linear and per model weight, bytes of the data section."""
    present, missing = _split(reports, labels)
    lines = [] if present else _no_rows()
    if present:
        bits_original = present[0]["bits_original"]
        original = bits_original["model"]
        header = ["method", "storage bits, linears", "storage bits, model", "data bytes", "MiB", "of original"]
        rows = [
            [
                f"original (fp{bits_original['other_parameters_bits']})",
                f"{bits_original['linear']['storage_bits']:.0f}",
                f"{original['storage_bits']:.0f}",
                f"{original['storage_bytes']:,.0f}",
                f"{original['storage_bytes'] / MIB:.1f}",
                "100 %",
            ]
        ]
        for r in present:
            model = r["bits"]["model"]
            rows.append(
                [
                    r["label"],
                    f"{r['storage_bits']['linear']:.3f}",
                    f"{r['storage_bits']['model']:.3f}",
                    f"{model['storage_bytes']:,.0f}",
                    f"{model['storage_bytes'] / MIB:.1f}",
                    f"{100 * model['storage_bytes'] / original['storage_bytes']:.1f} %",
                ]
            )
        lines += [markdown_grid(header, rows), ""]
    lines += _footer(present, missing, timed=False)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Inference sections (binq bench records)


def _engines(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["engine"]: r for r in records if r.get("kind") == "engine"}


def _ratio(value: float | None, anchor: float | None) -> str:
    return "-" if not value or not anchor else f"{value / anchor:.2f}x"


def _mib(value: float | None) -> float | None:
    return None if value is None else value / MIB


def _added_rss(record: dict[str, Any]) -> float | None:
    """Peak resident set minus the process's after its imports, before the model: what the model costs."""
    peak, baseline = record.get("peak_rss_bytes"), record.get("baseline_rss_bytes")
    return None if peak is None or baseline is None else peak - baseline


def _bench_made_by(files: list[BenchFile]) -> str:
    names = ", ".join(f"`{(BENCH_DIR / (name + '.json')).as_posix()}`" for name, _ in files)
    commands = sorted({r["command"] for _, records in files for r in records if r.get("command")})
    record = next(r for _, records in files for r in records if r.get("kind") == "engine")
    machine = record["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    dates = sorted({r.get("date", "?") for _, records in files for r in records})
    return (
        f"Generated by `{COMMAND}` from the committed bench files {names}, written by:\n\n"
        + "\n".join(f"    {command}" for command in commands)
        + f"\n\n{machine['cpu_count']}-core {machine['processor']} CPU ({machine['platform']}), binq CPU kernels: "
        f"{machine.get('binq_cpu_kernels', '?')}, {record['threads']} threads in every engine; {versions}; "
        f"{', '.join(dates)}."
    )


def _no_bench() -> str:
    return f"No bench file is committed yet (`{BENCH_DIR.as_posix()}`; `benchmarks/inference.sh` makes them)."


def decode_section(reports: Reports) -> str:
    """Every engine of every bench file: memory, prefill, decode, its ratio to the file's fp32 engine."""
    if not reports.bench:
        return _no_bench()
    header = ["checkpoint", "engine", "weights", "weights in memory MiB", "kernel re-packing MiB", "prefill tok/s"]
    header += ["decode tok/s", "decode vs fp32", "peak RSS MiB", "RSS added by the model MiB", "note"]
    rows = []
    for name, records in reports.bench:
        engines = _engines(records)
        anchor = engines.get("original", {}).get("decode_tokens_per_s")
        for engine, r in engines.items():
            rows.append(
                [
                    name, engine, r["format"], fmt(_mib(r.get("model_bytes")), ",.1f"),
                    fmt(_mib(r.get("kernel_bytes")), ",.1f"), fmt(r.get("prefill_tokens_per_s"), ".0f"),
                    fmt(r.get("decode_tokens_per_s"), ".1f"),
                    _ratio(r.get("decode_tokens_per_s"), anchor), fmt(_mib(r.get("peak_rss_bytes")), ",.0f"),
                    fmt(_mib(_added_rss(r)), ",.0f"), (r.get("note") or "").replace("|", "/")[:90],
                ]
            )  # fmt: skip
    return markdown_grid(header, rows) + "\n\n" + _bench_made_by(reports.bench)


def gemv_section(reports: Reports) -> str:
    """Per checkpoint and linear shape, binq's GEMV beside the same shape in torch fp32 (M = 1)."""
    if not reports.bench:
        return _no_bench()
    header = ["checkpoint", "out x in", "layers", "binq kernel", "binq µs", "fp32 µs", "speed-up"]
    rows = []
    for name, records in reports.bench:
        engines = _engines(records)
        if "binq" not in engines or "original" not in engines:
            continue
        fp32 = {tuple(g["shape"]): g["median_us"] for g in engines["original"]["gemv"]}
        for g in engines["binq"]["gemv"]:
            shape = tuple(g["shape"])
            rows.append(
                [
                    name, f"{shape[0]}x{shape[1]}", str(g["count"]), g["kernel"], f"{g['median_us']:.0f}",
                    fmt(fp32.get(shape), ".0f"), _ratio(fp32.get(shape), g["median_us"]),
                ]
            )  # fmt: skip
    return markdown_grid(header, rows) + "\n\n" + _bench_made_by(reports.bench)


def gemv_7b_section(reports: Reports) -> str:
    """``binq bench --gemv``: every layout on 7B-shaped matrices."""
    found = [(name, r) for name, records in reports.bench for r in records if r.get("kind") == "gemv-microbenchmark"]
    if not found:
        return "No committed bench file has the `--gemv` micro-benchmark yet."
    header = ["out x in", "form", "path", "bits/weight", "µs", "x vs torch fp32", "x vs torch bf16"]
    rows = [
        [
            f"{r['shape'][0]}x{r['shape'][1]}", r["form"], r["kernel"], fmt(r.get("storage_bits"), ".3f"),
            f"{r['median_us']:.0f}", fmt(r.get("speedup_vs_fp32"), ".2f"), fmt(r.get("speedup_vs_bf16"), ".2f"),
        ]
        for _, record in found
        for r in record.get("results", [])
    ]  # fmt: skip
    files = [(name, records) for name, records in reports.bench if any(name == n for n, _ in found)]
    return markdown_grid(header, rows) + "\n\n" + _bench_made_by(files)


def readme_speed_section(reports: Reports) -> str:
    """One row per checkpoint: binq's decode beside torch fp32 and llama.cpp's fastest, same threads."""
    if not reports.bench:
        return _no_bench()
    header = ["checkpoint", "decode tok/s", "vs torch fp32", "vs fastest llama.cpp", "weights in memory MiB"]
    header += ["RSS added by the model MiB", "checkpoint file MiB"]
    rows = []
    for name, records in reports.bench:
        engines = _engines(records)
        binq = engines.get("binq")
        if binq is None or binq.get("decode_tokens_per_s") is None:
            continue
        llama = [r for n, r in engines.items() if n.startswith("llamacpp") and r.get("decode_tokens_per_s")]
        fastest = max(llama, key=lambda r: r["decode_tokens_per_s"]) if llama else None
        versus_llama = "-"
        if fastest is not None:
            versus_llama = (
                f"{_ratio(binq['decode_tokens_per_s'], fastest['decode_tokens_per_s'])} ({fastest['format']})"
            )
        rows.append(
            [
                name, f"{binq['decode_tokens_per_s']:.1f}",
                _ratio(binq["decode_tokens_per_s"], engines.get("original", {}).get("decode_tokens_per_s")),
                versus_llama, fmt(_mib(binq.get("model_bytes")), ",.1f"), fmt(_mib(_added_rss(binq)), ",.0f"),
                fmt(_mib(binq.get("file_bytes")), ",.1f"),
            ]
        )  # fmt: skip
    return markdown_grid(header, rows) + "\n\n" + _bench_made_by(reports.bench)


# ---------------------------------------------------------------------------------------------------------
# The sections and the docs they live in

GPTQ_ROWS = ("gptq 1-bit g128", "gptq 2-bit g128", "gptq 3-bit g128", "gptq 4-bit g128")
QUALITY_ROWS = ("rtn 1-bit", *GPTQ_ROWS, "billm")
CLIP_ROWS = ("gptq 3-bit g128", "gptq 3-bit g128 clip")
README_ARB_ROWS = ("rtn 1-bit g128", "arb-group g128", "arb-llm-rc", "arb-llm-x", "arb-llm-x intra")
ARB_ROWS = (
    "rtn 1-bit g128", "arb-group g128", "arb", "arb-x", "arb-llm-x", "arb-llm-x intra", "arb-rc", "arb-llm-rc",
)  # fmt: skip
ARB_ORDER_ROWS = ("billm", "arb", "arb-rc", "arb-x", "arb-llm-rc", "arb-llm-x")
MSB_ROWS = (
    "gptq 2-bit g128", "gptq 3-bit g128", "gptq 4-bit g128", "msb g2", "msb g4", "msb g4 lo", "msb g8", "msb g8 lo",
    "msb g16", "msb g16 lo", "msb g32", "msb g32 lo", "msb block g4", "msb-hessian g8",
)  # fmt: skip
ALLOCATION_ROWS = ("arb-group g128", "w11", "arb-rc", *GPTQ_ROWS[1:], "target 2.5 bits", "target 3.78 bits gptq")
W11_ROWS = (
    "gptq 2-bit g128", "billm", "arb-llm-rc", "w11", "w11 a4", "w11 obs", "w11 obs init median",
    "w11 obs init salience", "w11 obs offsets", "w11 obs no em", "w11 importance review", "w11 obs a4",
    "w11 obs a4 smooth", "w11 obs a4 token", "w11 obs a4 sym", "w11 obs a4 noclip", "gptq 2-bit g128 a4",
    "w16 a4", "w16 a4 smooth",
)  # fmt: skip
ZEROSHOT_ROWS = (
    ORIGINAL, "gptq 4-bit g128", "gptq 3-bit g128", "gptq 2-bit g128", "msb g32 lo", "w11", "arb-llm-x", "billm",
    "arb-group g128", "rtn 1-bit",
)  # fmt: skip
SIZE_ROWS = (
    *QUALITY_ROWS, "rtn 1-bit g128", "arb-group g128", "arb-llm-rc", "arb-llm-x", "w11", "msb g32", "msb g32 lo",
)  # fmt: skip


@dataclass(frozen=True)
class Section:
    """One generated section: the doc it lives in, its marker name, what renders it and which runs it shows."""

    doc: str
    name: str
    render: Callable[[Reports], str]
    labels: tuple[str, ...] = ()  # the catalogue runs of its rows (quality.py runs them by section name)


def _no_scale() -> str:
    return f"No scale result is committed yet (`{SCALE_DIR.as_posix()}`; `benchmarks/scale.py` makes them)."


def _scale_made_by(rows: Sequence[Report]) -> str:
    machine = rows[0]["machine"]
    dates = sorted({r["created"][:10] for r in rows})
    return (
        f"Generated by `{COMMAND}` from `{SCALE_DIR.as_posix()}/*.json`, written by `benchmarks/scale.py run` (each "
        f"row's command above, run with OMP_NUM_THREADS as the threads column says). {machine['processor']} CPU, "
        f"{machine['platform']}; {', '.join(dates)}."
    )


def scale_memory_section(reports: Reports) -> str:
    """Each ``benchmarks/scale.py run`` lane: peak resident memory, time and PPL, streamed or whole."""
    rows = sorted(
        (r for r in reports.scale if r.get("kind") == "scale"), key=lambda r: (r["model"]["hidden"], r["name"])
    )
    if not rows:
        return _no_scale()
    header = [
        "model",
        "blocks",
        "parameters",
        "method",
        "model held",
        "peak RSS MiB (sampled)",
        "peak RSS MiB (report)",
    ]
    header += ["quantize s", "eval s", "wall s", "threads", "PPL (original)", "linear storage bits", "measured"]
    body = []
    for r in rows:
        ppl = "; ".join(f"{k} {fmt_ppl(v['quantized'])} ({fmt_ppl(v['original'])})" for k, v in r["ppl"].items())
        body.append([
            r["model"]["name"], str(r["model"]["layers"]), f"{r['model']['parameters'] / 1e9:.2f} B",
            r["method"] + (f" {r['bits']}-bit" if r.get("bits") else ""),
            "one block at a time" if r["streamed"] else "whole", fmt(_mib(r["peak_rss_sampled_bytes"]), ",.0f"),
            fmt(_mib(r["peak_memory_bytes"]), ",.0f"), *_scale_times(r), str(r["threads"]), ppl,
            fmt(r["storage_bits"]["linear"], ".3f"), _measured(r, r),
        ])  # fmt: skip
    lines = [markdown_grid(header, body), ""]
    beside = [r for r in rows if r.get("beside")]
    if beside:
        lines += [
            "Times are left out (-) for the lanes that ran beside another to finish in one session: "
            + "; ".join(f"{r['name']}: {r['beside']}" for r in beside) + ". Their memory is their own.", "",
        ]  # fmt: skip
    lines += _scale_comparisons(rows)
    lines += ["Commands:", ""] + [f"- {r['name']}: {_cmd(r['command'])}" for r in rows] + ["", _scale_made_by(rows)]
    return "\n".join(lines)


def _scale_times(r: Report) -> list[str]:
    """Quantize, eval and wall seconds; a dash each for a lane that ran beside another (its times mean nothing)."""
    if r.get("beside"):
        return ["-", "-", "-"]
    return [fmt(r["time_s"]["quantize"], ",.0f"), fmt(r["time_s"]["eval"], ",.0f"), fmt(r["wall_s"], ",.0f")]


def _scale_comparisons(rows: Sequence[Report]) -> list[str]:
    """Whole against streamed on one model, and 16 against 32 blocks of one width, per method."""
    notes = []
    by_key = {(r["model"]["name"], r["method"], r.get("bits"), r["streamed"]): r for r in rows}
    for (name, method, bits, streamed), r in by_key.items():
        whole = by_key.get((name, method, bits, False))
        if streamed and whole is not None:
            ratio = whole["peak_rss_sampled_bytes"] / r["peak_rss_sampled_bytes"]
            same = "the same PPL" if whole["ppl"] == r["ppl"] else "a different PPL (a bug)"
            notes.append(
                f"- {name}, {method}: the whole model peaks at {ratio:.2f}x the streamed run's memory, {same}."
            )
    streamed_rows = [r for r in rows if r["streamed"]]
    for r in streamed_rows:
        for other in streamed_rows:
            same_width = (other["model"]["hidden"], other["model"]["ffn"]) == (r["model"]["hidden"], r["model"]["ffn"])
            same_method = (other["method"], other.get("bits")) == (r["method"], r.get("bits"))
            if same_method and same_width and other["model"]["layers"] * 2 == r["model"]["layers"]:
                change = r["peak_rss_sampled_bytes"] / other["peak_rss_sampled_bytes"] - 1
                notes.append(
                    f"- {r['method']}: {r['model']['layers']} blocks peak {change:+.1%} against "
                    f"{other['model']['layers']} blocks of the same width."
                )
    return [*notes, ""] if notes else []


def _measured(lane: Report, file: Report) -> str:
    """When a lane ran (UTC) and on which binq commit."""
    when = lane.get("created", file["created"])[:16].replace("T", " ")
    return when + (f" ({lane['binq_commit']})" if lane.get("binq_commit") else "")


def scale_nproc_section(reports: Reports) -> str:
    """``benchmarks/scale.py nproc``: the quantization stage in one and two processes."""
    files = [r for r in reports.scale if r.get("kind") == "scale-nproc"]
    if not files:
        return _no_scale()
    lines = []
    for f in files:
        anchors = {lane["lane"]: lane["quantize_s"] for lane in f["lanes"]}
        one, two_threads = anchors.get("1 process, 1 thread"), anchors.get("1 process, 2 threads")
        header = ["lane", "quantize s", "vs 1 process, 1 thread", "vs 1 process, 2 threads", "wall s"]
        header += ["peak RSS MiB (all processes)", "PPL", "measured"]
        body = [
            [
                lane["lane"], fmt(lane["quantize_s"], ",.0f"), _ratio(lane["quantize_s"], one),
                _ratio(lane["quantize_s"], two_threads), fmt(lane["wall_s"], ",.0f"),
                fmt(_mib(lane["peak_rss_sampled_bytes"]), ",.0f"),
                "; ".join(f"{k} {fmt_ppl(v['quantized'])}" for k, v in lane["ppl"].items()),
                _measured(lane, f),
            ]
            for lane in f["lanes"]
        ]  # fmt: skip
        model = f["model"]
        lines += [
            f"{model['name']} ({model['layers']} blocks, {model['parameters'] / 1e9:.2f} B parameters), "
            f"{f['method']} {f.get('bits') or ''}-bit, the model held whole in every process:", "",
            markdown_grid(header, body), "", "Commands (OMP_NUM_THREADS as the lane says):", "",
        ]  # fmt: skip
        lines += [f"- {lane['lane']}: {_cmd(lane['command'])}" for lane in f["lanes"]] + [""]
    lines.append(
        f"Generated by `{COMMAND}` from `{SCALE_DIR.as_posix()}/*.json`, written by `benchmarks/scale.py nproc`; "
        "one lane at a time."
    )
    return "\n".join(lines)


def allocation_section(reports: Reports, labels: Sequence[str]) -> str:
    """``--target-bits`` runs beside their candidates run alone, then each run's choice per kind of linear
    (how many of the blocks' linears of that kind got each candidate)."""
    lines = [quality_section(reports, labels), ""]
    for report in [reports.quick[label] for label in labels if label in reports.quick]:
        allocation = report.get("allocation")
        if not allocation:
            continue
        used = [spec for spec, row in allocation["summary"].items() if row["linears"]]
        kinds: dict[str, dict[str, int]] = {}
        for row in allocation["linears"]:
            kind = row["name"].rsplit(".", 2)[-2] + "." + row["name"].rsplit(".", 1)[-1]
            kinds.setdefault(kind, dict.fromkeys(used, 0))[row["candidate"]] += 1
        share = {spec: allocation["summary"][spec]["weights"] / allocation["weights"] for spec in used}
        bits = {spec: allocation["summary"][spec]["storage_bits_total"] / allocation["summary"][spec]["weights"]
                for spec in used}  # fmt: skip
        rows = [[kind, *(str(counts[spec]) for spec in used)] for kind, counts in kinds.items()]
        rows.append(["share of the weights", *(f"{share[spec]:.1%}" for spec in used)])
        rows.append(["storage bits", *(f"{bits[spec]:.3f}" for spec in used)])
        lines += [
            f"{report['label']}: the linears of each kind (one per block) by the candidate chosen; "
            f"{allocation['storage_bits']:.4f} stored bits per linear weight for a target of "
            f"{allocation['target_bits']:g} (sensitivity `{allocation['sensitivity']}`).",
            "",
            markdown_grid(["linear", *(f"`{spec}`" for spec in used)], rows),
            "",
        ]
    return "\n".join(lines).rstrip()


# ---------------------------------------------------------------------------------------------------------
# llama.cpp's own quantizer on the same source (benchmarks/llamacpp_frontier.py)


def _no_llamacpp() -> str:
    return (
        f"No llama.cpp report is committed yet (`{LLAMACPP_DIR.as_posix()}`; "
        "`benchmarks/llamacpp_frontier.py` makes them)."
    )


def _type_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _llamacpp_rows(reports: Reports) -> tuple[Report | None, list[Report], list[Report]]:
    """The unquantized source's report, the types made (by bits per linear weight) and those refused."""
    source = next((r for r in reports.llamacpp if r["made"] and "ppl_binq_original" in r), None)
    made = sorted(
        (r for r in reports.llamacpp if r["made"] and r is not source), key=lambda r: r["storage"]["bits_linear"]
    )
    refused = [r for r in reports.llamacpp if not r["made"]]
    return source, made, refused


def llamacpp_section(reports: Reports) -> str:
    """llama.cpp's types of binq's source model: real tensor types, stored bits, PPL on binq's token ids."""
    source, made, refused = _llamacpp_rows(reports)
    if source is None:
        return _no_llamacpp()
    sets = list(source["ppl"])
    header = ["type", "block linears by ggml type", "bits per linear weight", "bits whole file", "file MiB"]
    header += [*(f"PPL {s}" for s in sets), "importance matrix"]
    body = []
    for r in [source, *made]:
        storage = r["storage"]
        body.append([
            r["type"] + (" (source)" if r is source else ""), _type_counts(storage["linear_types"]),
            f"{storage['bits_linear']:.3f}", f"{storage['bits_file']:.3f}", f"{storage['file_bytes'] / MIB:.1f}",
            *(fmt_ppl(r["ppl"][s]) for s in sets), "yes" if r.get("imatrix") else "no",
        ])  # fmt: skip
    lines = [markdown_grid(header, body), ""]
    ours = source["ppl_binq_original"]
    lines += [
        "Sanity row: binq's own PPL of the same original model on the same windows is "
        + ", ".join(f"{fmt_ppl(ours[s])} on {s}" for s in sets)
        + "; llama.cpp on the F16 source differs by "
        + ", ".join(f"{source['ppl_relative_difference'][s]:+.1e} (relative) on {s}" for s in sets)
        + "; the largest logit difference on the first window is "
        + ", ".join(f"{source['max_abs_logit_difference_window0'][s]:.3f} on {s}" for s in sets)
        + ".",
        "",
    ]
    if refused:
        lines += ["Not made (llama.cpp refused; no numbers):", ""]
        lines += [f"- {r['type']}: {r['reason']}" for r in refused] + [""]
    imatrix = next((r["imatrix"] for r in made if r.get("imatrix")), None)
    if imatrix:
        calibration = imatrix["calibration"]
        lines += [
            f"Importance matrix (the IQ types): {imatrix['values']}; {calibration['nsamples']} x "
            f"{calibration['seqlen']} tokens of `{calibration['source']}`, seed {calibration['seed']} (binq's "
            "calibration windows).",
            "",
        ]
    protocol = "; ".join(
        f"`{name}` first {p['windows']} of {p['windows_available']} windows of {p['seqlen']} tokens"
        for name, p in source["protocol"].items()
    )
    versions = ", ".join(f"{k} {v}" for k, v in source["versions"].items())
    files = ", ".join(f"`{r['variant']}.json`" for r in [source, *made, *refused])
    lines += [
        f"Command: {_cmd(source['command'])}. Protocol: {protocol}; binq's token ids fed to llama.cpp as ids. "
        f"Generated by `{COMMAND}` from {files} in `{LLAMACPP_DIR.as_posix()}`; made {source['created'][:10]} "
        f"(UTC) with {versions}; {source['machine']['platform']}, {source['machine']['llama_cpp_threads']} "
        "llama.cpp thread(s).",
    ]
    return "\n".join(lines)


def _log_ppl(ppl: dict[str, float], sets: Sequence[str]) -> float:
    """Mean log-PPL over ``sets`` (the mean NLL per token, each text weighted alike)."""
    return sum(math.log(ppl[s]) for s in sets) / len(sets)


def versus_rows(
    binq_points: Sequence[tuple[str, float, dict[str, float]]],
    llama_points: Sequence[tuple[str, float, dict[str, float]]],
    sets: Sequence[str],
    low: float,
    high: float,
) -> list[tuple[float, tuple | None, tuple | None, str]]:
    """At each budget in ``[low, high]`` where either side's best changes, each side's best point with at
    most that many bits (lowest mean log-PPL over ``sets``) and which is better on every set.

    A point is ``(label, bits, {set: ppl})``; the budgets are the points' own bits, and a budget at which
    neither side's best changes (a point that beats nothing cheaper on its side) gives no row. The verdict
    is the side whose point has the lower PPL on every set, ``split`` when each wins one, or the only side
    with a point at that budget.
    """
    budgets = sorted({bits for _, bits, _ in [*binq_points, *llama_points] if low <= bits <= high})
    rows = []
    for budget in budgets:
        best = []
        for points in (binq_points, llama_points):
            within = [p for p in points if p[1] <= budget]
            best.append(min(within, key=lambda p: (_log_ppl(p[2], sets), p[1])) if within else None)
        ours, theirs = best
        if rows and (rows[-1][1], rows[-1][2]) == (ours, theirs):
            continue
        if ours is None or theirs is None:
            verdict = "binq (no llama.cpp type)" if theirs is None else "llama.cpp (no binq run)"
        elif all(ours[2][s] < theirs[2][s] for s in sets):
            verdict = "binq"
        elif all(theirs[2][s] < ours[2][s] for s in sets):
            verdict = "llama.cpp"
        else:
            verdict = "split"
        rows.append((budget, ours, theirs, verdict))
    return rows


def versus_section(reports: Reports) -> str:
    """binq's best committed weight-only run against llama.cpp's best type at each storage budget."""
    _, made, _ = _llamacpp_rows(reports)
    runs = [r for label, r in reports.quick.items() if _weight_only(CATALOGUE[label])]
    if not made or not runs:
        return _no_llamacpp() if not made else "\n".join(_no_rows())
    sets = [s for s in made[0]["ppl"] if all(s in r["eval"] for r in runs)]
    binq_points = [(r["label"], r["storage_bits"]["linear"], {s: r["eval"][s]["ppl"] for s in sets}) for r in runs]
    llama_points = [(r["type"], r["storage"]["bits_linear"], r["ppl"]) for r in made]
    low, high = VERSUS_BITS
    header = ["budget (bits per linear weight)", "binq's best run", *(f"binq PPL {s}" for s in sets)]
    header += ["llama.cpp's best type", *(f"llama.cpp PPL {s}" for s in sets), "better"]

    def cells(point: tuple | None) -> list[str]:
        if point is None:
            return ["-", *("-" for _ in sets)]
        return [f"{point[0]} ({point[1]:.3f})", *(fmt_ppl(point[2][s]) for s in sets)]

    rows = versus_rows(binq_points, llama_points, sets, low, high)
    body = [[f"{budget:.3f}", *cells(ours), *cells(theirs), verdict] for budget, ours, theirs, verdict in rows]
    cheapest = min(llama_points, key=lambda p: p[1])
    low_budget = [p for p in binq_points if p[1] <= 2.5]
    best_low = min(low_budget, key=lambda p: p[2][sets[0]]) if low_budget else None
    lines = [
        markdown_grid(header, body),
        "",
        f"Every storage budget from {low} to {high} bits per linear weight at which a committed binq run "
        "(weight-only, the quick protocol) or a llama.cpp type lands and one side's best changes; each side's best "
        "is its lowest mean log-PPL of the texts among its points with at most that many bits (in brackets: the "
        "point's own bits). "
        f"`better`: the side with the lower PPL on every text (`split`: each wins one). llama.cpp's fewest bits "
        f"on this model: {cheapest[0]} at {cheapest[1]:.3f}.",
        "",
    ]
    if best_low is not None:
        lines += [
            f"At 2.5 bits or less, binq's lowest {sets[0]} PPL is {fmt_ppl(best_low[2][sets[0]])} "
            f"({best_low[0]}, {best_low[1]:.3f} bits).",
            "",
        ]
    lines.append(
        f"Generated by `{COMMAND}` from `{QUICK_DIR.as_posix()}` (the binq runs; their commands are in the "
        f"tables above) and `{LLAMACPP_DIR.as_posix()}` (llama.cpp's types; command in its table)."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Zero-shot accuracy (binq eval --tasks) and llama.cpp agreement (benchmarks/llamacpp.py)


def _share_cell(task: Report, metric: str) -> str:
    stderr = task.get(f"{metric}_stderr")
    return f"{task[metric]:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")


def _zeroshot_columns(report: Report) -> list[tuple[str, str]]:
    """(task, metric) of each accuracy column: ``acc`` of every task, ``acc_norm`` where the task has it."""
    return [(name, m) for name, task in report["tasks"].items() for m in ("acc", "acc_norm") if m in task]


def _items_text(report: Report) -> str:
    return "; ".join(
        f"`{name}` the first {t['items']} of {t['items_total']} items (sha256 `{t['items_sha256']}`)"
        for name, t in report["tasks"].items()
    )


def _zeroshot_items_key(report: Report) -> tuple:
    return tuple((name, t["items"], t["items_sha256"]) for name, t in report["tasks"].items())


def zeroshot_section(reports: Reports, labels: Sequence[str]) -> str:
    """Accuracy ± standard error on binq's offline zero-shot tasks, per checkpoint, with the stored bits."""
    present = [reports.zeroshot[label] for label in labels if label in reports.zeroshot]
    missing = [label for label in labels if label not in reports.zeroshot]
    lines = [] if present else _no_rows()
    if present:
        columns = _zeroshot_columns(present[0])
        header = ["model", "storage bits linear", *(f"{task} {metric}" for task, metric in columns)]
        if "lastword" in present[0]["tasks"]:
            header.append("lastword word log-lik")
        rows = []
        for r in present:
            label = r["label"]
            bits = "16" if label == ORIGINAL else "-"
            if label in reports.quick:
                bits = f"{reports.quick[label]['storage_bits']['linear']:.3f}"
            row = [label if label == ORIGINAL else _named_label(label), bits]
            row += [_share_cell(r["tasks"][task], metric) if task in r["tasks"] else "-" for task, metric in columns]
            if "lastword" in present[0]["tasks"]:
                row.append(fmt(r["tasks"].get("lastword", {}).get("target_loglik_mean"), ".3f"))
            rows.append(row)
        lines += [markdown_grid(header, rows), ""]
        lines += ["Items: " + "; ".join(_grouped(present, _zeroshot_items_key, _items_text)) + ".", ""]
    if missing:
        lines += ["Not rerun in this environment (no committed report; left out of the table):", ""]
        for label in missing:
            model = zeroshot_model(label, MODEL, CATALOGUE_OUT)
            lines.append(f"- {label}: {_cmd(zeroshot_command(label, model, 'cpu', ZEROSHOT_OUT))}")
        lines.append("")
    if present:
        lines += ["Commands, one per row (each report's `command`; then the command that made its checkpoint):", ""]
        for r in present:
            made_by = r["collected"].get("checkpoint_command")
            lines.append(
                f"- {r['label']}: {_cmd(r['command'])}" + (f"; checkpoint: {_cmd(made_by)}" if made_by else "")
            )
        files = ", ".join(f"`{(ZEROSHOT_DIR / (slug(r['label']) + '.json')).as_posix()}`" for r in present)
        seconds = [r["time_s"]["eval"] for r in present]
        lines += [
            "",
            f"Generated by `{COMMAND}` from the committed reports {files}; made {_dates(present)} (UTC) with "
            + "; ".join(_grouped(present, _environment_key, _environment))
            + f". Each row's evaluation took {min(seconds):.0f}-{max(seconds):.0f} s on a CPU shared with other "
            "work (times not comparable).",
        ]
    return "\n".join(lines)


def _named_label(label: str) -> str:
    description = CATALOGUE[label].description
    return f"{label} ({description})" if description else label


def _agreement_name(record: Report) -> str:
    command = record.get("checkpoint_command")
    if not command:
        return "original (source GGUF as F16)"
    return _option_of(command, "--label") or Path(record["checkpoint"]).name


def _option_of(command: Sequence[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command[:-1] else None


def agreement_section(reports: Reports) -> str:
    """binq against llama.cpp on the same GGUF bits and token ids: PPL, logits, argmax, greedy continuation."""
    if not reports.agreement:
        return f"No llama.cpp result is committed yet (`{AGREEMENT_DIR.as_posix()}`; `benchmarks/llamacpp.py --out`)."
    records = sorted(reports.agreement, key=lambda item: (item[1].get("checkpoint_command") is not None, item[0]))
    header = ["checkpoint", "GGUF (2-D tensors)", "binq PPL", "llama.cpp PPL", "PPL difference"]
    header += ["max abs logit difference (of largest abs logit)", "mean abs logit difference", "argmax agreement"]
    header += ["greedy tokens identical"]
    rows = []
    for _, r in records:
        types = ", ".join(
            f"{count} {name}" for name, count in sorted(r["gguf_tensor_types"].items(), key=lambda t: -t[1])
        )
        largest = r["max_abs_logit_difference"] / r["largest_abs_logit_binq"]
        rows.append(
            [
                _agreement_name(r), f"{r['gguf_bytes'] / MIB:.1f} MiB: {types}", fmt_ppl(r["ppl_binq"]),
                fmt_ppl(r["ppl_llama_cpp"]), f"{r['ppl_llama_cpp'] / r['ppl_binq'] - 1:+.3%}",
                f"{r['max_abs_logit_difference']:.3f} ({largest:.1%})", f"{r['mean_abs_logit_difference']:.4f}",
                f"{r['argmax_agreement']:.1%} of {r['argmax_positions']}",
                f"{r['greedy_identical_tokens']} of {r['greedy_tokens']}",
            ]
        )  # fmt: skip
    lines = [markdown_grid(header, rows), ""]
    protocols = sorted(
        {f"{r['protocol']}; greedy: {r['greedy_tokens']} tokens after {r['prompt']!r}" for _, r in records}
    )
    lines += ["Protocol: " + "; ".join(protocols) + ".", "", "Commands, one per row (then the checkpoint's):", ""]
    for _, r in records:
        made_by = r.get("checkpoint_command")
        lines.append(
            f"- {_agreement_name(r)}: {_cmd(r['command'])}" + (f"; checkpoint: {_cmd(made_by)}" if made_by else "")
        )
    first = records[0][1]
    files = ", ".join(f"`{(AGREEMENT_DIR / (name + '.json')).as_posix()}`" for name, _ in records)
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
    threads = sorted({r["threads"] for _, r in records})
    lines += [
        "",
        f"Generated by `{COMMAND}` from the committed results {files}; made "
        f"{', '.join(sorted({r['created'][:10] for _, r in records}))} (UTC) with {versions}; "
        f"{first['machine'].get('platform', '?')}, llama.cpp threads: {'/'.join(map(str, threads))}.",
    ]
    return "\n".join(lines)


def _quality(labels: tuple[str, ...]) -> Callable[[Reports], str]:
    return lambda reports: quality_section(reports, labels)


def _compact(labels: tuple[str, ...]) -> Callable[[Reports], str]:
    return lambda reports: compact_section(reports, labels)


_WEIGHT_ONLY = tuple(label for label, run in CATALOGUE.items() if _weight_only(run))
_SEED_ROWS = tuple(label for group in seed_groups().values() for label in group)

SECTIONS: tuple[Section, ...] = (
    Section("README.md", "results", _quality(DEMO_DEFAULT), DEMO_DEFAULT),
    Section("README.md", "results-arb", _quality(README_ARB_ROWS), README_ARB_ROWS),
    Section("README.md", "results-frontier", lambda r: frontier_section(r, only_frontier=True), _WEIGHT_ONLY),
    Section("README.md", "inference-speed", readme_speed_section),
    Section("docs/BENCHMARKS.md", "quality", _quality(QUALITY_ROWS), QUALITY_ROWS),
    Section("docs/BENCHMARKS.md", "gptq-clip", _quality(CLIP_ROWS), CLIP_ROWS),
    Section("docs/TUNE.md", "tune-quality", lambda r: tune_section(r, TUNE_PAIRS), TUNE_ROWS),
    Section("docs/TUNE.md", "tune-seeds", lambda r: seeds_section(r, SEED_PAIRS), _SEED_ROWS),
    Section("docs/TUNE.md", "tune-loss", lambda r: tune_section(r, LOSS_PAIRS), LOSS_ROWS),
    Section("docs/BENCHMARKS.md", "arb-quality", _quality(ARB_ROWS), ARB_ROWS),
    Section("docs/BENCHMARKS.md", "arb-order", _compact(ARB_ORDER_ROWS), ARB_ORDER_ROWS),
    Section("docs/BENCHMARKS.md", "msb-quality", _quality(MSB_ROWS), MSB_ROWS),
    Section("docs/BENCHMARKS.md", "bits-frontier", frontier_section, _WEIGHT_ONLY),
    Section("docs/BENCHMARKS.md", "llamacpp-frontier", llamacpp_section),
    Section("docs/BENCHMARKS.md", "llamacpp-versus", versus_section, _WEIGHT_ONLY),
    Section("README.md", "llamacpp-versus", versus_section, _WEIGHT_ONLY),
    Section("docs/BENCHMARKS.md", "inference-decode", decode_section),
    Section("docs/BENCHMARKS.md", "inference-gemv", gemv_section),
    Section("docs/BENCHMARKS.md", "inference-gemv-7b", gemv_7b_section),
    Section(
        "docs/ALLOCATION.md", "allocation-quality", lambda r: allocation_section(r, ALLOCATION_ROWS), ALLOCATION_ROWS
    ),
    Section("docs/W11.md", "w11-quality", lambda r: w11_section(r, W11_ROWS), W11_ROWS),
    Section("docs/MSB.md", "msb-summary", _compact(MSB_ROWS), MSB_ROWS),
    Section("docs/FORMAT.md", "format-sizes", lambda r: sizes_section(r, SIZE_ROWS), SIZE_ROWS),
    Section("docs/MEMORY.md", "scale-memory", scale_memory_section),
    Section("docs/MEMORY.md", "scale-nproc", scale_nproc_section),
    Section("docs/BENCHMARKS.md", "scale-memory", scale_memory_section),
    Section("docs/BENCHMARKS.md", "scale-nproc", scale_nproc_section),
    # The zero-shot rows are `binq eval` of these runs' checkpoints (and of the source model, `original`).
    Section("docs/BENCHMARKS.md", "zeroshot", lambda r: zeroshot_section(r, ZEROSHOT_ROWS), ZEROSHOT_ROWS[1:]),
    Section("docs/BENCHMARKS.md", "llamacpp-agreement", agreement_section),
    Section("docs/FORMAT.md", "llamacpp-agreement", agreement_section),
)


def get_section(name: str) -> Section:
    for section in SECTIONS:
        if section.name == name:
            return section
    raise KeyError(f"unknown section {name!r} (sections: {', '.join(s.name for s in SECTIONS)})")


def section_body(text: str, name: str) -> str | None:
    """The text between a section's markers (as ``write_section`` wrote it), or None without the markers."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    if begin not in text:
        return None
    rest = text.split(begin, 1)[1]
    if end not in rest:
        return None
    return rest.split(end, 1)[0].removeprefix("\n").removesuffix("\n")


def render_all(root: Path) -> dict[tuple[str, str], str]:
    """Every section's body, rendered from the reports committed under ``root``, by (doc, name)."""
    reports = load_reports(root)
    return {(s.doc, s.name): s.render(reports).rstrip() for s in SECTIONS}


def stale_sections(root: Path) -> list[str]:
    """``doc#name`` of every section whose committed text differs from its rendering (or has no markers)."""
    stale = []
    for (doc, name), body in render_all(root).items():
        path = root / doc
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        if section_body(text, name) != body:
            stale.append(f"{doc}#{name}")
    return stale


def regenerate(root: Path) -> list[str]:
    """Rewrite every section from the committed reports; the ``doc#name`` of those that changed."""
    changed = stale_sections(root)
    for (doc, name), body in render_all(root).items():
        write_section(root / doc, name, body)
    return changed
