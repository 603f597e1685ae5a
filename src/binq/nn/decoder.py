"""A lean decode loop for LLaMA-family models, and fp16 embeddings that stay fp16 in memory.

transformers' generic forward spends more time per decoded token on Python (cache objects growing by
``torch.cat``, mask construction, output dataclasses) than binq's kernels spend on all the quantized
linears of a small model. :class:`LeanDecoder` runs the same modules (the model's own norms, MLPs,
projections, rotary embedding) with a preallocated KV cache and plain tensor code for the attention, so
a decode step is the layers' arithmetic and little else. It computes what the model's forward computes
(tests compare the logits); architectures it does not cover (``supports`` says why) use the model's
own forward.

:func:`compact_embeddings` replaces the token embedding and the output head by modules that keep their
weight in fp16 (exactly: it refuses weights that fp16 does not represent) and compute in fp32: half the
memory of an fp32 copy, and for the head half the bandwidth per token (:func:`~binq.nn.cpu_kernels.half_linear`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class HalfEmbedding(nn.Module):
    """``nn.Embedding`` with an fp16 table; looks rows up in fp16 and returns ``out_dtype``."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.padding_idx = padding_idx
        self.out_dtype = out_dtype

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.out_dtype)


class HalfLinear(nn.Module):
    """``nn.Linear`` with an fp16 weight, fp32 activations and fp32 accumulation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from binq.nn.cpu_kernels import half_linear

        if x.device.type != "cpu":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        return half_linear(x, self.weight, self.bias).to(x.dtype)


def _exactly_half(weight: torch.Tensor, rows_per_check: int = 4096) -> torch.Tensor | None:
    """``weight`` in fp16 when fp16 holds every value exactly, else None (checked in slices of rows, so
    that no second full-precision copy exists)."""
    half = weight.detach().to(torch.float16)
    for start in range(0, weight.shape[0], rows_per_check):
        rows = slice(start, start + rows_per_check)
        if not torch.equal(half[rows].to(weight.dtype), weight.detach()[rows]):
            return None
    return half


def compact_embeddings(model: nn.Module) -> int:
    """Keep the input embedding and the output head in fp16 where that is exact; returns bytes saved.

    A tied head shares the embedding's fp16 table. Weights that fp16 does not represent exactly are left
    as they are (a model loaded from an fp32 source, say), so the model computes the same numbers.
    """
    if next(model.parameters()).device.type != "cpu":
        return 0
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    saved = 0
    if isinstance(embed, nn.Embedding) and embed.weight.dtype == torch.float32:
        half = _exactly_half(embed.weight)
        if half is not None:
            tied = head is not None and getattr(head, "weight", None) is embed.weight
            new_embed = HalfEmbedding(half, embed.padding_idx, embed.weight.dtype)
            model.set_input_embeddings(new_embed)
            saved += embed.weight.numel() * 2
            if tied:
                model.set_output_embeddings(HalfLinear(new_embed.weight, head.bias))
                head = None
    if isinstance(head, nn.Linear) and head.weight.dtype == torch.float32:
        half = _exactly_half(head.weight)
        if half is not None:
            model.set_output_embeddings(HalfLinear(half, head.bias))
            saved += head.weight.numel() * 2
    return saved


def widen_except_embeddings(model: nn.Module, dtype: torch.dtype) -> None:
    """A model read in fp16: the embedding and head become :class:`HalfEmbedding` / :class:`HalfLinear`
    (their fp16 weights kept, a tied head sharing the embedding's), everything else is widened to ``dtype``
    (fp16 to fp32 is exact), except the packed tensors of quantized linears, which never change dtype."""
    from binq.nn.binary_linear import BinaryLinear

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embed.weight
    new_embed = HalfEmbedding(embed.weight, embed.padding_idx, dtype)
    model.set_input_embeddings(new_embed)
    if head is not None:
        bias = None if head.bias is None else nn.Parameter(head.bias.detach().to(dtype), requires_grad=False)
        model.set_output_embeddings(HalfLinear(new_embed.weight if tied else head.weight, bias))
    kept = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for module in model.modules():
        packed = set(module.packed_names) if isinstance(module, BinaryLinear) else set()
        for name, param in module._parameters.items():
            if param is not None and id(param) not in kept and param.dtype == torch.float16:
                module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in packed and buffer.dtype == torch.float16:
                module._buffers[name] = buffer.to(dtype)
    if hasattr(model.config, "dtype"):
        model.config.dtype = dtype


def lean_unsupported(model: nn.Module, max_length: int) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` up to ``max_length`` tokens, or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LEAN_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(LEAN_MODEL_TYPES)}"
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True) and window is not None
    layer_types = getattr(config, "layer_types", None) or []
    if uses_window and (max_length > window or any(t != "full_attention" for t in layer_types)):
        return f"a sliding attention window ({window}) applies within {max_length} tokens"
    if getattr(config, "rope_scaling", None) and (config.rope_scaling or {}).get("rope_type") == "dynamic":
        return "dynamic rope scaling changes with the sequence length"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "the model has no model.layers / model.rotary_emb"
    return None


def _rms_norm(module: nn.Module, dtype: torch.dtype) -> Any:
    """The model's RMSNorm as three tensor ops when it is the plain fp32 form, else the module itself."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    plain = type(module).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
    if not plain or eps is None or weight is None or dtype != torch.float32 or weight.dtype != torch.float32:
        return module
    return lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


def _module_call(modules: list[nn.Module]) -> Any:
    """Linears without a kernel plan (plain ``nn.Linear``, a GPU, an activation quantizer), called as modules."""
    if len(modules) == 1:
        return modules[0]
    return lambda x: [module(x) for module in modules]


def _plan_call(plan: list[Any], sizes: list[int]) -> Any:
    """A kernel plan (:func:`~binq.nn.cpu_kernels.gemv_plan`) as a call on any number of tokens."""
    from binq.nn.cpu_kernels import run_prepared

    def call(x2d: torch.Tensor) -> Any:
        outputs = [run_prepared(g.prepared, x2d, g.bias) for g in plan]
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return out if len(sizes) == 1 else list(out.split(sizes, dim=-1))

    return call


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """``cat(x2, x1)`` of the last axis' halves; times a sine whose first half is negated, it is
    the usual ``rotate_half(x) * sin``."""
    *lead, dim = x.shape
    return x.reshape(*lead, 2, dim // 2).flip(-2).reshape(*lead, dim)


class LeanDecoder:
    """Batch-1 decoding of a LLaMA-family model with a preallocated KV cache.

    ``forward(ids)`` appends ``ids`` (1-D) to the sequence and returns the logits of its last position
    (or of every position with ``all_logits``). ``reset()`` empties the cache. Each layer's linears are
    resolved once: binq's CPU kernels are called directly, and linears that share an input (q/k/v,
    gate/up) run as one kernel when their layouts allow; the rotary tables are computed once.
    """

    def __init__(self, model: nn.Module, max_length: int) -> None:
        reason = lean_unsupported(model, max_length)
        if reason is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {reason}")
        self.model = model
        self.inner = model.model
        config = model.config
        self.layers = list(self.inner.layers[: config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.scaling = attn.scaling
        self.qk_norm = hasattr(attn, "q_norm")
        self.max_length = max_length
        self.dtype = self.inner.norm.weight.dtype
        self.device = next(model.parameters()).device
        shape = (len(self.layers), self.kv_heads, max_length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.length = 0
        with torch.inference_mode():
            probe = torch.zeros(1, 1, self.head_dim, dtype=self.dtype, device=self.device)
            positions = torch.arange(max_length, device=self.device).unsqueeze(0)
            cos, sin = self.inner.rotary_emb(probe, positions)
            half = self.head_dim // 2
            self.cos = cos[0].to(self.dtype).unsqueeze(1)  # (positions, 1, head_dim)
            self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).to(self.dtype).unsqueeze(1)
        self.steps = [self._resolve(layer) for layer in self.layers]
        self.final_norm = _rms_norm(self.inner.norm, self.dtype)
        self.buffers: dict[str, torch.Tensor] | None = None  # set by _native_glue when _kernel_step applies
        self.native = self._native_glue()

    def _native_glue(self) -> Any:
        """The compiled decode-step helpers when this model's glue is the plain LLaMA form, else None."""
        from binq.nn.cpu_kernels import load_library

        norms = [self.inner.norm] + [
            n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ]
        plain = all(_rms_norm(n, self.dtype) is not n for n in norms)
        silu = getattr(self.model.config, "hidden_act", None) == "silu"
        if not (plain and silu and self.device.type == "cpu" and self.dtype == torch.float32 and self.head_dim <= 512):
            return None
        library = load_library()
        if library is None:
            return None
        self.norm_weights = [
            (layer.input_layernorm.weight.detach().contiguous(), float(layer.input_layernorm.variance_epsilon),
             layer.post_attention_layernorm.weight.detach().contiguous(),
             float(layer.post_attention_layernorm.variance_epsilon))
            for layer in self.layers
        ]  # fmt: skip
        self.final_weight = (self.inner.norm.weight.detach().contiguous(), float(self.inner.norm.variance_epsilon))
        planned = all(f"{name}_c" in step for step in self.steps for name in ("qkv", "o", "gate_up", "down"))
        if planned and not self.qk_norm:
            hidden = self.inner.norm.weight.shape[0]
            ffn = sum(call.rows for call in self.steps[0]["gate_up_c"]) // 2
            sizes = {
                "x": hidden, "qkv": (self.heads + 2 * self.kv_heads) * self.head_dim,
                "att": self.heads * self.head_dim, "o": hidden, "gu": 2 * ffn, "act": ffn, "down": hidden,
            }  # fmt: skip
            self.buffers = {name: torch.empty(1, size) for name, size in sizes.items()}
        return library

    def _resolve(self, layer: Any) -> dict[str, Any]:
        """The layer's calls; with binq's CPU kernels for every linear, also their plans (``*_c``) for the
        decode step that runs without tensor ops (``_kernel_step``)."""
        from binq.nn.cpu_kernels import gemv_plan

        attn, mlp = layer.self_attn, layer.mlp
        step: dict[str, Any] = {
            "norm1": _rms_norm(layer.input_layernorm, self.dtype),
            "norm2": _rms_norm(layer.post_attention_layernorm, self.dtype),
            "act": mlp.act_fn,
        }
        groups = {
            "qkv": [attn.q_proj, attn.k_proj, attn.v_proj],
            "o": [attn.o_proj],
            "gate_up": [mlp.gate_proj, mlp.up_proj],
            "down": [mlp.down_proj],
        }
        for name, modules in groups.items():
            plan = gemv_plan(modules) if self.device.type == "cpu" else None
            if plan is not None:
                step[name + "_c"] = plan
                step[name] = _plan_call(plan, [m.out_features for m in modules])
            else:
                step[name] = _module_call(modules)
        return step

    def reset(self) -> None:
        self.length = 0

    def _attention(self, index: int, layer: Any, step: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = step["qkv"](x)
        q = q.reshape(tokens, self.heads, self.head_dim)
        k = k.reshape(tokens, self.kv_heads, self.head_dim)
        v = v.reshape(tokens, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = layer.self_attn.q_norm(q), layer.self_attn.k_norm(k)
        start, end = self.length, self.length + tokens
        cos, sin = self.cos[start:end], self.sin[start:end]
        q = q * cos + _swap_halves(q) * sin
        k = k * cos + _swap_halves(k) * sin
        self.keys[index, :, start:end] = k.transpose(0, 1)
        self.values[index, :, start:end] = v.transpose(0, 1)
        keys, values = self.keys[index, :, :end], self.values[index, :, :end]
        group = self.heads // self.kv_heads
        if tokens == 1:  # decode: one query row per head, grouped under its key/value head
            scores = (q.reshape(self.kv_heads, group, self.head_dim) @ keys.transpose(1, 2)) * self.scaling
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = (probs @ values).reshape(1, self.heads * self.head_dim)
        else:
            causal = torch.ones(tokens, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=causal,
                scale=self.scaling, enable_gqa=group > 1,
            )  # fmt: skip
            out = out[0].transpose(0, 1).reshape(tokens, self.heads * self.head_dim)
        return step["o"](out)

    def _kernel_step(self, h: torch.Tensor) -> torch.Tensor:
        """One token through every layer as compiled calls on preallocated buffers, no tensor ops.

        Used when every linear has a CPU-kernel plan and the glue is native (``_native_glue``).
        """
        lib, buffers = self.native, self.buffers
        hidden, heads_dim, kv_dim = h.shape[-1], self.heads * self.head_dim, self.kv_heads * self.head_dim
        threads = torch.get_num_threads()
        position = self.length
        x, qkv, attended, o, gate_up, act, down = (
            buffers[k].data_ptr() for k in ("x", "qkv", "att", "o", "gu", "act", "down")
        )
        ffn = buffers["act"].shape[-1]
        h_ptr, add, status = h.data_ptr(), None, 0
        cos, sin = self.cos[position, 0].data_ptr(), self.sin[position, 0].data_ptr()
        for index, step in enumerate(self.steps):
            w1, eps1, w2, eps2 = self.norm_weights[index]
            lib.binq_add_rms_norm(1, hidden, h_ptr, add, w1.data_ptr(), eps1, x)
            offset = qkv
            for call in step["qkv_c"]:
                status |= call(x, offset, threads)
                offset += 4 * call.rows
            status |= lib.binq_attention_step(
                self.heads, self.kv_heads, self.head_dim, self.max_length, position, qkv, qkv + 4 * heads_dim,
                qkv + 4 * (heads_dim + kv_dim), cos, sin, self.keys[index].data_ptr(), self.values[index].data_ptr(),
                self.scaling, attended, threads,
            )  # fmt: skip
            status |= step["o_c"][0](attended, o, threads)
            lib.binq_add_rms_norm(1, hidden, h_ptr, o, w2.data_ptr(), eps2, x)
            offset = gate_up
            for call in step["gate_up_c"]:
                status |= call(x, offset, threads)
                offset += 4 * call.rows
            lib.binq_silu_mul(ffn, gate_up, gate_up + 4 * ffn, act)
            status |= step["down_c"][0](act, down, threads)
            add = down
        if status != 0:
            raise MemoryError("binq CPU kernels: out of memory for their scratch buffers")
        weight, eps = self.final_weight
        out = torch.empty_like(h)
        lib.binq_add_rms_norm(1, hidden, h_ptr, add, weight.data_ptr(), eps, out.data_ptr())
        return out

    def _native_step(self, h: torch.Tensor) -> torch.Tensor:
        """One token through every layer with the compiled glue; returns the final-normed hidden state."""
        lib, hidden = self.native, h.shape[-1]
        threads = torch.get_num_threads()
        position = self.length
        x = torch.empty_like(h)
        attended = torch.empty(1, self.heads * self.head_dim)
        add = None
        for index, (layer, step) in enumerate(zip(self.layers, self.steps, strict=True)):
            w1, eps1, w2, eps2 = self.norm_weights[index]
            lib.binq_add_rms_norm(1, hidden, h.data_ptr(), add, w1.data_ptr(), eps1, x.data_ptr())
            q, k, v = (t.contiguous() for t in step["qkv"](x))
            if self.qk_norm:
                q = layer.self_attn.q_norm(q.view(self.heads, self.head_dim)).contiguous()
                k = layer.self_attn.k_norm(k.view(self.kv_heads, self.head_dim)).contiguous()
            status = lib.binq_attention_step(
                self.heads, self.kv_heads, self.head_dim, self.max_length, position, q.data_ptr(), k.data_ptr(),
                v.data_ptr(), self.cos[position, 0].data_ptr(), self.sin[position, 0].data_ptr(),
                self.keys[index].data_ptr(), self.values[index].data_ptr(), self.scaling, attended.data_ptr(), threads,
            )  # fmt: skip
            if status != 0:
                raise MemoryError("binq attention step: out of memory")
            out = step["o"](attended)
            lib.binq_add_rms_norm(1, hidden, h.data_ptr(), out.data_ptr(), w2.data_ptr(), eps2, x.data_ptr())
            gate, up = (t.contiguous() for t in step["gate_up"](x))
            activated = torch.empty_like(gate)
            lib.binq_silu_mul(gate.numel(), gate.data_ptr(), up.data_ptr(), activated.data_ptr())
            down = step["down"](activated)  # alive until the next add below has read it
            add = down.data_ptr()
        weight, eps = self.final_weight
        lib.binq_add_rms_norm(1, hidden, h.data_ptr(), add, weight.data_ptr(), eps, x.data_ptr())
        return x

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        ids = ids.reshape(-1).to(self.device)
        tokens = ids.shape[0]
        if self.length + tokens > self.max_length:
            raise ValueError(f"sequence of {self.length + tokens} tokens exceeds the cache of {self.max_length}")
        if tokens == 1 and self.native is not None:
            h = self.inner.embed_tokens(ids).to(self.dtype).contiguous().clone()
            x = self._kernel_step(h) if self.buffers is not None else self._native_step(h)
            self.length += 1
            return self._logits(x)
        h = self.inner.embed_tokens(ids).to(self.dtype)
        for index, (layer, step) in enumerate(zip(self.layers, self.steps, strict=True)):
            h = h + self._attention(index, layer, step, step["norm1"](h))
            gate, up = step["gate_up"](step["norm2"](h))
            h = h + step["down"](step["act"](gate) * up)
        self.length += tokens
        return self._logits(self.final_norm(h if all_logits else h[-1:]))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(h)
        scale = getattr(self.model.config, "logit_scale", None)  # none of the lean types uses one today
        return logits * scale if scale is not None and not math.isclose(scale, 1.0) else logits
