"""The ARB family: the paper's monotonicity results, ARB-X's statistic, CGB's zones, layouts and bits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from binq.engine.hessian import HessianAccumulator
from binq.methods import get_method
from binq.methods.arb import ARBConfig, ARBRCConfig, ARBXConfig, block_zones, fit_zone
from binq.methods.arb_group import ARBGroupConfig, quantize_arb_group
from binq.quant.arb import (
    arb_fit,
    arb_x_refine,
    metric_loss,
    rc_fit,
    weight_space_loss,
)
from binq.quant.binarize import residual_binarize


def _weight(rows: int = 48, cols: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Heavy-ish tails and a per-row offset, like LLM weights.
    w = torch.randn(rows, cols, generator=gen) * (1 + 3 * (torch.rand(rows, cols, generator=gen) > 0.95))
    return w + 0.3 * torch.randn(rows, 1, generator=gen)


def _mask(rows: int = 48, cols: int = 64, seed: int = 1, p: float = 0.6) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < p


def _hessian(cols: int, tokens: int = 2048, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen) @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=gen))
    x[:, : max(1, cols // 10)] *= 4  # a few outlier channels, as in real activations
    return 2 * x.T @ x / tokens


def _non_increasing(values: list[float], rel: float = 1e-6) -> bool:
    return all(b <= a * (1 + rel) + 1e-9 for a, b in itertools.pairwise(values))


# ---------------------------------------------------------------------------------------- Theorem 1


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arb_weight_space_loss_never_increases_over_iterations(order: int, seed: int) -> None:
    w, mask = _weight(seed=seed), _mask(seed=seed + 10)
    losses = [float(weight_space_loss(w, arb_fit(w, mask, order, k))) for k in range(16)]
    assert _non_increasing(losses)
    assert losses[-1] < losses[0]  # the refinement does something on non-trivial data


def test_arb_with_no_iterations_is_billms_binarizer() -> None:
    w, mask = _weight(), _mask()
    for order in (1, 2):
        expected, _ = residual_binarize(w, mask, order, rounded=False)
        assert torch.allclose(arb_fit(w, mask, order, 0).approximation(), expected, atol=1e-6)


def test_first_order_arb_matches_theorem_1_closed_form() -> None:
    # L1^tau = L1^0 - m((a^tau)^2 - (a^0)^2 - (mu^tau - mu^0)^2), summed over rows, on a full mask.
    w = _weight()
    mask = torch.ones_like(w, dtype=torch.bool)
    start, end = arb_fit(w, mask, 1, 0), arb_fit(w, mask, 1, 15)
    m = w.shape[1]
    predicted = (
        weight_space_loss(w, start)
        - m * (end.row_scales[0].square() - start.row_scales[0].square() - (end.mean - start.mean).square()).sum()
    )
    assert float(weight_space_loss(w, end)) == pytest.approx(float(predicted), rel=1e-4)


def test_empty_rows_of_a_zone_get_zero_scale_and_mean() -> None:
    w, mask = _weight(), _mask()
    mask[3] = False
    for fit in (arb_fit(w, mask, 2), rc_fit(w, mask, 2)):
        assert torch.isfinite(fit.approximation()).all()
        assert float(fit.approximation()[3].abs().max()) == 0.0


# -------------------------------------------------------------------------------------------- ARB-X


@pytest.mark.parametrize("order", [1, 2])
def test_arb_x_metric_error_is_no_worse_than_arb_on_the_same_mask(order: int) -> None:
    w, mask = _weight(cols=32), _mask(cols=32)
    metric = _hessian(32) / 2
    fit = arb_fit(w, mask, order, 15)
    losses = [float(metric_loss(w, arb_x_refine(w, fit, metric, k), metric)) for k in range(16)]
    assert _non_increasing(losses)
    assert losses[-1] < losses[0]
    # Signs are frozen: only the scales and the mean move.
    refined = arb_x_refine(w, fit, metric, 15)
    assert all(torch.equal(a, b) for a, b in zip(refined.signs, fit.signs, strict=True))


def test_arb_x_statistic_from_the_hessian_equals_the_stored_inputs_one() -> None:
    nsamples, seqlen, cols = 6, 40, 24
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(nsamples, seqlen, cols, generator=gen) + torch.randn(cols, generator=gen)
    accumulator = HessianAccumulator(cols, torch.float64)
    for x in inputs:
        accumulator.add(x.unsqueeze(0).to(torch.float64))
    hessian = accumulator.hessian()
    block = slice(8, 24)
    # The reference keeps every input and forms mean_s X_s[:, block]^T X_s[:, block].
    stored = torch.stack([x[:, block].T @ x[:, block] for x in inputs.double()]).mean(0)
    assert torch.allclose(stored, hessian[block, block] * seqlen / 2, rtol=1e-10)
    w, mask = _weight(rows=16, cols=16).double(), _mask(rows=16, cols=16)
    fit = arb_fit(w, mask, 2, 15)
    a = arb_x_refine(w, fit, stored, 15)
    b = arb_x_refine(w, fit, hessian[block, block], 15)
    assert torch.allclose(a.approximation(), b.approximation(), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- ARB-RC


@pytest.mark.parametrize("order", [1, 2])
def test_arb_rc_alternating_updates_reduce_its_objective(order: int) -> None:
    w, mask = _weight(), _mask()
    losses = [float(weight_space_loss(w, rc_fit(w, mask, order, k))) for k in range(16)]
    assert _non_increasing(losses)
    assert losses[-1] < losses[0]
    fit = rc_fit(w, mask, order, 15)
    assert float(fit.mean.abs().max()) == 0.0  # RC has no mean
    if order == 1:
        assert torch.equal(fit.signs[0][mask], (w >= 0)[mask])  # B = sign(W) stays


# ---------------------------------------------------------------------------------------------- CGB


@pytest.mark.parametrize("variant", ["arb", "arb-x", "arb-rc"])
@pytest.mark.parametrize("cgb", [False, True])
def test_zones_partition_each_block_exactly(variant: str, cgb: bool) -> None:
    w = _weight(rows=32, cols=40)
    saliency = w.square()
    config = {"arb": ARBConfig, "arb-x": ARBXConfig, "arb-rc": ARBRCConfig}[variant](cgb=cgb)
    zones = block_zones(w, saliency, config, _hessian(40))
    cover = torch.stack([z.mask for z in zones]).long().sum(0)
    assert torch.equal(cover, torch.ones_like(cover))
    salient_columns = torch.stack([z.mask for z in zones if z.order == 2]).any(0).any(0)
    assert 1 <= int(salient_columns.sum()) < 40
    for zone in zones:  # second-order zones live in the salient columns, first-order ones outside them
        outside = zone.mask[:, ~salient_columns] if zone.order == 2 else zone.mask[:, salient_columns]
        assert not bool(outside.any())
    assert len(zones) == (4 if cgb else 3)


# -------------------------------------------------------------- the method: layouts, dequantization, bits

_VARIANT_OF = {"arb": "arb", "arb-x": "arb-x", "arb-rc": "arb-rc", "arb-llm-x": "arb-x", "arb-llm-rc": "arb-rc"}


@pytest.mark.parametrize("name", sorted(_VARIANT_OF))
def test_the_stored_weight_dequantizes_to_what_the_method_computed(name: str) -> None:
    # One block: the first block is fitted on the untouched weights, so the fits can be recomputed.
    rows, cols = 24, 32
    w, hessian = _weight(rows, cols), _hessian(cols)
    method = get_method(name)
    config = method.make_config(block_size=cols)
    stored = method.quantize(w, hessian, config)
    variant = _VARIANT_OF[name]
    from binq.quant.hessian import factor_hessian

    u = factor_hessian(hessian, config.percdamp).inverse_cholesky_upper
    saliency = w.square() / torch.diagonal(u).square()
    metric = hessian if variant == "arb-x" else None
    zones = block_zones(w, saliency, config, metric)
    computed = sum(fit_zone(w, zone, config, metric).approximation() for zone in zones)
    assert torch.allclose(stored.dequantize(), computed, rtol=0, atol=1e-6 * float(w.abs().max()))
    assert stored.salient_groups == config.cgb
    assert (stored.means is None) == (variant == "arb-rc")
    assert (stored.column_scales is not None) == (variant == "arb-rc")


def _expected_bits(rows: int, cols: int, block: int, n_salient: int, cgb: bool, rc: bool) -> int:
    row_bytes = math.ceil(cols / 8)
    zones = 6 if cgb else 4
    blocks = math.ceil(cols / block)
    bits = 2 * rows * row_bytes * 8  # signs and group bitmap
    bits += row_bytes * 8 + rows * math.ceil(n_salient / 8) * 8  # column mask, residual plane
    bits += rows * blocks * zones * 16  # row scales
    if rc:
        bits += (cols - n_salient) * 2 * 16 + n_salient * (zones - 2) * 16  # column scales, no means
    else:
        bits += rows * blocks * zones * 16  # means
    return bits


@pytest.mark.parametrize("name", sorted(_VARIANT_OF))
def test_storage_bits_count_every_plane_and_scale(name: str) -> None:
    rows, cols, block = 16, 40, 16  # three blocks, the last one ragged
    method = get_method(name)
    config = method.make_config(block_size=block)
    weight = method.quantize(_weight(rows, cols), _hessian(cols), config)
    n_salient = int(weight.salient_columns.sum())
    rc = _VARIANT_OF[name] == "arb-rc"
    assert weight.storage_bits_total == _expected_bits(rows, cols, block, n_salient, config.cgb, rc)
    assert weight.compute_bits == pytest.approx(1 + n_salient / cols)


def test_rc_stores_fewer_bits_than_mean_variants_and_cgb_costs_only_scales() -> None:
    w, hessian = _weight(64, 256), _hessian(256)
    bits = {n: get_method(n).quantize(w, hessian, get_method(n).make_config()) for n in ("arb", "arb-rc", "arb-llm-x")}
    assert bits["arb-rc"].storage_bits < bits["arb"].storage_bits
    plain, cgb = bits["arb"], bits["arb-llm-x"]
    assert set(cgb.packed_tensors()) == set(plain.packed_tensors())
    assert cgb.packed_tensors()["scales"].shape[-1] == plain.packed_tensors()["scales"].shape[-1] + 2


def test_intra_block_resigning_changes_nothing_under_a_diagonal_hessian() -> None:
    # With no correlation between columns, no error moves inside a block: every column keeps the
    # nearest signs ARB already chose, so the GPTQ-style pass must reproduce the plain result exactly.
    w = _weight(16, 32)
    hessian = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(3)) + 0.5)
    method = get_method("arb")
    plain = method.quantize(w, hessian, method.make_config(exact_compensation=True))
    resigned = method.quantize(w, hessian, method.make_config(intra_block=True))
    assert torch.equal(plain.dequantize(), resigned.dequantize())


def test_improvements_lower_the_layer_output_error_on_correlated_inputs() -> None:
    w, hessian = _weight(64, 256), _hessian(256)

    def output_error(name: str, **options) -> float:
        method = get_method(name)
        d = w - method.quantize(w, hessian, method.make_config(**options)).dequantize()
        return float(((d @ hessian) * d).sum())

    billm, arb, arb_x = output_error("billm"), output_error("arb"), output_error("arb-x")
    assert arb_x < arb < billm
    assert output_error("arb-x", exact_compensation=True) < arb_x


# ------------------------------------------------------------------------------------------ arb-group


def test_arb_group_is_q1_0_shaped_and_beats_sign_rounding() -> None:
    rows, cols = 32, 256
    w, hessian = _weight(rows, cols), _hessian(cols)
    weight = quantize_arb_group(w, hessian, ARBGroupConfig())
    assert weight.zone_names == ["dense"] and weight.means is None and weight.group_bitmap is None
    assert weight.block_size == 128
    assert weight.storage_bits == pytest.approx(1 + 16 / 128)  # exactly Q1_0's 1.125
    rtn = get_method("rtn")
    sign_rounded = rtn.quantize(w, hessian, rtn.make_config(bits=1, group_size=128))
    assert sign_rounded.storage_bits == weight.storage_bits

    def output_error(q) -> float:
        d = w - q.dequantize()
        return float(((d @ hessian) * d).sum())

    assert output_error(weight) < output_error(sign_rounded)
    with_mean = quantize_arb_group(w, hessian, ARBGroupConfig(mean=True))
    assert output_error(with_mean) < output_error(weight)
    assert with_mean.storage_bits == pytest.approx(1 + 32 / 128)


def test_compensated_metric_prices_a_group_as_gptqs_exact_block_error() -> None:
    from binq.quant.compensation import block_error, compensated_metric
    from binq.quant.hessian import factor_hessian

    hessian = _hessian(32)
    u = factor_hessian(hessian, 0.01).inverse_cholesky_upper[:16, :16]
    residual = _weight(8, 16)
    inverse, metric = compensated_metric(u)
    exact = block_error(residual, torch.zeros_like(residual), u, exact=True)
    assert torch.allclose(residual @ inverse, exact, rtol=1e-4, atol=1e-5)
    assert torch.allclose(((residual @ metric) * residual).sum(), exact.square().sum(), rtol=1e-4)


# ------------------------------------------------------------------------------------------ searches


def _loop_best(candidates, error_fn, scored, magnitude, region) -> float:
    """The break-point a plain loop over the candidates picks (the reference's way)."""
    errors = []
    for c in candidates:
        below, above = (magnitude < c) & region, (magnitude >= c) & region
        errors.append(float(error_fn(scored, below[None]) + error_fn(scored, above[None])))
    return float(candidates[min(range(len(errors)), key=errors.__getitem__)])


def test_vectorized_split_searches_pick_the_same_break_points_as_a_loop_over_candidates() -> None:
    from functools import partial

    from binq.quant.arb import metric_binarization_error, rc_start_error
    from binq.quant.binarize import binarization_error
    from binq.quant.search import BILLM_SPLIT_QUANTILES, salient_split_search, sorted_quantiles, split_search

    w = _weight(24, 32)
    saliency = w.square()
    salient = torch.zeros_like(w, dtype=torch.bool)
    salient[:, [3, 17]] = True
    metric = _hessian(32)
    candidates = sorted_quantiles(saliency * ~salient, BILLM_SPLIT_QUANTILES)
    for scored, error_fn in (
        (saliency, binarization_error),
        (w, partial(metric_binarization_error, metric=metric)),
        (saliency, rc_start_error),
    ):
        expected = _loop_best(candidates, error_fn, scored, saliency, ~salient)
        assert float(split_search(saliency, salient, scored=scored, error_fn=error_fn)) == expected
    salient_candidates = sorted_quantiles(saliency[salient & (saliency > 0)], BILLM_SPLIT_QUANTILES)
    order_two = partial(binarization_error, order=2)
    expected = _loop_best(salient_candidates, order_two, saliency, saliency, salient)
    assert float(salient_split_search(saliency, salient)) == expected


# ------------------------------------------------------------------------------------- through the engine


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("arb-llm-x", {"block_size": 16}),
        ("arb-llm-rc", {"block_size": 16, "intra_block": True}),
        ("arb-group", {"group_size": 16}),
    ],
)
def test_the_methods_run_through_the_engine_on_a_tiny_llama(name, options, make_tiny_model, make_ids) -> None:
    from binq.engine.calibrate import quantize_model
    from binq.models import block_linears, get_architecture, get_blocks
    from binq.quant.structured import BinaryWeight

    model = make_tiny_model("llama")
    arch = get_architecture(model)
    method = get_method(name)
    result = quantize_model(model, arch, make_ids(4, 16, seed=1), method, method.make_config(**options), progress=False)
    for block in get_blocks(model, arch):
        for linear in block_linears(block, arch).values():
            assert torch.isfinite(linear.weight).all()
    assert all(isinstance(w, BinaryWeight) for w in result.weights.values())
    assert all(0 < r.relative_error < 1 for r in result.records)


def test_a_single_column_is_computed_as_the_whole_zone_computes_it() -> None:
    from binq.quant.arb import _column

    w, mask = _weight(), _mask()
    for fit in (rc_fit(w, mask, 2).rounded(), arb_fit(w, mask, 2).rounded(), rc_fit(w, mask, 1).rounded()):
        full = fit.approximation()
        assert all(torch.equal(_column(fit, j), full[:, j]) for j in range(w.shape[1]))
