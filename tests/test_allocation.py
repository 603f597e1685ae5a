"""``--target-bits``: the knapsack (exact against brute force, within budget, monotone), the candidate specs,
the re-plan when real bits differ from measured ones, and whole runs on a tiny llama whose mixed-layout
checkpoint loads back bit for bit and whose progress refuses another budget.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import binq
from binq.cli import main
from binq.engine.allocation import (
    DEFAULT_CANDIDATES,
    AllocationConfig,
    Allocator,
    LinearMeasurement,
    parse_candidates,
)
from binq.engine.tune import TuneConfig
from binq.errors import BinqError
from binq.nn import quantized_weights
from binq.pipeline import CalibrationConfig, EvaluationConfig
from binq.quant.knapsack import allocate, solve_exact
from binq.tables import Reports, allocation_section, slim_report
from test_resume import KILL_AFTER_BLOCK_ENV, SIGKILLED, error_line, forked_run, progress_state

# --- the knapsack ------------------------------------------------------------------------------------------


def brute_force(costs: list[list[int]], errors: list[list[float]], capacity: int) -> float | None:
    """The least summed error of any choice within ``capacity`` (None: none fits)."""
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[i] for c, i in zip(costs, choice, strict=True)) <= capacity:
            error = sum(e[i] for e, i in zip(errors, choice, strict=True))
            best = error if best is None else min(best, error)
    return best


def random_instance(rng: random.Random, items: int, options: int) -> tuple[list[list[int]], list[list[float]]]:
    costs = [[rng.randint(0, 12) for _ in range(rng.randint(1, options))] for _ in range(items)]
    errors = [[round(rng.uniform(0, 10), 3) for _ in c] for c in costs]
    return costs, errors


def chosen_cost_and_error(costs, errors, choice) -> tuple[int, float]:
    return (
        sum(c[i] for c, i in zip(costs, choice, strict=True)),
        sum(e[i] for e, i in zip(errors, choice, strict=True)),
    )


def test_exact_solution_equals_brute_force_on_random_instances() -> None:
    rng = random.Random(0)
    for _ in range(300):
        costs, errors = random_instance(rng, rng.randint(1, 5), 4)
        capacity = rng.randint(0, 50)
        expected = brute_force(costs, errors, capacity)
        choice = solve_exact(costs, errors, capacity)
        if expected is None:
            assert choice is None
            continue
        assert choice is not None
        cost, error = chosen_cost_and_error(costs, errors, choice)
        assert cost <= capacity
        assert error == pytest.approx(expected, abs=1e-9)


def test_allocate_in_unit_bits_is_exact_and_in_bits_keeps_the_budget() -> None:
    rng = random.Random(1)
    for _ in range(100):
        costs, errors = random_instance(rng, rng.randint(1, 5), 4)
        budget = rng.randint(sum(min(c) for c in costs), 60)
        # Small costs: one unit is one bit, so the answer is the exact optimum.
        cost, error = chosen_cost_and_error(costs, errors, allocate(costs, errors, budget))
        assert cost <= budget and error == pytest.approx(brute_force(costs, errors, budget), abs=1e-9)
    for _ in range(30):  # real sizes: millions of bits per option, counted in units, never over the budget
        bits = [[rng.randint(10**5, 5 * 10**6) for _ in range(4)] for _ in range(40)]
        errors = [[rng.uniform(0, 1) for _ in range(4)] for _ in range(40)]
        budget = rng.randint(sum(min(b) for b in bits), sum(max(b) for b in bits))
        cost, _ = chosen_cost_and_error(bits, errors, allocate(bits, errors, budget, resolution=1000))
        assert cost <= budget


def test_a_larger_budget_never_gives_a_larger_error() -> None:
    rng = random.Random(2)
    bits = [[rng.randint(10**4, 10**6) for _ in range(5)] for _ in range(30)]
    # Errors falling with bits, as real candidates' do, and noisy ones that do not: both monotone in budget.
    for errors in (
        [[1.0 / b[i] * rng.uniform(0.5, 2) for i in range(5)] for b in bits],
        [[rng.uniform(0, 1) for _ in range(5)] for _ in bits],
    ):
        low, high = sum(min(b) for b in bits), sum(max(b) for b in bits)
        previous = math.inf
        for budget in range(low, high + 1, (high - low) // 60):
            _, error = chosen_cost_and_error(bits, errors, allocate(bits, errors, budget, resolution=2000))
            assert error <= previous + 1e-12
            previous = error
        assert previous == pytest.approx(sum(min(e) for e in errors))  # the whole span: each item's best


def test_a_budget_below_the_cheapest_allocation_is_refused() -> None:
    with pytest.raises(BinqError, match="below the cheapest allocation"):
        allocate([[5, 9], [3]], [[1.0, 0.0], [0.0]], 7)
    assert solve_exact([[5, 9], [3]], [[1.0, 0.0], [0.0]], 7) is None


# --- candidate specs ---------------------------------------------------------------------------------------


def test_candidate_specs_parse_to_configs() -> None:
    candidates = parse_candidates(" gptq:bits=2, group-size=64 ; w11:importance=obs;arb-group:mean=true ")
    assert [c.spec for c in candidates] == ["gptq:bits=2,group_size=64", "w11:importance=obs", "arb-group:mean=True"]
    assert candidates[0].config.bits == 2 and candidates[0].config.group_size == 64
    assert candidates[2].config.mean is True
    assert [c.method.name for c in parse_candidates(DEFAULT_CANDIDATES)] == [
        "arb-group", "w11", "arb-rc", "gptq", "gptq", "gptq",
    ]  # fmt: skip


BAD_SPECS = {
    "nope": r"--candidates: 'nope': unknown method 'nope'",
    "gptq:bits=two": r"'gptq:bits=two': bits takes a int, got 'two'",
    "gptq:bits=9": r"'gptq:bits=9': --bits must be in \[1, 8\], got 9",
    "gptq:colour=red": r"'gptq:colour=red': method 'gptq' has no option colour",
    "gptq:bits": r"'gptq:bits': 'bits' is not option=value",
    "w11;;gptq": r"an empty part",
    "gptq:bits=4;gptq:group_size=128": r"'gptq:group_size=128' is the same as 'gptq:bits=4'",
    "arb-group:mean=maybe": r"mean takes true or false, got 'maybe'",
    "gptq:bits=2,bits=3": r"bits given twice",
}


@pytest.mark.parametrize("spec", sorted(BAD_SPECS))
def test_bad_candidate_specs_are_one_line_errors_with_exit_2(
    spec: str, capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, text_file: Callable[[int, int], Path]
) -> None:
    argv = ["quantize", "--model", str(tiny_llama_folder), "--calib", str(text_file(2000, 1)), "--nsamples", "2"]
    argv += ["--seqlen", "16", "--eval", "none", "--no-progress", "--target-bits", "2", "--candidates", spec]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("binq: error: --candidates"), err
    assert re.search(BAD_SPECS[spec], lines[0]), lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-bits", "0"], r"--target-bits must be in \(0, 32\], got 0.0"),
        (["--target-bits", "2", "--sensitivity", "loss"], "--sensitivity must be one of block, output"),
        (["--target-bits", "2", "--nproc", "2"], "--target-bits runs in one process"),
    ],
)
def test_bad_allocation_options_are_one_line_errors(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path
) -> None:
    assert main(["quantize", "--model", str(tiny_llama_folder), "--eval", "none", *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("binq: error: ") and re.search(message, lines[0]), lines


def test_method_and_target_bits_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "--method", "gptq", "--target-bits", "2"]) == 2
    assert "leave out --method gptq" in capsys.readouterr().err
    assert main(["quantize"]) == 2
    assert "required: --method (or --target-bits)" in capsys.readouterr().err


# --- the plan as real bits come in -------------------------------------------------------------------------


def measurement(name: str, bits: list[int], errors: list[float]) -> LinearMeasurement:
    return LinearMeasurement(name, 100, bits, errors, [e / 10 for e in errors], 1.0, 0)


def test_more_bits_than_measured_re_plans_the_rest_within_the_budget() -> None:
    candidates = parse_candidates("rtn:bits=1;rtn:bits=2;rtn:bits=4")
    measured = [measurement(f"l{i}", [100, 200, 400], [4.0, 2.0, 1.0]) for i in range(4)]
    allocator = Allocator(measured, candidates, AllocationConfig(2.0, "rtn:bits=1;rtn:bits=2;rtn:bits=4"))
    assert allocator.budget_bits == 800
    assert sum(m.bits[allocator.choice[m.name]] for m in measured) <= 800
    first = allocator("l0")[1].bits
    allocator.record("l0", {1: 100, 2: 200, 4: 400}[first] + 150)  # e.g. more salient columns than in pass 1
    assert allocator.replans == 1
    assert allocator.made_bits["l0"] + sum(measured[i].bits[allocator.choice[f"l{i}"]] for i in (1, 2, 3)) <= 800
    report = allocator.report()
    assert report["storage_bits"] <= 2.0 and report["replans"] == 1


# --- whole runs on a tiny llama ----------------------------------------------------------------------------

SPEC = "rtn:bits=1,group_size=32;gptq:bits=2,group_size=32;gptq:bits=4,group_size=32"


@pytest.fixture(scope="module")
def texts(text_file: Callable[[int, int], Path]) -> tuple[Path, Path]:
    return text_file(2000, 1), text_file(300, 2)


def assert_same_checkpoint(first: Path, second: Path) -> None:
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def mixed_run(folder: Path, texts: tuple[Path, Path], target: float, out: Path | None = None, **kw):
    return binq.quantize(
        str(folder), "mixed", AllocationConfig(target, SPEC, **kw),
        calibration=CalibrationConfig(source=str(texts[0]), nsamples=4, seqlen=24),
        evaluation=EvaluationConfig(sets=(str(texts[1]),), seqlen=24, windows=3), progress=False, out=out,
    )  # fmt: skip


def test_a_mixed_run_keeps_the_budget_and_its_checkpoint_loads_bit_for_bit(
    tiny_llama_folder: Path, texts: tuple[Path, Path], tmp_path: Path
) -> None:
    result = mixed_run(tiny_llama_folder, texts, 2.5, tmp_path / "mixed")
    allocation, bits = result.report["allocation"], result.report["bits"]["linear"]
    # The budget holds in the bits the report counts from the packed tensors, which are the allocation's.
    assert bits["storage_bits"] <= 2.5
    assert allocation["storage_bits"] == pytest.approx(bits["storage_bits"], abs=1e-12)
    assert sum(w.storage_bits_total for w in result.weights.values()) <= 2.5 * bits["parameters"]
    used = {spec for spec, row in allocation["summary"].items() if row["linears"]}
    assert len(used) >= 2, allocation["summary"]  # a real mix, at a budget between the candidates
    assert {type(w).__name__ for w in result.weights.values()} == {"BinaryWeight", "UniformWeight"}
    for row in allocation["linears"]:  # each linear's weight is its chosen candidate's
        weight = result.weights[row["name"]]
        assert weight.storage_bits == row["storage_bits"]
        assert ("rtn" in row["candidate"]) == (type(weight).__name__ == "BinaryWeight")
    report = json.loads((tmp_path / "mixed" / "report.json").read_text())
    assert report["method"]["name"] == "mixed"
    assert report["method"]["config"] == {"target_bits": 2.5, "candidates": SPEC, "sensitivity": "block"}
    assert report["label"] == "target 2.5 bits"
    assert report["time_s"]["measure"] > 0 and report["time_s"]["quantize"] > 0
    # The checkpoint: every linear with its own layout, the same packed tensors and logits after loading.
    loaded = binq.load(tmp_path / "mixed")
    rebuilt = quantized_weights(loaded)
    assert rebuilt.keys() == result.weights.keys()
    for name, weight in result.weights.items():
        assert rebuilt[name].layout == weight.layout
        assert rebuilt[name].packed_tensors().keys() == weight.packed_tensors().keys()
        for key, tensor in weight.packed_tensors().items():
            assert torch.equal(rebuilt[name].packed_tensors()[key], tensor), (name, key)
        assert torch.equal(rebuilt[name].dequantize(), weight.dequantize())
    ids = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model.model(ids).logits)


def test_the_recorded_command_replays_to_the_same_checkpoint(
    tiny_llama_folder: Path, texts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = mixed_run(tiny_llama_folder, texts, 2.0, tmp_path / "api", sensitivity="output")
    command = api.report["command"]
    assert "--method" not in command and command[command.index("--target-bits") + 1] == "2.0"
    assert command[command.index("--sensitivity") + 1] == "output"
    assert main([*command[1:], "--out", str(tmp_path / "cli"), "--no-progress", "--no-layer-table"]) == 0
    out = capsys.readouterr().out
    assert "allocation:" in out and "target 2" in out
    assert_same_checkpoint(tmp_path / "api", tmp_path / "cli")


def test_a_larger_budget_chooses_more_bits_and_less_measured_error(
    tiny_llama_folder: Path, texts: tuple[Path, Path]
) -> None:
    low, high = (mixed_run(tiny_llama_folder, texts, t).report["allocation"] for t in (1.5, 4.0))
    assert low["storage_bits"] <= 1.5 < high["storage_bits"] <= 4.0
    assert high["weighted_error"] < low["weighted_error"]


def test_a_killed_run_resumes_and_refuses_another_budget(
    tiny_llama_folder: Path, texts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quantize", "--model", str(tiny_llama_folder), "--calib", str(texts[0]), "--nsamples", "4"]
    argv += ["--seqlen", "24", "--eval", "none", "--no-progress", "--no-layer-table", "--in-memory"]
    argv += ["--target-bits", "2.5", "--candidates", SPEC]
    reference = tmp_path / "reference"
    assert main([*argv, "--out", str(reference)]) == 0
    out = tmp_path / "out"
    assert forked_run([*argv, "--out", str(out)], **{KILL_AFTER_BLOCK_ENV: "0"}) == SIGKILLED
    assert progress_state(out) == ([0], [])
    capsys.readouterr()
    other = list(argv)
    other[other.index("--target-bits") + 1] = "3"
    assert main([*other, "--out", str(out)]) == 2
    assert "method.config.target_bits differs (was 2.5, now 3.0)" in error_line(capsys.readouterr().err)
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_block"] == 1
    assert_same_checkpoint(reference, out)


def test_the_committed_report_and_its_table(tiny_llama_folder: Path, texts: tuple[Path, Path]) -> None:
    report = json.loads(json.dumps(mixed_run(tiny_llama_folder, texts, 2.5).report))
    slim = slim_report(report, "runs/x/report.json", quiet_machine=False)
    assert all("measured" not in row for row in slim["allocation"]["linears"])
    assert slim["collected"]["allocation_measurements_dropped"] == 14
    assert "measured" in report["allocation"]["linears"][0]  # the run's own report keeps them
    text = allocation_section(Reports(quick={"target 2.5 bits": slim}), ("target 2.5 bits",))
    summary = slim["allocation"]["summary"]
    used = [spec for spec, row in summary.items() if row["linears"]]
    assert f"| linear | {' | '.join(f'`{spec}`' for spec in used)} |" in text
    for kind in ("self_attn.q_proj", "mlp.down_proj"):  # one linear of each kind per block, two blocks
        row = next(line for line in text.splitlines() if line.startswith(f"| {kind} |"))
        assert sum(int(cell) for cell in row.strip("| ").split(" | ")[1:]) == 2


def test_a_mixed_run_tunes_within_its_budget(tiny_llama_folder: Path, texts: tuple[Path, Path]) -> None:
    """--tune on a --target-bits run: every layout of the mix is tuned, the allocation's bits are unchanged."""
    plain = mixed_run(tiny_llama_folder, texts, 2.5)
    tune = TuneConfig(steps=6, lr=0.01, batch=2, tokens=0, holdout=1, eval_every=2, patience=2)
    tuned = binq.quantize(
        str(tiny_llama_folder), "mixed", AllocationConfig(2.5, SPEC),
        calibration=CalibrationConfig(source=str(texts[0]), nsamples=4, seqlen=24),
        evaluation=EvaluationConfig(sets=(str(texts[1]),), seqlen=24, windows=3), progress=False, tune=tune,
    )  # fmt: skip
    assert tuned.report["label"].endswith(" tuned") and len(tuned.report["tuning"]["blocks"]) >= 2
    assert all(b["error_after"] <= b["error_before"] for b in tuned.report["tuning"]["blocks"])
    assert tuned.report["bits"]["linear"]["storage_bits"] <= 2.5
    # Pass 1 measures the original model, before any tuning; these candidates have fixed bits: no re-plan.
    assert [r["candidate"] for r in tuned.report["allocation"]["linears"]] == [
        r["candidate"] for r in plain.report["allocation"]["linears"]
    ]
