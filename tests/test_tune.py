"""Block-wise tuning (``--tune``): the held-out block error never rises, the layout and bits never change.

Tiny random models. Each claim of docs/TUNE.md is checked: every layout's tunable tensors reach its
dequantized weight through autograd with the right gradient; a tuned run keeps every bit plane, code
and index of the method and only moves the fp16 tensors, so its storage bits equal the untuned run's;
each block's held-out error after tuning is at most the method's (the method's weights are kept when
tuning does not help); a prefix of a window is exact for a causal block under the arguments captured
for that length; streamed and in-memory tuned runs agree bit for bit; a tuned ``arb-group`` still
exports to GGUF Q1_0 exactly; bad options are one-line errors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from torch.func import functional_call

import binq
import binq.engine.calibrate as calibrate
from binq.checkpoint import open_tensors, save_checkpoint
from binq.cli import main
from binq.engine.calibrate import quantize_model
from binq.engine.capture import block_output, capture_block_inputs
from binq.engine.resume import tensor_digest
from binq.engine.tune import LOSSES, BlockTuneRecord, TuneConfig, for_block, tune_block, tune_options
from binq.errors import BinqError
from binq.export.gguf import export_gguf
from binq.export.q1_0 import dequantize_q1_0
from binq.inference.llamacpp import unavailable_reason
from binq.methods import get_method
from binq.models import ModelHead, block_linears, get_architecture, get_blocks
from binq.pipeline import CalibrationConfig, EvaluationConfig
from binq.quant.structured import QuantizedWeight, sign_values
from conftest import build_tiny_model, random_ids
from test_gguf_export import WIDE, assert_llama_cpp_follows, byte_level_bpe_tokenizer, gguf_tensor

FAST = TuneConfig(steps=12, lr=0.01, batch=2, tokens=0, holdout=2, eval_every=3, patience=2)
SIGNS = dataclasses.replace(FAST, signs=True, sign_lr=0.2)  # a latent can cross zero within the 12 steps

# Every layout and each of its optional tensors: means, column scales, salient zones, codebooks, grids.
METHODS = {
    "arb-group": {"group_size": 32},
    "arb-rc": {"block_size": 32, "iterations": 3},  # row and column scales, means
    "billm": {"block_size": 32},  # four zones, salient columns and their residual plane
    "w11": {"block_size": 32},
    "gptq": {"bits": 3, "group_size": 32},  # uniform grid with zero points
    "msb": {"groups": 4, "granularity": "row"},  # multi-scale codebook
    "rtn": {"bits": 1, "group_size": 32},  # calibration-free: tuned through the engine
}


def tuned_run(
    method: str,
    tune: TuneConfig | None,
    arch: str = "llama",
    seed: int = 0,
    edit: Callable[[QuantizedWeight], QuantizedWeight] | None = None,
):
    """A two-block tiny model quantized (and tuned); also every weight as the method made it, before tuning.
    ``edit`` changes each weight the method made before the engine (and tuning) sees it."""
    model = build_tiny_model(arch, seed=seed)
    spec = get_method(method)
    made: list[QuantizedWeight] = []

    def recording(weight: torch.Tensor, hessian: torch.Tensor, config: Any) -> QuantizedWeight:
        quantized = spec.quantize(weight, hessian, config)
        made.append(quantized if edit is None else edit(quantized))
        return made[-1]

    records: list[BlockTuneRecord] = []
    result = quantize_model(
        model, get_architecture(model), random_ids(8, 32, seed=1), dataclasses.replace(spec, quantize=recording),
        spec.make_config(**METHODS[method]), progress=False, tune=tune, on_tune=records.append,
    )  # fmt: skip
    result.made = dict(zip(result.weights, made, strict=True))
    return model, result, records


@pytest.mark.parametrize("method", sorted(METHODS))
def test_dequantize_is_differentiable_in_every_tunable_tensor(method: str) -> None:
    _, result, _ = tuned_run(method, None)
    weight = next(iter(result.weights.values()))
    kinds = weight.tunable_tensors()
    assert kinds and set(kinds.values()) <= {"scale", "offset"}
    leaves = {name: getattr(weight, name).float().requires_grad_() for name in kinds}
    rebuilt = weight.with_tensors(**leaves).dequantize()
    assert torch.equal(rebuilt.detach(), weight.dequantize())  # fp16 values in fp32: the same weight
    probe = torch.randn(rebuilt.shape, generator=torch.Generator().manual_seed(0))
    (rebuilt * probe).sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, name
        # The weight is linear in each tensor with the others fixed: a finite step is exact up to rounding.
        direction = torch.randn(leaf.shape, generator=torch.Generator().manual_seed(1))
        moved = weight.with_tensors(**{**leaves, name: leaf.detach() + 1e-2 * direction}).dequantize()
        predicted = 1e-2 * float((leaf.grad * direction).sum())
        actual = float(((moved.detach() - rebuilt.detach()) * probe).sum())
        assert actual == pytest.approx(predicted, rel=1e-3, abs=1e-4), name


def test_only_tunable_tensors_and_sign_planes_can_be_replaced() -> None:
    _, result, _ = tuned_run("billm", None)
    weight = next(iter(result.weights.values()))
    assert weight.sign_planes() == ("signs", "residual_signs")
    with pytest.raises(ValueError, match="do not tune group_bitmap"):
        weight.with_tensors(group_bitmap=weight.group_bitmap)
    with pytest.raises(ValueError, match="do not tune salient_columns"):
        weight.with_tensors(salient_columns=weight.salient_columns)
    flipped = weight.with_tensors(signs=~weight.signs)
    assert torch.equal(flipped.signs, ~weight.signs) and flipped.storage_bits_total == weight.storage_bits_total


# Every layout with sign planes: one zone, means, row and column scales, salient residual planes, codebooks.
SIGNED = sorted(name for name in METHODS if name != "gptq")


@pytest.mark.parametrize("method", SIGNED)
def test_dequantize_is_differentiable_in_every_sign_plane(method: str) -> None:
    """A sign plane given as float +-1 values dequantizes to the same weight, and the weight moves with
    each value by its own element's magnitude: the straight-through estimator's gradient is exact for
    the element it flips (a flip is a step of -2 s)."""
    _, result, _ = tuned_run(method, None)
    weight = next(iter(result.weights.values()))
    planes = weight.sign_planes()
    assert planes
    values = {name: sign_values(getattr(weight, name)).requires_grad_() for name in planes}
    rebuilt = weight.with_tensors(**values).dequantize()
    assert torch.equal(rebuilt.detach(), weight.dequantize())
    probe = torch.randn(rebuilt.shape, generator=torch.Generator().manual_seed(0))
    (rebuilt * probe).sum().backward()
    for name, value in values.items():
        assert value.grad is not None and value.grad.abs().sum() > 0, name
        flat = value.grad.flatten()
        index = int(flat.abs().argmax())
        plane = getattr(weight, name).clone()
        plane.view(-1)[index] = ~plane.view(-1)[index]
        moved = weight.with_tensors(**{name: plane}).dequantize()
        predicted = float(flat[index]) * -2 * float(value.detach().flatten()[index])
        actual = float(((moved - weight.dequantize()) * probe).sum())
        assert actual == pytest.approx(predicted, rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("method", SIGNED)
def test_sign_tuning_keeps_the_layout_and_never_raises_the_held_out_error(method: str) -> None:
    _, plain, _ = tuned_run(method, FAST)
    _, tuned, records = tuned_run(method, SIGNS)
    assert [r.block for r in records] == [0, 1]
    for record in records:
        assert record.error_after <= record.error_before
        assert record.kept == (record.error_after < record.error_before)
        assert record.kept or record.flipped == 0
    assert list(plain.weights) == list(tuned.weights)
    flips = 0
    for name, after in tuned.weights.items():
        made = tuned.made[name]
        assert after.layout == made.layout and after.shape == made.shape
        assert after.storage_bits_total == made.storage_bits_total
        if ".layers.0." in name:  # block 0 sees the same inputs in both runs: the method made the same weight
            assert tensor_digest(plain.made[name].packed_tensors()) == tensor_digest(made.packed_tensors())
        a, b = made.packed_tensors(), after.packed_tensors()
        assert {k: (t.shape, t.dtype) for k, t in a.items()} == {k: (t.shape, t.dtype) for k, t in b.items()}
        fixed = set(a) - set(made.tunable_tensors()) - set(made.sign_planes())
        assert all(torch.equal(a[k], b[k]) for k in fixed), name  # bitmaps, salient columns, indices as made
        for plane in made.sign_planes():
            assert getattr(after, plane).dtype == torch.bool
            flips += int((getattr(after, plane) != getattr(made, plane)).sum())
    assert flips == sum(r.flipped for r in records)


def corrupt(share: float) -> Callable[[QuantizedWeight], QuantizedWeight]:
    """Flip a random ``share`` of each weight's signs, after the method: flipping them back helps."""

    def edit(weight: QuantizedWeight) -> QuantizedWeight:
        wrong = torch.rand(weight.signs.shape, generator=torch.Generator().manual_seed(weight.signs.numel())) < share
        edited = weight.with_tensors(signs=weight.signs ^ wrong)
        edited.corrupted = wrong  # type: ignore[attr-defined]
        return edited

    return edit


def test_sign_tuning_flips_wrong_signs_back() -> None:
    """With 30% of the method's signs deliberately flipped, tuning the scales alone cannot undo it;
    tuning the signs flips signs, among them wrong ones back, and ends far lower on held-out windows."""
    longer = dataclasses.replace(FAST, steps=48, eval_every=4, patience=4)
    _, _, scale_records = tuned_run("arb-group", longer, edit=corrupt(0.3))
    with_signs = dataclasses.replace(longer, signs=True, sign_lr=0.1)
    _, signs, sign_records = tuned_run("arb-group", with_signs, edit=corrupt(0.3))
    assert sign_records[0].error_before == scale_records[0].error_before  # the same corrupted block 0
    assert sign_records[0].flipped > 0 and sign_records[0].error_after < 0.85 * scale_records[0].error_after
    restored = others = wrong = right = 0
    for name, after in signs.weights.items():
        if ".layers.0." not in name:
            continue
        made = signs.made[name]
        flipped = after.signs != made.signs
        restored += int((flipped & made.corrupted).sum())
        others += int((flipped & ~made.corrupted).sum())
        wrong += int(made.corrupted.sum())
        right += int((~made.corrupted).sum())
    # Flipping is no mere undo: with windows this few, the tuned planes move away from the method's
    # elsewhere too; but a corrupted sign is still the likelier to flip.
    assert restored > 0 and restored / wrong > others / right


def test_sign_tuning_is_deterministic() -> None:
    flipping = dataclasses.replace(SIGNS, steps=48, eval_every=4, patience=4, sign_lr=0.1)
    _, first, a = tuned_run("billm", flipping, edit=corrupt(0.3))
    _, second, b = tuned_run("billm", flipping, edit=corrupt(0.3))
    assert any(r.flipped for r in a)
    assert [dataclasses.replace(r, time_s=0) for r in a] == [dataclasses.replace(r, time_s=0) for r in b]
    for name, weight in first.weights.items():
        assert tensor_digest(weight.packed_tensors()) == tensor_digest(second.weights[name].packed_tensors())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tuning_keeps_the_layout_and_never_raises_the_held_out_error(method: str) -> None:
    _, plain, none = tuned_run(method, None)
    _, tuned, records = tuned_run(method, FAST)
    assert none == [] and [r.block for r in records] == [0, 1]
    for record in records:
        assert record.error_after <= record.error_before
        assert record.kept == (record.error_after < record.error_before)
        assert 0 < record.steps <= FAST.steps
    assert records[0].kept, "tuning a fresh one-shot block should lower its error"
    assert list(plain.weights) == list(tuned.weights)
    for name, after in tuned.weights.items():
        made = tuned.made[name]  # what the method made of this linear in the tuned run, before tuning
        assert after.layout == made.layout and after.shape == made.shape
        assert after.storage_bits_total == made.storage_bits_total
        a, b = made.packed_tensors(), after.packed_tensors()
        assert {k: (t.shape, t.dtype) for k, t in a.items()} == {k: (t.shape, t.dtype) for k, t in b.items()}
        fixed = set(a) - set(made.tunable_tensors())
        assert fixed and all(torch.equal(a[k], b[k]) for k in fixed), name  # planes, bitmaps, codes as made
        if ".layers.0." in name:  # block 0 sees the same inputs in both runs: the method made the same weight
            assert tensor_digest(plain.weights[name].packed_tensors()) == tensor_digest(a)
            assert any(not torch.equal(a[k], b[k]) for k in made.tunable_tensors()), name


def test_a_block_that_tuning_does_not_help_keeps_the_methods_weights() -> None:
    _, plain, _ = tuned_run("arb-group", None)
    wild = dataclasses.replace(FAST, lr=50.0, eval_every=1, patience=1)  # every step overshoots
    model, tuned, records = tuned_run("arb-group", wild)
    assert not records[0].kept and records[0].error_after == records[0].error_before
    assert records[0].steps == 1  # one check without improvement, patience 1: stopped
    for name, weight in plain.weights.items():
        if ".layers.0." in name:
            packed, kept = weight.packed_tensors(), tuned.weights[name].packed_tensors()
            assert all(torch.equal(packed[k], kept[k]) for k in packed)
    q = get_blocks(model, get_architecture(model))[0].self_attn.q_proj
    assert torch.equal(q.weight.data, plain.weights["model.layers.0.self_attn.q_proj"].dequantize())


def test_the_tuned_weights_are_in_the_model() -> None:
    model, tuned, _ = tuned_run("gptq", FAST)
    for index, block in enumerate(get_blocks(model, get_architecture(model))):
        down = block.mlp.down_proj.weight.data
        assert torch.equal(down, tuned.weights[f"model.layers.{index}.mlp.down_proj"].dequantize())


def test_both_targets_tune_and_differ() -> None:
    _, original, a = tuned_run("gptq", FAST)
    _, quantized, b = tuned_run("gptq", dataclasses.replace(FAST, target="quantized"))
    assert a[0].kept and b[0].kept
    assert a[0].error_before == b[0].error_before  # block 0: both targets are the original block on the same inputs
    assert a[1].error_before != b[1].error_before  # block 1: the original stream against the quantized one
    names = [n for n in original.weights if ".layers.1." in n]
    assert any(
        not torch.equal(original.weights[n].packed_tensors()["scales"], quantized.weights[n].packed_tensors()["scales"])
        for n in names
    )


def test_tuning_is_deterministic() -> None:
    _, first, a = tuned_run("w11", FAST)
    _, second, b = tuned_run("w11", FAST)
    assert [dataclasses.replace(r, time_s=0) for r in a] == [dataclasses.replace(r, time_s=0) for r in b]
    for name, weight in first.weights.items():
        assert tensor_digest(weight.packed_tensors()) == tensor_digest(second.weights[name].packed_tensors())


def massive_first_token_block(seed: int = 0):
    """Block 0 of a tiny llama whose targets carry a massive first token: its original outputs, the first
    token's moved by 300x a token's size along one channel, out of the block's reach (SmolLM2-135M's
    block 11 writes such a token, 98 % of the stream's energy, that its binarized copy cannot match);
    and its linears binarized per group of 32 (``rtn``, sign x mean abs) as the weights to tune."""
    model = build_tiny_model("llama", seed=seed)
    blocks = get_blocks(model, get_architecture(model))
    captured = capture_block_inputs(model, blocks, random_ids(8, 32, seed=1))
    inputs = list(captured.hidden_states)
    block, arguments = blocks[0], (captured.args[0], captured.kwargs[0])
    with torch.no_grad():
        targets = [block_output(block(x, *arguments[0], **arguments[1])) for x in inputs]
    for t in targets:
        t[:, 0, 0] += 300 * float(t[:, 1:].norm(dim=-1).median())
    spec = get_method("rtn")
    config = spec.make_config(bits=1, group_size=32)
    linears = block_linears(block, get_architecture(model))
    weights = {name: spec.quantize(linear.weight.data, None, config) for name, linear in linears.items()}
    return block, arguments, inputs, targets, weights


def token_errors_after(weights: dict[str, QuantizedWeight], block, arguments, inputs, targets) -> torch.Tensor:
    """Every held-out token's relative error under ``weights``, first tokens apart: ``[windows, tokens]``."""
    overrides = {f"{name}.weight": w.dequantize() for name, w in weights.items()}
    rows = []
    with torch.no_grad():
        for x, t in zip(inputs, targets, strict=True):
            y = block_output(functional_call(block, overrides, (x, *arguments[0]), arguments[1]))
            rows.append(((y - t).square().sum(-1) / t.square().sum(-1))[0])
    return torch.stack(rows)


def test_the_token_loss_is_each_tokens_relative_error_averaged() -> None:
    block, arguments, inputs, targets, weights = massive_first_token_block()
    config = dataclasses.replace(FAST, loss="token")
    _, record = tune_block(0, block, weights, inputs, targets, arguments, None, torch.device("cpu"), config,
                           torch.Generator().manual_seed(0))  # fmt: skip
    held = slice(len(inputs) - config.holdout, None)
    before = token_errors_after(weights, block, arguments, inputs[held], targets[held])
    assert record.error_before == pytest.approx(float(before.mean()), rel=1e-5)
    _, stream = tune_block(0, block, weights, inputs, targets, arguments, None, torch.device("cpu"), FAST,
                           torch.Generator().manual_seed(0))  # fmt: skip
    energy = torch.stack([t.square().sum(-1)[0] for t in targets[held]])
    assert stream.error_before == pytest.approx(float((before * energy).sum() / energy.sum()), rel=1e-5)


def test_the_token_loss_fits_the_tokens_a_massive_one_hides() -> None:
    """With a first token 300x the others that the block cannot reach, the stream's error is nearly that
    token's: tuning on it finds nothing that lowers it and the other tokens' error stays where it was; the
    token loss lowers theirs."""
    block, arguments, inputs, targets, weights = massive_first_token_block()
    held = slice(len(inputs) - FAST.holdout, None)
    longer = dataclasses.replace(FAST, steps=48, patience=6, batch=4)
    results = {}
    for loss in LOSSES:
        config = dataclasses.replace(longer, loss=loss)
        tuned, record = tune_block(0, block, weights, inputs, targets, arguments, None, torch.device("cpu"), config,
                                   torch.Generator().manual_seed(0))  # fmt: skip
        assert record.error_after <= record.error_before
        results[loss] = (token_errors_after(tuned, block, arguments, inputs[held], targets[held]), record)
    start = token_errors_after(weights, block, arguments, inputs[held], targets[held])
    token, record = results["token"]
    assert record.kept and token[:, 1:].mean() < 0.985 * start[:, 1:].mean()
    assert token[:, 1:].mean() < 0.985 * results["stream"][0][:, 1:].mean()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt", "gemma3_text", "mistral"])
def test_a_prefix_under_its_own_arguments_is_the_whole_windows_beginning(arch: str) -> None:
    overrides = {"mistral": {"sliding_window": 8}, "gemma3_text": {"sliding_window": 8}}.get(arch, {})
    model = build_tiny_model(arch, **overrides)
    blocks = get_blocks(model, get_architecture(model))
    ids = random_ids(2, 32, seed=3)
    whole = capture_block_inputs(model, blocks, ids)
    prefix = capture_block_inputs(model, blocks, ids[:1, :12])
    with torch.no_grad():
        for index, block in enumerate(blocks):
            for x in whole.hidden_states:
                full = block_output(block(x, *whole.args[index], **whole.kwargs[index]))
                short = block_output(block(x[:, :12], *prefix.args[index], **prefix.kwargs[index]))
                torch.testing.assert_close(short, full[:, :12], rtol=1e-5, atol=1e-6)


def test_split_windows_are_the_pieces_run_as_windows_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``split`` each block trains on the training windows cut into pieces of ``tokens`` tokens: a
    piece's inputs are the quantized model's hidden states of the piece run alone (the tuned earlier
    blocks in place), its targets the original model's. The held-out windows stay whole: block 0's
    held-out error before tuning is the unsplit run's."""
    seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        windows = args[10] if len(args) > 10 else kwargs.get("windows")
        if windows is not None:
            seen.append((list(windows[0]), list(windows[1])))
        return tune_block(*args, **kwargs)

    monkeypatch.setattr(calibrate, "tune_block", spy)
    model = build_tiny_model("llama")
    original = copy.deepcopy(model)
    calibration = random_ids(8, 32, seed=1)
    spec = get_method("arb-group")
    config = dataclasses.replace(SIGNS, tokens=8, split=True)  # 6 training windows (2 held out), 4 pieces each
    records: list[BlockTuneRecord] = []
    quantize_model(model, get_architecture(model), calibration, spec, spec.make_config(group_size=32),
                   progress=False, tune=config, on_tune=records.append)  # fmt: skip
    pieces = calibration[:6].reshape(24, 8)
    with torch.no_grad():
        quantized = model(pieces, output_hidden_states=True).hidden_states
        unquantized = original(pieces, output_hidden_states=True).hidden_states
    assert len(seen) == 2 and all(len(inputs) == len(targets) == 24 for inputs, targets in seen)
    for block, (inputs, targets) in enumerate(seen):
        torch.testing.assert_close(torch.cat(inputs), quantized[block], rtol=1e-5, atol=1e-5)
        if block == 0:  # the last hidden state is after the final norm, not the block's output
            torch.testing.assert_close(torch.cat(targets), unquantized[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(torch.cat(seen[1][0]), unquantized[1])  # block 1 trains on the quantized stream
    for record in records:
        assert record.error_after <= record.error_before
    _, _, unsplit = tuned_run("arb-group", dataclasses.replace(SIGNS, tokens=8))
    assert records[0].error_before == unsplit[0].error_before


def test_the_first_and_last_blocks_take_their_own_steps() -> None:
    """``edge_steps`` replaces ``steps`` for the first and the last block only, patience scaled alike."""
    model = build_tiny_model("llama", num_hidden_layers=3)
    spec = get_method("arb-group")
    config = dataclasses.replace(FAST, steps=6, edge_steps=15, eval_every=3, patience=100)  # never stops early
    records: list[BlockTuneRecord] = []
    quantize_model(model, get_architecture(model), random_ids(8, 32, seed=1), spec, spec.make_config(group_size=32),
                   progress=False, tune=config, on_tune=records.append)  # fmt: skip
    assert [r.steps for r in records] == [15, 6, 15]
    assert for_block(config, 1, 3) is config and for_block(dataclasses.replace(config, edge_steps=0), 0, 3).steps == 6
    assert for_block(dataclasses.replace(FAST, steps=60, edge_steps=180, patience=4), 2, 3).patience == 12


def last_block_problem(seed: int = 0):
    """The last block of a tiny two-block llama on the original model's stream: its inputs and outputs per
    calibration window, its linears binarized per group of 32 (``rtn``), the token ids, and the model's head.
    The final norm's weight is raised so that the next-token distributions are peaked, as a trained model's."""
    model = build_tiny_model("llama", seed=seed)
    model.model.norm.weight.data *= 30
    arch = get_architecture(model)
    blocks = get_blocks(model, arch)
    ids = random_ids(8, 32, seed=1)
    captured = capture_block_inputs(model, blocks, ids)
    first, block = (captured.args[0], captured.kwargs[0]), blocks[1]
    arguments = (captured.args[1], captured.kwargs[1])
    with torch.no_grad():
        inputs = [block_output(blocks[0](x, *first[0], **first[1])) for x in captured.hidden_states]
        targets = [block_output(block(x, *arguments[0], **arguments[1])) for x in inputs]
    spec = get_method("rtn")
    config = spec.make_config(bits=1, group_size=32)
    linears = block_linears(block, arch)
    weights = {name: spec.quantize(linear.weight.data, None, config) for name, linear in linears.items()}
    return model, block, arguments, inputs, targets, weights, ids, ModelHead(model, arch)


def model_kl(model, weights: dict[str, QuantizedWeight], ids: torch.Tensor) -> float:
    """The mean next-token KL(original || with the last block's linears from ``weights``) over ``ids``' tokens."""
    overrides = {f"model.layers.1.{name}.weight": w.dequantize() for name, w in weights.items()}
    with torch.no_grad():
        expected = model(ids).logits.log_softmax(-1)
        got = functional_call(model, overrides, (ids,)).logits.log_softmax(-1)
    return float((expected.exp() * (expected - got)).sum(-1).mean())


def test_the_head_steps_fit_the_models_next_token_kl() -> None:
    """The head steps' held-out error is the model's next-token KL divergence against the original's, over
    the held-out windows' tokens; they lower it, more than as many steps on the token error do; the block
    error recorded is the kept weights'; the head's parameters stay as they were (no gradient kept, the
    same ``requires_grad``)."""
    model, block, arguments, inputs, targets, weights, ids, head = last_block_problem()
    held = slice(len(ids) - FAST.holdout, None)
    before_head = {name: p.detach().clone() for name, p in head.named_parameters()}
    config = dataclasses.replace(SIGNS, steps=0, head_steps=24, patience=8, lr=0.05, loss="token")
    tuned, record = tune_block(1, block, weights, inputs, targets, arguments, None, torch.device("cpu"), config,
                               torch.Generator().manual_seed(0), None, head)  # fmt: skip
    assert record.steps == 0 and record.head_steps == 24 and record.kept
    assert record.head_before == pytest.approx(model_kl(model, weights, ids[held]), rel=1e-4)
    assert record.head_after == pytest.approx(model_kl(model, tuned, ids[held]), rel=1e-4)
    assert record.head_after < 0.95 * record.head_before
    errors = token_errors_after(tuned, block, arguments, inputs[held], targets[held])
    assert record.error_after == pytest.approx(float(errors.mean()), rel=1e-4)
    plain = dataclasses.replace(config, steps=24, head_steps=0)
    token, _ = tune_block(1, block, weights, inputs, targets, arguments, None, torch.device("cpu"), plain,
                          torch.Generator().manual_seed(0))  # fmt: skip
    assert record.head_after < model_kl(model, token, ids[held])
    for name, p in head.named_parameters():
        assert torch.equal(p, before_head[name]) and p.requires_grad and p.grad is None


def test_only_the_last_block_takes_head_steps() -> None:
    """``--tune-head-steps`` adds steps to the last block only, after its own: every block's steps on the
    block error are those of a run without it, bit for bit; then the last block's held-out KL never rises."""
    runs = {}
    for head_steps in (0, 6):
        model = build_tiny_model("llama", num_hidden_layers=3)
        spec = get_method("arb-group")
        records: list[BlockTuneRecord] = []
        quantize_model(model, get_architecture(model), random_ids(8, 32, seed=1), spec,
                       spec.make_config(group_size=32), progress=False,
                       tune=dataclasses.replace(SIGNS, head_steps=head_steps), on_tune=records.append)  # fmt: skip
        runs[head_steps] = records
        assert model.lm_head.weight.grad is None and model.lm_head.weight.requires_grad
    plain, head = runs[0], runs[6]
    assert head[:2] == [dataclasses.replace(r, time_s=h.time_s) for r, h in zip(plain[:2], head[:2], strict=True)]
    assert (head[2].error_before, head[2].steps) == (plain[2].error_before, plain[2].steps)
    assert head[2].head_steps > 0 and head[2].head_after <= head[2].head_before
    assert all(r.head_before is None for r in [*plain, *head[:2]])


def test_config_errors_are_one_line() -> None:
    with pytest.raises(BinqError, match="--tune-lr must be a positive number"):
        TuneConfig(lr=0.0)
    with pytest.raises(BinqError, match="--tune-batch must be an integer >= 1"):
        TuneConfig(batch=0)
    with pytest.raises(BinqError, match="--tune-edge-steps must be an integer >= 0"):
        TuneConfig(edge_steps=-1)
    assert tune_options(TuneConfig(edge_steps=180)) == ["--tune", "--tune-edge-steps", "180"]
    with pytest.raises(BinqError, match="--tune-target must be one of original, quantized"):
        TuneConfig(target="both")
    with pytest.raises(BinqError, match="--tune-loss must be one of stream, token"):
        TuneConfig(loss="window")
    assert tune_options(TuneConfig(loss="token")) == ["--tune", "--tune-loss", "token"]
    with pytest.raises(BinqError, match="--tune-sign-lr must be a positive number"):
        TuneConfig(signs=True, sign_lr=-1.0)
    with pytest.raises(BinqError, match="--tune-sign-lr applies to --tune-signs: add --tune-signs"):
        TuneConfig(sign_lr=0.5)
    assert tune_options(TuneConfig(signs=True, sign_lr=0.1)) == ["--tune", "--tune-signs", "--tune-sign-lr", "0.1"]
    with pytest.raises(BinqError, match="--tune-split cuts windows into --tune-tokens tokens"):
        TuneConfig(split=True, tokens=0)
    with pytest.raises(BinqError, match="--tune-split cuts 128-token windows into 128-token ones"):
        TuneConfig(split=True, tokens=128).check_run(8, 1, 128)
    assert tune_options(TuneConfig(split=True, tokens=64)) == ["--tune", "--tune-tokens", "64", "--tune-split"]
    with pytest.raises(BinqError, match="--tune-head-steps must be an integer >= 0"):
        TuneConfig(head_steps=-1)
    assert tune_options(TuneConfig(head_steps=30)) == ["--tune", "--tune-head-steps", "30"]
    with pytest.raises(BinqError, match="--tune-holdout 8 leaves none of the 8 calibration windows"):
        TuneConfig(holdout=8).check_windows(8)
    assert tune_options(TuneConfig()) == ["--tune"]
    assert tune_options(dataclasses.replace(TuneConfig(), steps=5, target="quantized")) == [
        "--tune", "--tune-steps", "5", "--tune-target", "quantized",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def texts(text_file: Callable[[int, int], Path]) -> tuple[Path, Path]:
    return text_file(2000, 1), text_file(300, 2)


@pytest.fixture
def folder(save_tiny_model: Callable[..., Path]) -> Path:
    return save_tiny_model("llama", edit=lambda model: model.half(), num_hidden_layers=3)


def api_run(folder: Path, texts: tuple[Path, Path], stream: bool, out: Path):
    calibration = CalibrationConfig(source=str(texts[0]), nsamples=6, seqlen=24)
    evaluation = EvaluationConfig(sets=(str(texts[1]),), seqlen=24, windows=3)
    return binq.quantize(
        str(folder), "arb-group", {"group_size": 32}, calibration=calibration, evaluation=evaluation,
        progress=False, out=out, stream=stream, tune=dataclasses.replace(FAST, tokens=12, head_steps=4),
    )  # fmt: skip


def test_streamed_and_in_memory_tuned_runs_agree_bit_for_bit(
    folder: Path, texts: tuple[Path, Path], tmp_path: Path
) -> None:
    streamed = api_run(folder, texts, True, tmp_path / "streamed")
    whole = api_run(folder, texts, False, tmp_path / "whole")
    assert streamed.model.streamed and not whole.model.streamed
    drop = lambda blocks: [{k: v for k, v in b.items() if k != "time_s"} for b in blocks]  # noqa: E731
    assert drop(streamed.report["tuning"]["blocks"]) == drop(whole.report["tuning"]["blocks"])
    assert streamed.evaluations == whole.evaluations
    with open_tensors(tmp_path / "streamed") as (entries, get):
        a = {name: get(name) for name in entries}
    with open_tensors(tmp_path / "whole") as (entries, get):
        b = {name: get(name) for name in entries}
    assert tensor_digest(a) == tensor_digest(b)
    report = whole.report
    assert report["label"] == "arb-group g32 tuned"
    assert report["tuning"]["config"]["tokens"] == 12 and len(report["tuning"]["blocks"]) == 3
    assert "--tune" in report["command"] and report["command"][report["command"].index("--tune-tokens") + 1] == "12"
    assert [b["head_before"] is not None for b in report["tuning"]["blocks"]] == [False, False, True]  # the last


def cli_argv(folder: Path, texts: tuple[Path, Path], out: Path, *options: str) -> list[str]:
    return [
        "quantize", "--model", str(folder), "--method", "arb-group", "--group-size", "32", "--calib", str(texts[0]),
        "--nsamples", "4", "--seqlen", "24", "--eval", str(texts[1]), "--eval-windows", "2", "--no-progress",
        "--out", str(out), *options,
    ]  # fmt: skip


def test_the_cli_prints_a_line_per_tuned_block(
    folder: Path, texts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = cli_argv(folder, texts, tmp_path / "out", "--tune", "--tune-steps", "4", "--tune-holdout", "1")
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "tuned block" in line]
    assert len(lines) == 3 and all("held-out block error" in line for line in lines)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [b["block"] for b in report["tuning"]["blocks"]] == [0, 1, 2]


BAD_OPTIONS = {
    "steps without --tune": (["--tune-steps", "5"], "--tune-steps applies to --tune: add --tune"),
    "holdout of every window": (["--tune", "--tune-holdout", "4"], "--tune-holdout 4 leaves none of the 4"),
    "zero learning rate": (["--tune", "--tune-lr", "0"], "--tune-lr must be a positive number"),
    "negative tokens": (["--tune", "--tune-tokens", "-1"], "--tune-tokens must be an integer >= 0"),
    "several processes": (["--tune", "--nproc", "2"], "--tune runs in one process: leave out --nproc"),
    "signs without --tune": (["--tune-signs"], "--tune-signs applies to --tune: add --tune"),
    "sign rate without signs": (["--tune", "--tune-sign-lr", "0.1"], "--tune-sign-lr applies to --tune-signs"),
    "loss without --tune": (["--tune-loss", "token"], "--tune-loss applies to --tune: add --tune"),
    "split without --tune": (["--tune-split"], "--tune-split applies to --tune: add --tune"),
    "split of whole windows": (["--tune", "--tune-split", "--tune-tokens", "0"], "--tune-split cuts windows into"),
    "split longer than a window": (
        ["--tune", "--tune-split", "--tune-tokens", "24", "--tune-holdout", "1"],
        "--tune-split cuts 24-token",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_tune_options_are_one_line_errors(
    case: str, folder: Path, texts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options, message = BAD_OPTIONS[case]
    assert main(cli_argv(folder, texts, tmp_path / "out", *options)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize(
    "tune", [FAST, SIGNS, dataclasses.replace(SIGNS, head_steps=6)], ids=["scales", "signs", "head steps"]
)
def test_a_tuned_arb_group_still_exports_to_q1_0_exactly(tmp_path: Path, tune: TuneConfig) -> None:
    model = build_tiny_model("llama", **WIDE)
    spec = get_method("arb-group")
    config = spec.make_config(group_size=128)
    records: list[BlockTuneRecord] = []
    result = quantize_model(
        model, get_architecture(model), random_ids(6, 16), spec, config, progress=False, tune=tune,
        on_tune=records.append,
    )  # fmt: skip
    assert any(r.kept for r in records)
    save_checkpoint(model, result.weights, tmp_path / "ckpt", tokenizer=byte_level_bpe_tokenizer(), method="arb-group",
                    dtype=torch.float16)  # fmt: skip
    reader = gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "model.gguf"))
    for block in range(2):
        down = gguf_tensor(reader, f"blk.{block}.ffn_down.weight")
        assert down.tensor_type == gguf.GGMLQuantizationType.Q1_0
        stored = torch.from_numpy(np.array(down.data)).reshape(128, -1)
        weight = result.weights[f"model.layers.{block}.mlp.down_proj"]
        assert torch.equal(dequantize_q1_0(stored, 256), weight.dequantize())


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_llama_cpp_runs_a_tuned_q1_0_export(tmp_path: Path) -> None:
    """llama.cpp computes the tuned model from its Q1_0 export (its activations rounded to 8 bits, so not
    bit for bit): its logits follow binq's tuned model far closer than the original's."""
    model = build_tiny_model("llama", **WIDE)
    ids = [5, 17, 40, 99, 120, 3, 60, 70]
    with torch.no_grad():
        original = model(torch.tensor([ids])).logits[0]
    spec = get_method("arb-group")
    records: list[BlockTuneRecord] = []
    result = quantize_model(
        model, get_architecture(model), random_ids(6, 16), spec, spec.make_config(group_size=128), progress=False,
        tune=FAST, on_tune=records.append,
    )  # fmt: skip
    assert all(r.kept for r in records)
    with torch.no_grad():
        tuned = model(torch.tensor([ids])).logits[0]
    save_checkpoint(model, result.weights, tmp_path / "ckpt", tokenizer=byte_level_bpe_tokenizer(), method="arb-group")
    out = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert_llama_cpp_follows(out, ids, tuned, original)
