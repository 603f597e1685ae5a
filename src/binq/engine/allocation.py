"""``--target-bits B``: each linear's own method and width, chosen to fit a storage-bit budget.

A run in two passes over the blocks:

1. **Measure** (:func:`measure_candidates`): one walk of the *original* model. In each block, every
   linear is quantized with every candidate (a method and its settings) on its own calibration Hessian,
   and three things are recorded: the candidate's stored bits (``storage_bits_total``, counted from its
   packed tensors), its output error ``e = ||(W - Q) X||^2 / tokens`` (exact, from the Hessian), and once
   per linear a *gain* ``g``: how much the block's output moves per unit of that linear's output error,
   ``mean_t ||y'_t - y_t||^2 / ||y_t||^2 / e`` over the tokens ``t``, with ``y_t`` the block's outputs and
   ``y'_t`` the same with only this linear replaced by a mid-size candidate (the median of its candidates
   by bits: an error neither lost in noise nor saturating), on the first :data:`GAIN_SAMPLES`
   calibration windows. Nothing is left changed.
2. **Choose** (:class:`Allocator`): the multiple-choice knapsack of :mod:`binq.quant.knapsack`, exact
   over a discretised budget, picks one candidate per linear minimising the summed weighted error with
   summed stored bits ``<= B x`` (the linears' weights). The weighted error is ``g e`` with
   ``sensitivity="block"`` (the default: the relative change of the block's output each choice causes,
   a number comparable across layers whose inputs differ in scale by orders of magnitude) or ``e``
   itself with ``sensitivity="output"``.
3. **Quantize**: the ordinary block-sequential engine (:func:`binq.engine.calibrate.quantize_model`)
   with each linear's chosen method, so GPTQ-style compensation sees the quantized earlier blocks.
   The chosen candidate's stored bits can differ from pass 1's for layouts whose size depends on the data
   (salient columns): when a linear's real bits differ from the plan, the linears not yet quantized are
   re-planned on the budget that is really left, so the whole model keeps to the budget.

The run's checkpoint needs nothing new: every weight carries its own ``layout`` (docs/FORMAT.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from binq.engine.calibrate import HESSIAN_DTYPES, EngineConfig, LayerRecord
from binq.engine.walker import BlockStep, walk_blocks
from binq.errors import BinqError
from binq.methods.registry import Method, check_choice, get_method
from binq.models.architectures import Architecture, module_name
from binq.quant.hessian import relative_output_error
from binq.quant.knapsack import allocate

log = logging.getLogger(__name__)

# The candidates of the issue: 1 bit (Q1_0's form), W(1+1), ARB-RC, and GPTQ's grids of 2, 3 and 4 bits (its
# default group of 128 columns).
DEFAULT_CANDIDATES = "arb-group;w11;arb-rc;gptq:bits=2;gptq:bits=3;gptq:bits=4"
SENSITIVITIES = ("block", "output")
GAIN_SAMPLES = 4  # calibration windows each gain is measured on: 7 extra block runs of these per block


@dataclass(frozen=True)
class Candidate:
    """One choice for a linear: a method, its config, and the spec that names it (``gptq:bits=2``)."""

    spec: str
    method: Method
    config: Any


def _option_value(part: str, field: dataclasses.Field, text: str) -> Any:
    kind = type(field.default)
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise BinqError(f"--candidates: '{part}': {field.name} takes true or false, got '{text}'")
    try:
        return kind(text)
    except ValueError:
        raise BinqError(f"--candidates: '{part}': {field.name} takes a {kind.__name__}, got '{text}'") from None


def parse_candidates(spec: str) -> list[Candidate]:
    """``name[:option=value,...]`` separated by ``;``, e.g. ``gptq:bits=2,group_size=128;w11;arb-group``.

    Options are the method's config fields (``binq methods``, underscores or dashes); each error is one
    line naming the part it is about."""
    candidates: list[Candidate] = []
    seen: dict[tuple[str, str], str] = {}
    parts = [part.strip() for part in spec.split(";")]
    if not any(parts):
        raise BinqError("--candidates names no method")
    for part in parts:
        if not part:
            raise BinqError(f"--candidates: an empty part in '{spec}' (parts are separated by ';')")
        name, _, options_text = part.partition(":")
        try:
            method = get_method(name.strip())
        except BinqError as err:
            raise BinqError(f"--candidates: '{part}': {err}") from None
        fields = {f.name: f for f in dataclasses.fields(method.config_class)}
        options: dict[str, Any] = {}
        for item in options_text.split(",") if options_text.strip() else []:
            key, equals, value = (s.strip() for s in item.partition("="))
            key = key.replace("-", "_")
            if not equals or not key or not value:
                raise BinqError(f"--candidates: '{part}': '{item.strip()}' is not option=value")
            if key not in fields:
                raise BinqError(f"--candidates: '{part}': method '{method.name}' has no option {key}")
            if key in options:
                raise BinqError(f"--candidates: '{part}': {key} given twice")
            options[key] = _option_value(part, fields[key], value)
        try:
            config = method.make_config(**options)
        except BinqError as err:
            raise BinqError(f"--candidates: '{part}': {err}") from None
        canonical = ",".join(f"{k}={options[k]}" for k in sorted(options))
        label = method.name + (f":{canonical}" if canonical else "")
        key = (method.name, repr(dataclasses.asdict(config)))
        if key in seen:
            raise BinqError(f"--candidates: '{part}' is the same as '{seen[key]}'")
        seen[key] = part
        candidates.append(Candidate(label, method, config))
    return candidates


@dataclass
class AllocationConfig:
    """``--target-bits``: the budget in stored bits per linear weight, the candidates, the sensitivity.

    - ``target_bits``: the linears' stored bits (every packed tensor) over their weights, at most this.
    - ``candidates``: :func:`parse_candidates`'s syntax; the default is :data:`DEFAULT_CANDIDATES`.
    - ``sensitivity``: ``block`` (each linear's output error weighted by its measured effect on its
      block's output) or ``output`` (the output errors as they are).
    """

    target_bits: float
    candidates: str = DEFAULT_CANDIDATES
    sensitivity: str = "block"

    def __post_init__(self) -> None:
        if not (isinstance(self.target_bits, int | float) and math.isfinite(self.target_bits)) or not (
            0 < self.target_bits <= 32
        ):
            raise BinqError(f"--target-bits must be in (0, 32], got {self.target_bits}")
        check_choice("--sensitivity", self.sensitivity, SENSITIVITIES)
        parse_candidates(self.candidates)  # a bad spec fails here, before any model is loaded

    def command_options(self) -> list[str]:
        """The ``binq quantize`` options that give this config."""
        options = ["--target-bits", str(self.target_bits)]
        if self.candidates != DEFAULT_CANDIDATES:
            options += ["--candidates", self.candidates]
        if self.sensitivity != "block":
            options += ["--sensitivity", self.sensitivity]
        return options

    @property
    def label(self) -> str:
        return f"target {self.target_bits:g} bits"


def _per_linear_only(weight: torch.Tensor, hessian: torch.Tensor, config: Any) -> Any:
    raise BinqError("the mixed allocation has no quantizer of its own: each linear uses its chosen candidate")


# A method for the run's bookkeeping (report, fingerprint, checkpoint config), not in the registry: it has no
# quantize of its own, and the engine takes each linear's candidate from the Allocator.
MIXED = Method("mixed", AllocationConfig, _per_linear_only, "per-linear choice of method under a storage-bit budget")


@dataclass
class LinearMeasurement:
    """Pass 1 for one linear: per candidate, its stored bits and output errors; the linear's gain."""

    name: str
    numel: int
    bits: list[int]
    output_errors: list[float]  # ||(W - Q) X||^2 / tokens
    relative_errors: list[float]  # the same over ||W X||^2 / tokens
    gain: float  # relative change of the block's output per unit of output error
    gain_candidate: int


def _output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||W X||^2 / tokens`` from the Hessian ``2 X X^T / tokens``."""
    w = weight.to(torch.float64)
    return float(((w @ hessian.to(torch.float64)) * w).sum()) / 2


def _relative_change(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The mean over tokens of ``||y' - y||^2 / ||y||^2``: per token, because the next block sees each token's
    hidden state through a norm (an error counts relative to its own token's state), and because a few
    tokens with hidden states orders of magnitude larger than the rest (the first token, in most LLMs)
    would otherwise decide the whole figure."""
    ratios = [
        (a.double() - b.double()).pow(2).sum(-1).flatten() / b.double().pow(2).sum(-1).flatten().clamp_min(1e-30)
        for a, b in zip(outputs, reference, strict=True)
    ]
    return float(torch.cat(ratios).mean())


def _measure_linear(
    step: BlockStep, name: str, hessian: torch.Tensor, candidates: list[Candidate], gain_step: BlockStep
) -> LinearMeasurement:
    linear = step.linears[name]
    full_name = step.full_name(name)
    weight = linear.weight.detach().to(torch.float32)
    energy = _output_energy(weight, hessian)
    bits, relative, dequantized = [], [], []
    for candidate in candidates:
        try:
            quantized = candidate.method.quantize(weight, hessian.to(weight.device), candidate.config)
        except BinqError as err:
            raise BinqError(f"{full_name}, candidate {candidate.spec}: {err}") from err
        bits.append(quantized.storage_bits_total)
        dequantized.append(quantized.dequantize().to(weight.device))
        relative.append(relative_output_error(weight, dequantized[-1], hessian))
    errors = [r * energy for r in relative]
    by_bits = sorted(range(len(candidates)), key=lambda i: (bits[i], i))
    middle = by_bits[len(by_bits) // 2]
    reference = gain_step.outputs
    assert reference is not None
    original = linear.weight.data
    linear.weight.data = dequantized[middle].to(original.dtype)
    try:
        change = _relative_change(gain_step.run(), reference)
    finally:
        linear.weight.data = original
    gain = change / errors[middle] if errors[middle] > 0 else 0.0
    return LinearMeasurement(full_name, weight.numel(), bits, errors, relative, gain, middle)


def measure_candidates(
    model: nn.Module,
    arch: Architecture,
    calibration: torch.Tensor,
    candidates: list[Candidate],
    engine: EngineConfig | None = None,
    progress: bool = False,
) -> list[LinearMeasurement]:
    """Pass 1: every candidate on every declared linear of the original model, in model order (the model
    is left as it was)."""
    engine = engine or EngineConfig()
    dtype = HESSIAN_DTYPES[engine.hessian_dtype]
    measurements: list[LinearMeasurement] = []
    walk = walk_blocks(
        model, arch, calibration, engine.device, engine.activations_on_device, progress=progress, desc="measure"
    )
    for step in walk:
        accumulators = step.hessians(list(arch.linear_groups), dtype)
        gain_step = dataclasses.replace(step, inputs=step.inputs[:GAIN_SAMPLES])
        gain_step.outputs = gain_step.run()
        for group in arch.linear_groups:
            hessian = accumulators.pop(group).take_hessian()
            for name in group:
                measurements.append(_measure_linear(step, name, hessian, candidates, gain_step))
            del hessian
    return measurements


class Allocator:
    """Pass 2's plan: which candidate each linear gets, kept within the budget as the real bits come in.

    The engine calls it with a linear's full name for ``(method, config)`` (:func:`quantize_model`'s
    ``plan``); :meth:`observe` wraps the engine's ``on_layer`` so that every record (a resumed run's
    loaded blocks too) reports its real stored bits.
    """

    def __init__(self, measurements: list[LinearMeasurement], candidates: list[Candidate], config: AllocationConfig):
        self.measurements = {m.name: m for m in measurements}
        self.candidates = candidates
        self.config = config
        self.weights = sum(m.numel for m in measurements)
        self.budget_bits = math.floor(config.target_bits * self.weights)
        self.made_bits: dict[str, int] = {}
        self.replans = 0
        self.measure_s = 0.0  # pass 1's seconds, set by plan_allocation
        self.choice: dict[str, int] = {}
        cheapest = sum(min(m.bits) for m in measurements)
        if cheapest > self.budget_bits:
            raise BinqError(
                f"--target-bits {config.target_bits:g} is below what the candidates allow: "
                f"{cheapest / self.weights:.4f} bits per linear weight at the least"
            )
        self._plan(list(self.measurements))
        self.planned = dict(self.choice)

    def weighted_errors(self, measurement: LinearMeasurement) -> list[float]:
        if self.config.sensitivity == "block":
            return [measurement.gain * e for e in measurement.output_errors]
        return list(measurement.output_errors)

    def _plan(self, names: list[str]) -> None:
        """Choose for the linears ``names`` with the budget the others (made or planned) leave."""
        others = sum(self._bits_of(name) for name in self.measurements if name not in names)
        items = [self.measurements[name] for name in names]
        spare = self.budget_bits - others
        try:
            chosen = allocate([m.bits for m in items], [self.weighted_errors(m) for m in items], spare)
        except BinqError:
            log.warning("the linears made so far took more bits than planned: the rest get their cheapest candidates")
            chosen = [min(range(len(m.bits)), key=lambda i, m=m: m.bits[i]) for m in items]
        self.choice.update(zip(names, chosen, strict=True))

    def _bits_of(self, name: str) -> int:
        if name in self.made_bits:
            return self.made_bits[name]
        return self.measurements[name].bits[self.choice[name]]

    def __call__(self, full_name: str) -> tuple[Method, Any]:
        candidate = self.candidates[self.choice[full_name]]
        return candidate.method, candidate.config

    def record(self, full_name: str, storage_bits_total: int) -> None:
        planned = self._bits_of(full_name)
        self.made_bits[full_name] = storage_bits_total
        if storage_bits_total != planned:
            self.replans += 1
            self._plan([name for name in self.measurements if name not in self.made_bits])

    def observe(
        self, arch: Architecture, on_layer: Callable[[LayerRecord], None] | None
    ) -> Callable[[LayerRecord], None]:
        def observed(record: LayerRecord) -> None:
            self.record(module_name(arch, record.block, record.name), record.storage_bits_total)
            if on_layer is not None:
                on_layer(record)

        return observed

    def report(self) -> dict[str, Any]:
        """``report.json``'s ``allocation`` (docs/REPORT.md)."""
        linears, summary = [], {c.spec: {"linears": 0, "weights": 0, "storage_bits_total": 0} for c in self.candidates}
        for name, m in self.measurements.items():
            index = self.choice[name]
            bits = self._bits_of(name)
            linears.append({
                "name": name,
                "candidate": self.candidates[index].spec,
                "storage_bits": bits / m.numel,
                "planned_storage_bits": m.bits[self.planned[name]] / m.numel,
                "relative_error": m.relative_errors[index],
                "weighted_error": self.weighted_errors(m)[index],
                "gain": m.gain,
                "measured": {
                    "storage_bits_total": m.bits,
                    "output_error": m.output_errors,
                    "relative_error": m.relative_errors,
                },
            })  # fmt: skip
            row = summary[self.candidates[index].spec]
            row["linears"] += 1
            row["weights"] += m.numel
            row["storage_bits_total"] += bits
        total = sum(self._bits_of(name) for name in self.measurements)
        planned = sum(m.bits[self.planned[m.name]] for m in self.measurements.values())
        return {
            "target_bits": self.config.target_bits,
            "sensitivity": self.config.sensitivity,
            "candidates": [c.spec for c in self.candidates],
            "weights": self.weights,
            "budget_bits": self.budget_bits,
            "storage_bits": total / self.weights,
            "planned_storage_bits": planned / self.weights,
            "weighted_error": sum(row["weighted_error"] for row in linears),
            "replans": self.replans,
            "summary": summary,
            "linears": linears,
        }


def plan_allocation(
    model: nn.Module,
    arch: Architecture,
    calibration: torch.Tensor,
    config: AllocationConfig,
    engine: EngineConfig | None = None,
    progress: bool = False,
) -> Allocator:
    """Pass 1 and the first plan (:func:`measure_candidates`, then the knapsack)."""
    candidates = parse_candidates(config.candidates)
    started = time.perf_counter()
    measurements = measure_candidates(model, arch, calibration, candidates, engine, progress)
    allocator = Allocator(measurements, candidates, config)
    allocator.measure_s = time.perf_counter() - started
    log.info(
        "allocation for %.4g bits per linear weight: %s",
        config.target_bits,
        ", ".join(f"{spec} x{row['linears']}" for spec, row in allocator.report()["summary"].items() if row["linears"]),
    )
    return allocator
