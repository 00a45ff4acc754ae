"""The bfloat16 convolution (npdiff/kernels/conv_bf16.py) against torch.

conv2d_bf16 is compared with torch's float32 conv2d on the bf16-rounded operands
(`F.conv2d(x.bfloat16().float(), w.bfloat16().float(), b, stride, padding)`): the same products,
summed in another order, relative error <= KERNEL_TOL (1e-5). Shapes cover 1x1 (straight to the
GEMM), 3x3 with padding, stride 2, a 2x2 kernel, input channels across the depth blocks (64 channels
for 3x3, 576 for 1x1), output channels not a multiple of MR (6), pixels not a multiple of NR (64),
a row wider than a tile. Every path runs (the bf16_path fixture of
conftest.py): AMX tiles, vdpbf16ps and the float32 fallback.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff import NpdiffError
from npdiff.kernels.conv_bf16 import IMPLICIT_MIN_C_IN, conv2d_bf16, conv2d_bf16_ref, pack_conv_bf16

# (batch, C_in, H, W, C_out, kernel, stride, padding)
SHAPES = [(1, 3, 9, 11, 5, 3, 1, 1), (2, 64, 17, 13, 40, 3, 2, 1), (1, 130, 8, 8, 70, 1, 1, 0),
          (2, 600, 9, 7, 13, 3, 1, 1), (1, 5, 6, 6, 7, 2, 1, 0), (1, 1030, 5, 3, 9, 1, 1, 0),
          (1, 8, 3, 700, 12, 3, 1, 1), (2, 57, 12, 12, 64, 3, 1, 1)]


def rounded(a):
    """torch's bf16 rounding of a, widened back to float32 (a torch tensor)."""
    return torch.from_numpy(np.ascontiguousarray(a)).bfloat16().float()


@pytest.mark.parametrize("batch, c_in, height, width, c_out, k, stride, padding", SHAPES)
def test_conv2d_bf16_matches_torch(rng, bf16_path, batch, c_in, height, width, c_out, k, stride, padding):
    x = rng.standard_normal((batch, c_in, height, width), dtype=np.float32)
    weight = rng.standard_normal((c_out, c_in, k, k), dtype=np.float32)
    bias = rng.standard_normal(c_out, dtype=np.float32)
    packed = pack_conv_bf16(weight)
    implicit = bf16_path == "amx" and c_in >= IMPLICIT_MIN_C_IN  # version 3 (test_conv_bf16_amx.py)
    assert packed.layout == ("amx_taps" if implicit else bf16_path) and packed.shape == weight.shape
    np.testing.assert_array_equal(packed.to_float32(), rounded(weight).numpy())
    expected = F.conv2d(rounded(x), rounded(weight), torch.from_numpy(bias), stride, padding)
    out = conv2d_bf16(x, packed, bias, stride, padding)
    assert out.dtype == np.float32 and out.shape == tuple(expected.shape)
    assert_rel_close(out, expected, KERNEL_TOL, f"conv2d_bf16 {bf16_path} {x.shape} * {weight.shape}")
    assert_rel_close(conv2d_bf16_ref(x, weight, bias, stride, padding), expected, KERNEL_TOL, "conv2d_bf16_ref")
    no_bias = conv2d_bf16(x, packed, None, stride, padding)
    assert_rel_close(no_bias, F.conv2d(rounded(x), rounded(weight), None, stride, padding), KERNEL_TOL,
                     "conv2d_bf16 without bias")


def test_conv2d_bf16_strided_x_and_bf16_weight_bits(rng, bf16_path):
    x = rng.standard_normal((2, 9, 10, 32), dtype=np.float32).transpose(0, 1, 3, 2)  # [2,9,32,10], strided
    weight = rng.standard_normal((20, 9, 3, 3), dtype=np.float32)
    bits = rounded(weight).bfloat16().view(torch.int16).numpy().view(np.uint16)  # as a file stores bf16
    out = conv2d_bf16(x, pack_conv_bf16(bits), None, (2, 1), (1, 0))
    assert_rel_close(out, F.conv2d(rounded(x), rounded(weight), None, (2, 1), (1, 0)), KERNEL_TOL, "strided")


def test_bad_inputs_are_named(rng):
    packed = pack_conv_bf16(np.zeros((4, 3, 3, 3), np.float32))
    with pytest.raises(NpdiffError, match=r"C_in=5"):
        conv2d_bf16(np.zeros((1, 5, 8, 8), np.float32), packed)
    with pytest.raises(NpdiffError, match="smaller than the kernel"):
        conv2d_bf16(np.zeros((1, 3, 2, 2), np.float32), packed)
    with pytest.raises(NpdiffError, match="PackedBf16Conv"):
        conv2d_bf16(np.zeros((1, 3, 8, 8), np.float32), np.zeros((4, 3, 3, 3), np.float32))
    with pytest.raises(NpdiffError, match="4-D"):
        pack_conv_bf16(np.zeros((4, 3, 3), np.float32))
    with pytest.raises(NpdiffError, match="bias"):
        conv2d_bf16(np.zeros((1, 3, 8, 8), np.float32), packed, np.zeros(3, np.float32))
