"""Write a binq checkpoint (layout in :mod:`binq.checkpoint.format` and docs/FORMAT.md)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from binq.checkpoint.format import (
    INDEX_FILE,
    WEIGHTS_FILE,
    build_activations_config,
    build_quantization_config,
    packed_key,
)
from binq.errors import BinqError
from binq.quant.structured import QuantizedWeight

if TYPE_CHECKING:
    from binq.activations.calibrate import ActivationPlan

log = logging.getLogger(__name__)


def _unquantized_tensors(
    model: nn.Module,
    quantized: set[str],
    dtype: torch.dtype | None,
    exact_modules: frozenset[str] = frozenset(),
    skip_prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Every other state-dict tensor once (tied ones under their first name), floats cast to ``dtype``.

    The tensors of ``exact_modules`` keep their in-memory dtype (norms that channel smoothing changed);
    names starting with ``skip_prefix`` are left out (the blocks, written shard by shard).
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in quantized or (skip_prefix is not None and name.startswith(skip_prefix)):
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:  # tied to a tensor already stored (SmolLM2's lm_head is its embedding)
            continue
        seen.add(key)
        if dtype is not None and tensor.is_floating_point() and module not in exact_modules:
            tensor = tensor.to(dtype)
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors


def _quantized_tensors(
    model: nn.Module, weights: dict[str, QuantizedWeight], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    tensors = {}
    for module_name, weight in weights.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise BinqError(f"the model has no module '{module_name}' to save a quantized weight for") from None
        shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if shape != weight.shape:
            raise BinqError(f"'{module_name}' is {shape[0]}x{shape[1]}, its quantized weight {weight.shape}")
        for tensor_name, tensor in weight.packed_tensors().items():
            if tensor_name in ("bias", "weight"):
                raise BinqError(f"layout '{weight.layout}' names a tensor '{tensor_name}', which is reserved")
            tensors[packed_key(module_name, tensor_name)] = tensor.detach().cpu().contiguous()
        bias = getattr(module, "bias", None)
        if bias is not None:
            tensors[packed_key(module_name, "bias")] = bias.detach().to(dtype or bias.dtype).cpu().contiguous()
    return tensors


def _activations_entry(model: nn.Module, weights: dict[str, QuantizedWeight], plan: ActivationPlan) -> dict[str, Any]:
    """quantization_config's ``activations``: the quantizer of every linear the evaluation hooks covered."""
    from binq.models.architectures import get_architecture

    quantizers = plan.module_quantizers(model, get_architecture(model))
    missing = sorted(set(quantizers) - set(weights))
    if missing:
        raise BinqError(f"the activation plan quantizes the input of '{missing[0]}', which has no quantized weight")
    return build_activations_config(quantizers, plan.config.smooth, plan.smoothed_producers)


def _umask_mode(file: Path) -> int:
    """Create ``file`` empty as ``open`` would (mode ``0o666 & ~umask``) and return that mode.

    Creating the file reads the umask without ``os.umask``, which would change it for a moment for
    every thread of the process. A file left by an interrupted save is replaced: it keeps its old mode.
    """
    file.unlink(missing_ok=True)
    descriptor = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)


def save_checkpoint(
    model: nn.Module,
    weights: dict[str, QuantizedWeight],
    out_dir: Path | str,
    *,
    tokenizer: Any = None,
    method: str | None = None,
    method_config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    activations: ActivationPlan | None = None,
) -> Path:
    """Write ``model`` with its linears ``weights`` (full module name -> quantized weight) to ``out_dir``.

    ``dtype`` is the precision of everything that is not quantized (the source checkpoint's, e.g.
    float16; ``None`` keeps the in-memory dtype). ``activations``: the plan the model was evaluated with
    (``--act-bits``), saved so that a loaded model quantizes its linears' inputs the same way; the
    norms its channel smoothing was folded into keep their in-memory precision, so the loaded model
    computes what the evaluation measured. Returns the safetensors file's path.
    """
    if not weights:
        raise BinqError("nothing to save: no quantized weights")
    activation_entry, exact_modules = None, frozenset[str]()
    if activations is not None and activations.config.enabled:
        activation_entry = _activations_entry(model, weights, activations)
        exact_modules = frozenset(activation_entry["smoothed_producers"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _unquantized_tensors(model, set(weights), dtype, exact_modules)
    tensors.update(_quantized_tensors(model, weights, dtype))
    path = out / WEIGHTS_FILE
    write_tensors(path, tensors)
    remove_stale_files(out, keep={WEIGHTS_FILE})
    modules = {name: (w.layout, w.metadata()) for name, w in weights.items()}
    write_config(out, model, modules, method, method_config, dtype, activation_entry, tokenizer)
    log.info("wrote checkpoint %s (%.1f MiB)", out, path.stat().st_size / 2**20)
    return path


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, atomically (a crash mid-write never leaves a file that looks complete),
    with the mode the user's umask gives new files."""
    partial = path.with_name(path.name + ".partial")
    mode = _umask_mode(partial)
    save_file(tensors, str(partial), metadata={"format": "pt"})
    with contextlib.suppress(OSError):  # a file system without modes keeps its own
        partial.chmod(mode)  # safetensors writes 0600 whatever the umask; the other files follow the umask
    partial.replace(path)


def remove_stale_files(out: Path, keep: set[str]) -> None:
    """Remove the weight files of an earlier checkpoint in ``out`` that are not in ``keep``: a single
    file, shards, or a shard index, any of which a loader would otherwise read."""
    candidates = [out / WEIGHTS_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]
    for file in candidates:
        if file.name not in keep:
            file.unlink(missing_ok=True)


def write_config(
    out: Path,
    model: nn.Module,
    modules: dict[str, tuple[str, dict[str, Any]]],
    method: str | None,
    method_config: dict[str, Any] | None,
    dtype: torch.dtype | None,
    activation_entry: dict[str, Any] | None,
    tokenizer: Any,
) -> None:
    """config.json with ``quantization_config`` (``modules``: module name -> (layout, layout metadata)),
    the generation config and the tokenizer."""
    config = copy.deepcopy(model.config)
    config.use_cache = True
    if dtype is not None:
        config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    config_file = out / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["quantization_config"] = build_quantization_config(modules, method, method_config, activation_entry)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
