"""Supported decoder architectures, declared as data.

The engine binarizes a model block by block (GPTQ-style). For each block it needs to know which
``nn.Linear`` layers to quantize and which of them read the *same* input: those share one Hessian,
so one calibration pass fills it for the whole group. Supporting a new architecture is therefore one
``Architecture`` entry below, not new engine code. Module names were checked against transformers 5.x
(``modeling_<arch>.py``); ``tests/test_models.py`` builds a tiny model of every entry and checks that
every ``nn.Linear`` in a block is declared exactly once and that each group really shares its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from binq.errors import BinqError


@dataclass(frozen=True)
class Architecture:
    """Where the parts of one family of causal LMs live, as dotted module paths.

    ``linear_groups`` lists a block's linears (names relative to the block), grouped by shared input,
    in execution order: a group may only be quantized after every earlier group, because its input
    depends on their (quantized) outputs.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    linear_groups: tuple[tuple[str, ...], ...]
    embeddings: tuple[str, ...]
    lm_head: str
    # Per linear group: the module (relative to the block) whose output *is* the group's input up to a
    # per-channel scale (a norm's weight, or a linear feeding an elementwise product), so activation
    # smoothing factors can be folded into it exactly; None where none exists. Empty = not supported.
    smoothing_sources: tuple[str | None, ...] = ()
    # The modules between the last block and ``lm_head``, in order (a final norm; OPT-350m's project_out).
    # One the model has as None (OPT-350m has no final norm) is skipped.
    final_modules: tuple[str, ...] = ("model.norm",)

    @property
    def linear_names(self) -> tuple[str, ...]:
        """All declared block linears, flattened in execution order."""
        return tuple(name for group in self.linear_groups for name in group)


# LLaMA and most of its descendants share these names: q/k/v read the pre-attention norm output,
# o_proj reads the attention output, gate/up read the pre-MLP norm output, down reads act(gate) * up.
_LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# o_proj's input comes from v_proj through the attention mix, shared by grouped query heads: not folded.
_LLAMA_SMOOTHING: tuple[str | None, ...] = ("input_layernorm", None, "post_attention_layernorm", "mlp.up_proj")


def _llama_like(
    name: str, *model_types: str, smoothing_sources: tuple[str | None, ...] = _LLAMA_SMOOTHING
) -> Architecture:
    return Architecture(
        name=name,
        model_types=model_types or (name,),
        blocks="model.layers",
        linear_groups=_LLAMA_GROUPS,
        embeddings=("model.embed_tokens",),
        lm_head="lm_head",
        smoothing_sources=smoothing_sources,
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        _llama_like("llama"),  # also SmolLM2 (LlamaForCausalLM)
        _llama_like("mistral"),
        _llama_like("qwen2"),  # q/k/v carry a bias; that changes nothing here
        _llama_like("qwen3"),  # q_norm/k_norm act after the projections, so q/k/v still share input
        # Gemma's norms scale by (1 + weight) and Gemma 2/3 norm again after each sublayer: no smoothing.
        _llama_like("gemma", smoothing_sources=()),
        _llama_like("gemma2", smoothing_sources=()),
        _llama_like("gemma3_text", smoothing_sources=()),  # Gemma3ForCausalLM (text-only, e.g. gemma-3-270m)
        Architecture(
            name="opt",
            model_types=("opt",),
            blocks="model.decoder.layers",
            linear_groups=(
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.out_proj",),
                ("fc1",),
                ("fc2",),
            ),
            # project_in/project_out (OPT-350m) are model-level linears, outside the blocks: they are
            # left in full precision and counted as "other" parameters.
            embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
            lm_head="lm_head",
            final_modules=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        ),
    )
}

_BY_MODEL_TYPE: dict[str, Architecture] = {mt: arch for arch in ARCHITECTURES.values() for mt in arch.model_types}


def architecture_for_model_type(model_type: str) -> Architecture:
    """Look up an architecture by ``config.model_type``; a clear error for anything unsupported."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        supported = ", ".join(sorted(_BY_MODEL_TYPE))
        raise BinqError(f"unsupported model_type '{model_type}' (supported: {supported})") from None


def get_architecture(model: nn.Module | PretrainedConfig) -> Architecture:
    """The architecture of a model (or of its config, to fail before the weights are read)."""
    config = model if isinstance(model, PretrainedConfig) else getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise BinqError(f"{type(model).__name__} has no config.model_type; binq needs a Hugging Face causal LM")
    return architecture_for_model_type(model_type)


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """``root.get_submodule`` with a BinqError naming the path when the model is not laid out as declared."""
    try:
        return root.get_submodule(dotted)
    except AttributeError:
        raise BinqError(f"{type(root).__name__} has no module '{dotted}'") from None


def get_blocks(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    """The decoder blocks, in order."""
    blocks = get_module(model, arch.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise BinqError(f"'{arch.blocks}' of {type(model).__name__} is a {type(blocks).__name__}, not a ModuleList")
    return blocks


class ModelHead(nn.Module):
    """What the model does to the last block's output: its final modules, ``lm_head``, and Gemma 2's logit
    soft-capping where the config sets one. Hidden states ``[..., hidden]`` to logits ``[..., vocab]``."""

    def __init__(self, model: nn.Module, arch: Architecture):
        super().__init__()
        finals = []
        for dotted in arch.final_modules:
            parent, _, name = dotted.rpartition(".")
            module = getattr(get_module(model, parent), name, None)
            if module is not None:
                finals.append(module)
        self.finals = nn.ModuleList(finals)
        self.lm_head = get_module(model, arch.lm_head)
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for module in self.finals:
            hidden = module(hidden)
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def block_linears(block: nn.Module, arch: Architecture) -> dict[str, nn.Linear]:
    """The block's declared linears, in execution order, each checked to be a real ``nn.Linear``.

    Checking here means a model whose layout drifted (a renamed or fused projection) fails loudly
    instead of having layers silently skipped.
    """
    linears: dict[str, nn.Linear] = {}
    for name in arch.linear_names:
        module = get_module(block, name)
        if not isinstance(module, nn.Linear):
            raise BinqError(f"'{name}' in a {arch.name} block is a {type(module).__name__}, not nn.Linear")
        linears[name] = module
    return linears


def module_name(arch: Architecture, index: int, name: str) -> str:
    """The full module name of block ``index``'s module ``name`` (``model.layers.3.self_attn.q_proj``):
    the one key of quantized weights, records, checkpoints and activation plans."""
    return f"{arch.blocks}.{index}.{name}"


@dataclass(frozen=True)
class NamedLinear:
    """One declared block linear: its block, its name in the block, its full module name."""

    block: int
    name: str
    full_name: str
    linear: nn.Linear


def named_linears(model: nn.Module, arch: Architecture) -> list[NamedLinear]:
    """Every declared block linear of ``model``, in model order (block by block, execution order)."""
    return [
        NamedLinear(index, name, module_name(arch, index, name), linear)
        for index, block in enumerate(get_blocks(model, arch))
        for name, linear in block_linears(block, arch).items()
    ]
