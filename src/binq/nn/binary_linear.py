"""``BinaryLinear``: a linear layer that holds a quantized weight's packed tensors, not a dense matrix.

The packed tensors of the weight's layout (``QuantizedWeight.packed_tensors()``: bit planes as uint8,
fp16 scales...) are persistent buffers under their own names, so a module's state-dict keys are
``<module>.<tensor>`` exactly as the checkpoint stores them (docs/FORMAT.md), plus ``<module>.bias``.
The buffers never change dtype: ``model.half()`` or ``model.float()`` move them between devices but
leave the stored bits as they are (only the bias follows the model's dtype).

``forward`` asks the kernel registry (:mod:`binq.nn.kernels`) for a fast path and otherwise runs the
reference: rebuild the weight with the layout's ``from_packed``, dequantize, ``F.linear``. The reference
works on any device (the unpacking runs on the CPU, the matmul where the input is). Caching the dense
weight (``cache_weight``) trades the memory of a dense copy for not unpacking on every call.

``activation_quantizer`` (set on load from a checkpoint's activation plan, W(1+1)A(1x4)) quantizes the
input per token first, exactly as the evaluation hooks did; a kernel whose ``quantizes_input`` is true
gets the raw input and computes from the quantizer's integer codes itself (:mod:`binq.nn.bitplane_kernel`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from binq.nn.kernels import select_kernel
from binq.quant.structured import QuantizedWeight, layout_class

if TYPE_CHECKING:
    from binq.activations.int4 import ActivationQuantizer

# Names a layout's tensor must not take: they are the module's own attributes or the bias (nn.Module's
# attributes, such as forward or training, are refused too).
_RESERVED = {"bias", "weight", "in_features", "out_features", "layout", "weight_metadata", "packed_names"}
_RESERVED |= {"cache_weight", "activation_quantizer", "_dense_cache", "_kernel_state"}


class BinaryLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as the packed tensors of one quantized-weight layout."""

    def __init__(
        self,
        layout: str,
        metadata: dict[str, Any],
        packed: dict[str, torch.Tensor],
        bias: torch.Tensor | None = None,
        cache_weight: bool = False,
    ) -> None:
        super().__init__()
        shape = metadata.get("shape")
        if not (isinstance(shape, list | tuple) and len(shape) == 2):
            raise ValueError(f"metadata needs 'shape' [out_features, in_features], got {shape!r}")
        clash = sorted(n for n in packed if n in _RESERVED or not n.isidentifier() or hasattr(self, n))
        if clash:
            names = ", ".join(map(repr, clash))
            raise ValueError(f"layout {layout!r} names tensor(s) {names}: reserved, or not a Python identifier")
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.layout = layout
        self.weight_metadata = dict(metadata)
        self.packed_names = tuple(packed)
        for name, tensor in packed.items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.cache_weight = cache_weight
        self._dense_cache: torch.Tensor | None = None
        self._kernel_state: dict[str, Any] = {}
        self.activation_quantizer: ActivationQuantizer | None = None

    @classmethod
    def from_weight(
        cls, weight: QuantizedWeight, bias: torch.Tensor | None = None, cache_weight: bool = False
    ) -> BinaryLinear:
        """Wrap an in-memory quantized weight (what ``quantize_model`` returns)."""
        return cls(weight.layout, weight.metadata(), weight.packed_tensors(), bias, cache_weight)

    @classmethod
    def empty(
        cls,
        layout: str,
        metadata: dict[str, Any],
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
        bias_dtype: torch.dtype | None,
        device: torch.device | str = "meta",
    ) -> BinaryLinear:
        """A module whose buffers have the given shapes and dtypes but no values (filled by a loader)."""
        packed = {name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype) in specs.items()}
        rows = int(metadata["shape"][0])
        bias = None if bias_dtype is None else torch.empty(rows, dtype=bias_dtype, device=device)
        return cls(layout, metadata, packed, bias)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.packed_names}

    def quantized_weight(self) -> QuantizedWeight:
        """Rebuild (and validate) the layout's weight from the buffers; errors name the tensor."""
        tensors = {name: t.detach().cpu() for name, t in self.packed_tensors().items()}
        return layout_class(self.layout).from_packed(tensors, self.weight_metadata)

    def dense_weight(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dequantized ``(out_features, in_features)`` weight (cached when ``cache_weight``)."""
        cached = self._dense_cache
        if cached is not None and cached.dtype == dtype and cached.device == torch.device(device):
            return cached
        # Dequantize in float32 first, then cast: the same numbers as the engine's in-memory model.
        dense = self.quantized_weight().dequantize(torch.float32).to(device=device, dtype=dtype)
        self._dense_cache = dense if self.cache_weight else None
        return dense

    def kernel_state(self, key: str, build: Callable[[BinaryLinear], Any]) -> Any:
        """What a kernel prepared once from the packed tensors (a re-packing, never a dense weight).

        Built on first use by ``build(self)`` and kept until the buffers move (``.to()``, ``.cuda()``).
        """
        state = self._kernel_state.get(key)
        if state is None:
            state = build(self)
            self._kernel_state[key] = state
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = select_kernel(self, x)
        if kernel is not None and getattr(kernel, "quantizes_input", False):
            return kernel.forward(self, x)
        if self.activation_quantizer is not None:
            x = self.activation_quantizer(x)
        if kernel is not None:
            return kernel.forward(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype, x.device), bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> BinaryLinear:
        # Packed tensors follow device moves only: a dtype cast would corrupt bit planes or round scales.
        packed = {name: self._buffers.pop(name) for name in self.packed_names}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in packed.items():
                device = fn(torch.empty(0, device=tensor.device)).device
                if tensor.is_meta and device.type != "meta":
                    tensor = torch.empty_like(tensor, device=device)
                self._buffers[name] = tensor.to(device)
        self._dense_cache = None
        self._kernel_state = {}
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
            f"bias={self.bias is not None}"
            + ("" if self.activation_quantizer is None else f", activations={self.activation_quantizer}")
        )


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every ``BinaryLinear`` of ``model`` rebuilt as its quantized weight, by full module name."""
    return {name: m.quantized_weight() for name, m in model.named_modules() if isinstance(m, BinaryLinear)}


def set_weight_cache(model: nn.Module, enabled: bool) -> None:
    """Turn the dense-weight cache of every ``BinaryLinear`` on or off (off frees the copies)."""
    for module in model.modules():
        if isinstance(module, BinaryLinear):
            module.cache_weight = enabled
            if not enabled:
                module._dense_cache = None
