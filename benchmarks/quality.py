"""Run catalogue runs (src/binq/runs.py) that have no report yet, each ``binq quantize`` in its own process.

    python benchmarks/quality.py                           # the rows of docs/BENCHMARKS.md's "quality" table
    python benchmarks/quality.py --section arb-quality     # the rows of any generated section (tables.py --list)
    python benchmarks/quality.py --rows 'arb,arb-x'        # named runs
    python benchmarks/quality.py --dry-run                 # print the commands only
    python benchmarks/quality.py --full --out runs/full    # GPTQ's protocol (no table reads these yet)

Each run writes ``OUT/<slug>/report.json`` and its checkpoint, its terminal output in ``OUT/<slug>.log``
(each in its own process, so its peak memory is its own). A run whose report exists and was made by the
same command is skipped (``binq eval`` rows, fp weights, write their report the same way). The
tables are not touched here; afterwards:

    python benchmarks/tables.py --collect runs/catalogue && python benchmarks/tables.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from binq.runs import CATALOGUE, run_command, same_run
from binq.tables import get_section


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="quality", help="run the rows of this generated section")
    parser.add_argument("--rows", default=None, help="comma-separated run labels (instead of --section)")
    parser.add_argument("--out", default="runs/catalogue", help="folder of the runs (OUT/<slug>/report.json)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="GPTQ's protocol (128 x 2048, all windows of 2048)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    try:
        labels = [s.strip() for s in args.rows.split(",")] if args.rows else list(get_section(args.section).labels)
    except KeyError as error:
        parser.error(str(error.args[0]))
    unknown = [label for label in labels if label not in CATALOGUE]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r} (runs: {', '.join(CATALOGUE)})")
    out = Path(args.out)
    for label in labels:
        run = CATALOGUE[label]
        command = run_command(label, args.model, args.device, args.full, out)
        report_file = out / run.slug / "report.json"
        if report_file.is_file() and same_run(json.loads(report_file.read_text())["command"], label):
            print(f"done already: {report_file}", flush=True)
            continue
        print(shlex.join(command), flush=True)
        if args.dry_run:
            continue
        out.mkdir(parents=True, exist_ok=True)
        with (out / f"{run.slug}.log").open("w") as log:
            quiet = ["--no-layer-table"] if run.quantizes else []  # binq eval prints no layer table
            child = [sys.executable, "-m", "binq.cli", *command[1:], *quiet, "--no-progress"]
            completed = subprocess.run(child, stdout=log, stderr=subprocess.STDOUT, check=False)
        if completed.returncode != 0:
            print(f"failed ({completed.returncode}): {label}; see {out / run.slug}.log", flush=True)
    print(f"next: python benchmarks/tables.py --collect {out} && python benchmarks/tables.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
