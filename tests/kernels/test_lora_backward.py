"""Backward of a LoRA pair on a linear layer (kernels/linear_backward.py: lora_backward) against torch.autograd
through peft's form of the layer, y = x W^T + b + s * (x D^T) U^T, on fresh random inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff import NpdiffError
from npdiff.kernels.linear_backward import (
    lora_backward,
    lora_backward_fast,
    lora_backward_ref,
)


def peft_autograd(x, weight, bias, down, up, scale, grad_out):
    """d down, d up as torch computes them for peft's LoraLayer forward."""
    xt, wt, bt = (torch.from_numpy(a) for a in (x, weight, bias))
    down_t, up_t = (torch.from_numpy(a).requires_grad_(True) for a in (down, up))
    out = F.linear(xt, wt, bt) + scale * F.linear(F.linear(xt, down_t), up_t)
    out.backward(torch.from_numpy(grad_out))
    return down_t.grad, up_t.grad


@pytest.mark.parametrize("lead_axes", [1, 2, 3])
def test_lora_backward_matches_autograd(rng, lead_axes):
    lead = tuple(int(s) for s in rng.integers(1, 12, size=lead_axes))
    n_in, n_out, rank = int(rng.integers(1, 70)), int(rng.integers(1, 70)), int(rng.integers(1, 9))
    x = rng.standard_normal(lead + (n_in,)).astype(np.float32)
    weight = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    down = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
    up = rng.standard_normal((n_out, rank)).astype(np.float32)
    scale = float(rng.uniform(0.1, 4.0))
    grad_out = rng.standard_normal(lead + (n_out,)).astype(np.float32)
    expected_down, expected_up = peft_autograd(x, weight, bias, down, up, scale, grad_out)
    for version in (lora_backward, lora_backward_fast, lora_backward_ref):
        grad_down, grad_up = version(x, down, up, grad_out, scale)
        assert grad_down.shape == down.shape and grad_up.shape == up.shape
        assert grad_down.dtype == np.float32 and grad_up.dtype == np.float32
        assert_rel_close(grad_down, expected_down, KERNEL_TOL, f"{version.__name__} d down")
        assert_rel_close(grad_up, expected_up, KERNEL_TOL, f"{version.__name__} d up")


def test_lora_backward_refuses_mismatched_factors(rng):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    down = np.zeros((4, 8), np.float32)
    with pytest.raises(NpdiffError, match="down must be"):
        lora_backward(x, down, np.zeros((5, 3), np.float32), np.zeros((3, 5), np.float32), 1.0)
    with pytest.raises(NpdiffError, match="lora_backward: x must have shape"):
        lora_backward(x[:, :7], down, np.zeros((5, 4), np.float32), np.zeros((3, 5), np.float32), 1.0)
    with pytest.raises(NpdiffError, match="grad_out"):
        lora_backward(x, down, np.zeros((5, 4), np.float32), np.zeros((3, 6), np.float32), 1.0)
