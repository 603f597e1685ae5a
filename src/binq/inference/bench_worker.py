"""One benchmark job in its own process: ``python -m binq.inference.bench_worker JOB.json``.

A process per engine makes each peak resident set its own (``ru_maxrss`` never goes down). The job
file (written by :mod:`binq.inference.bench`) says what to run; the last line on stdout is the
result, one JSON object. Tasks:

- ``binq``: a binq checkpoint as ``binq.load`` gives it, with whatever kernels are registered;
- ``torch``: a plain model (what ``--model`` accepts) in the job's dtype;
- ``llamacpp``: a GGUF file through llama-cpp-python (torch is never imported);
- ``quantize``: llama.cpp's quantizer, source GGUF to a variant;
- ``gemv``: the layout micro-benchmark on 7B shapes.

The engines warm up (a short prefill and a few decode steps), then measure a prefill of the job's
prompt and a decode of ``new_tokens`` tokens that ignores end-of-sequence tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from binq.errors import BinqError
from binq.inference.runtime import peak_rss_bytes, set_threads

WARMUP_PROMPT_TOKENS = 32


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _memory_bytes(model: Any) -> int:
    """Bytes of the parameters and buffers as held in memory, each storage once (tied weights)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _import_runtime(job: dict[str, Any]) -> None:
    """Import transformers and the model's modelling code before the memory baseline is taken.

    Those modules (about 190 MiB of resident Python and libraries for a LLaMA model) are the runtime,
    the same for every torch engine, not the model: the "RSS added by the model" starts after them.
    """
    import contextlib
    import importlib

    import transformers

    model_type = "llama"
    config_file = Path(job["model"]) / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", model_type)
    with contextlib.suppress(ImportError):  # an architecture transformers names otherwise loads it later
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    transformers.AutoModelForCausalLM  # noqa: B018 (the lazy auto classes resolve on first access)


def _load(job: dict[str, Any]) -> Any:
    """The job's model on its device, in eval mode."""
    import torch

    dtype = _torch_dtype(job["dtype"])
    if job.get("checkpoint", job["task"] == "binq"):
        from binq.checkpoint import load

        # No dense cache: a layout without a kernel unpacks its bits at every call, and the numbers say so.
        # The checkpoint's fp16 embeddings stay fp16 (exact), as binq generate runs them.
        return load(Path(job["model"]), dtype=dtype, device=job["device"], fp16_embeddings=True)
    from binq.models import load_model

    model = load_model(job["model"], dtype=dtype).model
    return model.to(torch.device(job["device"]))


def run_torch(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from binq.inference.gemv import model_gemv_times
    from binq.inference.generate import generate

    set_threads(job["threads"])
    device = torch.device(job["device"])
    _import_runtime(job)
    baseline = peak_rss_bytes()
    started = time.perf_counter()
    model = _load(job)
    load_s = time.perf_counter() - started
    prefill_ids, decode_ids = job["prefill_ids"], job["decode_prompt_ids"]

    loop = job.get("loop", "auto")
    generate(model, prefill_ids[:WARMUP_PROMPT_TOKENS], 1, loop=loop)
    generate(model, decode_ids, job["warmup_tokens"], ignore_eos=True, loop=loop)
    set_threads(job["threads"])  # again, in case a kernel's first call changed it
    prefill = generate(model, prefill_ids, 1, loop=loop).stats
    decoded = generate(model, decode_ids, job["new_tokens"], ignore_eos=True, loop=loop)
    decode = decoded.stats
    gemv = model_gemv_times(model, _torch_dtype(job["dtype"]), device)

    result = {
        "load_s": load_s,
        "prompt_tokens": prefill.prompt_tokens,
        "prefill_s": prefill.prefill_s,
        "prefill_tokens_per_s": prefill.prefill_tokens_per_s,
        "new_tokens": decode.new_tokens,
        "decode_steps": decode.decode_steps,
        "decode_s": decode.decode_s,
        "decode_tokens_per_s": decode.decode_tokens_per_s,
        "generated": decoded.tokens,
        "model_bytes": _memory_bytes(model),
        "baseline_rss_bytes": baseline,
        "gemv": gemv,
        "torch_threads": torch.get_num_threads(),
        "loop": decoded.loop,
    }
    if job["task"] == "binq":
        from binq.checkpoint.files import weight_files

        result["file_bytes"] = sum(file.stat().st_size for file in weight_files(job["model"]))
        from binq.nn.cpu_kernels import kernel_state_bytes

        result["kernel_bytes"] = kernel_state_bytes(model)
        result["kernels"] = sorted({record["kernel"] for record in gemv if record["layout"] != "dense"})
    if device.type == "cuda":
        result["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return result


def run_generate(job: dict[str, Any]) -> dict[str, Any]:
    """Greedy continuation of ``prompt_ids`` by ``new_tokens`` tokens, with speed and memory (``binq demo``)."""
    from binq.inference.generate import generate

    set_threads(job["threads"])
    _import_runtime(job)
    baseline = peak_rss_bytes()
    model = _load(job)
    generate(model, job["prompt_ids"], 4, loop=job.get("loop", "auto"))  # warm-up: kernels built, caches sized
    result = generate(model, job["prompt_ids"], job["new_tokens"], eos_ids=set(job.get("eos_ids", [])))
    return {
        "generated": result.tokens,
        "decode_tokens_per_s": result.stats.decode_tokens_per_s,
        "prefill_tokens_per_s": result.stats.prefill_tokens_per_s,
        "model_bytes": _memory_bytes(model),
        "baseline_rss_bytes": baseline,
        "loop": result.loop,
    }


def run_llamacpp(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    from binq.inference import llamacpp

    baseline = peak_rss_bytes()
    result = llamacpp.measure(
        Path(job["model"]),
        job["prefill_ids"],
        job["decode_prompt_ids"],
        job["new_tokens"],
        job["warmup_tokens"],
        job["threads"],
    )
    result.update({"baseline_rss_bytes": baseline, "gemv": [], "llama_cpp_version": llama_cpp.__version__})
    return result


def run_quantize(job: dict[str, Any]) -> dict[str, Any]:
    from binq.inference.llamacpp import quantize_gguf

    out = Path(job["out"])
    fallback = quantize_gguf(Path(job["source"]), out, job["variant"], job["threads"])
    return {"gguf": str(out), "model_bytes": out.stat().st_size, "fallback": fallback}


def run_gemv(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from binq.inference.gemv import SHAPES_7B, layout_microbenchmark

    set_threads(job["threads"])
    shapes = tuple(tuple(shape) for shape in job.get("shapes", SHAPES_7B))
    records = layout_microbenchmark(torch.device(job["device"]), shapes)  # type: ignore[arg-type]
    return {"results": records}


TASKS = {
    "binq": run_torch,
    "torch": run_torch,
    "generate": run_generate,
    "llamacpp": run_llamacpp,
    "quantize": run_quantize,
    "gemv": run_gemv,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m binq.inference.bench_worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        result = TASKS[job["task"]](job)
    except BinqError as error:
        print(f"binq: error: {error}", file=sys.stderr)
        return 2
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
