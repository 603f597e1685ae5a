"""W(1+1)A(1x4) for real: the activation plan in the checkpoint, and the numba bit-plane kernel.

- the kernel (binq.nn.bitplane_kernel) equals the reference (fake-quantized input, dequantized weight,
  ``F.linear`` in float64) on random two-zone weights of ragged widths, decode and prefill sizes;
- a tiny W(1+1)A4 checkpoint saves its activation plan, and the loaded model (binq.load and plain
  from_pretrained) computes what the in-memory model with the evaluation hooks computed;
- a checkpoint without a plan loads as before; bad plans fail with one-line errors.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import binq
import binq.nn.bitplane_kernel as bitplane_kernel
from binq.activations import ActivationConfig, calibrate_activations, quantized_activations
from binq.activations.int4 import ActivationQuantizer, fake_quantize
from binq.activations.smoothing import CLIP_RATIOS
from binq.checkpoint import WEIGHTS_FILE, read_header, read_quantization_config, save_checkpoint
from binq.cli import main
from binq.engine.calibrate import quantize_model
from binq.errors import BinqError
from binq.methods import get_method
from binq.models import get_architecture
from binq.nn import BinaryLinear, reference_only
from binq.nn.kernels import select_kernel
from binq.quant.structured import BinaryWeight
from conftest import build_tiny_model, build_tiny_tokenizer, random_ids

KERNEL = bitplane_kernel.KERNELS[0]


def two_zone_module(
    rows: int, cols: int, block_size: int = 128, means: bool = False, bias: bool = True, seed: int = 0
) -> BinaryLinear:
    """A random W(1+1) BinaryLinear: signs, a group bitmap, fp16 scales (and offsets) per (row, block)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = math.ceil(cols / block_size)
    weight = BinaryWeight(
        signs=torch.rand(rows, cols, generator=gen) > 0.5,
        scales=(torch.rand(rows, blocks, 2, generator=gen) + 0.05).half(),
        block_size=block_size,
        means=(torch.randn(rows, blocks, 2, generator=gen) * 0.2).half() if means else None,
        group_bitmap=torch.rand(rows, cols, generator=gen) > 0.7,
    )
    return BinaryLinear.from_weight(weight, torch.randn(rows, generator=gen) if bias else None)


def reference(module: BinaryLinear, x: torch.Tensor) -> torch.Tensor:
    """Fake-quantized input, dequantized weight, F.linear, in float64."""
    quantizer = module.activation_quantizer
    assert quantizer is not None
    weight = module.quantized_weight().dequantize(torch.float64)
    bias = None if module.bias is None else module.bias.double()
    return F.linear(quantizer(x).double(), weight, bias)


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Within ``rtol`` of the reference, relative to its largest entry (outputs near zero cancel)."""
    scale = expected.abs().max().item()
    assert (actual.double() - expected).abs().max().item() <= rtol * scale


# ------------------------------------------------------------------------------------------ the kernel


@pytest.mark.parametrize("cols", [200, 576])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize(("means", "sym"), [(False, False), (True, False), (False, True)])
def test_kernel_equals_the_reference(cols: int, tokens: int, means: bool, sym: bool) -> None:
    module = two_zone_module(48, cols, means=means, seed=cols + tokens)
    module.activation_quantizer = ActivationQuantizer(4, sym, 0.9)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)) * 3
    x[:, 5] *= 40  # an outlier channel, as in real residual streams
    assert select_kernel(module, x) is KERNEL
    assert_relative_close(module(x), reference(module, x))


@pytest.mark.parametrize(
    ("cols", "block_size"), [(70, 48), (130, 200), (64, 64), (1, 128), (300, 100)], ids=lambda v: str(v)
)
def test_kernel_ragged_and_odd_blocks(cols: int, block_size: int) -> None:
    """Blocks narrower than, equal to and wider than a word; a ragged last block; a single column."""
    module = two_zone_module(9, cols, block_size, means=True, seed=cols)
    module.activation_quantizer = ActivationQuantizer(4, False, 1.0)
    x = torch.randn(2, 3, cols, generator=torch.Generator().manual_seed(1))  # (batch, seq, features)
    y = module(x)
    assert y.shape == (2, 3, 9)
    assert_relative_close(y, reference(module, x))


def test_prefill_with_threads_and_token_smoothing() -> None:
    """Many tokens (several token tiles, rows split over two threads); per-token clip ratios."""
    module = two_zone_module(64, 576, means=True)
    module.activation_quantizer = ActivationQuantizer(4, False, 0.95, CLIP_RATIOS)
    x = torch.randn(150, 576, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = module(x)
    finally:
        torch.set_num_threads(threads)
    assert_relative_close(y, reference(module, x))


def test_other_bit_widths_and_half_inputs() -> None:
    module = two_zone_module(16, 200, bias=False)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(3))
    for bits in (2, 3, 8):
        module.activation_quantizer = ActivationQuantizer(bits, False, 1.0)
        assert_relative_close(module(x), reference(module, x))
    module.activation_quantizer = ActivationQuantizer(4, False, 1.0)
    half = x.half()
    y = module(half)
    assert y.dtype == torch.float16
    assert_relative_close(y, reference(module, half), rtol=1e-3)


def test_the_kernel_is_chosen_only_where_it_applies() -> None:
    module = two_zone_module(8, 64)
    x = torch.randn(1, 64)
    assert select_kernel(module, x) is not KERNEL  # no activation quantizer: full-precision inputs
    module.activation_quantizer = ActivationQuantizer(4, False, 1.0)
    assert select_kernel(module, x) is KERNEL
    assert select_kernel(module, torch.randn(1, 63)) is not KERNEL  # a wrong width is F.linear's error to raise
    with reference_only():
        assert select_kernel(module, x) is None
    one_zone = BinaryLinear.from_weight(
        BinaryWeight(signs=torch.rand(8, 64) > 0.5, scales=torch.ones(8, 1, 1).half(), block_size=64)
    )
    one_zone.activation_quantizer = module.activation_quantizer
    assert select_kernel(one_zone, x) is not KERNEL
    salient = BinaryWeight(
        signs=torch.rand(8, 64) > 0.5,
        scales=torch.ones(8, 1, 4).half(),
        block_size=64,
        group_bitmap=torch.rand(8, 64) > 0.5,
        salient_columns=torch.arange(64) < 4,
        residual_signs=torch.rand(8, 4) > 0.5,
    )
    with_salient = BinaryLinear.from_weight(salient)
    with_salient.activation_quantizer = module.activation_quantizer
    assert select_kernel(with_salient, x) is not KERNEL


def test_the_repacking_is_kept_in_kernel_state() -> None:
    module = two_zone_module(8, 200)
    module.activation_quantizer = ActivationQuantizer(4, False, 1.0)
    module(torch.randn(1, 200))
    packed = module._kernel_state["bitplane"]
    assert packed.positive.dtype.name == "uint64" and packed.positive.shape == (8, 2, 2)
    module(torch.randn(3, 200))
    assert module._kernel_state["bitplane"] is packed  # built once
    dense = module.quantized_weight().dequantize(torch.float64)
    torch.testing.assert_close(torch.from_numpy(packed.row_sums), dense.sum(1), rtol=1e-12, atol=1e-12)


def test_without_numba_the_reference_path_runs_after_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_import = builtins.__import__

    def no_numba(name: str, *args, **kwargs):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("no numba here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_numba)
    monkeypatch.setattr(bitplane_kernel, "_compiled", None)
    monkeypatch.setattr(bitplane_kernel, "_numba_missing", False)
    module = two_zone_module(8, 200)
    module.activation_quantizer = ActivationQuantizer(4, False, 1.0)
    x = torch.randn(2, 200)
    with caplog.at_level(logging.WARNING, logger="binq.nn.bitplane_kernel"):
        assert not KERNEL.supports(module, x)
        assert not KERNEL.supports(module, x)
        y = module(x)
    assert len([r for r in caplog.records if "numba" in r.getMessage()]) == 1
    assert_relative_close(y, reference(module, x))


# ------------------------------------------------------------------------------ the plan in a checkpoint


def quantize_w11_a4(smooth: str = "channel", block_size: int = 48) -> tuple[nn.Module, dict, object]:
    """A tiny LLaMA as `binq quantize --method w11 --act-bits 4` makes it: smoothing folded, then w11."""
    model = build_tiny_model("llama", seed=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :4] *= 30  # outlier channels for the smoothing to act on
        for param in model.parameters():  # an fp16 source checkpoint, as SmolLM2's
            param.copy_(param.half().float())
    arch = get_architecture(model)
    ids = random_ids(4, 16, seed=1)
    plan = calibrate_activations(
        model, arch, ids, ActivationConfig(bits=4, smooth=smooth, calib_tokens=64), progress=False
    )
    method = get_method("w11")
    result = quantize_model(model, arch, ids, method, method.make_config(block_size=block_size), progress=False)
    return model, result.weights, plan


@pytest.fixture(scope="module")
def a4_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, object]:
    folder = tmp_path_factory.mktemp("w11-a4")
    model, weights, plan = quantize_w11_a4()
    save_checkpoint(
        model, weights, folder, tokenizer=build_tiny_tokenizer(), method="w11", dtype=torch.float16, activations=plan
    )
    return folder, model, plan


@torch.no_grad()
def hooked_logits(model: nn.Module, plan: object, ids: torch.Tensor) -> torch.Tensor:
    with quantized_activations(model, get_architecture(model), plan):
        return model(ids).logits


def test_the_plan_is_in_config_json(a4_checkpoint) -> None:
    folder, model, plan = a4_checkpoint
    entry = json.loads((folder / "config.json").read_text())["quantization_config"]["activations"]
    linears = [f"model.layers.{i}.{name}" for i in range(2) for name in get_architecture(model).linear_names]
    assert entry["bits"] == 4 and entry["sym"] is False and entry["smooth"] == "channel"
    assert entry["token_candidates"] is None
    assert sorted(entry["clip_ratios"]) == sorted(linears)
    assert entry["clip_ratios"] == {k: plan.clip_ratio(k) for k in linears}
    assert entry["smoothed_producers"] == sorted(plan.smoothed_producers) and plan.smoothed_producers
    # Smoothing folded into the norms: stored at the in-memory precision, everything else at the source's.
    header = read_header(folder / WEIGHTS_FILE)
    assert header["model.embed_tokens.weight"].dtype == torch.float16
    norm = next(p for p in plan.smoothed_producers if p.endswith("layernorm"))
    assert header[f"{norm}.weight"].dtype == torch.float32
    assert read_quantization_config(folder)["activations"] == entry


def test_loaded_model_computes_what_the_hooked_model_measured(a4_checkpoint) -> None:
    folder, model, plan = a4_checkpoint
    ids = random_ids(2, 16, seed=7)
    expected = hooked_logits(model, plan, ids)
    loaded = binq.load(folder)
    linears = [m for m in loaded.modules() if isinstance(m, BinaryLinear)]
    assert len(linears) == 14 and all(m.activation_quantizer is not None for m in linears)
    with torch.no_grad():
        assert all(select_kernel(m, torch.randn(1, m.in_features)) is KERNEL for m in linears)
        with reference_only():  # the reference path: the very numbers of the hooked evaluation
            assert torch.equal(loaded(ids).logits, expected)
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-4)  # the bit-plane kernel
        # Without activation quantization the logits differ: the plan is really applied.
        for module in linears:
            module.activation_quantizer = None
        assert not torch.allclose(loaded(ids).logits, expected, atol=1e-3)


def test_from_pretrained_sets_the_same_quantizers(a4_checkpoint) -> None:
    folder, model, plan = a4_checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    expected = plan.module_quantizers(model, get_architecture(model))
    found = {n: m.activation_quantizer for n, m in loaded.named_modules() if isinstance(m, BinaryLinear)}
    assert found == expected
    with torch.no_grad():
        ids = random_ids(1, 8, seed=3)
        torch.testing.assert_close(loaded(ids).logits, hooked_logits(model, plan, ids), rtol=1e-4, atol=1e-4)


def test_token_smoothing_round_trips(tmp_path: Path) -> None:
    model, weights, plan = quantize_w11_a4(smooth="token", block_size=32)
    save_checkpoint(model, weights, tmp_path, activations=plan)
    entry = read_quantization_config(tmp_path)["activations"]
    assert entry["smooth"] == "token" and entry["token_candidates"] == list(CLIP_RATIOS)
    assert entry["smoothed_producers"] == []
    ids = random_ids(2, 12, seed=4)
    loaded = binq.load(tmp_path)
    with torch.no_grad(), reference_only():
        assert torch.equal(loaded(ids).logits, hooked_logits(model, plan, ids))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hooked_logits(model, plan, ids), rtol=1e-4, atol=1e-4)


def test_token_quantizer_picks_each_tokens_best_candidate() -> None:
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(5)) * torch.rand(40, 1) * 4
    x[:, 3] *= 25
    quantizer = ActivationConfig(bits=4, smooth="token").quantizer(0.9)
    candidates = [r for r in CLIP_RATIOS if r <= 0.9]
    quantized = torch.stack([fake_quantize(x, 4, False, r) for r in candidates])
    errors = (quantized - x).square().sum(-1)
    best = quantized[errors.argmin(0), torch.arange(40)]  # argmin returns the first minimum, as the quantizer
    assert torch.equal(quantizer(x), best)


def test_checkpoint_without_a_plan_loads_as_before(tmp_path: Path) -> None:
    model, weights, _plan = quantize_w11_a4(smooth="none")
    save_checkpoint(model, weights, tmp_path)
    assert "activations" not in json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    loaded = binq.load(tmp_path)
    linears = [m for m in loaded.modules() if isinstance(m, BinaryLinear)]
    assert all(m.activation_quantizer is None for m in linears)
    assert all(select_kernel(m, torch.randn(1, m.in_features)) is not KERNEL for m in linears)
    ids = random_ids(2, 16, seed=7)
    with torch.no_grad(), reference_only():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.update(bits=16), "'bits' must be an integer in \\[2, 8\\], got 16"),
        (lambda a: a.update(sym="no"), "'sym' must be true or false"),
        (lambda a: a.update(smooth="auto"), "'smooth' must be one of none, channel, token, got 'auto'"),
        (lambda a: a.update(token_candidates=[1.0]), "'token_candidates' is only for smooth 'token'"),
        (lambda a: a.update(smooth="token"), "'token_candidates' must be a non-empty list"),
        (lambda a: a["clip_ratios"].update({"model.layers.0.mlp.up_proj": 1.5}), "clip ratio of 'model.layers.0"),
        (lambda a: a["clip_ratios"].update({"model.layers.0.mlp.up_proj": None}), "must be a number in \\(0, 1\\]"),
        (lambda a: a["clip_ratios"].update({"lm_head": 1.0}), "names 'lm_head', which is not a quantized module"),
        (lambda a: a.update(clip_ratios={}), "'clip_ratios' must be a non-empty object"),
        (lambda a: a.update(rotation="hadamard"), "unknown field 'rotation'"),
        (lambda a: a.update(smoothed_producers="model.norm"), "'smoothed_producers' must be a list"),
    ],
)
def test_bad_plans_are_refused_in_one_line(a4_checkpoint, tmp_path: Path, edit, message: str) -> None:
    folder, _model, _plan = a4_checkpoint
    for name in ("config.json", WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json"):
        if (folder / name).exists():
            (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config["quantization_config"]["activations"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    for load in (binq.load, lambda f: AutoModelForCausalLM.from_pretrained(str(f))):
        with pytest.raises(BinqError, match=message) as error:
            load(tmp_path)
        assert "\n" not in str(error.value) and str(error.value).startswith("quantization_config activations")


def test_cli_checkpoint_reproduces_the_reported_perplexity(
    capsys: pytest.CaptureFixture[str], tiny_llama_folder: Path, text_file, tmp_path: Path
) -> None:
    """`binq quantize --method w11 --act-bits 4 --out DIR`, then `binq eval --model DIR`: the same PPL."""
    calib, text = text_file(2000, 1), text_file(300, 2)
    common = ["--model", str(tiny_llama_folder), "--calib", str(calib), "--nsamples", "2", "--seqlen", "16"]
    common += ["--eval", str(text), "--eval-windows", "3", "--no-progress"]
    out = tmp_path / "run"
    argv = ["quantize", *common, "--method", "w11", "--block-size", "48", "--act-bits", "4", "--out", str(out)]
    assert main([*argv, "--no-layer-table"]) == 0, capsys.readouterr().err
    reported = json.loads((out / "report.json").read_text())["ppl"][str(text)]["quantized"]
    assert read_quantization_config(out)["activations"]["smooth"] == "channel"  # --smooth auto on llama
    capsys.readouterr()
    assert main(["eval", *common[2:], "--model", str(out)]) == 0
    measured = float(capsys.readouterr().out.split("PPL ")[1].split()[0])
    assert measured == pytest.approx(reported, rel=1e-4)
