"""Where a checkpoint's tensors are: one ``model.safetensors``, or shards named by ``model.safetensors.index.json``.

Every file's header is checked (:func:`~binq.checkpoint.header.read_header`) and, for shards, the index
must name exactly the tensors the shards hold, each in the shard that holds it: a missing or extra
shard, a tensor in two shards, or an index that points elsewhere is a one-line error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from binq.checkpoint.format import INDEX_FILE, WEIGHTS_FILE
from binq.checkpoint.header import TensorEntry, read_header
from binq.errors import BinqError


def _weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise BinqError(f"cannot read {index} ({' '.join(str(error).split())[:200]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BinqError(f"{index} has no weight_map object")
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise BinqError(f"{index}: tensor '{name}' maps to {file!r}, not a .safetensors file of the folder")
    return weight_map


def checkpoint_entries(folder: Path | str) -> dict[str, tuple[Path, TensorEntry]]:
    """Every tensor of the checkpoint in ``folder``: name -> (its file, its checked header entry)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if not index.is_file():
        file = folder / WEIGHTS_FILE
        if not file.is_file():
            raise BinqError(
                f"'{folder}' has neither {WEIGHTS_FILE} nor {INDEX_FILE}; a binq checkpoint keeps its tensors there"
            )
        return {name: (file, entry) for name, entry in read_header(file).items()}
    weight_map = _weight_map(index)
    entries: dict[str, tuple[Path, TensorEntry]] = {}
    for file_name in sorted(set(weight_map.values())):
        file = folder / file_name
        if not file.is_file():
            raise BinqError(f"{index} names the shard {file_name}, which is missing")
        for name, entry in read_header(file).items():
            if weight_map.get(name) != file_name:
                where = f"maps it to {weight_map[name]}" if name in weight_map else "does not name it"
                raise BinqError(f"{file} holds tensor '{name}' but {INDEX_FILE} {where}")
            entries[name] = (file, entry)
    absent = sorted(set(weight_map) - set(entries))
    if absent:
        raise BinqError(f"{INDEX_FILE} maps '{absent[0]}' to {weight_map[absent[0]]}, which does not hold it")
    return entries


def weight_files(folder: Path | str) -> list[Path]:
    """The checkpoint's safetensors files (checked as :func:`checkpoint_entries` checks them)."""
    return sorted({file for file, _ in checkpoint_entries(folder).values()})


@contextmanager
def open_tensors(folder: Path | str) -> Iterator[tuple[dict[str, TensorEntry], Any]]:
    """``(entries, get)``: the checked entries by name and ``get(name) -> torch.Tensor`` across the files."""
    from safetensors import safe_open

    located = checkpoint_entries(folder)
    with ExitStack() as stack:
        files = {file for file, _ in located.values()}
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt")) for file in files}

        def get(name: str) -> torch.Tensor:
            return handles[located[name][0]].get_tensor(name)

        yield {name: entry for name, (_, entry) in located.items()}, get
