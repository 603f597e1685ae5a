"""A(1x4): per-token INT quantization, bit planes, clipping and smoothing searches, folding, evaluation hooks."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from binq.activations import (
    ActivationConfig,
    ActivationSwap,
    activation_storage_bits,
    bit_planes,
    calibrate_activations,
    codes_from_planes,
    fake_quantize,
    quantize_per_token,
    quantized_activations,
)
from binq.activations.int4 import token_scale_fake_quantize
from binq.activations.smoothing import (
    CLIP_RATIOS,
    fold_smoothing,
    quantized_output_error,
    search_clip_ratio,
    search_smoothing,
    smoothing_factors,
    two_group_proxy,
)
from binq.cli import main
from binq.errors import BinqError
from binq.evaluation import WeightSwap
from binq.models import block_linears, get_architecture, get_blocks


def _activations(tokens: int = 64, features: int = 48, seed: int = 0) -> torch.Tensor:
    """LLM-like inputs: a few outlier channels, and per-token scale changes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=gen) * (torch.rand(tokens, 1, generator=gen) + 0.2)
    x[:, :3] *= 20
    return x


# ------------------------------------------------------------------------------------------ INT4 format


def test_bit_planes_reconstruct_every_code_exactly() -> None:
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)
    planes = bit_planes(codes, 4)
    assert planes.shape == (4, 3, 32) and planes.dtype == torch.bool
    assert torch.equal(codes_from_planes(planes), codes)
    # Plane k is bit k: 13 = 0b1101.
    assert [bool(planes[k, 0, 13]) for k in range(4)] == [True, False, True, True]
    quantized = quantize_per_token(_activations(), 4)
    assert torch.equal(codes_from_planes(bit_planes(quantized.codes)), quantized.codes)
    # x^ = s (sum_k 2^k p_k - z) exactly.
    planes = bit_planes(quantized.codes).to(torch.float64)
    rebuilt = quantized.scale.double() * (sum(2**k * planes[k] for k in range(4)) - quantized.zero.double())
    assert torch.equal(rebuilt, quantized.dequantize().double())


@pytest.mark.parametrize("sym", [False, True])
def test_per_token_int4_grid(sym: bool) -> None:
    x = _activations()
    x[5] = x[5].abs() + 1  # an all-positive token
    quantized = quantize_per_token(x, 4, sym)
    assert int(quantized.codes.max()) <= 15
    zero = quantized.zero
    assert torch.equal(zero, zero.round()) and ((zero >= 0) & (zero <= 15)).all()
    if sym:
        assert (zero == 8).all()
    else:
        assert zero[5].item() == 0  # nothing negative to represent
    # Without clipping every value is within half a step (the fp16-rounded scale can widen the range).
    error = (quantized.dequantize() - x).abs()
    assert (error <= quantized.scale * 0.5 * (1 + 1e-3) + 1e-6).all()
    # Zero is exactly representable in the asymmetric grid (zero point): exact zeros stay zero.
    x[3, 7] = 0.0
    assert fake_quantize(x, 4, sym)[3, 7].item() == 0.0
    # At most 16 levels per token.
    assert all(len(torch.unique(row)) <= 16 for row in quantized.dequantize())


def test_clipping_shrinks_the_scale() -> None:
    x = _activations()
    full, clipped = quantize_per_token(x, 4, clip_ratio=1.0), quantize_per_token(x, 4, clip_ratio=0.8)
    torch.testing.assert_close(clipped.scale, full.scale * 0.8, rtol=2e-3, atol=0)


def test_activation_storage_bits() -> None:
    assert activation_storage_bits(576, 4, sym=False) == 4 + 20 / 576
    assert activation_storage_bits(576, 4, sym=True) == 4 + 16 / 576


def test_token_scale_reading_is_per_token_no_worse_than_any_fixed_ratio() -> None:
    x = _activations()
    best = token_scale_fake_quantize(x, 4, False, CLIP_RATIOS)
    best_error = (best - x).square().sum(-1)
    for ratio in CLIP_RATIOS:
        assert (best_error <= (fake_quantize(x, 4, False, ratio) - x).square().sum(-1) + 1e-9).all()


# ------------------------------------------------------------------------------------------ searches


def test_clip_search_returns_the_ratio_of_smallest_output_error() -> None:
    x = _activations(seed=1)
    weights = [torch.randn(16, 48, generator=torch.Generator().manual_seed(3))]
    ratio = search_clip_ratio(x, weights, lambda t, r: fake_quantize(t, 4, False, r))
    errors = {r: quantized_output_error(x, weights, lambda t, r=r: fake_quantize(t, 4, False, r)) for r in CLIP_RATIOS}
    assert errors[ratio] == min(errors.values())


def test_smoothing_search_is_the_best_candidate_and_never_worse_than_none() -> None:
    x = _activations(seed=2)
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(32, 48, generator=gen) * 0.05, torch.randn(24, 48, generator=gen) * 0.05]

    def act_quant(t: torch.Tensor) -> torch.Tensor:
        return fake_quantize(t, 4)

    choice = search_smoothing(x, weights, act_quant, two_group_proxy)
    assert choice.error <= choice.error_unsmoothed
    # With outlier channels, smoothing helps here; the choice is the best of the grid.
    assert choice.factors is not None and choice.error < choice.error_unsmoothed
    amax_x, amax_w = x.abs().amax(0), torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    for alpha in (0.0, 0.3, 0.5, 0.8, 1.0):
        factors = smoothing_factors(amax_x, amax_w, alpha)
        assert choice.error <= quantized_output_error(x, weights, act_quant, factors, two_group_proxy) + 1e-9
    # Without quantization anywhere the smoothed layer computes the same thing.
    exact = quantized_output_error(x, weights, lambda t: t, choice.factors)
    assert exact < 1e-6 * float(sum((x @ w.T).square().sum() for w in weights))


def test_fold_into_a_norm_and_into_a_producing_linear_keeps_outputs() -> None:
    torch.manual_seed(0)
    norm, consumer = nn.LayerNorm(12), nn.Linear(12, 5)
    norm.weight.data.uniform_(0.5, 2)
    norm.bias.data.normal_()
    x = torch.randn(7, 12)
    before = consumer(norm(x))
    factors = torch.rand(12) * 4 + 0.1
    fold_smoothing(norm, [consumer], factors)
    torch.testing.assert_close(consumer(norm(x)), before, rtol=1e-5, atol=1e-5)
    up, gate, down = nn.Linear(12, 9, bias=False), nn.Linear(12, 9, bias=False), nn.Linear(9, 4, bias=False)
    before = down(torch.nn.functional.silu(gate(x)) * up(x))
    fold_smoothing(up, [down], torch.rand(9) * 4 + 0.1)
    torch.testing.assert_close(down(torch.nn.functional.silu(gate(x)) * up(x)), before, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ on a model


@pytest.fixture
def llama_and_ids(make_tiny_model: Callable[..., nn.Module], make_ids: Callable[..., torch.Tensor]):
    model = make_tiny_model("llama", seed=1)
    with torch.no_grad():  # LLM-like outlier channels in the residual stream, for the smoothing to act on
        model.model.embed_tokens.weight[:, :4] *= 30
    return model, make_ids(4, 16, seed=1)


def test_channel_smoothing_folded_into_the_norms_leaves_the_model_unchanged(llama_and_ids) -> None:
    model, ids = llama_and_ids
    arch = get_architecture(model)
    with torch.no_grad():
        before = model(ids).logits
    norms = [block.input_layernorm.weight.clone() for block in get_blocks(model, arch)]
    config = ActivationConfig(bits=4, smooth="channel", calib_tokens=64)
    plan = calibrate_activations(model, arch, ids, config, progress=False)
    assert any(alpha is not None for alpha in plan.smoothing_alphas.values())
    changed = [
        not torch.equal(n, b.input_layernorm.weight) for n, b in zip(norms, get_blocks(model, arch), strict=True)
    ]
    assert any(changed)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert len(plan.clip_ratios) == 2 * len(arch.linear_names)
    assert set(plan.clip_ratios.values()) <= set(CLIP_RATIOS)


def test_smoothing_refused_where_no_norm_can_absorb_it(make_tiny_model: Callable[..., nn.Module], make_ids) -> None:
    model = make_tiny_model("gemma")
    with pytest.raises(BinqError, match="not supported for gemma"):
        calibrate_activations(
            model, get_architecture(model), make_ids(2, 8), ActivationConfig(bits=4, smooth="channel")
        )


def test_auto_smoothing_is_channel_where_a_norm_can_absorb_it_and_none_elsewhere(
    llama_and_ids, make_tiny_model: Callable[..., nn.Module], make_ids
) -> None:
    model, ids = llama_and_ids
    plan = calibrate_activations(
        model, get_architecture(model), ids, ActivationConfig(bits=4, calib_tokens=64), progress=False
    )
    assert plan.config.smooth == "channel" and plan.smoothing_alphas
    gemma = make_tiny_model("gemma")
    plan = calibrate_activations(
        gemma, get_architecture(gemma), make_ids(2, 8), ActivationConfig(bits=4), progress=False
    )
    assert plan.config.smooth == "none" and not plan.smoothing_alphas and plan.clip_ratios


def test_evaluation_hooks_quantize_inputs_and_the_swap_restores_full_precision(llama_and_ids) -> None:
    model, ids = llama_and_ids
    arch = get_architecture(model)
    with torch.no_grad():
        reference = model(ids).logits
    plan = calibrate_activations(model, arch, ids, ActivationConfig(bits=4, clip="0.9", smooth="none"), progress=False)
    seen: list[torch.Tensor] = []
    linear = block_linears(get_blocks(model, arch)[0], arch)["mlp.down_proj"]
    with quantized_activations(model, arch, plan) as hooks, torch.no_grad():
        probe = linear.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        quantized = model(ids).logits
        swap = ActivationSwap(WeightSwap({}), hooks)
        with swap.original():
            original = model(ids).logits
        probe.remove()
    # The probe runs after the quantizing hook: the linear saw 16-level tokens.
    assert all(len(torch.unique(row)) <= 16 for row in seen[0].reshape(-1, seen[0].shape[-1]))
    assert not torch.allclose(quantized, reference, atol=1e-3)
    assert torch.equal(original, reference)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)  # hooks removed on exit


def test_config_errors() -> None:
    with pytest.raises(BinqError, match="--act-clip"):
        ActivationConfig(bits=4, clip="max")
    with pytest.raises(BinqError, match="--act-clip"):
        ActivationConfig(bits=4, clip="1.5")
    with pytest.raises(BinqError, match="--smooth"):
        ActivationConfig(bits=4, smooth="rotate")
    assert not ActivationConfig().enabled and not ActivationConfig(bits=4, clip="1.0", smooth="none").needs_calibration
    assert ActivationConfig(bits=4, clip="1.0").needs_calibration  # the default smoothing (auto) searches


# ------------------------------------------------------------------------------------------ command line


def test_cli_w11_a4_report_and_eval(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, text_file: Callable[[int, int], Path], tmp_path: Path
) -> None:
    calib, text = text_file(2000, 1), text_file(300, 2)
    common = ["--model", str(tiny_llama_folder), "--calib", str(calib), "--nsamples", "2", "--seqlen", "16"]
    common += ["--eval", str(text), "--eval-windows", "3", "--no-progress"]
    out = tmp_path / "run"
    argv = ["quantize", *common, "--method", "w11", "--act-bits", "4", "--smooth", "channel", "--out", str(out)]
    assert main([*argv, "--no-layer-table"]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["label"] == "w11 A4"
    activations = report["activations"]
    assert activations["storage_bits"] == pytest.approx(4 + 20 / 64)
    assert activations["config"]["smooth"] == "channel"
    ppl = report["ppl"][str(text)]
    assert math.isfinite(ppl["quantized"]) and report["kl"][str(text)] > 0
    # W16A4: the unquantized model with quantized activations, KL to full-precision activations.
    capsys.readouterr()
    assert main(["eval", *common, "--act-bits", "4", "--act-clip", "1.0"]) == 0
    line = capsys.readouterr().out
    assert "KL" in line and "PPL" in line
