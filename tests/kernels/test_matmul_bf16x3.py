"""bf16x3 (npdiff/kernels/matmul_bf16x3.py): float32 linear layers as three bf16 products on AMX, against
torch's float32 ops on the original operands (no rounding on torch's side) at the kernel tolerance 1e-5.

The split itself (hi = bf16(a), lo = bf16(a - hi)) is compared bit for bit with torch's bf16 rounding.
Shapes are odd on purpose (rows past the 32-row blocks, depth not a multiple of 32, columns past the
64-column panels, few rows where AMX splits the columns); every output has a few terms at least, so the
relative error is one of sums (a lone product can be off by up to ~3 * 2^-18 ~ 1.1e-5). Each path runs
(the bf16_path fixture): AMX (the split GEMM) and the other two, where bf16x3 keeps the float32 weight.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff import NpdiffError
from npdiff.kernels.amx_intrinsics import amx_usable
from npdiff.kernels.bf16_rounding import bf16_to_float32, split_bf16, split_rows
from npdiff.kernels.matmul_bf16 import pack_linear_bf16
from npdiff.kernels.matmul_bf16x3 import (
    PackedBf16x3Weight,
    geglu_bf16x3,
    linear_activation_bf16x3,
    linear_bf16x3,
    linear_bf16x3_ref,
    pack_linear_bf16x3,
)

# (rows, in, out)
ODD_SHAPES = [(1, 33, 127), (13, 7, 33), (130, 257, 70), (241, 1025, 129), (250, 40, 1100), (2, 300, 600),
              (77, 768, 768), (67, 320, 1280)]


def torch_bits(a):
    """torch's bf16 bits of float32 a, as uint16."""
    return torch.from_numpy(np.ascontiguousarray(a)).bfloat16().view(torch.int16).numpy().view(np.uint16)


def test_split_is_torchs_rounding_twice(rng):
    values = rng.standard_normal(4096).astype(np.float32) * np.float32(10.0) ** rng.integers(-20, 20, 4096)
    values = values.astype(np.float32)
    high, low = split_bf16(values)
    np.testing.assert_array_equal(high, torch_bits(values))
    rest = values - bf16_to_float32(high)  # exact in float32
    np.testing.assert_array_equal(low, torch_bits(rest))
    together = bf16_to_float32(high).astype(np.float64) + bf16_to_float32(low)
    assert np.all(np.abs(together - values) <= 2.0**-17 * np.abs(values))  # 16 bits of the mantissa kept


def test_split_rows_is_lo_hi_hi_padded(rng):
    a = rng.standard_normal((5, 37), dtype=np.float32)
    bits = np.full((32, 3 * 64), 7, np.uint16)  # [rows padded, 3 Kp]: everything past the values must be 0
    split_rows(a, 1, 3, bits)
    high, low = split_bf16(a[1:4])
    for part, expected in enumerate([low, high, high]):
        np.testing.assert_array_equal(bits[:3, part * 64:part * 64 + 37], expected)
        assert not bits[:3, part * 64 + 37:(part + 1) * 64].any()
    assert not bits[3:].any()


@pytest.mark.parametrize("rows, depth, cols", ODD_SHAPES)
def test_linear_bf16x3_matches_torch_float32(rng, bf16_path, rows, depth, cols):
    x = rng.standard_normal((rows, depth), dtype=np.float32)  # [R, in]
    weight = rng.standard_normal((cols, depth), dtype=np.float32)  # [out, in]
    bias = rng.standard_normal(cols, dtype=np.float32)
    packed = pack_linear_bf16x3(weight)
    assert packed.layout == ("split pairs" if bf16_path == "amx" else "float32") and packed.shape == (cols, depth)
    x_t, w_t = torch.from_numpy(x), torch.from_numpy(weight)
    out = linear_bf16x3(x, packed, bias)
    assert out.dtype == np.float32 and out.shape == (rows, cols)
    what = f"linear_bf16x3 {bf16_path} [{rows},{depth}]x[{depth},{cols}]"
    assert_rel_close(out, F.linear(x_t, w_t, torch.from_numpy(bias)), KERNEL_TOL, what)
    assert_rel_close(linear_bf16x3(x, packed), F.linear(x_t, w_t), KERNEL_TOL, what + " without bias")
    assert_rel_close(linear_bf16x3_ref(x, weight, bias), F.linear(x_t, w_t, torch.from_numpy(bias)), KERNEL_TOL,
                     "linear_bf16x3_ref")


@pytest.mark.skipif(not amx_usable(), reason="the split GEMM runs on AMX tiles only")
def test_amx_split_gemm_is_the_three_products(rng, monkeypatch):
    """On AMX the result is the reference's three float32 GEMMs but for the order of the sums (far closer
    than to float32's own GEMM); with AMX turned off after packing, the split weight's own float32 GEMM."""
    monkeypatch.delenv("NPDIFF_NO_AMX", raising=False)
    monkeypatch.delenv("NPDIFF_NO_BF16", raising=False)
    x = rng.standard_normal((3, 45, 200), dtype=np.float32)  # [B,N,in]
    weight = rng.standard_normal((130, 200), dtype=np.float32)  # [out, in]
    packed = pack_linear_bf16x3(weight)
    assert packed.layout == "split pairs"  # 3 panels of 64 columns x (hi's 112 pairs + lo's 112) x 4 bytes
    assert packed.nbytes == 3 * (112 + 112) * 64 * 4
    out = linear_bf16x3(x, packed)
    assert out.shape == (3, 45, 130)
    assert_rel_close(out, linear_bf16x3_ref(x, weight), 1e-6, "against the three float32 products")
    high, low = split_bf16(weight)
    np.testing.assert_array_equal(packed.to_float32(), bf16_to_float32(high) + bf16_to_float32(low))
    monkeypatch.setenv("NPDIFF_NO_AMX", "1")
    assert_rel_close(linear_bf16x3(x, packed), F.linear(torch.from_numpy(x), torch.from_numpy(weight)), KERNEL_TOL,
                     "split weight without AMX")


def test_packed_weight_takes_float32s_bytes(bf16_path):
    packed = pack_linear_bf16x3(np.zeros((1280, 320), np.float32))  # SD's shapes: no padding
    assert packed.nbytes == 1280 * 320 * 4


@pytest.mark.parametrize("activation", ["silu", "quick_gelu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("batch, tokens", [(2, 77), (2, 611)])
def test_linear_activation_bf16x3_matches_torch(rng, bf16_path, activation, batch, tokens):
    x = rng.standard_normal((batch, tokens, 96), dtype=np.float32)  # [B,N,in]
    weight = rng.standard_normal((200, 96), dtype=np.float32)  # [out, in]
    bias = rng.standard_normal(200, dtype=np.float32)
    hidden = F.linear(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias))  # [B,N,out]
    torch_activation = {"silu": F.silu, "gelu": F.gelu, "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),
                        "gelu_tanh": lambda h: F.gelu(h, approximate="tanh")}[activation]
    out = linear_activation_bf16x3(x, pack_linear_bf16x3(weight), bias, activation)
    assert out.shape == (batch, tokens, 200)
    assert_rel_close(out, torch_activation(hidden), KERNEL_TOL, f"linear_activation_bf16x3 {activation}")


@pytest.mark.parametrize("batch, tokens", [(2, 77), (2, 611)])
def test_geglu_bf16x3_matches_diffusers_geglu(rng, bf16_path, batch, tokens):
    x = rng.standard_normal((batch, tokens, 64), dtype=np.float32)  # [B,N,D]
    weight = rng.standard_normal((2 * 160, 64), dtype=np.float32)  # [2I, D]: the value half, then the gate
    bias = rng.standard_normal(2 * 160, dtype=np.float32)
    hidden = F.linear(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias))  # [B,N,2I]
    value, gate = hidden.chunk(2, dim=-1)
    out = geglu_bf16x3(x, pack_linear_bf16x3(weight), bias)
    assert out.shape == (batch, tokens, 160)
    assert_rel_close(out, value * F.gelu(gate), KERNEL_TOL, "geglu_bf16x3")


def test_bad_inputs_are_named(rng):
    weight = rng.standard_normal((8, 16), dtype=np.float32)
    with pytest.raises(NpdiffError, match="float32.*float64.*\\[8,16\\]"):
        pack_linear_bf16x3(weight.astype(np.float64))
    with pytest.raises(NpdiffError, match="PackedBf16x3Weight.*PackedBf16Weight"):
        linear_bf16x3(rng.standard_normal((2, 16), dtype=np.float32), pack_linear_bf16(weight))
    with pytest.raises(NpdiffError, match="in_features=16"):
        linear_bf16x3(rng.standard_normal((2, 15), dtype=np.float32), pack_linear_bf16x3(weight))
    assert isinstance(pack_linear_bf16x3(weight), PackedBf16x3Weight)
