"""GroupNorm + SiLU folded into the 3x3 convolution after it: conv2d(silu(group_norm(x)), weight, bias).

Every ResnetBlock2D of the UNet and the VAE runs this pair twice (norm1 -> SiLU -> conv1, norm2 -> SiLU ->
conv2), and the VAE's decoder once more at its end (conv_norm_out -> SiLU -> conv_out). Unfused, the
normalised tensor is written to memory whole (at the VAE's 512x512 stage, 256 MiB) and the conv reads it
back; fused, the conv's input transform reads x and normalises each row as it cuts its tiles.

Versions (tested against torch's GroupNorm + SiLU + Conv2d and against each other):
  1. group_norm_silu_conv2d_ref   NumPy API (numpy or cupy): norm.group_norm_ref(silu=True), then
                                  conv.conv2d_ref: the two steps, the normalised tensor in between.
  2. group_norm_silu_conv2d_fast  NumPy arrays. Where conv2d_fast would take Winograd F(4x4,3x3) or
                                  F(6x6,3x3) with padding 1 (conv.conv_method):
                                  1. the group statistics, one float64 pass over x as group_norm's
                                     (norm.group_norm_affine: mean, rstd * weight, bias per channel);
                                  2. Winograd with the normalising input transform
                                     (conv_winograd4.input_transform4_normed,
                                     conv_winograd6.input_transform6_normed): for each tile row, its
                                     input rows are normalised + SiLU'd by norm.normalize_run, the
                                     function group_norm runs, into a few rows of per-thread scratch,
                                     and the tiles are cut from there. The normalised tensor is never
                                     made, and the conv sees the same float32 values as unfused: the
                                     result has the same bits as group_norm_fast then conv2d_fast
                                     (tests/kernels/test_conv_norm.py checks it).
                                  Any other conv (1x1, strided, direct loops for few output channels,
                                  im2col): group_norm_fast(silu=True), then conv2d_fast.
  cupy arrays: the CUDA group_norm then the CUDA conv2d (npdiff/kernels/cuda/__init__.py).
"""

from npdiff.kernels import conv, conv_winograd, dispatch
from npdiff.kernels.conv import check_conv2d, conv2d_fast, conv2d_ref
from npdiff.kernels.norm import check_group_norm, group_norm_affine, group_norm_fast, group_norm_ref

WINOGRAD_SIDES = {"winograd4": 4, "winograd6": 6}  # conv_method's name -> the tile side m of F(m x m, 3 x 3)


def group_norm_silu_conv2d_ref(x, num_groups, norm_weight, norm_bias, eps, weight, bias, padding):
    normed = group_norm_ref(x, num_groups, norm_weight, norm_bias, eps, silu=True)  # [B,C_in,H,W]
    return conv2d_ref(normed, weight, bias, 1, padding)  # [B,C_in,H,W] -> [B,C_out,H,W]


def group_norm_silu_conv2d_fast(x, num_groups, norm_weight, norm_bias, eps, weight, bias, padding):
    method = conv.conv_method(x.shape, weight.shape, (1, 1), padding)
    if method in WINOGRAD_SIDES and padding == (1, 1):
        # 1. per (image, channel): (x - mean) * scale + shift, from the group statistics of x
        normalized = group_norm_affine(x, num_groups, norm_weight, norm_bias, eps)  # [B,C], [B,C], [C]
        # 2. the conv of SiLU(that), normalised in its input transform
        m = WINOGRAD_SIDES[method]
        return conv_winograd.winograd_conv2d(x, weight, bias, padding, m, normalized=normalized)  # [B,C_out,H,W]
    normed = group_norm_fast(x, num_groups, norm_weight, norm_bias, eps, silu=True)  # [B,C_in,H,W]
    return conv2d_fast(normed, weight, bias, (1, 1), padding)  # [B,C_in,H,W] -> [B,C_out,H,W]


GROUP_NORM_SILU_CONV2D = dispatch.register("group_norm_silu_conv2d", fast=group_norm_silu_conv2d_fast,
                                           reference=group_norm_silu_conv2d_ref, cuda="group_norm_silu_conv2d")


def group_norm_silu_conv2d(x, num_groups, norm_weight, norm_bias, eps, weight, bias=None, padding=1):
    """torch: F.conv2d(F.silu(F.group_norm(x, num_groups, norm_weight, norm_bias, eps)), weight, bias,
    stride=1, padding=padding) for float32 NCHW.

    x [B,C_in,H,W]; norm_weight, norm_bias [C_in] or None; weight [C_out,C_in,kH,kW], bias [C_out] or None;
    padding: int or (h, w). Returns [B,C_out,H_out,W_out]."""
    check_group_norm(x, num_groups, norm_weight, norm_bias)
    _, _, ph, pw = check_conv2d(x, weight, bias, 1, padding)
    return GROUP_NORM_SILU_CONV2D(x, num_groups, norm_weight, norm_bias, eps, weight, bias, (ph, pw))
