"""Backward of conv2d (input and weight gradients; im2col, 1x1, direct and Winograd paths) and of
nearest 2x upsampling, against torch.autograd on fresh random inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close
from npdiff import NpdiffError
from npdiff.kernels.conv import conv_method
from npdiff.kernels.conv_backward import FLIPPED_KERNELS, conv2d_backward, conv2d_backward_ref, conv2d_input_grad
from npdiff.kernels.resample import upsample_nearest2x_backward, upsample_nearest2x_backward_ref


def autograd_conv(x, weight, bias, grad_out, stride, padding):
    xt, wt, bt = (torch.from_numpy(a).requires_grad_(True) for a in (x, weight, bias))
    F.conv2d(xt, wt, bt, stride=stride, padding=padding).backward(torch.from_numpy(grad_out))
    return xt.grad, wt.grad, bt.grad


def check_conv_backward(rng, x_shape, weight_shape, stride, padding):
    x = rng.standard_normal(x_shape).astype(np.float32)
    weight = (rng.standard_normal(weight_shape) / np.sqrt(np.prod(weight_shape[1:]))).astype(np.float32)
    bias = rng.standard_normal(weight_shape[0]).astype(np.float32)
    out_shape = F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), stride=stride, padding=padding).shape
    grad_out = rng.standard_normal(tuple(out_shape)).astype(np.float32)
    expected = autograd_conv(x, weight, bias, grad_out, stride, padding)
    for version in (conv2d_backward, lambda *a, **k: conv2d_backward_ref(x, weight, grad_out, (stride,) * 2,
                                                                          (padding,) * 2)):
        for ours, theirs, what in zip(version(x, weight, grad_out, stride, padding), expected, ("dx", "dW", "db")):
            assert_rel_close(ours, theirs, KERNEL_TOL, what)


@pytest.mark.parametrize("kernel_size,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 0), (3, 2, 0),
                                                        (4, 3, 2), (2, 1, 1), (1, 2, 1)])
def test_conv2d_backward_matches_autograd(rng, kernel_size, stride, padding):
    batch, c_in, c_out = int(rng.integers(1, 3)), int(rng.integers(1, 12)), int(rng.integers(1, 12))
    height, width = (int(s) for s in rng.integers(kernel_size, 14, size=2))  # odd and even sizes
    check_conv_backward(rng, (batch, c_in, height, width), (c_out, c_in, kernel_size, kernel_size), stride, padding)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_backward_through_winograd(rng, stride):
    """dx of a 3x3 conv with many channels on 32x32 runs through Winograd F(4x4,3x3) (the forward's own
    path: its zero-dilated dy convolves at stride 1); the downsampler's stride 2 too."""
    x_shape, weight_shape = (1, 40, 32 * stride, 32 * stride), (36, 40, 3, 3)
    dilated_shape = (1, 36, 32 * stride - (stride - 1), 32 * stride - (stride - 1))
    assert conv_method(dilated_shape, (40, 36, 3, 3), (1, 1), (1, 1)) == "winograd4"
    check_conv_backward(rng, x_shape, weight_shape, stride, 1)


def test_conv2d_backward_deep_16x16_through_im2col(rng):
    """Batch 1 at 16x16 with 640 channels: conv_method would pick Winograd for dx's conv, the backward
    takes im2col there (IM2COL_MAX_PIXELS); the same dx as autograd."""
    x_shape, weight_shape = (1, 24, 16, 16), (640, 24, 3, 3)
    assert conv_method((1, 640, 16, 16), (24, 640, 3, 3), (1, 1), (1, 1)) == "winograd4"
    check_conv_backward(rng, x_shape, weight_shape, 1, 1)


def test_conv2d_backward_through_the_direct_loops(rng):
    """Few input channels of the forward: dx has few output channels -> the direct Numba loops."""
    assert conv_method((1, 320, 16, 16), (3, 320, 3, 3), (1, 1), (1, 1)) == "direct"
    check_conv_backward(rng, (1, 3, 16, 16), (320, 3, 3, 3), 1, 1)


def test_conv2d_input_grad_of_a_frozen_weight_keeps_its_flipped_kernel(rng):
    """frozen=True: the flipped kernel is made once per weight array, the same dx as autograd every
    call; a new weight array (as LoRA fusing assigns) gets its own; a dead array's entry goes."""
    x = rng.standard_normal((1, 5, 9, 7)).astype(np.float32)
    grad_out = rng.standard_normal((1, 6, 9, 7)).astype(np.float32)
    weights = [rng.standard_normal((6, 5, 3, 3)).astype(np.float32) for _ in range(2)]
    for weight in weights + weights:
        expected = autograd_conv(x, weight, np.zeros(6, np.float32), grad_out, 1, 1)[0]
        assert_rel_close(conv2d_input_grad(x.shape, weight, grad_out, (1, 1), (1, 1), frozen=True), expected,
                         KERNEL_TOL, "dx")
        assert id(weight) in FLIPPED_KERNELS.entries
    kept = FLIPPED_KERNELS.entries[id(weights[0])][1]
    assert conv2d_input_grad(x.shape, weights[0], grad_out, (1, 1), (1, 1), frozen=True) is not None
    assert FLIPPED_KERNELS.entries[id(weights[0])][1] is kept  # made once
    key = id(weights[1])
    del weight, weights[1]
    assert key not in FLIPPED_KERNELS.entries


def test_conv2d_backward_refuses_a_wrong_grad_shape(rng):
    x = np.zeros((1, 2, 8, 8), np.float32)
    with pytest.raises(NpdiffError, match=r"grad_out must have conv2d's output shape \[1,3,8,8\]"):
        conv2d_backward(x, np.zeros((3, 2, 3, 3), np.float32), np.zeros((1, 3, 6, 6), np.float32), 1, 1)


def test_upsample_nearest2x_backward_matches_autograd(rng):
    shape = (int(rng.integers(1, 3)), int(rng.integers(1, 6)), int(rng.integers(1, 12)), int(rng.integers(1, 12)))
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).requires_grad_(True)
    grad_out = rng.standard_normal(shape[:2] + (2 * shape[2], 2 * shape[3])).astype(np.float32)
    F.interpolate(x, scale_factor=2.0, mode="nearest").backward(torch.from_numpy(grad_out))
    assert_rel_close(upsample_nearest2x_backward(grad_out), x.grad, KERNEL_TOL, "fast")
    assert_rel_close(upsample_nearest2x_backward_ref(grad_out), x.grad, KERNEL_TOL, "reference")
    with pytest.raises(NpdiffError, match="even height and width"):
        upsample_nearest2x_backward(grad_out[:, :, 1:])


@pytest.mark.parametrize("kernel_size,stride,padding,frozen", [(3, 1, 1, True), (1, 1, 0, True), (3, 2, 1, False)])
def test_conv2d_input_grad_of_leading_channels_matches_autograd(rng, kernel_size, stride, padding, frozen):
    """input_channels=c: dx of x's first c channels only (the UNet tape's concatenation whose skip needs no
    gradient), autograd's dx[:, :c]."""
    c_in, c_out = int(rng.integers(2, 40)), int(rng.integers(1, 24))
    wanted = int(rng.integers(1, c_in))
    x = rng.standard_normal((int(rng.integers(1, 3)), c_in, 12, 10)).astype(np.float32)
    weight = (rng.standard_normal((c_out, c_in, kernel_size, kernel_size)) / np.sqrt(c_in * kernel_size**2)).astype(
        np.float32)
    out_shape = F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), stride=stride, padding=padding).shape
    grad_out = rng.standard_normal(tuple(out_shape)).astype(np.float32)
    expected_dx = autograd_conv(x, weight, np.zeros(c_out, np.float32), grad_out, stride, padding)[0]
    ours = conv2d_input_grad(x.shape, weight, grad_out, (stride,) * 2, (padding,) * 2, frozen=frozen,
                             input_channels=wanted)
    assert ours.shape == (x.shape[0], wanted) + x.shape[2:]
    assert_rel_close(ours, expected_dx[:, :wanted], KERNEL_TOL, "dx of the leading channels")
