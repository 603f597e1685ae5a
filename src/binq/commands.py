"""What the commands do, apart from argument parsing (cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from binq.activations import ActivationConfig
from binq.data.zeroshot import check_task_names
from binq.engine.allocation import DEFAULT_CANDIDATES, MIXED, AllocationConfig
from binq.engine.calibrate import EngineConfig, rank_and_world
from binq.engine.tune import TuneConfig
from binq.errors import BinqError
from binq.evaluation import Protocol
from binq.evaluation.zeroshot import ZeroShotConfig
from binq.methods import available_methods, get_method
from binq.models import load_model
from binq.pipeline import CalibrationConfig, EvaluationConfig, evaluate, load_checkpoint, quantize
from binq.report import (
    LAYER_HEADER,
    allocation_table,
    comparison_table,
    extra_bit_line,
    layer_row,
    print_table,
    read_report,
    tune_row,
)
from binq.runs import DEMO_DEFAULT, DEMO_RUNS, demo_command, slug

log = logging.getLogger(__name__)


def list_methods() -> int:
    table = Table(title="binq methods", title_justify="left", show_lines=True)
    table.add_column("method")
    table.add_column("what it does")
    table.add_column("options (defaults)")
    for method in available_methods():
        options = ", ".join(
            f"--{f.name.replace('_', '-')} {f.default}" for f in dataclasses.fields(method.config_class)
        )
        table.add_row(method.name, method.summary, options)
    Console().print(table)
    return 0


def _protocol(args: argparse.Namespace, eval_sets: list[str]) -> tuple[CalibrationConfig, EvaluationConfig]:
    """The calibration and evaluation configs of the command line (one ``--seqlen`` for both)."""
    calibration = CalibrationConfig(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    return calibration, EvaluationConfig(sets=tuple(eval_sets), seqlen=args.seqlen, windows=args.eval_windows)


def _activation_config(args: argparse.Namespace) -> ActivationConfig:
    return ActivationConfig(
        bits=args.act_bits,
        sym=args.act_sym,
        clip=args.act_clip,
        smooth=args.smooth,
        smooth_proxy=args.smooth_proxy,
        calib_tokens=args.act_calib_tokens,
    )


def _print_protocols(evaluations: dict[str, dict[str, Any]]) -> None:
    for name, evaluation in evaluations.items():
        protocol = evaluation["protocol"]
        print(f"protocol {name}: {Protocol(**protocol).summary()}; {protocol['description']}")


def tune_config(args: argparse.Namespace) -> TuneConfig | None:
    """The :class:`~binq.engine.tune.TuneConfig` of ``--tune`` and its options, or ``None`` without ``--tune``."""
    values = {item.name: getattr(args, f"tune_{item.name}") for item in dataclasses.fields(TuneConfig)}
    if not args.tune:
        given = [name for name, value in values.items() if value != getattr(TuneConfig(), name)]
        if given:
            raise BinqError(f"--tune-{given[0].replace('_', '-')} applies to --tune: add --tune")
        return None
    return TuneConfig(**values)


def run_quantize(
    args: argparse.Namespace, eval_sets: list[str], method_options: dict[str, Any], argv: list[str]
) -> int:
    if args.target_bits is not None:
        candidates = DEFAULT_CANDIDATES if args.candidates is None else args.candidates
        method, config = MIXED, AllocationConfig(args.target_bits, candidates, args.sensitivity)
    else:
        method = get_method(args.method)
        config = method.make_config(**method_options)
    calibration, evaluation = _protocol(args, eval_sets)
    tune = tune_config(args)
    on_layer = on_tune = None
    if not args.no_layer_table and rank_and_world()[0] == 0:  # in a multi-process run, rank 0 prints
        tqdm.write(LAYER_HEADER)
        on_layer = lambda record: tqdm.write(layer_row(record))  # noqa: E731
        on_tune = lambda record: tqdm.write(tune_row(record))  # noqa: E731
    result = quantize(
        args.model, method, config, calibration=calibration, evaluation=evaluation,
        engine=EngineConfig(device=args.device, hessian_dtype=args.hessian_dtype, true_sequential=args.true_sequential),
        activations=_activation_config(args), workers=args.workers, out=args.out, label=args.label,
        progress=not args.no_progress, on_layer=on_layer, command=["binq", *argv], stream=not args.in_memory,
        tune=tune, on_tune=on_tune,
    )  # fmt: skip
    if result.rank != 0:
        return 0
    report = result.report
    print_table(comparison_table([report], f"{report['label']} on {result.model.name}"))
    _print_protocols(result.evaluations)
    if "extra_bits" in report:
        print(extra_bit_line(report["extra_bits"]))
    if "allocation" in report:
        print_table(allocation_table(report["allocation"]))
    return 0


def _zeroshot_config(args: argparse.Namespace) -> ZeroShotConfig:
    """``--tasks``, ``--limit`` and ``--batch-size`` (task names checked here, before any model is loaded)."""
    if args.tasks is None:
        if args.limit is not None:
            raise BinqError("--limit applies to --tasks: name the tasks (lastword, nextsentence)")
        return ZeroShotConfig(batch_size=args.batch_size)
    return ZeroShotConfig(tuple(check_task_names(args.tasks)), args.limit, args.batch_size)


def task_table(tasks: dict[str, dict[str, Any]], title: str) -> Table:
    """One row per task and accuracy metric: value, standard error, items and the items' digest."""
    table = Table(title=title, title_justify="left")
    for column in ("task", "metric", "value", "stderr", "items", "items sha256", "also"):
        table.add_column(column, justify="left" if column in ("task", "metric", "also") else "right")
    for name, task in tasks.items():
        also = (
            f"target log-likelihood {task['target_loglik_mean']:.3f} (perplexity {task['perplexity']:.2f})"
            if "target_loglik_mean" in task
            else f"{task['choices']} choices"
        )
        for metric in ("acc", "acc_norm"):
            if metric in task:
                stderr = task[f"{metric}_stderr"]
                table.add_row(
                    name, metric, f"{task[metric]:.4f}", "-" if stderr is None else f"± {stderr:.4f}",
                    f"{task['items']} of {task['items_total']}", task["items_sha256"][:12], also,
                )  # fmt: skip
    return table


def run_eval(args: argparse.Namespace, eval_sets: list[str], argv: list[str]) -> int:
    calibration, evaluation = _protocol(args, eval_sets)
    zeroshot = _zeroshot_config(args)
    result = evaluate(
        args.model, evaluation, device=args.device, activations=_activation_config(args), calibration=calibration,
        zeroshot=zeroshot, out=args.out, label=args.label, progress=not args.no_progress, command=["binq", *argv],
    )  # fmt: skip
    for name, evaluation in result.evaluations.items():
        kl = "" if evaluation["kl"] is None else f", KL {evaluation['kl']:.4f} to full-precision activations"
        print(f"{name}: PPL {evaluation['ppl']:.3f}{kl}  ({Protocol(**evaluation['protocol']).summary()})")
    if "tasks" in result.report:
        print_table(task_table(result.report["tasks"], f"zero-shot tasks, {result.report['label']}"))
    if args.out:
        print(f"wrote {Path(args.out) / 'report.json'}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    labels = DEMO_DEFAULT if args.only is None else tuple(s.strip() for s in args.only.split(","))
    unknown = [label for label in labels if label not in DEMO_RUNS]
    if unknown:
        raise BinqError(f"unknown run {unknown[0]!r} (runs: {', '.join(DEMO_RUNS)})")
    out = Path(args.out)
    protocol = (
        "full (128 x 2048 calibration tokens, all windows of 2048)"
        if args.full
        else ("quick (32 x 512 calibration tokens from austen; first 16 windows of 512 tokens)")
    )
    print(f"binq demo: {len(labels)} runs on {args.model}, {protocol}; evaluation on brit1911 and persuasion")
    load_model(args.model)  # fetch and convert the embedded model once, before the runs
    reports = []
    for n, label in enumerate(labels, 1):
        command = demo_command(label, args.model, args.device, args.full, out)
        print(f"[{n}/{len(labels)}] {shlex.join(command)}", flush=True)
        child = [sys.executable, "-m", "binq.cli", *command[1:], "--no-layer-table"]
        completed = subprocess.run(child, stdout=subprocess.DEVNULL, check=False)
        if completed.returncode != 0:
            raise BinqError(f"run '{label}' failed with exit code {completed.returncode}")
        reports.append(read_report(out / slug(label) / "report.json"))
    print_table(comparison_table(reports, f"binq demo on {args.model}: {protocol}"))
    summary = out / "summary.json"
    summary.write_text(
        json.dumps(
            [{k: r[k] for k in ("label", "command", "bits", "eval", "time_s", "peak_memory_bytes")} for r in reports],
            indent=2,
        )
    )
    print(f"reports: {out}/*/report.json; summary: {summary}")
    _demo_generation(reports, out, args.model)
    return 0


DEMO_PROMPT = "The history of England"
DEMO_NEW_TOKENS = 48
ONE_BIT_CLASS = 1.5  # compute bits up to which a run counts as a 1-bit method (BiLLM: 1.09)


def _mean_ppl(report: dict[str, Any]) -> float:
    values = [evaluation["ppl"] for evaluation in report["eval"].values()]
    return sum(values) / len(values) if values else float("inf")


def _demo_generation(reports: list[dict[str, Any]], out: Path, model: str) -> None:
    """The best 1-bit-class run's checkpoint writing beside the original, each in its own process."""
    from binq.inference.bench import run_worker
    from binq.report import print_table

    one_bit = [r for r in reports if r["bits"]["linear"]["compute_bits"] <= ONE_BIT_CLASS and r["eval"]]
    if not one_bit:
        return
    best = min(one_bit, key=_mean_ppl)
    folder = out / slug(best["label"])
    loaded = load_model(model)
    prompt = list(loaded.tokenizer(DEMO_PROMPT)["input_ids"])
    threads = torch.get_num_threads()
    print(
        f"\n{best['label']} (the 1-bit-class run of lowest perplexity) beside the original: greedy, "
        f"{DEMO_NEW_TOKENS} new tokens after {DEMO_PROMPT!r}, {threads} threads, each in its own process"
    )
    engines = {
        "original (torch fp32)": {"model": model, "checkpoint": False},
        best["label"]: {"model": str(folder), "checkpoint": True},
    }
    table = Table(title="decode speed and memory")
    for column in ("model", "weights in memory MiB", "decode tok/s", "peak RSS MiB"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, spec in engines.items():
        job = {
            "task": "generate", **spec, "dtype": "float32", "device": "cpu", "threads": threads,
            "prompt_ids": prompt, "new_tokens": DEMO_NEW_TOKENS,
        }  # fmt: skip
        result = run_worker(job, threads)
        text = loaded.tokenizer.decode(result["generated"], skip_special_tokens=True)
        print(f"\n[{name}] {DEMO_PROMPT}{text}")
        table.add_row(
            name, f"{result['model_bytes'] / 2**20:,.1f}", f"{result['decode_tokens_per_s']:.1f}",
            f"{result['peak_rss_bytes'] / 2**20:,.0f}",
        )  # fmt: skip
    print()
    print_table(table)


def _load_any(spec: str) -> Any:
    """A binq checkpoint or anything ``load_model`` accepts, in fp32 on the CPU."""
    from binq.checkpoint import is_checkpoint

    if is_checkpoint(spec):  # the checkpoint's fp16 embeddings stay fp16 in memory (exact)
        return load_checkpoint(Path(spec), torch.float32, fp16_embeddings=True)
    return load_model(spec, dtype=torch.float32)


def run_generate(args: argparse.Namespace) -> int:
    from binq.inference.generate import (
        TextStream,
        check_generation_options,
        check_prompt_length,
        context_length,
        encode_prompt,
        eos_token_ids,
        generate,
    )
    from binq.inference.runtime import peak_rss_bytes, set_threads

    if not args.prompt.strip():
        raise BinqError("--prompt is empty")
    check_generation_options(args.max_new_tokens, args.temperature)
    if args.threads is not None:
        if args.threads < 1:
            raise BinqError(f"--threads must be at least 1, got {args.threads}")
        set_threads(args.threads)
    loaded = _load_any(args.model)
    ids = encode_prompt(loaded.tokenizer, args.prompt, chat=args.chat)
    check_prompt_length(len(ids), context_length(loaded.model))
    stream = TextStream(loaded.tokenizer)

    def show(token: int) -> None:
        text = stream.push(token)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    result = generate(
        loaded.model, ids, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        eos_ids=eos_token_ids(loaded.model, loaded.tokenizer), on_token=show, loop=args.loop,
    )  # fmt: skip
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    stats = result.stats
    decode = "no decode step" if stats.decode_steps == 0 else f"decode {stats.decode_tokens_per_s:.2f} tokens/s"
    print(
        f"binq generate: {stats.prompt_tokens} prompt tokens, prefill {stats.prefill_s:.3f} s "
        f"({stats.prefill_tokens_per_s:.1f} tokens/s); {stats.new_tokens} new tokens, {decode} "
        f"({stats.decode_steps} steps in {stats.decode_s:.3f} s, stopped at {stats.stop_reason}); "
        f"peak RSS {peak_rss_bytes() / 2**20:,.0f} MiB; {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from binq.inference.bench import BenchConfig, print_tables, run_bench

    config = BenchConfig(
        model=args.model, against=(args.against,), threads=args.threads, new_tokens=args.new_tokens,
        prefill=args.prefill, device=args.device, gemv=args.gemv, original=args.original,
        gguf_dir=None if args.gguf_dir is None else Path(args.gguf_dir),
        json_out=None if args.json is None else Path(args.json), loop=args.loop,
    )  # fmt: skip
    records, all_ran = run_bench(config)
    print_tables(records, config)
    if config.json_out is not None:
        print(f"wrote {config.json_out}")
    return 0 if all_ran else 1


def run_lm_eval(args: argparse.Namespace, argv: list[str]) -> int:
    """``binq lm-eval``: lm-evaluation-harness's ``simple_evaluate`` on the model through the ``binq`` model
    type, binq's offline tasks given to it as local task configs (:mod:`binq.integration.lm_eval`)."""
    from binq.integration.lm_eval_tasks import split_task_names

    # Checked before lm_eval is imported (seconds) or the model loaded.
    binq_tasks, other_tasks = split_task_names(args.tasks)
    for value, option in ((args.limit, "--limit"), (args.batch_size, "--batch-size")):
        if value is not None and value < 1:
            raise BinqError(f"{option} must be at least 1, got {value}")
    if args.bootstrap_iters < 0:
        raise BinqError(f"--bootstrap-iters must be 0 or more, got {args.bootstrap_iters}")
    _check_device_name(args.device)
    try:
        from binq.integration import lm_eval as harness
    except ImportError as err:
        missing = (err.name or "lm_eval").split(".")[0]
        raise BinqError(
            f"binq lm-eval needs lm-evaluation-harness ({missing} is missing): pip install 'binq[lmeval]'"
        ) from err
    out = Path(args.out) if args.out else Path("runs/lm-eval") / Path(args.model.rstrip("/")).name
    results = harness.run(
        args.model, binq_tasks, other_tasks, out, device=args.device, limit=args.limit, batch_size=args.batch_size,
        bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples, command=["binq", *argv],
    )  # fmt: skip
    print_table(harness.results_table(results, f"lm-eval on {args.model}"))
    print(f"wrote {out / harness.RESULTS_FILE}")
    return 0


def _check_device_name(device: str) -> None:
    from binq.engine.calibrate import check_device

    check_device(device)
