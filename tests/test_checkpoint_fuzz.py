"""Fuzzing the checkpoint loader: a damaged checkpoint fails with one line, never a traceback.

Six tiny checkpoints are made once (a tiny llama, tests/conftest.py, quantized with ``arb-group``,
``arb-llm-rc``, ``billm``, ``gptq`` 3-bit act-order, ``msb`` and ``w11`` with a 4-bit activation plan:
the ``binary``, ``uniform`` and ``multiscale`` layouts, bitmaps, salient columns, column scales, group
indices, exact-zero lists, an fp16 checkpoint). Each case damages a copy's ``model.safetensors`` or
``config.json`` with a seeded mutation (``random.Random(name)``: the same cases every run) and loads it
with ``binq.load``; every third case whose damage binq itself validates also goes through
``AutoModelForCausalLM.from_pretrained``, which must agree. A case ends in one of two ways:

- a :class:`BinqError` whose message is one non-empty line naming what is wrong (the file, or a quoted
  tensor, module or field);
- a model whose quantized tensors passed validation (every layout's ``from_packed``) and that runs a
  forward pass: a flipped sign bit, two swapped norms or a smaller clip ratio are still checkpoints.

Anything else fails: another exception type, a case running past ``CASE_TIMEOUT_S``, or the process
dying (a read past the end of the memory-mapped file). Damage that always breaks a file (a truncation,
overlapping offsets, a missing tensor, a wrong type in ``quantization_config``) must be refused, and
damage that keeps it valid (whitespace around the header JSON) must load. ``KNOWN`` lists every damage
that escaped before the loader was hardened, each run on its own.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import struct
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import binq
from binq.activations import ActivationConfig, calibrate_activations
from binq.checkpoint import WEIGHTS_FILE, save_checkpoint
from binq.engine.calibrate import quantize_model
from binq.errors import BinqError
from binq.methods import get_method
from binq.models import get_architecture
from binq.nn import BinaryLinear, quantized_weights
from binq.quant.structured import QuantizedWeight
from conftest import build_tiny_model, build_tiny_tokenizer, random_ids

# A config.json with a size of 0 builds zero-element tensors (on the meta device) before it is refused.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")

# label -> (method, options, with an activation plan). Options keep every layout feature in play.
CHECKPOINTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "arb-group": ("arb-group", {"group_size": 32}, False),
    "arb-rc": ("arb-llm-rc", {}, False),  # column scales, and a bitmap over the salient columns too
    "billm": ("billm", {}, False),
    "gptq-3bit": ("gptq", {"bits": 3, "group_size": 32, "act_order": True}, False),
    # 5 groups: 3 index bits, so a flipped index can point past the last group.
    "msb": ("msb", {"groups": 5, "granularity": "block", "block_size": 32}, False),
    "w11-a4": ("w11", {"block_size": 32}, True),
}
CASE_TIMEOUT_S = 30  # a tiny checkpoint loads in a tenth of a second; this is a hang
FROM_PRETRAINED_EVERY = 3  # every third case of the binq-owned mutations also goes through transformers
CONFIG_FILE = "config.json"
# A message names the file, a quoted tensor / module / field, or a module by its dotted path.
NAMES_SOMETHING = re.compile(
    r"model\.safetensors|config\.json|quantization_config|format version|'[^']+'|\bmodel\.\w+\."
)


@dataclass(frozen=True)
class Pristine:
    """A saved checkpoint: its folder, the bytes of its two files, and the parsed safetensors header."""

    folder: Path
    weights: bytes
    config: bytes
    data_start: int
    header: dict[str, Any]
    modules: dict[str, Any]  # quantization_config.modules

    @property
    def data(self) -> bytes:
        return self.weights[self.data_start :]

    @property
    def config_json(self) -> dict[str, Any]:
        return json.loads(self.config)

    def tensor_names(self) -> list[str]:
        return [name for name in self.header if name != "__metadata__"]

    def is_packed(self, name: str) -> bool:
        module, _, tensor = name.rpartition(".")
        return module in self.modules and tensor != "bias"


@dataclass(frozen=True)
class Case:
    """One damaged checkpoint: what was done, the two files' bytes, and what the loader must do."""

    what: str
    weights: bytes
    config: bytes
    must: str = "either"  # "refuse", "load" or "either"
    message: str | None = None  # a regex the refusal's message must contain
    via_transformers: bool = True  # the damage is in what binq validates (not transformers' own config)


Mutation = Callable[[random.Random, Pristine], Case]


def _quantize(label: str) -> tuple[nn.Module, dict[str, QuantizedWeight], Any]:
    method, options, activations = CHECKPOINTS[label]
    model = build_tiny_model("llama", seed=1)
    if method == "msb":  # exact zeros: the layout's zero_positions tensor
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[3, 5:9] = 0
    arch = get_architecture(model)
    ids = random_ids(4, 16, seed=1)
    plan = None
    if activations:
        plan = calibrate_activations(
            model, arch, ids, ActivationConfig(bits=4, smooth="channel", calib_tokens=64), progress=False
        )
    spec = get_method(method)
    result = quantize_model(model, arch, ids, spec, spec.make_config(**options), progress=False)
    return model, result.weights, plan


def _save(label: str, folder: Path) -> None:
    model, weights, plan = _quantize(label)
    method, options, activations = CHECKPOINTS[label]
    dtype = torch.float16 if activations else torch.float32
    tokenizer = build_tiny_tokenizer()
    save_checkpoint(
        model, weights, folder, tokenizer=tokenizer, method=method, method_config=options, dtype=dtype, activations=plan
    )


def split_header(blob: bytes) -> tuple[int, dict[str, Any]]:
    (length,) = struct.unpack("<Q", blob[:8])
    return 8 + length, json.loads(blob[8 : 8 + length])


def assemble(header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (a dict, or the exact JSON bytes) and a data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pristine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside conftest's one-thread fixture
    try:
        made = {}
        for label in CHECKPOINTS:
            folder = tmp_path_factory.mktemp(f"fuzz-{label}")
            _save(label, folder)
            weights, config = (folder / WEIGHTS_FILE).read_bytes(), (folder / CONFIG_FILE).read_bytes()
            data_start, header = split_header(weights)
            modules = json.loads(config)["quantization_config"]["modules"]
            made[label] = Pristine(folder, weights, config, data_start, header, modules)
            with torch.no_grad():  # the pristine checkpoint loads and runs (and compiles any kernel once)
                binq.load(folder)(random_ids(1, 4))
        return made
    finally:
        torch.set_num_threads(threads)


# --- running one case ---------------------------------------------------------------------------------------


class CaseTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_and_run(folder: Path, via: str) -> nn.Module:
    if via == "binq.load":
        model = binq.load(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    linears = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert linears, "no BinaryLinear in the loaded model"
    assert not any(t.is_meta for m in linears for t in m.packed_tensors().values()), "a packed tensor is unloaded"
    quantized_weights(model)  # every weight rebuilds: from_packed's checks passed
    with torch.no_grad():
        vocab = model.get_input_embeddings().num_embeddings
        model(torch.randint(0, vocab, (1, 4), generator=torch.Generator().manual_seed(0)))  # finite or not
    return model


def outcome(folder: Path, via: str) -> tuple[str, str]:
    """("refused", message) or ("loaded", ""); any other exception propagates."""
    try:
        with time_limit(CASE_TIMEOUT_S):
            load_and_run(folder, via)
    except BinqError as error:
        return "refused", str(error)
    return "loaded", ""


def check_message(message: str) -> str | None:
    """What is wrong with a refusal's message, or None."""
    if not message.strip():
        return "empty message"
    if "\n" in message or "\r" in message:
        return "message of more than one line"
    if len(message) > 1000:
        return f"message of {len(message)} characters"
    if not NAMES_SOMETHING.search(message):
        return "message names no file, tensor, module or field"
    return None


def replace_file(path: Path, content: bytes) -> None:
    """Write ``path`` anew (a new inode): a model of an earlier case may still map the old file."""
    partial = path.with_name(path.name + ".new")
    partial.write_bytes(content)
    partial.replace(path)


def run_cases(pristine: Pristine, work: Path, cases: list[Case]) -> dict[str, int]:
    """Run every case in ``work`` (a copy of the checkpoint); fail listing every case that went wrong."""
    shutil.copytree(pristine.folder, work)
    failures: list[str] = []
    counts = {"refused": 0, "loaded": 0}
    for index, case in enumerate(cases):
        replace_file(work / WEIGHTS_FILE, case.weights)
        replace_file(work / CONFIG_FILE, case.config)
        vias = ["binq.load"]
        if case.via_transformers and index % FROM_PRETRAINED_EVERY == 0:
            vias.append("from_pretrained")
        results = {}
        for via in vias:
            try:
                results[via] = outcome(work, via)
            except Exception as error:  # what the fuzzing is looking for (CaseTimeout included)
                where = traceback.extract_tb(error.__traceback__)[-1]
                line = str(error).splitlines()[0][:300] if str(error) else ""
                failures.append(
                    f"[{case.what}] {via}: {type(error).__name__}: {line} ({Path(where.filename).name}:{where.lineno})"
                )
                continue
            kind, message = results[via]
            if via == "binq.load":
                counts[kind] += 1
            problem = check_message(message) if kind == "refused" else None
            if problem is None and case.must == "refuse" and kind == "loaded":
                problem = "loaded, but this damage must be refused"
            if problem is None and case.must == "load" and kind == "refused":
                problem = "refused a valid checkpoint"
            if problem is None and kind == "refused" and case.message and not re.search(case.message, message):
                problem = f"the message does not match {case.message!r}"
            if problem is not None:
                failures.append(f"[{case.what}] {via}: {problem}: {message!r}")
        if len({kind for kind, _ in results.values()}) > 1:
            failures.append(f"[{case.what}] binq.load and from_pretrained disagree: {results}")
    assert not failures, f"{len(failures)} failures in {len(cases)} cases:\n" + "\n".join(failures)
    return counts


# --- mutations of model.safetensors -------------------------------------------------------------------------


def truncate_weights(rng: random.Random, p: Pristine) -> Case:
    region = rng.choice(["length prefix", "header", "data"])
    bounds = {"length prefix": (0, 8), "header": (8, p.data_start), "data": (p.data_start, len(p.weights))}[region]
    cut = rng.randrange(*bounds)
    what = f"model.safetensors cut at byte {cut} of {len(p.weights)} ({region})"
    return Case(what, p.weights[:cut], p.config, must="refuse", message="truncated")


def _flip(rng: random.Random, blob: bytearray, lo: int, hi: int) -> str:
    position = rng.randrange(lo, hi)
    if rng.random() < 0.5:
        bit = rng.randrange(8)
        blob[position] ^= 1 << bit
        return f"bit {bit} of byte {position}"
    blob[position] = rng.randrange(256)
    return f"byte {position} = {blob[position]:#04x}"


def flip_header(rng: random.Random, p: Pristine) -> Case:
    blob = bytearray(p.weights)
    flips = [_flip(rng, blob, 8, p.data_start) for _ in range(rng.randint(1, 3))]
    return Case(f"header: {', '.join(flips)}", bytes(blob), p.config)


def flip_data(rng: random.Random, p: Pristine) -> Case:
    names = p.tensor_names()
    packed = [n for n in names if p.is_packed(n)]
    name = rng.choice(packed if rng.random() < 0.7 else names)
    begin, end = p.header[name]["data_offsets"]
    blob = bytearray(p.weights)
    flips = [_flip(rng, blob, p.data_start + begin, p.data_start + end) for _ in range(rng.randint(1, 4))]
    return Case(f"data of '{name}': {', '.join(flips)}", bytes(blob), p.config)


OTHER_SIZE_DTYPES = {1: ["F16", "I32", "F64"], 2: ["U8", "F32", "I64"], 4: ["F16", "U8", "F64"], 8: ["F32", "U8"]}
SAME_SIZE_DTYPES = {"U8": ["I8", "BOOL"], "I8": ["U8"], "BOOL": ["U8"], "F16": ["BF16", "I16"], "BF16": ["F16"]}
SAME_SIZE_DTYPES |= {"I16": ["F16"], "F32": ["I32"], "I32": ["F32"], "F64": ["I64"], "I64": ["F64"]}
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _header(p: Pristine) -> dict[str, Any]:
    return json.loads(json.dumps(p.header))


def _pick(rng: random.Random, p: Pristine, packed_share: float = 0.6) -> str:
    names = p.tensor_names()
    packed = [n for n in names if p.is_packed(n)]
    return rng.choice(packed if rng.random() < packed_share else names)


def _equal_size_pair(rng: random.Random, p: Pristine) -> tuple[str, str]:
    by_size: dict[int, list[str]] = {}
    for name in p.tensor_names():
        begin, end = p.header[name]["data_offsets"]
        by_size.setdefault(end - begin, []).append(name)
    groups = [names for size, names in sorted(by_size.items()) if len(names) > 1 and size > 0]
    first, second = rng.sample(rng.choice(groups), 2)
    return first, second


# Each rewrite returns (what, header dict or exact JSON bytes, data, must, length prefix or None).
Rewrite = tuple[str, dict[str, Any] | bytes, bytes, str, int | None]


def rw_dtype_other_size(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    old = header[name]["dtype"]
    header[name]["dtype"] = new = rng.choice(OTHER_SIZE_DTYPES[ITEM_BYTES[old]])
    return f"'{name}' dtype {old} -> {new}", header, p.data, "refuse", None


def rw_dtype_same_size(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    old = header[name]["dtype"]
    header[name]["dtype"] = new = rng.choice(SAME_SIZE_DTYPES[old])
    # A float read as another float loads (garbage numbers); bits or codes under another dtype do not.
    must = "refuse" if p.is_packed(name) or (old in FLOAT_DTYPES) != (new in FLOAT_DTYPES) else "either"
    return f"'{name}' dtype {old} -> {new}", header, p.data, must, None


def rw_dtype_unknown(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    header[name]["dtype"] = new = rng.choice(["F8_E4M3", "U16", "Q4_0", "f32", "", None, 4, ["U8"]])
    return f"'{name}' dtype {new!r}", header, p.data, "refuse", None


def rw_shape_same_bytes(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    shape = header[name]["shape"]
    new = [math.prod(shape)] if len(shape) > 1 else [1, *shape]
    if len(shape) == 2 and shape[0] != shape[1] and rng.random() < 0.5:
        new = [shape[1], shape[0]]
    header[name]["shape"] = new
    return f"'{name}' shape {shape} -> {new}", header, p.data, "refuse", None


def rw_shape_other_bytes(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    shape = list(header[name]["shape"])
    axis = rng.randrange(len(shape))
    shape[axis] = rng.choice([shape[axis] * 2, shape[axis] + 1, 10**30, 2**64])
    old, header[name]["shape"] = header[name]["shape"], shape
    return f"'{name}' shape {old} -> {shape}", header, p.data, "refuse", None


def rw_shape_invalid(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    shape = list(header[name]["shape"])
    bad = rng.choice([-shape[0], float(shape[0]), str(shape[0]), None, True, [shape[0]]])
    new = [bad, *shape[1:]] if rng.random() < 0.8 else rng.choice(["64x8", None, {"0": 64}, 64])
    header[name]["shape"] = new
    return f"'{name}' shape {new!r}", header, p.data, "refuse", None


def rw_offsets_past_end(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    begin, end = header[name]["data_offsets"]
    shift = rng.choice([1, len(p.data), 2**40, 2**63])
    header[name]["data_offsets"] = [begin + shift, end + shift]
    return f"'{name}' data_offsets shifted by {shift}", header, p.data, "refuse", None


def rw_offsets_overlap(rng: random.Random, p: Pristine) -> Rewrite:
    header = _header(p)
    first, second = _equal_size_pair(rng, p)
    header[second]["data_offsets"] = list(header[first]["data_offsets"])
    return f"'{second}' given the bytes of '{first}'", header, p.data, "refuse", None


def rw_offsets_swapped(rng: random.Random, p: Pristine) -> Rewrite:
    header = _header(p)
    first, second = _equal_size_pair(rng, p)
    a, b = header[first]["data_offsets"], header[second]["data_offsets"]
    header[first]["data_offsets"], header[second]["data_offsets"] = b, a
    # Still a valid file (out of order is allowed); what it holds may or may not validate.
    return f"'{first}' and '{second}' swap their bytes", header, p.data, "either", None


def rw_offsets_invalid(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    begin, end = header[name]["data_offsets"]
    new = rng.choice(
        [
            *([-begin - 1, end], [begin, -end], [end, begin], [begin], [begin, end, end], [float(begin), float(end)]),
            *(f"{begin}-{end}", None, [str(begin), str(end)], [True, end], [begin - 1, end - 1]),
        ]
    )
    if new == [end, begin] and begin == end:
        new = [begin + 1, end]
    header[name]["data_offsets"] = new
    return f"'{name}' data_offsets {new!r}", header, p.data, "refuse", None


def rw_entry_removed(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    del header[name]
    return f"'{name}' left out of the header, its bytes kept", header, p.data, "refuse", None


# Packed tensors a layout may leave out (the weight then means something else, but is whole).
OPTIONAL_TENSORS = {"means", "zeros", "group_index", "zero_positions"}


def rw_tensor_dropped(rng: random.Random, p: Pristine) -> Rewrite:
    """A consistent file that lacks one tensor: its entry and its bytes both removed."""
    header, name = _header(p), _pick(rng, p)
    begin, end = header.pop(name)["data_offsets"]
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
            info["data_offsets"] = [info["data_offsets"][0] - (end - begin), info["data_offsets"][1] - (end - begin)]
    must = "either" if p.is_packed(name) and name.rpartition(".")[2] in OPTIONAL_TENSORS else "refuse"
    return f"'{name}' dropped", header, p.data[:begin] + p.data[end:], must, None


def rw_tensor_added(rng: random.Random, p: Pristine) -> Rewrite:
    """A consistent file with one more tensor than the model has."""
    header = _header(p)
    module = rng.choice(sorted(p.modules))
    name = rng.choice(
        [
            *("extra.weight", "model.layers.0.extra", f"{module}.extra", f"{module}.weight", f"{module}.bias"),
            *(f"{module}.forward", f"{module}.", f"{module}.0", f"{module}.training", f"{module}.cache_weight"),
            f"{module}.salient_column_scales",
        ]
    )
    header[name] = {"dtype": "F32", "shape": [64], "data_offsets": [len(p.data), len(p.data) + 256]}
    return f"extra tensor '{name}'", header, p.data + bytes(256), "refuse", None


def rw_duplicate_key(rng: random.Random, p: Pristine) -> Rewrite:
    name = _pick(rng, p)
    raw = p.weights[8 : p.data_start].rstrip()
    if rng.random() < 0.5:  # the same entry twice
        duplicate = json.dumps({name: p.header[name]}, separators=(",", ":"))[1:-1]
    else:  # a second entry under the name, pointing at another tensor's bytes
        other = rng.choice([n for n in p.tensor_names() if n != name])
        duplicate = json.dumps({name: p.header[other]}, separators=(",", ":"))[1:-1]
    return f"'{name}' given twice", raw[:-1] + b"," + duplicate.encode() + b"}", p.data, "refuse", None


def rw_length_prefix(rng: random.Random, p: Pristine) -> Rewrite:
    raw = p.weights[8 : p.data_start]
    length = rng.choice([2**64 - 1, 2**63, len(p.weights), len(raw) + 1, len(raw) - 1, 1, 0, 100_000_001])
    return f"header length prefix {length} (really {len(raw)})", raw, p.data, "refuse", length


def rw_not_utf8(rng: random.Random, p: Pristine) -> Rewrite:
    raw = bytearray(p.weights[8 : p.data_start])
    name = _pick(rng, p).encode()
    at = raw.index(b'"' + name + b'"') + 1 + rng.randrange(len(name))
    bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])
    raw[at : at + 1] = bad
    return f"non-UTF-8 {bad!r} in a tensor name", bytes(raw), p.data, "refuse", None


def rw_not_an_object(rng: random.Random, p: Pristine) -> Rewrite:
    name = _pick(rng, p)
    raw = rng.choice(
        [
            *(b"[]", b'"model"', b"1", b"null", b"", b"{", b'{"x": NaN}', json.dumps({name: [1, 2]}).encode()),
            *(json.dumps({name: None}).encode(), json.dumps({name: "U8"}).encode()),
        ]
    )
    return f"header JSON {raw[:40]!r}", raw, p.data, "refuse", None


def rw_metadata(rng: random.Random, p: Pristine) -> Rewrite:
    header = _header(p)
    header["__metadata__"] = new = rng.choice([["pt"], {"format": 1}, "pt", 0, {"format": ["pt"]}])
    return f"__metadata__ {new!r}", header, p.data, "refuse", None


def rw_metadata_valid(rng: random.Random, p: Pristine) -> Rewrite:
    header = _header(p)
    choice = rng.choice(["missing", "null", "extra key", "other format"])
    if choice == "missing":
        del header["__metadata__"]
    elif choice == "null":  # safetensors reads it as no metadata
        header["__metadata__"] = None
    elif choice == "extra key":
        header["__metadata__"]["note"] = "made by hand"
    else:
        header["__metadata__"]["format"] = "mlx"
    return f"__metadata__ {choice}", header, p.data, "either", None


def rw_deep_nesting(rng: random.Random, p: Pristine) -> Rewrite:
    depth = rng.choice([1000, 100_000])
    raw = b'{"x":' + b"[" * depth + b"]" * depth + b"}"
    return f"header nested {depth} deep", raw, p.data, "refuse", None


def rw_huge_numbers(rng: random.Random, p: Pristine) -> Rewrite:
    header, name = _header(p), _pick(rng, p)
    field = rng.choice(["shape", "data_offsets"])
    number = "1" + "0" * 5000 if rng.random() < 0.5 else "1e999"  # past int()'s digit limit / a float infinity
    header[name][field] = ["HUGE"] * len(header[name][field])
    raw = json.dumps(header).replace('"HUGE"', number).encode()
    return f"'{name}' {field} [{number[:8]}...]", raw, p.data, "refuse", None


def rw_trailing_bytes(rng: random.Random, p: Pristine) -> Rewrite:
    extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 4096])))
    return f"{len(extra)} bytes after the data", _header(p), p.data + extra, "refuse", None


def rw_whitespace(rng: random.Random, p: Pristine) -> Rewrite:
    """Whitespace around the JSON: valid for safetensors, so it must load."""
    raw = json.dumps(p.header).encode()
    before, after = rng.choice([b"", b" ", b"\n\t"]), rng.choice([b" " * 7, b"\r\n", b""])
    return f"header JSON with whitespace {before!r} / {after!r}", before + raw + after, p.data, "load", None


HEADER_REWRITES: list[Callable[[random.Random, Pristine], Rewrite]] = [
    rw_dtype_other_size,
    rw_dtype_same_size,
    rw_dtype_unknown,
    rw_shape_same_bytes,
    rw_shape_other_bytes,
    rw_shape_invalid,
    rw_offsets_past_end,
    rw_offsets_overlap,
    rw_offsets_swapped,
    rw_offsets_invalid,
    rw_entry_removed,
    rw_tensor_dropped,
    rw_tensor_added,
    rw_duplicate_key,
    rw_length_prefix,
    rw_not_utf8,
    rw_not_an_object,
    rw_metadata,
    rw_metadata_valid,
    rw_deep_nesting,
    rw_huge_numbers,
    rw_trailing_bytes,
    rw_whitespace,
]


def header_rewrites(rng: random.Random, p: Pristine) -> list[Case]:
    cases = []
    for rewrite in HEADER_REWRITES * 2:  # twice: most rewrites pick one of several values
        what, header, data, must, length = rewrite(rng, p)
        cases.append(Case(f"{rewrite.__name__}: {what}", assemble(header, data, length), p.config, must=must))
    return cases


# --- mutations of config.json -------------------------------------------------------------------------------


def truncate_config(rng: random.Random, p: Pristine) -> Case:
    cut = rng.randrange(0, len(p.config.rstrip()) - 1)  # the closing brace always goes
    what = f"config.json cut at byte {cut} of {len(p.config)}"
    return Case(what, p.weights, p.config[:cut], must="refuse", message="config.json", via_transformers=False)


def flip_config(rng: random.Random, p: Pristine) -> Case:
    blob = bytearray(p.config)
    flips = [_flip(rng, blob, 0, len(blob)) for _ in range(rng.randint(1, 3))]
    return Case(f"config.json: {', '.join(flips)}", p.weights, bytes(blob), via_transformers=False)


BAD_VALUES = [-1, 0, 2.5, "32", True, None, [], {}]


def _module(rng: random.Random, p: Pristine) -> str:
    return rng.choice(sorted(p.modules))


# Each edits the config dict in place and returns (what, must, via_transformers).
ConfigEdit = tuple[str, str, bool]


def qc_quant_method(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    value = rng.choice(["gptq", "BINQ", None, 1, "missing"])
    if value == "missing":
        del config["quantization_config"]["quant_method"]
    else:
        config["quantization_config"]["quant_method"] = value
    return f"quant_method {value!r}", "refuse", False  # transformers handles a method it knows


def qc_not_an_object(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    value = rng.choice([[], "binq", None, 1, "missing"])
    if value == "missing":
        del config["quantization_config"]
    else:
        config["quantization_config"] = value
    return f"quantization_config {value!r}", "refuse", False


def qc_format_version(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    value = rng.choice([2, 0, -1, "1", 1.0, 1.5, True, None, 10**30, "missing"])
    if value == "missing":
        del config["quantization_config"]["format_version"]
    else:
        config["quantization_config"]["format_version"] = value
    return f"format_version {value!r}", "refuse", True


def qc_modules(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    value = rng.choice([[], {}, "all", None, 7, "missing"])
    if value == "missing":
        del config["quantization_config"]["modules"]
    else:
        config["quantization_config"]["modules"] = value
    return f"modules {value!r}", "refuse", True


def qc_module_entry(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    name = _module(rng, p)
    entry = config["quantization_config"]["modules"][name]
    change = rng.choice(["entry", "layout", "metadata", "no layout", "no metadata"])
    if change == "entry":
        entry = config["quantization_config"]["modules"][name] = rng.choice([[], "binary", None, 3])
    elif change == "layout":
        entry["layout"] = rng.choice(["ternary", "Binary", "", None, 1, ["binary"]])
    elif change == "metadata":
        entry["metadata"] = rng.choice([[], "shape", None, [64, 64]])
    else:
        del entry[change.removeprefix("no ")]
    return f"module '{name}' {change} -> {entry!r}", "refuse", True


def qc_metadata_shape(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    name = _module(rng, p)
    metadata = config["quantization_config"]["modules"][name]["metadata"]
    rows, cols = metadata["shape"]
    value = rng.choice(
        [
            *([rows], [rows, str(cols)], [rows, float(cols)], [True, cols], [-rows, cols], [0, cols], [10**30, cols]),
            *([rows, 2**64], None, f"{rows}x{cols}", [rows, cols, 1]),
            [cols, rows] if rows != cols else [rows, cols + 8],
        ]
    )
    metadata["shape"] = value
    return f"'{name}' metadata shape {value!r}", "refuse", True


def qc_metadata_field(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    name = _module(rng, p)
    metadata = config["quantization_config"]["modules"][name]["metadata"]
    field = rng.choice(sorted(set(metadata) - {"shape"}))
    old = metadata[field]
    if rng.random() < 0.25:
        del metadata[field]
        return f"'{name}' metadata without '{field}'", "either", True  # some fields have a default
    if isinstance(old, bool):
        value = rng.choice([0, 1, "true", None, []])
        metadata[field] = value
        return f"'{name}' metadata {field} {value!r}", "refuse", True
    value = rng.choice([*BAD_VALUES, 10**30, old * 2, old + 8])
    metadata[field] = value
    # Another positive integer may still describe the stored tensors (a group size an index overrides).
    valid = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return f"'{name}' metadata {field} {old!r} -> {value!r}", "either" if valid else "refuse", True


def qc_module_missing(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    name = _module(rng, p)
    del config["quantization_config"]["modules"][name]
    return f"module '{name}' left out of modules", "refuse", True


def qc_module_nonexistent(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    modules = config["quantization_config"]["modules"]
    source = _module(rng, p)
    name = rng.choice(
        [
            *("model.layers.7.mlp.up_proj", "model.norm", "lm_head", "model.layers.0.mlp", "", "model..layers"),
            *(f"{source}.weight", "model.layers.-1.mlp.up_proj", "model.layers.0.mlp.up_proj.extra"),
        ]
    )
    if rng.random() < 0.5:  # renamed: the stored tensors keep the old name
        modules[name] = modules.pop(source)
        return f"module '{source}' renamed '{name}'", "refuse", True
    modules[name] = json.loads(json.dumps(modules[source]))
    return f"module '{name}' added (a copy of '{source}')", "refuse", True


def qc_modules_swapped(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    modules = config["quantization_config"]["modules"]
    first, second = rng.sample(sorted(modules), 2)
    modules[first], modules[second] = modules[second], modules[first]
    return f"modules '{first}' and '{second}' swap entries", "either", True


def _clip_ratios(p: Pristine) -> dict[str, float]:
    return {name: 0.9 for name in sorted(p.modules)}


def qc_activations(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    quantization = config["quantization_config"]
    plan = quantization.get("activations")
    if plan is None:
        plan = {"bits": 4, "sym": False, "smooth": "none", "clip_ratios": _clip_ratios(p), "token_candidates": None}
        plan["smoothed_producers"] = []
    quantization["activations"] = plan
    name = next(iter(plan["clip_ratios"]))
    edits: list[tuple[str, Callable[[], None]]] = [
        ("not an object", lambda: quantization.update(activations=rng.choice([[], "int4", 4]))),
        ("unknown field", lambda: plan.update(group_size=128)),
        ("bits", lambda: plan.update(bits=rng.choice([1, 9, 16, "4", 4.0, True, None, 10**400]))),
        ("sym", lambda: plan.update(sym=rng.choice(["false", 0, None]))),
        ("smooth", lambda: plan.update(smooth=rng.choice(["auto", "Channel", None, 1]))),
        (
            "clip_ratios",
            lambda: plan.update(clip_ratios=rng.choice([{}, [], None, {"model.layers.9.mlp.up_proj": 0.5}])),
        ),
        (
            "clip ratio",
            lambda: plan["clip_ratios"].update({name: rng.choice([0, 1.5, "0.9", True, math.nan, 10**400])}),
        ),
        ("token_candidates", lambda: plan.update(token_candidates=rng.choice([[0.5], [], "all", [2.0]]))),
        ("smoothed_producers", lambda: plan.update(smoothed_producers=rng.choice(["model.norm", [1], None]))),
        ("smoothed producer", lambda: plan.update(smoothed_producers=["model.layers.5.input_layernorm"])),
    ]
    label, edit = rng.choice(edits)
    edit()
    return f"activations {label}: {json.dumps(quantization.get('activations'))[:120]}", "refuse", True


def qc_activations_valid(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    quantization = config["quantization_config"]
    plan = quantization.get("activations") or {
        "bits": 4,
        "sym": False,
        "smooth": "none",
        "clip_ratios": _clip_ratios(p),
        "token_candidates": None,
        "smoothed_producers": [],
    }
    quantization["activations"] = plan
    change = rng.choice(["bits 3", "sym", "smooth none", "clip 0.5", "token"])
    if change == "bits 3":
        plan["bits"] = 3
    elif change == "sym":
        plan["sym"] = not plan["sym"]
    elif change == "smooth none":
        plan["smooth"] = "none"
    elif change == "clip 0.5":
        plan["clip_ratios"] = {name: 0.5 for name in plan["clip_ratios"]}
    else:
        plan.update(smooth="token", token_candidates=[1.0, 0.9, 0.8])
    return f"activations {change} (a valid plan)", "load", True


def qc_extra_field(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    key = rng.choice(["future_option", "self", "kwargs", "to_dict", "quantization_config"])
    config["quantization_config"][key] = rng.choice([1, "x", None, {"a": 1}])
    return f"quantization_config field '{key}' added", "either", True


def qc_model_config(rng: random.Random, config: dict, p: Pristine) -> ConfigEdit:
    """The model's own fields (transformers reads these; binq.load must still answer in one line)."""
    field, value = rng.choice(
        [
            ("vocab_size", rng.choice(["128", -1, 0, 129, 10**12, None])),
            ("num_hidden_layers", rng.choice([0, 1, 3, -1, "2", 2.5])),
            ("hidden_size", rng.choice([0, 65, 128, -64, "64"])),
            ("num_attention_heads", rng.choice([0, 3, 8, None])),
            ("num_key_value_heads", rng.choice([0, 3, 4])),
            ("head_dim", rng.choice([0, 8, 17, None])),
            ("intermediate_size", rng.choice([0, 127, 256])),
            ("model_type", rng.choice(["llamb", "opt", "", 7, None])),
            ("architectures", rng.choice([["NoSuchModel"], "LlamaForCausalLM", [], None, [7]])),
            ("hidden_act", rng.choice(["silv", None, 1])),
            ("dtype", rng.choice(["float33", "int8", 7, None])),
            ("rope_theta", rng.choice(["fast", -1.0, 0, None])),
            ("rms_norm_eps", rng.choice(["small", -1.0, None])),
            ("tie_word_embeddings", rng.choice(["yes", None, 2])),
            ("max_position_embeddings", rng.choice([-1, 0, "64"])),
        ]
    )
    config[field] = value
    return f"config.json {field} {value!r}", "either", False


CONFIG_EDITS: list[Callable[[random.Random, dict, Pristine], ConfigEdit]] = [
    qc_quant_method,
    qc_not_an_object,
    qc_format_version,
    qc_modules,
    qc_module_entry,
    qc_metadata_shape,
    qc_metadata_field,
    qc_metadata_field,
    qc_module_missing,
    qc_module_nonexistent,
    qc_modules_swapped,
    qc_activations,
    qc_activations,
    qc_activations_valid,
    qc_extra_field,
    qc_model_config,
    qc_model_config,
]


def config_rewrites(rng: random.Random, p: Pristine) -> list[Case]:
    cases = []
    for edit in CONFIG_EDITS * 2:  # twice: most edits pick one of several values
        config = p.config_json
        what, must, via_transformers = edit(rng, config, p)
        raw = json.dumps(config, indent=2).encode()
        cases.append(Case(f"{edit.__name__}: {what}", p.weights, raw, must=must, via_transformers=via_transformers))
    root = json.dumps(rng.choice([[], "config", 1, None])).encode()
    cases.append(
        Case(f"config.json {root!r}", p.weights, root, must="refuse", message="config.json", via_transformers=False)
    )
    return cases


# --- the tests ----------------------------------------------------------------------------------------------

LABELS = list(CHECKPOINTS)
SAMPLED: dict[str, tuple[Mutation, int]] = {
    "truncate-weights": (truncate_weights, 10),
    "flip-header": (flip_header, 10),
    "flip-data": (flip_data, 12),
    "truncate-config": (truncate_config, 5),
    "flip-config": (flip_config, 10),
}


def _rng(*parts: str) -> random.Random:
    return random.Random("/".join(parts))  # str seeds are hashed with sha512: the same cases every run


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("mutation", list(SAMPLED))
def test_sampled_damage(checkpoints: dict[str, Pristine], tmp_path: Path, mutation: str, label: str) -> None:
    make, count = SAMPLED[mutation]
    rng = _rng(mutation, label)
    pristine = checkpoints[label]
    cases = [make(rng, pristine) for _ in range(count)]
    counts = run_cases(pristine, tmp_path / "case", cases)
    if mutation.startswith("truncate"):
        assert counts["loaded"] == 0


def test_flipped_data_often_loads(checkpoints: dict[str, Pristine], tmp_path: Path) -> None:
    """Flipped sign bits (or codes) leave a valid checkpoint: the loader must accept it."""
    rng = _rng("flip-data-loads")
    loaded = 0
    for label, pristine in checkpoints.items():
        name = next(n for n in pristine.tensor_names() if n.endswith((".signs", ".codes")))
        begin, end = pristine.header[name]["data_offsets"]
        blob = bytearray(pristine.weights)
        blob[pristine.data_start + rng.randrange(begin, end)] ^= 0xFF
        case = Case(f"{label}: 8 sign bits of '{name}' flipped", bytes(blob), pristine.config, must="load")
        loaded += run_cases(pristine, tmp_path / label, [case])["loaded"]
    assert loaded == len(checkpoints)


@pytest.mark.parametrize("label", LABELS)
def test_header_rewrites(checkpoints: dict[str, Pristine], tmp_path: Path, label: str) -> None:
    pristine = checkpoints[label]
    run_cases(pristine, tmp_path / "case", header_rewrites(_rng("header", label), pristine))


@pytest.mark.parametrize("label", LABELS)
def test_config_rewrites(checkpoints: dict[str, Pristine], tmp_path: Path, label: str) -> None:
    pristine = checkpoints[label]
    run_cases(pristine, tmp_path / "case", config_rewrites(_rng("config", label), pristine))


# --- every damage that once escaped as a traceback or loaded unnoticed, always run --------------------------

SIGNS = "model.layers.0.mlp.up_proj.signs"
SCALES = "model.layers.0.mlp.up_proj.scales"
NORMS = ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight")


@dataclass(frozen=True)
class Known:
    """A damage found by the fuzzing, and a regex the refusal's message must match."""

    what: str
    message: str
    weights: Callable[[Pristine], bytes] | None = None  # the damaged model.safetensors
    config: Callable[[Pristine], bytes] | None = None  # or the damaged config.json
    label: str = "billm"
    via_transformers: bool = True


def header_edit(edit: Callable[[dict[str, Any]], object]) -> Callable[[Pristine], bytes]:
    def weights(p: Pristine) -> bytes:
        header = _header(p)
        edit(header)
        return assemble(header, p.data)

    return weights


def raw_header(raw: bytes) -> Callable[[Pristine], bytes]:
    return lambda p: assemble(raw, p.data)


def with_tensor(name: str) -> Callable[[Pristine], bytes]:
    """A consistent file with one more one-byte tensor."""

    def weights(p: Pristine) -> bytes:
        header = _header(p) | {name: {"dtype": "U8", "shape": [1], "data_offsets": [len(p.data), len(p.data) + 1]}}
        return assemble(header, p.data + b"\0")

    return weights


def config_edit(edit: Callable[[dict[str, Any]], object]) -> Callable[[Pristine], bytes]:
    def config(p: Pristine) -> bytes:
        data = p.config_json
        edit(data)
        return json.dumps(data).encode()

    return config


def quantization_edit(edit: Callable[[dict[str, Any]], object]) -> Callable[[Pristine], bytes]:
    return config_edit(lambda c: edit(c["quantization_config"]))


def duplicated_key(p: Pristine) -> bytes:
    raw = json.dumps(p.header, separators=(",", ":"))
    return assemble((raw[:-1] + "," + json.dumps({SIGNS: p.header[SCALES]})[1:-1] + "}").encode(), p.data)


def infinite_shape(p: Pristine) -> bytes:
    return assemble(json.dumps(_header(p)).replace("[128, 8]", "[1e999, 8]", 1).encode(), p.data)


def shifted(p: Pristine) -> bytes:
    header = _header(p)
    header[SIGNS]["data_offsets"] = [v + 1 for v in header[SIGNS]["data_offsets"]]
    return assemble(header, p.data)


def metadata_of(module: str, **fields: object) -> Callable[[Pristine], bytes]:
    return quantization_edit(lambda q: q["modules"][module]["metadata"].update(fields))


def activations(**fields: object) -> Callable[[Pristine], bytes]:
    return quantization_edit(lambda q: q["activations"].update(fields))


DEEP = b"[" * 100_000 + b"]" * 100_000


def entry_of(name: str, **fields: object) -> Callable[[Pristine], bytes]:
    return header_edit(lambda h: h[name].update(fields))


def quantization_fields(**fields: object) -> Callable[[Pristine], bytes]:
    return quantization_edit(lambda q: q.update(fields))


def model_fields(**fields: object) -> Callable[[Pristine], bytes]:
    return config_edit(lambda c: c.update(fields))


UP_PROJ = "model.layers.0.mlp.up_proj"
KNOWN = [
    # A KeyError, TypeError, ValueError, OverflowError, AttributeError or RecursionError in binq's header reader.
    Known("entry without shape", "has no 'shape'", header_edit(lambda h: h[SIGNS].pop("shape"))),
    Known("entry without offsets", "has no 'data_offsets'", header_edit(lambda h: h[SIGNS].pop("data_offsets"))),
    Known("offsets null", "invalid data_offsets", entry_of(SIGNS, data_offsets=None)),
    Known("shape '64x8'", "invalid shape", entry_of(SIGNS, shape="64x8")),
    Known("shape 1e999", "invalid shape", infinite_shape),
    Known("header []", "not a JSON object", raw_header(b"[]")),
    Known("entry a string", "not described by an object", header_edit(lambda h: h.update({SIGNS: "U8"}))),
    Known("header nested deep", "unreadable safetensors header", raw_header(b'{"x":' + DEEP + b"}")),
    # A SafetensorError from transformers' loader: binq's checks let through what safetensors refuses.
    Known("duplicated key", "given twice", duplicated_key),
    Known("entry removed, bytes kept", "unused", header_edit(lambda h: h.pop(SIGNS))),
    Known("overlap", "overlaps|unused", header_edit(lambda h: h.update({NORMS[1]: h[NORMS[0]]}))),
    Known("offsets shifted by 1", "overlaps|unused", shifted),
    Known("trailing byte", "after its last tensor", lambda p: p.weights + b"\0"),
    Known("__metadata__ not strings", "__metadata__", header_edit(lambda h: h.update(__metadata__={"format": 1}))),
    Known("offsets as strings", "data_offsets", entry_of(SIGNS, data_offsets=["0", "8"])),
    # Loaded although the file does not hold the model's tensors.
    Known("extra tensor", "not a tensor of this model", with_tensor("extra.weight")),
    Known("embedding as I32", "floating-point", entry_of("model.embed_tokens.weight", dtype="I32")),
    Known("stray salient_column_scales", "salient_column_scales", with_tensor(f"{UP_PROJ}.salient_column_scales")),
    # A KeyError from nn.Module.register_buffer.
    Known("packed tensor 'training'", "'training'", with_tensor(f"{UP_PROJ}.training")),
    # config.json: an AttributeError, a RecursionError, or accepted.
    Known("config.json null", "config.json is not a JSON object", config=lambda p: b"null", via_transformers=False),
    Known("config.json nested deep", "config.json", config=lambda p: DEEP, via_transformers=False),
    Known("format_version true", "format version True", config=quantization_fields(format_version=True)),
    Known("format_version 1.0", "format version 1.0", config=quantization_fields(format_version=1.0)),
    Known("salient_groups 'false'", "salient_groups", config=metadata_of(UP_PROJ, salient_groups="false")),
    # A TypeError in BinqConfig: a field that replaces a method, or Python's own 'self'.
    Known("field 'to_dict'", "'to_dict'", config=quantization_fields(to_dict=1)),
    Known("field 'self'", "'self'", config=quantization_fields(self=1)),
    # An OverflowError (math.isfinite of a huge int), and a plan naming a module the model lacks (loaded).
    Known("clip ratio 10**400", "clip ratio", config=activations(clip_ratios={UP_PROJ: 10**400}), label="w11-a4"),
    Known("missing producer", "smoothed_producers", config=activations(smoothed_producers=["x.norm"]), label="w11-a4"),
    # transformers' own exceptions while it builds the model config.json describes (binq.load checks first).
    Known("hidden_act 'silv'", "config.json .*silv", config=model_fields(hidden_act="silv"), via_transformers=False),
    Known("model_type 'llamb'", "config.json .*llamb", config=model_fields(model_type="llamb"), via_transformers=False),
    Known("layers 2.5", "config.json .*layers", config=model_fields(num_hidden_layers=2.5), via_transformers=False),
]


@pytest.mark.parametrize("known", KNOWN, ids=[k.what for k in KNOWN])
def test_known_damage(checkpoints: dict[str, Pristine], tmp_path: Path, known: Known) -> None:
    p = checkpoints[known.label]
    weights = p.weights if known.weights is None else known.weights(p)
    config = p.config if known.config is None else known.config(p)
    case = Case(known.what, weights, config, "refuse", known.message, known.via_transformers)
    run_cases(p, tmp_path / "case", [case])  # the first case of a list also goes through from_pretrained


def test_missing_weights_file(checkpoints: dict[str, Pristine], tmp_path: Path) -> None:
    folder = tmp_path / "case"
    shutil.copytree(checkpoints["billm"].folder, folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(BinqError, match=r"model\.safetensors"):
        binq.load(folder)


# --- file modes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """model.safetensors gets the mode every other file gets (safetensors alone writes it 0600)."""
    model, weights, _plan = _quantize("gptq-3bit")
    previous = os.umask(umask)
    try:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / (WEIGHTS_FILE + ".partial")).touch(mode=0o600)  # left by an interrupted save
        save_checkpoint(model, weights, tmp_path / "out")
    finally:
        os.umask(previous)
    modes = {file.name: file.stat().st_mode & 0o777 for file in (tmp_path / "out").iterdir()}
    assert modes[WEIGHTS_FILE] == 0o666 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes
