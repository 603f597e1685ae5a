"""Every CPU kernel on real SmolLM2-135M layers quantized by every method, against the reference path.

Marked slow because it needs the embedded model (fetched from PyPI once) and runs the methods' searches
on full 576- and 1536-wide layers (a minute on a 2-core CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from binq.data import calibration_windows
from binq.methods import get_method
from binq.models import load_model
from binq.nn import BinaryLinear
from binq.nn.kernels import select_kernel

pytestmark = pytest.mark.slow

METHODS = {
    "rtn 1-bit g128": ("rtn", {"bits": 1, "group_size": 128}),
    "arb-group": ("arb-group", {}),
    "billm": ("billm", {}),
    "arb-llm-rc (column scales)": ("arb-llm-rc", {}),
    "arb-llm-x (cgb)": ("arb-llm-x", {}),
    "w11": ("w11", {}),
    "gptq 2-bit g128 act-order": ("gptq", {"bits": 2, "group_size": 128, "act_order": True}),
    "gptq 4-bit g128": ("gptq", {"bits": 4, "group_size": 128}),
    "msb g8": ("msb", {"groups": 8}),
}


@pytest.fixture(scope="module")
def layers() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Block 3's q_proj (576 x 576) and down_proj (576 x 1536): weight, Hessian, real input rows."""
    loaded = load_model("smollm2-135m")
    model = loaded.model
    ids = calibration_windows(loaded.tokenizer, "austen", 4, 128, seed=0)
    block = model.model.layers[3]
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args[0].detach()))
        for name, module in (("q_proj", block.self_attn.q_proj), ("down_proj", block.mlp.down_proj))
    ]
    with torch.no_grad():
        for window in ids:
            model(window.unsqueeze(0))
    for hook in hooks:
        hook.remove()
    out = {}
    for name, module in (("q_proj", block.self_attn.q_proj), ("down_proj", block.mlp.down_proj)):
        x = captured[name].reshape(-1, module.in_features).float()
        hessian = 2 * x.T.double() @ x.double() / x.shape[0]
        out[name] = (module.weight.detach().float(), hessian.float(), x[:24])
    return out


@pytest.mark.parametrize("label", sorted(METHODS))
def test_kernels_match_the_reference_on_real_layers(layers, label: str) -> None:
    method_name, options = METHODS[label]
    method = get_method(method_name)
    for weight, hessian, x in layers.values():
        quantized = method.quantize(weight, hessian, method.make_config(**options))
        module = BinaryLinear.from_weight(quantized)
        reference = F.linear(x.double(), quantized.dequantize(torch.float64))
        for rows in (x[:1], x[:5], x):  # decode, a few tokens, prefill tiles
            assert select_kernel(module, rows) is not None, f"no CPU kernel for {label}"
            got = module(rows)
            want = reference[: rows.shape[0]]
            assert float((got.double() - want).norm() / want.norm()) < 1e-5, label
