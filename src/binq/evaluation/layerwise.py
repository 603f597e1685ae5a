"""Perplexity and KL measured block by block, for a model that is never whole in memory.

A streamed run (:mod:`binq.models.streaming`) holds one block at a time, so the evaluation windows go
through the model the way the calibration samples do: each window's inputs to block 0 are captured
once, and two streams of hidden states advance together, one block at a time, while that block is in
memory:

- :meth:`LayerwiseEvaluation.before` runs the *original* stream through the block as read from the
  source (before the method touches it);
- :meth:`LayerwiseEvaluation.after` runs the *quantized* stream through the same block with its
  quantized weights in place.

:meth:`LayerwiseEvaluation.finish` turns each stream's last hidden states into logits with the model's
own head (final norm, LM head, any logit soft-capping: the model's forward with every block replaced by
a replay of the stored states) and scores them exactly as :func:`~binq.evaluation.evaluate_perplexity`
does (:class:`~binq.evaluation.perplexity.WindowScores`), a chunk of positions at a time
(:func:`~binq.evaluation.perplexity.row_chunks`): the head acts on each position alone, so a chunk's
logits are the whole window's rows, while only one chunk of each model's logits is ever alive (at
512 positions and a 49152-token vocabulary, 12 MiB instead of 100 MiB). Every window is computed with the same
operations, in the same order, as the whole model's forward computes it, so the numbers are the same,
bit for bit, as the in-memory evaluation's; the original's block outputs are computed on the fly, never
from a second copy of the model.

Memory: both streams of every window (``windows x seqlen x hidden`` each, per evaluation set). By
default they live in temporary files (:class:`~binq.evaluation.state_file.StateFile`), one window in
memory at a time, since each is touched only when its block is in memory; ``states_in_file=False``
holds them in memory, as the papers' layer-wise evaluation does. The numbers are the same either way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from binq.engine.capture import BlockInputs, block_output, capture_block_inputs, to_device
from binq.evaluation.perplexity import Protocol, WindowScores, check_windows, chunked_head
from binq.evaluation.state_file import StateFile
from binq.memory import trim_free_memory
from binq.models.architectures import Architecture, get_blocks


@dataclass
class _Streams:
    protocol: Protocol
    samples: torch.Tensor  # [windows, seqlen] token ids
    inputs: BlockInputs  # each block's extra arguments
    original: list[torch.Tensor] | StateFile
    quantized: list[torch.Tensor] | StateFile


class _Replay(nn.Module):
    """Stands in for a block in the head-only forward: the first returns the stored states, the rest pass them on."""

    def __init__(self, states: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.states = states

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.states is None:
            return hidden_states
        return self.states.pop(0).to(hidden_states.device)


class LayerwiseEvaluation:
    """The evaluation of one streamed run (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        arch: Architecture,
        tokens: dict[str, torch.Tensor],
        protocols: dict[str, Protocol],
        seqlen: int,
        max_windows: int | None,
        device: str = "cpu",
        states_in_file: bool = True,
        folder: str | Path | None = None,
    ) -> None:
        """``states_in_file``: the streams in temporary files in ``folder`` (the system's temporary folder
        when ``None``), one window in memory at a time."""
        self.model, self.arch, self.device = model, arch, torch.device(device)
        blocks = get_blocks(model, arch)
        self.sets: dict[str, _Streams] = {}
        for name, ids in tokens.items():
            protocol = protocols[name]
            windows = check_windows(ids, seqlen, protocol, max_windows)
            samples = ids[0, : windows * seqlen].reshape(windows, seqlen)
            inputs = capture_block_inputs(model, blocks, samples)
            states = inputs.hidden_states
            inputs.hidden_states = []
            if states_in_file:
                original = StateFile(len(states), tuple(states[0].shape), states[0].dtype, folder)
                quantized = StateFile(len(states), tuple(states[0].shape), states[0].dtype, folder)
                for i in range(len(states)):
                    original[i] = quantized[i] = states[i]
                    states[i] = None  # type: ignore[call-overload]
                self.sets[name] = _Streams(protocol, samples, inputs, original, quantized)
            else:
                self.sets[name] = _Streams(protocol, samples, inputs, list(states), list(states))
            del states

    @torch.no_grad()
    def _run(
        self, block: nn.Module, index: int, streams: _Streams, states: list[torch.Tensor] | StateFile
    ) -> list[torch.Tensor] | StateFile:
        """``states`` advanced through ``block``, each window's output written over its input (each stream
        has a list or file of its own), so that one window's states are alive twice at most, not the whole set."""
        args = to_device(streams.inputs.args[index], self.device)
        kwargs = to_device(streams.inputs.kwargs[index], self.device)
        for i in range(len(states)):
            x = states[i]
            states[i] = block_output(block(x.to(self.device), *args, **kwargs)).to(x.device)
        return states

    def before(self, index: int, block: nn.Module) -> None:
        """Block ``index`` holds the source's weights: advance the original stream through it."""
        for streams in self.sets.values():
            streams.original = self._run(block, index, streams, streams.original)

    def after(self, index: int, block: nn.Module) -> None:
        """Block ``index`` holds its quantized weights: advance the quantized stream through it."""
        for streams in self.sets.values():
            streams.quantized = self._run(block, index, streams, streams.quantized)

    @torch.no_grad()
    def finish(self, progress: bool = False) -> dict[str, dict[str, Any]]:
        """Each set's evaluation (:class:`~binq.evaluation.perplexity.EvalResult` as a dict), once every
        block went through :meth:`before` and :meth:`after`."""
        blocks = get_blocks(self.model, self.arch)
        saved = list(blocks)
        original_replay, quantized_replay = _Replay([]), _Replay([])
        stack = contextlib.ExitStack()
        try:
            blocks[0] = quantized_replay
            for i in range(1, len(saved)):
                blocks[i] = _Replay(None)
            self.model.to(self.device)  # only the parts outside the blocks: the blocks are out of the model
            results = {}
            head = stack.enter_context(chunked_head(self.model))
            for name, streams in self.sets.items():
                scores = WindowScores(streams.protocol, len(streams.samples))
                desc = f"eval {streams.protocol.text}"
                for i in tqdm(range(len(streams.samples)), desc=desc, unit="window", disable=not progress):
                    x = streams.samples[i : i + 1].to(self.device)

                    def logits(states: torch.Tensor, replay: _Replay, rows: slice, x: torch.Tensor = x) -> torch.Tensor:
                        # A chunk of positions through the head alone; a head that is not chunked sees the
                        # whole window each time, as the in-memory forward does (and its rows are taken).
                        part = rows if head else slice(None)
                        replay.states = [states[:, part]]
                        blocks[0] = replay
                        out = self.model(x[:, part], use_cache=False).logits
                        return out if head else out[:, rows]

                    quantized, original = streams.quantized[i], streams.original[i]  # read once per window
                    scores.add_rows(
                        x,
                        lambda rows, states=quantized: logits(states, quantized_replay, rows),
                        lambda rows, states=original: logits(states, original_replay, rows),
                    )
                    del quantized, original
                    trim_free_memory()
                results[name] = scores.result().to_dict()
        finally:
            stack.close()
            with contextlib.suppress(RuntimeError):
                self.model.to("cpu")
            for i, block in enumerate(saved):
                blocks[i] = block
            for streams in self.sets.values():
                for states in (streams.original, streams.quantized):
                    if isinstance(states, StateFile):
                        states.close()
        return results
