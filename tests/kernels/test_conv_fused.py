"""group_norm_silu_conv2d and upsample_nearest2x_conv2d (the step before a conv folded into it) against torch's
GroupNorm + SiLU + Conv2d and nearest 2x interpolate + Conv2d on fresh random inputs, against their
references, and bit for bit against the two unfused steps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close
from npdiff.errors import NpdiffError
from npdiff.kernels import (
    block_pool,
    conv,
    conv2d,
    conv_winograd,
    group_norm,
    group_norm_silu_conv2d,
    upsample_nearest2x,
    upsample_nearest2x_conv2d,
)
from npdiff.kernels.conv_fused import group_norm_silu_conv2d_ref, upsample_nearest2x_conv2d_ref

# (batch, C_in, C_out, H, W, groups): sizes that are not multiples of the tiles (4, 6), a 1x1 and a 2x3
# image, a tile row's worth of rows, groups of 1, 2, 3, 8 and 32 channels
SHAPES = [(2, 64, 40, 33, 35, 32), (1, 48, 30, 37, 41, 6), (2, 6, 5, 9, 7, 3), (1, 16, 7, 1, 1, 8),
          (3, 8, 9, 2, 3, 1), (1, 32, 24, 6, 13, 16), (2, 24, 16, 14, 8, 8)]


def inputs(rng, batch, c_in, c_out, height, width, with_bias=True, offset=0.5):
    """x ~ N(offset, 2^2), GroupNorm's weight and bias ~ N(0,1), conv weights ~ N(0,1)/sqrt(9*C_in)."""
    x = (rng.standard_normal((batch, c_in, height, width), dtype=np.float32) * 2 + offset).astype(np.float32)
    norm_weight, norm_bias = rng.standard_normal((2, c_in), dtype=np.float32)
    weight = (rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32) / np.sqrt(9 * c_in)).astype(np.float32)
    bias = rng.standard_normal(c_out, dtype=np.float32) if with_bias else None
    return x, norm_weight, norm_bias, weight, bias


def torch_steps(x, groups, norm_weight, norm_bias, eps, weight, bias, padding):
    normed = F.silu(F.group_norm(torch.from_numpy(x), groups, torch.from_numpy(norm_weight),
                                 torch.from_numpy(norm_bias), eps))
    return F.conv2d(normed, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias),
                    padding=padding)


def winograd_everywhere(monkeypatch, m):
    """conv_method picks F(m,3) for every 3x3 stride-1 conv with more than a few outputs; records the calls."""
    monkeypatch.setattr(conv, "WINOGRAD_MIN_C_IN", 1)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_PIXELS", 1)
    monkeypatch.setattr(conv, "IM2COL_FEW_MIN_C_IN", 1 << 30)
    monkeypatch.setattr(conv, "DIRECT_MAX_C_OUT", 0)
    monkeypatch.setattr(conv, "WINOGRAD6_MIN_SIDE", 1 if m == 6 else 1 << 30)
    monkeypatch.setattr(conv, "WINOGRAD6_MIN_C_IN", 1)
    calls = []
    original = conv_winograd.winograd_conv2d

    def recording(*args, **kwargs):
        calls.append((args[4], bool(kwargs)))  # (m, whether the input was made row by row)
        return original(*args, **kwargs)

    monkeypatch.setattr(conv_winograd, "winograd_conv2d", recording)
    return calls


@pytest.mark.parametrize("m", [4, 6])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_winograd_matches_torch_and_the_two_steps(rng, monkeypatch, m, shape, with_bias):
    batch, c_in, c_out, height, width, groups = shape
    calls = winograd_everywhere(monkeypatch, m)
    x, norm_weight, norm_bias, weight, bias = inputs(rng, batch, c_in, c_out, height, width, with_bias)
    expected = torch_steps(x, groups, norm_weight, norm_bias, 1e-6, weight, bias, 1)
    fused = group_norm_silu_conv2d(x, groups, norm_weight, norm_bias, 1e-6, weight, bias, 1)
    assert calls == [(m, True)]  # the normalising input transform ran
    unfused = conv2d(group_norm(x, groups, norm_weight, norm_bias, 1e-6, silu=True), weight, bias, padding=1)
    reference = group_norm_silu_conv2d_ref(x, groups, norm_weight, norm_bias, 1e-6, weight, bias, (1, 1))
    assert_rel_close(fused, expected, KERNEL_TOL, f"fused F({m},3)")
    assert_rel_close(reference, expected, KERNEL_TOL, "group_norm_silu_conv2d_ref")
    assert fused.tobytes() == unfused.tobytes()  # the conv saw group_norm's own float32 values


@pytest.mark.parametrize("m", [4, 6])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_many_groups_of_tile_rows_and_workers(rng, monkeypatch, m, workers):
    # Groups of 3 tile rows (each starts its input rows afresh; the last tile row of the first image and
    # the first of the second meet in one group) and channel blocks split over 1-3 workers: the same bytes
    # as the two steps.
    calls = winograd_everywhere(monkeypatch, m)
    monkeypatch.setattr(conv_winograd, "ONE_GROUP_BYTES", 0)
    monkeypatch.setattr(conv_winograd, "V_GROUP_BYTES", 1)
    monkeypatch.setattr(conv_winograd, "MIN_GROUP_TILES", 11)  # 3 tile rows of 4 (F(6,3)) or 5 (F(4,3)) tiles
    monkeypatch.setattr(block_pool, "_shared", block_pool.BlockParallelPool(workers))
    monkeypatch.setattr(conv_winograd, "worker_count", lambda: workers)
    try:  # tile rows per image: 5 (F(6,3)) or 8 (F(4,3)); groups (0,3), (3,6), ...: one holds both images
        x, norm_weight, norm_bias, weight, bias = inputs(rng, 2, 12, 10, 29, 19)
        fused = group_norm_silu_conv2d(x, 4, norm_weight, norm_bias, 1e-5, weight, bias, 1)
        unfused = conv2d(group_norm(x, 4, norm_weight, norm_bias, 1e-5, silu=True), weight, bias, padding=1)
    finally:
        block_pool._shared.shutdown()
    assert calls == [(m, True), (m, False)]
    assert fused.tobytes() == unfused.tobytes()
    assert_rel_close(fused, torch_steps(x, 4, norm_weight, norm_bias, 1e-5, weight, bias, 1), KERNEL_TOL)


def test_large_mean_is_normalised_in_float64(rng, monkeypatch):
    # |mean| >> std: the fused path normalises x - mean in float64 as group_norm does (a float32 shift
    # folded into the scale would cancel)
    winograd_everywhere(monkeypatch, 6)
    x, norm_weight, norm_bias, weight, bias = inputs(rng, 1, 32, 16, 20, 21, offset=3000.0)
    fused = group_norm_silu_conv2d(x, 8, norm_weight, norm_bias, 1e-6, weight, bias, 1)
    expected = torch_steps(x.astype(np.float64), 8, norm_weight.astype(np.float64), norm_bias.astype(np.float64),
                           1e-6, weight.astype(np.float64), bias.astype(np.float64), 1)
    assert_rel_close(fused, expected, KERNEL_TOL, "fused, mean 3000")


@pytest.mark.parametrize("c_in, c_out, height, width, kernel, padding", [
    (128, 3, 20, 22, 3, 1),  # few outputs: direct loops (the VAE's conv_out)
    (256, 64, 8, 8, 3, 1),  # 8 px: im2col
    (64, 48, 33, 35, 3, 0),  # padding 0: Winograd without the normalising transform
    (64, 48, 12, 10, 1, 0),  # 1x1
    (64, 40, 17, 19, 3, (2, 1)),  # uneven padding
])
def test_other_convs_take_the_two_steps(rng, c_in, c_out, height, width, kernel, padding):
    x, norm_weight, norm_bias, _, bias = inputs(rng, 2, c_in, c_out, height, width)
    weight = (rng.standard_normal((c_out, c_in, kernel, kernel), dtype=np.float32) / np.sqrt(9 * c_in)).astype(
        np.float32)
    fused = group_norm_silu_conv2d(x, 32, norm_weight, norm_bias, 1e-6, weight, bias, padding)
    expected = torch_steps(x, 32, norm_weight, norm_bias, 1e-6, weight, bias, padding)
    assert_rel_close(fused, expected, KERNEL_TOL)


def test_sd_vae_shape(rng):
    # the decoder's 512-channel resnet conv at 64 px, as conv2d's rule picks it (F(6,3))
    x, norm_weight, norm_bias, weight, bias = inputs(rng, 1, 512, 512, 64, 64)
    fused = group_norm_silu_conv2d(x, 32, norm_weight, norm_bias, 1e-6, weight, bias, 1)
    assert_rel_close(fused, torch_steps(x, 32, norm_weight, norm_bias, 1e-6, weight, bias, 1), KERNEL_TOL)


def test_bad_inputs_name_the_argument(rng):
    x, norm_weight, norm_bias, weight, bias = inputs(rng, 1, 8, 4, 5, 5)
    with pytest.raises(NpdiffError, match="group_norm: num_groups"):
        group_norm_silu_conv2d(x, 3, norm_weight, norm_bias, 1e-6, weight, bias)
    with pytest.raises(NpdiffError, match="group_norm: weight"):
        group_norm_silu_conv2d(x, 4, norm_weight[:5], norm_bias, 1e-6, weight, bias)
    with pytest.raises(NpdiffError, match="conv2d: weight"):
        group_norm_silu_conv2d(x, 4, norm_weight, norm_bias, 1e-6, weight[:, :4], bias)
    with pytest.raises(NpdiffError, match="conv2d: bias"):
        group_norm_silu_conv2d(x, 4, norm_weight, norm_bias, 1e-6, weight, bias[:3])
    with pytest.raises(NpdiffError, match="conv2d: weight"):
        upsample_nearest2x_conv2d(x, weight[:, :4], bias)
    with pytest.raises(NpdiffError, match="conv2d: x"):
        upsample_nearest2x_conv2d(x[0], weight, bias)


def torch_upsample_conv(x, weight, bias, padding):
    upsampled = F.interpolate(torch.from_numpy(x), scale_factor=2, mode="nearest")
    return F.conv2d(upsampled, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias),
                    padding=padding)


@pytest.mark.parametrize("m", [4, 6])
@pytest.mark.parametrize("shape", SHAPES)
def test_upsample_folded_into_winograd_matches_torch_and_the_two_steps(rng, monkeypatch, m, shape):
    batch, c_in, c_out, height, width, _ = shape
    calls = winograd_everywhere(monkeypatch, m)
    x, _, _, weight, bias = inputs(rng, batch, c_in, c_out, height, width)
    folded = upsample_nearest2x_conv2d(x, weight, bias, 1)
    assert calls == [(m, True)]
    unfused = conv2d(upsample_nearest2x(x), weight, bias, padding=1)
    reference = upsample_nearest2x_conv2d_ref(x, weight, bias, (1, 1))
    expected = torch_upsample_conv(x, weight, bias, 1)
    assert_rel_close(folded, expected, KERNEL_TOL, f"upsample folded into F({m},3)")
    assert_rel_close(reference, expected, KERNEL_TOL, "upsample_nearest2x_conv2d_ref")
    assert folded.tobytes() == unfused.tobytes()


@pytest.mark.parametrize("m", [4, 6])
def test_upsample_many_groups_of_tile_rows(rng, monkeypatch, m):
    calls = winograd_everywhere(monkeypatch, m)
    monkeypatch.setattr(conv_winograd, "ONE_GROUP_BYTES", 0)
    monkeypatch.setattr(conv_winograd, "V_GROUP_BYTES", 1)
    monkeypatch.setattr(conv_winograd, "MIN_GROUP_TILES", 11)
    x, _, _, weight, bias = inputs(rng, 2, 12, 10, 15, 10)  # 30x20 upsampled: tile rows of 2 images share groups
    folded = upsample_nearest2x_conv2d(x, weight, bias, 1)
    assert calls[0] == (m, True)
    assert folded.tobytes() == conv2d(upsample_nearest2x(x), weight, bias, padding=1).tobytes()


@pytest.mark.parametrize("c_in, c_out, height, width, padding", [
    (128, 3, 10, 11, 1),  # few outputs: direct loops
    (64, 48, 9, 8, 0),  # padding 0
    (256, 64, 4, 4, 1),  # 8 px after upsampling: im2col
    (3, 5, 1, 1, 0),  # 1x1 -> 2x2 with padding 0: smaller than the kernel -> the error below
])
def test_upsample_other_convs_take_the_two_steps(rng, c_in, c_out, height, width, padding):
    x, _, _, weight, bias = inputs(rng, 2, c_in, c_out, height, width)
    if 2 * height + 2 * padding < 3:
        with pytest.raises(NpdiffError, match="upsampled 2x"):
            upsample_nearest2x_conv2d(x, weight, bias, padding)
        return
    assert_rel_close(upsample_nearest2x_conv2d(x, weight, bias, padding), torch_upsample_conv(x, weight, bias, padding),
                     KERNEL_TOL)
