"""Inference-speed tables for docs/BENCHMARKS.md and the README, from ``binq bench --json`` files.

    python benchmarks/inference_tables.py runs/bench/*.json

Every number comes from the JSON records (one per engine, measured side by side in one ``binq bench``
run); each table names the commands that made its files. Ratios are taken within one file only, against
that file's ``original`` engine (the source model in torch fp32 through the same decode loop).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from binq.report import markdown_grid, write_section

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def _load(files: list[Path]) -> list[tuple[Path, list[dict[str, Any]]]]:
    loaded = []
    for path in files:
        records = json.loads(path.read_text(encoding="utf-8"))
        for record in records:
            record["_file"] = path.stem  # the checkpoint's name in the tables
        loaded.append((path, records))
    return loaded


def _engines(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["engine"]: r for r in records if r.get("kind") == "engine"}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | None, anchor: float | None) -> str:
    return "-" if not value or not anchor else f"{value / anchor:.2f}x"


def _checkpoint_name(records: list[dict[str, Any]]) -> str:
    return records[0]["_file"]


def _commands(loaded: list[tuple[Path, list[dict[str, Any]]]]) -> str:
    commands = sorted({r.get("command") or "?" for _, records in loaded for r in records if r.get("command")})
    return "\n".join(f"    {command}" for command in commands)


def _provenance(loaded: list[tuple[Path, list[dict[str, Any]]]]) -> str:
    record = next(r for _, records in loaded for r in records if r.get("kind") == "engine")
    machine = record["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    return (
        f"{machine['cpu_count']}-core {machine['processor']} CPU ({machine['platform']}), binq CPU kernels: "
        f"{machine.get('binq_cpu_kernels', '?')}, {record['threads']} threads in every engine; {versions}; "
        f"{record.get('date', '?')}"
    )


def decode_table(loaded: list[tuple[Path, list[dict[str, Any]]]]) -> str:
    header = ["checkpoint", "engine", "weights", "weights in memory MiB", "kernel re-packing MiB", "prefill tok/s"]
    header += ["decode tok/s", "decode vs fp32", "peak RSS MiB", "RSS added by the model MiB", "note"]
    rows = []
    for _, records in loaded:
        engines = _engines(records)
        anchor = engines.get("original", {}).get("decode_tokens_per_s")
        for name, r in engines.items():
            rows.append(
                [
                    _checkpoint_name(records), name, r["format"], _fmt(_mib(r.get("model_bytes")), ",.1f"),
                    _fmt(_mib(r.get("kernel_bytes")), ",.1f"), _fmt(r.get("prefill_tokens_per_s"), ".0f"),
                    _fmt(r.get("decode_tokens_per_s"), ".1f"),
                    _ratio(r.get("decode_tokens_per_s"), anchor), _fmt(_mib(r.get("peak_rss_bytes")), ",.0f"),
                    _fmt(_mib(_added_rss(r)), ",.0f"), (r.get("note") or "").replace("|", "/")[:90],
                ]
            )  # fmt: skip
    return markdown_grid(header, rows)


def _added_rss(record: dict[str, Any]) -> float | None:
    """Peak resident set minus the process's after its imports, before the model: what the model costs."""
    peak, baseline = record.get("peak_rss_bytes"), record.get("baseline_rss_bytes")
    return None if peak is None or baseline is None else peak - baseline


def _mib(value: float | None) -> float | None:
    return None if value is None else value / MIB


def gemv_table(loaded: list[tuple[Path, list[dict[str, Any]]]]) -> str:
    """Per checkpoint and linear shape, binq's GEMV beside the same shape in torch fp32 (M = 1)."""
    header = ["checkpoint", "out x in", "layers", "binq kernel", "binq µs", "fp32 µs", "speed-up"]
    rows = []
    for _, records in loaded:
        engines = _engines(records)
        if "binq" not in engines or "original" not in engines:
            continue
        fp32 = {tuple(g["shape"]): g["median_us"] for g in engines["original"]["gemv"]}
        for g in engines["binq"]["gemv"]:
            shape = tuple(g["shape"])
            rows.append(
                [
                    _checkpoint_name(records), f"{shape[0]}x{shape[1]}", str(g["count"]), g["kernel"],
                    f"{g['median_us']:.0f}", _fmt(fp32.get(shape), ".0f"), _ratio(fp32.get(shape), g["median_us"]),
                ]
            )  # fmt: skip
    return markdown_grid(header, rows)


def microbenchmark_table(loaded: list[tuple[Path, list[dict[str, Any]]]]) -> str | None:
    record = next((r for _, records in loaded for r in records if r.get("kind") == "gemv-microbenchmark"), None)
    if record is None:
        return None
    header = ["out x in", "form", "path", "bits/weight", "µs", "x vs torch fp32", "x vs torch bf16"]
    rows = [
        [
            f"{r['shape'][0]}x{r['shape'][1]}", r["form"], r["kernel"], _fmt(r.get("storage_bits"), ".3f"),
            f"{r['median_us']:.0f}", _fmt(r.get("speedup_vs_fp32"), ".2f"), _fmt(r.get("speedup_vs_bf16"), ".2f"),
        ]
        for r in record.get("results", [])
    ]  # fmt: skip
    return markdown_grid(header, rows)


def readme_table(loaded: list[tuple[Path, list[dict[str, Any]]]]) -> str:
    """One row per checkpoint: binq's decode beside torch fp32 and llama.cpp's fastest, same threads."""
    header = ["checkpoint", "decode tok/s", "vs torch fp32", "vs fastest llama.cpp", "weights in memory MiB"]
    header += ["RSS added by the model MiB", "checkpoint file MiB"]
    rows = []
    for _, records in loaded:
        engines = _engines(records)
        binq = engines.get("binq")
        if binq is None or binq.get("decode_tokens_per_s") is None:
            continue
        llama = [r for n, r in engines.items() if n.startswith("llamacpp") and r.get("decode_tokens_per_s")]
        fastest = max(llama, key=lambda r: r["decode_tokens_per_s"]) if llama else None
        versus_llama = "-"
        if fastest is not None:
            ratio = _ratio(binq["decode_tokens_per_s"], fastest["decode_tokens_per_s"])
            versus_llama = f"{ratio} ({fastest['format']})"
        rows.append(
            [
                _checkpoint_name(records), f"{binq['decode_tokens_per_s']:.1f}",
                _ratio(binq["decode_tokens_per_s"], engines.get("original", {}).get("decode_tokens_per_s")),
                versus_llama, _fmt(_mib(binq.get("model_bytes")), ",.1f"), _fmt(_mib(_added_rss(binq)), ",.0f"),
                _fmt(_mib(binq.get("file_bytes")), ",.1f"),
            ]
        )  # fmt: skip
    return markdown_grid(header, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="binq bench --json files")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    loaded = _load(sorted(args.files))
    made_by = (
        f"Made by `python benchmarks/inference_tables.py {' '.join(str(f) for f in sorted(args.files))}` from the "
        f"files of:\n\n{_commands(loaded)}\n\n{_provenance(loaded)}."
    )
    body = decode_table(loaded) + "\n\n" + made_by
    write_section(args.doc, "inference-decode", body)
    write_section(args.doc, "inference-gemv", gemv_table(loaded) + "\n\n" + made_by)
    micro = microbenchmark_table(loaded)
    if micro is not None:
        write_section(args.doc, "inference-gemv-7b", micro + "\n\n" + made_by)
    write_section(args.readme, "inference-speed", readme_table(loaded) + "\n\n" + made_by)
    print(f"wrote {args.doc} and {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
