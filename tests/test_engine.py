"""Tests for binq.engine: block-sequential calibration, Hessians, input capture.

Tiny random models of every architecture; the method is wrapped in a recorder (a registry ``Method``
like any other) that keeps the weight and Hessian it is handed, so the Hessians can be checked against
``2 X^T X / T`` computed from forward hooks during a plain forward of the model in the state the
engine should have seen: blocks before the current one quantized, the current one not (or, with
``true_sequential``, its earlier groups quantized too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from binq.engine.calibrate import EngineConfig, EngineResult, LayerRecord, quantize_model
from binq.engine.capture import _Recorder, capture_block_inputs
from binq.engine.hessian import HessianAccumulator
from binq.errors import BinqError
from binq.methods import get_method
from binq.methods.registry import Method
from binq.models import ARCHITECTURES, Architecture, block_linears, get_architecture, get_blocks, get_module
from binq.quant.structured import BinaryWeight, QuantizedWeight, UniformWeight

NSAMPLES, SEQLEN = 4, 32

# Small sliding windows make the attention masks matter (and differ between blocks for the Gemma 2/3
# patterns), so a block run with another block's arguments would give different Hessians.
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "mistral": {"sliding_window": 8},
    "gemma2": {"sliding_window": 8},
    "gemma3_text": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
}
REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "opt", "gemma3_text"}
ARCH_NAMES = sorted(ARCHITECTURES)


def test_every_required_architecture_is_declared() -> None:
    assert set(ARCH_NAMES) >= REQUIRED


@dataclass
class Recording:
    """A method that records what the engine hands it, then delegates to a real method."""

    inner: Method
    weights: list[torch.Tensor] = field(default_factory=list)
    hessians: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, weight: torch.Tensor, hessian: torch.Tensor, config: Any) -> QuantizedWeight:
        self.weights.append(weight.clone())
        self.hessians.append(hessian.clone())
        return self.inner.quantize(weight, hessian, config)

    def method(self) -> Method:
        return Method(f"recording-{self.inner.name}", self.inner.config_class, self, "records its inputs")


def full_name(arch: Architecture, block: int, name: str) -> str:
    return f"{arch.blocks}.{block}.{name}"


def recorded_index(arch: Architecture, block: int, name: str) -> int:
    """The engine quantizes the linears of a block in declaration order, blocks in order."""
    return block * len(arch.linear_names) + arch.linear_names.index(name)


@torch.no_grad()
def reference_hessians(
    original: nn.Module,
    arch: Architecture,
    result: EngineResult,
    calibration: torch.Tensor,
    true_sequential: bool,
    quantize_earlier_blocks: bool = True,
) -> dict[tuple[int, int], torch.Tensor]:
    """``2 X^T X / T`` (float64) of the input of each (block, group), from hooks on a plain forward."""
    model = copy.deepcopy(original)
    blocks = get_blocks(model, arch)
    hessians = {}
    for b in range(len(blocks)):
        for g, group in enumerate(arch.linear_groups):
            for bb, block in enumerate(blocks):
                for gg, other in enumerate(arch.linear_groups):
                    quantized = (quantize_earlier_blocks and bb < b) or (true_sequential and bb == b and gg < g)
                    for name in other:
                        source = (
                            result.weights[full_name(arch, bb, name)].dequantize()
                            if quantized
                            else get_module(get_blocks(original, arch)[bb], name).weight.data
                        )
                        get_module(block, name).weight.data = source.clone()
            inputs: list[torch.Tensor] = []
            hook = get_module(blocks[b], group[0]).register_forward_hook(
                lambda _m, args, _out, inputs=inputs: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
            )
            try:
                model(calibration, use_cache=False)  # one batch: the same tokens as one sample at a time
            finally:
                hook.remove()
            x = torch.cat(inputs).double()
            hessians[(b, g)] = 2 * x.T @ x / x.shape[0]
    return hessians


def assert_hessian_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=rtol * float(expected.abs().max()), check_dtype=False
    )


def run_engine(
    model: nn.Module,
    calibration: torch.Tensor,
    method_name: str,
    options: dict[str, Any],
    engine: EngineConfig | None = None,
) -> tuple[EngineResult, Recording, list[LayerRecord]]:
    inner = get_method(method_name)
    recording = Recording(inner)
    seen: list[LayerRecord] = []
    result = quantize_model(
        model,
        get_architecture(model),
        calibration,
        recording.method(),
        inner.make_config(**options),
        engine,
        on_layer=seen.append,
        progress=False,
    )
    return result, recording, seen


# --- end to end on every architecture ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method_name", "options"),
    [("gptq", {"bits": 4, "group_size": 32}), ("billm", {})],
    ids=["gptq4-g32", "billm"],
)
@pytest.mark.parametrize("arch_name", ARCH_NAMES)
def test_quantize_model_end_to_end(
    arch_name: str,
    method_name: str,
    options: dict[str, Any],
    make_tiny_model: Callable[..., nn.Module],
    make_ids: Callable[..., torch.Tensor],
) -> None:
    model = make_tiny_model(arch_name, **ARCH_OVERRIDES.get(arch_name, {}))
    original = copy.deepcopy(model)
    arch = get_architecture(model)
    untouched = {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if not any(name == f"{full_name(arch, b, n)}.weight" for b in range(2) for n in arch.linear_names)
    }
    calibration = make_ids(NSAMPLES, SEQLEN, seed=1)

    result, recording, seen = run_engine(model, calibration, method_name, options)

    blocks = get_blocks(model, arch)
    expected_names = [full_name(arch, b, n) for b in range(len(blocks)) for n in arch.linear_names]
    assert list(result.weights) == expected_names
    assert [(r.block, r.name) for r in result.records] == [
        (b, n) for b in range(len(blocks)) for n in arch.linear_names
    ]
    assert seen == result.records  # on_layer saw every record, in order
    assert len(recording.weights) == len(expected_names)
    weight_class = UniformWeight if method_name == "gptq" else BinaryWeight
    for record in result.records:
        name = full_name(arch, record.block, record.name)
        linear = block_linears(blocks[record.block], arch)[record.name]
        quantized = result.weights[name]
        assert isinstance(quantized, weight_class)
        assert quantized.shape == record.shape == tuple(linear.weight.shape)
        assert record.numel == linear.weight.numel()
        assert record.storage_bits_total == quantized.storage_bits_total
        assert record.storage_bits == pytest.approx(quantized.storage_bits)
        assert record.compute_bits == quantized.compute_bits
        # the model now computes with exactly the structured weight
        assert linear.weight.dtype == torch.float32 and linear.weight.device.type == "cpu"
        assert torch.equal(linear.weight.data, quantized.dequantize())
        # the method got the original float32 weight
        original_weight = get_module(get_blocks(original, arch)[record.block], record.name).weight
        assert torch.equal(recording.weights[recorded_index(arch, record.block, record.name)], original_weight)
        assert not torch.equal(linear.weight.data, original_weight)
        assert torch.isfinite(torch.tensor(record.relative_error))
        assert record.relative_error > 0
        if method_name == "gptq":
            assert record.compute_bits == 4.0 and record.relative_error < 0.05
        else:
            assert 1.0 <= record.compute_bits <= 2.0 and record.relative_error < 1.0
        assert record.storage_bits > record.compute_bits

    # embeddings, norms, biases and the LM head are left alone
    for name, param in model.named_parameters():
        if name in untouched:
            assert torch.equal(param, untouched[name]), name

    with torch.no_grad():
        logits = model(make_ids(2, SEQLEN, seed=2)).logits
    assert torch.isfinite(logits).all()

    # Every Hessian is 2 X^T X / T of what the linear sees in a plain forward of the model whose earlier
    # blocks are quantized: the next block's calibration inputs come from the quantized block.
    expected = reference_hessians(original, arch, result, calibration, true_sequential=False)
    for (b, g), hessian in expected.items():
        for name in arch.linear_groups[g]:  # a group shares one Hessian
            assert_hessian_close(recording.hessians[recorded_index(arch, b, name)], hessian)
    # ... and not from the original block 0: that would give another block-1 Hessian.
    unquantized_inputs = reference_hessians(
        original, arch, result, calibration, true_sequential=False, quantize_earlier_blocks=False
    )
    first = recording.hessians[recorded_index(arch, 1, arch.linear_names[0])].double()
    assert not torch.allclose(first, unquantized_inputs[(1, 0)], rtol=1e-3, atol=0)


# --- the Hessian the method receives -----------------------------------------------------------------------


def test_block0_hessian_is_2xtx_over_tokens_of_the_captured_inputs(
    make_tiny_model: Callable[..., nn.Module], make_ids: Callable[..., torch.Tensor]
) -> None:
    model = make_tiny_model("llama")
    arch = get_architecture(model)
    calibration = make_ids(NSAMPLES, SEQLEN, seed=3)
    first = block_linears(get_blocks(model, arch)[0], arch)[arch.linear_groups[0][0]]
    inputs: list[torch.Tensor] = []
    hook = first.register_forward_hook(lambda _m, args, _out: inputs.append(args[0].detach().clone()))
    with torch.no_grad():
        for sample in calibration:
            model(sample.unsqueeze(0), use_cache=False)
    hook.remove()
    x = torch.cat(inputs).reshape(-1, first.in_features)
    assert x.shape[0] == NSAMPLES * SEQLEN
    expected = 2 * x.T @ x / x.shape[0]

    result, recording, _ = run_engine(model, calibration, "rtn", {"bits": 2})

    received = recording.hessians[0]
    assert received.dtype == torch.float32 and received.shape == (first.in_features,) * 2
    torch.testing.assert_close(received, expected)  # float32 defaults: rtol 1.3e-6
    # q, k and v read one input: the same Hessian for the three
    for name in arch.linear_groups[0][1:]:
        assert torch.equal(recording.hessians[recorded_index(arch, 0, name)], received)
    # the accumulator alone gives the same statistic
    acc = HessianAccumulator(first.in_features)
    for chunk in inputs:
        acc.add(chunk)
    assert acc.tokens == NSAMPLES * SEQLEN
    torch.testing.assert_close(acc.hessian(), expected)
    # rtn ignores the Hessian, so the engine's weights are plain rtn
    rtn = get_method("rtn")
    assert torch.equal(
        result.weights[full_name(arch, 0, "mlp.up_proj")].dequantize(),
        rtn.quantize(
            recording.weights[recorded_index(arch, 0, "mlp.up_proj")], None, rtn.make_config(bits=2)
        ).dequantize(),
    )


def test_hessian_accumulator_counts_tokens_not_sequences() -> None:
    acc = HessianAccumulator(3, torch.float64)
    a = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]])  # [1, 2 tokens, 3]
    b = torch.tensor([[[1.0, 1.0, 1.0]]])  # [1, 1 token, 3]
    acc.add(a)
    acc.add(b)
    x = torch.cat([a[0], b[0]]).double()
    assert acc.tokens == 3
    assert acc.sum.dtype == torch.float64
    torch.testing.assert_close(acc.hessian(), 2 * x.T @ x / 3)
    acc.reduce_()  # no process group: a no-op
    assert acc.tokens == 3
    with pytest.raises(RuntimeError, match="no calibration tokens"):
        HessianAccumulator(3).hessian()


def test_true_sequential_sees_the_quantized_earlier_groups(
    make_tiny_model: Callable[..., nn.Module], make_ids: Callable[..., torch.Tensor]
) -> None:
    calibration = make_ids(NSAMPLES, SEQLEN, seed=4)
    options = {"bits": 2, "group_size": 32}
    runs = {}
    for sequential in (False, True):
        model = make_tiny_model("qwen3")
        original = copy.deepcopy(model)
        arch = get_architecture(model)
        result, recording, _ = run_engine(model, calibration, "gptq", options, EngineConfig(true_sequential=sequential))
        expected = reference_hessians(original, arch, result, calibration, true_sequential=sequential)
        for (b, g), hessian in expected.items():
            assert_hessian_close(recording.hessians[recorded_index(arch, b, arch.linear_groups[g][0])], hessian)
        runs[sequential] = (recording, result)

    plain, sequential = runs[False][0], runs[True][0]
    # the first group of the first block sees the same inputs either way ...
    assert torch.equal(plain.hessians[0], sequential.hessians[0])
    # ... every later group of block 0 sees the quantized earlier groups only in true-sequential mode
    for group in arch.linear_groups[1:]:
        index = recorded_index(arch, 0, group[0])
        assert not torch.allclose(plain.hessians[index], sequential.hessians[index], rtol=1e-4, atol=0)
    for name, weight in runs[True][1].weights.items():
        assert torch.isfinite(weight.dequantize()).all(), name


def test_hessian_dtype_float64(
    make_tiny_model: Callable[..., nn.Module], make_ids: Callable[..., torch.Tensor]
) -> None:
    model = make_tiny_model("llama")
    original = copy.deepcopy(model)
    arch = get_architecture(model)
    calibration = make_ids(NSAMPLES, SEQLEN, seed=5)
    result, recording, _ = run_engine(
        model, calibration, "gptq", {"bits": 3, "group_size": 32}, EngineConfig(hessian_dtype="float64")
    )
    assert {h.dtype for h in recording.hessians} == {torch.float64}
    assert {w.dtype for w in recording.weights} == {torch.float32}
    expected = reference_hessians(original, arch, result, calibration, true_sequential=False)
    for (b, g), hessian in expected.items():
        assert_hessian_close(recording.hessians[recorded_index(arch, b, arch.linear_groups[g][0])], hessian)
    assert all(0 < r.relative_error < 0.2 for r in result.records)
    for block in get_blocks(model, arch):
        assert {lin.weight.dtype for lin in block_linears(block, arch).values()} == {torch.float32}


def test_engine_config_is_validated() -> None:
    with pytest.raises(BinqError, match="--hessian-dtype must be one of float32, float64"):
        EngineConfig(hessian_dtype="float16")
    if not torch.cuda.is_available():
        with pytest.raises(BinqError, match="no CUDA device is available"):
            EngineConfig(device="cuda")


def test_non_finite_weight_is_named(
    make_tiny_model: Callable[..., nn.Module], make_ids: Callable[..., torch.Tensor]
) -> None:
    model = make_tiny_model("llama")
    arch = get_architecture(model)
    # Poisoned after the Hessians of block 1 exist: only the weight check can catch it.
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    method = get_method("gptq")
    with pytest.raises(BinqError, match=r"model\.layers\.1\.mlp\.down_proj: the weight has NaN or Inf"):
        quantize_model(model, arch, make_ids(2, 16), method, method.make_config(), progress=False)


# --- capture -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text", "opt"])
def test_capture_records_block0_inputs_and_per_block_arguments(
    arch_name: str, make_tiny_model: Callable[..., nn.Module], make_ids: Callable[..., torch.Tensor]
) -> None:
    model = make_tiny_model(arch_name, **ARCH_OVERRIDES.get(arch_name, {}))
    arch = get_architecture(model)
    blocks = get_blocks(model, arch)
    originals = list(blocks)
    samples = make_ids(3, 16, seed=6)

    # what block 0 receives, and what the last block returns, in a plain forward
    received: list[torch.Tensor] = []
    returned: list[torch.Tensor] = []
    hooks = [
        blocks[0].register_forward_pre_hook(
            lambda _m, args, kwargs: received.append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        ),
        blocks[-1].register_forward_hook(
            lambda _m, _args, out: returned.append((out[0] if isinstance(out, tuple) else out).clone())
        ),
    ]
    with torch.no_grad():
        before = model(samples).logits
    for hook in hooks:
        hook.remove()

    inputs = capture_block_inputs(model, blocks, samples)

    assert all(a is b for a, b in zip(blocks, originals, strict=True))
    assert not any(isinstance(m, _Recorder) for m in model.modules())
    assert len(inputs.hidden_states) == len(samples)
    assert len(inputs.args) == len(inputs.kwargs) == len(blocks)
    for n, captured in enumerate(inputs.hidden_states):
        assert captured.shape == (1, 16, model.config.hidden_size)
        torch.testing.assert_close(captured, received[0][n : n + 1])
    if arch_name != "opt":
        # llama-like models: block 0 reads the (scaled, for Gemma) token embedding itself
        with torch.no_grad():
            embedded = get_module(model, arch.embeddings[0])(samples[1].unsqueeze(0))
        assert torch.equal(inputs.hidden_states[1], embedded)
    for kwargs in inputs.kwargs:
        assert not {"past_key_value", "past_key_values", "use_cache", "output_attentions"} & set(kwargs)
    # running the blocks on the captured per-block arguments reproduces the model's own forward
    with torch.no_grad():
        hidden = inputs.hidden_states[2]
        for index, block in enumerate(blocks):
            out = block(hidden, *inputs.args[index], **inputs.kwargs[index])
            hidden = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(hidden, returned[0][2:3])
        # and the model itself is unchanged
        torch.testing.assert_close(model(samples).logits, before, rtol=0, atol=0)


def test_capture_restores_blocks_when_the_forward_raises(
    make_tiny_model: Callable[..., nn.Module], make_ids: Callable[..., torch.Tensor]
) -> None:
    model = make_tiny_model("llama")
    arch = get_architecture(model)
    blocks = get_blocks(model, arch)
    originals = list(blocks)
    samples = make_ids(3, 8)
    samples[1, 3] = model.config.vocab_size + 100  # the second sample fails in the embedding lookup
    with pytest.raises(IndexError):
        capture_block_inputs(model, blocks, samples)
    assert all(a is b for a, b in zip(blocks, originals, strict=True))
    assert not any(isinstance(m, _Recorder) for m in model.modules())

    calls = 0

    def explode(_m: nn.Module, _args: tuple) -> None:
        nonlocal calls
        calls += 1
        raise KeyboardInterrupt

    hook = get_module(model, arch.embeddings[0]).register_forward_pre_hook(explode)
    with pytest.raises(KeyboardInterrupt):
        capture_block_inputs(model, blocks, make_ids(2, 8))
    hook.remove()
    assert calls == 1
    assert all(a is b for a, b in zip(blocks, originals, strict=True))
    with torch.no_grad():
        assert torch.isfinite(model(make_ids(1, 8)).logits).all()
