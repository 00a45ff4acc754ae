"""conv2d (every path) against torch.nn.functional.conv2d on fresh random inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close
from npdiff import NpdiffError
from npdiff.kernels import block_pool, conv, conv2d, conv2d_ref

# (kernel size, stride, padding): SD's 1x1 / 3x3 pad 1 / 3x3 stride 2 (pad 0 after an asymmetric
# pad in the VAE encoder, pad 1 in the UNet), plus odd ones.
CASES = [
    ((1, 1), 1, 0), ((3, 3), 1, 1), ((3, 3), 2, 1), ((3, 3), 2, 0), ((3, 3), 1, 0),
    ((1, 1), 2, 0), ((1, 1), 1, 1), ((3, 1), 1, (1, 0)), ((2, 3), (2, 1), (0, 2)), ((5, 5), 1, 2),
]


def random_conv_inputs(rng, kernel_size, with_bias=True):
    batch = int(rng.integers(1, 4))
    c_in, c_out = int(rng.integers(1, 13)), int(rng.integers(1, 13))
    height, width = int(rng.integers(5, 20)), int(rng.integers(5, 20))  # odd sizes, non-square
    x = rng.standard_normal((batch, c_in, height, width), dtype=np.float32)
    weight = rng.standard_normal((c_out, c_in, *kernel_size), dtype=np.float32)
    bias = rng.standard_normal(c_out, dtype=np.float32) if with_bias else None
    return x, weight, bias


def torch_conv(x, weight, bias, stride, padding):
    bias_t = None if bias is None else torch.from_numpy(bias)
    return F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), bias_t, stride=stride, padding=padding)


@pytest.mark.parametrize("kernel_size,stride,padding", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d_matches_torch(rng, kernel_size, stride, padding, with_bias):
    x, weight, bias = random_conv_inputs(rng, kernel_size, with_bias)
    expected = torch_conv(x, weight, bias, stride, padding)
    ours = conv2d(x, weight, bias, stride, padding)
    assert_rel_close(ours, expected, KERNEL_TOL, "conv2d")
    reference = conv2d_ref(x, weight, bias, stride, padding)
    assert_rel_close(reference, expected, KERNEL_TOL, "conv2d_ref")
    assert_rel_close(ours, reference, KERNEL_TOL, "conv2d vs conv2d_ref")


@pytest.mark.parametrize("kernel_size,stride,padding", CASES)
def test_every_fast_path_matches_torch(rng, kernel_size, stride, padding):
    # Each path on its own (conv2d picks one by shape): im2col tiles, direct loops (stride 1),
    # the 1x1 GEMM (1x1, stride 1, no padding).
    x, weight, bias = random_conv_inputs(rng, kernel_size)
    sh, sw, ph, pw = conv.check_conv2d(x, weight, bias, stride, padding)
    expected = torch_conv(x, weight, bias, stride, padding)
    assert_rel_close(conv._conv_im2col_tiled(x, weight, bias, sh, sw, ph, pw), expected, KERNEL_TOL, "im2col")
    if sh == sw == 1:
        assert_rel_close(conv._conv_direct(x, weight, bias, ph, pw), expected, KERNEL_TOL, "direct")
        assert_rel_close(conv._conv_direct(x, weight, None, ph, pw), torch_conv(x, weight, None, stride, padding),
                         KERNEL_TOL, "direct, no bias")
    if kernel_size == (1, 1) and sh == sw == 1 and ph == pw == 0:
        assert_rel_close(conv._conv1x1(x, weight, bias), expected, KERNEL_TOL, "1x1")


@pytest.mark.parametrize("kernel_size,stride,padding", CASES)
def test_im2col_tiles_cover_every_row(rng, monkeypatch, kernel_size, stride, padding):
    # A tiny tile budget forces one output row per GEMM, and a last tile shorter than the others.
    monkeypatch.setattr(conv, "IM2COL_TILE_BYTES", 1)
    x, weight, bias = random_conv_inputs(rng, kernel_size)
    ours = conv._conv_im2col_tiled(x, weight, bias, *conv.check_conv2d(x, weight, bias, stride, padding))
    assert_rel_close(ours, torch_conv(x, weight, bias, stride, padding), KERNEL_TOL, "im2col tiled")


@pytest.mark.parametrize("c_in,c_out", [(64, 96), (160, 4), (3, 40)])
def test_conv2d_sd_like_channels(rng, c_in, c_out):
    # More channels than the random cases, as SD's blocks (and its conv_out to 4 latent channels,
    # the VAE's conv_in from RGB): 3x3, pad 1, batch 2, non-square.
    x = rng.standard_normal((2, c_in, 12, 10), dtype=np.float32)
    weight = rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32) * 0.05
    bias = rng.standard_normal(c_out, dtype=np.float32)
    expected = torch_conv(x, weight, bias, 1, 1)
    assert_rel_close(conv2d(x, weight, bias, 1, 1), expected, KERNEL_TOL)
    assert_rel_close(conv._conv_direct(x, weight, bias, 1, 1), expected, KERNEL_TOL, "direct")
    assert_rel_close(conv._conv_im2col_tiled(x, weight, bias, 1, 1, 1, 1), expected, KERNEL_TOL, "im2col")


def test_conv2d_accepts_strided_views(rng):
    x = rng.standard_normal((2, 4, 9, 16), dtype=np.float32)[:, :, :, ::2]  # not contiguous
    weight = rng.standard_normal((3, 4, 3, 3), dtype=np.float32)
    assert_rel_close(conv2d(x, weight, None, 1, 1), torch_conv(np.ascontiguousarray(x), weight, None, 1, 1))


def test_conv2d_rejects_bad_input(rng):
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    weight = rng.standard_normal((3, 4, 3, 3), dtype=np.float32)
    with pytest.raises(NpdiffError, match=r"conv2d: weight must have shape \[C_out,C_in=4,kH,kW\].*got \[3,5,3,3\]"):
        conv2d(x, rng.standard_normal((3, 5, 3, 3), dtype=np.float32))
    with pytest.raises(NpdiffError, match=r"conv2d: x must be 4-D \[B,C_in,H,W\], got shape \[4,8,8\]"):
        conv2d(x[0], weight)
    with pytest.raises(NpdiffError, match=r"conv2d: x must be float32, got float64"):
        conv2d(x.astype(np.float64), weight)
    with pytest.raises(NpdiffError, match=r"conv2d: bias must have shape \[3\], got \[4\]"):
        conv2d(x, weight, np.zeros(4, np.float32))
    with pytest.raises(NpdiffError, match=r"conv2d: stride must be >= 1"):
        conv2d(x, weight, stride=0)
    with pytest.raises(NpdiffError, match=r"conv2d: padding must be an int or a pair of ints"):
        conv2d(x, weight, padding=(1, 1, 1))
    with pytest.raises(NpdiffError, match=r"conv2d: x \[1,4,2,2\] .* is smaller than the kernel 3x3"):
        conv2d(x[:, :, :2, :2], weight)


def test_conv1x1_tiles_cover_every_pixel(rng, monkeypatch):
    # Small pixel tiles: several GEMMs per image, the last one shorter.
    monkeypatch.setattr(conv, "PIXELS_PER_TILE_1X1", 7)
    monkeypatch.setattr(conv, "worker_count", lambda: 1000)
    x, weight, bias = random_conv_inputs(rng, (1, 1))
    assert_rel_close(conv._conv1x1(x, weight, bias), torch_conv(x, weight, bias, 1, 0), KERNEL_TOL, "1x1 tiled")


def test_split_evenly():
    for total in range(1, 40):
        for max_part in range(1, 12):
            for images, workers in [(1, 1), (1, 2), (2, 2), (3, 4)]:
                parts = block_pool.split_evenly(total, max_part, images, workers)
                sizes = [stop - start for start, stop in parts]
                assert parts[0][0] == 0 and parts[-1][1] == total
                assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
                assert max(sizes) <= max_part and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
                assert (images * len(parts)) % workers == 0 or len(parts) == total


@pytest.mark.parametrize("stride", [1, 2])
def test_im2col_batch_of_small_images(rng, stride):
    # Small images at batch > 1 (the UNet's 8x8 convs): every image's columns in one GEMM per block of output
    # channels; C_out 10 is not a multiple of the 4 blocks, the blocks uneven.
    x = rng.standard_normal((3, 24, 8, 7), dtype=np.float32)
    weight = rng.standard_normal((10, 24, 3, 3), dtype=np.float32) * 0.1
    bias = rng.standard_normal(10, dtype=np.float32)
    assert 3 * 24 * 9 * 8 * 7 * 4 <= conv.IM2COL_TILE_BYTES and 8 * 7 <= conv.IM2COL_BATCH_MAX_PIXELS
    for b in (bias, None):
        ours = conv._conv_im2col_batch(x, weight.reshape(10, -1), b, (3, 3),
                                       (conv.output_size(8, 3, stride, 1), conv.output_size(7, 3, stride, 1)),
                                       stride, stride, 1, 1)
        assert_rel_close(ours, torch_conv(x, weight, b, stride, 1), KERNEL_TOL, "im2col batch")
        assert_rel_close(conv._conv_im2col_tiled(x, weight, b, stride, stride, 1, 1),
                         torch_conv(x, weight, b, stride, 1), KERNEL_TOL, "im2col tiled, batch")
