"""Quality benchmark on the embedded SmolLM2-135M: writes docs/BENCHMARKS.md.

    python benchmarks/quality.py            # quick protocol (32 x 512 calibration, 16 windows of 512)
    python benchmarks/quality.py --full     # GPTQ's protocol (128 x 2048, all windows of 2048)
    python benchmarks/quality.py --section arb --rows arb,arb-llm-x,...   # another table of the doc

Each row is one ``binq quantize`` run in its own process (so its peak memory is its own); the
Markdown table lists the command of every row. The table replaces the doc's section between
``<!-- begin SECTION -->`` and ``<!-- end SECTION -->`` (appended if the markers are missing), so
several tables, each with its own command, live in one doc.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path

from binq.commands import DEMO_RUNS, demo_command
from binq.report import extra_bit_line, machine, markdown_table, read_report, write_section

ROWS = ("rtn 1-bit", "gptq 1-bit g128", "gptq 2-bit g128", "gptq 3-bit g128", "gptq 4-bit g128", "billm")


def _same_run(report: dict, command: list[str]) -> bool:
    return [word for word in report["command"] if word != "--no-layer-table"] == command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--doc", default="docs/BENCHMARKS.md")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--section", default="quality", help="name of the doc section this table replaces")
    parser.add_argument("--title", default=None, help="heading of the section (default: model and protocol)")
    parser.add_argument(
        "--reuse", action="store_true", help="keep a row's existing report.json if it was made by the same command"
    )
    args = parser.parse_args()
    out = Path(args.out)
    reports, commands, reused = [], [], []
    for label in args.rows.split(","):
        if label not in DEMO_RUNS:
            parser.error(f"unknown row {label!r}")
        command = demo_command(label, args.model, args.device, args.full, out)
        report_file = out / label.replace(" ", "_") / "report.json"
        if args.reuse and report_file.is_file() and _same_run(read_report(report_file), command):
            print(f"reusing {report_file}", flush=True)
            reused.append(label)
            reports.append(read_report(report_file))
            commands.append(command)
            continue
        print(shlex.join(command), flush=True)
        subprocess.run(
            [sys.executable, "-m", "binq.cli", *command[1:], "--no-layer-table"], check=True, stdout=subprocess.DEVNULL
        )
        reports.append(read_report(out / label.replace(" ", "_") / "report.json"))
        commands.append(command)
    protocol = (
        "full (128 x 2048 calibration tokens, all windows of 2048)"
        if args.full
        else "quick (32 x 512 calibration tokens, first 16 windows of 512)"
    )
    first = reports[0]
    text = [
        f"## {args.title or f'Quality on {args.model}, {protocol}'}",
        "",
        f"Made by `{shlex.join(['python', 'benchmarks/quality.py', *sys.argv[1:]])}` on {date.today().isoformat()}; "
        f"machine: {machine()}; versions: {first['versions']}.",
        f"Calibration: {first['calibration']['nsamples']} windows of {first['calibration']['seqlen']} tokens "
        f"from `{first['calibration']['source']}`, seed {first['seed']}. Evaluation: "
        + "; ".join(
            f"`{k}` {v['protocol']['windows']} of {v['protocol']['windows_available']} windows of "
            f"{v['protocol']['seqlen']} tokens"
            for k, v in first["eval"].items()
        )
        + f". Evaluation dtype {first['model']['dtype']}. KL is KL(original || quantized) per token, in nats.",
        "",
        markdown_table(reports),
        "",
        *(
            ["Side bit figures of some layouts (not what is stored; the storage column is):", ""]
            + [f"- {r['label']}: {extra_bit_line(r['extra_bits'])}" for r in reports if r.get("extra_bits")]
            + [""]
            if any(r.get("extra_bits") for r in reports)
            else []
        ),
        *(
            [
                f"Reused rows (`--reuse`: reports already in `{out}`, each made by exactly the command listed "
                f"below, for example by `binq demo`): {', '.join(reused)}. The other rows ran in this invocation.",
                "",
            ]
            if reused
            else []
        ),
        "`quantize time` is the engine alone (input capture, Hessians, the method, block re-runs); "
        "each run's whole command (model loading and both evaluations included) took "
        f"{min(r['time_s']['total'] for r in reports):.0f}-{max(r['time_s']['total'] for r in reports):.0f} s.",
        "",
        *(
            []
            if args.full
            else [
                "This table uses the quick protocol. GPTQ's full protocol is `python benchmarks/quality.py --full`;",
                "it was not run for this table: on a 2-core CPU every row would take roughly an hour (two passes of",
                "128 x 2048 calibration tokens through every block, then about 100 evaluation windows of 2048 tokens",
                "for both the quantized and the original model). That is an estimate from the quick runs, not a",
                "measurement.",
                "",
            ]
        ),
        "Commands, one per row (each in its own process; `--no-layer-table` was added to keep the log short):",
        "",
        *[f"- {r['label']}: `{shlex.join(c)}`" for r, c in zip(reports, commands, strict=True)],
        "",
    ]
    write_section(Path(args.doc), args.section, "\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
