"""Winograd conv (F(2x2,3x3), F(4x4,3x3), F(6x6,3x3)): reference and fast version against torch, each other,
the transforms' defining identity, thread-count independence, and conv2d's choice of it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close
from npdiff.kernels import block_pool, conv, conv2d, conv_winograd, conv_winograd4, conv_winograd6
from npdiff.kernels.conv_winograd import WINOGRAD, winograd_conv2d, winograd_conv2d_ref

# (batch, C_in, C_out, H, W, padding): sizes that are not multiples of the tile (2 or 4), a 1x1
# image, padding 0 and 1 (and uneven or wide), and channel counts like SD's (RGB and latent inputs,
# 128, 320).
SHAPES = [
    (2, 6, 5, 9, 7, (2, 0)), (1, 4, 3, 6, 5, (0, 3)),
    (2, 5, 7, 7, 9, 1), (1, 3, 4, 13, 5, 1), (1, 4, 3, 1, 1, 1), (3, 8, 6, 9, 9, 0), (1, 6, 5, 4, 11, 0),
    (2, 4, 320, 10, 6, 1), (1, 128, 128, 9, 14, 1), (2, 320, 24, 5, 8, 1), (1, 3, 128, 17, 16, 1),
]


def sd_like_inputs(rng, batch, c_in, c_out, height, width, with_bias=True):
    """Scaled as SD's activations and weights: x ~ N(0,1), weights ~ N(0,1)/sqrt(9*C_in)."""
    x = rng.standard_normal((batch, c_in, height, width), dtype=np.float32)
    weight = (rng.standard_normal((c_out, c_in, 3, 3), dtype=np.float32) / np.sqrt(9 * c_in)).astype(np.float32)
    bias = rng.standard_normal(c_out, dtype=np.float32) if with_bias else None
    return x, weight, bias


def torch_conv(x, weight, bias, padding):
    bias_t = None if bias is None else torch.from_numpy(bias)
    return F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), bias_t, padding=padding)


@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_matches_torch(rng, m, shape, with_bias):
    *sizes, padding = shape
    x, weight, bias = sd_like_inputs(rng, *sizes, with_bias)
    expected = torch_conv(x, weight, bias, padding)
    fast = winograd_conv2d(x, weight, bias, padding if isinstance(padding, tuple) else (padding, padding), m)
    reference = winograd_conv2d_ref(x, weight, bias, padding, m)
    assert_rel_close(fast, expected, KERNEL_TOL, f"winograd F({m},3)")
    assert_rel_close(reference, expected, KERNEL_TOL, f"winograd_conv2d_ref F({m},3)")
    assert_rel_close(fast, reference, KERNEL_TOL, "fast vs reference")


@pytest.mark.parametrize("m", [2, 4, 6])
def test_transforms_compute_a_1d_correlation(rng, m):
    # The defining identity of F(m, 3): A^T [(G g) * (B^T d)] = the m outputs of correlating d with g.
    BT, G, AT = WINOGRAD[m]["BT"], WINOGRAD[m]["G"], WINOGRAD[m]["AT"]
    d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
    expected = [d[i:i + 3] @ g for i in range(m)]
    np.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [2, 4, 6])
def test_every_group_and_output_block_is_covered(rng, monkeypatch, m):
    # A one-byte group budget: one tile row per group (U made once for all groups); tiny output
    # blocks: many per group.
    monkeypatch.setattr(conv_winograd, "ONE_GROUP_BYTES", 0)
    monkeypatch.setattr(conv_winograd, "V_GROUP_BYTES", 1)
    monkeypatch.setattr(conv_winograd, "MIN_GROUP_TILES", 1)
    monkeypatch.setattr(conv_winograd, "OUT_BLOCK_ROWS", 3)
    monkeypatch.setattr(conv_winograd, "F6_OUT_BLOCK_ROWS", 3)
    x, weight, bias = sd_like_inputs(rng, 2, 6, 29, 31, 13)
    rows, tiles_w = 2 * -(-31 // m), -(-13 // m)
    groups, blocks = conv_winograd.blocking(m, 6, 29, rows, tiles_w)
    rows_per_group = -(-12 // tiles_w) if m == 6 else 1  # F(6,3): at least 2 * C_in = 12 tiles per group
    assert len(groups) == -(-rows // rows_per_group) > 1
    assert len(blocks) == (10 if m == 6 else 12)  # 29 channels in blocks of <= 3, an even / a 4k number
    assert_rel_close(winograd_conv2d(x, weight, bias, (1, 1), m), torch_conv(x, weight, bias, 1), KERNEL_TOL)


def at_one_two_three_workers(monkeypatch, call):
    """call()'s results with the block pool at 1, 2 and 3 workers."""
    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(block_pool, "_shared", block_pool.BlockParallelPool(workers))
        monkeypatch.setattr(conv_winograd, "worker_count", lambda workers=workers: workers)
        results.append(call())
        block_pool._shared.shutdown()
    return results


@pytest.mark.parametrize("m", [4, 6])
@pytest.mark.parametrize("one_group", [True, False])
def test_same_bytes_at_one_and_two_workers(rng, monkeypatch, one_group, m):
    # Groups and output blocks come from the shapes alone, so every GEMM has the same operands
    # whatever the number of workers; only the (element-wise) input transform split changes.
    if not one_group:  # several groups of tile rows, U made by the first for all
        monkeypatch.setattr(conv_winograd, "ONE_GROUP_BYTES", 0)
        monkeypatch.setattr(conv_winograd, "V_GROUP_BYTES", 1)
        monkeypatch.setattr(conv_winograd, "MIN_GROUP_TILES", 12)
    x, weight, bias = sd_like_inputs(rng, 2, 64, 96, 24, 20)
    results = at_one_two_three_workers(monkeypatch, lambda: winograd_conv2d(x, weight, bias, (1, 1), m))
    assert results[0].tobytes() == results[1].tobytes() == results[2].tobytes()


@pytest.mark.parametrize("height, width", [(9, 7), (1, 1), (13, 16), (16, 5)])
def test_written_out_f43_transforms_equal_the_generic_ones(rng, height, width):
    # input_transform4 / output_transform4 spell out B^T and A^T with the same terms in the same
    # order as the generic kernels (edge tiles and padding included): the same bytes.
    c_in, c_out, m, alpha = 5, 3, 4, 6
    BT, AT = (WINOGRAD[m][name].astype(np.float32) for name in ("BT", "AT"))
    x = rng.standard_normal((2, c_in, height, width), dtype=np.float32)
    h_out, w_out, tiles_h, tiles_w = conv_winograd.tile_counts(height, width, 1, 1, m)
    rows, tiles = 2 * tiles_h, 2 * tiles_h * tiles_w
    V, V4 = (np.full((alpha * alpha, c_in, tiles), np.nan, np.float32) for _ in range(2))
    scratch = lambda: np.full((alpha, m, tiles_w + 1), np.nan, np.float32)  # noqa: E731
    conv_winograd.input_transform(x, BT, m, 1, 1, 0, rows, tiles_h, 0, c_in, scratch(), scratch(), V)
    conv_winograd4.input_transform4(x, 0, rows, tiles_h, 0, c_in, scratch(), scratch(), V4)
    assert V.tobytes() == V4.tobytes()
    M = rng.standard_normal((c_out, alpha * alpha, tiles), dtype=np.float32)
    bias = rng.standard_normal(c_out, dtype=np.float32)
    out, out4 = (np.full((2, c_out, h_out, w_out), np.nan, np.float32) for _ in range(2))
    conv_winograd.output_transform(M, AT, bias, 0, 0, rows, tiles_h, np.empty((alpha, m, tiles_w), np.float32),
                                   np.empty((m, tiles_w), np.float32), out)
    conv_winograd4.output_transform4(M, bias, 0, 0, rows, tiles_h, np.empty((alpha, m, tiles_w), np.float32),
                                    np.empty((m, m, tiles_w), np.float32), out4)
    assert not np.isnan(out4).any() and out.tobytes() == out4.tobytes()


@pytest.mark.parametrize("height, width", [(9, 7), (1, 1), (13, 18), (18, 5)])
def test_written_out_f63_transforms_match_the_generic_ones(rng, height, width):
    # input_transform6 / output_transform6 share partial sums (their own order of the same terms):
    # equal to the generic kernels within float32 rounding, edge tiles and padding included, and
    # every output element written.
    c_in, c_out, m, alpha = 5, 3, 6, 8
    BT, AT = (WINOGRAD[m][name].astype(np.float32) for name in ("BT", "AT"))
    x = rng.standard_normal((2, c_in, height, width), dtype=np.float32)
    h_out, w_out, tiles_h, tiles_w = conv_winograd.tile_counts(height, width, 1, 1, m)
    rows, tiles = 2 * tiles_h, 2 * tiles_h * tiles_w
    V, V6 = (np.full((alpha * alpha, c_in, tiles), np.nan, np.float32) for _ in range(2))
    scratch = lambda: np.full((alpha, m, tiles_w + 1), np.nan, np.float32)  # noqa: E731
    conv_winograd.input_transform(x, BT, m, 1, 1, 0, rows, tiles_h, 0, c_in, scratch(), scratch(), V)
    conv_winograd6.input_transform6(x, 0, rows, tiles_h, 0, c_in, scratch(), scratch(), V6)
    assert not np.isnan(V6).any()
    np.testing.assert_allclose(V6, V, rtol=1e-5, atol=1e-5 * np.abs(V).max())
    M = rng.standard_normal((c_out, alpha * alpha, tiles), dtype=np.float32)
    bias = rng.standard_normal(c_out, dtype=np.float32)
    out, out6 = (np.full((2, c_out, h_out, w_out), np.nan, np.float32) for _ in range(2))
    conv_winograd.output_transform(M, AT, bias, 0, 0, rows, tiles_h, np.empty((alpha, m, tiles_w), np.float32),
                                   np.empty((m, tiles_w), np.float32), out)
    conv_winograd6.output_transform6(M, bias, 0, 0, rows, tiles_h, np.empty((alpha, m, tiles_w), np.float32),
                                     np.empty((m, m, tiles_w), np.float32), out6)
    assert not np.isnan(out6).any()
    np.testing.assert_allclose(out6, out, rtol=1e-5, atol=1e-5 * np.abs(out).max())


def test_f63_within_the_kernel_tolerance_at_vae_sizes(rng):
    # F(6,3)'s rounding grows with the channel count: at SD's deepest (512) and a picture larger
    # than one group of tiles, against torch float32 and float64; inputs as after GroupNorm + SiLU
    # (not zero-mean) and as N(0,1).
    x, weight, bias = sd_like_inputs(rng, 1, 512, 64, 40, 38)
    weight = np.concatenate([weight] * 8)  # [512,512,3,3]: 8 copies of 64 output channels (time)
    bias = np.concatenate([bias] * 8)
    for inputs in (x, (x / (1 + np.exp(-x))).astype(np.float32)):
        fast = winograd_conv2d(inputs, weight, bias, (1, 1), 6)
        assert_rel_close(fast, torch_conv(inputs, weight, bias, 1), KERNEL_TOL, "F(6,3) vs torch float32")
        expected64 = F.conv2d(torch.from_numpy(inputs).double(), torch.from_numpy(weight).double(),
                              torch.from_numpy(bias).double(), padding=1)
        assert_rel_close(fast, expected64, KERNEL_TOL, "F(6,3) vs torch float64")


@pytest.mark.parametrize("m", [4, 6])
@pytest.mark.parametrize("one_group", [True, False])
def test_buffers_past_the_kept_scratch(rng, monkeypatch, one_group, m):
    # With no scratch kept (KEPT_SCRATCH_BYTES 0, as the VAE's large blocks): every M is a per-call buffer
    # (product_buffers) and every taps block or U part a fresh array (worker_buffer): the same bytes.
    if not one_group:
        monkeypatch.setattr(conv_winograd, "ONE_GROUP_BYTES", 0)
        monkeypatch.setattr(conv_winograd, "V_GROUP_BYTES", 1)
        monkeypatch.setattr(conv_winograd, "MIN_GROUP_TILES", 12)
    x, weight, bias = sd_like_inputs(rng, 2, 40, 70, 26, 19)
    kept = winograd_conv2d(x, weight, bias, (1, 1), m)
    monkeypatch.setattr(conv_winograd, "KEPT_SCRATCH_BYTES", 0)
    assert conv_winograd.product_buffers([(0, 1)], 1) is not None
    assert winograd_conv2d(x, weight, bias, (1, 1), m).tobytes() == kept.tobytes()
    assert_rel_close(kept, torch_conv(x, weight, bias, 1), KERNEL_TOL)


@pytest.mark.parametrize("m", [2, 4])
def test_few_tiles_take_small_output_blocks(rng, monkeypatch, m):
    # At most SMALL_GEMM_MAX_TILES tiles in all (the UNet's 16 px convs): output blocks of rows with
    # rows * C_in * tiles <= SMALL_GEMM_MAX_WORK, their GEMMs over spans of input channels; every channel
    # covered, the same bytes at 1, 2 and 3 workers.
    x, weight, bias = sd_like_inputs(rng, 2, 16, 37, 8, 7)
    rows, tiles_w = 2 * -(-8 // m), -(-7 // m)
    tiles = rows * tiles_w
    assert tiles <= conv_winograd.SMALL_GEMM_MAX_TILES
    monkeypatch.setattr(conv_winograd, "SMALL_GEMM_MAX_WORK", 16 * tiles * 5)  # blocks of <= 5 rows
    monkeypatch.setattr(conv_winograd, "SMALL_GEMM_DEPTH", 6)  # each GEMM in 3 spans of input channels
    groups, blocks = conv_winograd.blocking(m, 16, 37, rows, tiles_w)
    assert groups == [(0, rows)] and len(blocks) == 8 and max(stop - start for start, stop in blocks) == 5
    assert [start for start, _ in blocks[1:]] == [stop for _, stop in blocks[:-1]] and blocks[-1][1] == 37
    results = at_one_two_three_workers(monkeypatch, lambda: winograd_conv2d(x, weight, bias, (1, 1), m))
    assert results[0].tobytes() == results[1].tobytes() == results[2].tobytes()
    assert_rel_close(results[0], torch_conv(x, weight, bias, 1), KERNEL_TOL)


def test_output_blocks_are_a_multiple_of_four():
    for c_out in [2, 5, 64, 128, 320, 512, 640, 1280]:
        blocks = conv_winograd.output_blocks(c_out)
        assert blocks[0][0] == 0 and blocks[-1][1] == c_out
        assert len(blocks) % 4 == 0 or len(blocks) == c_out


def test_conv2d_takes_winograd_at_sd_shapes(rng, monkeypatch):
    stride1, pad1 = (1, 1), (1, 1)
    for x_shape, weight_shape in [((2, 640, 32, 32), (640, 1280, 3, 3)), ((2, 64, 96, 96), (64, 64, 3, 3)),
                                  ((2, 2560, 16, 16), (1280, 2560, 3, 3)), ((2, 1280, 16, 16), (1280, 1280, 3, 3)),
                                  ((2, 640, 16, 16), (1280, 640, 3, 3)), ((1, 512, 63, 128), (512, 512, 3, 3))]:
        assert conv.conv_method(x_shape, weight_shape, stride1, pad1) == "winograd4"
    # F(6,3) from 64x64 output pixels and 128 input channels: the VAE's large pictures, the UNet at 64 px
    for x_shape, weight_shape in [((2, 320, 64, 64), (320, 320, 3, 3)), ((2, 960, 64, 64), (320, 960, 3, 3)),
                                  ((1, 512, 64, 64), (512, 512, 3, 3)), ((1, 512, 128, 128), (512, 512, 3, 3)),
                                  ((1, 128, 512, 512), (128, 128, 3, 3)), ((1, 256, 512, 512), (128, 256, 3, 3))]:
        assert conv.conv_method(x_shape, weight_shape, stride1, pad1) == "winograd6"
    # where it measured no faster: small images, few input channels, strides, 1x1, few outputs
    assert conv.conv_method((2, 1280, 8, 8), (1280, 1280, 3, 3), stride1, pad1) == "im2col"
    # batch 1 at 16x16: im2col from 1280 input channels (the up block's 2560 -> 1280), Winograd below
    assert conv.conv_method((1, 2560, 16, 16), (1280, 2560, 3, 3), stride1, pad1) == "im2col"
    assert conv.conv_method((1, 1280, 16, 16), (1280, 1280, 3, 3), stride1, pad1) == "im2col"
    assert conv.conv_method((1, 640, 16, 16), (1280, 640, 3, 3), stride1, pad1) == "winograd4"
    assert conv.conv_method((2, 4, 64, 64), (320, 4, 3, 3), stride1, pad1) == "im2col"
    assert conv.conv_method((2, 320, 64, 64), (320, 320, 3, 3), (2, 2), pad1) == "im2col"
    assert conv.conv_method((2, 320, 64, 64), (320, 320, 1, 1), stride1, (0, 0)) == "1x1"
    assert conv.conv_method((2, 320, 64, 64), (4, 320, 3, 3), stride1, pad1) == "direct"
    # and conv2d really runs it: a call at such a shape goes through winograd_conv2d
    calls = []

    def recording(*args):
        calls.append(args[-1])
        return winograd_conv2d(*args)

    monkeypatch.setattr(conv_winograd, "winograd_conv2d", recording)
    x, weight, bias = sd_like_inputs(rng, 1, 32, 40, 32, 33)
    assert_rel_close(conv2d(x, weight, bias, 1, 1), torch_conv(x, weight, bias, 1), KERNEL_TOL)
    assert calls == [4]


@pytest.mark.parametrize("m", [4, 6])
def test_tiny_vae_with_winograd_for_every_3x3_conv_matches_diffusers(rng, monkeypatch, m):
    # The tiny test models rarely reach the rule's sizes: here every 3x3 stride-1 conv with more
    # than a few output channels takes F(m,3), through a whole decode, against diffusers.
    from helpers import NETWORK_TOL
    from tiny_models import tiny_vae

    from npdiff.models import AutoencoderKL

    torch_model, folder = tiny_vae("sd", seed=0)
    ours = AutoencoderKL.from_pretrained(folder)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_C_IN", 1)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_PIXELS", 1)
    if m == 6:
        monkeypatch.setattr(conv, "WINOGRAD6_MIN_SIDE", 1)
        monkeypatch.setattr(conv, "WINOGRAD6_MIN_C_IN", 1)
    calls = []
    original = conv_winograd.winograd_conv2d
    monkeypatch.setattr(conv_winograd, "winograd_conv2d",  # (args[4]: m; the resnets' convs add normalized=)
                        lambda *args, **kwargs: calls.append(args[4]) or original(*args, **kwargs))
    z = rng.standard_normal((1, 4, 6, 5), dtype=np.float32)
    with torch.no_grad():
        expected = torch_model.decode(torch.from_numpy(z)).sample
    assert_rel_close(ours.decode(z), expected, NETWORK_TOL, f"tiny VAE decode, Winograd F({m},3) convs")
    assert len(calls) >= 10 and set(calls) == {m}
