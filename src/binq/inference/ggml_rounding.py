"""llama.cpp's CPU arithmetic on a torch model: the activation roundings of its matmuls, reproduced.

A GGUF that ``binq export`` writes holds binq's weights exactly (docs/FORMAT.md), yet llama.cpp's logits
differ from binq's: its CPU backend does not multiply weights by the fp32 activations. What it does
instead on x86 (AVX2/AVX-512), as its source reads; the two roundings are checked bit for bit against
the library llama-cpp-python 0.3.36 builds (``tests/test_ggml_rounding.py``):

- Q4_0, Q5_0, Q8_0 and Q1_0 weights are multiplied against the activations quantized to Q8_0: per
  block of 32 values along the dot product, ``amax = max |x|``, the block's scale ``d = fp16(amax / 127)``
  and ``q = round(x * 127 / amax)`` (round half to even, the SIMD rounding), so each activation becomes
  ``q * d``; the integer sums are then scaled in fp32. :func:`round_q8_0`.
- F16 weights are multiplied against the activations converted to fp16 (its matmul converts the
  right-hand side to the weight's type before its fp16 kernels), products and sums in fp32.
  :func:`round_fp16`. That includes the tied LM head, which reads the F16 embedding.
- Attention (no flash attention, llama-cpp-python's default; the KV cache in fp16, its default):
  keys and values are stored in fp16, ``K Q`` converts the queries to fp16, the softmax runs in
  fp32 and ``V softmax`` converts the probabilities to fp16. :func:`ggml_attention`.
- F32 weights: no rounding (the products in fp32, as binq's).

:func:`llama_cpp_rounding` puts these roundings into a transformers model (forward pre-hooks on its
linears, an attention function): the model then computes, up to the order of fp32 sums, what
llama.cpp computes, which separates llama.cpp's arithmetic from a real difference of the two
graphs (``benchmarks/q1_agreement.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from binq.errors import BinqError

QK8_0 = 32
ATTENTION_NAME = "binq_ggml_rounded"

Rounding = Callable[[torch.Tensor], torch.Tensor]


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 (nearest even, fp16's own rounding) and back, in its own dtype."""
    return x.to(torch.float16).to(x.dtype)


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantized to Q8_0 blocks of 32 along its last dimension, then dequantized (``q * d``).

    Per block: ``amax = max |x|``; ``d = fp16(amax / 127)`` is what the block stores and what the dot
    product scales by; ``q = round(x * (127 / amax))`` (half to even), in -127..127; an all-zero block
    gives zeros. Computed in fp32, as llama.cpp (which quantizes fp32 activations).
    """
    if x.shape[-1] % QK8_0:
        raise BinqError(f"Q8_0 needs rows of a multiple of {QK8_0} values, got {x.shape[-1]}")
    blocks = x.float().reshape(-1, QK8_0)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = (amax / 127).to(torch.float16).float()
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse)
    return (q * d).reshape(x.shape).to(x.dtype)


# The rounding each ggml weight type applies to the activations it multiplies (x86 CPU backend).
ACTIVATION_ROUNDING: dict[str, Rounding | None] = {
    "F32": None,
    "F16": round_fp16,
    "Q1_0": round_q8_0,
    "Q4_0": round_q8_0,
    "Q5_0": round_q8_0,
    "Q8_0": round_q8_0,
}


def linear_types(model: nn.Module, gguf_path: Path | str) -> dict[str, str]:
    """The ggml type of every linear of ``model`` in the GGUF, by module name (``lm_head`` included).

    A tied LM head has no tensor of its own in the GGUF: llama.cpp multiplies by the embedding, whose
    type it gets.
    """
    import gguf

    from binq.export.gguf_metadata import GGUF_ARCHS

    arch = GGUF_ARCHS.get(model.config.model_type)
    if arch is None:
        raise BinqError(f"no llama.cpp architecture for model type {model.config.model_type!r}")
    reader = gguf.GGUFReader(str(gguf_path))
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    name_map = gguf.TensorNameMap(arch.gguf_arch, model.config.num_hidden_layers)
    types: dict[str, str] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "in_features"):
            continue
        mapped = name_map.get_name(name + ".weight", try_suffixes=(".weight",))
        if mapped is None:
            raise BinqError(f"no llama.cpp name for linear '{name}'")
        if mapped not in stored and name == "lm_head":
            mapped = "token_embd.weight"  # tied: llama.cpp multiplies by the embedding
        if mapped not in stored:
            raise BinqError(f"the GGUF has no tensor '{mapped}' for linear '{name}'")
        types[name] = stored[mapped]
    return types


def ggml_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with llama.cpp's roundings: fp16 K/V cache, fp16 queries, fp16 probabilities.

    Plain causal attention only (Llama, Mistral without its window, Qwen): no logit soft-capping, no
    sliding window, no attention sinks; the mask comes in additive, as transformers' eager one.
    """
    del dropout, kwargs
    groups = query.shape[1] // key.shape[1]
    key = round_fp16(key).repeat_interleave(groups, dim=1)
    value = round_fp16(value).repeat_interleave(groups, dim=1)
    scores = torch.matmul(round_fp16(query), key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    output = torch.matmul(round_fp16(probabilities), value)
    return output.transpose(1, 2).contiguous(), probabilities


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, ggml_attention)
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


@contextmanager
def llama_cpp_rounding(model: nn.Module, types: dict[str, str], attention: bool = True) -> Iterator[nn.Module]:
    """Within the block, ``model`` rounds its activations as llama.cpp's CPU backend does.

    ``types``: module name -> ggml type of its weight (:func:`linear_types`); each listed linear gets
    its input rounded (:data:`ACTIVATION_ROUNDING`). ``attention``: also llama.cpp's attention
    (:func:`ggml_attention`). Hooks and attention implementation are restored on exit.
    """
    handles = []
    for name, kind in types.items():
        if kind not in ACTIVATION_ROUNDING:
            raise BinqError(f"{name}: no known activation rounding for ggml type {kind}")
        rounding = ACTIVATION_ROUNDING[kind]
        if rounding is None:
            continue

        def hook(_module: nn.Module, args: tuple, rounding: Rounding = rounding) -> tuple:
            return (rounding(args[0]), *args[1:])

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    previous = model.config._attn_implementation
    try:
        if attention:
            _register_attention()
            model.set_attn_implementation(ATTENTION_NAME)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        if attention:
            model.set_attn_implementation(previous)
