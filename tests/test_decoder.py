"""The lean decoder and the fp16 embeddings compute what the model's own forward computes."""

from __future__ import annotations

import pytest
import torch

from binq.engine.calibrate import quantize_model
from binq.methods import get_method
from binq.models import get_architecture
from binq.nn import BinaryLinear
from binq.nn.cpu_kernels import fused_call, kernel_state_bytes
from binq.nn.decoder import HalfEmbedding, HalfLinear, LeanDecoder, compact_embeddings, lean_unsupported
from conftest import build_tiny_model, random_ids


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_prefill_then_steps_give_the_forward_logits(arch: str) -> None:
    model = build_tiny_model(arch, seed=1)
    ids = random_ids(1, 12, seed=2)[0]
    with torch.inference_mode():
        want = model(ids.unsqueeze(0)).logits[0]
    decoder = LeanDecoder(model, max_length=16)
    assert decoder.native is not None  # the compiled decode-step glue
    for native in (decoder.native, None):  # and the same steps in torch ops
        decoder.native = native
        decoder.reset()
        prefill = decoder.forward(ids[:7], all_logits=True)
        steps = [decoder.forward(ids[i : i + 1]) for i in range(7, 12)]
        got = torch.cat([prefill, *steps])
        assert got.shape == want.shape
        assert _relative(got, want) < 1e-5
    decoder.reset()
    assert _relative(decoder.forward(ids), want[-1:]) < 1e-5


def test_a_quantized_model_decodes_through_the_kernels_as_its_forward() -> None:
    model = build_tiny_model("llama", seed=3)
    spec = get_method("rtn")
    result = quantize_model(model, get_architecture(model), random_ids(2, 16), spec, spec.make_config(), progress=False)
    for name, weight in result.weights.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, BinaryLinear.from_weight(weight))
    assert any(isinstance(m, BinaryLinear) for m in model.modules())
    attn = model.model.layers[0].self_attn
    fused = fused_call([attn.q_proj, attn.k_proj, attn.v_proj])  # one kernel for q, k and v
    assert fused is not None and fused.sizes == [64, 32, 32]
    assert not attn.q_proj._kernel_state  # the re-packed bits exist once, in the fused kernel
    ids = random_ids(1, 9, seed=4)[0]
    with torch.inference_mode():
        want = model(ids.unsqueeze(0)).logits[0, -1:]
    decoder = LeanDecoder(model, max_length=9)
    assert decoder.buffers is not None  # every linear has a kernel plan: the step runs as compiled calls only
    decoder.forward(ids[:5])
    for i in range(5, 8):
        decoder.forward(ids[i : i + 1])
    assert _relative(decoder.forward(ids[8:9]), want) < 1e-5
    model._binq_lean_decoder = decoder
    packed = sum(t.numel() for m in model.modules() if isinstance(m, BinaryLinear) for t in m.packed_tensors().values())
    assert 0 < kernel_state_bytes(model) < 2 * packed  # a re-packing of the same bits, plus fp32 scales


def test_cache_overflow_and_unsupported_models_are_refused() -> None:
    model = build_tiny_model("llama")
    decoder = LeanDecoder(model, max_length=4)
    with pytest.raises(ValueError, match="exceeds the cache"):
        decoder.forward(torch.arange(5))
    opt = build_tiny_model("opt")
    assert "not one of" in lean_unsupported(opt, 16)
    with pytest.raises(ValueError, match="cannot run"):
        LeanDecoder(opt, 16)
    windowed = build_tiny_model("mistral", sliding_window=8)
    assert "sliding" in lean_unsupported(windowed, 16)
    assert lean_unsupported(windowed, 8) is None


def test_compact_embeddings_is_exact_and_keeps_ties() -> None:
    model = build_tiny_model("llama", tie_word_embeddings=True)
    model.tie_weights()
    with torch.no_grad():  # fp16-representable weights, as a binq checkpoint stores them
        model.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight.half().float())
    ids = random_ids(1, 10)[0].unsqueeze(0)
    with torch.inference_mode():
        want = model(ids).logits
    saved = compact_embeddings(model)
    assert isinstance(model.get_input_embeddings(), HalfEmbedding)
    assert isinstance(model.get_output_embeddings(), HalfLinear)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert saved == model.get_input_embeddings().weight.numel() * 2
    with torch.inference_mode():
        got = model(ids).logits
    assert got.dtype == torch.float32
    assert _relative(got, want) < 1e-5


def test_compact_embeddings_leaves_weights_fp16_cannot_hold() -> None:
    model = build_tiny_model("llama", tie_word_embeddings=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight.half().float())
        model.get_output_embeddings().weight.add_(1e-9 + 1e-4 * torch.rand_like(model.get_output_embeddings().weight))
    compact_embeddings(model)
    assert isinstance(model.get_input_embeddings(), HalfEmbedding)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


@pytest.mark.parametrize("stored", [torch.float16, torch.float32])
def test_a_checkpoint_loads_with_fp16_embeddings_computing_the_same_numbers(tmp_path, stored: torch.dtype) -> None:
    from binq.checkpoint import load
    from test_checkpoint import save_tiny

    save_tiny(tmp_path, "rtn", {"group_size": 32}, dtype=stored, tie_word_embeddings=False)
    ids = random_ids(1, 10)[0].unsqueeze(0)
    plain = load(tmp_path)
    compact_embeddings(plain)
    direct = load(tmp_path, fp16_embeddings=True)
    embed = direct.get_input_embeddings()
    if stored == torch.float16:  # read in fp16, widened but for the embeddings
        assert isinstance(embed, HalfEmbedding) and isinstance(direct.get_output_embeddings(), HalfLinear)
        assert direct.model.norm.weight.dtype == torch.float32
    with torch.inference_mode():
        assert torch.equal(direct(ids).logits, plain(ids).logits)
