"""The one block walker: capture block 0's inputs, then hand out the decoder blocks one at a time.

Everything that needs a block's real inputs walks the model this way: the quantization engine
(Hessians, then the method, then the quantized block's outputs), the activation calibration (each
linear group's input tokens), and the layer-level benchmarks (Hessians of the original model). A
:class:`BlockStep` holds one block on the compute device with its inputs, one ``[1, L, d]`` tensor
per calibration sample; what the consumer does to the block before the walk moves on is what the
next block sees, because the walker feeds it the block's outputs. A consumer that already ran the
block in the state the next block must see (the activation calibration runs it once, capturing
inputs) sets :attr:`BlockStep.outputs` and the walker skips the re-run.

In a ``torch.distributed`` run each rank walks its own share of the samples; the Hessians are summed
over ranks (:meth:`HessianAccumulator.reduce_`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from binq.engine.capture import BlockInputs, block_output, capture_block_inputs, to_device
from binq.engine.hessian import HessianAccumulator
from binq.memory import trim_free_memory
from binq.models.architectures import Architecture, block_linears, get_blocks, module_name
from binq.models.streaming import block_store


@dataclass
class BlockStep:
    """One decoder block during a walk, on ``device``, with its inputs and extra arguments."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]
    inputs: list[torch.Tensor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    device: torch.device
    arch: Architecture
    outputs: list[torch.Tensor] | None = None  # set by a consumer that already ran the block as it must stay

    def full_name(self, name: str) -> str:
        return module_name(self.arch, self.index, name)

    @torch.no_grad()
    def _output(self, x: torch.Tensor, arguments: tuple[tuple[Any, ...], dict[str, Any]] | None = None) -> torch.Tensor:
        args, kwargs = (self.args, self.kwargs) if arguments is None else arguments
        out = block_output(self.block(x.to(self.device), *args, **kwargs))
        return out if x.device == self.device else out.to(x.device)

    def run(self) -> list[torch.Tensor]:
        """The block's outputs for every sample, where the inputs live."""
        return self.run_on(self.inputs)

    def run_on(
        self, inputs: list[torch.Tensor], arguments: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    ) -> list[torch.Tensor]:
        """The block (as it is now) run on ``inputs`` instead of the walk's own, under ``arguments`` (the
        extra arguments for windows of their length; ``None``: the walk's own)."""
        return [self._output(x, arguments) for x in inputs]

    def advance(self) -> list[torch.Tensor]:
        """:meth:`run`, each output written over its input in :attr:`inputs` as soon as it is made, so that
        one set of activations is alive instead of two: the walk's own list, which a consumer that keeps
        inputs beyond its step must copy (``list(step.inputs)``)."""
        for i, x in enumerate(self.inputs):
            self.inputs[i] = self._output(x)
        return self.inputs

    def hessians(
        self, groups: list[tuple[str, ...]], dtype: torch.dtype = torch.float32
    ) -> dict[tuple[str, ...], HessianAccumulator]:
        """One accumulator per group of linears sharing an input, filled by one pass over the samples
        (and summed over the ranks of a distributed run)."""
        accumulators: dict[tuple[str, ...], HessianAccumulator] = {}
        handles = []
        for group in groups:
            first = self.linears[group[0]]
            acc = HessianAccumulator(first.in_features, dtype, self.device)
            accumulators[group] = acc
            handles.append(first.register_forward_hook(lambda _m, inp, _out, acc=acc: acc.add(inp[0])))
        try:
            for x in self.inputs:
                self._output(x)  # the hooks take what they need; no output is kept
        finally:
            for handle in handles:
                handle.remove()
        for acc in accumulators.values():
            acc.reduce_()
        return accumulators

    def capture_inputs(self, names: list[str]) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
        """The inputs the linears ``names`` see, one tensor per sample, and the block's outputs of the same pass."""
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        handles = [
            self.linears[name].register_forward_pre_hook(lambda _m, args, sink=sink: sink.append(args[0].detach()))
            for name, sink in captured.items()
        ]
        try:
            outputs = self.run()
        finally:
            for handle in handles:
                handle.remove()
        return captured, outputs


def activations_fit(inputs: BlockInputs, device: torch.device) -> bool:
    """Whether the calibration activations (and one block's outputs) fit in half the device's free memory."""
    if device.type != "cuda":
        return device.type == "cpu"
    needed = 2 * sum(t.numel() * t.element_size() for t in inputs.hidden_states)
    free, _ = torch.cuda.mem_get_info(device)
    return needed < 0.5 * free


def walk_blocks(
    model: nn.Module,
    arch: Architecture,
    calibration: torch.Tensor,
    device: torch.device | str = "cpu",
    activations_on_device: bool | None = None,
    last_block: int | None = None,
    progress: bool = False,
    desc: str = "blocks",
) -> Iterator[BlockStep]:
    """Yield every block (up to ``last_block``) of ``model`` with its inputs for ``calibration`` (``[N, L]``).

    The model stays on the CPU; each block moves to ``device`` for its step and back afterwards (a
    streamed model's block is read from its files first and dropped afterwards,
    :mod:`binq.models.streaming`). The calibration activations stay on the CPU unless
    ``activations_on_device`` (``None``: if they fit).
    """
    device = torch.device(device)
    blocks = get_blocks(model, arch)
    store = block_store(model)  # a streamed model: each block is read from disk for its step, then dropped
    inputs = capture_block_inputs(model, blocks, calibration)
    on_device = activations_fit(inputs, device) if activations_on_device is None else activations_on_device
    hidden = [x.to(device) if on_device else x for x in inputs.hidden_states]
    inputs.hidden_states = []  # the walk's list is the only one: each block's outputs replace its inputs
    count = len(blocks) if last_block is None else last_block + 1
    for index in tqdm(range(count), desc=desc, unit="block", disable=not progress):
        if store is not None:
            store.load(index)
        block = blocks[index].to(device)
        step = BlockStep(
            index=index,
            block=block,
            linears=block_linears(block, arch),
            inputs=hidden,
            args=to_device(inputs.args[index], device),
            kwargs=to_device(inputs.kwargs[index], device),
            device=device,
            arch=arch,
        )
        try:
            yield step
            hidden = step.outputs if step.outputs is not None else step.advance()
        finally:
            blocks[index] = block.to("cpu")
            if store is not None:
                store.release(index)
            trim_free_memory()


def block_hessians(
    model: nn.Module,
    arch: Architecture,
    calibration: torch.Tensor,
    blocks: list[int],
    names: tuple[str, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{full module name: (weight, Hessian)}`` of the linears ``names`` (default: all) of the chosen
    blocks of the unquantized model, for layer-level studies; the walk stops after the last one."""
    wanted = set(blocks)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in walk_blocks(model, arch, calibration, last_block=max(wanted)):
        if step.index not in wanted:
            continue
        groups = [g for g in arch.linear_groups if names is None or any(n in names for n in g)]
        accumulators = step.hessians(groups, dtype)
        for group in groups:
            hessian = accumulators[group].hessian()
            for name in group:
                if names is None or name in names:
                    weight = step.linears[name].weight.detach().float().clone()
                    layers[step.full_name(name)] = (weight, hessian)
        if step.index == max(wanted):
            step.outputs = []  # no block after this one is wanted: skip its re-run
    return layers
