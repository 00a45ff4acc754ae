"""The bfloat16 GEMM (npdiff/kernels/matmul_bf16.py, matmul_dpbf16.py, matmul_amx.py) against torch.

The rounding functions are compared bit for bit with torch's `.to(torch.bfloat16)` and `.float()`.
linear_bf16, linear_activation_bf16 and geglu_bf16 are compared with torch's float32 ops on the
bf16-rounded operands (`F.linear(x.bfloat16().float(), w.bfloat16().float(), b)`): the products are
the same, only the order of the float32 sums differs, so the relative error is <= KERNEL_TOL (1e-5).
Shapes are odd on purpose: rows not a multiple of MR (6) or of the row blocks, columns not a multiple
of NR (64) or NC (512), depth odd and across KC (512), one row. Every path runs (the bf16_path
fixture of conftest.py): AMX tiles, the vdpbf16ps kernel, and the float32 fallback.
"""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff import NpdiffError
from npdiff.kernels.amx_intrinsics import amx_usable
from npdiff.kernels.bf16_rounding import (
    bf16_to_float32,
    cpu_has_avx512_bf16,
    float32_to_bf16,
)
from npdiff.kernels.matmul_amx import amx_kernel_asm
from npdiff.kernels.matmul_bf16 import (
    geglu_bf16,
    linear_activation_bf16,
    linear_bf16,
    pack_linear_bf16,
)
from npdiff.kernels.matmul_dpbf16 import MR, NR, micro_kernel_asm

# (rows, in, out)
ODD_SHAPES = [(1, 1, 1), (1, 33, 127), (7, 5, 3), (13, 7, 1), (130, 257, 70), (241, 1025, 129),
              (6, 512, 64), (250, 40, 1100), (2, 300, 600)]


def torch_bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a)).bfloat16()


def torch_bits(a):
    """torch's bf16 bits of float32 a, as uint16."""
    return torch_bf16(a).view(torch.int16).numpy().view(np.uint16)


def special_values(rng):
    """float32 values that test the rounding: ties, overflow, infinities, zeros, subnormals, NaN."""
    ties = (rng.integers(0, 2**15, 64, dtype=np.uint32) << 16) | 0x8000  # exactly half-way
    near_max = np.array([0x7F7F7FFF, 0x7F7FFFFF, 0xFF7F8000, 0x7F7F8000], np.uint32)  # -> inf / kept
    tiny = rng.integers(1, 2**23, 16, dtype=np.uint32)  # subnormal float32
    bits = np.concatenate([ties, ties | 0x80000000, near_max, tiny, tiny | 0x80000000,
                           rng.integers(0, 2**32, 4096, dtype=np.uint32)])
    values = bits.view(np.float32)
    return np.concatenate([values, np.array([0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)])


def test_float32_to_bf16_is_torchs_rounding(rng):
    values = special_values(rng)  # random bit patterns include NaNs of many payloads
    ours = float32_to_bf16(values)
    assert ours.dtype == np.uint16 and ours.shape == values.shape
    nan = np.isnan(values)
    assert nan.any() and not nan.all()
    np.testing.assert_array_equal(ours[~nan], torch_bits(values)[~nan])
    assert np.isnan(bf16_to_float32(ours[nan])).all(), "NaN must stay NaN"


def test_float32_to_bf16_on_arrays_of_any_layout(rng):
    values = rng.standard_normal((5, 7, 3), dtype=np.float32).transpose(2, 0, 1)  # not contiguous
    np.testing.assert_array_equal(float32_to_bf16(values), torch_bits(values))


def test_bf16_to_float32_is_torchs_widening(rng):
    bits = rng.integers(0, 2**16, 4096, dtype=np.uint16)
    ours = bf16_to_float32(bits)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    nan = np.isnan(theirs)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))
    with pytest.raises(NpdiffError, match="uint16"):
        bf16_to_float32(np.zeros(3, np.float32))


def test_cpu_has_avx512_bf16_follows_cpuinfo():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert cpu_has_avx512_bf16() == (" avx512_bf16" in flags)


@pytest.mark.parametrize("rows, depth, cols", ODD_SHAPES)
def test_linear_bf16_matches_torch(rng, bf16_path, rows, depth, cols):
    x = rng.standard_normal((rows, depth), dtype=np.float32)  # [R, in]
    weight = rng.standard_normal((cols, depth), dtype=np.float32)  # [out, in]
    bias = rng.standard_normal(cols, dtype=np.float32)
    packed = pack_linear_bf16(weight)
    assert packed.layout == ("float32" if bf16_path == "float32" else "pairs") and packed.shape == (cols, depth)
    expected = F.linear(torch_bf16(x).float(), torch_bf16(weight).float(), torch.from_numpy(bias))
    out = linear_bf16(x, packed, bias)
    assert out.dtype == np.float32 and out.shape == (rows, cols)
    assert_rel_close(out, expected, KERNEL_TOL, f"linear_bf16 {bf16_path} [{rows},{depth}]x[{depth},{cols}]")
    no_bias = linear_bf16(x, packed)
    assert_rel_close(no_bias, F.linear(torch_bf16(x).float(), torch_bf16(weight).float()), KERNEL_TOL,
                     "linear_bf16 without bias")


def test_packed_weight_holds_torchs_bf16_weight(rng, bf16_path):
    weight = rng.standard_normal((70, 131), dtype=np.float32)
    packed = pack_linear_bf16(weight)
    np.testing.assert_array_equal(packed.to_float32(), torch_bf16(weight).float().numpy())
    from_bits = pack_linear_bf16(torch_bits(weight))  # bf16 bits from a file: packed as they are
    np.testing.assert_array_equal(from_bits.data, packed.data)
    if bf16_path != "float32":  # 2 column panels x 66 pairs (80: whole tiles of 16) x NR words of 4 bytes
        assert packed.nbytes == 2 * 80 * NR * 4
        sd_weight = pack_linear_bf16(np.zeros((1280, 320), np.float32))  # SD's shapes: 2 bytes a weight
        assert sd_weight.nbytes == 1280 * 320 * 2


def test_linear_bf16_on_leading_axes_and_strided_x(rng, bf16_path):
    x = rng.standard_normal((2, 37, 3, 48), dtype=np.float32).transpose(0, 2, 1, 3)  # [2,3,37,48] strided
    weight = rng.standard_normal((100, 48), dtype=np.float32)
    out = linear_bf16(x, pack_linear_bf16(weight))
    assert out.shape == (2, 3, 37, 100)
    assert_rel_close(out, F.linear(torch_bf16(x).float(), torch_bf16(weight).float()), KERNEL_TOL, "4-D x")
    empty = linear_bf16(np.zeros((0, 48), np.float32), pack_linear_bf16(weight))
    assert empty.shape == (0, 100)


# (batch, tokens): few rows (AMX splits the columns, one pass after) and many (the pass on each block
# of rows right after its GEMM)
ROWS = [(2, 77), (2, 611)]


@pytest.mark.parametrize("activation", ["silu", "quick_gelu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("batch, tokens", ROWS)
def test_linear_activation_bf16_matches_torch(rng, bf16_path, activation, batch, tokens):
    x = rng.standard_normal((batch, tokens, 96), dtype=np.float32)
    weight = rng.standard_normal((130, 96), dtype=np.float32) / 10
    bias = rng.standard_normal(130, dtype=np.float32)
    hidden = F.linear(torch_bf16(x).float(), torch_bf16(weight).float(), torch.from_numpy(bias))
    expected = {"silu": F.silu, "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h), "gelu": F.gelu,
                "gelu_tanh": lambda h: F.gelu(h, approximate="tanh")}[activation](hidden)
    out = linear_activation_bf16(x, pack_linear_bf16(weight), bias, activation)
    assert_rel_close(out, expected, KERNEL_TOL, f"linear_activation_bf16 {activation}")
    with pytest.raises(NpdiffError, match="activation"):
        linear_activation_bf16(x, pack_linear_bf16(weight), bias, "relu")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("batch, tokens", ROWS)
def test_geglu_bf16_matches_torch(rng, bf16_path, approximate, batch, tokens):
    x = rng.standard_normal((batch, tokens, 64), dtype=np.float32)
    weight = rng.standard_normal((2 * 90, 64), dtype=np.float32) / 8
    bias = rng.standard_normal(2 * 90, dtype=np.float32)
    hidden = F.linear(torch_bf16(x).float(), torch_bf16(weight).float(), torch.from_numpy(bias))
    value, gate = hidden.chunk(2, dim=-1)
    out = geglu_bf16(x, pack_linear_bf16(weight), bias, approximate)
    assert out.shape == (batch, tokens, 90)
    assert_rel_close(out, value * F.gelu(gate, approximate=approximate), KERNEL_TOL, "geglu_bf16")


def test_bad_inputs_are_named(rng):
    weight = pack_linear_bf16(rng.standard_normal((8, 5), dtype=np.float32))
    with pytest.raises(NpdiffError, match=r"in_features=5.*\[3,4\]"):
        linear_bf16(np.zeros((3, 4), np.float32), weight)
    with pytest.raises(NpdiffError, match="float32"):
        linear_bf16(np.zeros((3, 5), np.float64), weight)
    with pytest.raises(NpdiffError, match=r"bias must have shape \[8\]"):
        linear_bf16(np.zeros((3, 5), np.float32), weight, np.zeros(7, np.float32))
    with pytest.raises(NpdiffError, match="PackedBf16Weight"):
        linear_bf16(np.zeros((3, 5), np.float32), np.zeros((8, 5), np.float32))
    with pytest.raises(NpdiffError, match="2-D"):
        pack_linear_bf16(np.zeros((8, 5, 1), np.float32))
    with pytest.raises(NpdiffError, match="float32 or uint16"):
        pack_linear_bf16(np.zeros((8, 5), np.float64))
    with pytest.raises(NpdiffError, match="even number of rows"):
        geglu_bf16(np.zeros((3, 5), np.float32), pack_linear_bf16(np.zeros((7, 5), np.float32)))


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the instruction exists only on AVX512_BF16 CPUs")
def test_micro_kernel_is_vdpbf16ps_on_zmm_registers():
    """The k loop holds MR x NR/16 = 24 vdpbf16ps on zmm registers and never touches the stack (the
    C tile stays in registers)."""
    lines = micro_kernel_asm().splitlines()
    dots = [i for i, line in enumerate(lines) if re.search(r"vdpbf16ps\s.*%zmm", line)]
    assert len(dots) >= MR * NR // 16, f"expected >= {MR * NR // 16} zmm vdpbf16ps, found {len(dots)}"
    loop_start = max(i for i in range(dots[0]) if lines[i].startswith("."))  # the loop's label
    loop_end = min(i for i in range(dots[-1], len(lines)) if lines[i].strip().startswith("j"))
    loop = lines[loop_start:loop_end + 1]
    assert len([line for line in loop if re.search(r"vdpbf16ps\s.*%zmm", line)]) == MR * NR // 16, "\n".join(loop)
    assert not [line for line in loop if "%rsp" in line or "%rbp)" in line], "\n".join(loop)


@pytest.mark.skipif(not amx_usable(), reason="AMX tiles exist only on AMX-BF16 CPUs whose OS grants them")
def test_amx_kernel_is_tdpbf16ps_on_tiles():
    """The AMX block's k loop (LLVM unrolls it): per step 4 tileloadd (A into tmm4/5, B into tmm6/7)
    and 4 tdpbf16ps into the C tiles tmm0..tmm3 (AT&T order: B, A, C)."""
    lines = amx_kernel_asm().splitlines()
    products = [(i, re.search(r"tdpbf16ps\s+%tmm(\d), %tmm(\d), %tmm(\d)", line)) for i, line in enumerate(lines)]
    products = [(i, found.groups()) for i, found in products if found]
    assert products and len(products) % 4 == 0, "\n".join(lines)
    assert {(b, a, c) for _, (b, a, c) in products} == {("6", "4", "0"), ("7", "4", "1"), ("6", "5", "2"),
                                                        ("7", "5", "3")}
    first, last = products[0][0], products[-1][0]
    loop_start = max(i for i in range(first) if lines[i].startswith("."))  # the loop's label
    loop_end = min(i for i in range(last, len(lines)) if lines[i].strip().startswith("j"))
    loop = lines[loop_start:loop_end + 1]
    loads = [line for line in loop if "tileloadd" in line]
    assert len(loads) == len([line for line in loop if "tdpbf16ps" in line]), "\n".join(loop)
