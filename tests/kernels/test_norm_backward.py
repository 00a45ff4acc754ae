"""Backward of layer_norm and group_norm (+ SiLU) against torch.autograd on fresh random inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff import NpdiffError
from npdiff.kernels.norm_backward import (
    group_norm_backward,
    group_norm_backward_ref,
    layer_norm_backward,
    layer_norm_backward_ref,
)


def autograd(forward, arrays, grad_out):
    tensors = [torch.from_numpy(a).requires_grad_(True) for a in arrays]
    forward(*tensors).backward(torch.from_numpy(grad_out))
    return [t.grad for t in tensors]


@pytest.mark.parametrize("lead_axes", [1, 2])
def test_layer_norm_backward_matches_autograd(rng, lead_axes):
    lead = tuple(int(s) for s in rng.integers(1, 30, size=lead_axes))
    # at least 3 values a row: with 2 the normalised row is exactly (-1, 1) whatever x is, the true dx is 0 and
    # both sides return rounding noise (a 2.9e-2 "relative error" in one draw of the whole suite)
    width = int(rng.integers(3, 100))
    spread = rng.uniform(0.1, 10)
    x = (spread * rng.uniform(-2, 2) + spread * rng.standard_normal(lead + (width,))).astype(np.float32)
    weight, bias = (rng.standard_normal(width).astype(np.float32) for _ in range(2))
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    expected = autograd(lambda a, w, b: F.layer_norm(a, (width,), w, b, eps=1e-5), (x, weight, bias), grad_out)
    for version in (layer_norm_backward, layer_norm_backward_ref):
        for ours, theirs, what in zip(version(x, weight, bias, grad_out), expected, ("dx", "dw", "db")):
            assert_rel_close(ours, theirs, KERNEL_TOL, f"{version.__name__} {what}")
        grad_x, grad_weight, grad_bias = version(x, weight, bias, grad_out, 1e-5, need_weight_grad=False)
        assert grad_weight is None and grad_bias is None
        assert_rel_close(grad_x, expected[0], KERNEL_TOL, f"{version.__name__} dx alone")


@pytest.mark.parametrize("spatial_axes", [0, 1, 2])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_backward_matches_autograd(rng, spatial_axes, silu):
    groups = int(rng.integers(1, 5))
    # at least 3 values per group: with 2, xhat = +-1 whatever x is, so dx is 0 up to rounding noise
    channels = groups * int(rng.integers(3, 6))
    batch = int(rng.integers(1, 4))
    spatial = tuple(int(s) for s in rng.integers(1, 12, size=spatial_axes))
    spread = rng.uniform(0.1, 10)
    x = (spread * rng.uniform(-2, 2) + spread * rng.standard_normal((batch, channels, *spatial))).astype(np.float32)
    weight, bias = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    grad_out = rng.standard_normal(x.shape).astype(np.float32)

    def torch_forward(a, w, b):
        y = F.group_norm(a, groups, w, b, eps=1e-5)
        return F.silu(y) if silu else y

    expected = autograd(torch_forward, (x, weight, bias), grad_out)
    for version in (group_norm_backward, group_norm_backward_ref):
        ours = version(x, groups, weight, bias, grad_out, 1e-5, silu)
        for mine, theirs, what in zip(ours, expected, ("dx", "dw", "db")):
            assert_rel_close(mine, theirs, KERNEL_TOL, f"{version.__name__} {what}")
        grad_x, grad_weight, grad_bias = version(x, groups, weight, bias, grad_out, 1e-5, silu, need_weight_grad=False)
        assert grad_weight is None and grad_bias is None
        assert_rel_close(grad_x, expected[0], KERNEL_TOL, f"{version.__name__} dx alone")


@pytest.mark.parametrize("kind", ["layer", "group", "group+silu"])
def test_norm_backward_adds_the_residual_gradient(rng, kind):
    """residual=R: dx of loss = sum(norm(x) * dy) + sum(x * R) (a residual branch around the norm whose
    gradient is R), autograd's, in the kernel's own pass; without it, dx as before."""
    x = (rng.uniform(0.1, 5) * rng.standard_normal((2, 8, 5, 7))).astype(np.float32)
    channels, groups = x.shape[1], 4
    width = x.shape[-1] if kind == "layer" else channels
    weight, bias = (rng.standard_normal(width).astype(np.float32) for _ in range(2))
    grad_out, residual = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(2))

    def norm(a, w, b):
        if kind == "layer":
            return F.layer_norm(a, (width,), w, b, eps=1e-5)
        y = F.group_norm(a, groups, w, b, eps=1e-5)
        return F.silu(y) if kind == "group+silu" else y

    tensors = [torch.from_numpy(a).requires_grad_(True) for a in (x, weight, bias)]
    loss = (norm(*tensors) * torch.from_numpy(grad_out)).sum() + (tensors[0] * torch.from_numpy(residual)).sum()
    loss.backward()
    expected = tensors[0].grad
    if kind == "layer":
        versions = [lambda **kw: layer_norm_backward(x, weight, bias, grad_out, 1e-5, False, **kw),
                    lambda **kw: layer_norm_backward_ref(x, weight, bias, grad_out, 1e-5, False, **kw)]
    else:
        silu = kind == "group+silu"
        versions = [lambda **kw: group_norm_backward(x, groups, weight, bias, grad_out, 1e-5, silu, False, **kw),
                    lambda **kw: group_norm_backward_ref(x, groups, weight, bias, grad_out, 1e-5, silu, False, **kw)]
    for index, version in enumerate(versions):
        assert_rel_close(version(residual=residual)[0], expected, KERNEL_TOL, f"{kind} version {index} dx + residual")
        assert_rel_close(version()[0] + residual, expected, KERNEL_TOL, f"{kind} version {index} dx")
    with pytest.raises(NpdiffError, match=r"residual must have the shape of x \[2,8,5,7\]"):
        versions[0](residual=residual[:1])


def test_norm_backward_refuses_bad_input():
    x = np.zeros((2, 6, 3), np.float32)
    with pytest.raises(NpdiffError, match="num_groups must be a positive divisor of C=6"):
        group_norm_backward(x, 4, None, None, x)
    with pytest.raises(NpdiffError, match=r"grad_out must have the shape of x \[2,6,3\]"):
        layer_norm_backward(x, None, None, x[:, :, :2])
