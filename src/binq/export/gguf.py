"""Export a binq checkpoint to GGUF for llama.cpp, every quantized linear in a type that holds it exactly.

What is written (docs/FORMAT.md, "GGUF export"; one registry, :data:`LAYOUT_EXPORTS`, per layout):

- a ``binary`` linear in Q1_0's form (one fp16 scale per 128 weights of a row times a sign, see
  :mod:`binq.export.q1_0`) whose width is a multiple of 128 as ``Q1_0``, bit for bit; one whose width is
  not as ``F16``, dequantized: still exact, since its values are fp16 scales with a sign;
- a ``uniform`` linear (``rtn``/``gptq`` integer grids) as the smallest of ``Q4_0``, ``Q4_1``, ``Q5_0``,
  ``Q5_1``, ``Q8_0`` that gives every code of every (row, group) grid binq's value bit for bit, its
  codes written as they are (see :mod:`binq.export.uniform`): symmetric 4-bit g32 is Q4_0, 5-bit Q5_0,
  8-bit Q8_0; asymmetric 4-bit is Q4_1 only where every ``-zero * scale`` is an fp16 number, else Q5_0.
  Groups that are multiples of 32 map to several blocks with the same scale. Where no block type fits
  (rows not a multiple of 32 wide, act-order groups, groups under 32), ``F16`` if every value is an fp16
  number, else ``F32``; each such choice is logged with its reason;
- any other layout (means, bitmaps, salient residuals, column scales, multiscale) is refused,
  naming the method that does fit;
- 1-D tensors (norms, biases) as ``F32``; other unquantized tensors as ``F16`` when stored in fp16,
  else ``F32``;
- a folder that is not a binq checkpoint (no binq ``quantization_config``: the embedded model's fp16
  folder, a Hugging Face safetensors folder) has no quantized linear: every tensor is unquantized and
  written as the line above says, so the file holds exactly the folder's weights (the source that
  llama.cpp's own quantizer starts from in ``benchmarks/llamacpp_frontier.py``);
- the file type: that of the block type holding most of the linears' weights (F16/F32 where none has one);
- llama.cpp's metadata: with ``like`` (a GGUF of the same model, e.g. the one binq quantized), every
  key-value pair of it but the file type; without, binq writes it all itself
  (:mod:`binq.export.gguf_metadata`): the hyperparameters from config.json, the tokenizer from the
  checkpoint's tokenizer files.

Architectures (:data:`~binq.export.gguf_metadata.GGUF_ARCHS`, one entry per HF ``model_type``): llama
and mistral as llama.cpp's ``llama``, qwen2, qwen3, gemma, gemma2 and gemma3_text as their llama.cpp
namesakes (gemma3_text as ``gemma3``). Tensor names come from gguf's own map for the architecture.
llama.cpp's ``llama`` uses interleaved rotary pairs, so llama/mistral q/k rows (and biases) are permuted
as its converter does (a row permutation: blocks, which run along rows, stay whole); the others use
NeoX-style rotary, HF's own layout, and are written as they are. Gemma stores RMSNorm weights as
``w - 1`` (every norm, q/k norms included), llama.cpp as ``w``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from binq.checkpoint.files import open_tensors
from binq.checkpoint.format import packed_key
from binq.checkpoint.load import is_checkpoint, read_quantization_config
from binq.errors import BinqError
from binq.export.ggml_blocks import GgmlTensor
from binq.export.gguf_metadata import GGUF_ARCHS, copy_metadata, write_metadata
from binq.export.q1_0 import q1_0_form_problem, q1_0_tensor
from binq.export.uniform import uniform_tensor
from binq.quant.structured import BinaryWeight, QuantizedWeight, UniformWeight, layout_class

log = logging.getLogger(__name__)

REFUSAL_HINT = (
    "GGUF holds a sign times one fp16 scale per 128 weights of a row (Q1_0) and integer grids (Q4_0 to Q8_0); "
    "quantize with `binq quantize --method rtn --bits 1 --group-size 128` (no --centred) or with the bitmap-free "
    "per-group ARB variant (`--method arb-group`) for Q1_0, or with `--method rtn` or `--method gptq` and "
    "`--bits 4 --group-size 32 --sym` for Q4_0"
)


@dataclass(frozen=True)
class LayoutExport:
    """How the linears of one binq layout become GGUF tensors."""

    types: str  # the ggml types the layout can become, for refusals
    problem: Callable[[Any], str | None]  # why a weight of the layout cannot be exported, or None
    tensor: Callable[[Any], GgmlTensor]  # the tensor of a weight that can


LAYOUT_EXPORTS: dict[str, LayoutExport] = {
    BinaryWeight.layout: LayoutExport("Q1_0", q1_0_form_problem, q1_0_tensor),
    UniformWeight.layout: LayoutExport("Q4_0/Q4_1/Q5_0/Q5_1/Q8_0", lambda weight: None, uniform_tensor),
}

# llama.cpp's general.file_type for the block type that holds most of the linears' weights.
FILE_TYPES: dict[gguf.GGMLQuantizationType, gguf.LlamaFileType] = {
    gguf.GGMLQuantizationType.Q1_0: gguf.LlamaFileType.MOSTLY_Q1_0,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    gguf.GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
}


def rope_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row index that turns HF's rotary layout into llama.cpp's (its converter's ``permute``)."""
    head_dim = rows // n_head
    return torch.arange(rows).reshape(n_head, 2, head_dim // 2).transpose(1, 2).reshape(rows)


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise BinqError(f"no llama.cpp name for tensor '{hf_name}'")
    return mapped


def _qk_heads(module: str, config: dict[str, Any]) -> int | None:
    if module.endswith("self_attn.q_proj"):
        return config["num_attention_heads"]
    if module.endswith("self_attn.k_proj"):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def _linear_tensor(module: str, weight: QuantizedWeight, method: str) -> GgmlTensor:
    export = LAYOUT_EXPORTS.get(weight.layout)
    if export is None:
        raise BinqError(
            f"cannot export {method} to GGUF: {module}: layout '{weight.layout}' has no llama.cpp type. {REFUSAL_HINT}"
        )
    problem = export.problem(weight)
    if problem is not None:
        raise BinqError(f"cannot export {method} to GGUF {export.types}: {module}: {problem}. {REFUSAL_HINT}")
    return export.tensor(weight)


def _log_choices(tensors: dict[str, GgmlTensor]) -> None:
    """One line per (type, reason) for the linears not written in their layout's own type."""
    noted: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, tensor in tensors.items():
        if tensor.note is not None:
            noted[(tensor.ggml_type.name, tensor.note)].append(module)
    for (type_name, note), modules in noted.items():
        shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
        log.info("%s for %d linear(s) (%s): %s", type_name, len(modules), shown, note)


def _file_type(
    tensors: dict[str, GgmlTensor], shapes: dict[str, tuple[int, int]], plain: dict[str, torch.Tensor]
) -> gguf.LlamaFileType:
    """The block type holding most of the linears' weights (F16/F32 only where no linear has one).

    Without quantized linears (an unquantized folder), the type most of the 2-D plain tensors are written in.
    """
    weights: dict[gguf.GGMLQuantizationType, int] = defaultdict(int)
    for module, tensor in tensors.items():
        weights[tensor.ggml_type] += shapes[module][0] * shapes[module][1]
    if not weights:
        for tensor in plain.values():
            if tensor.dim() == 2:
                fp16 = tensor.dtype == torch.float16
                weights[gguf.GGMLQuantizationType.F16 if fp16 else gguf.GGMLQuantizationType.F32] += tensor.numel()
    blocks = [t for t in weights if t not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)]
    if not weights:
        return gguf.LlamaFileType.MOSTLY_F16
    return FILE_TYPES[max(blocks or weights, key=lambda t: weights[t])]


def _plain_array(name: str, tensor: torch.Tensor, norm_offset: float) -> np.ndarray:
    if tensor.dim() == 1:
        tensor = tensor.float()
        if norm_offset and name.endswith("norm.weight"):
            tensor = tensor + norm_offset
        return tensor.numpy()
    return tensor.to(torch.float16 if tensor.dtype == torch.float16 else torch.float32).contiguous().numpy()


def export_gguf(folder: Path | str, out: Path | str, like: Path | str | None = None) -> Path:
    """Write the checkpoint in ``folder`` as the GGUF file ``out`` (see the module docstring)."""
    folder, out = Path(folder), Path(out)
    # An unquantized folder has no quantized linear: every tensor is written as stored (module docstring).
    quantization = read_quantization_config(folder) if is_checkpoint(folder) else {"modules": {}}
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = GGUF_ARCHS.get(config.get("model_type", ""))
    if arch is None:
        raise BinqError(f"GGUF export supports model types {', '.join(GGUF_ARCHS)}, not {config.get('model_type')!r}")

    modules = {name: (entry["layout"], entry["metadata"]) for name, entry in quantization["modules"].items()}
    method = quantization.get("method") or "this method"
    linears: dict[str, GgmlTensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    with open_tensors(folder) as (entries, get_tensor):
        for module, (layout, metadata) in modules.items():
            prefix = module + "."
            tensors = {
                n[len(prefix) :]: get_tensor(n)
                for n in entries
                if n.startswith(prefix) and n[len(prefix) :] != "bias" and "." not in n[len(prefix) :]
            }
            try:
                weight = layout_class(layout).from_packed(tensors, metadata)
            except BinqError as error:
                raise BinqError(f"{module}: {error}") from None
            linears[module] = _linear_tensor(module, weight, method)
            shapes[module] = weight.shape
        plain = {n: get_tensor(n) for n in entries if n.rpartition(".")[0] not in modules}
        biases = [packed_key(m, "bias") for m in modules if packed_key(m, "bias") in entries]
        plain.update({n: get_tensor(n) for n in biases})

    name_map = gguf.TensorNameMap(arch.gguf_arch, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    if like is not None:
        copy_metadata(writer, Path(like))
    else:
        write_metadata(writer, arch, config, folder)
    writer.add_file_type(_file_type(linears, shapes, plain))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    _log_choices(linears)
    counts: dict[str, int] = defaultdict(int)
    for module, tensor in sorted(linears.items()):
        heads = _qk_heads(module, config) if arch.permute_qk else None
        data = tensor.data if heads is None else tensor.data[rope_row_order(shapes[module][0], heads)]
        counts[tensor.ggml_type.name] += 1
        raw = tensor.ggml_type if data.dtype == torch.uint8 else None  # F16/F32 follow the array's dtype
        writer.add_tensor(_gguf_name(name_map, packed_key(module, "weight")), data.contiguous().numpy(), raw_dtype=raw)
    for name, tensor in sorted(plain.items()):
        module = name.rpartition(".")[0]
        # q/k biases of a quantized checkpoint, and the q/k weights too of an unquantized folder.
        heads = _qk_heads(module, config) if arch.permute_qk else None
        if heads is not None:
            tensor = tensor[rope_row_order(tensor.shape[0], heads)]
        writer.add_tensor(_gguf_name(name_map, name), _plain_array(name, tensor, arch.norm_offset))
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    written = ", ".join(f"{count} as {name}" for name, count in sorted(counts.items()))
    log.info("wrote %s, every linear exact: %s", out, written or "none quantized (every tensor as stored)")
    return out
