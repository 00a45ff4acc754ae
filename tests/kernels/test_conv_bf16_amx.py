"""Version 3 of the bfloat16 convolution, the implicit GEMM on AMX tiles (npdiff/kernels/conv_bf16_amx.py),
against torch.

As test_conv_bf16.py: compared with torch's float32 conv2d on the bf16-rounded operands (the same products,
summed in another order), relative error <= KERNEL_TOL (1e-5). Shapes are drawn from the fresh seed around
the edges the kernel has: odd C_in (the last pair's missing partner), C_in past a depth block, C_out not a
multiple of 32, output widths 8 and 20 (the flat layout: rows run on within a segment) and 64 and 80 (pair
rows; 80 and 20 end in part segments), strides (1, 2) with padding 0 or 1, 1x1 and 3x3 kernels, batch 1-2,
with and without bias. Version 2 on AMX (pack_conv_bf16(..., implicit=False)) stays tested here too.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff.kernels.amx_intrinsics import amx_usable
from npdiff.kernels.bf16_rounding import bf16_kernel, float32_to_bf16
from npdiff.kernels.conv_bf16 import conv2d_bf16, pack_conv_bf16
from npdiff.kernels.conv_bf16_amx import PixelLayout, conv2d_bf16_implicit, pack_conv_taps, unpack_conv_taps

pytestmark = pytest.mark.skipif(not amx_usable(), reason="no AMX-BF16 here (or Linux refused the tile state)")

WIDTHS = [8, 20, 64, 80]
# (kernel, stride, padding): the UNet's convs (3x3 pad 1, its stride-2 downsamplers), unpadded and 1x1
GEOMETRIES = [(3, 1, 1), (3, 1, 0), (3, 2, 1), (1, 1, 0)]


@pytest.fixture(autouse=True)
def amx_path(monkeypatch):
    monkeypatch.delenv("NPDIFF_NO_AMX", raising=False)
    monkeypatch.delenv("NPDIFF_NO_BF16", raising=False)
    assert bf16_kernel() == "amx"


def rounded(a):
    """torch's bf16 rounding of a, widened back to float32 (a torch tensor)."""
    return torch.from_numpy(np.ascontiguousarray(a)).bfloat16().float()


def random_conv(rng, width, kernel, c_in=None):
    """x [B,C_in,H,width], weight [C_out,C_in,k,k], bias or None: sizes drawn from rng."""
    batch = int(rng.integers(1, 3))
    c_in = int(rng.integers(8, 40)) * 2 + 1 if c_in is None else c_in  # odd: the last pair has no partner
    c_out = int(rng.integers(1, 80))
    height = int(rng.integers(kernel, 7))
    x = rng.standard_normal((batch, c_in, height, width), dtype=np.float32)
    weight = rng.standard_normal((c_out, c_in, kernel, kernel), dtype=np.float32)
    bias = rng.standard_normal(c_out, dtype=np.float32) if rng.integers(2) else None
    return x, weight, bias


def expected(x, weight, bias, stride, padding):
    bias_t = None if bias is None else torch.from_numpy(bias)
    return F.conv2d(rounded(x), rounded(weight), bias_t, stride, padding)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kernel, stride, padding", GEOMETRIES)
def test_implicit_gemm_matches_torch(rng, width, kernel, stride, padding):
    """The kernel itself, with depth blocks of 64 channels so that C_in up to 81 crosses one."""
    x, weight, bias = random_conv(rng, width, kernel)
    taps = pack_conv_taps(float32_to_bf16(weight), 64)
    out = conv2d_bf16_implicit(x, taps, weight.shape, 64, bias, stride, stride, padding, padding)
    want = expected(x, weight, bias, stride, padding)
    assert out.dtype == np.float32 and out.shape == tuple(want.shape)
    assert_rel_close(out, want, KERNEL_TOL, f"implicit GEMM x {x.shape} * {weight.shape}, stride {stride}")


@pytest.mark.parametrize("width", WIDTHS)
def test_conv2d_bf16_runs_version_3(rng, width):
    """The public path: a 3x3 weight packed as "amx_taps" (the default depth blocks), its bf16 values
    kept exactly, the result torch's."""
    x, weight, bias = random_conv(rng, width, 3, c_in=int(rng.integers(16, 300)))
    packed = pack_conv_bf16(weight)
    assert packed.layout == "amx_taps" and packed.shape == weight.shape
    np.testing.assert_array_equal(packed.to_float32(), rounded(weight).numpy())
    out = conv2d_bf16(x, packed, bias, 1, 1)
    assert_rel_close(out, expected(x, weight, bias, 1, 1), KERNEL_TOL, f"conv2d_bf16 v3 {x.shape} * {weight.shape}")


def test_uneven_strides_paddings_and_strided_x(rng):
    """sh != sw and ph != pw (the column phases of stride 2 against the rows of stride 1), x not contiguous."""
    x = rng.standard_normal((2, 33, 40, 11), dtype=np.float32).transpose(0, 1, 3, 2)  # [2,33,11,40], strided
    weight = rng.standard_normal((20, 33, 3, 3), dtype=np.float32)
    packed = pack_conv_bf16(weight)
    for stride, padding in [((2, 1), (1, 0)), ((1, 2), (0, 1))]:
        out = conv2d_bf16(x, packed, None, stride, padding)
        assert_rel_close(out, expected(x, weight, None, stride, padding), KERNEL_TOL, f"{stride} {padding}")


def test_taps_layout_round_trip(rng):
    """unpack_conv_taps inverts pack_conv_taps for any depth block; the padding is zero."""
    bits = float32_to_bf16(rng.standard_normal((37, 70, 3, 3), dtype=np.float32))
    for channels_per_block in (32, 64, 256):
        taps = pack_conv_taps(bits, channels_per_block)
        assert taps.shape == (64, 9 * 96) and taps.ctypes.data % 64 == 0
        np.testing.assert_array_equal(unpack_conv_taps(taps, bits.shape, channels_per_block), bits)
        assert np.count_nonzero(taps) == np.count_nonzero(bits)


def test_layout_choice():
    """Narrow stride-1 outputs that end in part segments take the flat layout; the rest pair rows."""
    weight_shape = (8, 32, 3, 3)
    assert PixelLayout((1, 32, 8, 8), weight_shape, 1, 1, 1, 1).flat
    assert PixelLayout((1, 32, 8, 20), weight_shape, 1, 1, 1, 1).flat
    assert not PixelLayout((1, 32, 8, 64), weight_shape, 1, 1, 1, 1).flat
    assert not PixelLayout((1, 32, 8, 20), weight_shape, 2, 2, 1, 1).flat
    rows = PixelLayout((1, 32, 8, 64), weight_shape, 1, 1, 1, 1)
    assert (rows.pair_words // 16) % 2 == 1  # an odd number of cache lines between a tile's rows


def test_version_2_on_amx_still_matches(rng):
    """pack_conv_bf16(implicit=False) keeps version 2 (im2col into pair words, then matmul_amx's GEMM)."""
    x, weight, bias = random_conv(rng, 20, 3)
    packed = pack_conv_bf16(weight, implicit=False)
    assert packed.layout == "amx"
    out = conv2d_bf16(x, packed, bias, 1, 1)
    assert_rel_close(out, expected(x, weight, bias, 1, 1), KERNEL_TOL, "conv2d_bf16 v2 on AMX")


def test_no_amx_after_packing_falls_back(rng, monkeypatch):
    """A weight packed for version 3, then AMX ruled out (NPDIFF_NO_AMX=1): the float32 GEMM of the
    rounded values, the same result."""
    x, weight, bias = random_conv(rng, 20, 3)
    packed = pack_conv_bf16(weight)
    monkeypatch.setenv("NPDIFF_NO_AMX", "1")
    out = conv2d_bf16(x, packed, bias, 1, 1)
    assert_rel_close(out, expected(x, weight, bias, 1, 1), KERNEL_TOL, "amx_taps weight without AMX")
