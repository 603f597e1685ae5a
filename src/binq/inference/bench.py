"""``binq bench``: decode and prefill speed, peak memory and GEMV times of a checkpoint against its source.

Engines, each measured in its own process (:mod:`binq.inference.bench_worker`) so each peak resident
set is its own, all on the same number of threads and the same token ids:

- ``binq``: the checkpoint as ``binq.load`` gives it, with whatever kernels are registered (the
  reference path, unpacking at every call, where none applies);
- ``original``: the source model in torch fp32 (fp16 on CUDA: cuBLAS); ``bf16``: the same in bf16;
- ``llamacpp-<variant>``: llama.cpp on GGUF files (:mod:`binq.inference.llamacpp`): the source GGUF,
  llama.cpp's own F16 / Q4_0 / Q1_0 / TQ2_0 / TQ1_0 quantizations of it, and the checkpoint exported by
  ``binq export`` (``llamacpp-binq``); ``llamacpp`` alone means the default set.

The prompt is the start of a built-in text (the 1911 Britannica "Shakespeare" article): ``prefill``
tokens for the prefill, its first ``DECODE_PROMPT_TOKENS`` for the decode, which generates
``new_tokens`` greedy tokens without stopping at end-of-sequence, after a warm-up. Decode tokens/s
counts one-token forwards (``new_tokens - 1``: the first token comes from the prompt's logits), as
llama.cpp's ``tg`` does; prefill tokens/s is prompt tokens over the prompt's forward.

The source of a checkpoint is read from its config.json (``quantization_config.source_model`` when
present) or from the report.json that ``binq quantize --out`` writes beside it; ``--original`` names
it otherwise.

``--json`` writes a list of records. One per engine (``kind: "engine"``): ``engine``, ``runtime``,
``format``, ``device``, ``threads``, ``model`` (folder, spec or GGUF file), ``prompt_tokens``,
``prefill_s``, ``prefill_tokens_per_s``, ``new_tokens``, ``decode_steps``, ``decode_s``,
``decode_tokens_per_s``, ``generated`` (the greedy tokens), ``peak_rss_bytes`` (the worker's peak
resident set), ``baseline_rss_bytes`` (the same after its imports, before the model), ``model_bytes``
(tensors in memory; the file for GGUF), ``gemv`` (per distinct linear: ``shape`` [out, in],
``layout``, ``count``, ``kernel``, ``median_us``), ``note`` (why there are no numbers, or what to
know about them), plus per runtime ``file_bytes``, ``kernel_bytes``, ``kernels``,
``peak_cuda_bytes``, ``llama_cpp_version``, ``gguf``. With ``--gemv``, one more record
(``kind: "gemv-microbenchmark"``) whose ``results`` are :func:`binq.inference.gemv.layout_microbenchmark`'s.
Every record carries ``machine`` and ``versions``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from binq.checkpoint import is_checkpoint, read_quantization_config
from binq.errors import BinqError
from binq.inference import llamacpp
from binq.models import EMBEDDED_MODELS

log = logging.getLogger(__name__)

DECODE_PROMPT_TOKENS = 16
WARMUP_TOKENS = 8
PROMPT_TEXT = "brit1911"
TORCH_ENGINES = ("original", "bf16", "original-hf")  # original-hf: fp32 through transformers' own forward
ERROR_PREFIX = "binq: error: "  # how a worker says what went wrong, as the command line does


@dataclass
class BenchConfig:
    """What ``binq bench`` measures (the command line's options)."""

    model: str
    against: tuple[str, ...] = ("original", "original-hf", "bf16", "llamacpp")
    threads: int = 2
    new_tokens: int = 128
    prefill: int = 512
    device: str = "cpu"
    gemv: bool = False
    original: str | None = None  # the source model, when the checkpoint does not say
    gguf_dir: Path | None = None  # where llama.cpp's GGUF files are made (default: the binq cache)
    json_out: Path | None = None
    loop: str = "auto"  # the decode loop of the torch and binq engines (generate.make_stepper)


@dataclass
class Engine:
    """One row of the benchmark: how to run it (``job``) or why it is not run (``note``)."""

    name: str
    runtime: str  # binq, torch or llama.cpp
    format: str  # what the weights are: a binq method, fp32, bf16, a GGUF type
    device: str
    job: dict[str, Any] = field(default_factory=dict)
    note: str | None = None  # why it is not run
    remark: str | None = None  # what a reader should know about its numbers


# --- what to compare ---------------------------------------------------------------------------------------


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") <= 1 and not spec.startswith((".", "~", "/")) and not spec.lower().endswith(".gguf")


def source_model(folder: Path) -> str | None:
    """The model a checkpoint was quantized from, as ``--model`` would name it, or None if nothing says."""
    recorded = read_quantization_config(folder).get("source_model")
    if isinstance(recorded, str) and recorded:
        return recorded
    report_file = folder / "report.json"
    if not report_file.is_file():
        return None
    try:
        model = json.loads(report_file.read_text(encoding="utf-8")).get("model") or {}
    except (OSError, ValueError, AttributeError):
        return None
    spec, path = model.get("spec"), model.get("path")
    if spec in EMBEDDED_MODELS:
        return spec  # its name, not its cache folder: llama.cpp needs the embedded GGUF
    for candidate in (spec, path):
        if isinstance(candidate, str) and Path(candidate).expanduser().exists():
            return candidate
    return spec if isinstance(spec, str) and _looks_like_hub_id(spec) else None


def parse_against(text: str) -> tuple[str, ...]:
    """``original,bf16,llamacpp`` into engine names; ``llamacpp`` expands to the default variants."""
    names: list[str] = []
    known_variants = (llamacpp.SOURCE, *llamacpp.QUANT_TYPES, llamacpp.EXPORT)
    for token in (t.strip().lower() for t in text.split(",")):
        if not token or token == "none":
            continue
        if token in ("fp16", "fp32"):
            token = "original"
        if token == "llamacpp":
            names += [f"llamacpp-{variant}" for variant in llamacpp.DEFAULT_VARIANTS]
        elif token in TORCH_ENGINES or token.removeprefix("llamacpp-") in known_variants:
            names.append(token)
        else:
            variants = ", ".join(f"llamacpp-{v}" for v in known_variants)
            raise BinqError(f"--against: unknown engine {token!r} (original, bf16, llamacpp, {variants})")
    return tuple(dict.fromkeys(names))


def _tokenizer_and_context(spec: str) -> tuple[Any, int | None]:
    """The tokenizer of ``spec`` and its number of positions, without loading any weights."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(spec).expanduser()
    kwargs: dict[str, Any] = {}
    if spec in EMBEDDED_MODELS:
        source = str(EMBEDDED_MODELS[spec]())
    elif path.is_dir():
        source = str(path)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        source, kwargs = str(path.parent), {"gguf_file": path.name}
    elif _looks_like_hub_id(spec):
        source = spec
    else:
        raise BinqError(f"no such file or directory: '{spec}'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as error:  # missing files, unknown ids, network: one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise BinqError(f"cannot read the tokenizer and config of '{spec}' ({first})") from None
    limit = getattr(config, "max_position_embeddings", None)
    return tokenizer, limit if isinstance(limit, int) and limit > 0 else None


def prompt_ids(tokenizer: Any, prefill: int) -> list[int]:
    """The first ``prefill`` token ids of the built-in prompt text."""
    from binq.data import load_text

    ids = list(tokenizer(load_text(PROMPT_TEXT))["input_ids"])
    if len(ids) < prefill:
        raise BinqError(f"--prefill {prefill}: the prompt text has only {len(ids)} tokens")
    return ids[:prefill]


def check_config(config: BenchConfig, context: int | None) -> None:
    if config.threads < 1:
        raise BinqError(f"--threads must be at least 1, got {config.threads}")
    if config.new_tokens < 2:
        raise BinqError(f"--new-tokens must be at least 2 (one decode step), got {config.new_tokens}")
    if config.prefill < 1:
        raise BinqError(f"--prefill must be at least 1, got {config.prefill}")
    if context is not None:
        if config.prefill > context:
            raise BinqError(f"--prefill {config.prefill} is longer than the model's context ({context} positions)")
        decode = min(DECODE_PROMPT_TOKENS, config.prefill) + max(config.new_tokens, WARMUP_TOKENS)
        if decode > context:
            raise BinqError(
                f"--new-tokens {config.new_tokens} after a {min(DECODE_PROMPT_TOKENS, config.prefill)}-token prompt "
                f"does not fit the model's context ({context} positions)"
            )


def check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise BinqError(f"--device {device!r} is not a device (use cpu or cuda)") from None
    if kind not in ("cpu", "cuda"):
        raise BinqError(f"--device {device!r}: binq bench runs on cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BinqError(f"--device {device}: CUDA is not available (torch {torch.__version__}, no usable GPU)")


# --- the engines --------------------------------------------------------------------------------------------


def _gguf_dir(config: BenchConfig) -> Path:
    if config.gguf_dir is not None:
        return config.gguf_dir
    from binq.models.embedded import default_cache_dir

    return default_cache_dir() / "bench"


def _llamacpp_engines(
    names: list[str], config: BenchConfig, checkpoint: Path | None, original: str | None, base_job: dict[str, Any]
) -> list[Engine]:
    """The llama.cpp rows: GGUF files found or made now, or a note saying why a row has no numbers."""
    reason = llamacpp.unavailable_reason()
    engines = [Engine(name, "llama.cpp", _gguf_label(name.removeprefix("llamacpp-")), "cpu") for name in names]
    if reason is not None:
        log.warning("llama.cpp engines skipped: %s", reason)
        for engine in engines:
            engine.note = f"skipped: {reason}"
        return engines
    source: Path | None = None
    source_problem = "no source GGUF (pass a .gguf --original)"
    if original is not None:
        try:
            source = llamacpp.source_gguf(original)
        except BinqError as error:
            source_problem = str(error)
    out_dir = _gguf_dir(config)
    for engine in engines:
        variant = engine.name.removeprefix("llamacpp-")
        if variant == llamacpp.EXPORT:
            gguf = _export_checkpoint(engine, checkpoint, source, out_dir)
        elif source is None:
            engine.note = f"skipped: {source_problem}"
            continue
        elif variant == llamacpp.SOURCE:
            gguf = source
        else:
            gguf = _quantized_variant(engine, source, variant, out_dir, config.threads)
        if gguf is not None:
            engine.job = {**base_job, "task": "llamacpp", "model": str(gguf)}
    return engines


def _gguf_label(variant: str) -> str:
    if variant == llamacpp.SOURCE:
        return "GGUF source"
    if variant == llamacpp.EXPORT:
        return "GGUF Q1_0 (binq export)"
    return f"GGUF {variant.upper()} (llama.cpp)"


def _export_checkpoint(engine: Engine, checkpoint: Path | None, source: Path | None, out_dir: Path) -> Path | None:
    if checkpoint is None:
        engine.note = "skipped: not a binq checkpoint"
        return None
    from binq.export.gguf import export_gguf

    out = out_dir / f"{checkpoint.resolve().name}.binq.gguf"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return export_gguf(checkpoint, out, like=source)
    except BinqError as error:
        engine.note = f"skipped: {str(error).split('. ')[0]}"
        return None


def _quantized_variant(engine: Engine, source: Path, variant: str, out_dir: Path, threads: int) -> Path | None:
    """llama.cpp's quantization of the source, made once; what llama.cpp said of it is kept beside it."""
    out = out_dir / f"{source.stem}.{variant}.gguf"
    sidecar = out.with_name(out.name + ".json")
    made_from = json.loads(sidecar.read_text(encoding="utf-8")).get("source") if sidecar.is_file() else None
    if not (out.is_file() and made_from == str(source)):
        log.info("llama.cpp: quantizing %s to %s", source.name, variant.upper())
        job = {"task": "quantize", "source": str(source), "out": str(out), "variant": variant, "threads": threads}
        try:
            result = run_worker(job, threads)
        except WorkerError as error:
            engine.note = f"skipped: {error.reason}"
            return None
        sidecar.write_text(json.dumps({"source": str(source), "fallback": result.get("fallback")}), encoding="utf-8")
    fallback = json.loads(sidecar.read_text(encoding="utf-8")).get("fallback")
    if fallback:
        engine.remark = f"llama.cpp: {fallback} (other types)"
    return out


def plan_engines(config: BenchConfig, tokens: list[int]) -> list[Engine]:
    """Every row of the benchmark, in order, each with its worker job or its note."""
    cuda = config.device.startswith("cuda")
    base_job = {
        "device": config.device,
        "threads": config.threads,
        "prefill_ids": tokens,
        "decode_prompt_ids": tokens[:DECODE_PROMPT_TOKENS],
        "new_tokens": config.new_tokens,
        "warmup_tokens": WARMUP_TOKENS,
        "loop": config.loop,
    }
    engines: list[Engine] = []
    checkpoint = Path(config.model) if is_checkpoint(config.model) else None
    if checkpoint is not None:
        method = read_quantization_config(checkpoint).get("method") or "checkpoint"
        dtype = "float16" if cuda else "float32"
        job = {**base_job, "task": "binq", "model": str(checkpoint), "dtype": dtype}
        engines.append(Engine("binq", "binq", f"binq {method}", config.device, job))
        original = config.original or source_model(checkpoint)
    else:
        original = config.model
    names = list(parse_against(",".join(config.against)))
    for name in [n for n in names if n in TORCH_ENGINES]:
        dtype = "bfloat16" if name == "bf16" else ("float16" if cuda else "float32")
        label = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
        hf = name == "original-hf"
        engine = Engine(name, "torch", label + (", transformers forward" if hf else ""), config.device)
        if original is None:
            engine.note = f"skipped: {config.model} does not say which model it was quantized from; pass --original"
        else:
            engine.job = {
                **base_job,
                "task": "torch",
                "model": original,
                "dtype": dtype,
                "loop": "hf" if hf else config.loop,
            }
        engines.append(engine)
    llama_names = [n for n in names if n.startswith("llamacpp-")]
    if llama_names:
        engines += _llamacpp_engines(llama_names, config, checkpoint, original, {**base_job, "device": "cpu"})
    return engines


# --- running ------------------------------------------------------------------------------------------------


class WorkerError(BinqError):
    """A worker process failed; ``reason`` is its one-line error (or its last line on stderr)."""

    def __init__(self, task: str, code: int, reason: str) -> None:
        super().__init__(f"the {task} worker exited with code {code}: {reason}")
        self.reason = reason


def run_worker(job: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one job in a fresh ``python -m binq.inference.bench_worker`` and return its JSON result."""
    env = dict(os.environ)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[variable] = str(threads)
    with tempfile.TemporaryDirectory(prefix="binq-bench-") as scratch:
        job_file = Path(scratch) / "job.json"
        job_file.write_text(json.dumps(job), encoding="utf-8")
        command = [sys.executable, "-m", "binq.inference.bench_worker", str(job_file)]
        completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        errors = [line.strip() for line in completed.stderr.splitlines() if line.strip()]
        ours = [line.removeprefix(ERROR_PREFIX) for line in errors if line.startswith(ERROR_PREFIX)]
        reason = ours[-1] if ours else (errors[-1] if errors else "no output")
        raise WorkerError(job["task"], completed.returncode, reason[:300])
    return json.loads(lines[-1])


def _environment() -> dict[str, Any]:
    """Where the numbers come from: the machine and the library versions."""
    import numpy
    import torch
    import transformers

    from binq import __version__

    versions = {"binq": __version__, "python": platform.python_version(), "torch": torch.__version__}
    versions.update({"transformers": transformers.__version__, "numpy": numpy.__version__})
    machine = {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        machine["cuda_device"] = torch.cuda.get_device_name()
    from binq.nn.cpu_kernels import isa

    machine["binq_cpu_kernels"] = isa()
    command = "binq " + shlex.join(sys.argv[1:]) if Path(sys.argv[0]).name in ("binq", "cli.py") else None
    return {"machine": machine, "versions": versions, "command": command, "date": time.strftime("%Y-%m-%d")}


def _record(engine: Engine, config: BenchConfig) -> dict[str, Any]:
    return {
        "kind": "engine",
        "engine": engine.name,
        "runtime": engine.runtime,
        "format": engine.format,
        "device": engine.device,
        "threads": config.threads,
        "model": engine.job.get("model"),
        "prompt_tokens": None,
        "new_tokens": None,
        "decode_tokens_per_s": None,
        "prefill_tokens_per_s": None,
        "peak_rss_bytes": None,
        "model_bytes": None,
        "gemv": [],
        "note": engine.note or engine.remark,
        **_environment(),
    }


def run_bench(config: BenchConfig) -> tuple[list[dict[str, Any]], bool]:
    """Measure every engine; the records (one per engine, then the micro-benchmark's), and whether all ran."""
    check_device(config.device)
    # A bad engine name fails before anything loads.
    if not parse_against(",".join(config.against)) and not is_checkpoint(config.model):
        raise BinqError(f"nothing to measure: {config.model} is not a binq checkpoint and --against names no engine")
    tokenizer, context = _tokenizer_and_context(config.model)
    check_config(config, context)
    tokens = prompt_ids(tokenizer, config.prefill)
    engines = plan_engines(config, tokens)
    records, all_ran = [], True
    for n, engine in enumerate(engines, 1):
        record = _record(engine, config)
        if engine.note is None:
            log.info("bench [%d/%d] %s (%s, %s)", n, len(engines), engine.name, engine.format, engine.device)
            try:
                record.update(run_worker(engine.job, config.threads))
            except WorkerError as error:
                record["note"] = f"failed: {error.reason}"
                all_ran = False
        records.append(record)
    if config.gemv:
        log.info("bench: GEMV micro-benchmark on 7B shapes")
        job = {"task": "gemv", "device": config.device, "threads": config.threads}
        record = {
            "kind": "gemv-microbenchmark",
            "engine": "gemv-7b",
            "device": config.device,
            "threads": config.threads,
            **_environment(),
        }
        try:
            record.update(run_worker(job, config.threads))
        except WorkerError as error:
            record.update({"results": [], "note": f"failed: {error.reason}"})
            all_ran = False
        records.append(record)
    if config.json_out is not None:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return records, all_ran


# --- tables ---------------------------------------------------------------------------------------------------


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


ENGINE_COLUMNS = ("engine", "format", "device", "threads", "model MiB", "prefill tok/s", "decode tok/s", "peak RSS MiB")


def engine_table(records: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ENGINE_COLUMNS:
        table.add_column(column, justify="left" if column in ("engine", "format", "device") else "right")
    table.add_column("note")
    for r in records:
        if r.get("kind") != "engine":
            continue
        table.add_row(
            r["engine"], r["format"], r["device"], str(r["threads"]), _mib(r.get("model_bytes")),
            _number(r.get("prefill_tokens_per_s"), ".1f"), _number(r.get("decode_tokens_per_s"), ".2f"),
            _mib(r.get("peak_rss_bytes")), r.get("note") or "",
        )  # fmt: skip
    return table


def gemv_table(records: list[dict[str, Any]]) -> Table | None:
    """Median µs of one GEMV per distinct linear shape (rows) and engine (columns)."""
    engines = [r for r in records if r.get("kind") == "engine" and r.get("gemv")]
    if not engines:
        return None
    shapes = list(dict.fromkeys(tuple(g["shape"]) for r in engines for g in r["gemv"]))
    table = Table(title="GEMV (one token) per linear shape: median µs (path)", title_justify="left")
    table.add_column("out x in")
    table.add_column("count", justify="right")
    for r in engines:
        table.add_column(r["engine"], justify="right")
    for shape in shapes:
        cells, count = [], 0
        for r in engines:
            found = [g for g in r["gemv"] if tuple(g["shape"]) == shape]
            count = max(count, sum(g["count"] for g in found))
            parts = [
                f"{g['median_us']:.0f}" + (f" ({g['kernel']})" if len(found) > 1 or g["kernel"] != "torch" else "")
                for g in found
            ]
            cells.append(", ".join(parts) or "-")
        table.add_row(f"{shape[0]}x{shape[1]}", str(count), *cells)
    return table


def microbenchmark_table(record: dict[str, Any]) -> Table:
    results = record.get("results", [])
    baselines = [r["form"].removeprefix("torch ") for r in results if r["form"].startswith("torch ")]
    baselines = list(dict.fromkeys(baselines))
    title = f"GEMV micro-benchmark of binq's layouts, {record['device']}, {record['threads']} threads: median µs"
    table = Table(title=title, title_justify="left")
    for column in ("out x in", "form", "path", "bits/weight", "µs"):
        table.add_column(column, justify="right" if column in ("bits/weight", "µs") else "left")
    for baseline in baselines:
        table.add_column(f"x vs {baseline}", justify="right")
    for r in results:
        speedups = [_number(r.get(f"speedup_vs_{b}"), ".2f") for b in baselines]
        table.add_row(
            f"{r['shape'][0]}x{r['shape'][1]}", r["form"], r["kernel"], _number(r.get("storage_bits"), ".3f"),
            f"{r['median_us']:.0f}", *speedups,
        )  # fmt: skip
    return table


def print_tables(records: list[dict[str, Any]], config: BenchConfig) -> None:
    from binq.report import print_table

    title = (
        f"binq bench {config.model}: batch 1, greedy, prefill {config.prefill} tokens, "
        f"decode {config.new_tokens} tokens (EOS ignored), {config.threads} threads"
    )
    print_table(engine_table(records, title))
    table = gemv_table(records)
    if table is not None:
        print_table(table)
    for record in records:
        if record.get("kind") == "gemv-microbenchmark":
            if record.get("note"):
                print(f"GEMV micro-benchmark {record['note']}")
            else:
                print_table(microbenchmark_table(record))
