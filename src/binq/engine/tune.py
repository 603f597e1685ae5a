"""Block-wise tuning (``binq quantize --tune``): a quantized block's continuous parameters fitted to its output.

A one-shot method fixes every sign and scale from the Hessian alone and never looks at what the block
really outputs. Tuning takes the block once the method has quantized all its linears and minimises its
output error over the layouts' continuous tensors
(:meth:`~binq.quant.structured.QuantizedWeight.tunable_tensors`: the fp16 scales, means, column scales,
codebook values) with Adam. Bit planes, bitmaps, codes and indices stay as the method made them, so a
tuned weight has the same layout, shapes and storage bits, and exports and runs as before (a tuned
``arb-group`` is still Q1_0).

- **Inputs**: the block's calibration inputs as the engine walks them: the quantized earlier blocks'
  outputs, as GPTQ's.
- **Target** (``target``): ``original``, the original model's own outputs of this block (the
  unquantized stream, carried beside the quantized one), so that tuning also pulls back the drift of
  the earlier blocks; or ``quantized``, the original block run on the quantized inputs (GPTQ's target,
  for a whole block).
- **Error** (``loss``): ``stream``, ``sum ||Y - T||^2 / sum ||T||^2`` over windows, ``Y`` the quantized
  block's outputs; or ``token``, the mean over tokens of ``||y - t||^2 / ||t||^2``. A residual stream can
  hold most of its energy in a few tokens: from block 11's output on, SmolLM2-135M's first token has a
  norm near 23,000 against a median of about 130, 98 % of the stream's energy
  (``benchmarks/stream_energy.py``), so the ``stream`` error is nearly that one token's. ``token``
  weighs every token alike.
- **Split windows** (``split``): a window's first positions behave unlike the rest (SmolLM2-135M's
  first token carries the massive activation above), and a prefix keeps only one first position per
  window. With ``split`` the steps train on the training windows cut into windows of ``tokens``
  tokens instead, each run through the model from its embeddings as a window of its own: the same
  tokens, ``seqlen / tokens`` times as many first positions. Those windows get a quantized stream and
  an original one of their own, carried block to block beside the calibration windows' (two more
  block forwards per block, counted in the tuning time); the held-out windows stay whole and are never
  cut.
- **Held-out windows**: the last ``holdout`` calibration windows are never trained on. Every
  ``eval_every`` steps their error is measured with the tensors rounded to fp16, as they are stored;
  the best such state is kept, and ``patience`` checks in a row without a better one stop the block
  early. The tuned tensors replace the method's only when they lower the held-out error: tuning never
  makes a block's error worse on windows it did not train on.
- **Edge blocks** (``edge_steps``): the first and the last block can take more steps than the others.
  Their errors cost the most: on SmolLM2-135M, the original model with only block 0's tuned Q1_0
  linears loses about a nat per token on an unseen text, block 29's about 0.7, most others 0.05-0.2
  (``benchmarks/block_damage.py``); more steps lower block 0's cost and not block 1's (docs/TUNE.md).
- **The model's head** (``head_steps``): the last block's output goes through the final norm and the
  output head alone, so what its error costs is the next-token distributions' divergence, not the hidden
  states'. Once tuned as the others, it takes ``head_steps`` more steps on the mean next-token
  ``KL(original || quantized)`` of the model's head over the same windows (held-out checks on the same
  KL, from the weights the first steps kept). On SmolLM2-135M, 30 such steps on the last block alone of a
  tuned Q1_0 model take brit1911's perplexity from 681 to 376 (docs/TUNE.md). A step costs three
  output-head products over its tokens (target, output, gradient) on top of the block's own.
- **Parametrisation**: a scale ``s`` is tuned relative to itself, ``s0 * (1 + d)``; an offset in units
  of its weight's scales (their root mean square), ``m0 + d * rms(s0)``. One learning rate then suits
  every layer and model: ``lr`` is roughly the relative change per step.
- **Signs** (``signs``, off by default): the sign planes
  (:meth:`~binq.quant.structured.QuantizedWeight.sign_planes`) are tuned too, by a straight-through
  estimator. Each sign has a real latent, starting at +-1 (its stored sign); the forward uses the
  latent's sign, the backward passes the gradient to the latent unchanged. Adam moves the latents at
  their own rate ``sign_lr`` (and no ``eps``: their gradients are often smaller than Adam's default),
  so a latent moves at most about ``sign_lr`` per step, and a sign flips only after about
  ``1 / sign_lr`` steps whose gradients mostly agree. The held-out checks see the hard signs, as they
  would be stored, so the kept state is the best one with its flips; a flipped plane has the method's
  shape, so the layout and storage bits stay.
- **Cost**: one forward of the original block for the targets (shared with nothing), and per step a
  forward and backward of ``batch`` windows; the dequantization runs once per step, its gradient
  reached through the dequantized weights (two-stage backward), so no window's graph waits for another.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from binq.engine.capture import block_output
from binq.errors import BinqError
from binq.quant.structured import QuantizedWeight, sign_values

TARGETS = ("original", "quantized")
LOSSES = ("stream", "token")
ONE_PROCESS = "--tune runs in one process: leave out --nproc (or torchrun)"
_LATENT_EPS = 1e-30


@dataclass(frozen=True)
class TuneConfig:
    """Block-wise tuning settings (the ``--tune-*`` options).

    - ``steps``: Adam steps per block at most (0: no tuning).
    - ``lr``: Adam's learning rate on the relative parameters (see the module docstring).
    - ``batch``: calibration windows per step.
    - ``tokens``: the steps train on the first this-many tokens of each window (0: whole windows). A
      causal block's first outputs depend on its first inputs only, so a prefix is exact, and a step on
      many short prefixes costs what one on a few whole windows does; the held-out checks always use
      whole windows.
    - ``holdout``: the last this-many calibration windows, never trained on, pick the kept state.
    - ``target``: ``original`` (the unquantized model's block outputs) or ``quantized`` (the original
      block on the quantized inputs).
    - ``eval_every``: steps between held-out checks; ``patience``: checks without improvement before a
      block stops early.
    - ``signs``: flip signs too, by a straight-through estimator (see the module docstring);
      ``sign_lr``: Adam's learning rate on the signs' latents (a latent starts at +-1).
    - ``loss``: ``stream``, the error of the whole residual stream (``sum ||Y - T||^2 / sum ||T||^2``), or
      ``token``, each token's relative error ``||y - t||^2 / ||t||^2`` averaged over tokens (see the
      module docstring); the held-out checks measure the same.
    - ``split``: the steps train on the training windows cut into windows of ``tokens`` tokens, each run
      through the model from its embeddings as a window of its own, instead of on their prefixes (see
      the module docstring).
    - ``edge_steps``: the first and the last block's steps instead of ``steps`` (0: ``steps``), their
      patience scaled alike (see the module docstring).
    - ``head_steps``: the last block, once tuned as the others, takes this many more steps on the model's
      next-token KL divergence through its head (0: none; see the module docstring).
    """

    steps: int = 20
    lr: float = 2e-2
    batch: int = 8
    tokens: int = 128
    holdout: int = 4
    target: str = "original"
    eval_every: int = 5
    patience: int = 2
    signs: bool = False
    sign_lr: float = 5e-2
    loss: str = "stream"
    split: bool = False
    edge_steps: int = 0
    head_steps: int = 0

    def __post_init__(self) -> None:
        for name, low in (
            ("steps", 0),
            ("edge_steps", 0),
            ("head_steps", 0),
            ("batch", 1),
            ("tokens", 0),
            ("holdout", 1),
            ("eval_every", 1),
            ("patience", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise BinqError(f"--tune-{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "sign_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise BinqError(f"--tune-{name.replace('_', '-')} must be a positive number, got {value!r}")
        if not isinstance(self.signs, bool):
            raise BinqError(f"--tune-signs must be true or false, got {self.signs!r}")
        if not self.signs and self.sign_lr != TuneConfig.sign_lr:
            raise BinqError("--tune-sign-lr applies to --tune-signs: add --tune-signs")
        if not isinstance(self.split, bool):
            raise BinqError(f"--tune-split must be true or false, got {self.split!r}")
        if self.split and self.tokens == 0:
            raise BinqError("--tune-split cuts windows into --tune-tokens tokens: give --tune-tokens above 0")
        if self.loss not in LOSSES:
            raise BinqError(f"--tune-loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.target not in TARGETS:
            raise BinqError(f"--tune-target must be one of {', '.join(TARGETS)}, got '{self.target}'")

    def check_run(self, nsamples: int, world: int, seqlen: int) -> None:
        """Refuse what tuning cannot do: several processes, no calibration window left to tune on, or
        windows too short to split."""
        if world > 1:
            raise BinqError(ONE_PROCESS)
        self.check_windows(nsamples)
        self.check_split(seqlen)

    def check_windows(self, nsamples: int) -> None:
        """Refuse a held-out slice that leaves no window to tune on."""
        if self.steps and self.holdout >= nsamples:
            raise BinqError(
                f"--tune-holdout {self.holdout} leaves none of the {nsamples} calibration windows to tune on "
                "(raise --nsamples or lower --tune-holdout)"
            )

    def check_split(self, seqlen: int) -> None:
        """Refuse ``split`` where a window is no longer than the pieces it would be cut into."""
        if self.steps and self.split and self.tokens >= seqlen:
            raise BinqError(
                f"--tune-split cuts {seqlen}-token windows into {self.tokens}-token ones: give --tune-tokens "
                f"below {seqlen}"
            )


def for_block(config: TuneConfig, index: int, count: int) -> TuneConfig:
    """The settings block ``index`` of ``count`` is tuned with: ``edge_steps`` (when given) instead of
    ``steps`` for the first and the last block, with ``patience`` scaled alike."""
    if not config.edge_steps or config.steps == 0 or index not in (0, count - 1):
        return config
    patience = max(1, math.ceil(config.patience * config.edge_steps / config.steps))
    return replace(config, steps=config.edge_steps, patience=patience)


def tuning_enabled(tune: TuneConfig | None) -> bool:
    """Whether ``tune`` asks for any tuning (``None`` or zero steps: none)."""
    return tune is not None and tune.steps > 0


@dataclass
class BlockTuneRecord:
    """What tuning did to one block: the held-out error before and after, and the steps it took."""

    block: int
    error_before: float
    error_after: float
    steps: int
    kept: bool  # the tuned tensors replaced the method's (they lowered the held-out error)
    time_s: float
    flipped: int = 0  # signs the kept weights flipped (--tune-signs)
    head_steps: int = 0  # the last block's steps on the next-token KL (--tune-head-steps), after ``steps``
    head_before: float | None = None  # its held-out next-token KL (nats per token) before those steps
    head_after: float | None = None  # and of the kept weights


@dataclass
class _Tunable:
    """One tuned tensor of one weight: where it started, its kind, its free parameter.

    ``sign``: a sign plane, ``delta`` its latent (starting at the stored signs, +-1): the value is the
    latent's sign forward, the latent itself backward (the straight-through estimator)."""

    start: torch.Tensor  # float32, the method's stored value (a sign plane: +-1)
    kind: str
    unit: float  # what one unit of ``delta`` is worth (offsets: the RMS of the weight's scales)
    delta: torch.Tensor  # float32, requires grad

    def value(self) -> torch.Tensor:
        if self.kind == "scale":
            return self.start * (1 + self.delta)
        if self.kind == "sign":
            hard = torch.where(self.delta >= 0, 1.0, -1.0)
            return hard + (self.delta - self.delta.detach())
        return self.start + self.delta * self.unit

    def stored(self) -> torch.Tensor:
        """The value as it is stored: fp16, or a sign plane's bits (True = +1, a zero latent too)."""
        if self.kind == "sign":
            return self.delta.detach() >= 0
        return self.value().detach().half()


def _tunables(weight: QuantizedWeight, signs: bool = False) -> dict[str, _Tunable]:
    kinds = weight.tunable_tensors()
    scales = [getattr(weight, name).float() for name, kind in kinds.items() if kind == "scale"]
    rms = float(torch.cat([s.flatten() for s in scales]).square().mean().sqrt()) if scales else 1.0
    out = {}
    for name, kind in kinds.items():
        start = getattr(weight, name).detach().float().cpu()
        out[name] = _Tunable(start, kind, rms or 1.0, torch.zeros_like(start, requires_grad=True))
    for name in weight.sign_planes() if signs else ():
        start = sign_values(getattr(weight, name).detach().cpu())
        out[name] = _Tunable(start, "sign", 1.0, start.clone().requires_grad_())
    return out


class _Block:
    """The block under tuning: run with given weights for its linears (the other parameters frozen).

    ``head`` (the last block's steps on ``TuneConfig.head_steps``): the model's final modules and output head,
    hidden states to logits; the error is then the next-token KL divergence (``kl``) whatever ``loss`` says."""

    def __init__(
        self,
        block: nn.Module,
        args: tuple,
        kwargs: dict,
        device: torch.device,
        loss: str = "stream",
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.block, self.args, self.kwargs, self.device, self.loss, self.head = block, args, kwargs, device, loss, head
        self.dtype = next(block.parameters()).dtype

    def run(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        overrides = {f"{name}.weight": w for name, w in weights.items()}
        return block_output(functional_call(self.block, overrides, (x.to(self.device), *self.args), self.kwargs))

    def error_sum(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A window's share of the error's numerator (see :func:`_error_sum`; ``kl``: its tokens' KL divergences,
        ``sum KL(p_target || p_output)`` of the head's next-token distributions)."""
        if self.head is None:
            return _error_sum(output.float(), target.float(), self.loss)
        with torch.no_grad():
            expected = self.head(target).float().log_softmax(-1)
        return (expected.exp() * (expected - self.head(output).float().log_softmax(-1))).sum()

    def error_weight(self, target: torch.Tensor) -> float:
        """A window's share of the error's denominator (``kl``: its token count, as ``token``'s)."""
        return _error_weight(target, "token" if self.head is not None else self.loss)

    def error(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], weights: dict) -> float:
        num = den = 0.0
        with torch.no_grad():
            for x, t in zip(inputs, targets, strict=True):
                target = t.to(self.device)
                num += float(self.error_sum(self.run(x, weights), target))
                den += self.error_weight(target)
        return num / den if den > 0 else float("nan")


def _error_sum(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """A window's share of the error's numerator: its squared error (``stream``), or the sum of its tokens'
    relative errors ``||y - t||^2 / ||t||^2`` (``token``; a zero target counts its absolute error)."""
    if loss == "token":
        energy = target.square().sum(-1)
        return ((output - target).square().sum(-1) / torch.where(energy > 0, energy, 1.0)).sum()
    return (output - target).square().sum()


def _error_weight(target: torch.Tensor, loss: str) -> float:
    """A window's share of the error's denominator: its energy (``stream``) or its token count (``token``)."""
    return float(target[..., 0].numel()) if loss == "token" else float(target.float().square().sum())


def _stored(
    weights: dict[str, QuantizedWeight], tunables: dict[str, dict[str, _Tunable]]
) -> dict[str, QuantizedWeight]:
    """The weights with their tuned tensors as they would be stored (fp16)."""
    return {
        name: weight.with_tensors(**{t: p.stored() for t, p in tunables[name].items()})
        for name, weight in weights.items()
    }


def _dense(weights: dict[str, QuantizedWeight], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: w.dequantize().to(device=device, dtype=dtype) for name, w in weights.items()}


def tune_block(
    index: int,
    block: nn.Module,
    weights: dict[str, QuantizedWeight],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    arguments: tuple[tuple[Any, ...], dict[str, Any]],
    prefix_arguments: tuple[tuple[Any, ...], dict[str, Any]] | None,
    device: torch.device,
    config: TuneConfig,
    generator: torch.Generator,
    windows: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    head: nn.Module | None = None,
) -> tuple[dict[str, QuantizedWeight], BlockTuneRecord]:
    """Tune ``weights`` (the block's quantized linears, by their name in the block) so that ``block`` maps
    ``inputs`` closer to ``targets``; returns the weights to keep (the method's when tuning did not lower
    the held-out error) and the block's record. ``block``'s own parameters are left as they were.

    ``arguments`` are the block's extra positional and keyword arguments for whole windows;
    ``prefix_arguments`` the same for windows of ``config.tokens`` tokens (``None``: steps use whole
    windows). ``windows`` (``config.split``): the inputs and targets the steps train on instead, windows of
    ``config.tokens`` tokens run under ``prefix_arguments``; ``inputs`` and ``targets`` then only give the
    held-out windows (their last ``config.holdout``). ``head`` (the last block, with ``config.head_steps``):
    the model's final modules and output head as one module, hidden states to logits; after its steps on
    ``config.loss`` the block takes ``config.head_steps`` more on the next-token KL divergence, from the
    weights those kept, and keeps what they find only if it lowers the held-out KL."""
    started = time.perf_counter()
    held = len(inputs) - config.holdout  # the first windows train, the last ones judge
    held_windows = (inputs[held:], targets[held:])
    if windows is not None:
        if prefix_arguments is None:
            raise ValueError("training windows need the arguments of their length (prefix_arguments)")
        train = windows
    elif prefix_arguments is not None:
        train = ([x[:, : config.tokens] for x in inputs[:held]], [t[:, : config.tokens] for t in targets[:held]])
    else:
        train = (inputs[:held], targets[:held])

    def runners(head: nn.Module | None) -> tuple[_Block, _Block]:
        runner = _Block(block, *arguments, device, config.loss, head)
        if prefix_arguments is None:
            return runner, runner
        return runner, _Block(block, *prefix_arguments, device, config.loss, head)

    runner, trainer = runners(None)
    before = runner.error(*held_windows, _dense(weights, device, runner.dtype))
    best, after, steps = _fit(runner, trainer, weights, before, train, held_windows, config, generator, block)
    head_record: dict[str, Any] = {}
    if head is not None and config.head_steps > 0:
        start = best if best is not None else weights
        head_runner, head_trainer = runners(head)
        head_before = head_runner.error(*held_windows, _dense(start, device, runner.dtype))
        head_config = replace(config, steps=config.head_steps)
        tuned, head_after, head_steps = _fit(
            head_runner, head_trainer, start, head_before, train, held_windows, head_config, generator, block, head
        )  # fmt: skip
        if tuned is not None:  # the block error of what is kept, whatever it is
            best = tuned
            after = runner.error(*held_windows, _dense(best, device, runner.dtype))
        head_record = {"head_steps": head_steps, "head_before": head_before, "head_after": head_after}
    flipped = 0 if best is None else sum(_flipped(weights[name], best[name]) for name in weights)
    elapsed = time.perf_counter() - started
    record = BlockTuneRecord(index, before, after, steps, best is not None, elapsed, flipped, **head_record)
    return (best if best is not None else weights), record


def _fit(
    runner: _Block,
    trainer: _Block,
    weights: dict[str, QuantizedWeight],
    best_error: float,
    train: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
    held: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
    config: TuneConfig,
    generator: torch.Generator,
    *frozen_modules: nn.Module,
) -> tuple[dict[str, QuantizedWeight] | None, float, int]:
    """Adam on ``weights``' tunable tensors (and sign latents) against ``trainer``'s error on the ``train``
    windows, ``runner``'s on the ``held`` ones judging every ``config.eval_every`` steps, from ``weights``'
    held-out error ``best_error``. Returns the best state as stored (``None`` when none beat ``weights``), its
    held-out error (``best_error`` when ``None``) and the steps taken. ``frozen_modules``' parameters get no
    gradient."""
    trained = len(train[0])
    tunables = {name: _tunables(weight, config.signs) for name, weight in weights.items()}
    params = [p.delta for per in tunables.values() for p in per.values() if p.kind != "sign"]
    latents = [p.delta for per in tunables.values() for p in per.values() if p.kind == "sign"]
    best, steps, stale = None, 0, 0
    if not (params or latents) or trained == 0 or config.steps == 0:
        return best, best_error, steps
    frozen = [(p, p.requires_grad) for module in frozen_modules for p in module.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    groups = [{"params": params}] if params else []
    if latents:
        # Adam's eps would damp the latents' steps: their gradients are often below it.
        groups.append({"params": latents, "lr": config.sign_lr, "eps": _LATENT_EPS})
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    order: list[int] = []
    try:
        for step in range(1, config.steps + 1):
            if len(order) < config.batch:
                order += torch.randperm(trained, generator=generator).tolist()
            batch, order = order[: config.batch], order[config.batch :]
            _train_step(trainer, weights, tunables, [train[0][i] for i in batch], [train[1][i] for i in batch],
                        optimizer)  # fmt: skip
            steps = step
            if step % config.eval_every and step != config.steps:
                continue
            candidate = _stored(weights, tunables)
            error = runner.error(*held, _dense(candidate, runner.device, runner.dtype))
            if error < best_error:
                best, best_error, stale = candidate, error, 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return best, best_error, steps


def _flipped(before: QuantizedWeight, after: QuantizedWeight) -> int:
    """How many signs ``after`` has flipped against ``before``."""
    return sum(int((getattr(before, p) != getattr(after, p)).sum()) for p in before.sign_planes())


def _train_step(
    runner: _Block,
    weights: dict[str, QuantizedWeight],
    tunables: dict[str, dict[str, _Tunable]],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> None:
    """One Adam step on the batch's error: windows one at a time into the dense weights' gradients, then
    those through the dequantization into the tuned tensors."""
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        graphs = {
            name: weight.with_tensors(**{t: p.value() for t, p in tunables[name].items()}).dequantize()
            for name, weight in weights.items()
        }
        leaves = {
            name: g.detach().to(device=runner.device, dtype=runner.dtype).requires_grad_() for name, g in graphs.items()
        }
        energy = sum(runner.error_weight(t) for t in targets) or 1.0
        for x, t in zip(inputs, targets, strict=True):
            (runner.error_sum(runner.run(x, leaves), t.to(runner.device)) / energy).backward()
        names = [n for n in graphs if leaves[n].grad is not None]
        torch.autograd.backward([graphs[n] for n in names], [leaves[n].grad.to(graphs[n]) for n in names])
    optimizer.step()


def tune_options(config: TuneConfig) -> list[str]:
    """The command-line options that make ``config`` (``--tune`` and the settings that differ from the defaults)."""
    options = ["--tune"]
    defaults = TuneConfig()
    for item in fields(config):
        value = getattr(config, item.name)
        if value != getattr(defaults, item.name):
            option = f"--tune-{item.name.replace('_', '-')}"
            options += [option] if isinstance(value, bool) else [option, str(value)]
    return options
