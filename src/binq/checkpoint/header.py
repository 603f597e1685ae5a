"""Read a safetensors header without loading the data, and refuse truncated or inconsistent files.

safetensors layout: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON (``name -> {dtype,
shape, data_offsets: [begin, end]}``, offsets relative to the data section that starts at ``8 + N``),
then the data. Checking every tensor's byte range against the file size here gives an error that names
the first tensor cut off, before any loader reads garbage or fails with a generic message.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

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
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BinqError(f"{path} is truncated: no safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise BinqError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes)")
            raw = json.loads(f.read(header_len))
    except (OSError, ValueError) as error:
        raise BinqError(f"cannot read {path} ({error})") from None
    data_bytes = size - 8 - header_len
    entries = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise BinqError(f"tensor '{name}' in {path} has unsupported dtype {info.get('dtype')!r}")
        shape = tuple(int(v) for v in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if end - begin != nbytes:
            raise BinqError(f"tensor '{name}' in {path} has {end - begin} bytes, expected {nbytes} for shape {shape}")
        if end > data_bytes:
            raise BinqError(
                f"{path} is truncated: tensor '{name}' ends at byte {end} of a {data_bytes}-byte data section"
            )
        entries[name] = TensorEntry(name, dtype, shape, nbytes)
    return entries
