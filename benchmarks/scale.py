"""Quantize a synthetic LLaMA-shaped model larger than one block at a time could hide, sampling resident memory.

    python benchmarks/scale.py build --layers 32 --out runs/scale/synthetic-32   # ~2.7 B parameters, fp16, 5.5 GB
    python benchmarks/scale.py run --model runs/scale/synthetic-32 --method gptq --bits 2 --out docs/reports/scale
    python benchmarks/scale.py run --model ... --method rtn --bits 2 --in-memory ...   # the whole-model path
    python benchmarks/scale.py nproc --model runs/scale/synthetic-4 --method gptq --bits 2 --out docs/reports/scale

``build`` writes a random model (seeded) as transformers writes one: safetensors shards of one block
each, ``model.safetensors.index.json``, ``config.json`` and the embedded SmolLM2 tokenizer (the
vocabulary sizes the embedding). Weights are N(0, 0.02) in fp16, norms one; the width is LLaMA-3B's
class (hidden 2560, MLP 7168, 20 heads of 128), the embedding tied.

``run`` runs ``binq quantize`` in its own process on it (a few calibration windows of the Austen texts,
a short evaluation) and samples the resident memory of that process and its children every 50 ms; the
report's own peak (``ru_maxrss``) is recorded too. ``nproc`` times the same quantization in one process
(1 and 2 threads) and in two torchrun processes of one thread each. Each writes one JSON file to
``--out``; ``benchmarks/tables.py`` builds the "scale" section of docs/BENCHMARKS.md from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HIDDEN, FFN, HEADS = 2560, 7168, 20


def build(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from binq.models import ensure_smollm2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2()))
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=len(tokenizer),
        max_position_embeddings=2048, tie_word_embeddings=True, dtype="float16",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed)
    total = args.layers + 1
    weight_map: dict[str, str] = {}
    size = 0

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.float16)

    shapes = {
        "self_attn.q_proj": (args.hidden, args.hidden), "self_attn.k_proj": (args.hidden, args.hidden),
        "self_attn.v_proj": (args.hidden, args.hidden), "self_attn.o_proj": (args.hidden, args.hidden),
        "mlp.gate_proj": (args.ffn, args.hidden), "mlp.up_proj": (args.ffn, args.hidden),
        "mlp.down_proj": (args.hidden, args.ffn),
    }  # fmt: skip
    for index in range(total):
        file = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        if index < args.layers:
            prefix = f"model.layers.{index}."
            tensors = {prefix + name + ".weight": normal(*shape) for name, shape in shapes.items()}
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[prefix + norm + ".weight"] = torch.ones(args.hidden, dtype=torch.float16)
        else:
            tensors = {
                "model.embed_tokens.weight": normal(config.vocab_size, args.hidden),
                "model.norm.weight": torch.ones(args.hidden, dtype=torch.float16),
            }
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = file
            size += tensor.numel() * tensor.element_size()
        print(f"wrote {file}", flush=True)
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{out}: {size / 2 / 1e9:.2f} B parameters, {size / 2**30:.2f} GiB")
    return 0


class Sampler:
    """The largest resident memory of a process and its children, sampled every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.process, self.period, self.peak = psutil.Process(pid), period, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.is_set():
            try:
                family = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in family if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(self.period)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def _here(path: str | Path) -> str:
    """``path`` relative to the working folder when it is inside it (the commands the tables show)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(path)


def _quantize_command(args: argparse.Namespace, out: Path, nproc: int | None = None) -> list[str]:
    model = args.model if not Path(args.model).exists() else _here(args.model)
    command = ["binq", "quantize", "--model", model, "--method", args.method]
    if args.bits is not None:
        command += ["--bits", str(args.bits)]
    command += ["--calib", "austen", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    command += ["--eval", args.eval, "--eval-windows", str(args.eval_windows), "--out", _here(out)]
    command += ["--no-layer-table", "--no-progress"]
    if args.in_memory:
        command.append("--in-memory")
    if nproc is not None:
        command += ["--nproc", str(nproc)]
    return command


def _timed(command: list[str], threads: int, log: Path) -> tuple[float, int, int]:
    """Run ``command`` (``binq ...`` as ``python -m binq ...``): wall seconds, sampled peak, exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "binq", *command[1:]], stdout=sink, stderr=sink, env=env)
        sampler = Sampler(process.pid)
        code = process.wait()
    return time.perf_counter() - started, sampler.stop(), code


def _model_facts(spec: str) -> dict[str, Any]:
    """Name, depth, width and parameter count of a model folder (or the embedded model)."""
    from binq.checkpoint.files import checkpoint_entries
    from binq.models import EMBEDDED_MODELS

    folder = EMBEDDED_MODELS[spec]() if spec in EMBEDDED_MODELS else Path(spec)
    config = json.loads((folder / "config.json").read_text())
    entries = checkpoint_entries(folder)
    return {
        "name": spec if spec in EMBEDDED_MODELS else folder.name,
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "ffn": config["intermediate_size"],
        "parameters": sum(math.prod(entry.shape) for _, entry in entries.values()),
    }


def run(args: argparse.Namespace) -> int:
    reports = Path(args.out)
    reports.mkdir(parents=True, exist_ok=True)
    facts = _model_facts(args.model)
    name = f"{facts['name']}-{args.method}{args.bits or ''}{'-in-memory' if args.in_memory else ''}"
    work = Path(args.work) / name
    command = _quantize_command(args, work)
    print("$", shlex.join(command), flush=True)
    wall, sampled, code = _timed(command, args.threads, Path(args.work) / f"{name}.log")
    if code != 0:
        print(f"failed with exit code {code}: see {Path(args.work) / f'{name}.log'}")
        return 1
    report = json.loads((work / "report.json").read_text())
    result = {
        "kind": "scale", "name": name, "model": facts, "method": args.method, "bits": args.bits,
        "streamed": bool(report["engine"].get("streamed")), "threads": args.threads,
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen}, "beside": args.beside,
        "evaluation": {"sets": args.eval, "windows": args.eval_windows},
        "command": command, "wall_s": wall, "time_s": report["time_s"],
        "peak_rss_sampled_bytes": sampled, "peak_memory_bytes": report["peak_memory_bytes"],
        "ppl": report["ppl"], "storage_bits": report["storage_bits"], "created": report["created"],
        "binq_commit": _commit(),
        "machine": report["machine"],
    }  # fmt: skip
    (reports / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("name", "wall_s", "peak_rss_sampled_bytes", "peak_memory_bytes")}))
    return 0


def _commit() -> str | None:
    """The commit of the binq that runs (the folder of the ``binq`` package imported here)."""
    import binq

    done = subprocess.run(
        ["git", "-C", str(Path(binq.__file__).parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or None


def nproc(args: argparse.Namespace) -> int:
    """The quantization stage in one process (1 and 2 threads) and in two processes of one thread each.

    Every lane holds the model whole (``--in-memory``): a multi-process run does, and a streamed run's
    quantization stage also advances the layer-wise evaluation, which would not compare."""
    args.in_memory = True
    reports = Path(args.out)
    reports.mkdir(parents=True, exist_ok=True)
    facts = _model_facts(args.model)
    lanes = [("1 process, 1 thread", 1, None), ("1 process, 2 threads", 2, None), ("2 processes, 1 thread each", 1, 2)]
    if args.lanes is not None:
        lanes = [lanes[int(k) - 1] for k in args.lanes.split(",")]
    name = f"{facts['name']}-{args.method}{args.bits or ''}-nproc"
    earlier = reports / f"{name}.json"  # lanes not rerun keep their earlier measurement (with its time)
    kept = json.loads(earlier.read_text())["lanes"] if args.lanes is not None and earlier.is_file() else []
    rows = [lane for lane in kept if lane["lane"] not in {label for label, _, _ in lanes}]
    for label, threads, processes in lanes:
        work = Path(args.work) / f"nproc-{threads}-{processes or 1}"
        command = _quantize_command(args, work, processes)
        print("$", f"OMP_NUM_THREADS={threads}", shlex.join(command), flush=True)
        wall, sampled, code = _timed(command, threads, Path(args.work) / f"nproc-{threads}-{processes or 1}.log")
        if code != 0:
            print(f"failed with exit code {code}")
            return 1
        report = json.loads((work / "report.json").read_text())
        rows.append({
            "lane": label, "threads": threads, "processes": processes or 1, "command": command,
            "quantize_s": report["time_s"]["quantize"], "wall_s": wall, "peak_rss_sampled_bytes": sampled,
            "ppl": report["ppl"], "created": report["created"], "binq_commit": _commit(),
        })  # fmt: skip
        print(json.dumps(rows[-1]["quantize_s"]))
    order = ["1 process, 1 thread", "1 process, 2 threads", "2 processes, 1 thread each"]
    rows.sort(key=lambda lane: order.index(lane["lane"]))
    result = {
        "kind": "scale-nproc", "name": name, "model": facts,
        "method": args.method, "bits": args.bits, "lanes": rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    (reports / f"{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("build", help="write a synthetic model")
    make.add_argument("--out", required=True)
    make.add_argument("--layers", type=int, default=32)
    make.add_argument("--hidden", type=int, default=HIDDEN)
    make.add_argument("--ffn", type=int, default=FFN)
    make.add_argument("--heads", type=int, default=HEADS)
    make.add_argument("--seed", type=int, default=0)
    for name in ("run", "nproc"):
        lane = sub.add_parser(name, help="quantize it, sampling memory" if name == "run" else "time 1 vs 2 processes")
        lane.add_argument("--model", required=True)
        lane.add_argument("--method", default="gptq")
        lane.add_argument("--bits", type=int, default=None)
        lane.add_argument("--nsamples", type=int, default=8, help="calibration windows")
        lane.add_argument("--seqlen", type=int, default=512)
        lane.add_argument("--eval", default="brit1911")
        lane.add_argument("--eval-windows", type=int, default=4)
        lane.add_argument("--threads", type=int, default=2)
        lane.add_argument("--in-memory", action="store_true")
        if name == "nproc":
            lane.add_argument(
                "--lanes", default=None, help="rerun only these lanes (1, 2, 3, comma-separated); the others are kept"
            )
        lane.add_argument(
            "--beside", default=None,
            help="what else ran on the machine meanwhile (recorded; the tables then show no times for the lane)",
        )  # fmt: skip
        lane.add_argument("--out", default="docs/reports/scale", help="folder of the result files")
        lane.add_argument("--work", default="runs/scale", help="folder of the runs' checkpoints and logs")
    args = parser.parse_args()
    return {"build": build, "run": run, "nproc": nproc}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
