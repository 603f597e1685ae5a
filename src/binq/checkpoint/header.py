"""Read a safetensors header without loading the data, and refuse truncated or inconsistent files.

safetensors layout: 8 bytes little-endian header length ``N``, ``N`` bytes of UTF-8 JSON (``name ->
{dtype, shape, data_offsets: [begin, end]}``, offsets relative to the data section that starts at
``8 + N``, plus an optional ``__metadata__`` object of strings), then the data.

Every rule the ``safetensors`` library enforces when it opens the file (and maps it into memory) is
checked here first, so that a damaged file fails with a one-line :class:`~binq.errors.BinqError` naming
the file and the first tensor at fault instead of a ``SafetensorError`` deep inside a loader; and no
loader ever reads a byte range that is not in the file:

- the header fits in the file and in safetensors' limit, is UTF-8, one JSON object, no duplicate names;
- each tensor has a known dtype, a shape of non-negative integers and ``[begin, end]`` offsets whose
  byte count is its shape's;
- in offset order the tensors tile the data section exactly (no gap, no overlap, nothing after the last:
  safetensors' own rule), and a tensor that ends past the end of the file names the file as truncated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from binq.errors import BinqError

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_ITEM_BYTES = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}
# safetensors' MAX_HEADER_SIZE: a larger header is refused by the library, so by us first.
_MAX_HEADER_BYTES = 100_000_000
_METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # where its bytes start in the file (set by :func:`read_header`)


def _is_count(value: Any) -> bool:
    """A JSON non-negative integer (``true`` is not one, although Python says it is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: refuse a name given twice (JSON keeps the last, hiding the first's bytes)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"'{key}' is given twice")
        result[key] = value
    return result


def _parse_json(raw: bytes) -> Any:
    # Decode strictly: json.loads would also accept UTF-16/32 bytes, which safetensors refuses.
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)


def _read_raw_header(path: Path) -> tuple[Any, int]:
    """The parsed JSON header and the byte count of the data section."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BinqError(f"{path} is truncated: no safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise BinqError(
                    f"{path} is truncated or not a safetensors file "
                    f"(a header of {header_len} bytes in a file of {size} bytes)"
                )
            if header_len > _MAX_HEADER_BYTES:
                raise BinqError(f"{path} is not a safetensors file (a header of {header_len} bytes)")
            raw = f.read(header_len)
        header = _parse_json(raw)
    except OSError as error:
        raise BinqError(f"cannot read {path} ({error})") from None
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BinqError(f"{path} has an unreadable safetensors header ({reason})") from None
    return header, size - 8 - header_len


def _check_metadata(path: Path, metadata: Any) -> None:
    strings = isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    if not (strings or metadata is None):  # safetensors reads null as no metadata
        raise BinqError(f"{path}: the safetensors '{_METADATA_KEY}' must be an object of strings")


def _entry(path: Path, name: str, info: Any) -> tuple[TensorEntry, int, int]:
    """One tensor's entry and its ``[begin, end)`` in the data section, checked on its own."""
    where = f"tensor '{name}' in {path}"
    if not isinstance(info, dict):
        raise BinqError(f"{where} is not described by an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise BinqError(f"{where} has no '{missing[0]}'")
    dtype_name = info.get("dtype")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise BinqError(f"{where} has unsupported dtype {dtype_name!r}")
    shape = info.get("shape")
    if not (isinstance(shape, list) and all(_is_count(v) for v in shape)):
        raise BinqError(f"{where} has an invalid shape {shape!r} (a list of non-negative integers)")
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(v) for v in offsets)):
        raise BinqError(f"{where} has invalid data_offsets {offsets!r} (two non-negative integers)")
    begin, end = offsets
    if end < begin:
        raise BinqError(f"{where} has data_offsets [{begin}, {end}] that end before they begin")
    nbytes = math.prod(shape) * _ITEM_BYTES[dtype_name]
    if end - begin != nbytes:
        raise BinqError(f"{where} has {end - begin} bytes, expected {nbytes} for shape {tuple(shape)}")
    return TensorEntry(name, dtype, tuple(shape), nbytes), begin, end


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, checked against each other and the file's size (module docstring)."""
    path = Path(path)
    header, data_bytes = _read_raw_header(path)
    if not isinstance(header, dict):
        raise BinqError(f"{path} has a safetensors header that is not a JSON object")
    entries: dict[str, TensorEntry] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == _METADATA_KEY:
            _check_metadata(path, info)
            continue
        entry, begin, end = _entry(path, name, info)
        entries[name] = entry
        ranges.append((begin, end, name))
    ranges.sort()
    for _begin, end, name in ranges:  # the first tensor cut off, before any gap it leaves
        if end > data_bytes:
            raise BinqError(
                f"{path} is truncated: tensor '{name}' ends at byte {end} of a {data_bytes}-byte data section"
            )
    data_start = path.stat().st_size - data_bytes
    for begin, _end, name in ranges:
        entries[name] = dataclasses.replace(entries[name], offset=data_start + begin)
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else f"leaves bytes {position}-{begin} unused"
            raise BinqError(f"tensor '{name}' in {path} {problem} (data_offsets [{begin}, {end}])")
        position = end
    if position != data_bytes:
        raise BinqError(f"{path} has {data_bytes - position} bytes after its last tensor (data section not covered)")
    return entries
