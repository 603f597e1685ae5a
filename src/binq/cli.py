"""The ``binq`` command line: quantize, eval, lm-eval, export, methods, demo, generate, bench, plot.

Every user error is one line on stderr and exit code 2; argparse already behaves that way for bad
options, and :class:`BinqError` does for everything found later.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from binq.errors import BinqError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_EVAL = "brit1911,persuasion"
# The quick protocol of the main job on a 2-core CPU; the full one is GPTQ's (128 x 2048, all windows).
QUICK = {"nsamples": 32, "seqlen": 512, "eval_windows": 16}
FULL = {"nsamples": 128, "seqlen": 2048, "eval_windows": None}


def _option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _add_method_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    group = parser.add_argument_group(f"options of this method ({config_class.__name__}; see `binq methods`)")
    for field in dataclasses.fields(config_class):
        default = field.default
        if isinstance(default, bool):
            group.add_argument(
                _option_name(field.name),
                dest=f"method_{field.name}",
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"default {default}",
            )
        else:
            group.add_argument(
                _option_name(field.name),
                dest=f"method_{field.name}",
                type=type(default),
                default=argparse.SUPPRESS,
                metavar=type(default).__name__.upper(),
                help=f"default {default}",
            )


def _add_protocol_options(
    parser: argparse.ArgumentParser, calibration: bool, eval_default: str | None = DEFAULT_EVAL
) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="embedded name (smollm2-135m), local folder, .gguf file or Hugging Face id",
    )
    if calibration:
        parser.add_argument(
            "--calib", default="austen", help="calibration text: austen, a built-in name, wikitext2, c4, ptb or a file"
        )
        parser.add_argument("--nsamples", type=int, default=None, help="calibration windows (128; quick 32)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window (2048; quick 512)")
    parser.add_argument(
        "--eval",
        default=eval_default,
        help="comma-separated evaluation sets (brit1911, persuasion, wikitext2, c4, ptb, a file); 'none' to skip"
        + ("" if eval_default else f" (default {DEFAULT_EVAL}; none when --tasks is given)"),
    )
    parser.add_argument(
        "--eval-windows", type=int, default=None, help="evaluate the first K windows of each set (all; quick 16)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="the quick protocol: 32 x 512 calibration tokens, 16 evaluation windows"
    )
    parser.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed (GPTQ's default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_activation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("activation quantization (simulated; W(1+1)A(1x4) = --method w11 --act-bits 4)")
    group.add_argument("--act-bits", type=int, default=16, help="bits per activation, per token (16 = none)")
    group.add_argument("--act-sym", action="store_true", help="symmetric activation grid (default asymmetric)")
    group.add_argument("--act-clip", default="search", help="clipping ratio: 'search' on calibration data, or a number")
    group.add_argument(
        "--smooth",
        default="auto",
        help="auto (channel where a norm can absorb it), none, channel (factors folded into the norm) or token",
    )
    group.add_argument("--smooth-proxy", default="w11", help="weights assumed by the channel search: w11 or none")
    group.add_argument("--act-calib-tokens", type=int, default=2048, help="tokens per linear group for the searches")


def _add_tune_options(parser: argparse.ArgumentParser) -> None:
    from binq.engine.tune import LOSSES, TARGETS, TuneConfig

    defaults = TuneConfig()
    group = parser.add_argument_group(
        "block-wise tuning of the method's scales against each block's output (docs/TUNE.md)"
    )
    group.add_argument(
        "--tune", action="store_true",
        help="after each block is quantized, tune its continuous parameters (fp16 scales, means, codebooks); "
        "layout and bits unchanged",
    )  # fmt: skip
    settings = (
        ("steps", int, "Adam steps per block at most"),
        ("edge_steps", int, "steps for the first and the last block, patience scaled alike (0: --tune-steps)"),
        ("head_steps", int, "then N more steps for the last block on the next-token KL through the model's head"),
        ("lr", float, "learning rate, about the relative change per step"),
        ("batch", int, "calibration windows per step"),
        ("tokens", int, "steps train on the first N tokens of each window (0: whole windows; checks use whole ones)"),
        ("holdout", int, "the last N calibration windows are held out: they pick the kept step and stop early"),
        ("eval_every", int, "steps between held-out checks"),
        ("patience", int, "held-out checks without improvement before a block stops"),
        ("sign_lr", float, "with --tune-signs: learning rate of the signs' latents (each starts at +-1)"),
    )
    for name, kind, text in settings:
        default = getattr(defaults, name)
        group.add_argument(f"--tune-{name.replace('_', '-')}", type=kind, default=default, help=f"{text} ({default})")
    group.add_argument(
        "--tune-signs", action="store_true",
        help="flip signs too, by a straight-through estimator (same sign planes, layout and bits)",
    )  # fmt: skip
    group.add_argument(
        "--tune-split", action="store_true",
        help="steps train on the training windows cut into windows of --tune-tokens tokens, each run from its "
        "embeddings, instead of on their prefixes: more first positions, the same tokens (docs/TUNE.md)",
    )  # fmt: skip
    group.add_argument(
        "--tune-loss", default=defaults.loss, choices=LOSSES,
        help="stream: the residual stream's error; token: each token's relative error, averaged (docs/TUNE.md)",
    )  # fmt: skip
    group.add_argument(
        "--tune-target", default=defaults.target, choices=TARGETS,
        help="original: the unquantized model's block outputs; quantized: the original block on the quantized inputs",
)  # fmt: skip


def _add_allocation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("a method per linear under a storage-bit budget (instead of --method)")
    group.add_argument(
        "--target-bits", type=float, default=None, metavar="B",
        help="choose each linear's method among --candidates, stored bits per linear weight <= B (docs/ALLOCATION.md)",
    )  # fmt: skip
    group.add_argument(
        "--candidates", default=None, metavar="SPEC",
        help="method[:option=value,...] separated by ';' (default arb-group;w11;arb-rc;gptq:bits=2;gptq:bits=3;"
        "gptq:bits=4)",
    )  # fmt: skip
    group.add_argument(
        "--sensitivity", default="block",
        help="error weighting: block (default: by each linear's measured effect on its block's output) or output",
    )  # fmt: skip


def _add_task_options(parser: argparse.ArgumentParser, title: str, lm_eval_tasks: bool = False) -> None:
    group = parser.add_argument_group(title)
    others = " (binq's offline tasks), or lm-eval's own task names (their data come from the Hub)"
    group.add_argument(
        "--tasks",
        required=lm_eval_tasks,
        default=None,
        help="comma-separated: lastword, nextsentence" + (others if lm_eval_tasks else ""),
    )
    group.add_argument("--limit", type=int, default=None, help="the first N items of each task (all)")
    group.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (8)")


def _base_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binq", description="Post-training binarization of causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    quantize = sub.add_parser("quantize", help="quantize a model, evaluate it, write report.json")
    _add_protocol_options(quantize, calibration=True)
    quantize.add_argument("--method", default=None, help="quantization method (see `binq methods`)")
    _add_allocation_options(quantize)
    quantize.add_argument(
        "--out",
        default=None,
        help="output folder: report.json and the packed checkpoint (docs/FORMAT.md); progress is kept per block "
        "in OUT/progress, and the same command run again after a kill resumes (docs/RESUME.md)",
    )
    quantize.add_argument("--label", default=None, help="name of this run in tables (default: method and bits)")
    quantize.add_argument("--hessian-dtype", default="float32", choices=("float32", "float64"))
    quantize.add_argument(
        "--true-sequential", action="store_true", help="quantize the groups of linears of a block one after another"
    )
    quantize.add_argument("--no-layer-table", action="store_true", help="do not print a row per module")
    quantize.add_argument(
        "--workers", type=int, default=None, help="processes of calibration-free methods (default: all cores)"
    )
    quantize.add_argument(
        "--in-memory", action="store_true",
        help="load the whole model instead of reading its blocks one at a time (docs/MEMORY.md); the same results",
    )  # fmt: skip
    _add_tune_options(quantize)
    quantize.add_argument(
        "--nproc", type=int, default=None, metavar="N",
        help="run on N processes of this machine through torchrun (docs/DISTRIBUTED.md); under torchrun, leave it out",
    )  # fmt: skip
    _add_activation_options(quantize)

    evaluate = sub.add_parser("eval", help="evaluate a model's perplexity and zero-shot accuracy")
    # Calibration options too: activation quantization searches its clipping and smoothing on them.
    _add_protocol_options(evaluate, calibration=True, eval_default=None)
    evaluate.add_argument("--out", default=None, help="output folder: report.json (docs/REPORT.md)")
    evaluate.add_argument("--label", default=None, help="name of this run in tables (default: the model's name)")
    _add_task_options(evaluate, "zero-shot tasks (docs/BENCHMARKS.md, 'Zero-shot tasks')")
    _add_activation_options(evaluate)

    lm_eval = sub.add_parser(
        "lm-eval", help="run lm-evaluation-harness on any model binq loads (pip install 'binq[lmeval]')"
    )
    lm_eval.add_argument(
        "--model", default=DEFAULT_MODEL, help="a binq checkpoint, embedded name, folder, .gguf file or Hub id"
    )
    lm_eval.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:N")
    lm_eval.add_argument("--out", default=None, help="output folder (default: runs/lm-eval/<model name>)")
    lm_eval.add_argument(
        "--bootstrap-iters", type=int, default=1000,
        help="lm-eval's bootstrap draws for the stderr of metrics without a closed form (1000; lm-eval's 100000)",
    )  # fmt: skip
    lm_eval.add_argument("--log-samples", action="store_true", help="keep every request's result in the JSON")
    _add_task_options(lm_eval, "tasks", lm_eval_tasks=True)

    sub.add_parser("methods", help="list the methods and their options")

    export = sub.add_parser("export", help="export a binq checkpoint (GGUF for llama.cpp, exact types)")
    export.add_argument(
        "checkpoint",
        help="a folder written by `binq quantize --out`, or an unquantized model (a safetensors folder, or the "
        "embedded name smollm2-135m), written as stored (fp16 tensors as F16)",
    )
    export.add_argument("--gguf", required=True, help="the GGUF file to write")
    export.add_argument(
        "--like",
        default=None,
        help="a GGUF of the same model to copy llama.cpp's metadata from (default: binq writes it from "
        "config.json and the tokenizer; the architectures it can: docs/FORMAT.md, GGUF export)",
    )

    demo = sub.add_parser("demo", help="the main job: several methods on the embedded model, one table")
    demo.add_argument("--full", action="store_true", help="the full protocol (128 x 2048, all windows at 2048)")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--out", default="runs/demo", help="folder for each run's report.json")
    demo.add_argument("--only", default=None, help="comma-separated labels of the runs to do (default: all)")

    generate = sub.add_parser("generate", help="continue a prompt, streaming the text (any model binq loads)")
    generate.add_argument(
        "--model", default=DEFAULT_MODEL, help="a binq checkpoint, embedded name, folder, .gguf or Hub id"
    )
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (128)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; above, sampling")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    generate.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    generate.add_argument(
        "--loop", default="auto", choices=("auto", "lean", "hf"),
        help="decode loop: lean (binq's, LLaMA-family), hf (transformers' forward) or auto (lean where it applies)",
    )  # fmt: skip

    bench = sub.add_parser("bench", help="decode/prefill speed, memory and GEMV times against the source model")
    bench.add_argument("--model", required=True, help="a binq checkpoint folder (or any model binq loads)")
    bench.add_argument(
        "--against",
        default="original,bf16,llamacpp",
        help="engines beside the checkpoint: original, bf16, llamacpp (or llamacpp-source, -f16, -q4_0, -q1_0, "
        "-tq2_0, -tq1_0, -binq); 'none' for the checkpoint alone",
    )
    bench.add_argument("--original", default=None, help="the source model, when the checkpoint does not record it")
    bench.add_argument("--threads", type=int, default=2, help="threads of every engine (2)")
    bench.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per engine (128)")
    bench.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement (512)")
    bench.add_argument("--device", default="cpu", help="cpu, or cuda for the torch engines and GEMVs")
    bench.add_argument("--gemv", action="store_true", help="also the GEMV micro-benchmark of each layout on 7B shapes")
    bench.add_argument("--gguf-dir", default=None, help="where llama.cpp's GGUF files are made (the binq cache)")
    bench.add_argument("--json", default=None, help="write the records (one per engine) to this JSON file")
    bench.add_argument(
        "--loop", default="auto", choices=("auto", "lean", "hf"),
        help="decode loop of the binq and torch engines (original-hf always uses transformers' forward)",
    )  # fmt: skip

    plot = sub.add_parser(
        "plot", help="PPL against storage bits per linear weight from reports, with the Pareto frontier (matplotlib)"
    )
    plot.add_argument(
        "reports", nargs="+", metavar="REPORT",
        help="report.json files, run folders holding one, or folders of them (binq demo --out, docs/reports/quick)",
    )  # fmt: skip
    plot.add_argument("-o", "--output", required=True, help="the image to write: .png, .svg or .pdf")
    plot.add_argument(
        "--eval", default=None,
        help="evaluation sets, comma-separated, one panel each, or 'all' (default: the first set of every report)",
    )  # fmt: skip
    plot.add_argument(
        "--anchors", default=None, metavar="JSON",
        help='points of other tools: a JSON list of {"label", "bits", "ppl": {set: value}, "series"?} '
        "(series default llama.cpp)",
    )  # fmt: skip
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = _base_parser()
    args, _ = parser.parse_known_args(argv)
    if args.command == "quantize":
        from binq.methods import get_method

        if (args.method is None) == (args.target_bits is None):
            parser.error(
                "the following arguments are required: --method (or --target-bits)"
                if args.method is None
                else f"--target-bits chooses each linear's method: leave out --method {args.method}"
            )
        if args.method is None:
            return parser.parse_args(argv)
        try:
            method = get_method(args.method)
        except BinqError as err:
            parser.error(str(err))
        quantize_parser = parser._subparsers._group_actions[0].choices["quantize"]  # type: ignore[union-attr]
        _add_method_options(quantize_parser, method.config_class)
    return parser.parse_args(argv)


def _resolve_protocol(args: argparse.Namespace) -> None:
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    if args.seqlen is not None and args.seqlen < 2:
        raise BinqError("--seqlen must be at least 2")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise BinqError("--eval-windows must be at least 1")
    _check_device(args.device)


def _check_device(device: str) -> None:
    """Checked before any model is loaded, for ``eval`` as well as ``quantize``."""
    from binq.engine.calibrate import check_device

    check_device(device)


def _eval_sets(spec: str) -> list[str]:
    if spec.strip().lower() == "none":
        return []
    sets = [s.strip() for s in spec.split(",") if s.strip()]
    if not sets:
        raise BinqError("--eval names no evaluation set (use 'none' to skip evaluation)")
    return sets


def _eval_spec(args: argparse.Namespace) -> str:
    """``binq eval``'s sets: ``--eval``, else none when ``--tasks`` is given, else the default sets."""
    if args.eval is not None:
        return args.eval
    return "none" if args.tasks else DEFAULT_EVAL


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    return {k.removeprefix("method_"): v for k, v in vars(args).items() if k.startswith("method_")}


# Set by ``--nproc`` for its torchrun workers: the command line the report records (with ``--nproc``).
LAUNCH_COMMAND_ENV = "BINQ_LAUNCH_COMMAND"


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N`` (or an abbreviation argparse took for it)."""

    def is_nproc(token: str) -> bool:
        option = token.split("=", 1)[0]
        return len(option) >= 4 and "--nproc".startswith(option)

    kept: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if is_nproc(token):
            if "=" not in token:
                next(tokens, None)
            continue
        kept.append(token)
    return kept


def _launch(args: argparse.Namespace, argv: list[str]) -> int | None:
    """``--nproc N``: check the run here, then re-run it as N torchrun workers of this machine and return
    torchrun's exit code (``None``: run in this process, as with one process)."""
    nproc = args.nproc
    if nproc < 1:
        raise BinqError(f"--nproc must be at least 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise BinqError("--nproc starts torchrun itself: under torchrun, leave it out")
    from binq.methods import get_method

    if args.target_bits is not None:
        if nproc > 1:
            raise BinqError("--target-bits runs in one process (every layer is measured before any is chosen)")
        return None
    method = get_method(args.method)
    method.make_config(**_method_options(args))  # a bad option fails here, once, not in every worker
    if args.workers not in (None, 1) and nproc > 1:
        raise BinqError("--workers does not combine with --nproc: the processes share the linears")
    if args.tune and nproc > 1:
        from binq.engine.tune import ONE_PROCESS

        raise BinqError(ONE_PROCESS)
    if not method.calibration_free and args.nsamples < nproc:
        raise BinqError(f"--nsamples {args.nsamples} is fewer than the {nproc} processes that share them")
    _eval_sets(args.eval)
    if nproc == 1:
        return None
    import torch

    gpus = torch.cuda.device_count()
    if torch.device(args.device).type == "cuda" and nproc > gpus:
        raise BinqError(f"--nproc {nproc} on CUDA needs a GPU per process; this machine has {gpus}")
    env = dict(os.environ)
    env[LAUNCH_COMMAND_ENV] = json.dumps(["binq", *argv])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # torchrun would set 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command += ["-m", "binq", *_without_nproc(argv)]
    return subprocess.run(command, env=env, check=False).returncode


def _report_argv(argv: list[str]) -> list[str]:
    """The arguments the report records: those of the ``--nproc`` command that started this worker."""
    launched = os.environ.get(LAUNCH_COMMAND_ENV)
    if launched and "WORLD_SIZE" in os.environ:
        return list(json.loads(launched))[1:]
    return argv


def _quiet() -> None:
    """A rank other than 0 of a multi-process run: warnings and errors only (rank 0 tells the story)."""
    from transformers.utils import logging as transformers_logging

    logging.getLogger().setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "methods":
            from binq.commands import list_methods

            return list_methods()
        if args.command == "export":
            from binq.export.gguf import export_gguf
            from binq.models.embedded import EMBEDDED_MODELS

            embedded = EMBEDDED_MODELS.get(args.checkpoint)
            folder = embedded() if embedded is not None else args.checkpoint
            path = export_gguf(folder, args.gguf, like=args.like)
            print(f"wrote {path}")
            return 0
        if args.command == "plot":
            from binq.plot_figure import write_plot

            path, _ = write_plot(args.reports, args.output, eval_sets=args.eval, anchors=args.anchors)
            print(f"wrote {path}")
            return 0
        if args.command == "demo":
            from binq.commands import run_demo

            return run_demo(args)
        if args.command == "lm-eval":
            from binq.commands import run_lm_eval

            return run_lm_eval(args, argv)
        if args.command in ("generate", "bench"):
            from binq import commands

            return commands.run_generate(args) if args.command == "generate" else commands.run_bench(args)
        _resolve_protocol(args)
        from binq import commands

        if args.command == "quantize":
            if args.nproc is not None:
                code = _launch(args, argv)
                if code is not None:
                    return code
            from binq.engine.distributed import process_group

            with process_group(args.device) as (rank, _):
                if rank != 0:
                    _quiet()
                return commands.run_quantize(args, _eval_sets(args.eval), _method_options(args), _report_argv(argv))
        return commands.run_eval(args, _eval_sets(_eval_spec(args)), argv)
    except BinqError as err:
        print(f"binq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("binq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
