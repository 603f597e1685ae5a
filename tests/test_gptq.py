"""GPTQ: exact agreement with a slow textbook re-implementation, and the properties it must have."""

from __future__ import annotations

import functools

import pytest
import torch

from binq.errors import BinqError
from binq.methods.gptq import GPTQConfig, quantize_gptq
from binq.methods.rtn import RTNConfig, quantize_rtn
from binq.quant.grid import Grid, fit_clipped_grid, fit_minmax_grid
from binq.quant.hessian import relative_output_error
from binq.quant.structured import UniformWeight

ROWS, COLS, TOKENS = 64, 200, 512  # 200 columns: not a multiple of the 128-column block


@functools.cache
def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs ``X = Z M`` (``M`` = identity + a rank-8 mixing)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(COLS) + torch.randn(COLS, 8, generator=generator) @ torch.randn(8, COLS, generator=generator)
    x = torch.randn(TOKENS, COLS, generator=generator) @ mixing
    hessian = 2 * x.T @ x / TOKENS
    weight = torch.randn(ROWS, COLS, generator=generator)
    return weight, hessian


# ------------------------------------------------------------------------------ slow reference GPTQ


def _reference_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max grid over ``w`` (rows, k): the range includes 0; the scale is stored as fp16."""
    maxq = 2**bits - 1
    xmin = w.min(1).values.clamp(max=0)
    xmax = w.max(1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat], xmax[flat] = -1.0, 1.0
    scale = ((xmax - xmin) / maxq).half().double()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _reference_clipped_grid(
    w: torch.Tensor, bits: int, sym: bool, importance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row: of the ranges ``p x [min, max]``, p = 1, 0.99, ..., 0.20, the first with the least
    ``sum_j importance_j (w_j - q_j)^2``."""
    maxq = 2**bits - 1
    scales, zeros = [], []
    for row in w:
        best = None
        for step in range(81):
            shrink = 1 - step / 100
            xmin = min(float(row.min()), 0.0) * shrink
            xmax = max(float(row.max()), 0.0) * shrink
            scale, zero = _reference_grid(torch.tensor([[xmin, xmax]], dtype=torch.float64), bits, sym)
            q = scale * ((torch.round(row / scale) + zero).clamp(0, maxq) - zero)
            error = float(((q - row) ** 2 * importance).sum())
            if best is None or error < best[0]:
                best = (error, scale, zero)
        scales.append(best[1])
        zeros.append(best[2])
    return torch.cat(scales), torch.cat(zeros)


def reference_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    percdamp: float = 0.01,
    clip_search: bool = False,
) -> torch.Tensor:
    """GPTQ as the pseudo-code states it, one column at a time, in float64. Returns Q (dequantized).

    With ``clip_search`` every grid is :func:`_reference_clipped_grid`, weighted by ``diag(H)``."""
    w = weight.double().clone()
    h = hessian.double().clone()
    cols = w.shape[1]
    group = group_size or cols
    maxq = 2**bits - 1
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)
    for j in range(cols):
        if h[j, j] == 0:  # dead input: unit diagonal, zero weights
            h[j, j] = 1.0
            w[:, j] = 0.0

    def grid(columns: torch.Tensor, diag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _reference_clipped_grid(columns, bits, sym, diag) if clip_search else _reference_grid(columns, bits, sym)

    diag = torch.diagonal(h).clone()
    static = [grid(w[:, s : s + group], diag[s : s + group]) for s in range(0, cols, group)]
    w, h = w[:, perm], h[perm][:, perm]
    damped = h + percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(damped)).T  # inv = L L^T = U^T U, U upper
    q = torch.zeros_like(w)
    for j in range(cols):
        if static_groups:
            scale, zero = static[int(perm[j]) // group]
        elif j % group == 0:
            scale, zero = grid(w[:, j : j + group], torch.diagonal(h)[j : j + group])
        code = (torch.round(w[:, j] / scale) + zero).clamp(0, maxq)
        q[:, j] = scale * (code - zero)
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= torch.outer(err, u[j, j:])  # the full OBS update of every later column
    out = torch.empty_like(q)
    out[:, perm] = q
    return out


REFERENCE_CASES = [
    pytest.param({"bits": 3, "group_size": 48}, id="3bit-g48-groups-straddle-blocks"),
    pytest.param({"bits": 4, "group_size": 64}, id="4bit-g64"),
    pytest.param({"bits": 2, "group_size": 0, "block_size": 32}, id="2bit-per-row-block32"),
    pytest.param({"bits": 4, "group_size": 48, "block_size": 32}, id="4bit-g48-block32"),
    pytest.param({"bits": 1, "group_size": 128}, id="1bit-g128"),
    pytest.param({"bits": 3, "group_size": 64, "sym": True}, id="3bit-sym"),
    pytest.param({"bits": 3, "group_size": 48, "act_order": True}, id="3bit-act-order"),
    pytest.param({"bits": 3, "group_size": 64, "static_groups": True}, id="3bit-static"),
    pytest.param({"bits": 2, "group_size": 64, "act_order": True, "static_groups": True}, id="2bit-act-static"),
    pytest.param({"bits": 3, "group_size": 48, "clip_search": True}, id="3bit-clip"),
    pytest.param({"bits": 2, "group_size": 64, "clip_search": True, "act_order": True}, id="2bit-clip-act-order"),
    pytest.param({"bits": 4, "group_size": 64, "clip_search": True, "sym": True}, id="4bit-clip-sym"),
    pytest.param({"bits": 3, "group_size": 64, "clip_search": True, "static_groups": True}, id="3bit-clip-static"),
]


@pytest.mark.parametrize("options", REFERENCE_CASES)
def test_matches_a_column_by_column_reference(options: dict) -> None:
    weight, hessian = _problem()
    config = GPTQConfig(**options)
    result = quantize_gptq(weight, hessian.double(), config)
    reference_options = {k: v for k, v in options.items() if k != "block_size"}
    expected = reference_gptq(weight, hessian, **reference_options)
    got = result.dequantize(torch.float64)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    # ... and a wrong answer would be far off: the reference differs from plain rounding.
    rtn = quantize_rtn(weight, None, RTNConfig(bits=config.bits, group_size=config.group_size, grid="uniform"))
    assert not torch.allclose(rtn.dequantize(torch.float64), expected, atol=1e-3)


def test_float32_hessian_gives_the_same_codes_almost_everywhere() -> None:
    weight, hessian = _problem()
    config = GPTQConfig(bits=3, group_size=64)
    codes32 = quantize_gptq(weight, hessian, config).codes
    codes64 = quantize_gptq(weight, hessian.double(), config).codes
    assert (codes32 != codes64).float().mean() < 0.01


# ---------------------------------------------------------------------------------------- properties


@functools.cache
def _gptq_error(bits: int, group_size: int = 64) -> float:
    weight, hessian = _problem()
    q = quantize_gptq(weight, hessian, GPTQConfig(bits=bits, group_size=group_size)).dequantize()
    return relative_output_error(weight, q, hessian)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_output_error_is_below_rtn_on_correlated_inputs(bits: int) -> None:
    weight, hessian = _problem()
    rtn = quantize_rtn(weight, None, RTNConfig(bits=bits, group_size=64, grid="uniform")).dequantize()
    rtn_error = relative_output_error(weight, rtn, hessian)
    assert _gptq_error(bits) < 0.8 * rtn_error


def test_more_bits_give_lower_output_error() -> None:
    errors = [_gptq_error(bits) for bits in (1, 2, 3, 4)]
    assert errors[0] > errors[1] > errors[2] > errors[3] > 0


def test_act_order_group_index_follows_decreasing_hessian_diagonal() -> None:
    weight, hessian = _problem(seed=1)
    hessian = hessian * torch.linspace(0.5, 2.0, COLS).sqrt().outer(torch.linspace(0.5, 2.0, COLS).sqrt())
    result = quantize_gptq(weight, hessian, GPTQConfig(bits=3, group_size=64, act_order=True))
    assert result.group_index is not None and result.group_index.dtype == torch.int64
    order = torch.argsort(torch.diagonal(hessian), descending=True)
    assert torch.equal(result.group_index[order], torch.arange(COLS) // 64)
    assert torch.bincount(result.group_index).tolist() == [64, 64, 64, 8]
    assert tuple(result.scales.shape) == (ROWS, 4)
    error = relative_output_error(weight, result.dequantize(), hessian)
    assert 0 < error < 0.1
    assert "group_index" in result.packed_tensors()


@pytest.mark.parametrize("act_order", [False, True])
def test_static_groups_use_the_min_max_grids_of_the_original_weight(act_order: bool) -> None:
    weight, hessian = _problem(seed=2)
    config = GPTQConfig(bits=3, group_size=64, static_groups=True, act_order=act_order)
    result = quantize_gptq(weight, hessian, config)
    rtn = quantize_rtn(weight, None, RTNConfig(bits=3, group_size=64, grid="uniform"))
    # The grids are fitted before any update, on the layer's own column groups: exactly RTN's grids.
    assert torch.equal(result.scales, rtn.scales)
    assert torch.equal(result.zeros, rtn.zeros)
    if act_order:
        assert torch.equal(result.group_index, torch.arange(COLS) // 64)
    else:
        assert result.group_index is None
    error = relative_output_error(weight, result.dequantize(), hessian)
    assert 0 < error < relative_output_error(weight, rtn.dequantize(), hessian)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs_get_zero_weight_columns(act_order: bool) -> None:
    weight, hessian = _problem(seed=3)
    dead = torch.zeros(COLS, dtype=torch.bool)
    dead[[0, 5, 127, 128, 199]] = True
    hessian = hessian.clone()
    hessian[dead] = 0
    hessian[:, dead] = 0
    result = quantize_gptq(weight, hessian, GPTQConfig(bits=4, group_size=64, act_order=act_order))
    q = result.dequantize()
    assert (q[:, dead] == 0).all()
    assert (weight[:, dead] != 0).all()
    assert torch.isfinite(q).all()
    assert relative_output_error(weight, q, hessian) < 0.05


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_and_zero_points_are_in_range(bits: int) -> None:
    weight, hessian = _problem()
    result = quantize_gptq(weight, hessian, GPTQConfig(bits=bits, group_size=128))
    assert isinstance(result, UniformWeight)
    assert int(result.codes.max()) <= 2**bits - 1
    assert int(result.zeros.max()) <= 2**bits - 1
    assert result.scales.dtype == torch.float16 and (result.scales > 0).all()
    assert result.compute_bits == bits
    # codes (ceil(200 * bits / 8) bytes per row), fp16 scales and packed zero points of 2 groups
    expected = ROWS * (-(-COLS * bits // 8)) * 8 + ROWS * 2 * 16 + ROWS * (-(-2 * bits // 8)) * 8
    assert result.storage_bits_total == expected


@pytest.mark.parametrize("options", [{"bits": 9}, {"bits": 0}, {"group_size": -1}, {"block_size": 0}])
def test_invalid_configs_raise_binq_error(options: dict) -> None:
    with pytest.raises(BinqError):
        GPTQConfig(**options)


# ------------------------------------------------------------------------------ the clipped grid


def _outlier_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with 1 % outliers (x 8, as trained weights have) and inputs of unequal scales, weakly
    correlated (``X = Z (I + 0.1 N) D``): GPTQ's error feedback can do little for a rounded outlier's
    neighbours, so how the grid treats outliers shows in the output error."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(ROWS, COLS, generator=generator)
    outliers = torch.rand(weight.shape, generator=generator) < 0.01
    weight = torch.where(outliers, 8 * weight, weight)
    mixing = torch.eye(COLS) + 0.1 * torch.randn(COLS, COLS, generator=generator)
    x = torch.randn(TOKENS, COLS, generator=generator) @ mixing * (3 * torch.rand(COLS, generator=generator))
    return weight, 2 * x.T @ x / TOKENS


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipped_grid_never_loses_to_min_max_on_its_objective(bits: int, sym: bool) -> None:
    weight, hessian = _outlier_problem()
    importance = torch.diagonal(hessian)[:64]
    columns = weight[:, :64].double()
    minmax = fit_minmax_grid(columns, bits, sym)
    clipped = fit_clipped_grid(columns, bits, sym, importance)

    def row_errors(grid: Grid) -> torch.Tensor:
        return ((grid.dequantize_codes(grid.codes(columns)) - columns) ** 2 * importance).sum(1)

    assert (row_errors(clipped) <= row_errors(minmax)).all()
    assert float(row_errors(clipped).sum()) < 0.95 * float(row_errors(minmax).sum())
    # What is stored: fp16 scales, whole zero points in range (the middle one for a symmetric grid).
    assert torch.equal(clipped.scale, clipped.scale.half().double())
    assert torch.equal(clipped.zero, clipped.zero.round()) and int(clipped.zero.max()) <= 2**bits - 1
    if sym:
        assert (clipped.zero == 2 ** (bits - 1)).all()


def test_clipped_grid_keeps_an_all_zero_row_exact() -> None:
    columns = torch.randn(3, 16, dtype=torch.float64)
    columns[1] = 0
    grid = fit_clipped_grid(columns, 3, False, torch.ones(16, dtype=torch.float64))
    assert torch.equal(grid.dequantize_codes(grid.codes(columns))[1], torch.zeros(16, dtype=torch.float64))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_lowers_gptq_output_error_with_the_same_layout(bits: int) -> None:
    # Not a law: on strongly correlated inputs (``_problem``) the min-max grid can do better, since
    # GPTQ's feedback then repairs much of a clipped outlier's error elsewhere (docs/BENCHMARKS.md).
    weight, hessian = _outlier_problem()
    plain = quantize_gptq(weight, hessian, GPTQConfig(bits=bits, group_size=64))
    clipped = quantize_gptq(weight, hessian, GPTQConfig(bits=bits, group_size=64, clip_search=True))
    assert relative_output_error(weight, clipped.dequantize(), hessian) < 0.95 * relative_output_error(
        weight, plain.dequantize(), hessian
    )
    assert clipped.storage_bits_total == plain.storage_bits_total
    assert {name: t.shape for name, t in clipped.packed_tensors().items()} == {
        name: t.shape for name, t in plain.packed_tensors().items()
    }
