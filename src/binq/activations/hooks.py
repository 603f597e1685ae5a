"""Simulated activation quantization during evaluation: forward pre-hooks on the block linears.

Works with any method's weights (the hooks only touch the linears' inputs). For KL to the true
full-precision model, :class:`ActivationSwap` turns the hooks off while the original weights are in.
Each hook applies the plan's :class:`~binq.activations.int4.ActivationQuantizer` for its linear; a saved
checkpoint keeps the same objects (``BinaryLinear.activation_quantizer``, docs/FORMAT.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from binq.activations.calibrate import ActivationPlan
from binq.evaluation.perplexity import WeightSwap
from binq.models.architectures import Architecture


class ActivationHooks:
    """The installed hooks; ``enabled`` switches them off without removing them."""

    def __init__(self) -> None:
        self.enabled = True


@contextmanager
def quantized_activations(model: nn.Module, arch: Architecture, plan: ActivationPlan) -> Iterator[ActivationHooks]:
    """Inside the context every declared block linear sees its input fake-quantized per ``plan``."""
    state = ActivationHooks()
    handles = []
    for name, quantize in plan.module_quantizers(model, arch).items():

        def hook(_module: nn.Module, args: tuple, quantize=quantize) -> tuple | None:
            if not state.enabled:
                return None
            return (quantize(args[0]), *args[1:])

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


class ActivationSwap(WeightSwap):
    """A :class:`WeightSwap` whose original model also runs with full-precision activations."""

    def __init__(self, swap: WeightSwap | None, hooks: ActivationHooks):
        super().__init__(swap.originals if swap is not None else {})
        self.hooks = hooks

    @contextmanager
    def original(self) -> Iterator[None]:
        self.hooks.enabled = False
        try:
            with super().original():
                yield
        finally:
            self.hooks.enabled = True
