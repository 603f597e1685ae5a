"""Tests for the Triton kernels (binq.nn.triton_kernels), run on the CPU by Triton's interpreter.

``TRITON_INTERPRET=1`` is read when Triton defines a function, including its own ``triton.language``
helpers at import: it must be set before anything in the process imports Triton, so conftest.py sets it
for the whole session (``BINQ_TEST_TRITON_ON_GPU=1`` leaves it unset, for a GPU run of these tests).
Every layout variant is checked against the reference path (dequantize, then ``F.linear`` in
float64) on ragged shapes, for one row of ``x`` (the GEMV form) and five (the ``tl.dot`` form). A last
test compiles the kernels for sm_90 in a clean process (no GPU needed), which the interpreter does not.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from binq.nn import BinaryLinear
from binq.nn import triton_kernels as tk
from binq.quant.multiscale import MultiScaleWeight
from binq.quant.structured import BinaryWeight, QuantizedWeight, UniformWeight

ROWS = 40  # not a multiple of any BLOCK_N
COLS = 197  # not a multiple of 8: the packed rows end in padding bits
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # normwise, relative


@pytest.fixture(scope="module", autouse=True)
def _interpreter() -> None:
    import triton.language.standard

    if type(triton.language.standard.cdiv).__name__ != "InterpretedFunction":
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (conftest.py sets it first)")
    assert tk._build().interpreted


def _half(gen: torch.Generator, *shape: int, positive: bool = False) -> torch.Tensor:
    values = torch.rand(*shape, generator=gen) + 0.1 if positive else torch.randn(*shape, generator=gen) * 0.1
    return values.half()


def binary_weight(
    block_size: int,
    cols: int = COLS,
    means: bool = False,
    bitmap: bool = False,
    salient: int = 0,
    salient_groups: bool = False,
    column_scales: bool = False,
    seed: int = 0,
) -> BinaryWeight:
    gen = torch.Generator().manual_seed(seed)
    blocks = math.ceil(cols / block_size)
    plain_zones = 2 if bitmap else 1
    salient_zones = 0 if not salient else (4 if salient_groups else 2)
    zones = plain_zones + salient_zones
    salient_columns = residual = None
    if salient:
        salient_columns = torch.zeros(cols, dtype=torch.bool)
        salient_columns[torch.randperm(cols, generator=gen)[: salient - 1]] = True
        salient_columns[-1] = True  # one in the ragged last block
        residual = torch.rand(ROWS, int(salient_columns.sum()), generator=gen) > 0.5
    n_salient = 0 if salient_columns is None else int(salient_columns.sum())
    salient_column_scales = _half(gen, n_salient, salient_zones, positive=True) if column_scales and salient else None
    return BinaryWeight(
        signs=torch.rand(ROWS, cols, generator=gen) > 0.5,
        scales=_half(gen, ROWS, blocks, zones, positive=True),
        block_size=block_size,
        means=_half(gen, ROWS, blocks, zones) if means else None,
        group_bitmap=torch.rand(ROWS, cols, generator=gen) > 0.7 if bitmap else None,
        salient_columns=salient_columns,
        residual_signs=residual,
        salient_groups=salient_groups,
        column_scales=_half(gen, cols - n_salient, plain_zones, positive=True) if column_scales else None,
        salient_column_scales=salient_column_scales,
    )


def uniform_weight(bits: int, group_size: int, zeros: bool, act_order: bool, seed: int = 0) -> UniformWeight:
    gen = torch.Generator().manual_seed(seed)
    groups = math.ceil(COLS / group_size)
    group_index = None
    if act_order:  # GPTQ's g_idx: groups follow a permutation of the columns
        group_index = torch.randperm(COLS, generator=gen) // group_size
    return UniformWeight(
        codes=torch.randint(0, 2**bits, (ROWS, COLS), generator=gen, dtype=torch.uint8),
        scales=_half(gen, ROWS, groups, positive=True),
        bits=bits,
        group_size=group_size,
        zeros=torch.randint(0, 2**bits, (ROWS, groups), generator=gen, dtype=torch.uint8) if zeros else None,
        group_index=group_index,
    )


def multiscale_weight(groups: int, per_row: bool, zeros: bool, block_size: int = 64, seed: int = 0) -> MultiScaleWeight:
    gen = torch.Generator().manual_seed(seed)
    zero_positions = None
    if zeros:
        picked = torch.randperm(ROWS * COLS, generator=gen)[:9]
        zero_positions = torch.cat([picked, torch.tensor([0, ROWS * COLS - 1])]).unique()
    return MultiScaleWeight(
        signs=torch.rand(ROWS, COLS, generator=gen) > 0.5,
        group_index=torch.randint(0, groups, (ROWS, COLS), generator=gen, dtype=torch.uint8),
        scales=_half(gen, ROWS if per_row else 1, math.ceil(COLS / block_size), groups, positive=True),
        block_size=block_size,
        zero_positions=zero_positions,
    )


BINARY = {
    "sign + fp16 scale per group (arb-group, Q1_0)": dict(block_size=64),
    "with means, block not a multiple of 8": dict(block_size=36, means=True),
    "two zones by bitmap (W(1+1))": dict(block_size=64, bitmap=True, means=True),
    "BiLLM: bitmap, salient columns, residual signs": dict(block_size=32, bitmap=True, salient=11),
    "salient columns without bitmap, column scales (ARB-RC)": dict(block_size=64, salient=13, column_scales=True),
    "CGB: salient groups, means, column scales": dict(
        block_size=40, bitmap=True, salient=11, salient_groups=True, means=True, column_scales=True
    ),
    "bitmap and column scales, 200 columns": dict(block_size=64, cols=200, bitmap=True, column_scales=True),
}
UNIFORM = {
    **{f"{bits}-bit, zero points": dict(bits=bits, group_size=32, zeros=True, act_order=False) for bits in range(1, 9)},
    **{f"{bits}-bit, symmetric": dict(bits=bits, group_size=48, zeros=False, act_order=False) for bits in (2, 3, 4)},
    **{
        f"{bits}-bit, act-order, zeros={zeros}": dict(bits=bits, group_size=32, zeros=zeros, act_order=True)
        for bits, zeros in ((3, True), (4, False), (8, True))
    },
}
MULTISCALE = {
    "one group (no index), per tensor": dict(groups=1, per_row=False, zeros=False),
    "3 groups (2-bit index), per row": dict(groups=3, per_row=True, zeros=False),
    "32 groups (5-bit index), per tensor, exact zeros": dict(groups=32, per_row=False, zeros=True),
    "256 groups (8-bit index), per row, exact zeros": dict(groups=256, per_row=True, zeros=True, block_size=50),
}


def relative_error(module: BinaryLinear, x: torch.Tensor, y: torch.Tensor) -> float:
    bias = None if module.bias is None else module.bias.double()
    reference = F.linear(x.double(), module.dense_weight(torch.float64), bias)
    return float((y.double() - reference).norm() / reference.norm())


def check(
    weight: QuantizedWeight,
    m: int,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    tiles: tk.Tiles | None = None,
) -> None:
    gen = torch.Generator().manual_seed(m)
    rows, cols = weight.shape
    module = BinaryLinear.from_weight(weight, torch.randn(rows, generator=gen) if bias else None)
    x = torch.randn(m, cols, generator=gen).to(dtype)
    y = tk.triton_linear(module, x, tiles)
    assert y.dtype == dtype and y.shape == (m, rows)
    error = relative_error(module, x, y)
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("case", list(BINARY))
def test_binary_layout_matches_the_reference(case: str, m: int) -> None:
    check(binary_weight(**BINARY[case]), m, bias=m == 1)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("case", list(UNIFORM))
def test_uniform_layout_matches_the_reference(case: str, m: int) -> None:
    check(uniform_weight(**UNIFORM[case]), m, bias=m == 5)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("case", list(MULTISCALE))
def test_multiscale_layout_matches_the_reference(case: str, m: int) -> None:
    check(multiscale_weight(**MULTISCALE[case]), m)


RICHEST = {
    "binary": lambda: binary_weight(**BINARY["CGB: salient groups, means, column scales"]),
    "uniform": lambda: uniform_weight(**UNIFORM["3-bit, act-order, zeros=True"]),
    "multiscale": lambda: multiscale_weight(**MULTISCALE["32 groups (5-bit index), per tensor, exact zeros"]),
}


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(RICHEST))
def test_half_precision_inputs_give_outputs_of_their_dtype(layout: str, dtype: torch.dtype, m: int) -> None:
    check(RICHEST[layout](), m, dtype)


@pytest.mark.parametrize(
    "tiles, m",
    [(tk.Tiles(1, 16, 16), 1), (tk.Tiles(16, 16, 16), 21)],
    ids=["gemv, two reduction steps", "two blocks of rows, two reduction steps"],
)
@pytest.mark.parametrize("layout", list(RICHEST))
def test_several_reduction_steps_and_row_blocks(layout: str, tiles: tk.Tiles, m: int) -> None:
    check(RICHEST[layout](), m, tiles=tiles)


def test_batched_input_keeps_its_leading_shape_and_the_plan_is_built_once() -> None:
    weight = binary_weight(**BINARY["BiLLM: bitmap, salient columns, residual signs"])
    module = BinaryLinear.from_weight(weight)
    x = torch.randn(2, 3, COLS)
    y = tk.triton_linear(module, x)
    assert y.shape == (2, 3, ROWS)
    plan = module._kernel_state["triton"]
    assert relative_error(module, x.reshape(6, COLS), y.reshape(6, ROWS)) < 1e-5
    tk.triton_linear(module, x[0, :1])
    assert module._kernel_state["triton"] is plan
    # The plan keeps the packed tensors plus O(in_features) extras, never anything dense.
    extras = [plan.salient_index] + ([] if plan.column_table is None else [plan.column_table])
    assert sum(t.numel() for t in extras) < 8 * COLS


def test_registered_kernels_take_cuda_inputs_only() -> None:
    assert [k.name for k in tk.KERNELS] == ["triton-binary", "triton-uniform", "triton-multiscale"]
    module = BinaryLinear.from_weight(uniform_weight(4, 32, True, False))
    x = torch.randn(1, COLS)
    assert not any(kernel.supports(module, x) for kernel in tk.KERNELS)


COMPILE_FOR_SM90 = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import binq.nn.triton_kernels as tk

    tk._build()
    POINTERS = {"x_ptr": "*{x}", "y_ptr": "*{x}", "bias_ptr": "*{x}", "scales_ptr": "*fp16", "means_ptr": "*fp16",
                "column_table_ptr": "*fp16", "salient_index_ptr": "*i32", "group_index_ptr": "*i16"}
    CASES = [
        (tk._binary_kernel, "fp16", dict(BLOCK_M=1, BLOCK_N=16, BLOCK_G=32, DOT_FP32=False, BLOCK_SIZE=128,
         ZONES=6, SALIENT_ZONE=2, HAS_BITMAP=True, HAS_SALIENT=True, SALIENT_GROUPS=True, HAS_MEANS=True,
         HAS_COLUMN_SCALES=True, HAS_BIAS=True)),
        (tk._uniform_kernel, "fp32", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_G=16, DOT_FP32=True, BITS=3,
         GROUP_SIZE=128, HAS_ZEROS=True, ACT_ORDER=True, HAS_BIAS=False)),
        (tk._multiscale_kernel, "bf16", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_G=16, DOT_FP32=False, INDEX_BITS=5,
         BLOCK_SIZE=64, PER_ROW=True, HAS_BIAS=True)),
    ]
    for kernel, x_type, constants in CASES:
        signature = {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = POINTERS.get(name, "*u8").format(x=x_type)
            else:
                signature[name] = "i32"
        triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
    """
)


def test_kernels_compile_for_sm90_without_a_gpu() -> None:
    """The interpreter runs the kernels as Python; this runs Triton's compiler and ptxas on three variants."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
