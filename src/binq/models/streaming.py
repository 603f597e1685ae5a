"""Models larger than memory: the decoder blocks stay on disk until a walk needs them, one at a time.

:func:`open_streamed` builds a model from a safetensors folder (one ``model.safetensors`` or shards
with ``model.safetensors.index.json``) with every decoder block's parameters on the ``meta`` device
(no memory) and the rest (embeddings, final norm, LM head, rotary tables) read in. Its
:class:`BlockStore` reads one block's tensors from the files when asked (:meth:`BlockStore.load`,
cast to the compute dtype exactly as ``from_pretrained`` casts them, and checked finite) and drops
them again (:meth:`BlockStore.release`). The block walker (:mod:`binq.engine.walker`) asks for each
block just before its step and drops it after, so a run's peak memory is one block, its Hessians, the
activations and the embeddings, whatever the depth.

A model is registered with its store (:func:`block_store`); a model loaded whole has none, and the
walker then has nothing to load. Sources whose tensor names are not the model's own (a conversion
that renames keys at load time) cannot stream: :func:`can_stream` says so and the caller loads whole.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from binq.checkpoint.header import TensorEntry, read_header
from binq.errors import BinqError
from binq.memory import trim_free_memory
from binq.models.architectures import Architecture, get_architecture, get_blocks

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_STORES: weakref.WeakKeyDictionary[nn.Module, BlockStore] = weakref.WeakKeyDictionary()


def all_finite(tensor: torch.Tensor, rows: int = 4096) -> bool:
    """Whether every entry is finite, checked ``rows`` rows at a time (no tensor-sized mask at once)."""
    flat = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(1, -1)
    return all(bool(torch.isfinite(flat[i : i + rows]).all()) for i in range(0, flat.shape[0], rows))


MAPPED_BYTES = 16 << 20  # a tensor kept as stored and at least this large is mapped from its file, not read
FINITE_CHUNK_BYTES = 16 << 20


def _file_finite(file: Path, entry: TensorEntry) -> bool:
    """Whether the stored float tensor ``entry`` of ``file`` has only finite values, read a chunk at a
    time into one buffer (the file's pages go to the page cache, not to this process)."""
    item = entry.dtype.itemsize
    buffer = bytearray(min(FINITE_CHUNK_BYTES // item * item, entry.nbytes))
    try:
        with file.open("rb") as handle:
            handle.seek(entry.offset)
            left = entry.nbytes
            while left:
                view = memoryview(buffer)[: min(len(buffer), left)]
                if handle.readinto(view) < len(view):
                    raise BinqError(f"{file} is truncated inside the tensor {entry.name}")
                left -= len(view)
                if not bool(torch.isfinite(torch.frombuffer(view, dtype=entry.dtype)).all()):
                    return False
    except OSError as error:
        raise BinqError(f"cannot read {entry.name} from {file} ({error})") from None
    return True


def block_store(model: nn.Module) -> BlockStore | None:
    """The store of a streamed model; ``None`` for a model held whole in memory."""
    return _STORES.get(model)


class SourceTensors:
    """Where every tensor of a safetensors model folder lives, read one tensor at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, Path] = {}
        self._headers: dict[Path, dict[str, TensorEntry]] = {}
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise BinqError(f"cannot read {index} ({error})") from None
            if not isinstance(weight_map, dict):
                raise BinqError(f"{index}: weight_map is not an object")
            for name, file in weight_map.items():
                if not isinstance(file, str) or Path(file).name != file:
                    raise BinqError(f"{index}: '{name}' maps to {file!r}, not a file of the folder")
                self.files[name] = folder / file
        elif (folder / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / SINGLE_FILE), framework="pt") as handle:
                self.files = {name: folder / SINGLE_FILE for name in handle.keys()}  # noqa: SIM118
        missing = sorted({str(f.name) for f in self.files.values() if not f.is_file()})
        if missing:
            raise BinqError(f"{folder}: the shard {missing[0]} named by {INDEX_FILE} is missing")

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype ``name`` is stored in (from its file's header)."""
        return self._entry(name).dtype

    def _entry(self, name: str) -> TensorEntry:
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = read_header(file)
        entries = self._headers[file]
        if name not in entries:
            raise BinqError(f"{file} does not hold the tensor {name} that {INDEX_FILE} puts there")
        return entries[name]

    def map(self, name: str) -> torch.Tensor:
        """``name`` as stored, its bytes mapped from the file (private, copy-on-write) rather than read:
        a page is resident only once something reads it, so a large embedding whose rows are looked up
        a few at a time costs the memory of those rows (until the head reads all of it). Checked finite
        by reading the file (not the mapping), so the check leaves no page of it resident."""
        entry, file = self._entry(name), self.files[name]
        if not entry.dtype.is_floating_point or entry.offset % entry.dtype.itemsize or entry.nbytes == 0:
            return self.read([name], None)[name]
        if not _file_finite(file, entry):
            raise BinqError(f"model '{self.folder.name}' has NaN or Inf values in {name}; binq needs finite weights")
        try:
            with file.open("rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as error:
            raise BinqError(f"cannot map {name} from {file} ({error})") from None
        count = entry.nbytes // entry.dtype.itemsize
        return torch.frombuffer(mapped, dtype=entry.dtype, count=count, offset=entry.offset).view(entry.shape)

    def read(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The tensors ``names``, floats cast to ``dtype`` (``None``: as stored)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            for name in wanted:
                try:
                    # One tensor per opening: the file's mapped pages are let go before the next one.
                    with safe_open(str(file), framework="pt") as handle:
                        tensor = handle.get_tensor(name)
                        if tensor.is_floating_point() and dtype is not None:
                            tensor = tensor.to(dtype)
                        else:
                            tensor = tensor.clone()
                except (OSError, RuntimeError, ValueError) as error:
                    raise BinqError(f"cannot read {name} from {file} ({error})") from None
                tensors[name] = tensor
        return tensors


class BlockStore:
    """Reads a streamed model's blocks from its source files on demand (see the module docstring)."""

    def __init__(self, model: nn.Module, arch: Architecture, source: SourceTensors, dtype: torch.dtype) -> None:
        self.model, self.arch, self.source, self.dtype = model, arch, source, dtype
        self.blocks = get_blocks(model, arch)
        self.prefix = arch.blocks + "."
        self.loaded: set[int] = set()

    def names(self, index: int) -> dict[str, str]:
        """Block ``index``'s parameters: name in the block -> name in the source files."""
        block = self.blocks[index]
        return {name: f"{self.prefix}{index}.{name}" for name, _ in block.named_parameters()}

    def load(self, index: int) -> None:
        """Put block ``index``'s parameters in memory (a no-op when they are)."""
        if index in self.loaded:
            return
        names = self.names(index)
        tensors = self.source.read(list(names.values()), self.dtype)
        block = self.blocks[index]
        for name, key in names.items():
            tensor = tensors[key]
            if tensor.is_floating_point() and not all_finite(tensor):
                raise BinqError(f"model has NaN or Inf values in {key}; binq needs finite weights")
            module_path, _, attribute = name.rpartition(".")
            module = block.get_submodule(module_path) if module_path else block
            expected = tuple(module._parameters[attribute].shape)
            if tuple(tensor.shape) != expected:
                raise BinqError(f"{key} is {tuple(tensor.shape)} in the source files, the model expects {expected}")
            module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
        self.loaded.add(index)

    def release(self, index: int) -> None:
        """Drop block ``index``'s parameters (back to the meta device)."""
        block = self.blocks[index]
        for module in block.modules():
            for attribute, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[attribute] = nn.Parameter(
                        torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False
                    )
        self.loaded.discard(index)

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` in memory for the ``with`` body (left loaded if it already was)."""
        was_loaded = index in self.loaded
        self.load(index)
        try:
            yield self.blocks[index]
        finally:
            if not was_loaded:
                self.release(index)


def can_stream(folder: Path) -> bool:
    """Whether ``folder`` holds safetensors weights a streamed model can read block by block."""
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


def open_streamed(folder: Path, dtype: torch.dtype) -> nn.Module | None:
    """The model of ``folder`` with its blocks on disk (see the module docstring); ``None`` when the
    files do not name the model's tensors as the model does (the caller then loads it whole)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    arch = get_architecture(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    source = SourceTensors(folder)
    prefix = arch.blocks + "."
    state = model.state_dict()
    block_keys = [name for name in state if name.startswith(prefix)]
    other_keys = [name for name in state if not name.startswith(prefix) and state[name].is_meta]
    tied = {name for name in other_keys if name not in source.files and _tied_away(model, name)}
    absent = [name for name in block_keys + other_keys if name not in source.files and name not in tied]
    if absent:
        log.info("%s does not name the tensor %s as the model does: loading it whole", folder, absent[0])
        return None
    narrow = _narrowable(model, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name in other_keys:
        if name in tied:
            continue
        stored = source.stored_dtype(name)
        as_stored = stored == dtype or (
            name in narrow and stored.is_floating_point and stored.itemsize < dtype.itemsize
        )
        if as_stored and math.prod(state[name].shape) * stored.itemsize >= MAPPED_BYTES:
            tensors[name] = source.map(name)  # checked finite on the way
            continue
        tensor = source.read([name], None)[name]
        if tensor.is_floating_point() and not all_finite(tensor):
            raise BinqError(f"model '{folder.name}' has NaN or Inf values in {name}; binq needs finite weights")
        if tensor.is_floating_point() and not as_stored:
            tensor = tensor.to(dtype)
        tensors[name] = tensor
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    _widen_on_use(model, dtype)
    for name, param in model.named_parameters():
        param.requires_grad_(False)
        if not name.startswith(prefix) and param.is_meta:
            raise BinqError(f"{folder}: {name} is neither in the source files nor tied to a tensor that is")
    model.eval()
    model.config.use_cache = False
    _STORES[model] = BlockStore(model, arch, source, dtype)
    del tensors
    trim_free_memory()  # the source's pages and the cast's transients
    return model


class _WideningEmbedding(nn.Embedding):
    """An embedding table kept in the source's narrower float type; the rows it returns are widened to
    the compute type: exactly the rows a widened table gives (widening a float loses nothing)."""

    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input).to(self.compute_dtype)


class _WideningLinear(nn.Linear):
    """An output head kept in the source's narrower float type, widened for each call (the same logits)."""

    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return nn.functional.linear(input, self.weight.to(self.compute_dtype), bias)


def _narrowable(model: nn.Module, dtype: torch.dtype) -> set[str]:
    """The embedding weights a streamed model may keep as stored: plain ``nn.Embedding`` and ``nn.Linear``
    only, whose forward is just the lookup or the product (a scaled embedding, Gemma's, is widened on
    load: its scale would be applied in the narrow type)."""
    if not dtype.is_floating_point:
        return set()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    plain_head = head is not None and type(head) is nn.Linear
    tied = head is not None and bool(getattr(model.config, "tie_word_embeddings", False))
    names = set()
    if type(embedding) is nn.Embedding and (plain_head or not tied):
        names.add(_name_of(model, embedding) + ".weight")
    if plain_head and not tied:  # a tied head's weight is the embedding's
        names.add(_name_of(model, head) + ".weight")
    return names


def _widen_on_use(model: nn.Module, dtype: torch.dtype) -> None:
    """Give the embeddings kept narrow (:func:`_narrowable`) their widening forward."""
    for module, widening in (
        (model.get_input_embeddings(), _WideningEmbedding),
        (model.get_output_embeddings(), _WideningLinear),
    ):
        if module is None or module.weight.dtype == dtype or type(module) not in (nn.Embedding, nn.Linear):
            continue
        module.__class__ = widening
        module.compute_dtype = dtype


def _tied_away(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is the output embedding of a model that ties it to the input embedding."""
    output = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    return bool(tied) and output is not None and name == _name_of(model, output) + ".weight"


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return ""
