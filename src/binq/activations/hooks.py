"""Simulated activation quantization during evaluation: forward pre-hooks on the block linears.

Works with any method's weights (the hooks only touch the linears' inputs). For KL to the true
full-precision model, :class:`ActivationSwap` turns the hooks off while the original weights are in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from binq.activations.calibrate import ActivationPlan
from binq.evaluation.perplexity import WeightSwap
from binq.models.architectures import Architecture, block_linears, get_blocks


class ActivationHooks:
    """The installed hooks; ``enabled`` switches them off without removing them."""

    def __init__(self) -> None:
        self.enabled = True


@contextmanager
def quantized_activations(model: nn.Module, arch: Architecture, plan: ActivationPlan) -> Iterator[ActivationHooks]:
    """Inside the context every declared block linear sees its input fake-quantized per ``plan``."""
    state = ActivationHooks()
    handles = []
    if plan.config.enabled:
        for index, block in enumerate(get_blocks(model, arch)):
            for name, linear in block_linears(block, arch).items():
                quantize = plan.config.quantizer(plan.clip_ratio(f"{arch.blocks}.{index}.{name}"))

                def hook(_module: nn.Module, args: tuple, quantize=quantize) -> tuple | None:
                    if not state.enabled:
                        return None
                    return (quantize(args[0]), *args[1:])

                handles.append(linear.register_forward_pre_hook(hook))
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
