"""binq as a library: :func:`quantize` and :func:`evaluate`, the whole pipeline of one run.

One run, in this order (``binq quantize`` is these calls plus printing):

1. load the model (an embedded name, folder, .gguf file, Hub id, or an already loaded model);
2. read the calibration windows (skipped for calibration-free methods unless activation calibration
   needs them) and every evaluation set (so a bad name fails in seconds, not after the long part);
3. activation calibration (``--act-bits``): smoothing folded into the full-precision model, clipping
   searched (:func:`binq.activations.calibrate_activations`);
4. quantize every declared linear: the block-sequential engine (:func:`binq.engine.calibrate.quantize_model`)
   or, for a calibration-free method, every linear on its own in worker processes
   (:func:`binq.engine.independent.quantize_independent`);
5. evaluate perplexity and KL to the original on each set, the original's weights swapped in per window;
6. the report (docs/REPORT.md) and, with ``out``, ``report.json`` and the packed checkpoint.

With ``out``, the run records its progress per block in ``out/progress`` and, when that folder holds a
killed run of the same fingerprint, continues from its finished blocks to the same checkpoint
(:mod:`binq.engine.resume`, docs/RESUME.md); the folder is deleted once the checkpoint is written.

In a multi-process run (``torch.distributed`` initialised, e.g. by ``binq quantize`` under torchrun) every
rank does steps 1-3 alike, quantizes its share (:mod:`binq.engine.distributed`), and rank 0 gathers the
weights and does steps 5-6 alone (docs/DISTRIBUTED.md).

Everything a run decides is in its typed configs: the method's config class, :class:`CalibrationConfig`,
:class:`EvaluationConfig`, :class:`~binq.engine.calibrate.EngineConfig` and
:class:`~binq.activations.ActivationConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from binq.activations import (
    ActivationConfig,
    ActivationPlan,
    ActivationSwap,
    calibrate_activations,
    quantized_activations,
)
from binq.bits import summarize_bits, unquantized_bits
from binq.checkpoint.sharded import ShardedCheckpoint
from binq.data import calibration_windows, describe_eval, evaluation_tokens
from binq.data.zeroshot import TaskItems, build_task
from binq.engine import distributed
from binq.engine.allocation import MIXED, AllocationConfig, Allocator, plan_allocation
from binq.engine.calibrate import EngineConfig, EngineResult, LayerRecord, quantize_model
from binq.engine.independent import default_workers, quantize_independent
from binq.engine.resume import RUN_FILE, SCHEMA, Progress, model_identity, progress_folder, windows_digest
from binq.engine.streamed import StreamedRun, quantize_free_streamed
from binq.engine.tune import BlockTuneRecord, TuneConfig, tune_options, tuning_enabled
from binq.errors import BinqError
from binq.evaluation import Protocol, WeightSwap, evaluate_perplexity
from binq.evaluation.layerwise import LayerwiseEvaluation
from binq.evaluation.zeroshot import TaskResult, ZeroShotConfig, score_task
from binq.memory import STREAM_LOAD_THRESHOLD, large_allocations_mapped, map_large_allocations, mapping_threshold
from binq.methods import Method, get_method
from binq.models import LoadedModel, get_architecture, get_blocks, load_model, named_linears, parameter_inventory
from binq.models.streaming import block_store
from binq.quant.structured import QuantizedWeight
from binq.report import (
    REPORT_SCHEMA,
    extra_bit_summary,
    library_versions,
    machine,
    now_utc,
    peak_memory,
    write_report,
)

log = logging.getLogger(__name__)

DEFAULT_EVAL_SETS = ("brit1911", "persuasion")


@dataclass
class CalibrationConfig:
    """The calibration windows: ``nsamples`` random windows of ``seqlen`` tokens of ``source`` (``austen``,
    a built-in text, wikitext2, c4, ptb or a file), drawn with ``seed`` (GPTQ's protocol is 128 x 2048)."""

    source: str = "austen"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise BinqError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise BinqError("--seqlen must be at least 2")


@dataclass
class EvaluationConfig:
    """Perplexity and KL on each of ``sets``, in windows of ``seqlen`` tokens (the first ``windows`` only,
    or all); ``sets`` empty: no evaluation."""

    sets: tuple[str, ...] = DEFAULT_EVAL_SETS
    seqlen: int = 2048
    windows: int | None = None

    def __post_init__(self) -> None:
        self.sets = tuple(self.sets)
        if self.seqlen < 2:
            raise BinqError("--seqlen must be at least 2")
        if self.windows is not None and self.windows < 1:
            raise BinqError("--eval-windows must be at least 1")


# The quick protocol (the standard for tables on a 2-core CPU) and GPTQ's full one.
QUICK_CALIBRATION = CalibrationConfig(nsamples=32, seqlen=512)
QUICK_EVALUATION = EvaluationConfig(seqlen=512, windows=16)
FULL_CALIBRATION = CalibrationConfig()
FULL_EVALUATION = EvaluationConfig()


@dataclass
class QuantizationResult:
    """What :func:`quantize` made: the model with every declared linear quantized (dequantized weights
    in place, on the CPU), the structured weights by full module name, a record per linear, the
    evaluations by set name, the activation plan, and ``report`` (the dict ``report.json`` holds).

    In a multi-process run only rank 0's result is whole; another rank's (``rank`` > 0) holds the
    weights and records that rank made, no evaluations and no report."""

    model: LoadedModel
    method: Method
    config: Any
    weights: dict[str, QuantizedWeight]
    records: list[LayerRecord]
    evaluations: dict[str, dict[str, Any]]
    activation_plan: ActivationPlan
    report: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    checkpoint: ShardedCheckpoint | None = None  # a streamed run's, its blocks already written

    def save(self, out: str | Path) -> Path:
        """``report.json`` and the packed checkpoint (docs/FORMAT.md) in ``out``; returns the report's path."""
        from binq.checkpoint import save_checkpoint

        if self.rank != 0:
            raise BinqError(f"rank {self.rank} of a multi-process run holds part of the result: save on rank 0")
        out = Path(out)
        if self.model.streamed:
            if self.checkpoint is None or out.resolve() != self.checkpoint.out.resolve():
                raise BinqError("a streamed run writes its checkpoint block by block to its own out folder only")
            path = write_report(self.report, out)
            self.checkpoint.finish(
                tokenizer=self.model.tokenizer, method=self.method.name, method_config=dataclasses.asdict(self.config)
            )
            return path
        path = write_report(self.report, out)
        # Unquantized tensors go back at the source's precision: the same bits the report counts. The
        # activation plan goes along, so the loaded model quantizes inputs as evaluated here.
        save_checkpoint(
            self.model.model, self.weights, out, tokenizer=self.model.tokenizer, method=self.method.name,
            method_config=dataclasses.asdict(self.config), dtype=source_dtype(self.model),
            activations=self.activation_plan,
        )  # fmt: skip
        return path


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured: the evaluations by set name, the zero-shot tasks by name (with every
    request's score) and ``report`` (``report.json``'s dict)."""

    model: LoadedModel
    evaluations: dict[str, dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    def save(self, out: str | Path) -> Path:
        return write_report(self.report, Path(out))


def compute_dtype(device: str) -> torch.dtype:
    """fp16 on CUDA; fp32 on CPUs, where fp16 matmuls are slow or missing."""
    return torch.float16 if device.startswith("cuda") else torch.float32


def source_dtype(loaded: LoadedModel) -> torch.dtype:
    """The dtype the source checkpoint stores its parameters in (its config.json; float16 when it does
    not say, as for GGUF sources). The in-memory dtype says nothing: binq computes in fp32 on CPUs."""
    config_file = Path(loaded.path) / "config.json"
    dtype = None
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        dtype = config.get("torch_dtype") or config.get("dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, torch.float16)


def default_label(
    method: Method, config: Any, activations: ActivationConfig | None = None, tune: TuneConfig | None = None
) -> str:
    """``gptq 4-bit g128``, ``billm``, ``w11 A4``, ``arb-group g128 tuned``: the method, its bits and group,
    the activation bits, tuning."""
    bits = getattr(config, "bits", None)
    label = method.name if bits is None else f"{method.name} {bits}-bit"
    if isinstance(config, AllocationConfig):
        label = config.label
    elif getattr(config, "group_size", None):
        label += f" g{config.group_size}"
    if activations is not None and activations.enabled:
        label += f" A{activations.bits}"
    if tuning_enabled(tune):
        label += " tuned"
    return label


def check_seqlen(model: torch.nn.Module, seqlen: int) -> None:
    """A window longer than the model's positions fails deep in the forward (OPT) or is meaningless."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise BinqError(f"--seqlen {seqlen} is longer than the model's context ({limit} positions)")


def _load(model: str | LoadedModel, device: str, stream: bool = False) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return load_model(model, dtype=compute_dtype(device), stream=stream)


def _method_and_config(method: str | Method, config: Any) -> tuple[Method, Any]:
    if isinstance(method, str):  # "mixed": --target-bits, each linear's method chosen (engine/allocation.py)
        method = MIXED if method == MIXED.name else get_method(method)
    if config is None:
        return method, method.make_config()
    if isinstance(config, dict):
        return method, method.make_config(**config)
    if not isinstance(config, method.config_class):
        raise BinqError(f"method '{method.name}' takes a {method.config_class.__name__}, not a {type(config).__name__}")
    return method, config


def _evaluation_tokens(loaded: LoadedModel, evaluation: EvaluationConfig) -> dict[str, torch.Tensor]:
    return {name: evaluation_tokens(loaded.tokenizer, name, evaluation.seqlen) for name in evaluation.sets}


def _run_evaluations(
    loaded: LoadedModel,
    tokens: dict[str, torch.Tensor],
    evaluation: EvaluationConfig,
    device: str,
    swap: Any,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    results = {}
    model = loaded.model
    model.to(device)
    for name, ids in tokens.items():
        protocol = _protocol(loaded, name, evaluation)
        result = evaluate_perplexity(
            model, ids, evaluation.seqlen, protocol, evaluation.windows, swap, device, progress
        )
        results[name] = result.to_dict()
    model.to("cpu")
    return results


def _model_section(loaded: LoadedModel, spec: Any, architecture: str, device: str) -> dict[str, Any]:
    return {
        "spec": spec if isinstance(spec, str) else loaded.path,
        "name": loaded.name,
        "path": loaded.path,
        "architecture": architecture,
        "dtype": str(compute_dtype(device)).removeprefix("torch."),
    }


def _evaluation_shortcuts(report: dict[str, Any], evaluations: dict[str, dict[str, Any]]) -> None:
    report["ppl"] = {k: {"quantized": v["ppl"], "original": v["ppl_original"]} for k, v in evaluations.items()}
    report["kl"] = {k: v["kl"] for k, v in evaluations.items()}


@dataclass
class _Run:
    """One :func:`quantize` call once its arguments are checked: what every step of the run reads."""

    model: str | LoadedModel
    method: Method
    config: Any
    calibration: CalibrationConfig
    evaluation: EvaluationConfig
    engine: EngineConfig
    activations: ActivationConfig
    workers: int | None
    out: str | Path | None
    label: str
    progress: bool
    on_layer: Callable[[LayerRecord], None] | None
    command: list[str] | None
    started: float
    rank: int = 0
    world: int = 1
    stream: bool = False
    allocator: Allocator | None = None  # --target-bits: each linear's candidate, set once it is measured
    tune: TuneConfig | None = None
    on_tune: Callable[[BlockTuneRecord], None] | None = None

    @property
    def tuning(self) -> bool:
        return tuning_enabled(self.tune)

    @property
    def uses_engine(self) -> bool:
        """Whether the block-sequential engine quantizes (a calibration-free method goes there only to be tuned)."""
        return not self.method.calibration_free or self.tuning

    @property
    def spec(self) -> str:
        return self.model if isinstance(self.model, str) else self.model.path

    @property
    def world_size(self) -> dict[str, int]:
        """What a multi-process run adds to the report's engine section (nothing in one process)."""
        return {"world_size": self.world} if self.world > 1 else {}

    def fingerprint(self) -> dict[str, Any]:
        """What a run's progress must agree on to be resumed (``run.json``, docs/RESUME.md): the fields
        known before the model is loaded (:func:`_start_progress` adds the model's identity and the
        windows' hash)."""
        from binq import __version__

        return {
            "schema": SCHEMA,
            "model": {"spec": self.spec},
            "method": {"name": self.method.name, "config": dataclasses.asdict(self.config)},
            "calibration": dataclasses.asdict(self.calibration),
            "engine": {
                "path": "engine" if self.uses_engine else "independent",
                "device": torch.device(self.engine.device).type,  # cuda:0 and cuda:1 compute alike
                "hessian_dtype": self.engine.hessian_dtype,
                "true_sequential": self.engine.true_sequential,
                "world_size": self.world,
            },
            "activations": dataclasses.asdict(self.activations),
            "tune": dataclasses.asdict(self.tune) if self.tuning else None,
            "versions": {"binq": __version__, "torch": torch.__version__},
        }

    def equivalent_command(self) -> list[str]:
        """The ``binq quantize`` command line of a run made through the API (for its report)."""
        command = ["binq", "quantize", "--model", self.spec, "--method", self.method.name]
        if isinstance(self.config, AllocationConfig):  # --target-bits and its options instead of --method
            command[-2:] = self.config.command_options()
        defaults = self.config if isinstance(self.config, AllocationConfig) else self.method.config_class()
        for item in dataclasses.fields(self.config):
            value = getattr(self.config, item.name)
            if value != getattr(defaults, item.name):
                option = "--" + item.name.replace("_", "-")
                if isinstance(value, bool):
                    command.append(option if value else "--no-" + option[2:])
                else:
                    command += [option, str(value)]
        calibration, evaluation, engine, activations = self.calibration, self.evaluation, self.engine, self.activations
        command += ["--calib", calibration.source, "--nsamples", str(calibration.nsamples)]
        command += ["--seqlen", str(evaluation.seqlen if evaluation.sets else calibration.seqlen)]
        command += ["--seed", str(calibration.seed), "--eval", ",".join(evaluation.sets) or "none"]
        if evaluation.windows is not None:
            command += ["--eval-windows", str(evaluation.windows)]
        command += ["--device", engine.device, "--label", self.label]
        if not self.stream:
            command.append("--in-memory")
        if engine.hessian_dtype != "float32":
            command += ["--hessian-dtype", engine.hessian_dtype]
        if engine.true_sequential:
            command.append("--true-sequential")
        if self.tuning:
            command += tune_options(self.tune)
        if activations.enabled:
            command += ["--act-bits", str(activations.bits), "--act-clip", activations.clip]
            command += ["--smooth", activations.smooth, "--smooth-proxy", activations.smooth_proxy]
            command += ["--act-calib-tokens", str(activations.calib_tokens)]
            if activations.sym:
                command.append("--act-sym")
        return command


def quantize(
    model: str | LoadedModel,
    method: str | Method,
    config: Any = None,
    *,
    calibration: CalibrationConfig | None = None,
    evaluation: EvaluationConfig | None = None,
    engine: EngineConfig | None = None,
    activations: ActivationConfig | None = None,
    workers: int | None = None,
    out: str | Path | None = None,
    label: str | None = None,
    progress: bool = True,
    on_layer: Callable[[LayerRecord], None] | None = None,
    command: list[str] | None = None,
    stream: bool = False,
    tune: TuneConfig | None = None,
    on_tune: Callable[[BlockTuneRecord], None] | None = None,
) -> QuantizationResult:
    """Quantize ``model`` with ``method`` and evaluate it; with ``out``, write ``report.json`` and the checkpoint.

    ``config`` is the method's config (an instance of its config class, a dict of its options, or
    ``None`` for its defaults). ``calibration`` and ``evaluation`` default to GPTQ's full protocol
    (:data:`QUICK_CALIBRATION` / :data:`QUICK_EVALUATION` are the quick one); ``EvaluationConfig(sets=())``
    skips evaluation. ``workers``: processes of a calibration-free method (default all cores).
    ``on_layer`` sees each linear's record as it is made; ``command`` is what the report records as
    the command (the CLI passes its own; by default the equivalent ``binq quantize`` line).

    With ``out``, finished blocks are recorded in ``out/progress`` as they are made; when that folder
    holds a killed run with the same fingerprint (model, method and config, calibration, engine and
    activation settings), this call continues from its finished blocks to a bit-identical checkpoint,
    and otherwise refuses naming the field that differs (docs/RESUME.md).

    With ``torch.distributed`` initialised (N processes, e.g. under torchrun), each rank calibrates on
    ``windows[rank::N]`` and quantizes its share of the linears; rank 0 gathers the weights and records,
    evaluates and saves; the other ranks return their part (``result.rank`` > 0) without a report.
    ``on_layer`` then sees every record on rank 0 after the gather.

    ``stream``: never hold the whole model (docs/MEMORY.md). The source's blocks are read one at a time,
    each is quantized, evaluated layer-wise and written to its checkpoint shard while in memory, and
    only then dropped: peak memory does not grow with depth. The weights, records, evaluation and
    report are the in-memory run's; the checkpoint is sharded (``model.safetensors.index.json``); the
    result's ``weights`` are :class:`~binq.quant.structured.WeightSummary` objects and its model keeps no
    block. Needs a local safetensors folder (or the embedded model), one process, and no ``--act-bits``;
    otherwise the run says why and loads the model whole.

    ``tune`` (:class:`~binq.engine.tune.TuneConfig` with ``steps`` > 0): after the method quantizes each
    block, tune its continuous parameters against the block's output (docs/TUNE.md); one process only.
    ``on_tune`` sees each block's :class:`~binq.engine.tune.BlockTuneRecord`; the report's ``tuning``
    section holds them all.

    >>> result = binq.quantize("smollm2-135m", "gptq", {"bits": 4}, calibration=QUICK_CALIBRATION,
    ...                        evaluation=QUICK_EVALUATION, out="runs/gptq4")   # doctest: +SKIP
    >>> result.report["ppl"]                                                     # doctest: +SKIP
    """
    started = time.perf_counter()
    method, config = _method_and_config(method, config)
    activations = activations or ActivationConfig()
    if workers is not None and workers < 1:
        raise BinqError(f"--workers must be at least 1, got {workers}")
    rank, world = distributed.rank_and_world()
    if world > 1 and method is MIXED:
        raise BinqError("--target-bits runs in one process (every layer is measured before any is chosen)")
    if world > 1 and workers not in (None, 1):
        raise BinqError("--workers does not combine with several processes: the processes share the linears")
    calibration = calibration or FULL_CALIBRATION
    if world > 1 and not method.calibration_free and calibration.nsamples < world:
        raise BinqError(f"--nsamples {calibration.nsamples} is fewer than the {world} processes that share them")
    if tuning_enabled(tune):
        tune.check_run(calibration.nsamples, world, calibration.seqlen)
    engine = engine or EngineConfig()
    if world > 1:  # each rank computes on its own GPU, cuda:LOCAL_RANK
        engine = dataclasses.replace(engine, device=distributed.rank_device(engine.device))
    run = _Run(
        model, method, config, calibration, evaluation or FULL_EVALUATION, engine, activations, workers, out,
        label or default_label(method, config, activations, tune), progress and rank == 0, on_layer, command, started,
        rank, world, _can_stream(stream, activations, world), tune=tune, on_tune=on_tune,
    )  # fmt: skip
    resume = None
    if out is not None:
        resume = _on_rank0(lambda: _open_progress(out, run.fingerprint(), world, method.calibration_free))
    try:
        return _quantize(run, resume)
    finally:
        if resume is not None:
            resume.close()


def _quantize(run: _Run, resume: Progress | None) -> QuantizationResult:
    """:func:`quantize` once its arguments are checked and its progress folder (``resume``) is open.

    A streamed run has glibc map its large allocations from the start (:mod:`binq.memory`): the source's
    finite checks, the tokenizer and the measurements of ``--target-bits`` allocate and free megabytes
    before the first block, and from the heap those would stay resident all run."""
    if not run.stream:
        return _quantize_loaded(run, resume)
    with large_allocations_mapped(STREAM_LOAD_THRESHOLD):
        return _quantize_loaded(run, resume)


def _quantize_loaded(run: _Run, resume: Progress | None) -> QuantizationResult:
    method, calibration, evaluation = run.method, run.calibration, run.evaluation
    loaded = _load(run.model, run.engine.device, run.stream)
    if loaded.streamed:  # the model's own size is known now
        map_large_allocations(_stream_threshold(run, loaded))
    arch = get_architecture(loaded.model)
    check_seqlen(loaded.model, max(calibration.seqlen, evaluation.seqlen if evaluation.sets else 0))
    windows = None
    if run.uses_engine or run.activations.needs_calibration:
        windows = calibration_windows(
            loaded.tokenizer, calibration.source, calibration.nsamples, calibration.seqlen, calibration.seed
        )
    eval_tokens = _evaluation_tokens(loaded, evaluation)
    if resume is not None or (run.out is not None and run.world > 1 and not method.calibration_free):
        # Every rank joins rank 0's check; the whole fingerprint, before smoothing changes the model.
        _on_rank0(lambda: _start_progress(run, resume, loaded, arch, windows))
    # Smoothing is folded into the fp model first: the weights are quantized, and kept for KL, smoothed.
    plan = calibrate_activations(loaded.model, arch, windows, run.activations, calibration.seed, run.progress)
    originals = {item.linear: item.linear.weight.data for item in named_linears(loaded.model, arch)}
    if isinstance(run.config, AllocationConfig):  # pass 1 of --target-bits: measure every candidate, choose
        assert windows is not None
        run.allocator = plan_allocation(loaded.model, arch, windows, run.config, run.engine, run.progress)
        run.on_layer = run.allocator.observe(arch, run.on_layer)

    if loaded.streamed:
        return _quantize_streamed(run, resume, loaded, arch, windows, eval_tokens, plan)
    engine_result, whole = _quantize_linears(run, loaded, arch, windows, resume)
    if not whole:  # another rank than 0 of a multi-process run: its part went to rank 0
        return QuantizationResult(
            loaded, method, run.config, engine_result.weights, engine_result.records, {}, plan, {}, run.rank
        )

    eval_started = time.perf_counter()
    with quantized_activations(loaded.model, arch, plan) as hooks:
        swap = ActivationSwap(WeightSwap(originals), hooks)
        evaluations = _run_evaluations(loaded, eval_tokens, evaluation, run.engine.device, swap, run.progress)
    eval_s = time.perf_counter() - eval_started
    return _finish(run, resume, loaded, arch, _Outcome(windows, engine_result, evaluations, eval_s, plan))


@dataclass
class _Outcome:
    """What the quantization and evaluation steps of one run made, for its report."""

    windows: torch.Tensor | None
    engine_result: EngineResult
    evaluations: dict[str, dict[str, Any]]
    eval_s: float
    plan: ActivationPlan


def _finish(
    run: _Run,
    resume: Progress | None,
    loaded: LoadedModel,
    arch: Any,
    outcome: _Outcome,
    checkpoint: ShardedCheckpoint | None = None,
) -> QuantizationResult:
    """The report, the result, and with ``out`` the files written and the progress folder removed."""
    report = _report(run, loaded, arch, outcome)
    engine_result, evaluations, plan = outcome.engine_result, outcome.evaluations, outcome.plan
    if resume is not None and resume.resumed_from is not None:
        report["resumed_from_block"] = resume.resumed_from
    result = QuantizationResult(
        loaded, run.method, run.config, engine_result.weights, engine_result.records, evaluations, plan, report,
        checkpoint=checkpoint,
    )  # fmt: skip
    if run.out is not None:
        log.info("wrote %s", result.save(run.out))
        if resume is not None:
            resume.remove()  # the checkpoint is whole: nothing left to resume
    return result


def _can_stream(stream: bool, activations: ActivationConfig, world: int) -> bool:
    """Whether a run asked to stream can: not with activation quantization (its calibration changes
    the whole model first) nor across processes; the run then says why and loads the model whole."""
    if stream and activations.enabled:
        log.info("--act-bits needs the whole model in memory: it is loaded whole")
    elif stream and world > 1:
        log.info("a multi-process run holds the whole model in each process: it is loaded whole")
    return stream and not activations.enabled and world == 1


def _quantize_streamed(
    run: _Run,
    resume: Progress | None,
    loaded: LoadedModel,
    arch: Any,
    windows: torch.Tensor | None,
    eval_tokens: dict[str, torch.Tensor],
    plan: ActivationPlan,
) -> QuantizationResult:
    """:func:`_quantize` for a streamed model: every block quantized, evaluated layer-wise and written to
    its shard while it is in memory (:mod:`binq.engine.streamed`)."""
    evaluation = None
    if eval_tokens:
        protocols = {name: _protocol(loaded, name, run.evaluation) for name in eval_tokens}
        folder = run.out if run.out is not None and Path(run.out).is_dir() else None  # else the system's
        evaluation = LayerwiseEvaluation(
            loaded.model, arch, eval_tokens, protocols, run.evaluation.seqlen, run.evaluation.windows,
            run.engine.device, folder=folder,
        )  # fmt: skip
    checkpoint = None
    if run.out is not None:
        blocks = len(get_blocks(loaded.model, arch))
        checkpoint = ShardedCheckpoint(run.out, loaded.model, arch.blocks, blocks, source_dtype(loaded))
    observer = StreamedRun(evaluation, checkpoint)
    if not run.uses_engine:
        engine_result = quantize_free_streamed(
            loaded.model, arch, run.method, run.config, observer, run.on_layer, run.progress, resume
        )
    else:
        engine_result = quantize_model(
            loaded.model, arch, windows, run.method, run.config, run.engine, run.on_layer, run.progress,
            resume=resume, observer=observer, plan=run.allocator, tune=run.tune, on_tune=run.on_tune,
            seed=run.calibration.seed,
        )  # fmt: skip
    eval_started = time.perf_counter()
    evaluations = evaluation.finish(run.progress) if evaluation is not None else {}
    eval_s = time.perf_counter() - eval_started
    outcome = _Outcome(windows, engine_result, evaluations, eval_s, plan)
    return _finish(run, resume, loaded, arch, outcome, checkpoint)


def _stream_threshold(run: _Run, loaded: LoadedModel) -> int:
    """The allocation size glibc maps on its own during a streamed run: one window's hidden states."""
    hidden = int(getattr(loaded.model.config, "hidden_size", 0) or 0)
    seqlen = min(run.calibration.seqlen, run.evaluation.seqlen) if run.evaluation.sets else run.calibration.seqlen
    return mapping_threshold(hidden * seqlen * 4)


def _protocol(loaded: LoadedModel, name: str, evaluation: EvaluationConfig) -> Protocol:
    tokenizer = f"{type(loaded.tokenizer).__name__}({loaded.name})"
    return Protocol(name, describe_eval(name), tokenizer, evaluation.seqlen, 0, 0, 0)


def _start_progress(
    run: _Run, resume: Progress | None, loaded: LoadedModel, arch: Any, windows: torch.Tensor | None
) -> None:
    """Record (or check, when resuming) the whole fingerprint: the model's identity and the windows' hash too."""
    assert resume is not None
    fingerprint = run.fingerprint()
    store = block_store(loaded.model)
    held = store.block if store is not None else None  # a streamed model's blocks, read one at a time
    fingerprint["model"] |= model_identity(loaded.model, get_blocks(loaded.model, arch), loaded.path, held)
    fingerprint["calibration"]["windows_sha256"] = windows_digest(windows)
    fingerprint["info"] = {"model_path": loaded.path, "started": now_utc()}
    resume.start(fingerprint)


def _quantize_linears(
    run: _Run, loaded: LoadedModel, arch: Any, windows: torch.Tensor | None, resume: Progress | None
) -> tuple[EngineResult, bool]:
    """Every declared linear quantized in place: by the engine, by the calibration-free path, or, in a
    multi-process run, this rank's share gathered to rank 0. Also says whether the result is whole
    (not on the other ranks of a multi-process run, which return their own share)."""
    method, config, engine = run.method, run.config, run.engine
    if run.world > 1:
        share = _quantize_share(loaded, arch, windows, method, config, engine, run.progress, resume)
        gathered = distributed.gather_result(share, loaded.model, arch, fill_weights=method.calibration_free)
        if gathered is None:
            return share, False
        if run.on_layer is not None:
            for record in gathered.records:
                run.on_layer(record)
        return gathered, True
    if not run.uses_engine:
        result = quantize_independent(
            loaded.model, arch, method, config, run.workers, run.on_layer, run.progress, resume=resume
        )
    else:
        result = quantize_model(
            loaded.model, arch, windows, method, config, engine, run.on_layer, run.progress, resume=resume,
            plan=run.allocator, tune=run.tune, on_tune=run.on_tune, seed=run.calibration.seed,
        )  # fmt: skip
    return result, True


def _report(run: _Run, loaded: LoadedModel, arch: Any, outcome: _Outcome) -> dict[str, Any]:
    """The run's ``report.json`` (docs/REPORT.md)."""
    windows, engine_result, evaluations = outcome.windows, outcome.engine_result, outcome.evaluations
    eval_s, plan = outcome.eval_s, outcome.plan
    inventory = parameter_inventory(loaded.model, arch)
    stored_bits = torch.finfo(source_dtype(loaded)).bits
    memory, memory_kind = peak_memory()
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "label": run.label,
        "created": now_utc(),
        "command": run.command or run.equivalent_command(),
        "model": _model_section(loaded, run.model, arch.name, run.engine.device),
        "method": {"name": run.method.name, "config": dataclasses.asdict(run.config)},
        "engine": dataclasses.asdict(run.engine) | run.world_size,
        "calibration": {
            **dataclasses.asdict(run.calibration),
            "tokens": 0 if windows is None else int(windows.numel()),
        },
        "seed": run.calibration.seed,
        "bits": summarize_bits(inventory, engine_result.weights, stored_bits).to_dict(),
        "bits_original": unquantized_bits(inventory, stored_bits).to_dict(),
        "eval": evaluations,
        "time_s": {
            "quantize": engine_result.time_s,
            "eval": eval_s,
            "total": time.perf_counter() - run.started,
        },
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "versions": library_versions(),
        "machine": machine(),
        "layers": [dataclasses.asdict(r) for r in engine_result.records],
    }
    report["compute_bits"] = report["bits"]["linear"]["compute_bits"]
    report["storage_bits"] = {k: report["bits"][k]["storage_bits"] for k in ("linear", "model")}
    _evaluation_shortcuts(report, evaluations)
    if run.activations.enabled:
        report["activations"] = plan.summary(loaded.model.config.hidden_size)
    if not run.uses_engine:
        workers = 1 if run.world > 1 or loaded.streamed else run.workers or default_workers()
        report["engine"] = {"path": "independent", "workers": workers} | run.world_size
    if loaded.streamed:
        report["engine"]["streamed"] = True
    if run.allocator is not None:
        report["allocation"] = run.allocator.report()
        report["time_s"]["measure"] = run.allocator.measure_s  # pass 1; "quantize" is the engine's pass 2
    extra_bits = extra_bit_summary(engine_result.weights)
    if extra_bits:
        report["extra_bits"] = extra_bits
    if run.tuning:
        report["tuning"] = {
            "config": dataclasses.asdict(run.tune),
            "blocks": [dataclasses.asdict(r) for r in engine_result.tuning],
        }
    return report


def _open_progress(out: str | Path, fingerprint: dict[str, Any], world: int, calibration_free: bool) -> Progress | None:
    """``out/progress``, locked and checked against ``fingerprint``; ``None`` in a multi-process run of a
    calibration-free method, which records no progress (and refuses to start over one that did)."""
    if world > 1 and calibration_free:
        if (progress_folder(out) / RUN_FILE).is_file():
            raise BinqError(
                f"cannot resume {out} in a multi-process run of a calibration-free method (docs/RESUME.md): "
                f"run it in one process, or delete {progress_folder(out)}"
            )
        return None
    return Progress.open(out, fingerprint)


def _on_rank0(action: Callable[[], Any]) -> Any:
    """``action()`` on rank 0 alone (its result there, ``None`` elsewhere); a :class:`BinqError` it raises
    is raised on every rank, so that all of them stop with the same one-line error."""
    rank, world = distributed.rank_and_world()
    value, message = None, None
    if rank == 0:
        try:
            value = action()
        except BinqError as err:
            message = str(err)
    if world > 1:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise BinqError(message)
    return value


def _quantize_share(
    loaded: LoadedModel,
    arch: Any,
    windows: torch.Tensor | None,
    method: Method,
    config: Any,
    engine: EngineConfig,
    progress: bool,
    resume: Progress | None = None,
) -> EngineResult:
    """This rank's part of a multi-process run: its share of the linears (calibrated, for the engine, on
    its share of the windows, every Hessian summed over the ranks; ``resume`` on rank 0 records and
    resumes the engine's blocks)."""
    if method.calibration_free:
        return distributed.quantize_independent_share(loaded.model, arch, method, config, progress)
    assert windows is not None
    return quantize_model(
        loaded.model, arch, distributed.share_windows(windows), method, config, engine, None, progress, resume
    )


def evaluate(
    model: str | LoadedModel,
    evaluation: EvaluationConfig | None = None,
    *,
    device: str = "cpu",
    activations: ActivationConfig | None = None,
    calibration: CalibrationConfig | None = None,
    zeroshot: ZeroShotConfig | None = None,
    out: str | Path | None = None,
    label: str | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> EvaluationResult:
    """Perplexity of ``model`` (any model binq loads, or a binq checkpoint folder) on each evaluation set,
    and its accuracy on each zero-shot task of ``zeroshot`` (:mod:`binq.evaluation.zeroshot`).

    With ``activations`` enabled (a full-precision model only), its inputs are quantized as
    :func:`quantize` would, calibrated on ``calibration``, and KL is to the same model with
    full-precision activations; otherwise there is no reference and KL is ``None``. With ``out``,
    writes ``report.json`` (the same schema as :func:`quantize`'s, without bits and layers).
    """
    started = time.perf_counter()
    zeroshot = zeroshot or ZeroShotConfig()
    # Without an evaluation config, perplexity by GPTQ's protocol; none when tasks are asked for instead.
    evaluation = evaluation or (EvaluationConfig(sets=()) if zeroshot.tasks else FULL_EVALUATION)
    calibration = calibration or FULL_CALIBRATION
    activations = activations or ActivationConfig()
    if not evaluation.sets and not zeroshot.tasks:
        raise BinqError("binq eval needs at least one --eval set or --tasks")
    # The items first: they need no model, and a task that cannot be built fails before the loading.
    task_items = {name: build_task(name, zeroshot.limit) for name in zeroshot.tasks}
    loaded, checkpoint = open_model(model, device)
    if evaluation.sets:
        check_seqlen(loaded.model, evaluation.seqlen)
    tokens = _evaluation_tokens(loaded, evaluation)
    plan = None
    if not activations.enabled:
        evaluations = _run_evaluations(loaded, tokens, evaluation, device, None, progress)
        tasks = _run_tasks(loaded, task_items, zeroshot, device, progress)
    else:
        if checkpoint:
            raise BinqError("activation quantization of a binq checkpoint is not supported: quantize with --act-bits")
        arch = get_architecture(loaded.model)
        windows = None
        if activations.needs_calibration:
            windows = calibration_windows(
                loaded.tokenizer, calibration.source, calibration.nsamples, calibration.seqlen, calibration.seed
            )
        plan = calibrate_activations(loaded.model, arch, windows, activations, calibration.seed, progress)
        # The "original" of the swap is the same model with full-precision activations: KL to it.
        with quantized_activations(loaded.model, arch, plan) as hooks:
            swap = ActivationSwap(None, hooks)
            evaluations = _run_evaluations(loaded, tokens, evaluation, device, swap, progress)
            tasks = _run_tasks(loaded, task_items, zeroshot, device, progress)
    memory, memory_kind = peak_memory()
    spec = str(model) if isinstance(model, str | Path) else loaded.path
    arch_name = get_architecture(loaded.model).name
    if command is None:
        command = _eval_command(spec, evaluation, zeroshot, device)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "kind": "eval",
        "label": label or loaded.name + (f" A{activations.bits}" if activations.enabled else ""),
        "created": now_utc(),
        "command": command,
        "model": {**_model_section(loaded, spec, arch_name, device), "checkpoint": checkpoint},
        "eval": evaluations,
        "time_s": {"eval": time.perf_counter() - started, "total": time.perf_counter() - started},
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "versions": library_versions(),
        "machine": machine(),
    }
    if tasks:
        report["tasks"] = {name: result.to_dict() for name, result in tasks.items()}
    if plan is not None:
        report["calibration"] = dataclasses.asdict(calibration)
        report["seed"] = calibration.seed
        report["activations"] = plan.summary(loaded.model.config.hidden_size)
    _evaluation_shortcuts(report, evaluations)
    result = EvaluationResult(loaded, evaluations, report, tasks)
    if out is not None:
        log.info("wrote %s", result.save(out))
    return result


def open_model(model: str | Path | LoadedModel, device: str) -> tuple[LoadedModel, bool]:
    """``model`` loaded for evaluation at the device's compute dtype, and whether it is a binq checkpoint
    (a folder ``binq quantize --out`` wrote; anything else goes through :func:`binq.models.load_model`)."""
    from binq.checkpoint import is_checkpoint

    if isinstance(model, str | Path) and is_checkpoint(model):
        return load_checkpoint(Path(model), compute_dtype(device)), True
    return _load(model if not isinstance(model, Path) else str(model), device), False


def _run_tasks(
    loaded: LoadedModel, items: dict[str, TaskItems], zeroshot: ZeroShotConfig, device: str, progress: bool
) -> dict[str, TaskResult]:
    if not items:
        return {}
    loaded.model.to(device)
    results = {
        name: score_task(
            loaded.model, loaded.tokenizer, task, batch_size=zeroshot.batch_size, device=device, progress=progress
        )
        for name, task in items.items()
    }
    loaded.model.to("cpu")
    return results


def _eval_command(spec: str, evaluation: EvaluationConfig, zeroshot: ZeroShotConfig, device: str) -> list[str]:
    """The ``binq eval`` line equivalent to an API call (what its report records)."""
    command = ["binq", "eval", "--model", spec, "--eval", ",".join(evaluation.sets) or "none", "--seqlen"]
    command += [str(evaluation.seqlen), "--device", device]
    if evaluation.windows is not None:
        command += ["--eval-windows", str(evaluation.windows)]
    if zeroshot.tasks:
        command += ["--tasks", ",".join(zeroshot.tasks), "--batch-size", str(zeroshot.batch_size)]
        if zeroshot.limit is not None:
            command += ["--limit", str(zeroshot.limit)]
    return command


def load_checkpoint(folder: Path, dtype: torch.dtype, fp16_embeddings: bool = False) -> LoadedModel:
    """A binq checkpoint as a :class:`LoadedModel` (its linears are BinaryLinear, so ``load_model``'s
    checks do not apply).

    Evaluation keeps dense weights for layouts no kernel runs (``cache_weight``); generation
    (``fp16_embeddings``) runs the kernels and keeps the embeddings in fp16 instead.
    """
    from transformers import AutoTokenizer

    from binq.checkpoint import load

    model = load(folder, dtype=dtype, cache_weight=not fp16_embeddings, fp16_embeddings=fp16_embeddings)
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return LoadedModel(model=model, tokenizer=tokenizer, name=folder.resolve().name, path=str(folder.resolve()))
