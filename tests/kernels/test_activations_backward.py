"""Backward of silu, gelu (erf, tanh) and quick_gelu against torch.autograd on fresh random inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close
from npdiff import NpdiffError
from npdiff.kernels.activations_backward import (
    gelu_backward,
    gelu_backward_ref,
    quick_gelu_backward,
    quick_gelu_backward_ref,
    silu_backward,
    silu_backward_ref,
)

TORCH_FORWARDS = {
    "silu": F.silu,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
    "gelu": lambda t: F.gelu(t, approximate="none"),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}
OURS = {
    "silu": (silu_backward, silu_backward_ref),
    "quick_gelu": (quick_gelu_backward, quick_gelu_backward_ref),
    "gelu": (lambda x, g: gelu_backward(x, g, "none"), lambda x, g: gelu_backward_ref(x, g, "none")),
    "gelu_tanh": (lambda x, g: gelu_backward(x, g, "tanh"), lambda x, g: gelu_backward_ref(x, g, "tanh")),
}


def torch_grad(name, x, grad_out):
    xt = torch.from_numpy(x).requires_grad_(True)
    TORCH_FORWARDS[name](xt).backward(torch.from_numpy(grad_out))
    return xt.grad


@pytest.mark.parametrize("name", sorted(OURS))
def test_activation_backward_matches_autograd(rng, name):
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 300)), int(rng.integers(1, 90)))  # runs of any length
    x = (rng.uniform(0.5, 6) * rng.standard_normal(shape)).astype(np.float32)
    x.flat[:4] = [-12.0, 12.0, 0.0, -0.5][: min(4, x.size)]  # both tails and the middle
    grad_out = rng.standard_normal(shape).astype(np.float32)
    expected = torch_grad(name, x, grad_out)
    fast, reference = OURS[name]
    assert_rel_close(fast(x, grad_out), expected, KERNEL_TOL, "fast")
    assert_rel_close(reference(x, grad_out), expected, KERNEL_TOL, "reference")


def test_activation_backward_refuses_mismatched_shapes():
    with pytest.raises(NpdiffError, match=r"grad_out must have the shape of x \[2,3\]"):
        silu_backward(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(NpdiffError, match="approximate"):
        gelu_backward(np.zeros(3, np.float32), np.zeros(3, np.float32), "erf")
