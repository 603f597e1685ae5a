"""llama.cpp's own quantizer on binq's source model: the anchor series of ``binq plot`` and its table.

    OMP_NUM_THREADS=1 python benchmarks/llamacpp_frontier.py            # every type, reports to docs/reports/llamacpp/
    python benchmarks/tables.py                                          # the table in docs/BENCHMARKS.md
    binq plot $(ls docs/reports/quick/*.json | grep -v -e _seed_ -e /w16_) -o docs/frontier.png --eval all \
        --anchors docs/reports/llamacpp/anchors.json                    # the plot, default seeds only

Steps (needs ``llama-cpp-python``, which compiles llama.cpp; not in CI):

1. the source: ``binq export MODEL --gguf`` of the unquantized model, every tensor as stored (the embedded
   SmolLM2's fp16 folder gives an all-F16 GGUF: exactly the weights binq calls "original");
2. the importance matrix for the IQ1/IQ2 types: the mean squared input of every column of every block
   linear of the original model (fp32, torch), over binq's calibration windows (austen, 32 x 512, seed 0),
   what llama-imatrix gives the quantizer (its sums over its counts), passed through
   ``llama_model_quantize_params.imatrix``;
3. each type by llama.cpp's ``llama_model_quantize`` of the source, with llama.cpp's own recipe (no
   ``--pure``); a block width the type's block does not divide takes llama.cpp's fallback type, and a
   type without a fallback (Q1_0 on 576-wide rows) is a report saying so, with no numbers;
4. the stored bits from the GGUF's tensor bytes (``binq.inference.llamacpp.gguf_storage``): per linear
   weight of the block linears, as binq's ``storage_bits.linear``, and for every tensor and the whole file;
5. perplexity through llama.cpp on binq's quick-protocol token ids (binq's tokenizer; the first 16
   windows of 512 of each text), and for the source, binq's own perplexity of the original beside it.

Writes ``OUT/<type>.json`` per type and ``OUT/anchors.json`` (``binq plot --anchors``: every type made but
the unquantized source). Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import binq
from binq.errors import BinqError
from binq.inference import llamacpp

log = logging.getLogger("llamacpp_frontier")

SOURCE = "f16"  # the report name of the unquantized source (F16 for an fp16 model)
DEFAULT_TYPES = (
    *("q4_k_s", "q4_0", "q3_k_s", "q2_k", "tq2_0", "tq1_0", "q1_0"),  # made without an importance matrix
    *("iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"),  # with one (llamacpp.IMATRIX_TYPES)
)
REPORT_SCHEMA = "binq.llamacpp-frontier/1"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="an embedded name or an unquantized model folder")
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated llama.cpp types")
    parser.add_argument("--eval", default="brit1911,persuasion", help="evaluation texts (binq's names)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="the first N windows of each text")
    parser.add_argument("--calib", default="austen", help="the importance matrix's calibration text")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (quantizer and evaluation)")
    parser.add_argument("--out", default="docs/reports/llamacpp", help="folder for the reports and anchors.json")
    parser.add_argument(
        "--work", default=None, help="folder for the GGUF files and the importance matrix (default: the binq cache)"
    )
    parser.add_argument("--reuse", action="store_true", help="keep GGUF files and the importance matrix already made")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """The requested types, after every check that needs no model (a BinqError for bad input)."""
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in llamacpp.QUANT_TYPES]
    if not types or unknown:
        raise BinqError(f"--types: unknown {', '.join(unknown) or '(none)'}; known: {', '.join(llamacpp.QUANT_TYPES)}")
    if args.seqlen < 2 or args.windows < 1 or args.nsamples < 1 or args.calib_seqlen < 2 or args.threads < 1:
        raise BinqError("--seqlen and --calib-seqlen must be at least 2; --windows, --nsamples, --threads at least 1")
    if not [s for s in args.eval.split(",") if s.strip()]:
        raise BinqError("--eval names no evaluation text")
    reason = llamacpp.unavailable_reason()
    if reason is not None:
        raise BinqError(reason)
    return [t for t in types if t != SOURCE]


def model_folder(spec: str) -> Path:
    """The unquantized safetensors folder of ``spec`` (an embedded model is fetched and converted once)."""
    from binq.checkpoint.load import is_checkpoint
    from binq.models.embedded import EMBEDDED_MODELS

    if spec in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[spec]()
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise BinqError(f"--model: {spec} is neither an embedded model nor a folder with config.json")
    if is_checkpoint(folder):
        raise BinqError(f"--model: {spec} is a binq checkpoint; llama.cpp's source must be the unquantized model")
    return folder


def importance_matrix(loaded: Any, windows: Any) -> dict[str, np.ndarray]:
    """Mean squared input per column of every block linear over ``windows``, by GGUF tensor name."""
    import gguf
    import torch

    from binq.export.gguf_metadata import GGUF_ARCHS
    from binq.models.architectures import named_linears

    config = loaded.model.config
    arch = GGUF_ARCHS[config.model_type]
    name_map = gguf.TensorNameMap(arch.gguf_arch, config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for item in named_linears(loaded.model, loaded.architecture):
        name = name_map.get_name(item.full_name + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise BinqError(f"no llama.cpp name for {item.full_name}")

        def record(module: Any, inputs: tuple, output: Any, name: str = name) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        hooks.append(item.linear.register_forward_hook(record))
    try:
        with torch.no_grad():
            for window in windows:
                loaded.model(window[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


def llama_ppl(gguf_path: Path, tokens: dict[str, Any], seqlen: int, windows: int, threads: int) -> dict[str, Any]:
    """PPL per text through llama.cpp on the given token ids, and the logits of each text's first window."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=seqlen,
        n_batch=seqlen,
        n_ubatch=seqlen,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    ppl, first_logits = {}, {}
    for name, ids in tokens.items():
        nll_sum = 0.0
        for w in range(windows):
            nll, logits = llamacpp.window_nll(llm, ids[0, w * seqlen : (w + 1) * seqlen].tolist())
            nll_sum += nll
            if w == 0:
                first_logits[name] = logits
        ppl[name] = math.exp(nll_sum / windows)
    llm.close()
    return {"ppl": ppl, "first_logits": first_logits}


def anchor_of(report: dict[str, Any]) -> dict[str, Any]:
    """The ``binq plot --anchors`` entry of a type's report: its label, bits per linear weight and PPL."""
    return {
        "label": report["type"],
        "bits": report["storage"]["bits_linear"],
        "ppl": report["ppl"],
        "series": "llama.cpp",
    }


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    import llama_cpp

    found = {"binq": binq.__version__, "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version()}
    for package in ("gguf", "numpy", "torch", "transformers"):
        found[package] = metadata.version(package)
    return found


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run(args: argparse.Namespace, types: list[str]) -> int:
    import torch

    from binq.data import calibration_windows, describe_eval, evaluation_tokens
    from binq.evaluation import Protocol, evaluate_perplexity
    from binq.export.gguf import export_gguf
    from binq.models.embedded import default_cache_dir
    from binq.models.loading import load_model

    folder = model_folder(args.model)
    work = Path(args.work) if args.work else default_cache_dir() / "llamacpp-frontier" / folder.name
    out = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    command = ["python", "benchmarks/llamacpp_frontier.py", *sys.argv[1:]]
    common = {
        "schema": REPORT_SCHEMA,
        "kind": "llamacpp-frontier",
        "model": args.model,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "llama_cpp_threads": args.threads,
        },
    }

    source = work / "source-f16.gguf"
    if not (args.reuse and source.is_file()):
        export_gguf(folder, source)
    loaded = load_model(str(folder))
    sets = [s.strip() for s in args.eval.split(",") if s.strip()]
    tokens = {name: evaluation_tokens(loaded.tokenizer, name, args.seqlen) for name in sets}
    protocol = {}
    for name, ids in tokens.items():
        available = ids.shape[1] // args.seqlen
        if available < args.windows:
            raise BinqError(f"{name}: {available} windows of {args.seqlen}, fewer than --windows {args.windows}")
        protocol[name] = {
            "description": describe_eval(name),
            "tokenizer": type(loaded.tokenizer).__name__,
            "seqlen": args.seqlen,
            "windows": args.windows,
            "windows_available": available,
            "tokens": int(ids.shape[1]),
            "same token ids": "binq's evaluation_tokens, fed to llama.cpp as ids (no llama.cpp tokenizer)",
        }
    common["protocol"] = protocol

    # The sanity row: binq's own PPL of the original beside llama.cpp's on the unquantized source.
    ours, first_reference = {}, {}
    for name, ids in tokens.items():
        prot = Protocol(name, describe_eval(name), type(loaded.tokenizer).__name__, args.seqlen, 0, 0, 0)
        ours[name] = evaluate_perplexity(loaded.model, ids, args.seqlen, prot, args.windows, progress=False).ppl
        with torch.no_grad():
            first_reference[name] = loaded.model(ids[:, : args.seqlen], use_cache=False).logits[0].double().numpy()
    theirs = llama_ppl(source, tokens, args.seqlen, args.windows, args.threads)
    source_report = {
        **common,
        "type": "F16",
        "variant": SOURCE,
        "made": True,
        "made_by": f"binq export {args.model} --gguf {source.name} (every tensor as stored)",
        "storage": llamacpp.gguf_storage(source),
        "ppl": theirs["ppl"],
        "ppl_binq_original": ours,
        "ppl_relative_difference": {k: theirs["ppl"][k] / ours[k] - 1 for k in ours},
        "max_abs_logit_difference_window0": {
            k: float(np.abs(theirs["first_logits"][k] - first_reference[k]).max()) for k in ours
        },
    }
    write_json(out / f"{SOURCE}.json", source_report)
    log.info("source F16: llama.cpp PPL %s, binq %s", theirs["ppl"], ours)

    imatrix, imatrix_info = None, None
    if any(t in llamacpp.IMATRIX_TYPES for t in types):
        cached = work / f"imatrix-{args.calib}-{args.nsamples}x{args.calib_seqlen}-seed{args.seed}.npz"
        if args.reuse and cached.is_file():
            with np.load(cached) as stored:
                imatrix = {name: stored[name] for name in stored.files}
        else:
            windows = calibration_windows(loaded.tokenizer, args.calib, args.nsamples, args.calib_seqlen, args.seed)
            started = time.perf_counter()
            imatrix = importance_matrix(loaded, windows)
            log.info("importance matrix: %d tensors in %.0f s", len(imatrix), time.perf_counter() - started)
            np.savez(cached, **imatrix)
        imatrix_info = {
            "calibration": {
                "source": args.calib,
                "nsamples": args.nsamples,
                "seqlen": args.calib_seqlen,
                "seed": args.seed,
            },
            "tensors": len(imatrix),
            "values": "mean squared input per column of each block linear (llama-imatrix's sums over its counts), "
            "computed by binq with torch on the original model in fp32",
        }
    del loaded

    anchors = []
    for variant in types:
        name = variant.upper()
        gguf_path = work / f"{variant}.gguf"
        uses_imatrix = variant in llamacpp.IMATRIX_TYPES
        report: dict[str, Any] = {
            **common,
            "type": name,
            "variant": variant,
            "imatrix": imatrix_info if uses_imatrix else None,
        }
        try:
            fallback = None
            if not (args.reuse and gguf_path.is_file()):
                fallback = llamacpp.quantize_gguf(
                    source, gguf_path, variant, args.threads, imatrix if uses_imatrix else None
                )
        except BinqError as error:
            report.update(made=False, reason=str(error))
            write_json(out / f"{variant}.json", report)
            log.warning("%s not made: %s", name, error)
            continue
        measured = llama_ppl(gguf_path, tokens, args.seqlen, args.windows, args.threads)
        storage = llamacpp.gguf_storage(gguf_path)
        report.update(made=True, fallback_warning=fallback, storage=storage, ppl=measured["ppl"])
        write_json(out / f"{variant}.json", report)
        anchors.append(anchor_of(report))
        log.info("%s: %.3f bits per linear weight, PPL %s", name, storage["bits_linear"], measured["ppl"])
    anchors.sort(key=lambda a: a["bits"])
    write_json(out / "anchors.json", anchors)
    log.info("wrote %d reports and %s", len(types) + 1, out / "anchors.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        types = check_args(args)
        return run(args, types)
    except BinqError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
