"""Proof against a real runtime: a binq checkpoint exported to GGUF Q1_0 and run by llama.cpp.

    pip install --no-deps llama-cpp-python==0.3.36 diskcache   # builds llama.cpp (minutes on 2 cores)
    python benchmarks/llamacpp.py --checkpoint runs/ckpt-rtn --like SmolLM2-135M-Instruct.Q4_1.gguf

Steps: ``binq export`` of the checkpoint (Q1_0 where the weights fit, exact F16 elsewhere); binq's
own perplexity of the same checkpoint (``binq.load``, the GPTQ protocol on the first windows of a
text); llama.cpp's perplexity on the *same token ids* (binq's tokenizer feeds both, so a difference
in pre-tokenizers cannot hide in the comparison); the greedy continuation of a prompt by both; the
largest logit difference on the first window. Not in CI: llama-cpp-python compiles llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

import binq
from binq.data import describe_eval, evaluation_tokens
from binq.evaluation import Protocol, evaluate_perplexity
from binq.export.gguf import export_gguf
from binq.inference.llamacpp import window_nll

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a folder written by `binq quantize --out`")
    parser.add_argument("--like", default=None, help="the source GGUF, for llama.cpp's metadata and tokenizer")
    parser.add_argument("--gguf", default=None, help="where to write the GGUF (default: CHECKPOINT/model-q1_0.gguf)")
    parser.add_argument("--reuse-gguf", action="store_true", help="skip the export when the GGUF exists")
    parser.add_argument("--text", default="brit1911", help="evaluation text (binq's names or a file)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()

    from llama_cpp import Llama  # imported late: the export and binq's side need no llama.cpp

    folder = Path(args.checkpoint)
    gguf_path = Path(args.gguf or folder / "model-q1_0.gguf")
    started = time.perf_counter()
    if not (args.reuse_gguf and gguf_path.is_file()):
        export_gguf(folder, gguf_path, like=args.like)
    print(f"exported {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s")

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = binq.load(folder, cache_weight=True)
    tokens = evaluation_tokens(tokenizer, args.text, args.seqlen)
    protocol = Protocol(args.text, describe_eval(args.text), type(tokenizer).__name__, args.seqlen, 0, 0, 0)
    ours = evaluate_perplexity(model, tokens, args.seqlen, protocol, args.windows, progress=False)
    windows = ours.protocol.windows

    llm = Llama(
        model_path=str(gguf_path),
        n_ctx=args.seqlen + args.new_tokens + 64,
        n_batch=args.seqlen,
        logits_all=True,
        n_threads=args.threads,
        verbose=False,
    )
    nll_sum, max_logit_diff = 0.0, 0.0
    for w in range(windows):
        window = tokens[0, w * args.seqlen : (w + 1) * args.seqlen].tolist()
        nll, logits = window_nll(llm, window)
        nll_sum += nll
        if w == 0:
            with torch.no_grad():
                reference = model(torch.tensor([window]), use_cache=False).logits[0].double().numpy()
            max_logit_diff = float(np.abs(logits - reference).max())
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
        "checkpoint": str(folder),
        "gguf": str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "protocol": f"{args.text}: first {windows} windows of {args.seqlen} tokens, same token ids for both",
        "ppl_binq": ours.ppl,
        "ppl_llama_cpp": theirs,
        "max_abs_logit_difference_window0": max_logit_diff,
        "prompt": args.prompt,
        "greedy_binq": tokenizer.decode(ours_greedy),
        "greedy_llama_cpp": tokenizer.decode(theirs_greedy),
        "greedy_identical_tokens": same_prefix,
        "greedy_tokens": args.new_tokens,
        "command": ["python", "benchmarks/llamacpp.py", *sys.argv[1:]],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
