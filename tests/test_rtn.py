"""Round-to-nearest baselines: XNOR sign scales per (row, group), uniform codes, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from binq.errors import BinqError
from binq.methods import get_method
from binq.methods.rtn import RTNConfig, quantize_rtn
from binq.quant.structured import BinaryWeight, UniformWeight


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


@pytest.mark.parametrize(("cols", "group_size"), [(200, 0), (200, 64), (320, 128), (96, 96)])
def test_sign_grid_scale_is_mean_abs_per_row_and_group(cols: int, group_size: int) -> None:
    weight = _weight(64, cols)
    result = quantize_rtn(weight, None, RTNConfig(bits=1, group_size=group_size))
    assert isinstance(result, BinaryWeight)
    width = group_size or cols
    groups = math.ceil(cols / width)
    assert tuple(result.scales.shape) == (64, groups, 1)
    assert result.means is None
    for g in range(groups):
        chunk = weight[:, g * width : (g + 1) * width]  # the last group is ragged when cols % width != 0
        assert torch.equal(result.scales[:, g, 0].float(), _fp16(chunk.abs().mean(1)))
    assert torch.equal(result.signs, weight >= 0)
    # Dequantized: alpha_g * sign(w).
    alpha = result.scales[:, :, 0].float()[:, torch.arange(cols) // width]
    assert torch.equal(result.dequantize(), torch.where(weight >= 0, alpha, -alpha))


def test_ragged_last_group_ignores_the_padding() -> None:
    # 200 columns in groups of 64: the last group has 8 columns. Padding zeros must not dilute its mean.
    weight = torch.ones(4, 200)
    weight[:, 192:] = 8.0
    result = quantize_rtn(weight, None, RTNConfig(bits=1, group_size=64))
    assert result.scales[:, :, 0].tolist() == [[1.0, 1.0, 1.0, 8.0]] * 4


def test_centred_sign_grid_stores_the_group_mean() -> None:
    weight = _weight(32, 200, seed=1) + 3.0
    result = quantize_rtn(weight, None, RTNConfig(bits=1, group_size=128, centred=True))
    assert result.means is not None
    for g, chunk in enumerate((weight[:, :128], weight[:, 128:])):
        mean = _fp16(chunk.mean(1, keepdim=True))
        assert torch.allclose(result.means[:, g, 0].float(), mean.squeeze(1))
        assert torch.allclose(result.scales[:, g, 0].float(), _fp16((chunk - mean).abs().mean(1)), rtol=1e-3)
    centred = (weight - result.dequantize()).square().sum()
    plain = (weight - quantize_rtn(weight, None, RTNConfig(bits=1, group_size=128)).dequantize()).square().sum()
    assert centred < 0.5 * plain  # an offset row is what the mean is for


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_uniform_grid_codes_are_in_range_and_round_to_nearest(bits: int, sym: bool) -> None:
    weight = _weight(64, 200, seed=bits)
    result = quantize_rtn(weight, None, RTNConfig(bits=bits, group_size=64, grid="uniform", sym=sym))
    assert isinstance(result, UniformWeight)
    assert result.codes.dtype == torch.uint8
    assert int(result.codes.max()) <= 2**bits - 1
    assert (result.zeros is None) == sym
    if not sym:
        assert int(result.zeros.max()) <= 2**bits - 1
    # Every dequantized value is the nearest grid level, so its error is at most half a step, give or
    # take the fp16 rounding of the scale, which moves the grid ends by up to 2**bits * 2**-11 steps.
    step = result.scales.float()[:, torch.arange(200) // 64]
    error = (weight - result.dequantize()).abs()
    assert (error <= (0.5 + 2**bits * 2**-10) * step).all()


def test_uniform_error_decreases_with_bits() -> None:
    weight = _weight(64, 320, seed=7)
    errors = [
        (weight - quantize_rtn(weight, None, RTNConfig(bits=b, group_size=128)).dequantize()).square().mean()
        for b in (2, 3, 4, 8)
    ]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-4


def test_auto_grid_is_sign_at_one_bit_and_uniform_above() -> None:
    weight = _weight(8, 96)
    assert isinstance(quantize_rtn(weight, None, RTNConfig(bits=1)), BinaryWeight)
    assert isinstance(quantize_rtn(weight, None, RTNConfig(bits=2)), UniformWeight)
    assert isinstance(quantize_rtn(weight, None, RTNConfig(bits=1, grid="uniform")), UniformWeight)


@pytest.mark.parametrize(
    "options",
    [{"bits": 9}, {"bits": 0}, {"grid": "foo"}, {"grid": "sign", "bits": 2}, {"group_size": -1}],
)
def test_invalid_configs_raise_binq_error(options: dict) -> None:
    with pytest.raises(BinqError):
        RTNConfig(**options)


def test_registry_builds_rtn_configs_and_rejects_unknown_options() -> None:
    method = get_method("rtn")
    assert method.make_config(bits=2, group_size=64) == RTNConfig(bits=2, group_size=64)
    with pytest.raises(BinqError, match="no option"):
        method.make_config(bitz=2)
    with pytest.raises(BinqError, match="unknown method"):
        get_method("nope")
