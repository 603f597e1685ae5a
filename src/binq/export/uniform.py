"""binq's uniform integer grid written as the smallest llama.cpp type that holds it exactly.

A :class:`~binq.quant.structured.UniformWeight` (``gptq``; ``rtn`` above 1 bit or with ``--grid uniform``) has, per
(row, group), an fp16 ``scale`` and an integer ``zero`` (``2**(bits-1)`` when symmetric), and binq's
value of code ``c`` is ``scale * (c - zero)`` in fp32. A ggml block type of :mod:`binq.export.ggml_blocks`
holds such a weight when its groups cover whole blocks of 32 columns (so each block has one grid) and,
for every code ``0..2**bits-1`` of every (row, group) grid, ggml's fp32 value equals binq's bit for bit,
with ``d = scale`` and:

- offset types (Q4_0, Q5_0, Q8_0): ``x = c - zero``. Exact whenever ``x`` fits the type's range,
  ``x * d`` being exact in fp32; the type then follows from the bits alone when symmetric (Q4_0 up to
  4 bits, Q5_0 at 5, Q8_0 up to 8), and from the largest and smallest zero point when not.
- types with a minimum (Q4_1, Q5_1): ``x = c``, ``m = -zero * scale`` rounded to fp16. ggml's
  ``c * d + m`` equals ``scale * (c - zero)`` exactly if and only if that ``m`` is exactly an fp16
  number (code ``zero`` must give 0; the product ``zero * scale`` is exact in fp32 and needs up to
  11 + log2(zero) significant bits, fp16 has 11), which holds for zero points 0, 1, 2, 4, 8 and
  otherwise only for some scales. One inexact grid puts the whole tensor in the next type.

The candidates are tried smallest first (18, 20, 22, 24, 34 bytes per 32 weights); the first that
holds the weight is written. Where none does (rows not a multiple of 32 wide, groups narrower than or
straddling blocks of 32, act-order groups), the dequantized weight is written as F16 if every value is
an fp16 number, else F32: bigger, still exact. Each choice other than the layout's own type
(:data:`OWN_TYPES`) carries its reason, which the export logs.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from binq.export.ggml_blocks import BLOCK_TYPES, QK, BlockType, GgmlTensor
from binq.quant.structured import UniformWeight

# The ggml type whose form is binq's (bits, symmetric) grid with groups of 32.
OWN_TYPES: dict[tuple[int, bool], GGMLQuantizationType] = {
    (4, True): GGMLQuantizationType.Q4_0,
    (5, True): GGMLQuantizationType.Q5_0,
    (8, True): GGMLQuantizationType.Q8_0,
    (4, False): GGMLQuantizationType.Q4_1,
    (5, False): GGMLQuantizationType.Q5_1,
}


def describe(weight: UniformWeight) -> str:
    """``4-bit symmetric g32``, ``act-order`` appended when a group index is stored."""
    form = "symmetric" if weight.zeros is None else "asymmetric"
    order = " act-order" if weight.group_index is not None else ""
    return f"{weight.bits}-bit {form} g{weight.group_size}{order}"


def zero_points(weight: UniformWeight) -> torch.Tensor:
    """float32 ``(rows, groups)``: the stored zero points, or the symmetric grid's ``2**(bits-1)``."""
    if weight.zeros is None:
        return torch.full(tuple(weight.scales.shape), float(2 ** (weight.bits - 1)))
    return weight.zeros.float()


def block_minimum(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp16 ``m = -zero * scale``: the product is exact in fp32, the rounding to fp16 may not be."""
    return (-(zero * scale.float())).to(torch.float16)


def block_groups(weight: UniformWeight) -> tuple[torch.Tensor | None, str | None]:
    """The group of each block of 32 columns, or None and why blocks of 32 do not fit the groups."""
    cols = weight.shape[1]
    if cols % QK:
        return None, f"its rows are {cols} wide, not a multiple of {QK}"
    if weight.group_index is not None:
        groups = weight.group_index
    else:
        groups = torch.arange(cols) // weight.group_size
    blocks = groups.reshape(cols // QK, QK)
    if not bool((blocks == blocks[:, :1]).all()):
        if weight.group_index is not None:
            hint = "quantize without --act-order, or with --static-groups"
            return None, f"act-order groups are not runs of {QK} columns ({hint})"
        return None, f"groups of {weight.group_size} columns do not cover whole blocks of {QK}"
    return blocks[:, 0], None


def _rows_per_chunk(weight: UniformWeight) -> int:
    per_row = weight.scales.shape[1] << weight.bits
    return max(1, (1 << 22) // max(1, per_row))


def block_type_problem(weight: UniformWeight, block: BlockType) -> str | None:
    """Why ``block`` does not give every code of every grid of ``weight`` binq's value bit for bit, or None."""
    top = 2**weight.bits - 1
    zeros = zero_points(weight)
    if block.has_min:
        if top > block.highest:
            return f"{weight.bits}-bit codes exceed its 0..{block.highest}"
    elif zeros.numel() and (-float(zeros.max()) < block.lowest or top - float(zeros.min()) > block.highest):
        return f"codes minus zero points exceed its {block.lowest}..{block.highest}"
    codes = torch.arange(top + 1, dtype=torch.float32)
    step = _rows_per_chunk(weight)
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        scale, zero = weight.scales[rows].unsqueeze(-1), zeros[rows].unsqueeze(-1)
        binq = scale.float() * (codes - zero)  # UniformWeight.dequantize's formula, every code
        if block.has_min:
            ggml = block.values(codes, scale, block_minimum(scale, zero))
        else:
            ggml = block.values(codes - zero, scale, None)
        # Compared as bits: -0.0 and +0.0 count as different.
        if not torch.equal(ggml.view(torch.int32), binq.view(torch.int32)):
            cause = " (m = -zero*scale is not an fp16 number)" if block.has_min else ""
            return f"some (row, group) grids would come out differently{cause}"
    return None


def pack_uniform(weight: UniformWeight, block: BlockType, groups: torch.Tensor) -> torch.Tensor:
    """``uint8 (rows, cols / 32 * block_bytes)``: the codes as they are, each block with its group's grid."""
    rows, cols = weight.shape
    scale = weight.scales[:, groups]  # fp16 (rows, blocks)
    zero = zero_points(weight)[:, groups]
    codes = weight.codes.to(torch.int16).reshape(rows, cols // QK, QK)
    if block.has_min:
        return block.pack(codes.reshape(rows, cols), scale, block_minimum(scale, zero))
    levels = codes - zero.to(torch.int16).unsqueeze(-1)
    return block.pack(levels.reshape(rows, cols), scale, None)


def _block_note(weight: UniformWeight, chosen: BlockType, problems: dict[GGMLQuantizationType, str]) -> str | None:
    own = OWN_TYPES.get((weight.bits, weight.zeros is None))
    if own == chosen.ggml_type:
        return None
    if own is None:
        return f"{describe(weight)} has no ggml type of its own; {chosen.name} is the smallest that holds it exactly"
    if own in problems:
        return f"{own.name} does not hold it exactly: {problems[own]}; {chosen.name} is the smallest type that does"
    return f"{chosen.name} holds it exactly in fewer bytes than {own.name}"


def uniform_tensor(weight: UniformWeight) -> GgmlTensor:
    """The GGUF tensor of ``weight``: the smallest exact block type, else F16 or F32 (module docstring)."""
    groups, misfit = block_groups(weight)
    problems: dict[GGMLQuantizationType, str] = {}
    if groups is not None:
        for block in BLOCK_TYPES:
            problem = block_type_problem(weight, block)
            if problem is None:
                data = pack_uniform(weight, block, groups)
                return GgmlTensor(data, block.ggml_type, _block_note(weight, block, problems))
            problems[block.ggml_type] = problem
    if misfit is None:  # the layout's own type's reason, else the widest type's
        named = OWN_TYPES.get((weight.bits, weight.zeros is None), BLOCK_TYPES[-1].ggml_type)
        misfit = f"{named.name} does not hold it exactly: {problems[named]}"
    values = weight.dequantize(torch.float32)
    half = values.to(torch.float16)
    if torch.equal(half.float().view(torch.int32), values.view(torch.int32)):
        return GgmlTensor(half, GGMLQuantizationType.F16, f"{misfit}; F16 holds its values exactly")
    return GgmlTensor(values, GGMLQuantizationType.F32, f"{misfit}, and not all its values are fp16 numbers: F32")
