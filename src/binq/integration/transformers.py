"""Make ``AutoModelForCausalLM.from_pretrained(DIR)`` load binq checkpoints (``quant_method: "binq"``).

transformers looks the ``quant_method`` of config.json's ``quantization_config`` up in two registries
(``register_quantization_config`` and ``register_quantizer``); :func:`register` adds binq to both, and
``import binq`` calls it. Loading then goes:

1. ``BinqConfig`` parses and validates ``quantization_config`` (format version, layouts, shapes);
2. before the weights are read, :meth:`BinqHfQuantizer._process_model_before_weight_loading` reads the
   safetensors headers (refusing truncated files and missing or mis-shaped tensors, by name) and replaces
   every quantized ``nn.Linear`` by a :class:`~binq.nn.BinaryLinear` whose buffers have the stored
   shapes and dtypes, so transformers' own loader fills them without casting a bit;
3. after loading, every module's weight is rebuilt by its layout's ``from_packed`` once, which checks
   shapes against the metadata and scales for non-finite values, and the checkpoint's activation plan
   (``quantization_config.activations``, validated in step 1) gives each listed module its
   ``activation_quantizer``.

Fragility, stated: this rides on transformers' quantizer hooks (``preprocess_model`` passing
``checkpoint_files``, meta-device init, a loader that keeps a buffer's dtype), checked against
transformers 5.x. Without ``import binq`` transformers does not know ``binq``, warns, skips the
quantizer and leaves every quantized linear randomly initialised: always import binq first (or use
``binq.load``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from binq.checkpoint.format import QUANT_METHOD, check_activations, check_quantization_config
from binq.checkpoint.header import TensorEntry, read_header
from binq.errors import BinqError
from binq.nn.binary_linear import BinaryLinear

log = logging.getLogger(__name__)


class BinqConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a binq checkpoint (see docs/FORMAT.md)."""

    def __init__(
        self,
        format_version: int | None = None,
        modules: dict[str, Any] | None = None,
        method: str | None = None,
        method_config: dict[str, Any] | None = None,
        binq_version: str | None = None,
        quant_method: str = QUANT_METHOD,
        activations: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        self.quant_method = quant_method
        self.format_version = format_version
        self.binq_version = binq_version
        self.method = method
        self.method_config = method_config or {}
        self.modules = modules or {}
        if activations is not None:  # absent from checkpoints without an activation plan
            self.activations = activations
        for key, value in extra.items():  # fields of a later minor revision, kept on save
            if not key.isidentifier() or hasattr(type(self), key) or key in _DERIVED:
                raise BinqError(f"quantization_config has a field '{key}' that would replace one of the config's own")
            setattr(self, key, value)
        self.parsed_modules = check_quantization_config(self.to_dict())
        self.parsed_activations = check_activations(self.to_dict(), self.parsed_modules)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """transformers' constructor from config.json (``cls(**config_dict)``), refusing keys Python would."""
        if "self" in config_dict:  # cls(**config_dict) would fail with a TypeError before __init__ runs
            raise BinqError("quantization_config has a field 'self' that would replace one of the config's own")
        return super().from_dict(config_dict, return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in _DERIVED}
        return {k: (v.value if hasattr(v, "value") else v) for k, v in data.items()}


# BinqConfig's attributes computed from the others (never read from, or written to, config.json).
_DERIVED = ("parsed_modules", "parsed_activations")


def _read_headers(checkpoint_files: list[str] | None) -> tuple[dict[str, TensorEntry], str]:
    if not checkpoint_files:
        raise BinqError("a binq checkpoint needs its safetensors weights file, found none")
    entries: dict[str, TensorEntry] = {}
    for file in checkpoint_files:
        if not str(file).endswith(".safetensors"):
            raise BinqError(f"binq checkpoints are safetensors only, got {Path(file).name}")
        entries.update(read_header(Path(file)))
    return entries, Path(checkpoint_files[0]).name


def _module_tensors(entries: dict[str, TensorEntry], module: str) -> dict[str, TensorEntry]:
    prefix = module + "."
    return {n[len(prefix) :]: e for n, e in entries.items() if n.startswith(prefix) and "." not in n[len(prefix) :]}


def replace_linears(
    model: nn.Module, modules: dict[str, tuple[str, dict[str, Any]]], entries: dict[str, TensorEntry], file: str
) -> None:
    """Swap every quantized ``nn.Linear`` for an empty :class:`BinaryLinear` shaped like the stored tensors."""
    for name, (layout, metadata) in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise BinqError(f"quantization_config names module '{name}', which the model does not have") from None
        rows, cols = metadata["shape"]
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (rows, cols):
            raise BinqError(f"module '{name}' is not a {rows}x{cols} linear layer in this model")
        stored = _module_tensors(entries, name)
        bias_entry = stored.pop("bias", None)
        if not stored:
            raise BinqError(f"the packed tensors of '{name}' are missing from {file}")
        if (bias_entry is None) != (linear.bias is None):
            raise BinqError(f"tensor '{name}.bias' is {'missing' if bias_entry is None else 'unexpected'}")
        specs = {t: (e.shape, e.dtype) for t, e in stored.items()}
        try:
            module = BinaryLinear.empty(layout, metadata, specs, bias_dtype=None, device="meta")
        except ValueError as error:
            raise BinqError(f"{name}: {error}") from None
        module.bias = linear.bias  # stays a parameter of the model's dtype; the loader fills it
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)


def check_stored_tensors(model: nn.Module, entries: dict[str, TensorEntry], file: str) -> None:
    """The file stores exactly the (already converted) model's state dict, tied tensors once.

    Each tensor with its shape, a floating-point one as floating point (the loader would cast integers
    into it); a stored tensor the model does not have means the file and config.json disagree.
    """
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    state = model.state_dict()
    for name, tensor in state.items():
        entry = entries.get(name)
        if entry is None:
            if name not in tied:
                raise BinqError(f"tensor '{name}' is missing from {file}")
        elif tuple(entry.shape) != tuple(tensor.shape):
            raise BinqError(f"tensor '{name}' has shape {entry.shape} in {file}, expected {tuple(tensor.shape)}")
        elif tensor.is_floating_point() and not entry.dtype.is_floating_point:
            raise BinqError(f"tensor '{name}' is stored as {entry.dtype} in {file}, expected a floating-point dtype")
    unknown = sorted(set(entries) - set(state))
    if unknown:
        raise BinqError(f"tensor '{unknown[0]}' in {file} is not a tensor of this model")


def check_smoothed_producers(model: nn.Module, activations: dict[str, Any] | None) -> None:
    """The modules an activation plan's channel smoothing changed are modules of the model."""
    for name in (activations or {}).get("smoothed_producers", []):
        try:
            model.get_submodule(name)
        except AttributeError:
            raise BinqError(
                f"quantization_config activations: smoothed_producers names '{name}', which the model does not have"
            ) from None


def validate_loaded(model: nn.Module) -> None:
    """Rebuild every ``BinaryLinear``'s weight once: from_packed checks shapes, dtypes and finite scales."""
    for name, module in model.named_modules():
        if isinstance(module, BinaryLinear):
            for tensor_name, tensor in module.packed_tensors().items():
                if tensor.is_meta:
                    raise BinqError(f"tensor '{name}.{tensor_name}' was not loaded")
            try:
                module.quantized_weight()
            except BinqError as error:
                raise BinqError(f"{name}: {error}") from None


def set_activation_quantizers(model: nn.Module, quantizers: dict[str, Any]) -> None:
    """Give each named ``BinaryLinear`` its input quantizer (``quantization_config.activations``)."""
    for name, quantizer in quantizers.items():
        module = model.get_submodule(name)
        if not isinstance(module, BinaryLinear):
            raise BinqError(f"quantization_config activations name '{name}', which is not a quantized linear")
        module.activation_quantizer = quantizer


class BinqHfQuantizer(HfQuantizer):
    """Loads binq checkpoints; it never quantizes (use ``binq quantize``)."""

    requires_calibration = True
    quantization_config: BinqConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        entries, file = _read_headers(kwargs.get("checkpoint_files"))
        replace_linears(model, self.quantization_config.parsed_modules, entries, file)
        check_stored_tensors(model, entries, file)
        check_smoothed_producers(model, getattr(self.quantization_config, "activations", None))

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        validate_loaded(model)
        set_activation_quantizers(model, self.quantization_config.parsed_activations)
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Add binq to transformers' quantizer registries (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BinqConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BinqHfQuantizer)


# Importing this module registers binq: the import hook of binq.integration.hook defers to it when
# this module is what first imports transformers' registry.
register()
