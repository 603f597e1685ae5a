"""Resumable runs: ``binq quantize --out DIR`` records its progress per block in ``DIR/progress/``.

What is kept there (docs/RESUME.md has the whole picture):

- ``run.json``, written first: the run's fingerprint (built by :func:`binq.pipeline.quantize`):
  binq and torch versions, the model (spec and a cheap identity of its files and weights), the
  method and its config, the calibration (its config and a hash of the windows it drew), the engine
  settings that change results and the activation config. A later run with the same ``--out`` compares
  its own fingerprint field by field and refuses to resume when one differs, naming it.
- ``block-NNNNN.safetensors``, one per finished block: the structured weights of its linears (each
  layout's packed tensors under ``<full module name>.<tensor>``), and in the safetensors metadata
  (JSON strings) each module's layout, layout metadata and tensor names, the block's
  :class:`~binq.engine.calibrate.LayerRecord` s and a sha256 of the tensors.

Every file is written to a temporary file in the same folder (``*.tmp``), fsynced and renamed over its
name (then the folder is fsynced): a process killed at any point, SIGKILL included, leaves either the
whole file or a temporary file, which the next run ignores and deletes. A block file that does not
read back whole (a damaged disk, an edited file) is deleted with a warning and its block recomputed.

A lock (``lockf`` on ``DIR/progress/lock``, released by the kernel when the process dies) keeps two runs
from writing the same folder. After the checkpoint and report are written the folder is deleted
(``run.json`` first, so a kill during the deletion leaves nothing that looks resumable).

Test hooks: ``BINQ_TEST_KILL_AFTER_BLOCK=k`` sends SIGKILL to this process right after block ``k``'s
file is in place, ``BINQ_TEST_KILL_WRITING_BLOCK=k`` after its temporary file is written and before the
rename (``tests/test_resume.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from binq.engine.calibrate import LayerRecord
from binq.errors import BinqError
from binq.quant.structured import QuantizedWeight, layout_class

log = logging.getLogger(__name__)

PROGRESS_FOLDER = "progress"
RUN_FILE = "run.json"
LOCK_FILE = "lock"
TEMP_SUFFIX = ".tmp"
SCHEMA = 1
KILL_AFTER_BLOCK_ENV = "BINQ_TEST_KILL_AFTER_BLOCK"
KILL_WRITING_BLOCK_ENV = "BINQ_TEST_KILL_WRITING_BLOCK"

# Fingerprint fields that are recorded for the reader but not compared (a moved model folder resumes).
UNCOMPARED = ("info",)
_BLOCK_FILE = re.compile(r"block-(\d{5,})\.safetensors")
_MISSING = object()

# One linear of a block file: (full module name, record, layout, packed tensors, layout metadata, and the
# device type its packed tensors were made on: a resumed run rebuilds and dequantizes the weight there).
BlockItem = tuple[str, LayerRecord, str, dict[str, torch.Tensor], dict[str, Any], str]


def block_item(full_name: str, record: LayerRecord, weight: QuantizedWeight) -> BlockItem:
    packed = weight.packed_tensors()
    devices = {tensor.device.type for tensor in packed.values()}
    device = "cuda" if "cuda" in devices else "cpu"
    return (full_name, record, weight.layout, packed, weight.metadata(), device)


def block_file_name(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def progress_folder(out: str | Path) -> Path:
    return Path(out) / PROGRESS_FOLDER


def _test_kill(variable: str, index: int) -> None:
    """SIGKILL this process when the test hook ``variable`` names block ``index``."""
    if os.environ.get(variable) == str(index):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): the rename is what we have
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_atomic(path: Path, data: bytes, kill_writing: int | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file beside it, fsync, rename, fsync the folder."""
    temp = path.with_name(path.name + TEMP_SUFFIX)
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if kill_writing is not None:
        _test_kill(KILL_WRITING_BLOCK_ENV, kill_writing)
    os.replace(temp, path)
    _fsync_folder(path.parent)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # no copy
    return digest.hexdigest()


# --- the fingerprint -------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_identity(
    model: nn.Module, blocks: list[nn.Module], path: str, held: Callable[[int], Any] | None = None
) -> dict[str, Any]:
    """A cheap identity of a loaded model: its config.json's sha256 and its weight files' names and sizes
    (when ``path`` is a folder or file), the number of blocks, and a sha256 of the first and last blocks'
    tensors as loaded (float32 for floats, so the compute dtype does not change it). Taken before
    anything (smoothing) changes the model."""
    source = Path(path)
    config_sha256 = None
    files: dict[str, int] = {}
    if source.is_dir():
        config = source / "config.json"
        if config.is_file():
            config_sha256 = hashlib.sha256(config.read_bytes()).hexdigest()
        for file in sorted(source.iterdir()):
            if file.is_file() and file.suffix in WEIGHT_SUFFIXES:
                files[file.name] = file.stat().st_size
    elif source.is_file():
        files[source.name] = source.stat().st_size
    digest = hashlib.sha256()
    for index in sorted({0, len(blocks) - 1}):
        # ``held``: a streamed model's block, read for the digest and dropped again, one at a time.
        with held(index) if held is not None else contextlib.nullcontext():
            for name, tensor in blocks[index].state_dict().items():
                tensor = tensor.detach().cpu()
                if tensor.is_floating_point():
                    tensor = tensor.to(torch.float32)
                tensor = tensor.contiguous()
                digest.update(f"{index}.{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # no copy
    return {
        "config_sha256": config_sha256,
        "files": files,
        "blocks": len(blocks),
        "first_last_blocks_sha256": digest.hexdigest(),
    }


def windows_digest(windows: torch.Tensor | None) -> str | None:
    """sha256 of the calibration windows (token ids), or ``None`` when the run draws none."""
    if windows is None:
        return None
    return tensor_digest({"windows": windows.to(torch.int64)})


def _json(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), so comparisons are on what run.json holds."""
    return json.loads(json.dumps(value))


def first_difference(old: Any, new: Any, path: str = "", partial: bool = False) -> tuple[str, Any, Any] | None:
    """The first field (dotted path) where ``old`` and ``new`` differ, with both values; ``None`` if equal.

    ``partial``: fields ``new`` does not have yet are skipped (the check before the model is loaded)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(new) + [key for key in old if key not in new]
        for key in keys:
            if not path and key in UNCOMPARED:
                continue
            if partial and key not in new:
                continue
            found = first_difference(
                old.get(key, _MISSING), new.get(key, _MISSING), f"{path}.{key}" if path else key, partial
            )
            if found is not None:
                return found
        return None
    return None if old == new else (path, old, new)


def _shown(value: Any) -> str:
    if value is _MISSING:
        return "absent"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


# --- the progress folder ---------------------------------------------------------------------------------------


class Progress:
    """``DIR/progress`` of one run: its fingerprint, its finished blocks, the lock that makes it this run's.

    :meth:`open` takes the lock, deletes leftover temporary files and, when ``run.json`` exists, compares
    the fields known before the model is loaded; :meth:`start` compares (or records) the whole
    fingerprint and lists the finished blocks. The engines then :meth:`load` finished blocks and
    :meth:`save` new ones; :meth:`remove` deletes the folder once the checkpoint is written.
    """

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.folder = progress_folder(out)
        self.finished: set[int] = set()
        self.resumed_from: int | None = None  # set by the engine when it loaded at least one block
        self.tuning: dict[int, dict[str, Any]] = {}  # loaded blocks' tuning records (--tune)
        self._recorded: dict[str, Any] | None = None
        self._lock: int | None = None
        self._made_out = not self.out.exists()
        self._open = False

    # opening

    @classmethod
    def open(cls, out: str | Path, fingerprint: dict[str, Any]) -> Progress:
        """Lock ``DIR/progress`` (made if absent), clean it, check ``fingerprint`` (partial) against ``run.json``."""
        progress = cls(out)
        try:
            progress.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BinqError(f"cannot record progress in {progress.folder}: {err.strerror or err}") from None
        progress._open = True
        progress._take_lock()
        try:
            progress._clean()
            progress._read_run_file()
            progress._compare(fingerprint, partial=True)
        except BaseException:
            progress.close()
            raise
        return progress

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (docs/RESUME.md)
            return
        descriptor = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            # A POSIX record lock: held by this process alone (a forked worker does not inherit it, so an
            # orphaned one cannot keep it) and released by the kernel when the process dies.
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(descriptor)
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks: go on unlocked
                log.warning("cannot lock %s (%s): nothing keeps a second run out", self.folder, err.strerror)
                return
            raise BinqError(
                f"cannot use {self.out}: another binq run is writing its progress ({self.folder / LOCK_FILE})"
            ) from None
        self._lock = descriptor

    def _clean(self) -> None:
        for temp in self.folder.glob("*" + TEMP_SUFFIX):
            log.info("removing %s, left by an interrupted write", temp)
            temp.unlink(missing_ok=True)

    def _read_run_file(self) -> None:
        run_file = self.folder / RUN_FILE
        if not run_file.is_file():
            stale = sorted(self.folder.glob("block-*.safetensors"))
            if stale:  # no run.json, nothing to tell whose they are (a deletion was interrupted)
                log.warning("removing %d block file(s) in %s that no run.json describes", len(stale), self.folder)
                for file in stale:
                    file.unlink(missing_ok=True)
            return
        try:
            recorded = json.loads(run_file.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise BinqError(
                f"cannot resume {self.out}: {run_file} is not a binq progress record ({err}); delete {self.folder}"
            ) from None
        self._recorded = recorded

    def _compare(self, fingerprint: dict[str, Any], partial: bool) -> None:
        if self._recorded is None:
            return
        found = first_difference(self._recorded, _json(fingerprint), partial=partial)
        if found is not None:
            field, old, new = found
            raise BinqError(
                f"cannot resume {self.out}: {field} differs (was {_shown(old)}, now {_shown(new)}); "
                f"use another --out or delete {self.folder}"
            )

    def start(self, fingerprint: dict[str, Any]) -> None:
        """Compare the whole ``fingerprint`` with ``run.json`` and list the finished blocks, or, for a new
        run, write ``run.json`` (before any block)."""
        self._compare(fingerprint, partial=False)
        if self._recorded is None:
            write_atomic(self.folder / RUN_FILE, (json.dumps(_json(fingerprint), indent=1) + "\n").encode())
            self._recorded = _json(fingerprint)
            return
        for file in self.folder.glob("block-*.safetensors"):
            match = _BLOCK_FILE.fullmatch(file.name)
            if match is not None:
                self.finished.add(int(match.group(1)))

    def keep_prefix(self) -> int:
        """Keep the finished blocks ``0 .. k-1`` only (a block-sequential run needs every block before the
        one it continues at) and return ``k``; files after a gap are deleted."""
        k = 0
        while k in self.finished:
            k += 1
        for index in sorted(i for i in self.finished if i > k):
            log.warning("removing %s: block %d before it is not finished", block_file_name(index), k)
            self.discard(index)
        return k

    def announce(self, total: int, continuing_at: int | None = None) -> None:
        """Log what this run resumes (nothing when no block is finished)."""
        if not self.finished:
            return
        done = _ranges(sorted(self.finished))
        blocks = "block" if len(self.finished) == 1 else "blocks"
        if len(self.finished) == total:
            log.info("resuming %s: all %d blocks done; evaluating and writing", self.out, total)
        elif continuing_at is not None:
            log.info("resuming %s: %s %s done, continuing at block %d", self.out, blocks, done, continuing_at)
        else:
            log.info("resuming %s: %s %s done (%d of %d)", self.out, blocks, done, len(self.finished), total)

    # blocks

    def discard(self, index: int) -> None:
        """Forget block ``index`` (and delete its file)."""
        self.finished.discard(index)
        (self.folder / block_file_name(index)).unlink(missing_ok=True)

    def save(self, index: int, items: Iterable[BlockItem], tuning: dict[str, Any] | None = None) -> None:
        """Write block ``index``'s file atomically: ``items`` are its linears in model order; ``tuning``, the
        block's tuning record (``--tune``), if any."""
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, Any] = {}
        records: dict[str, Any] = {}
        for full_name, record, layout, packed, metadata, device in items:
            for tensor_name, tensor in packed.items():
                tensors[f"{full_name}.{tensor_name}"] = tensor.detach().cpu().contiguous()
            modules[full_name] = {
                "layout": layout,
                "metadata": metadata,
                "tensors": list(packed),
                "device": device,
            }
            records[full_name] = dataclasses.asdict(record)
        header = {
            "binq_progress": str(SCHEMA),
            "block": str(index),
            "modules": json.dumps(modules),
            "records": json.dumps(records),
            "sha256": tensor_digest(tensors),
        }
        if tuning is not None:
            header["tuning"] = json.dumps(tuning)
        path = self.folder / block_file_name(index)
        write_atomic(path, safetensors_bytes(tensors, metadata=header), kill_writing=index)
        self.finished.add(index)
        _test_kill(KILL_AFTER_BLOCK_ENV, index)

    def load(
        self, index: int, expected: dict[str, tuple[int, int]], device: torch.device | str = "cpu"
    ) -> tuple[dict[str, QuantizedWeight], list[LayerRecord]] | None:
        """Block ``index``'s weights (by full module name, in model order) and records, checked against
        ``expected`` (full name -> shape of every linear the block quantizes); ``None``, after a warning
        and deleting the file, when it does not read back whole. Weights whose packed tensors lived on
        CUDA are rebuilt on ``device``."""
        path = self.folder / block_file_name(index)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as file:
                header = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
            if header.get("binq_progress") != str(SCHEMA) or header.get("block") != str(index):
                raise ValueError("not this block's progress file")
            if header.get("sha256") != tensor_digest(tensors):
                raise ValueError("its tensors do not match their sha256")
            modules = json.loads(header["modules"])
            stored = json.loads(header["records"])
            if list(stored) != list(modules) or any(r["block"] != index for r in stored.values()):
                raise ValueError("its records are not those of its modules")
            records = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in stored.values()]
            tuning = json.loads(header["tuning"]) if "tuning" in header else None
            if tuning is not None and (not isinstance(tuning, dict) or tuning.get("block") != index):
                raise ValueError("its tuning record is not this block's")
            if set(modules) != set(expected):
                raise ValueError(f"it holds {sorted(modules)}, the block has {sorted(expected)}")
            used = {f"{name}.{t}" for name, entry in modules.items() for t in entry["tensors"]}
            if used != set(tensors):
                raise ValueError("its tensors are not those its modules name")
            weights: dict[str, QuantizedWeight] = {}
            for name, entry in modules.items():
                place = torch.device(device) if entry["device"] == "cuda" else torch.device("cpu")
                packed = {t: tensors[f"{name}.{t}"].to(place) for t in entry["tensors"]}
                weight = layout_class(entry["layout"]).from_packed(packed, entry["metadata"])
                if tuple(weight.shape) != tuple(expected[name]):
                    raise ValueError(f"{name} is {weight.shape}, the model's linear {expected[name]}")
                weights[name] = weight
        except (OSError, ValueError, KeyError, TypeError, BinqError, RuntimeError, SafetensorError) as err:
            log.warning("%s does not read back whole (%s): block %d is recomputed", path, err, index)
            self.discard(index)
            return None
        if tuning is not None:
            self.tuning[index] = tuning
        return weights, records

    # closing

    def close(self) -> None:
        """Release the lock. The folder stays for a later run to resume, unless this run stopped before it
        began (no ``run.json``): then nothing is left behind, not even ``out`` if this run made it empty."""
        if self._open:
            self._open = False
            if not (self.folder / RUN_FILE).exists() and not any(self.folder.glob("block-*")):
                shutil.rmtree(self.folder, ignore_errors=True)
                if self._made_out:
                    with contextlib.suppress(OSError):
                        self.out.rmdir()  # only if nothing else was written there
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def remove(self) -> None:
        """Delete the folder: the run is complete. ``run.json`` goes first: a kill part-way leaves nothing resumable."""
        self._open = False
        (self.folder / RUN_FILE).unlink(missing_ok=True)
        _fsync_folder(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.close()


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2, 5, 7-8``."""
    parts: list[str] = []
    start = previous = None
    for index in [*indices, None]:
        if start is not None and (index is None or index != previous + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if index is not None and start is None:
            start = index
        previous = index
    return ", ".join(parts)
