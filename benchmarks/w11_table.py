"""The W(1+1)A(1x4) perplexity table from the runs of ``benchmarks/w11.sh``, written into docs/W11.md.

    benchmarks/w11.sh                  # the runs (quick protocol), reports in runs/w11/<name>/
    python benchmarks/w11_table.py     # the table: every finished run, in the script's order

Quantize runs give ``report.json``; the fp-weight rows (``binq eval --act-bits 4``) print their result
line only, so those are read from the run's log. A run that has not finished is listed as missing.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from binq.activations.int4 import activation_storage_bits
from binq.report import markdown_grid, read_report, write_section

# name: (weights, activations, command after "binq"); the order and commands of benchmarks/w11.sh.
RUNS: dict[str, tuple[str, str, str]] = {
    "w11_default": ("w11 obs", "fp", "quantize --method w11 --importance obs"),
    "w11_a4": ("w11 obs", "A4", "quantize --method w11 --importance obs --act-bits 4 --smooth none"),
    "gptq2_a4": (
        "gptq 2-bit g128",
        "A4",
        "quantize --method gptq --bits 2 --group-size 128 --act-bits 4 --smooth none",
    ),
    "w16_a4": ("fp", "A4", "eval --act-bits 4 --smooth none"),
    "w11_a4_smooth": (
        "w11 obs",
        "A4 + smooth channel",
        "quantize --method w11 --importance obs --act-bits 4 --smooth channel",
    ),
    "w16_a4_smooth": ("fp", "A4 + smooth channel", "eval --act-bits 4 --smooth channel"),
    "w11_init_median": ("w11 obs --init median", "fp", "quantize --method w11 --importance obs --init median"),
    "w11_offsets": ("w11 obs --offsets", "fp", "quantize --method w11 --importance obs --offsets"),
    "w11_importance_diag": ("w11 --importance diag (the default)", "fp", "quantize --method w11 --importance diag"),
    "w11_importance_review": ("w11 --importance review", "fp", "quantize --method w11 --importance review"),
    "w11_no_em": ("w11 obs --em-iterations 0", "fp", "quantize --method w11 --importance obs --em-iterations 0"),
    "w11_init_salience": ("w11 obs --init salience", "fp", "quantize --method w11 --importance obs --init salience"),
    "w11_a4_token": (
        "w11 obs",
        "A4 + smooth token",
        "quantize --method w11 --importance obs --act-bits 4 --smooth token",
    ),
    "w11_a4_sym": ("w11 obs", "A4 sym", "quantize --method w11 --importance obs --act-bits 4 --act-sym"),
    "w11_a4_noclip": ("w11 obs", "A4 clip 1.0", "quantize --method w11 --importance obs --act-bits 4 --act-clip 1.0"),
}
SETS = ("brit1911", "persuasion")
SMOLLM2_HIDDEN = 576  # the hidden size: what the quantize reports count activation bits over
_EVAL_LINE = re.compile(r"^(\w+): PPL ([0-9.e+]+)(?:, KL ([0-9.]+))?", re.M)


def _number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value >= 1e4 else f"{value:.{digits}f}"


def _row(name: str, out: Path) -> list[str] | None:
    weights, activations, command = RUNS[name]
    report_file = out / name / "report.json"
    if report_file.is_file():
        report = read_report(report_file)
        ppl = [report["eval"][s]["ppl"] for s in SETS]
        kl = [report["eval"][s]["kl"] for s in SETS]
        wbits = f"{report['storage_bits']['linear']:.3f}"
        abits = report.get("activations", {}).get("storage_bits")
        time_s = f"{report['time_s']['quantize']:.0f} s"
    else:
        log = out / f"{name}.log"
        found = {m[0]: m for m in _EVAL_LINE.findall(log.read_text())} if log.is_file() else {}
        if not all(s in found for s in SETS):
            return None
        ppl = [float(found[s][1]) for s in SETS]
        kl = [float(found[s][2]) if found[s][2] else None for s in SETS]
        wbits, abits, time_s = "16 (fp)", None, "-"
        if "A4" in activations:
            abits = activation_storage_bits(SMOLLM2_HIDDEN, 4, sym=False)  # the eval rows are asymmetric INT4
    act = activations if abits is None else f"{activations} ({abits:.3f} bits)"
    cells = [name, weights, act, wbits, *(_number(p) for p in ppl), *(_number(k, 3) for k in kl), time_s]
    return [*cells, f"`binq {command} --model smollm2-135m --quick`"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/w11", help="where benchmarks/w11.sh put its runs")
    parser.add_argument("--doc", default="docs/W11.md")
    parser.add_argument("--section", default="w11-quality")
    args = parser.parse_args()
    out = Path(args.out)
    header = [
        "run", "weights", "activations", "weight storage bits", "PPL brit1911", "PPL persuasion",
        "KL brit1911", "KL persuasion", "quantize time", "command",
    ]  # fmt: skip
    rows, missing = [], []
    for name in RUNS:
        row = _row(name, out)
        if row is None:
            missing.append(name)
        else:
            rows.append(row)
    text = [
        "### Perplexity, quick protocol (32 x 512 calibration tokens, first 16 windows of 512)",
        "",
        f"Made by `{shlex.join(['python', 'benchmarks/w11_table.py', *sys.argv[1:]])}` from the runs of "
        "`benchmarks/w11.sh` (one after another, `OMP_NUM_THREADS=1`, beside another single-threaded job on "
        "the 2-core CPU: times are comparable within this table only). Original model 29.23 / 36.62. KL is "
        "KL(original || quantized) in nats per token; for the fp-weight rows it is to the model with "
        "full-precision activations. Rows with `obs` ran when `obs` was the default importance; the "
        "`diag` row made `diag` the default.",
        "",
        markdown_grid(header, rows),
        "",
        *([f"Not finished (no result yet): {', '.join(missing)}.", ""] if missing else []),
    ]
    write_section(Path(args.doc), args.section, "\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
