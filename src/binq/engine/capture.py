"""Capture what the decoder blocks receive, without running them.

Every block is temporarily replaced by a recorder that stores its arguments and returns its input
unchanged, so one pass over the calibration samples costs only the embedding lookups. Block 0's
hidden states are kept for every sample; the other arguments (attention masks, rotary position
embeddings, ...) are kept per block from the first sample, since architectures such as Gemma 3 give
different blocks different masks and rotary tables. All samples have the same length, so these are
the same for every sample.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_DROPPED_KWARGS = ("past_key_value", "past_key_values", "use_cache", "output_attentions")


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Per-block extra arguments, and block 0's hidden states per sample (``[1, L, d]`` each)."""

    hidden_states: list[torch.Tensor]
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


class _Recorder(nn.Module):
    def __init__(self, index: int, last: bool, sink: BlockInputs, record_arguments: bool):
        super().__init__()
        self.index, self.last, self.sink, self.record_arguments = index, last, sink, record_arguments

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == 0:
            self.sink.hidden_states.append(hidden_states.detach().cpu())
        if self.record_arguments:
            self.sink.args.append(args)
            self.sink.kwargs.append({k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS})
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor) -> BlockInputs:
    """Run ``samples`` (``[N, L]`` token ids) up to the first block and record every block's arguments."""
    sink = BlockInputs(hidden_states=[])
    originals = list(blocks)
    try:
        for n, sample in enumerate(samples):
            for i in range(len(originals)):
                blocks[i] = _Recorder(i, i == len(originals) - 1, sink, record_arguments=n == 0)
            with contextlib.suppress(_StopForward):
                model(sample.unsqueeze(0).to(model.device), use_cache=False)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return sink


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def block_output(output: Any) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, tuple | list) else output
