"""group_norm (+ fused SiLU) and layer_norm against torch on fresh random inputs."""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close, rel_err
from npdiff import NpdiffError
from npdiff.kernels import group_norm, layer_norm
from npdiff.kernels.norm import group_norm_ref, layer_norm_ref


def optional(rng, present, size):
    return rng.standard_normal(size, dtype=np.float32) if present else None


def torch_or_none(a):
    return None if a is None else torch.from_numpy(a)


@pytest.mark.parametrize("spatial_axes", [0, 1, 2, 3])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch(rng, spatial_axes, silu, affine):
    groups = int(rng.integers(1, 5))
    channels = groups * int(rng.integers(2, 5))  # torch needs more than one value per group
    batch = int(rng.integers(1, 4))
    spatial = tuple(int(s) for s in rng.integers(1, 12, size=spatial_axes))  # odd, non-square sizes
    # an offset and a scale per call: statistics must not depend on the data being centred (kept
    # to |offset| <~ 2 std, where torch's own float32 result is within 1e-6 of the exact one)
    spread = rng.uniform(0.1, 10)
    offset = spread * rng.uniform(-2, 2)
    x = (offset + spread * rng.standard_normal((batch, channels, *spatial))).astype(np.float32)
    weight, bias = optional(rng, affine, channels), optional(rng, affine, channels)
    expected = F.group_norm(torch.from_numpy(x), groups, torch_or_none(weight), torch_or_none(bias), eps=1e-5)
    if silu:
        expected = F.silu(expected)
    ours = group_norm(x, groups, weight, bias, eps=1e-5, silu=silu)
    # With 2-4 values per group (no spatial axes) the group's spread can be tiny beside its mean, and then
    # torch's float32 statistics are themselves off the exact result (seed 3795894680: values -6.869 and
    # -6.883 in one group, torch 1.87e-5 from the float64 result, npdiff 1.1e-8). So npdiff is held to
    # KERNEL_TOL of the exact float64 result, and to torch within KERNEL_TOL plus torch's own error.
    exact = exact_group_norm(x, groups, weight, bias, eps=1e-5, silu=silu)
    torch_own_error = rel_err(expected, exact)
    assert_rel_close(ours, exact, KERNEL_TOL, "group_norm vs float64")
    assert_rel_close(ours, expected, KERNEL_TOL + torch_own_error, "group_norm")
    reference = group_norm_ref(x, groups, weight, bias, eps=1e-5, silu=silu)
    assert_rel_close(reference, expected, KERNEL_TOL + torch_own_error, "group_norm_ref")
    assert_rel_close(ours, reference, KERNEL_TOL, "group_norm vs ref")


def exact_group_norm(x, groups, weight, bias, eps, silu):
    """group norm in float64 from the float32 inputs: the exact result to within float64's rounding."""
    x64 = x.astype(np.float64).reshape(x.shape[0], groups, -1)                  # [B,G,C/G*spatial]
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    y = ((x64 - mean) / np.sqrt(var + eps)).reshape(x.shape)                     # [B,C,...]
    if weight is not None:
        per_channel = (1, -1) + (1,) * (x.ndim - 2)
        y = y * weight.astype(np.float64).reshape(per_channel) + bias.astype(np.float64).reshape(per_channel)
    return y / (1 + np.exp(-y)) if silu else y


def test_group_norm_sd_shape_and_eps(rng):
    # SD's 32 groups, eps 1e-6 as in the VAE.
    x = rng.standard_normal((2, 64, 9, 7), dtype=np.float32)
    weight, bias = rng.standard_normal(64, dtype=np.float32), rng.standard_normal(64, dtype=np.float32)
    expected = F.silu(F.group_norm(torch.from_numpy(x), 32, torch.from_numpy(weight), torch.from_numpy(bias), 1e-6))
    assert_rel_close(group_norm(x, 32, weight, bias, eps=1e-6, silu=True), expected, KERNEL_TOL)


@pytest.mark.parametrize("leading", [(), (3,), (2, 5), (2, 3, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(rng, leading, affine):
    width = int(rng.integers(1, 70))
    x = (rng.uniform(-2, 2) + rng.standard_normal((*leading, width))).astype(np.float32)
    weight, bias = optional(rng, affine, width), optional(rng, affine, width)
    expected = F.layer_norm(torch.from_numpy(x), (width,), torch_or_none(weight), torch_or_none(bias), eps=1e-5)
    assert_rel_close(layer_norm(x, weight, bias), expected, KERNEL_TOL, "layer_norm")
    assert_rel_close(layer_norm_ref(x, weight, bias), expected, KERNEL_TOL, "layer_norm_ref")


def test_layer_norm_large_input_threads_same_bytes(rng):
    """Above LAYER_NORM_SERIAL_MAX floats the rows run on Numba's threads; each row is the same
    serial computation either way, so both give the same bytes."""
    norm_module = importlib.import_module("npdiff.kernels.norm")
    width = 200
    x = (1.5 + rng.standard_normal((2, norm_module.LAYER_NORM_SERIAL_MAX // width, width))).astype(np.float32)
    weight, bias = optional(rng, True, width), optional(rng, True, width)
    assert x.size > norm_module.LAYER_NORM_SERIAL_MAX
    expected = F.layer_norm(torch.from_numpy(x), (width,), torch_or_none(weight), torch_or_none(bias), eps=1e-5)
    threaded = layer_norm(x, weight, bias)
    assert_rel_close(threaded, expected, KERNEL_TOL, "layer_norm (threads)")
    rows = x.reshape(-1, width)
    serial = np.empty_like(rows)
    norm_module._layer_norm_serial(rows, weight, bias, 1e-5, serial)
    assert np.array_equal(threaded.reshape(-1, width), serial)


def test_norms_reject_bad_input(rng):
    x = rng.standard_normal((2, 6, 4, 4), dtype=np.float32)
    ones = np.ones(6, np.float32)
    with pytest.raises(NpdiffError, match=r"group_norm: num_groups must be a positive divisor of .*C=6.*got 4"):
        group_norm(x, 4, ones, ones)
    with pytest.raises(NpdiffError, match=r"group_norm: weight must have shape \[6\], got \[5\]"):
        group_norm(x, 3, ones[:5], ones)
    with pytest.raises(NpdiffError, match=r"group_norm: x must be float32, got float16"):
        group_norm(x.astype(np.float16), 3, ones, ones)
    with pytest.raises(NpdiffError, match=r"group_norm: x must have at least 2 axes"):
        group_norm(x[0, 0, 0], 3, ones, ones)
    with pytest.raises(NpdiffError, match=r"layer_norm: bias must have shape \[4\], got \[6\]"):
        layer_norm(x, None, ones)
