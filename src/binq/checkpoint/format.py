"""The binq checkpoint format: names, version, and the ``quantization_config`` of config.json.

A checkpoint is a Hugging Face model folder (docs/FORMAT.md is the full specification):

- ``model.safetensors`` (or, written block by block, shards ``model-0000k-of-0000n.safetensors`` and
  ``model.safetensors.index.json``, as transformers writes them): for every quantized linear ``M``, its
  layout's packed tensors as ``M.<tensor>``
  (``QuantizedWeight.packed_tensors()``, stored exactly) and ``M.bias`` if it has one; every other
  tensor (embeddings, norms, LM head) under its usual name, tied tensors once;
- ``config.json``: the model's config plus ``quantization_config`` (below), with an ``activations``
  entry when the block linears' inputs are quantized at run time (W(1+1)A(1x4), ``--act-bits``);
- the tokenizer files, and ``generation_config.json`` when the model has one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from binq.errors import BinqError
from binq.quant.structured import layout_class

if TYPE_CHECKING:
    from binq.activations.int4 import ActivationQuantizer

QUANT_METHOD = "binq"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a checkpoint written block by block: shards and this index


def packed_key(module: str, tensor: str) -> str:
    """The safetensors name of one packed tensor of a quantized module."""
    return f"{module}.{tensor}"


# The run-time activation smoothing kinds a checkpoint can declare ("channel" is folded into the weights).
ACTIVATION_SMOOTH_KINDS = ("none", "channel", "token")
ACTIVATION_FIELDS = ("bits", "sym", "smooth", "clip_ratios", "token_candidates", "smoothed_producers")


def build_quantization_config(
    modules: dict[str, tuple[str, dict[str, Any]]],
    method: str | None,
    method_config: dict[str, Any] | None,
    activations: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json's ``quantization_config``: ``modules`` maps a module name to (layout, layout metadata).

    ``activations`` is :func:`build_activations_config`'s entry, left out when None.
    """
    from binq import __version__

    config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "binq_version": __version__,
        "method": method,
        "method_config": method_config or {},
        "modules": {name: {"layout": layout, "metadata": meta} for name, (layout, meta) in sorted(modules.items())},
    }
    if activations is not None:
        config["activations"] = activations
    return config


def build_activations_config(
    quantizers: dict[str, ActivationQuantizer], smooth: str, smoothed_producers: list[str]
) -> dict[str, Any]:
    """The ``activations`` entry: the input quantizer of each module (all share bits, sym and candidates)."""
    if smooth not in ACTIVATION_SMOOTH_KINDS:  # 'auto' is resolved by calibrate_activations
        raise BinqError(f"activation smoothing must be one of {', '.join(ACTIVATION_SMOOTH_KINDS)}, got '{smooth}'")
    first = next(iter(quantizers.values()))
    if not 2 <= first.bits <= 8:  # the codes are uint8 (binq.activations.int4)
        raise BinqError(f"activation plans of 2 to 8 bits can be saved, got {first.bits}")
    shared = (first.bits, first.sym, first.token_candidates)
    for name, quantizer in quantizers.items():
        if (quantizer.bits, quantizer.sym, quantizer.token_candidates) != shared:
            raise BinqError(f"the activation quantizer of '{name}' differs from the others beyond its clip ratio")
    return {
        "bits": first.bits,
        "sym": first.sym,
        "smooth": smooth,
        "clip_ratios": {name: float(q.clip_ratio) for name, q in sorted(quantizers.items())},
        "token_candidates": None if first.token_candidates is None else [float(r) for r in first.token_candidates],
        "smoothed_producers": sorted(smoothed_producers),
    }


def _is_int(value: Any) -> bool:
    """A JSON integer (``true`` is not one, although Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ratio(value: Any) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and 0 < value <= 1  # NaN fails the comparison; math.isfinite would overflow on a huge int


def check_activations(config: dict[str, Any], modules: dict[str, Any]) -> dict[str, ActivationQuantizer]:
    """Validate ``quantization_config.activations`` and return each module's input quantizer ({} without one).

    Every error is one line naming the field: a loaded model must quantize its inputs exactly as the run
    that saved it, or refuse to load.
    """
    entry = config.get("activations")
    if entry is None:
        return {}
    where = "quantization_config activations"
    if not isinstance(entry, dict):
        raise BinqError(f"{where} must be an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(ACTIVATION_FIELDS))
    if unknown:
        raise BinqError(f"{where} has unknown field '{unknown[0]}' (written by a newer binq?)")
    bits = entry.get("bits")
    if not (_is_int(bits) and 2 <= bits <= 8):
        raise BinqError(f"{where}: 'bits' must be an integer in [2, 8], got {bits!r}")
    sym = entry.get("sym")
    if not isinstance(sym, bool):
        raise BinqError(f"{where}: 'sym' must be true or false, got {sym!r}")
    smooth = entry.get("smooth")
    if smooth not in ACTIVATION_SMOOTH_KINDS:
        raise BinqError(f"{where}: 'smooth' must be one of {', '.join(ACTIVATION_SMOOTH_KINDS)}, got {smooth!r}")
    candidates = entry.get("token_candidates")
    if smooth == "token":
        if not (isinstance(candidates, list) and candidates and all(_is_ratio(r) for r in candidates)):
            got = f"got {candidates!r}"
            raise BinqError(f"{where}: 'token_candidates' must be a non-empty list of ratios in (0, 1], {got}")
    elif candidates is not None:
        raise BinqError(f"{where}: 'token_candidates' is only for smooth 'token', got {candidates!r}")
    producers = entry.get("smoothed_producers", [])
    if not (isinstance(producers, list) and all(isinstance(p, str) for p in producers)):
        raise BinqError(f"{where}: 'smoothed_producers' must be a list of module names, got {producers!r}")
    ratios = entry.get("clip_ratios")
    if not isinstance(ratios, dict) or not ratios:
        raise BinqError(f"{where}: 'clip_ratios' must be a non-empty object of module name -> ratio")
    for name, ratio in ratios.items():
        if name not in modules:
            raise BinqError(f"{where}: clip_ratios names '{name}', which is not a quantized module")
        if not _is_ratio(ratio):
            raise BinqError(f"{where}: clip ratio of '{name}' must be a number in (0, 1], got {ratio!r}")

    from binq.activations.int4 import ActivationQuantizer  # only checkpoints with a plan pay this import

    token_candidates = None if candidates is None else tuple(float(r) for r in candidates)
    return {name: ActivationQuantizer(bits, sym, float(ratio), token_candidates) for name, ratio in ratios.items()}


def check_quantization_config(config: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Validate a ``quantization_config`` and return its modules as (layout, metadata) by name."""
    if config.get("quant_method") != QUANT_METHOD:
        raise BinqError(f"quantization_config has quant_method {config.get('quant_method')!r}, expected 'binq'")
    version = config.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:  # true and 1.0 equal 1 in Python, not in the format
        hint = "upgrade binq" if _is_int(version) and version > FORMAT_VERSION else "re-quantize the model"
        raise BinqError(
            f"checkpoint format version {version!r} is not supported (this binq reads version {FORMAT_VERSION}); {hint}"
        )
    modules = config.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise BinqError("quantization_config has no 'modules' table")
    parsed = {}
    for name, entry in modules.items():
        if not name:
            raise BinqError("quantization_config names a module with an empty name")
        well_formed = isinstance(entry, dict) and isinstance(entry.get("layout"), str)
        if not (well_formed and isinstance(entry.get("metadata"), dict)):
            raise BinqError(f"quantization_config module '{name}' needs a 'layout' string and a 'metadata' object")
        layout_class(entry["layout"])  # an unknown layout fails here, naming the known ones
        shape = entry["metadata"].get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
            raise BinqError(f"quantization_config module '{name}' has no valid metadata 'shape' (got {shape!r})")
        parsed[name] = (entry["layout"], entry["metadata"])
    check_activations(config, parsed)
    return parsed
