"""Where llama.cpp's logits of a binq export part from binq's: its activation rounding, measured.

    OMP_NUM_THREADS=1 python benchmarks/q1_agreement.py --checkpoint runs/catalogue/arb-group_g128 \
        --like smollm2-135m --gguf runs/llamacpp/arb-group_g128.gguf --threads 1 \
        --out runs/llamacpp/q1_agreement_arb-group_g128.json

The same steps as ``benchmarks/llamacpp.py`` (export, the same token ids to both runtimes, the logits of
every window, a greedy continuation), but binq's side is computed several times (``VARIANTS``): as it
is, and with llama.cpp's CPU roundings put into binq's model (``binq.inference.ggml_rounding``): the
activations of each linear rounded as llama.cpp rounds them for that weight's ggml type (Q8_0 blocks of
32 for Q1_0, fp16 for F16), one kind at a time and together, then also llama.cpp's attention (fp16 K/V
cache, fp16 queries and probabilities); the plain and the fully rounded model once more in fp64.
Printed, per variant: its perplexity and llama.cpp's, the largest and mean absolute logit difference
from llama.cpp, how often both rank the same token first, how many greedy tokens agree and, where the
continuations part, by how much each runtime preferred its own token (binq's margin is recomputed
without the KV cache, so on a near tie it can come out negative: binq's own cached and uncached passes
disagree there). Then:

- fp32 against fp64, for the plain and for the rounded model: how far binq's logits move when only the
  last bits of its arithmetic change. What llama.cpp and binq cannot agree better than, short of
  computing bit for bit alike.
- binq's top-1 minus top-2 logit over the windows: what a greedy argmax has to survive.
- ``--ops``: every operation of the chosen blocks fed llama.cpp's own input tensors (read from its graph,
  ``binq.inference.llamacpp.llama_cpp_tensors``), binq's output against llama.cpp's, plain and rounded:
  the per-operation reproduction, free of any difference carried from earlier operations.
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
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from binq.data import evaluation_tokens
from binq.export.gguf import rope_row_order
from binq.inference.ggml_rounding import ACTIVATION_ROUNDING, linear_types, llama_cpp_rounding, round_fp16
from binq.inference.llamacpp import llama_cpp_tensors, window_nll
from binq.report import library_versions, machine, now_utc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp import add_run_options, llama_cpp_greedy, open_llama, prepare, tensor_types  # the sibling script

ROUNDED = ("Q1_0", "Q4_0", "Q5_0", "Q8_0")
# name -> (the ggml types whose activation rounding is applied, llama.cpp's attention too, compute dtype)
VARIANTS: dict[str, tuple[tuple[str, ...], bool, torch.dtype]] = {
    "plain": ((), False, torch.float32),
    "q8_0 (Q1_0 inputs)": (ROUNDED, False, torch.float32),
    "fp16 (F16 inputs)": (("F16",), False, torch.float32),
    "q8_0 + fp16": ((*ROUNDED, "F16"), False, torch.float32),
    "q8_0 + fp16 + attention": ((*ROUNDED, "F16"), True, torch.float32),
    "plain, fp64": ((), False, torch.float64),
    "q8_0 + fp16 + attention, fp64": ((*ROUNDED, "F16"), True, torch.float64),
}
# The same computation in fp32 and fp64: how far binq moves under a change of rounding error alone.
SENSITIVITY = (("plain", "plain, fp64"), ("q8_0 + fp16 + attention", "q8_0 + fp16 + attention, fp64"))


def nll(logits: np.ndarray, window: list[int]) -> float:
    """Mean next-token NLL of ``window`` under ``logits`` (the first token is context only)."""
    shifted = logits[:-1]
    top = shifted.max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted - top).sum(-1)) + top[:, 0]
    return float((log_z - shifted[np.arange(len(window) - 1), window[1:]]).mean())


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit at every position."""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def greedy_with_logits(llm: object, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """llama.cpp's greedy continuation (as ``llama_cpp_greedy``) and its logits at every step."""
    llm.reset()
    llm.eval(prompt)
    tokens, steps = [], []
    for _ in range(n):
        steps.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
        tokens.append(int(np.argmax(steps[-1])))
        llm.eval([tokens[-1]])
    return tokens, steps


def identical_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


def op_checks(
    model: torch.nn.Module, types: dict[str, str], gguf_path: Path, window: list[int], layers: list[int], threads: int
) -> dict[str, dict[str, float]]:
    """Each operation of the chosen blocks, fed llama.cpp's own inputs: binq's result against llama.cpp's.

    llama.cpp's intermediate tensors come from its graph (``llama_cpp_tensors``); every operation gets
    the very tensor llama.cpp gave its counterpart, so no difference carries over from an earlier one.
    Per operation: the relative error (Frobenius) of binq's output, plain and with llama.cpp's rounding
    (operations without a rounding give the same number twice). Llama architecture (SmolLM2): llama.cpp's
    q/k after RoPE have each head's dims in its rotary order, binq's are put in that order to compare.
    """
    ops = "attn_norm Qcur Kcur Vcur kq kq_soft_max kqv kqv_out attn_out ffn_inp ffn_norm ffn_gate ffn_up ffn_swiglu"
    wanted = {f"{op}-{i}" for op in [*ops.split(), "ffn_out"] for i in layers} | {"result_norm"}
    found, logits = llama_cpp_tensors(gguf_path, window, lambda name: name in wanted, threads)
    t = {name: torch.from_numpy(value) for name, value in found.items()}
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    scale = head_dim**-0.5
    mask = torch.full((len(window), len(window)), float("-inf")).triu(1)
    checks: dict[str, dict[str, float]] = {}

    def linear(name: str, x: torch.Tensor, rounded: bool) -> torch.Tensor:
        rounding = ACTIVATION_ROUNDING[types[name]] if rounded else None
        with torch.no_grad():
            return model.get_submodule(name)(rounding(x) if rounding else x)

    for i in layers:
        block = f"model.layers.{i}"
        layer = model.get_submodule(block)
        q_heads = t[f"Qcur-{i}"].permute(1, 0, 2)  # (heads, tokens, head_dim), llama.cpp's rotary order
        k_heads = t[f"Kcur-{i}"].permute(1, 0, 2).repeat_interleave(heads // kv_heads, 0)
        v_heads = t[f"Vcur-{i}"].permute(1, 0, 2).repeat_interleave(heads // kv_heads, 0)
        order = rope_row_order(head_dim, 1)  # llama.cpp's rotary order of a head's dims, from HF's
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(t[f"attn_norm-{i}"][None], torch.arange(len(window))[None])
        for rounded in (False, True):
            r = round_fp16 if rounded else (lambda x: x)
            with torch.no_grad():
                q = linear(f"{block}.self_attn.q_proj", t[f"attn_norm-{i}"], rounded).reshape(-1, heads, head_dim)
                k = linear(f"{block}.self_attn.k_proj", t[f"attn_norm-{i}"], rounded).reshape(-1, kv_heads, head_dim)
                v = linear(f"{block}.self_attn.v_proj", t[f"attn_norm-{i}"], rounded).reshape(-1, kv_heads, head_dim)
                q, k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
                kq = torch.matmul(r(q_heads), r(k_heads).transpose(1, 2))
                probabilities = torch.softmax(t[f"kq-{i}"] * scale + mask, dim=-1)
                kqv = torch.matmul(r(t[f"kq_soft_max-{i}"]), r(v_heads))
                results = {
                    # q and k (after RoPE) in llama.cpp's rotary order of each head's dims.
                    "Qcur (q_proj, RoPE)": (q[0].transpose(0, 1)[..., order], t[f"Qcur-{i}"]),
                    "Kcur (k_proj, RoPE)": (k[0].transpose(0, 1)[..., order], t[f"Kcur-{i}"]),
                    "Vcur (v_proj)": (v, t[f"Vcur-{i}"]),
                    "kq (Q K^T)": (kq, t[f"kq-{i}"]),
                    "kq_soft_max": (probabilities, t[f"kq_soft_max-{i}"]),
                    "kqv (V softmax)": (kqv, t[f"kqv-{i}"]),
                    "attn_out (o_proj)": (
                        linear(f"{block}.self_attn.o_proj", t[f"kqv_out-{i}"], rounded),
                        t[f"attn_out-{i}"],
                    ),
                    "ffn_norm (RMSNorm)": (layer.post_attention_layernorm(t[f"ffn_inp-{i}"]), t[f"ffn_norm-{i}"]),
                    "ffn_gate (gate_proj)": (
                        linear(f"{block}.mlp.gate_proj", t[f"ffn_norm-{i}"], rounded),
                        t[f"ffn_gate-{i}"],
                    ),
                    "ffn_up (up_proj)": (linear(f"{block}.mlp.up_proj", t[f"ffn_norm-{i}"], rounded), t[f"ffn_up-{i}"]),
                    "ffn_swiglu": (
                        torch.nn.functional.silu(t[f"ffn_gate-{i}"]) * t[f"ffn_up-{i}"],
                        t[f"ffn_swiglu-{i}"],
                    ),
                    "ffn_out (down_proj)": (
                        linear(f"{block}.mlp.down_proj", t[f"ffn_swiglu-{i}"], rounded),
                        t[f"ffn_out-{i}"],
                    ),
                }
            for op, (ours, theirs) in results.items():
                entry = checks.setdefault(f"{i}: {op} [{types.get(_module_of(block, op), '-')}]", {})
                entry["rounded" if rounded else "plain"] = relative_error(ours, theirs)
    for rounded in (False, True):
        with torch.no_grad():
            head = linear("lm_head", t["result_norm"], rounded)
        entry = checks.setdefault(f"head: result_output (lm_head) [{types['lm_head']}]", {})
        entry["rounded" if rounded else "plain"] = relative_error(head, torch.from_numpy(logits))
    return checks


def _module_of(block: str, op: str) -> str:
    part = op[op.find("(") + 1 : op.find(")")].split(",")[0] if "(" in op else ""
    attention = part in ("q_proj", "k_proj", "v_proj", "o_proj")
    return f"{block}.{'self_attn' if attention else 'mlp'}.{part}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser, threads=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--ops", type=int, nargs="*", default=[0, 11, 29], help="blocks whose every operation is checked on window 0"
    )
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()

    import llama_cpp

    started = time.perf_counter()
    gguf_path, model, tokenizer, made_by = prepare(args)
    types = linear_types(model, gguf_path)
    print(f"{made_by}: {gguf_path}, {tensor_types(gguf_path)}; {time.perf_counter() - started:.1f} s", flush=True)

    tokens = evaluation_tokens(tokenizer, args.text, args.seqlen)
    windows = min(args.windows, tokens.shape[1] // args.seqlen)
    ids = [tokens[0, w * args.seqlen : (w + 1) * args.seqlen].tolist() for w in range(windows)]
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids

    llm = open_llama(gguf_path, args)
    theirs = [window_nll(llm, window)[1] for window in ids]
    theirs_greedy, theirs_steps = greedy_with_logits(llm, prompt[0].tolist(), args.new_tokens)
    assert theirs_greedy == llama_cpp_greedy(llm, prompt[0].tolist(), args.new_tokens)
    llm.close()
    ppl_llama_cpp = math.exp(sum(nll(logits, window) for logits, window in zip(theirs, ids, strict=True)) / windows)
    print(f"llama.cpp: PPL {ppl_llama_cpp:.6g}, greedy {tokenizer.decode(theirs_greedy)!r}", flush=True)

    results, logits_of = {}, {}
    for variant in args.variants:
        kinds, attention, dtype = VARIANTS[variant]
        model.to(dtype)
        chosen = {name: kind for name, kind in types.items() if kind in kinds}
        t0 = time.perf_counter()
        ours = []
        with torch.no_grad(), llama_cpp_rounding(model, chosen, attention=attention):
            for window in ids:
                ours.append(model(torch.tensor([window]), use_cache=False).logits[0].double().numpy())
            generated = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, use_cache=True)
            ours_greedy = generated[0, prompt.shape[1] :].tolist()
            k = identical_prefix(ours_greedy, theirs_greedy)
            split = None
            if k < args.new_tokens:  # the first step where the two continuations part: both margins, in logits
                context = torch.tensor([prompt[0].tolist() + ours_greedy[:k]])
                step = model(context, use_cache=False).logits[0, -1].double().numpy()
                a, b = ours_greedy[k], theirs_greedy[k]
                split = {
                    "step": k,
                    "binq_token": tokenizer.decode([a]),
                    "llama_cpp_token": tokenizer.decode([b]),
                    "binq_logit_margin": float(step[a] - step[b]),
                    "llama_cpp_logit_margin": float(theirs_steps[k][b] - theirs_steps[k][a]),
                }
        model.to(torch.float32)
        logits_of[variant] = ours
        difference = [np.abs(a - b) for a, b in zip(ours, theirs, strict=True)]
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ours, theirs, strict=True))
        ppl = math.exp(sum(nll(logits, window) for logits, window in zip(ours, ids, strict=True)) / windows)
        results[variant] = {
            "rounded_linears": dict(sorted({k: sum(1 for v in chosen.values() if v == k) for k in kinds}.items())),
            "attention": attention,
            "ppl_binq": ppl,
            "ppl_difference_llama_cpp_vs_binq": ppl_llama_cpp / ppl - 1,
            "max_abs_logit_difference": max(float(d.max()) for d in difference),
            "mean_abs_logit_difference": float(np.mean([d.mean() for d in difference])),
            "largest_abs_logit_binq": max(float(np.abs(a).max()) for a in ours),
            "argmax_agreement": agree / (windows * args.seqlen),
            "greedy_binq": tokenizer.decode(ours_greedy),
            "greedy_identical_tokens": identical_prefix(ours_greedy, theirs_greedy),
            "greedy_same_tokens_anywhere": sum(a == b for a, b in zip(ours_greedy, theirs_greedy, strict=False)),
            "greedy_first_split": split,
            "seconds": time.perf_counter() - t0,
        }
        r = results[variant]
        print(
            f"{variant:26s} PPL {ppl:.6g} ({r['ppl_difference_llama_cpp_vs_binq']:+.3%} llama.cpp vs this), "
            f"max |dlogit| {r['max_abs_logit_difference']:.4g}, mean {r['mean_abs_logit_difference']:.4g}, "
            f"argmax {r['argmax_agreement']:.2%}, greedy {r['greedy_identical_tokens']}/{args.new_tokens} "
            f"({r['seconds']:.0f} s)"
            + (
                ""
                if split is None
                else f"; parts at step {split['step']}: binq {split['binq_token']!r} by "
                f"{split['binq_logit_margin']:.3g}, llama.cpp {split['llama_cpp_token']!r} by "
                f"{split['llama_cpp_logit_margin']:.3g}"
            ),
            flush=True,
        )

    sensitivity = {}
    for a, b in SENSITIVITY:
        if a in logits_of and b in logits_of:
            difference = [np.abs(x - y) for x, y in zip(logits_of[a], logits_of[b], strict=True)]
            same = sum(
                int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(logits_of[a], logits_of[b], strict=True)
            )
            sensitivity[f"{a} vs {b}"] = {
                "max_abs_logit_difference": max(float(d.max()) for d in difference),
                "mean_abs_logit_difference": float(np.mean([d.mean() for d in difference])),
                "argmax_agreement": same / (windows * args.seqlen),
            }
            r = sensitivity[f"{a} vs {b}"]
            print(
                f"binq fp32 vs fp64, {a}: max |dlogit| {r['max_abs_logit_difference']:.4g}, "
                f"mean {r['mean_abs_logit_difference']:.4g}, argmax {r['argmax_agreement']:.2%}",
                flush=True,
            )

    fragility = None
    if "plain" in logits_of:
        gaps = np.concatenate([margins(a) for a in logits_of["plain"]])
        llama_gaps = np.concatenate([margins(b) for b in theirs])
        fragility = {
            "top1_top2_margin_binq": {q: float(np.quantile(gaps, p)) for q, p in (("p10", 0.1), ("median", 0.5))},
            "top1_top2_margin_llama_cpp_median": float(np.median(llama_gaps)),
            "share_of_positions_margin_below_mean_abs_difference": float(
                (gaps < results["plain"]["mean_abs_logit_difference"]).mean()
            ),
            "share_of_positions_margin_below_0.1": float((gaps < 0.1).mean()),
        }
        print("binq top-1 minus top-2 logit:", json.dumps(fragility), flush=True)

    checks = {}
    if args.ops:
        print("\nEach operation fed llama.cpp's own inputs (window 0): relative error of binq's output", flush=True)
        print(f"  {'operation [weight type]':44s} {'plain':>10s} {'rounded':>10s}")
        checks = op_checks(model, types, gguf_path, ids[0], args.ops, args.threads)
        for op, entry in checks.items():
            print(f"  {op:44s} {entry['plain']:10.2e} {entry['rounded']:10.2e}", flush=True)

    record = {
        "kind": "q1-agreement",
        "checkpoint": args.checkpoint,
        "gguf": str(gguf_path),
        "gguf_tensor_types": tensor_types(gguf_path),
        "protocol": f"{args.text}: first {windows} windows of {args.seqlen} tokens, same token ids for both",
        "ppl_llama_cpp": ppl_llama_cpp,
        "greedy_llama_cpp": tokenizer.decode(theirs_greedy),
        "prompt": args.prompt,
        "greedy_tokens": args.new_tokens,
        "variants": results,
        "fp32_vs_fp64": sensitivity,
        "fragility": fragility,
        "op_checks_window0": checks,
        "threads": args.threads,
        "command": ["python", "benchmarks/q1_agreement.py", *sys.argv[1:]],
        "created": now_utc(),
        "versions": {**library_versions(), "llama_cpp_python": llama_cpp.__version__},
        "machine": machine(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
