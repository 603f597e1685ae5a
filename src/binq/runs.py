"""The catalogue of named runs: what ``binq demo``, the benchmark scripts and the docs' tables run.

Each run has a label (its name in tables and its ``--label``), a slug (its folder under ``--out`` and the
name of its committed report, ``docs/reports/quick/<slug>.json``) and the options of one ``binq quantize``
(or ``binq eval``) command. ``run_command`` turns a label into the whole command line; ``same_run`` says
whether a report's recorded ``command`` is that run (ignoring where it wrote and what it printed).

The zero-shot rows are ``binq eval --tasks`` of a quantize run's checkpoint (or of the source model, the
row ``original``): ``zeroshot_command`` and ``same_zeroshot_run`` are their counterparts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Run:
    """One named run: ``binq <subcommand> --model M <options> ...``."""

    label: str
    options: tuple[str, ...]
    description: str = ""
    subcommand: str = "quantize"  # or "eval": fp weights, simulated activations (`binq eval --out` reports too)

    @property
    def slug(self) -> str:
        return slug(self.label)

    @property
    def quantizes(self) -> bool:
        return self.subcommand == "quantize"


def slug(label: str) -> str:
    """The folder and file name of a run: its label with spaces as underscores."""
    return label.replace(" ", "_")


def _q(label: str, *options: str, description: str = "") -> Run:
    return Run(label, options, description)


def _seeds(label: str, *options: str, seeds: tuple[int, ...] = (0, 1, 2), description: str = "") -> tuple[Run, ...]:
    """The run at each calibration seed of ``seeds``: seed 0 (the default) as ``label``, seed N as
    ``label seed N`` with ``--seed N`` after the options."""
    return tuple(
        _q(f"{label} seed {seed}" if seed else label, *options, *(("--seed", str(seed)) if seed else ()),
           description=description)
        for seed in seeds
    )  # fmt: skip


def _signs_token(batch: str, tokens: str | None = None) -> tuple[str, ...]:
    """``arb-group`` tuned with sign flips and each token's error: 60 steps of ``batch`` windows, patience 4, on
    prefixes of ``tokens`` tokens (the default 128 when ``None``; 0: whole windows)."""
    prefix = () if tokens is None else ("--tune-tokens", tokens)
    return (
        *("--method", "arb-group", "--tune", "--tune-signs", "--tune-steps", "60", "--tune-batch", batch),
        *prefix, "--tune-patience", "4", "--tune-loss", "token",
    )  # fmt: skip


_GPTQ_4 = ("--method", "gptq", "--bits", "4", "--group-size", "128")
_W11_OBS = ("--method", "w11", "--importance", "obs")
_GPTQ_WIDTHS = ("--target-bits", "3.78", "--candidates", "gptq:bits=2;gptq:bits=3;gptq:bits=4")

RUNS: tuple[Run, ...] = (
    # The main job (binq demo) and GPTQ's grid widths.
    _q("rtn 1-bit", "--method", "rtn", "--bits", "1", description="XNOR: sign x mean abs per row"),
    _q("gptq 1-bit g128", "--method", "gptq", "--bits", "1", "--group-size", "128"),
    _q("gptq 2-bit g128", "--method", "gptq", "--bits", "2", "--group-size", "128"),
    _q("gptq 3-bit g128", "--method", "gptq", "--bits", "3", "--group-size", "128"),
    _q("gptq 4-bit g128", "--method", "gptq", "--bits", "4", "--group-size", "128"),
    _q(
        "gptq 3-bit g128 clip",
        *("--method", "gptq", "--bits", "3", "--group-size", "128", "--clip-search"),
        description="ranges clipped by a diag(H)-weighted search",
    ),
    _q("billm", "--method", "billm"),
    # The ARB family (issue 3).
    _q(
        "rtn 1-bit g128", "--method", "rtn", "--bits", "1", "--group-size", "128", description="sign x mean abs per 128"
    ),
    _q("arb", "--method", "arb"),
    _q("arb cgb", "--method", "arb", "--cgb"),
    _q("arb-x", "--method", "arb-x"),
    _q("arb-llm-x", "--method", "arb-llm-x", description="arb-x + CGB"),
    _q("arb-rc", "--method", "arb-rc"),
    _q("arb-llm-rc", "--method", "arb-llm-rc", description="arb-rc + CGB"),
    _q("arb-llm-x exact", "--method", "arb-llm-x", "--exact-compensation"),
    _q("arb-llm-x intra", "--method", "arb-llm-x", "--intra-block"),
    _q("arb-llm-rc exact", "--method", "arb-llm-rc", "--exact-compensation"),
    _q("arb-llm-rc intra", "--method", "arb-llm-rc", "--intra-block"),
    _q("arb-group g128", "--method", "arb-group", description="Q1_0's form"),
    _q("arb-group g128 mean", "--method", "arb-group", "--mean"),
    # Block-wise tuning (issue 15): the same methods, their fp16 tensors tuned against each block's output.
    _q("arb-group g128 tuned", "--method", "arb-group", "--tune", description="Q1_0's form, tuned"),
    _q("w11 tuned", "--method", "w11", "--tune"),
    _q("gptq 2-bit g128 tuned", "--method", "gptq", "--bits", "2", "--group-size", "128", "--tune"),
    *_seeds("gptq 4-bit g128 tuned", *_GPTQ_4, "--tune"),
    # Sign flips too (--tune-signs), with the steps, batch and patience they need (docs/TUNE.md).
    *_seeds(
        "arb-group g128 tuned signs",
        *("--method", "arb-group", "--tune", "--tune-signs"),
        *("--tune-steps", "60", "--tune-batch", "4", "--tune-patience", "4"),
        description="Q1_0's form, tuned with sign flips",
    ),
    # Each token's relative error as the loss (--tune-loss token, docs/TUNE.md), with 128-token prefixes, whole
    # windows or 256-token prefixes at the same tokens per step.
    _q("arb-group g128 tuned token", "--method", "arb-group", "--tune", "--tune-loss", "token"),
    _q("arb-group g128 tuned signs token", *_signs_token("4")),
    _q("arb-group g128 tuned signs token whole", *_signs_token("1", "0")),
    *_seeds(
        "arb-group g128 tuned signs token 256",
        *_signs_token("2", "256"),
        description="Q1_0's form: signs flipped, each token's error, 256-token prefixes",
    ),
    # The training windows split into 128-token windows of their own (--tune-split): four times the first
    # positions, the same tokens (docs/TUNE.md).
    *_seeds(
        "arb-group g128 tuned signs token split",
        *_signs_token("4", "128"),
        "--tune-split",
        description="Q1_0's form: signs flipped, each token's error, trained on 128-token windows of their own",
    ),
    # The same, with 180 steps for the first and the last block (--tune-edge-steps): their errors cost the
    # most (benchmarks/block_damage.py, docs/TUNE.md).
    *_seeds(
        "arb-group g128 tuned signs token split edges",
        *("--method", "arb-group", "--tune", "--tune-signs", "--tune-steps", "60", "--tune-edge-steps", "180"),
        *("--tune-batch", "4", "--tune-tokens", "128", "--tune-patience", "4", "--tune-loss", "token", "--tune-split"),
        description="Q1_0's form: as split, with 180 steps for the first and the last block",
    ),
    # As split, the last block then 30 more steps on the model's next-token KL divergence through its head
    # (--tune-head-steps); 50 steps instead of 60 and held-out checks every 10 steps instead of 5 pay for
    # them (docs/TUNE.md).
    *_seeds(
        "arb-group g128 tuned signs token split head",
        *("--method", "arb-group", "--tune", "--tune-signs", "--tune-steps", "50", "--tune-head-steps", "30"),
        *("--tune-batch", "4", "--tune-tokens", "128", "--tune-eval-every", "10", "--tune-patience", "2"),
        *("--tune-loss", "token", "--tune-split"),
        description="Q1_0's form: as split (50 steps), then 30 steps of the last block on the next-token KL",
    ),
    *_seeds(
        "arb-group g128 tuned signs token 256 target quantized", *_signs_token("2", "256"), "--tune-target", "quantized"
    ),
    *_seeds("gptq 4-bit g128 tuned token", *_GPTQ_4, "--tune", "--tune-loss", "token"),
    # Calibration seeds (issue 15): a 1-bit-class run's PPL moves with the calibration draw; these rows, with
    # seed 0's own, give each its median and range (docs/TUNE.md).
    *_seeds("arb-group g128", "--method", "arb-group", seeds=(1, 2)),
    *_seeds("arb-group g128 tuned", "--method", "arb-group", "--tune", seeds=(1, 2)),
    # MSB / dynamic grouping (issue 4).
    _q("msb g2", "--method", "msb", "--groups", "2"),
    _q("msb g4", "--method", "msb", "--groups", "4"),
    _q("msb g8", "--method", "msb", "--groups", "8"),
    _q("msb g16", "--method", "msb", "--groups", "16"),
    _q("msb g32", "--method", "msb", "--groups", "32"),
    _q("msb g32 lo", "--method", "msb", "--groups", "32", "--solver", "windowed-lo"),
    _q("msb g4 lo", "--method", "msb", "--groups", "4", "--solver", "windowed-lo"),
    _q("msb g8 lo", "--method", "msb", "--groups", "8", "--solver", "windowed-lo"),
    _q("msb g16 lo", "--method", "msb", "--groups", "16", "--solver", "windowed-lo"),
    _q("msb block g4", "--method", "msb", "--granularity", "block", "--groups", "4"),
    _q("msb-hessian g8", "--method", "msb-hessian", "--groups", "8"),
    _q("msb-hessian block g4", "--method", "msb-hessian", "--granularity", "block", "--groups", "4"),
    # W(1+1) and W(1+1)A(1x4) (issue 5): the defaults, then the ablations of docs/W11.md.
    _q("w11", "--method", "w11", description="the defaults: diag importance"),
    _q("w11 a4", "--method", "w11", "--act-bits", "4", description="W(1+1)A(1x4) with the defaults"),
    _q("w11 obs", *_W11_OBS, description="obs importance, the default before diag"),
    _q("w11 obs init median", *_W11_OBS, "--init", "median"),
    _q("w11 obs init salience", *_W11_OBS, "--init", "salience"),
    _q("w11 obs offsets", *_W11_OBS, "--offsets"),
    _q("w11 obs no em", *_W11_OBS, "--em-iterations", "0"),
    _q("w11 importance review", "--method", "w11", "--importance", "review"),
    _q("w11 obs a4", *_W11_OBS, "--act-bits", "4", "--smooth", "none"),
    _q("w11 obs a4 smooth", *_W11_OBS, "--act-bits", "4", "--smooth", "channel"),
    _q("w11 obs a4 token", *_W11_OBS, "--act-bits", "4", "--smooth", "token"),
    _q("w11 obs a4 sym", *_W11_OBS, "--act-bits", "4", "--act-sym"),
    _q("w11 obs a4 noclip", *_W11_OBS, "--act-bits", "4", "--act-clip", "1.0"),
    _q(
        "gptq 2-bit g128 a4",
        *("--method", "gptq", "--bits", "2", "--group-size", "128", "--act-bits", "4", "--smooth", "none"),
        description="W2A4",
    ),
    # A method per linear under a storage-bit budget (issue 15, docs/ALLOCATION.md).
    _q("target 2.5 bits", "--target-bits", "2.5", description="per linear: arb-group, w11, arb-rc or gptq 2/3/4-bit"),
    _q("target 2.5 bits tuned", "--target-bits", "2.5", "--tune", description="the same allocation, each block tuned"),
    # Under llama.cpp's fewest bits on SmolLM2 (IQ1_S, 3.792): GPTQ's widths only, per linear.
    _q("target 3.78 bits gptq", *_GPTQ_WIDTHS, description="per linear: gptq 2/3/4-bit g128"),
    _q("target 3.78 bits gptq tuned", *_GPTQ_WIDTHS, "--tune", description="the same allocation, each block tuned"),
    _q("target 3.78 bits gptq tuned token", *_GPTQ_WIDTHS, "--tune", "--tune-loss", "token"),
    Run("w16 a4", ("--act-bits", "4", "--smooth", "none"), "fp weights, INT4 activations", "eval"),
    Run("w16 a4 smooth", ("--act-bits", "4", "--smooth", "channel"), "fp weights, INT4 activations", "eval"),
)

CATALOGUE: dict[str, Run] = {run.label: run for run in RUNS}
if len(CATALOGUE) != len(RUNS) or len({run.slug for run in RUNS}) != len(RUNS):
    raise RuntimeError("run labels and slugs must be unique")

# The quantize runs by label, as `binq quantize` options (the names binq demo and quality.py use).
DEMO_RUNS: dict[str, list[str]] = {run.label: list(run.options) for run in RUNS if run.quantizes}
# The main job's runs (binq demo without --only).
DEMO_DEFAULT = ("rtn 1-bit", "gptq 1-bit g128", "gptq 2-bit g128", "gptq 4-bit g128", "billm")

# Flags that change what a run prints or where it writes, never what it measures.
_OUTPUT_FLAGS = ("--no-layer-table", "--no-progress")
_OUTPUT_OPTIONS = ("--out", "--workers")


def get_run(label: str) -> Run:
    """The catalogue's run of that label (KeyError naming the known labels otherwise)."""
    try:
        return CATALOGUE[label]
    except KeyError:
        raise KeyError(f"unknown run {label!r} (runs: {', '.join(CATALOGUE)})") from None


def run_command(label: str, model: str, device: str, full: bool, out: Path) -> list[str]:
    """The command line of one run: ``binq quantize`` (or ``binq eval``) writing its report to ``out/<slug>``
    (quick protocol unless ``full``)."""
    run = get_run(label)
    command = ["binq", run.subcommand, "--model", model, *run.options, "--label", label, "--device", device]
    command += ["--out", str(out / run.slug)]
    return command if full else [*command, "--quick"]


demo_command = run_command  # the name binq demo has used


def _essential(command: list[str]) -> list[str]:
    """A command without the flags that do not change its results, and without ``--out``/``--workers``."""
    kept, skip = [], False
    for word in command:
        if skip:
            skip = False
        elif word in _OUTPUT_OPTIONS:
            skip = True
        elif word not in _OUTPUT_FLAGS:
            kept.append(word)
    return kept


def _option(command: list[str], name: str, default: str) -> str:
    return command[command.index(name) + 1] if name in command[:-1] else default


def same_run(command: list[str], label: str) -> bool:
    """Whether ``command`` (a report's ``command``) is the catalogue's run ``label``.

    Model, device and protocol are read from the command itself; where it wrote (``--out``), its worker
    count and its terminal output flags are ignored.
    """
    if label not in CATALOGUE:
        return False
    model, device = _option(command, "--model", ""), _option(command, "--device", "cpu")
    expected = run_command(label, model, device, "--quick" not in command, Path("."))
    return _essential(command) == _essential(expected)


# ---------------------------------------------------------------------------------------------------------
# Zero-shot rows: `binq eval --tasks` of a catalogue run's checkpoint, or of the source model

ORIGINAL = "original"  # the zero-shot row of the source model itself
ZEROSHOT_TASKS = ("lastword", "nextsentence")
# The first 100 of each task's 500 items: a whole row (2,500 requests) takes about 23 minutes at one thread.
ZEROSHOT_LIMIT = 100


def zeroshot_model(label: str, source: str, checkpoints: Path) -> str:
    """What a zero-shot row evaluates: ``source`` for ``original``, else the run's checkpoint folder."""
    return source if label == ORIGINAL else str(checkpoints / get_run(label).slug)


def zeroshot_command(label: str, model: str, device: str, out: Path, limit: int | None = ZEROSHOT_LIMIT) -> list[str]:
    """``binq eval`` of ``model`` on the zero-shot tasks (the first ``limit`` items), report in ``out/<slug>``."""
    command = ["binq", "eval", "--model", model, "--tasks", ",".join(ZEROSHOT_TASKS)]
    if limit is not None:
        command += ["--limit", str(limit)]
    return [*command, "--label", label, "--device", device, "--out", str(out / slug(label))]


def same_zeroshot_run(command: list[str], label: str, source: str) -> bool:
    """Whether ``command`` is the zero-shot row ``label``: the source model ``source`` for ``original``, else a
    checkpoint folder named as the run's slug; tasks, limit and device read from the command, where it wrote and
    what it printed ignored."""
    if label != ORIGINAL and label not in CATALOGUE:
        return False
    model = _option(command, "--model", "")
    if label == ORIGINAL and model != source:
        return False
    if label != ORIGINAL and Path(model).name != slug(label):
        return False
    limit = _option(command, "--limit", "")
    device = _option(command, "--device", "cpu")
    expected = zeroshot_command(label, model, device, Path("."), int(limit) if limit.isdigit() else None)
    return _essential(command) == _essential(expected)
