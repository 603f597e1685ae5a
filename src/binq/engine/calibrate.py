"""The block-sequential calibration engine (GPTQ's layer-sequential pipeline, which BiLLM and ARB share).

1. The block walker (:mod:`binq.engine.walker`) captures block 0's inputs for every calibration sample
   (and every block's extra arguments).
2. For each block, moved alone to the compute device:
   - hook the first linear of each group of linears that share an input, and run the samples through
     the block to accumulate one Hessian per group (groups share it: q/k/v need one, not three);
   - quantize every linear with the method (a pure function of weight, Hessian and config), and
     put the dequantized weight in place;
   - re-run the samples through the quantized block: its outputs are the next block's inputs.
3. The model stays on the CPU; calibration activations stay on the CPU unless they fit on the device.

With a :class:`~binq.engine.resume.Progress` (``binq quantize --out DIR``), each finished block's structured
weights and records are written to ``DIR/progress`` as soon as the block is done, and a resumed run takes
the finished blocks ``0 .. k-1`` from there instead of calibrating them: it puts their dequantized weights
in place exactly as quantizing them did and re-runs them to feed the next block, so block ``k`` sees the
inputs an uninterrupted run's block ``k`` saw (docs/RESUME.md).

In a multi-process run (``torch.distributed`` initialised by the caller, each rank with its own share of
the calibration samples) two steps join in: an all-reduce of each accumulator
(:meth:`HessianAccumulator.reduce_`, called here and a no-op in one process) and a broadcast of each
quantized weight from the rank that made it (:func:`stage_owners` spreads the linears by cost, :func:`_share_weight`
broadcasts; both are no-ops in one process, and each rank's result holds the structured weights and
records it made; :func:`binq.engine.distributed.gather_result` collects them on rank 0). Each rank first
quantizes all its linears of a stage, then the stage's weights are broadcast in model order, so the
ranks work on a stage's linears at the same time. docs/DISTRIBUTED.md has the whole picture. Progress there is
written by rank 0 (each block's weights gathered to it) and read by rank 0, which broadcasts the weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from binq.engine.capture import BlockInputs, capture_block_inputs, to_device
from binq.engine.tune import BlockTuneRecord, TuneConfig, for_block, tune_block, tuning_enabled
from binq.engine.walker import BlockStep, walk_blocks
from binq.errors import BinqError
from binq.methods.registry import Method
from binq.models.architectures import Architecture, ModelHead, block_linears, get_blocks, module_name
from binq.quant.hessian import relative_output_error
from binq.quant.structured import QuantizedWeight, WeightSummary

if TYPE_CHECKING:
    from binq.engine.resume import BlockItem, Progress

log = logging.getLogger(__name__)

HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_device(device: str) -> None:
    """Refuse a device torch cannot parse, or CUDA without CUDA, with a one-line error."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise BinqError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BinqError(f"--device {device} asked for, but no CUDA device is available")


@dataclass
class EngineConfig:
    """How the engine runs (not what the method does).

    - ``device``: where one block at a time is computed (``cpu``, ``cuda``, ``cuda:1``).
    - ``hessian_dtype``: ``float32`` (GPTQ's) or ``float64`` (advised for inputs wider than 8192).
    - ``true_sequential``: quantize groups of linears one after another inside a block, each seeing
      the already-quantized earlier ones (GPTQ's ``--true-sequential``; BiLLM and ARB do not).
    - ``activations_on_device``: keep calibration activations on the device; ``None`` decides by
      free memory.
    """

    device: str = "cpu"
    hessian_dtype: str = "float32"
    true_sequential: bool = False
    activations_on_device: bool | None = None

    def __post_init__(self) -> None:
        if self.hessian_dtype not in HESSIAN_DTYPES:
            raise BinqError(f"--hessian-dtype must be one of {', '.join(HESSIAN_DTYPES)}")
        check_device(self.device)


@dataclass
class LayerRecord:
    """One quantized linear: what the per-module table and report.json show."""

    block: int
    name: str
    shape: tuple[int, int]
    relative_error: float  # ||(W - Q) X||^2 / ||W X||^2 on the calibration inputs
    compute_bits: float
    storage_bits: float
    storage_bits_total: int
    numel: int
    time_s: float

    @classmethod
    def of(cls, block: int, name: str, quantized: QuantizedWeight, error: float, time_s: float) -> LayerRecord:
        total = quantized.storage_bits_total  # packs the weight: once, not once per figure
        return cls(
            block=block,
            name=name,
            shape=quantized.shape,
            relative_error=error,
            compute_bits=quantized.compute_bits,
            storage_bits=total / quantized.numel,
            storage_bits_total=total,
            numel=quantized.numel,
            time_s=time_s,
        )


@dataclass
class EngineResult:
    """What the engine (or the calibration-free path) made: a record per linear, the structured weights by
    full module name, and the seconds it took."""

    records: list[LayerRecord] = field(default_factory=list)
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    time_s: float = 0.0
    tuning: list[BlockTuneRecord] = field(default_factory=list)  # one per block, with --tune


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes of the ``torch.distributed`` run (``(0, 1)`` outside one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def stage_owners(linears: dict[str, nn.Linear]) -> dict[str, int]:
    """Which rank quantizes each linear of a stage (all rank 0 in one process).

    The stage ends when its slowest rank ends, so the linears are spread by their cost, not their
    count: largest first, each to the rank with the least work so far (ties: the lower rank, then model
    order), the cost of a linear with ``n`` outputs and ``k`` inputs taken as ``n k^2``: the column sweep
    of GPTQ-family methods (GPTQ's seven linears of a 2560/7168 LLaMA block take 4, 11 and 31 s at one
    thread, as n k^2 says to within 5 %). Every rank computes the same answer.
    """
    world = rank_and_world()[1]
    if world == 1:
        return dict.fromkeys(linears, 0)
    return balance({name: m.out_features * m.in_features**2 for name, m in linears.items()}, world)


def balance(costs: dict[str, int], world: int) -> dict[str, int]:
    """Largest cost first, each to the least-loaded of ``world`` ranks (ties: lower rank, then the order
    of ``costs``): name -> rank."""
    load = [0] * world
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # sorted() is stable: the given order breaks ties
        rank = min(range(world), key=lambda r: load[r])
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def _share_weight(linear: nn.Linear, owner: int) -> None:
    """In a multi-process run, every rank takes the quantized weight from the rank that made it."""
    rank, world = rank_and_world()
    if world == 1:
        return
    if rank != owner:
        # A fresh tensor: callers may hold the original (for KL), which must not be overwritten.
        linear.weight.data = linear.weight.data.clone()
    dist.broadcast(linear.weight.data, src=owner)


def _quantize_linear(
    full_name: str, linear: nn.Linear, hessian: torch.Tensor, method: Method, config: Any
) -> tuple[QuantizedWeight, float]:
    weight = linear.weight.detach().to(torch.float32)
    if not torch.isfinite(weight).all():
        raise BinqError(f"{full_name}: the weight has NaN or Inf entries")
    try:
        quantized = method.quantize(weight, hessian.to(weight.device), config)
    except BinqError as err:
        raise BinqError(f"{full_name}: {err}") from err
    dequantized = quantized.dequantize().to(weight.device)
    error = relative_output_error(weight, dequantized, hessian)
    # A new tensor, not an in-place copy: callers may hold the original for reference evaluations.
    linear.weight.data = dequantized.to(linear.weight.dtype)
    return quantized, error


def quantize_model(
    model: nn.Module,
    arch: Architecture,
    calibration: torch.Tensor,
    method: Method,
    method_config: Any,
    engine: EngineConfig | None = None,
    on_layer: Callable[[LayerRecord], None] | None = None,
    progress: bool = True,
    resume: Progress | None = None,
    observer: BlockObserver | None = None,
    tune: TuneConfig | None = None,
    on_tune: Callable[[BlockTuneRecord], None] | None = None,
    seed: int = 0,
    plan: Callable[[str], tuple[Method, Any]] | None = None,
) -> EngineResult:
    """Quantize every declared linear of every block of ``model`` (on the CPU) in place.

    ``calibration`` is ``[N, L]`` token ids. Returns the structured weights by full module name and a
    record per linear; ``on_layer`` sees each record as soon as it exists. ``resume`` (rank 0's, in a
    multi-process run; ``None`` on the other ranks): where finished blocks are recorded and taken from.
    ``observer`` (one process only) sees each block before the method touches it and once its quantized
    weights are in place; when its ``keeps_weights`` is false the result keeps a
    :class:`~binq.quant.structured.WeightSummary` of each weight, not the weight (a streamed run).
    ``tune`` (one process only): tune each block's continuous parameters once the method has quantized
    it (:mod:`binq.engine.tune`), its windows drawn from ``seed``; ``on_tune`` sees each block's record.
    ``plan`` (``--target-bits``, :mod:`binq.engine.allocation`): each linear's own ``(method, config)`` by
    full module name, asked for just before the linear is quantized; ``method`` then only names the run.
    """
    engine = engine or EngineConfig()
    tuning = tuning_enabled(tune)
    prefix_inputs = None  # the blocks' arguments for windows of tune.tokens tokens
    split: _Split | None = None  # --tune-split: the training windows cut into windows of their own
    if tuning:
        tune.check_run(calibration.shape[0], rank_and_world()[1], calibration.shape[1])
        if tune.split:
            trained = calibration[: calibration.shape[0] - tune.holdout]
            pieces = trained[:, : trained.shape[1] // tune.tokens * tune.tokens].reshape(-1, tune.tokens)
            prefix_inputs = capture_block_inputs(model, get_blocks(model, arch), pieces)
            embeddings = prefix_inputs.hidden_states
            split = _Split(embeddings, list(embeddings) if tune.target == "original" else None)
        elif 0 < tune.tokens < calibration.shape[1]:
            prefix_inputs = capture_block_inputs(model, get_blocks(model, arch), calibration[:1, : tune.tokens])
    reference: list[torch.Tensor] | None = None  # the unquantized model's stream (--tune-target original)
    device = torch.device(engine.device)
    hessian_dtype = HESSIAN_DTYPES[engine.hessian_dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # reproducible Hessian factors (GPTQ's setting)
    torch.backends.cudnn.allow_tf32 = False
    result = EngineResult()
    started = time.perf_counter()

    groups = list(arch.linear_groups)
    order = [name for group in groups for name in group]  # a block's linears in the order they are made
    stages = [[g] for g in groups] if engine.true_sequential else [groups]
    rank = rank_and_world()[0]
    count = len(get_blocks(model, arch))
    recording, resume_from = _resume_point(resume, count)
    loaded_blocks = 0
    preloaded: dict[int, tuple[dict[str, QuantizedWeight], list[LayerRecord]] | None] = {}
    index = 0
    walk = walk_blocks(
        model, arch, calibration, device, engine.activations_on_device, progress=progress, desc=method.name
    )
    try:
        for step in walk:
            index = step.index
            if observer is not None:
                observer.before(index, step.block)
            if tuning and tune.target == "original" and reference is None:
                reference = list(step.inputs)  # block 0: both streams start from the embeddings (the walk
                # writes each block's outputs over its own list, so the original stream keeps a list of its own)
            if index < resume_from:
                loaded = preloaded.pop(index) if index in preloaded else _load_block(resume, model, arch, index, device)
                if loaded is not None:
                    if reference is not None:  # the original block, before its quantized weights go in
                        reference = step.run_on(reference)
                    if split is None:
                        _put_block(step, loaded, order, result, on_layer)
                    else:  # the split windows' original block too, before the quantized weights go in
                        pieces = _arguments(prefix_inputs, index, device)
                        pieces_targets = split.targets(step, pieces)
                        _put_block(step, loaded, order, result, on_layer)
                        split.advance(step, pieces, pieces_targets)
                    if tuning and resume is not None and index in resume.tuning:
                        _tuned(result, BlockTuneRecord(**resume.tuning[index]), on_tune)
                    _observe_after(observer, step, loaded[0], result)
                    loaded_blocks += 1
                    if resume_from == count:  # every later block is finished too: no need to feed it
                        following = index + 1
                        if following < count:
                            preloaded[following] = _load_block(resume, model, arch, following, device)
                        if following == count or preloaded[following] is not None:
                            step.outputs = []  # nothing will read this block's outputs
                        else:  # a damaged file: that block and every later one are recomputed
                            resume_from = following
                            _discard_from(resume, following + 1, count)
                    continue
                resume_from = index  # a damaged file: this block and every later one are recomputed
                _discard_from(resume, index + 1, count)
            made: dict[str, tuple[LayerRecord, QuantizedWeight]] = {}
            targets = pieces_targets = prefix = None
            if tuning:  # the original block's outputs, while its weights are still the original ones
                targets = step.run_on(reference if tune.target == "original" else step.inputs)
                prefix = _arguments(prefix_inputs, index, device)
                if split is not None:
                    split_started = time.perf_counter()
                    pieces_targets = split.targets(step, prefix)
                    split_time = time.perf_counter() - split_started
            for stage in stages:
                accumulators = step.hessians(stage, hessian_dtype)
                owner_of = stage_owners({name: step.linears[name] for group in stage for name in group})
                owners: list[tuple[str, int]] = []  # every linear of the stage and the rank that makes it
                for group in stage:
                    group_owners = [owner_of[name] for name in group]
                    owners += zip(group, group_owners, strict=True)
                    accumulator = accumulators.pop(group)  # freed with its group, not at the stage's end
                    if rank not in group_owners:
                        continue
                    hessian = accumulator.take_hessian()
                    del accumulator
                    for name, owner in zip(group, group_owners, strict=True):
                        if owner != rank:
                            continue
                        linear = step.linears[name]
                        full_name = step.full_name(name)
                        t0 = time.perf_counter()
                        chosen = plan(full_name) if plan is not None else (method, method_config)
                        quantized, error = _quantize_linear(full_name, linear, hessian, *chosen)
                        record = LayerRecord.of(index, name, quantized, error, time.perf_counter() - t0)
                        result.weights[full_name] = quantized
                        result.records.append(record)
                        made[full_name] = (record, quantized)
                        if on_layer is not None:
                            on_layer(record)
                    del hessian
                # Only now, so that no rank waits for another's linear before starting on its own.
                for name, owner in owners:
                    _share_weight(step.linears[name], owner)
            tune_record = None
            if tuning:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
                windows = None if split is None else (split.quantized, pieces_targets)
                block_tune = for_block(tune, index, count)  # the first and last blocks' own steps
                head = ModelHead(model, arch) if tune.head_steps and index == count - 1 else None
                tune_record = _tune_step(step, made, targets, block_tune, generator, order, prefix, windows, head)
                if split is not None:  # the split windows' forwards are tuning's work: counted in its time
                    split_started = time.perf_counter()
                    split.advance(step, prefix, pieces_targets)
                    split_time += time.perf_counter() - split_started
                    tune_record = replace(tune_record, time_s=tune_record.time_s + split_time)
                del pieces_targets
                result.weights.update({name: weight for name, (_, weight) in made.items()})
                _tuned(result, tune_record, on_tune)
                if tune.target == "original":
                    reference = targets  # the original block's outputs feed the original next block
                del targets
            if recording:
                _record_block(resume, index, made, [step.full_name(name) for name in order], tune_record)
            _observe_after(observer, step, {name: weight for name, (_, weight) in made.items()}, result)
    except torch.cuda.OutOfMemoryError as err:
        raise BinqError(
            f"out of memory on {device} in block {index}: use fewer or shorter calibration samples, "
            "--hessian-dtype float32, or --device cpu"
        ) from err
    if resume is not None and loaded_blocks:
        resume.resumed_from = loaded_blocks
    result.time_s = time.perf_counter() - started
    return result


_Arguments = tuple[tuple[Any, ...], dict[str, Any]]


def _arguments(inputs: BlockInputs | None, index: int, device: torch.device) -> _Arguments | None:
    """Block ``index``'s extra arguments as captured in ``inputs`` (windows of their length), on ``device``."""
    if inputs is None:
        return None
    return to_device(inputs.args[index], device), to_device(inputs.kwargs[index], device)


@dataclass
class _Split:
    """``--tune-split``'s windows (the training windows cut into windows of ``--tune-tokens`` tokens): their
    quantized stream, and the original model's (``None`` with ``--tune-target quantized``), block by block."""

    quantized: list[torch.Tensor]
    original: list[torch.Tensor] | None

    def targets(self, step: BlockStep, arguments: _Arguments) -> list[torch.Tensor]:
        """The original block's outputs (call it before the block's quantized weights go in)."""
        return step.run_on(self.original if self.original is not None else self.quantized, arguments)

    def advance(self, step: BlockStep, arguments: _Arguments, targets: list[torch.Tensor]) -> None:
        """Both streams one block on: the quantized block's outputs, and ``targets`` as the original's."""
        self.quantized = step.run_on(self.quantized, arguments)
        if self.original is not None:
            self.original = targets


def _tune_step(
    step: BlockStep,
    made: dict[str, tuple[LayerRecord, QuantizedWeight]],
    targets: list[torch.Tensor],
    tune: TuneConfig,
    generator: torch.Generator,
    order: list[str],
    prefix: tuple[tuple[Any, ...], dict[str, Any]] | None,
    windows: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    head: ModelHead | None = None,
) -> BlockTuneRecord:
    """Tune the block's quantized linears; their kept weights replace the method's in ``made`` and in
    the block (as :func:`_quantize_linear` puts them). ``head`` (``--tune-head-steps``, the last block): the
    model's head, moved to the block's device for the tuning and back."""
    names = [name for name in order if step.full_name(name) in made]
    weights = {name: made[step.full_name(name)][1] for name in names}
    home = None if head is None else next(head.parameters()).device
    try:
        if head is not None:
            head.to(step.device)
        tuned, record = tune_block(
            step.index, step.block, weights, step.inputs, targets, (step.args, step.kwargs), prefix, step.device,
            tune, generator, windows, head,
        )  # fmt: skip
    finally:
        if head is not None:
            head.to(home)
    if record.kept:
        for name in names:
            linear = step.linears[name]
            linear.weight.data = tuned[name].dequantize().to(device=linear.weight.device, dtype=linear.weight.dtype)
            made[step.full_name(name)] = (made[step.full_name(name)][0], tuned[name])
    return record


def _tuned(result: EngineResult, record: BlockTuneRecord, on_tune: Callable[[BlockTuneRecord], None] | None) -> None:
    result.tuning.append(record)
    if on_tune is not None:
        on_tune(record)


class BlockObserver(Protocol):
    """What a streamed run does with each block while it is in memory (:mod:`binq.streamed`)."""

    keeps_weights: bool

    def before(self, index: int, block: nn.Module) -> None:
        """Block ``index`` as read from the source, before the method changes it."""

    def after(self, index: int, block: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
        """Block ``index`` with its quantized weights in place (``weights`` by full module name)."""


def _observe_after(
    observer: BlockObserver | None, step: Any, weights: dict[str, QuantizedWeight], result: EngineResult
) -> None:
    if observer is None:
        return
    observer.after(step.index, step.block, weights)
    if not observer.keeps_weights:
        for name in weights:
            result.weights[name] = WeightSummary.of(weights[name])  # type: ignore[assignment]


def _resume_point(resume: Progress | None, count: int) -> tuple[bool, int]:
    """Whether blocks are recorded, and the first block to quantize (the finished ones before it are
    loaded), as rank 0 decides for every rank."""
    decision = [resume is not None, 0]
    if resume is not None:
        decision[1] = resume.keep_prefix()
        resume.announce(count, decision[1])
    if rank_and_world()[1] > 1:
        dist.broadcast_object_list(decision, src=0)
    return bool(decision[0]), int(decision[1])


def _discard_from(resume: Progress | None, first: int, count: int) -> None:
    if resume is not None:
        for index in range(first, count):
            resume.discard(index)


def _expected_shapes(model: nn.Module, arch: Architecture, index: int) -> dict[str, tuple[int, int]]:
    linears = block_linears(get_blocks(model, arch)[index], arch)
    names = [name for group in arch.linear_groups for name in group]
    return {module_name(arch, index, n): (linears[n].out_features, linears[n].in_features) for n in names}


def _load_block(
    resume: Progress | None, model: nn.Module, arch: Architecture, index: int, device: torch.device
) -> tuple[dict[str, QuantizedWeight], list[LayerRecord]] | None:
    """Block ``index`` from the progress folder (rank 0; the other ranks learn whether it read back whole)."""
    loaded = None
    if resume is not None:
        loaded = resume.load(index, _expected_shapes(model, arch, index), device)
    if rank_and_world()[1] > 1:
        whole = [loaded is not None]
        dist.broadcast_object_list(whole, src=0)
        if rank_and_world()[0] != 0:
            return ({}, []) if whole[0] else None
    return loaded


def _put_block(
    step: Any,
    loaded: tuple[dict[str, QuantizedWeight], list[LayerRecord]],
    order: list[str],
    result: EngineResult,
    on_layer: Callable[[LayerRecord], None] | None,
) -> None:
    """A finished block as quantizing it left it: each dequantized weight in place (as
    :func:`_quantize_linear` puts it), its weights and records in the result (rank 0's, which broadcasts
    the weights in a multi-process run)."""
    weights, records = loaded
    if rank_and_world()[0] == 0:
        for record in records:
            full_name = step.full_name(record.name)
            linear = step.linears[record.name]
            dequantized = weights[full_name].dequantize().to(linear.weight.device)
            linear.weight.data = dequantized.to(linear.weight.dtype)
            result.weights[full_name] = weights[full_name]
            result.records.append(record)
            if on_layer is not None:
                on_layer(record)
    for name in order:
        _share_weight(step.linears[name], 0)


def _record_block(
    resume: Progress | None,
    index: int,
    made: dict[str, tuple[LayerRecord, QuantizedWeight]],
    names: list[str],
    tune_record: BlockTuneRecord | None = None,
) -> None:
    """Write block ``index``'s file (rank 0, after gathering what the other ranks made of it)."""
    from binq.engine.resume import block_item

    items: list[BlockItem] = [block_item(name, record, weight) for name, (record, weight) in made.items()]
    rank, world = rank_and_world()
    if world > 1:  # what travels is on the CPU
        items = [(n, r, layout, {k: t.cpu() for k, t in packed.items()}, m, d) for n, r, layout, packed, m, d in items]
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(items, gathered, dst=0)
        if rank != 0:
            return
        assert gathered is not None
        items = [item for part in gathered for item in part]
    assert resume is not None
    by_name = {item[0]: item for item in items}
    ordered = [by_name[name] for name in names]
    if tune_record is None:
        resume.save(index, ordered)
    else:
        resume.save(index, ordered, tuning=asdict(tune_record))
