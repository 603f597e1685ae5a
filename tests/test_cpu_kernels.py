"""The CPU kernels against the reference path (dequantize, then ``F.linear`` in float64).

Every layout variant binq writes, on random packed weights with ragged widths, for the decode path
(bit planes), the prefill path (dequantized tiles) and both builds of the C library (AVX-512 where this
CPU has it, and the portable plain-C one). Real SmolLM2 layers are checked in test_real_model.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from binq.nn import BinaryLinear, cpu_kernels
from binq.nn.kernels import reference_only, select_kernel
from binq.quant.multiscale import MultiScaleWeight
from binq.quant.structured import BinaryWeight, QuantizedWeight, UniformWeight


def _half(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(*shape, generator=generator) * 0.2 + 0.01).half()


def binary_forms(rows: int, cols: int, block: int, seed: int = 0) -> dict[str, BinaryWeight]:
    g = torch.Generator().manual_seed(seed)
    blocks = math.ceil(cols / block)
    signs = torch.rand(rows, cols, generator=g) > 0.5
    bitmap = torch.rand(rows, cols, generator=g) > 0.7
    salient = torch.zeros(cols, dtype=torch.bool)
    salient[torch.randperm(cols, generator=g)[: max(1, cols // 20)]] = True
    n_sal = int(salient.sum())
    residual = torch.rand(rows, n_sal, generator=g) > 0.5

    def h(*shape: int) -> torch.Tensor:
        return _half(*shape, generator=g)

    def centred(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).half()

    return {
        "sign+scale (arb-group)": BinaryWeight(signs=signs, scales=h(rows, blocks, 1), block_size=block),
        "sign+scale+mean": BinaryWeight(
            signs=signs, scales=h(rows, blocks, 1), block_size=block, means=centred(rows, blocks, 1)
        ),
        "two zones (w11)": BinaryWeight(
            signs=signs, scales=h(rows, blocks, 2), block_size=block, group_bitmap=bitmap,
            means=centred(rows, blocks, 2),
        ),
        "billm": BinaryWeight(
            signs=signs, scales=h(rows, blocks, 4), block_size=block, means=centred(rows, blocks, 4),
            group_bitmap=bitmap, salient_columns=salient, residual_signs=residual,
        ),
        "salient, no bitmap": BinaryWeight(
            signs=signs, scales=h(rows, blocks, 3), block_size=block, salient_columns=salient, residual_signs=residual
        ),
        "cgb": BinaryWeight(
            signs=signs, scales=h(rows, blocks, 6), block_size=block, means=centred(rows, blocks, 6),
            group_bitmap=bitmap, salient_columns=salient, residual_signs=residual, salient_groups=True,
        ),
        "row x column scales (rc)": BinaryWeight(
            signs=signs, scales=h(rows, blocks, 4), block_size=block, group_bitmap=bitmap,
            salient_columns=salient, residual_signs=residual,
            column_scales=h(cols - n_sal, 2) * 4, salient_column_scales=h(n_sal, 2) * 4,
        ),
        "column scales, one zone": BinaryWeight(
            signs=signs, scales=h(rows, blocks, 1), block_size=block, column_scales=h(cols, 1) * 4
        ),
    }  # fmt: skip


def uniform_forms(rows: int, cols: int, group: int, seed: int = 0) -> dict[str, UniformWeight]:
    g = torch.Generator().manual_seed(seed)
    groups = math.ceil(cols / group)
    forms = {}
    for bits in (1, 2, 3, 4, 8):
        codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
        zeros = torch.randint(0, 2**bits, (rows, groups), generator=g, dtype=torch.uint8)
        forms[f"{bits}-bit"] = UniformWeight(
            codes=codes, scales=_half(rows, groups, generator=g), bits=bits, group_size=group, zeros=zeros
        )
    codes = torch.randint(0, 4, (rows, cols), generator=g, dtype=torch.uint8)
    forms["2-bit symmetric"] = UniformWeight(
        codes=codes, scales=_half(rows, groups, generator=g), bits=2, group_size=group
    )
    act_order = torch.randperm(cols, generator=g) // group  # GPTQ's g_idx under act-order
    forms["3-bit act-order"] = UniformWeight(
        codes=torch.randint(0, 8, (rows, cols), generator=g, dtype=torch.uint8),
        scales=_half(rows, groups, generator=g), bits=3, group_size=group,
        zeros=torch.randint(0, 8, (rows, groups), generator=g, dtype=torch.uint8), group_index=act_order,
    )  # fmt: skip
    return forms


def multiscale_forms(rows: int, cols: int, seed: int = 0) -> dict[str, MultiScaleWeight]:
    g = torch.Generator().manual_seed(seed)
    forms = {}
    cases = ((1, False, cols), (8, False, cols), (32, True, cols), (4, True, 32), (40, False, cols))
    for groups, per_row, block in cases:
        blocks = math.ceil(cols / block)
        forms[f"g{groups} {'row' if per_row else 'tensor'} block {block}"] = MultiScaleWeight(
            signs=torch.rand(rows, cols, generator=g) > 0.5,
            group_index=torch.randint(0, groups, (rows, cols), generator=g, dtype=torch.uint8),
            scales=_half(rows if per_row else 1, blocks, groups, generator=g),
            block_size=block,
            zero_positions=torch.randperm(rows * cols, generator=g)[:7].sort().values,
        )
    return forms


def all_forms(rows: int, cols: int) -> dict[str, QuantizedWeight]:
    return {**binary_forms(rows, cols, 64), **uniform_forms(rows, cols, 32), **multiscale_forms(rows, cols)}


def reference(weight: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b = None if bias is None else bias.double()
    return F.linear(x.double(), weight.dequantize(torch.float64), b)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


FORMS = all_forms(37, 200)  # ragged: 200 columns are 12.5 chunks of 16, blocks of 64 end in 8


@pytest.mark.parametrize("tokens", [1, 3, cpu_kernels.DECODE_TOKENS + 5])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_kernel_matches_the_reference(form: str, tokens: int) -> None:
    weight = FORMS[form]
    rows, cols = weight.shape
    bias = torch.randn(rows)
    module = BinaryLinear.from_weight(weight, bias=bias)
    x = torch.randn(2, tokens, cols)
    assert select_kernel(module, x) is not None, "the CPU kernel must run this layout"
    got = module(x)
    assert got.shape == (2, tokens, rows) and got.dtype == torch.float32
    assert relative_error(got, reference(weight, x, bias)) < 1e-5
    with reference_only():
        assert select_kernel(module, x) is None


def test_kernel_state_is_a_repacking_not_a_dense_weight() -> None:
    for weight in binary_forms(64, 512, 128).values():
        module = BinaryLinear.from_weight(weight)
        module(torch.randn(1, 512))
        prepared = module.kernel_state("cpu-binary", lambda m: None)
        dense_bytes = 64 * 512 * 4
        assert prepared.nbytes < dense_bytes / 4


def test_bfloat16_input_keeps_its_dtype() -> None:
    weight = FORMS["sign+scale (arb-group)"]
    module = BinaryLinear.from_weight(weight)
    x = torch.randn(1, 200).bfloat16()
    out = module(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), reference(weight, x.float(), None)) < 1e-2


def test_half_linear_equals_an_fp32_matmul_of_the_upcast_weight() -> None:
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(301, 203, generator=g) * 0.1).half()
    weight[0, :5] = torch.tensor([6.0e-8, -1e-6, 0.0, 65504.0, -(2.0**-14)]).half()  # subnormal, zero, max, min normal
    x = torch.randn(2, 203, generator=g)
    for rows in (x[:1], x):
        got = cpu_kernels.half_linear(rows, weight)
        want = rows.double() @ weight.double().t()
        assert relative_error(got, want) < 1e-5


def test_the_portable_build_matches_the_reference_too(tmp_path: Path) -> None:
    # A fresh process: the variant is chosen when the library is first loaded.
    script = (
        "import torch, test_cpu_kernels as t\n"
        "from binq.nn import BinaryLinear, cpu_kernels\n"
        "assert cpu_kernels.isa() == 'portable', cpu_kernels.isa()\n"
        "for name, w in t.all_forms(19, 150).items():\n"
        "    x = torch.randn(2, 150)\n"
        "    err = t.relative_error(BinaryLinear.from_weight(w)(x), t.reference(w, x, None))\n"
        "    assert err < 1e-5, (name, err)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "BINQ_CPU_KERNELS": "portable", "BINQ_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=Path(__file__).parent
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_without_a_compiler_the_reference_path_runs_after_one_warning(tmp_path: Path) -> None:
    script = (
        "import logging, torch, test_cpu_kernels as t\n"
        "from binq.nn import BinaryLinear, cpu_kernels\n"
        "from binq.nn.kernels import select_kernel\n"
        "records = []\n"
        "handler = logging.Handler(); handler.emit = records.append\n"
        "logging.getLogger('binq.nn.cpu_kernels').addHandler(handler)\n"
        "w = t.all_forms(9, 40)['sign+scale (arb-group)']\n"
        "m = BinaryLinear.from_weight(w)\n"
        "x = torch.randn(2, 40)\n"
        "for _ in range(3):\n"
        "    assert select_kernel(m, x) is None\n"
        "    assert t.relative_error(m(x), t.reference(w, x, None)) < 1e-6\n"
        "assert cpu_kernels.isa() == 'none'\n"
        "assert len(records) == 1 and 'reference path' in records[0].getMessage(), records\n"
        "print('ok')\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "BINQ_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=Path(__file__).parent
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_a_compiler_without_openmp_still_builds_the_kernels(tmp_path: Path) -> None:
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec cc "$@"\n')
    compiler.chmod(0o755)
    script = (
        "import torch, test_cpu_kernels as t\n"
        "from binq.nn import BinaryLinear, cpu_kernels\n"
        "assert cpu_kernels.isa() != 'none'\n"
        "w = t.all_forms(9, 40)['billm']\n"
        "x = torch.randn(3, 40)\n"
        "assert t.relative_error(BinaryLinear.from_weight(w)(x), t.reference(w, x, None)) < 1e-5\n"
        "print('ok')\n"
    )
    env = {**os.environ, "CC": str(compiler), "BINQ_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=Path(__file__).parent
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
    assert "without OpenMP" in done.stderr
