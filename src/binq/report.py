"""report.json (schema in docs/REPORT.md), the per-module rows, and the comparison tables."""

from __future__ import annotations

import json
import platform
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from binq.engine.calibrate import LayerRecord
from binq.engine.tune import BlockTuneRecord
from binq.quant.structured import QuantizedWeight

REPORT_SCHEMA = "binq.report/1"
LAYER_HEADER = f"{'block':>5}  {'module':<22} {'shape':>12}  {'rel.err':>9}  {'c.bits':>6}  {'s.bits':>6}  {'time':>7}"


def layer_row(record: LayerRecord) -> str:
    """One fixed-width line per quantized module, printed while the engine runs."""
    shape = f"{record.shape[0]}x{record.shape[1]}"
    return (
        f"{record.block:>5}  {record.name:<22} {shape:>12}  {record.relative_error:>9.3e}  "
        f"{record.compute_bits:>6.3f}  {record.storage_bits:>6.3f}  {record.time_s:>6.2f}s"
    )


def tune_row(record: BlockTuneRecord) -> str:
    """One line per tuned block under its modules' rows: the block's held-out output error before and after."""
    outcome = "kept" if record.kept else "method's kept"
    return (
        f"{record.block:>5}  {'tuned block':<22} {record.steps:>6} steps  {record.error_before:>9.3e} -> "
        f"{record.error_after:.3e} held-out block error ({outcome})  {record.time_s:>6.2f}s"
        + (f"  {record.flipped} signs flipped" if record.flipped else "")
        + (
            f"  then {record.head_steps} steps on the next-token KL: {record.head_before:.3e} -> "
            f"{record.head_after:.3e} nats"
            if record.head_before is not None
            else ""
        )
    )


def peak_memory() -> tuple[int, str]:
    """Peak memory of this process: CUDA allocations if CUDA was used, else the peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale), "cpu_max_rss"


def library_versions() -> dict[str, str]:
    import numpy
    import transformers

    from binq import __version__

    return {
        "binq": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_report(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    if report.get("schema") != REPORT_SCHEMA:
        raise ValueError(f"{path} is not a {REPORT_SCHEMA} report")
    return report


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fmt_ppl(value: float | None) -> str:
    """Perplexities span 10 to 1e9 here: scientific notation past 10^4 keeps table columns narrow."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def comparison_rows(reports: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison: the original model (from the first report), then each run."""
    eval_sets = list(reports[0]["eval"]) if reports else []
    header = ["method", "compute bits", "storage bits linear", "storage bits model", "model MiB"]
    header += [f"PPL {s}" for s in eval_sets] + [f"KL {s}" for s in eval_sets]
    header += ["quantize time", "peak memory"]
    if not reports:
        return header, []
    original = reports[0]["bits_original"]
    rows = [
        [
            f"original (fp{original['other_parameters_bits']})",
            f"{original['linear']['compute_bits']:.0f}",
            f"{original['linear']['storage_bits']:.2f}",
            f"{original['model']['storage_bits']:.2f}",
            f"{original['model']['storage_bytes'] / 2**20:.1f}",
            *[fmt_ppl(reports[0]["eval"][s]["ppl_original"]) for s in eval_sets],
            *["0" for _ in eval_sets],
            "-",
            "-",
        ]
    ]
    for report in reports:
        bits = report["bits"]
        rows.append(
            [
                report["label"],
                f"{bits['linear']['compute_bits']:.3f}",
                f"{bits['linear']['storage_bits']:.3f}",
                f"{bits['model']['storage_bits']:.3f}",
                f"{bits['model']['storage_bytes'] / 2**20:.1f}",
                *[fmt_ppl(report["eval"][s]["ppl"]) for s in eval_sets],
                *[fmt(report["eval"][s]["kl"], ".3f") for s in eval_sets],
                f"{report['time_s']['quantize']:.0f} s",
                _mib(report["peak_memory_bytes"]),
            ]
        )
    return header, rows


def comparison_table(reports: list[dict], title: str) -> Table:
    """The comparison for the terminal."""
    header, rows = comparison_rows(reports)
    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def allocation_table(allocation: dict[str, Any]) -> Table:
    """``--target-bits``: how many linears (and what share of the weights) each candidate got, its stored
    bits per weight, and the whole against the target."""
    title = (
        f"allocation: {allocation['storage_bits']:.4f} stored bits per linear weight, target "
        f"{allocation['target_bits']:g} (planned {allocation['planned_storage_bits']:.4f}; "
        f"sensitivity {allocation['sensitivity']}; weighted error {allocation['weighted_error']:.4g})"
    )
    table = Table(title=title, title_justify="left")
    for column in ("candidate", "linears", "share of weights", "storage bits"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for spec, row in allocation["summary"].items():
        bits = row["storage_bits_total"] / row["weights"] if row["weights"] else None
        share = row["weights"] / allocation["weights"]
        table.add_row(spec, str(row["linears"]), f"{share:.1%}", fmt(bits, ".3f"))
    return table


def extra_bit_summary(weights: dict[str, QuantizedWeight]) -> dict[str, Any]:
    """Layouts' further bit figures (``extra_bit_figures``), per linear and weighted by parameters.

    Empty when no layout reports any. These are side figures (an entropy bound, a paper's convention),
    never the storage figure.
    """
    per_layer = {name: w.extra_bit_figures() for name, w in weights.items()}
    per_layer = {name: figures for name, figures in per_layer.items() if figures}
    if not per_layer:
        return {}
    total = sum(weights[name].numel for name in per_layer)
    keys = sorted({key for figures in per_layer.values() for key in figures})
    linear = {
        key: sum(figures.get(key, 0.0) * weights[name].numel for name, figures in per_layer.items()) / total
        for key in keys
    }
    return {"linear": linear, "layers": per_layer}


def extra_bit_line(summary: dict[str, Any]) -> str:
    """One line for the terminal, labelling each figure as what it is."""
    labels = {
        "index_entropy_bits": "group-index entropy {:.3f} bits/weight (an entropy coder's bound, not stored)",
        "paper_convention_bits": "paper's convention {:.4f} bits/weight (signs + scales, index not counted)",
    }
    parts = [labels.get(key, key + " {:.3f}").format(value) for key, value in summary["linear"].items()]
    return "linear layers: " + "; ".join(parts)


def print_table(table: Table) -> None:
    Console(width=max(160, Console().width)).print(table)


def markdown_grid(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(reports: list[dict]) -> str:
    """The comparison as a Markdown table."""
    return markdown_grid(*comparison_rows(reports))


def write_section(doc: Path, section: str, body: str) -> None:
    """Replace the text between the section's markers in ``doc`` (append the section if it is new)."""
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = doc.read_text() if doc.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")  # a blank line keeps what follows its own paragraph
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
