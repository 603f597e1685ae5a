"""Proof against a real runtime: a binq checkpoint exported to GGUF and run by llama.cpp.

    pip install --no-deps llama-cpp-python==0.3.36 diskcache   # builds llama.cpp (minutes on 2 cores)
    python benchmarks/llamacpp.py --checkpoint runs/catalogue/arb-group_g128 --like smollm2-135m --threads 1 \\
        --gguf runs/llamacpp/arb-group_g128.gguf --out runs/llamacpp/arb-group_g128.json
    python benchmarks/llamacpp.py --checkpoint smollm2-135m --gguf runs/llamacpp/original.gguf ...  # the source

Steps: ``binq export`` of the checkpoint (each linear in the smallest llama.cpp type that holds it
exactly: Q1_0, Q4_0-Q8_0, else F16/F32; ``docs/FORMAT.md``); binq's own perplexity of the same
checkpoint (``binq.load``, the GPTQ protocol on the first windows of a text); llama.cpp's perplexity on
the *same token ids* (binq's tokenizer feeds both, so a difference in pre-tokenizers cannot hide in the
comparison); the logits of both on every window (largest and mean absolute difference, and how often
their argmax agrees); the greedy continuation of a prompt by both. ``--checkpoint`` may also name the
source model (an embedded name or a ``.gguf`` file): then llama.cpp runs the source GGUF converted to
F16 by llama.cpp itself, and binq the source as it loads it (fp16 weights computed in fp32).
``--like`` is the source GGUF (or an embedded model's name, whose GGUF binq keeps in its cache), for
llama.cpp's metadata and tokenizer. ``--out`` writes the numbers as JSON (``docs/reports/llamacpp/``
holds the committed ones; ``python benchmarks/tables.py`` makes docs/BENCHMARKS.md's table of them).
Not in CI: llama-cpp-python compiles llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer

import binq
from binq.checkpoint import is_checkpoint
from binq.data import describe_eval, evaluation_tokens
from binq.evaluation import Protocol, evaluate_perplexity
from binq.export.gguf import export_gguf
from binq.inference.llamacpp import quantize_gguf, source_gguf, window_nll
from binq.report import library_versions, machine, now_utc

PROMPT = "The history of the English navy begins"


def llama_cpp_greedy(llm: object, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """How many of the GGUF's 2-D tensors (the linears and the embedding) each ggml type holds."""
    reader = gguf.GGUFReader(str(path))
    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    return dict(sorted(counts.items()))


def resolve_like(like: str | None) -> str | None:
    """``--like``: a GGUF path, or an embedded model's name (its GGUF, from binq's cache)."""
    if like is None:
        return None
    path = source_gguf(like)
    if path is None:
        raise SystemExit(f"--like {like!r} is neither a .gguf file nor an embedded model")
    return str(path)


def prepare(args: argparse.Namespace) -> tuple[Path, torch.nn.Module, object, str]:
    """The GGUF llama.cpp runs, binq's model, its tokenizer, and how the GGUF was made."""
    spec = args.checkpoint
    if is_checkpoint(spec):
        folder = Path(spec)
        gguf_path = Path(args.gguf or folder / "model.gguf")
        if not (args.reuse_gguf and gguf_path.is_file()):
            export_gguf(folder, gguf_path, like=resolve_like(args.like))
        model = binq.load(folder, cache_weight=True)
        return gguf_path, model, AutoTokenizer.from_pretrained(str(folder)), "binq export"
    source = source_gguf(spec)
    if source is None:
        raise SystemExit(f"--checkpoint {spec!r} is neither a binq checkpoint nor a source model with a GGUF")
    from binq.models import load_model

    gguf_path = Path(args.gguf or f"{source.stem}.f16.gguf")
    if not (args.reuse_gguf and gguf_path.is_file()):
        quantize_gguf(source, gguf_path, "f16", args.threads)
    loaded = load_model(spec)
    return gguf_path, loaded.model, loaded.tokenizer, f"llama.cpp's F16 of {source.name}"


def add_run_options(parser: argparse.ArgumentParser, threads: int) -> None:
    """The options of a comparison run (checkpoint, GGUF, text, windows, prompt, threads), shared with
    ``benchmarks/q1_agreement.py``."""
    parser.add_argument("--checkpoint", required=True, help="a folder of `binq quantize --out`, or the source model")
    parser.add_argument("--like", default=None, help="the source GGUF (or embedded model name), for metadata")
    parser.add_argument("--gguf", default=None, help="where to write the GGUF (default: CHECKPOINT/model.gguf)")
    parser.add_argument("--reuse-gguf", action="store_true", help="skip the export when the GGUF exists")
    parser.add_argument("--text", default="brit1911", help="evaluation text (binq's names or a file)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=threads)


def open_llama(gguf_path: Path, args: argparse.Namespace):
    """llama.cpp on ``gguf_path`` with every position's logits, sized for a window and the greedy prompt."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=args.seqlen + args.new_tokens + 64,
        n_batch=args.seqlen,
        logits_all=True,
        n_threads=args.threads,
        verbose=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, threads=2)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()

    import llama_cpp  # imported late: the export and binq's side need no llama.cpp

    started = time.perf_counter()
    gguf_path, model, tokenizer, made_by = prepare(args)
    size_mib = gguf_path.stat().st_size / 2**20
    print(f"{made_by}: {gguf_path} ({size_mib:.1f} MiB) in {time.perf_counter() - started:.1f} s")

    tokens = evaluation_tokens(tokenizer, args.text, args.seqlen)
    protocol = Protocol(args.text, describe_eval(args.text), type(tokenizer).__name__, args.seqlen, 0, 0, 0)
    ours = evaluate_perplexity(model, tokens, args.seqlen, protocol, args.windows, progress=False)
    windows = ours.protocol.windows

    llm = open_llama(gguf_path, args)
    nll_sum, max_diffs, mean_diffs, agree, positions, largest = 0.0, [], [], 0, 0, 0.0
    for w in range(windows):
        window = tokens[0, w * args.seqlen : (w + 1) * args.seqlen].tolist()
        nll, logits = window_nll(llm, window)
        nll_sum += nll
        with torch.no_grad():
            reference = model(torch.tensor([window]), use_cache=False).logits[0].double().numpy()
        difference = np.abs(logits - reference)
        max_diffs.append(float(difference.max()))
        mean_diffs.append(float(difference.mean()))
        agree += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        positions += len(window)
        largest = max(largest, float(np.abs(reference).max()))
    theirs = math.exp(nll_sum / windows)

    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True)
    ours_greedy = generated[0, prompt.shape[1] :].tolist()
    theirs_greedy = llama_cpp_greedy(llm, prompt[0].tolist(), args.new_tokens)
    same_prefix = next(
        (i for i, (a, b) in enumerate(zip(ours_greedy, theirs_greedy, strict=False)) if a != b), len(ours_greedy)
    )

    result = {
        "kind": "llamacpp-agreement",
        "checkpoint": args.checkpoint,
        "checkpoint_command": _checkpoint_command(args.checkpoint),
        "gguf": str(gguf_path),
        "gguf_made_by": made_by,
        "gguf_bytes": gguf_path.stat().st_size,
        "gguf_tensor_types": tensor_types(gguf_path),
        "protocol": f"{args.text}: first {windows} windows of {args.seqlen} tokens, same token ids for both",
        "text": args.text,
        "seqlen": args.seqlen,
        "windows": windows,
        "ppl_binq": ours.ppl,
        "ppl_llama_cpp": theirs,
        "max_abs_logit_difference_window0": max_diffs[0],
        "max_abs_logit_difference": max(max_diffs),
        "mean_abs_logit_difference": sum(mean_diffs) / len(mean_diffs),
        "largest_abs_logit_binq": largest,
        "argmax_agreement": agree / positions,
        "argmax_positions": positions,
        "prompt": args.prompt,
        "greedy_binq": tokenizer.decode(ours_greedy),
        "greedy_llama_cpp": tokenizer.decode(theirs_greedy),
        "greedy_identical_tokens": same_prefix,
        "greedy_tokens": args.new_tokens,
        "threads": args.threads,
        "command": ["python", "benchmarks/llamacpp.py", *sys.argv[1:]],
        "created": now_utc(),
        "versions": {**library_versions(), "llama_cpp_python": llama_cpp.__version__, "gguf": _version("gguf")},
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _checkpoint_command(spec: str) -> list[str] | None:
    """The ``binq quantize`` command that wrote the checkpoint (its report.json), or None for a source model."""
    report = Path(spec) / "report.json"
    return json.loads(report.read_text(encoding="utf-8"))["command"] if report.is_file() else None


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
