"""The binq checkpoint format: names, version, and the ``quantization_config`` of config.json.

A checkpoint is a Hugging Face model folder (docs/FORMAT.md is the full specification):

- ``model.safetensors``: for every quantized linear ``M``, its layout's packed tensors as ``M.<tensor>``
  (``QuantizedWeight.packed_tensors()``, stored exactly) and ``M.bias`` if it has one; every other
  tensor (embeddings, norms, LM head) under its usual name, tied tensors once;
- ``config.json``: the model's config plus ``quantization_config`` (below);
- the tokenizer files, and ``generation_config.json`` when the model has one.
"""

from __future__ import annotations

from typing import Any

from binq.errors import BinqError
from binq.quant.structured import layout_class

QUANT_METHOD = "binq"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def packed_key(module: str, tensor: str) -> str:
    """The safetensors name of one packed tensor of a quantized module."""
    return f"{module}.{tensor}"


def build_quantization_config(
    modules: dict[str, tuple[str, dict[str, Any]]], method: str | None, method_config: dict[str, Any] | None
) -> dict[str, Any]:
    """config.json's ``quantization_config``: ``modules`` maps a module name to (layout, layout metadata)."""
    from binq import __version__

    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "binq_version": __version__,
        "method": method,
        "method_config": method_config or {},
        "modules": {name: {"layout": layout, "metadata": meta} for name, (layout, meta) in sorted(modules.items())},
    }


def check_quantization_config(config: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Validate a ``quantization_config`` and return its modules as (layout, metadata) by name."""
    if config.get("quant_method") != QUANT_METHOD:
        raise BinqError(f"quantization_config has quant_method {config.get('quant_method')!r}, expected 'binq'")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        hint = "upgrade binq" if isinstance(version, int) and version > FORMAT_VERSION else "re-quantize the model"
        raise BinqError(
            f"checkpoint format version {version!r} is not supported (this binq reads version {FORMAT_VERSION}); {hint}"
        )
    modules = config.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise BinqError("quantization_config has no 'modules' table")
    parsed = {}
    for name, entry in modules.items():
        well_formed = isinstance(entry, dict) and isinstance(entry.get("layout"), str)
        if not (well_formed and isinstance(entry.get("metadata"), dict)):
            raise BinqError(f"quantization_config module '{name}' needs a 'layout' string and a 'metadata' object")
        layout_class(entry["layout"])  # an unknown layout fails here, naming the known ones
        shape = entry["metadata"].get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise BinqError(f"quantization_config module '{name}' has no valid metadata 'shape' (got {shape!r})")
        parsed[name] = (entry["layout"], entry["metadata"])
    return parsed
