"""A 3x3 convolution with the step before it folded into its input: the tensor between them is never made.

    group_norm_silu_conv2d(x, ...)     = conv2d(silu(group_norm(x)), ...)
    upsample_nearest2x_conv2d(x, ...)  = conv2d(upsample_nearest2x(x), ...)

Every ResnetBlock2D of the UNet and the VAE runs the first pair twice (norm1 -> SiLU -> conv1, norm2 -> SiLU
-> conv2), the VAE's decoder once more at its end (conv_norm_out -> SiLU -> conv_out); every Upsample2D runs
the second. Unfused, the tensor in between is written to memory whole (at the VAE's 512x512 stage 256 MiB:
the normalised 256-channel input of up_blocks.3, or the upsampled output of up_blocks.2) and the conv reads
it back; fused, the conv's input transform reads x and makes each input row as it cuts its tiles.

Versions (tested against torch and against each other, tests/kernels/test_conv_fused.py):
  1. *_ref    NumPy API (numpy or cupy): the two steps' references (norm.group_norm_ref(silu=True) or
              resample.upsample_nearest2x_ref, then conv.conv2d_ref), the tensor in between.
  2. *_fast   NumPy arrays. Where conv2d_fast would take Winograd F(4x4,3x3) or F(6x6,3x3) with padding 1
              at the conv's input size (conv.conv_method):
              GroupNorm + SiLU:
                1. the group statistics, one float64 pass over x as group_norm's
                   (norm.group_norm_affine: mean, rstd * weight, bias per channel);
                2. Winograd reading rows made by norm.normalize_rows (group_norm's own normalize_run);
              nearest 2x upsampling:
                Winograd reading rows made by resample.nearest2x_rows (each value of a row of x twice);
              in both, conv_winograd4/6's input_transform*_rows make a tile row's input rows in a few rows
              of per-thread scratch and cut the tiles from there. The conv sees the same float32 values
              as unfused: the result has the same bits as the two fast steps.
              Any other conv (1x1, strided, direct loops for few output channels, im2col, other padding):
              the two fast steps.
  cupy arrays: the two CUDA kernels, one after the other (npdiff/kernels/cuda/__init__.py).
"""

from npdiff.kernels import conv, conv_winograd, dispatch
from npdiff.kernels.conv import check_conv2d, conv2d_fast, conv2d_ref
from npdiff.kernels.norm import check_group_norm, group_norm_affine, group_norm_fast, group_norm_ref
from npdiff.kernels.resample import upsample_nearest2x_fast, upsample_nearest2x_ref

WINOGRAD_SIDES = {"winograd4": 4, "winograd6": 6}  # conv_method's name -> the tile side m of F(m x m, 3 x 3)


def folded_winograd_side(x_shape, weight_shape, padding):
    """F(m x m, 3 x 3)'s m (4 or 6) where conv2d_fast would take Winograd with padding 1 for an input of
    x_shape, else None (then the two steps run)."""
    method = conv.conv_method(x_shape, weight_shape, (1, 1), padding)
    return WINOGRAD_SIDES.get(method) if padding == (1, 1) else None


# ---------------------------------------------------------------------------------------------
# GroupNorm + SiLU, then the conv
# ---------------------------------------------------------------------------------------------
def group_norm_silu_conv2d_ref(x, num_groups, norm_weight, norm_bias, eps, weight, bias, padding):
    normed = group_norm_ref(x, num_groups, norm_weight, norm_bias, eps, silu=True)  # [B,C_in,H,W]
    return conv2d_ref(normed, weight, bias, 1, padding)  # [B,C_in,H,W] -> [B,C_out,H,W]


def group_norm_silu_conv2d_fast(x, num_groups, norm_weight, norm_bias, eps, weight, bias, padding):
    m = folded_winograd_side(x.shape, weight.shape, padding)
    if m is not None:
        # 1. per (image, channel): (x - mean) * scale + shift, from the group statistics of x
        normalized = group_norm_affine(x, num_groups, norm_weight, norm_bias, eps)  # [B,C], [B,C], [C]
        # 2. the conv of SiLU(that), its input rows normalised as the input transform reads them
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


# ---------------------------------------------------------------------------------------------
# Nearest 2x upsampling, then the conv
# ---------------------------------------------------------------------------------------------
def upsample_nearest2x_conv2d_ref(x, weight, bias, padding):
    return conv2d_ref(upsample_nearest2x_ref(x), weight, bias, 1, padding)  # [B,C,2H,2W] -> [B,C_out,2H,2W]


def upsample_nearest2x_conv2d_fast(x, weight, bias, padding):
    batch, channels, height, width = x.shape
    m = folded_winograd_side((batch, channels, 2 * height, 2 * width), weight.shape, padding)
    if m is not None:  # the conv reads row y of the upsampled picture from row y // 2 of x
        return conv_winograd.winograd_conv2d(x, weight, bias, padding, m, upsampled=True)  # [B,C_out,2H,2W]
    return conv2d_fast(upsample_nearest2x_fast(x), weight, bias, (1, 1), padding)  # [B,C_out,2H,2W]


UPSAMPLE_NEAREST2X_CONV2D = dispatch.register("upsample_nearest2x_conv2d", fast=upsample_nearest2x_conv2d_fast,
                                              reference=upsample_nearest2x_conv2d_ref,
                                              cuda="upsample_nearest2x_conv2d")


def upsample_nearest2x_conv2d(x, weight, bias=None, padding=1):
    """torch: F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, stride=1,
    padding=padding) for float32 NCHW (diffusers' Upsample2D).

    x [B,C_in,H,W]; weight [C_out,C_in,kH,kW], bias [C_out] or None; padding: int or (h, w).
    Returns [B,C_out,2H+2ph-kH+1,2W+2pw-kW+1]."""
    _, _, ph, pw = check_conv2d(x, weight, bias, 1, padding, upsampling=2)
    return UPSAMPLE_NEAREST2X_CONV2D(x, weight, bias, (ph, pw))
