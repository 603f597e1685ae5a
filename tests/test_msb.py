"""MSB: the structured weight, its honest bits, the calibration-free and Hessian methods, the independent path."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from binq.cli import main
from binq.engine.independent import quantize_independent, relative_weight_error
from binq.errors import BinqError
from binq.methods import get_method
from binq.methods.msb import MSBConfig, MSBHessianConfig, quantize_msb, quantize_msb_hessian
from binq.models import ARCHITECTURES, block_linears, get_blocks
from binq.quant.grouping import labels_to_boundaries, partition_cost, solve_dp
from binq.quant.hessian import relative_output_error
from binq.quant.multiscale import MultiScaleWeight
from binq.quant.structured import layout_class


def _weight(rows: int = 48, cols: int = 200, seed: int = 0, zeros: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02
    if zeros:
        w[3, :] = 0  # a whole row (and so whole blocks) of zeros
        w[7, 5:40] = 0
        w[:, 11] = 0
        w[torch.rand(rows, cols, generator=generator) < 0.01] = 0
    return w


def _hessian(cols: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(cols) + torch.randn(cols, 6, generator=generator) @ torch.randn(6, cols, generator=generator) / 3
    x = torch.randn(1024, cols, generator=generator) @ mixing
    return 2 * x.T @ x / 1024


CONFIGS = [
    MSBConfig(groups=8),
    MSBConfig(groups=8, solver="dp", granularity="row"),
    MSBConfig(groups=6, granularity="row", solver="greedy", criterion="ward"),
    MSBConfig(groups=4, granularity="block", block_size=64),
    MSBConfig(groups=4, granularity="block", block_size=64, normalized_lambda=True, lambda_reg=0.5),
    MSBConfig(groups=1, granularity="block", block_size=32),
    MSBConfig(groups=8, solver="windowed-lo", window=16),
]


def _unit_ids(q: MultiScaleWeight) -> torch.Tensor:
    rows, cols = q.shape
    row_unit = torch.arange(rows).unsqueeze(1) if q.scales.shape[0] > 1 else torch.zeros(rows, 1, dtype=torch.long)
    return row_unit * q.scales.shape[1] + (torch.arange(cols) // q.block_size).unsqueeze(0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.granularity}-{c.solver}-g{c.groups}")
def test_dequantizes_to_sign_times_group_mean(config: MSBConfig) -> None:
    w = _weight()
    q = quantize_msb(w, None, config)
    deq = q.dequantize()
    zero = w == 0
    assert (deq[zero] == 0).all() and (deq[~zero] != 0).all()  # exact zeros stay zero, nothing else is
    assert (torch.sign(deq[~zero]) == torch.sign(w[~zero])).all()
    # Oracle: each scale is the fp16 mean |w| of the non-zero weights sharing its unit and group index.
    units = _unit_ids(q)[~zero]
    index = q.group_index.long()[~zero]
    key = units * q.groups + index
    sums = torch.zeros(q.scales.numel(), dtype=torch.float64).index_add_(0, key, w[~zero].abs().double())
    counts = torch.bincount(key, minlength=q.scales.numel())
    used = counts > 0
    expected = (sums[used] / counts[used]).half()
    assert torch.equal(q.scales.reshape(-1)[used], expected)
    assert torch.equal(deq.abs()[~zero], expected.float()[torch.searchsorted(torch.nonzero(used).flatten(), key)])
    assert q.groups <= config.groups


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.granularity}-{c.solver}-g{c.groups}")
def test_groups_are_magnitude_bands(config: MSBConfig) -> None:
    # Within a unit, a larger group index never holds a smaller magnitude than a smaller index.
    w = _weight()
    q = quantize_msb(w, None, config)
    units, index, mags = _unit_ids(q), q.group_index.long(), w.abs()
    nonzero = w != 0
    for unit in torch.unique(units[nonzero])[:40]:
        member = (units == unit) & nonzero
        for g in torch.unique(index[member])[:-1]:
            lower, upper = mags[member & (index == g)], mags[member & (index > g)]
            assert lower.max() <= upper.min()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.granularity}-{c.solver}-g{c.groups}")
def test_round_trip_through_packed_planes(config: MSBConfig) -> None:
    q = quantize_msb(_weight(), None, config)
    tensors, meta = q.packed_tensors(), json.loads(json.dumps(q.metadata()))
    back = layout_class("multiscale").from_packed(tensors, meta)
    assert torch.equal(back.dequantize(), q.dequantize())
    assert torch.equal(back.group_index, q.group_index) and torch.equal(back.signs, q.signs)
    rows, cols = q.shape
    bits = math.ceil(math.log2(q.groups)) if q.groups > 1 else 0
    index_bytes = rows * math.ceil(cols * bits / 8)
    assert ("group_index" in tensors) == (bits > 0)
    zeros = int((_weight() == 0).sum())
    expected = 8 * (rows * math.ceil(cols / 8) + index_bytes + 2 * q.scales.numel() + 4 * zeros)
    assert q.storage_bits_total == expected


def test_local_optimisation_lowers_the_weight_error() -> None:
    # Per tensor with lambda 0 the objective is the squared weight error (up to fp16 scales): LO lowers it.
    w = _weight()
    errors = {}
    for solver in ("windowed", "windowed-lo"):
        q = quantize_msb(w, None, MSBConfig(groups=8, solver=solver, window=16, lambda_reg=0.0))
        errors[solver] = float(((q.dequantize() - w) ** 2).sum())
    assert errors["windowed-lo"] < 0.99 * errors["windowed"]


def test_storage_bits_are_honest() -> None:
    w = _weight(256, 512, zeros=False)
    tensor = quantize_msb(w, None, MSBConfig(groups=32))
    n = w.numel()
    assert tensor.groups == 32
    assert tensor.storage_bits == pytest.approx(1 + 5 + 16 * 32 / n)  # signs, 5-bit index, 32 fp16 scales
    assert tensor.compute_bits == 6.0
    figures = tensor.extra_bit_figures()
    assert figures["paper_convention_bits"] == pytest.approx(1 + 16 * 32 / n)  # the first version's 1.00x
    counts = torch.bincount(tensor.group_index.reshape(-1).long()).double()
    p = counts[counts > 0] / n
    assert figures["index_entropy_bits"] == pytest.approx(float(-(p * p.log2()).sum()))
    assert 0 < figures["index_entropy_bits"] < 5
    block = quantize_msb(w, None, MSBConfig(groups=4, granularity="block"))
    assert block.storage_bits == pytest.approx(4.0)  # the later version's "4-bit block-wise": 1 + 2 + 16*4/64
    assert block.extra_bit_figures()["paper_convention_bits"] == pytest.approx(2.0)


def test_block_units_are_solved_exactly() -> None:
    # Batched block-wise DP (units bucketed by their count of zeros) = the DP run on each block alone.
    w = _weight(8, 128)
    config = MSBConfig(groups=4, granularity="block", block_size=64, lambda_reg=1e-5)
    q = quantize_msb(w, None, config)
    for r in range(8):
        for b in range(2):
            block = w[r, 64 * b : 64 * (b + 1)].double().numpy()
            a = np.sort(np.abs(block[block != 0]))
            if a.size == 0:
                continue
            optimum = partition_cost(a, labels_to_boundaries(solve_dp(a, 4, 1e-5)), 1e-5)
            index = q.group_index[r, 64 * b : 64 * (b + 1)].numpy()[block != 0]
            ordered = index[np.argsort(np.abs(block[block != 0]), kind="stable")]
            assert partition_cost(a, labels_to_boundaries(ordered), 1e-5) == pytest.approx(optimum, rel=1e-12)


def test_lambda_auto_and_validation() -> None:
    assert MSBConfig().lam == 0.75 and MSBConfig(granularity="block").lam == 0.0
    assert MSBConfig(lambda_reg=0.1, granularity="block").lam == 0.1
    for bad in ({"granularity": "column"}, {"solver": "exact"}, {"groups": 0}, {"groups": 300}, {"lambda_reg": -2.0}):
        with pytest.raises(BinqError):
            MSBConfig(**bad)
    with pytest.raises(BinqError, match="refit"):
        MSBHessianConfig(refit_iterations=-1)
    assert get_method("msb").calibration_free and not get_method("msb-hessian").calibration_free


def test_from_packed_names_the_bad_tensor() -> None:
    q = quantize_msb(_weight(), None, MSBConfig(groups=8))
    tensors, meta = q.packed_tensors(), q.metadata()
    cls = layout_class("multiscale")
    for name in ("signs", "group_index", "scales"):
        missing = {k: v for k, v in tensors.items() if k != name}
        with pytest.raises(BinqError, match=name):
            cls.from_packed(missing, meta)
        short = dict(tensors, **{name: tensors[name][..., :-1]})
        with pytest.raises(BinqError, match=name):
            cls.from_packed(short, meta)
    with pytest.raises(BinqError, match="zero_positions"):
        cls.from_packed(dict(tensors, zero_positions=tensors["zero_positions"].long()), meta)
    with pytest.raises(BinqError, match="groups"):
        cls.from_packed(tensors, dict(meta, groups=0))
    with pytest.raises(BinqError, match="unexpected"):
        cls.from_packed(dict(tensors, extra=tensors["signs"]), meta)


def test_hessian_variant_with_identity_hessian_is_no_worse() -> None:
    # With H = I there is nothing to compensate: nearest-level rounding plus the least-squares scales
    # can only improve on the contiguous partition with mean scales.
    w = _weight(32, 128, zeros=False)
    for config in (MSBHessianConfig(groups=8), MSBHessianConfig(groups=4, granularity="block")):
        calibration_free = relative_weight_error(w, quantize_msb(w, None, config).dequantize())
        hessian = relative_weight_error(w, quantize_msb_hessian(w, torch.eye(128), config).dequantize())
        assert hessian <= calibration_free + 1e-9


def test_hessian_variant_lowers_the_output_error() -> None:
    w, h = _weight(32, 128, zeros=False), _hessian(128)
    for granularity, groups in (("tensor", 8), ("block", 4)):
        base = MSBHessianConfig(groups=groups, granularity=granularity)
        plain = relative_output_error(w, quantize_msb(w, None, base).dequantize(), h)
        compensated = quantize_msb_hessian(
            w, h, MSBHessianConfig(groups=groups, granularity=granularity, refit_iterations=0)
        )
        refit = quantize_msb_hessian(w, h, base)
        no_refit_error = relative_output_error(w, compensated.dequantize(), h)
        refit_error = relative_output_error(w, refit.dequantize(), h)
        assert refit_error <= no_refit_error < plain
        assert refit.storage_bits == compensated.storage_bits  # same codebook layout, only the scales move


def test_hessian_variant_zeroes_dead_columns() -> None:
    w, h = _weight(16, 64, zeros=False), _hessian(64)
    h[5, :], h[:, 5] = 0, 0
    q = quantize_msb_hessian(w, h, MSBHessianConfig(groups=4, granularity="block", block_size=32))
    assert (q.dequantize()[:, 5] == 0).all()
    assert torch.equal(
        layout_class("multiscale").from_packed(q.packed_tensors(), q.metadata()).dequantize(), q.dequantize()
    )


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    arch = ARCHITECTURES["llama"]
    return [
        lin.weight.detach().clone() for block in get_blocks(model, arch) for lin in block_linears(block, arch).values()
    ]


def test_independent_path_in_workers_matches_in_process(make_tiny_model: Callable[..., nn.Module]) -> None:
    arch = ARCHITECTURES["llama"]
    method, config = get_method("msb"), MSBConfig(groups=4, granularity="row")
    results = []
    for workers in (1, 2):
        model = make_tiny_model("llama")
        original = _linear_weights(model)
        seen = []
        result = quantize_independent(model, arch, method, config, workers, seen.append, progress=False)
        results.append((result, _linear_weights(model)))
        assert [(r.block, r.name) for r in result.records] == [(b, n) for b in range(2) for n in arch.linear_names]
        assert sorted((r.block, r.name) for r in seen) == sorted((r.block, r.name) for r in result.records)
        for before, after, record in zip(original, results[-1][1], result.records, strict=True):
            assert not torch.equal(before, after)
            assert record.relative_error == pytest.approx(relative_weight_error(before, after))
            assert record.storage_bits == pytest.approx(1 + 2 + 16 * 4 / before.shape[1])
    (one, one_weights), (two, two_weights) = results
    assert all(torch.equal(a, b) for a, b in zip(one_weights, two_weights, strict=True))
    assert [r.storage_bits_total for r in one.records] == [r.storage_bits_total for r in two.records]
    with pytest.raises(BinqError, match="calibration"):
        quantize_independent(make_tiny_model("llama"), arch, get_method("gptq"), None, 1, progress=False)


def test_cli_runs_msb_without_calibration(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, text_file: Callable[[int, int], Path], tmp_path: Path
) -> None:
    eval_text = text_file(300, 2)
    argv = ["quantize", "--model", str(tiny_llama_folder), "--method", "msb", "--groups", "8"]
    argv += ["--calib", str(tmp_path / "absent.txt"), "--seqlen", "32", "--eval", str(eval_text), "--eval-windows", "2"]
    argv += ["--workers", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["calibration"]["tokens"] == 0  # the calibration file is never read
    assert report["engine"] == {"path": "independent", "workers": 1, "streamed": True}
    assert report["method"]["config"]["groups"] == 8
    assert report["compute_bits"] == 4.0 and 4.0 < report["storage_bits"]["linear"] < 4.05  # + 8 scales a matrix
    extra = report["extra_bits"]["linear"]
    assert 0 < extra["index_entropy_bits"] < 3
    # The paper's figure is the storage figure minus the 3-bit index plane, which it leaves out.
    assert extra["paper_convention_bits"] == pytest.approx(report["storage_bits"]["linear"] - 3)
    assert "paper's convention" in out and "not stored" in out
