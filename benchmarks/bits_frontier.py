"""Quality against storage bits: every finished run of one protocol in one table, sorted by storage bits.

    python benchmarks/bits_frontier.py                      # runs/benchmark and runs/w11, quick protocol
    python benchmarks/bits_frontier.py --runs runs/benchmark --doc docs/BENCHMARKS.md

Reads every ``report.json`` under ``--runs`` (made by ``binq quantize --out``), keeps the runs of the
protocol of the first one found (calibration windows, window length, evaluation windows) and the
weight-only ones (simulated activations are another axis), and marks a run *on the frontier* when no
other run stores at most as many bits with a lower mean KL. Writes the ``bits-frontier`` section of
the doc.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from binq.report import markdown_grid, read_report, write_section


def protocol_of(report: dict) -> tuple:
    calibration = report["calibration"]
    windows = tuple((name, e["protocol"]["windows"], e["protocol"]["seqlen"]) for name, e in report["eval"].items())
    return calibration["nsamples"], calibration["seqlen"], windows


def mean_kl(report: dict) -> float:
    values = [e["kl"] for e in report["eval"].values()]
    return sum(values) / len(values)


def frontier(reports: list[dict]) -> list[bool]:
    """True where no other run has storage bits <= this one's and a lower mean KL."""
    bits = [r["storage_bits"]["linear"] for r in reports]
    kl = [mean_kl(r) for r in reports]
    return [
        not any(bits[j] <= bits[i] and kl[j] < kl[i] for j in range(len(reports)) if j != i)
        for i in range(len(reports))
    ]


def _ppl(value: float) -> str:
    return f"{value:.3g}" if value >= 1e4 else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["runs/benchmark", "runs/w11"])
    parser.add_argument("--doc", default="docs/BENCHMARKS.md")
    parser.add_argument("--section", default="bits-frontier")
    args = parser.parse_args()
    files = sorted(f for folder in args.runs for f in Path(folder).glob("*/report.json"))
    reports = [read_report(f) for f in files]
    reports = [r for r in reports if "activations" not in r]
    if not reports:
        parser.error(f"no weight-only report.json under {', '.join(args.runs)}")
    protocol = protocol_of(reports[0])
    skipped = [r["label"] for r in reports if protocol_of(r) != protocol]
    reports = sorted((r for r in reports if protocol_of(r) == protocol), key=lambda r: r["storage_bits"]["linear"])
    on_frontier = frontier(reports)
    sets = list(reports[0]["eval"])
    header = ["method", "storage bits linear", "compute bits", *(f"PPL {s}" for s in sets), "mean KL", "frontier"]
    original = reports[0]["eval"]
    rows = [["original", "16", "16", *(_ppl(original[s]["ppl_original"]) for s in sets), "0", ""]]
    for report, best in zip(reports, on_frontier, strict=True):
        cells = [
            f"**{report['label']}**" if best else report["label"],
            f"{report['storage_bits']['linear']:.3f}",
            f"{report['compute_bits']:.3f}",
            *(_ppl(report["eval"][s]["ppl"]) for s in sets),
            f"{mean_kl(report):.3f}",
            "yes" if best else "",
        ]
        rows.append(cells)
    nsamples, seqlen, windows = protocol
    text = [
        "## Quality against storage bits (every weight-only run, one protocol)",
        "",
        f"Made by `{shlex.join(['python', 'benchmarks/bits_frontier.py', *sys.argv[1:]])}` from the reports in "
        f"{', '.join(f'`{r}`' for r in args.runs)} (each made by the command listed in its section). Protocol: "
        f"{nsamples} x {seqlen} calibration tokens; evaluation "
        + ", ".join(f"`{name}` {count} windows of {length}" for name, count, length in windows)
        + ". Sorted by the storage bits of the linear layers; **bold** = on the frontier (no run stores at most "
        "as many bits with a lower mean KL over the two texts).",
        "",
        markdown_grid(header, rows),
        "",
        *([f"Left out (another protocol): {', '.join(skipped)}.", ""] if skipped else []),
    ]
    write_section(Path(args.doc), args.section, "\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
