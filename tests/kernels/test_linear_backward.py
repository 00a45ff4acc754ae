"""Backward of linear, linear_activation and geglu against torch.autograd on fresh random inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff import NpdiffError
from npdiff.kernels.linear import GEGLU_BLOCK_ROWS, GEGLU_BLOCKS_MIN_ROWS
from npdiff.kernels.linear_backward import (
    geglu_backward,
    geglu_forward_saved,
    geglu_input_grad,
    geglu_input_grad_ref,
    linear_activation_backward,
    linear_backward,
    linear_backward_ref,
    linear_input_grad,
    linear_input_grads_summed,
)


def random_linear(rng, lead, n_in, n_out):
    x = rng.standard_normal(lead + (n_in,)).astype(np.float32)
    weight = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    return x, weight, bias


def autograd(forward, x, weight, bias, grad_out):
    xt, wt, bt = (torch.from_numpy(a).requires_grad_(True) for a in (x, weight, bias))
    forward(xt, wt, bt).backward(torch.from_numpy(grad_out))
    return xt.grad, wt.grad, bt.grad


@pytest.mark.parametrize("lead_axes", [1, 2, 3])
def test_linear_backward_matches_autograd(rng, lead_axes):
    lead = tuple(int(s) for s in rng.integers(1, 20, size=lead_axes))
    x, weight, bias = random_linear(rng, lead, int(rng.integers(1, 70)), int(rng.integers(1, 70)))
    grad_out = rng.standard_normal(lead + (weight.shape[0],)).astype(np.float32)
    expected = autograd(F.linear, x, weight, bias, grad_out)
    for version in (linear_backward, linear_backward_ref):
        for ours, theirs, what in zip(version(x, weight, grad_out), expected, ("dx", "dW", "db")):
            assert_rel_close(ours, theirs, KERNEL_TOL, f"{version.__name__} {what}")
    grad_x, grad_weight, grad_bias = linear_backward(x, weight, grad_out, need_weight_grad=False)
    assert grad_weight is None and grad_bias is None
    assert_rel_close(grad_x, expected[0], KERNEL_TOL, "dx alone")


@pytest.mark.parametrize("lead_axes", [1, 2, 3])
def test_linear_input_grad_matches_autograd(rng, lead_axes):
    """dx alone (a frozen layer), also of a transposed view of dy (the UNet's tokens of NCHW)."""
    lead = tuple(int(s) for s in rng.integers(1, 40, size=lead_axes))
    x, weight, bias = random_linear(rng, lead, int(rng.integers(1, 70)), int(rng.integers(1, 70)))
    grad_out = rng.standard_normal(lead + (weight.shape[0],)).astype(np.float32)
    expected = autograd(F.linear, x, weight, bias, grad_out)[0]
    assert_rel_close(linear_input_grad(weight, grad_out), expected, KERNEL_TOL, "dx")
    if lead_axes == 2:
        strided = np.ascontiguousarray(grad_out.swapaxes(-1, -2)).swapaxes(-1, -2)  # same values, [B,out,N] memory
        assert_rel_close(linear_input_grad(weight, strided), expected, KERNEL_TOL, "dx of a transposed dy")
    with pytest.raises(NpdiffError, match="linear_input_grad: grad_out"):
        linear_input_grad(weight, np.zeros(lead + (weight.shape[0] + 1,), np.float32))


@pytest.mark.parametrize("n_rows", [0, 5, 77, 600])  # none, fewer than a block, CLIP's tokens, several blocks
def test_linear_input_grads_summed_matches_autograd(rng, n_rows):
    """dx of three frozen projections of one input (a self-attention's to_q, to_k, to_v; widths differ
    here), summed per block of rows: autograd's dx of x -> (x Wq^T, x Wk^T, x Wv^T)."""
    n_in = int(rng.integers(8, 70))
    widths = [int(w) for w in rng.integers(1, 90, size=3)]
    x = rng.standard_normal((2, n_rows, n_in)).astype(np.float32)
    weights = [(rng.standard_normal((w, n_in)) / np.sqrt(n_in)).astype(np.float32) for w in widths]
    grads = [rng.standard_normal((2, n_rows, w)).astype(np.float32) for w in widths]
    x_t = torch.from_numpy(x).requires_grad_(True)
    outputs = [F.linear(x_t, torch.from_numpy(w)) for w in weights]
    torch.autograd.backward(outputs, [torch.from_numpy(g) for g in grads])
    ours = linear_input_grads_summed(weights, grads)
    assert ours.shape == x.shape
    if n_rows == 0:
        return
    assert_rel_close(ours, x_t.grad, KERNEL_TOL, f"{n_rows} rows")
    with pytest.raises(NpdiffError, match="do not match"):
        linear_input_grads_summed(weights, [grads[0], grads[1][:, :1], grads[2]])


def test_linear_backward_of_a_strided_view(rng):
    """The UNet's proj_in reads NCHW as [B, H*W, C], a transposed view."""
    x_nchw = rng.standard_normal((2, 12, 5, 7)).astype(np.float32)
    x = x_nchw.reshape(2, 12, 35).transpose(0, 2, 1)  # [B,C,H,W] -> [B,H*W,C] view
    _, weight, bias = random_linear(rng, (), 12, 9)
    grad_out = rng.standard_normal((2, 35, 9)).astype(np.float32)
    expected = autograd(F.linear, np.ascontiguousarray(x), weight, bias, grad_out)
    for ours, theirs in zip(linear_backward(x, weight, grad_out), expected):
        assert_rel_close(ours, theirs)


@pytest.mark.parametrize("activation", ["silu", "quick_gelu", "gelu", "gelu_tanh"])
def test_linear_activation_backward_matches_autograd(rng, activation):
    torch_activation = {"silu": F.silu, "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
                        "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation]
    lead = (int(rng.integers(1, 4)), int(rng.integers(1, 30)))
    x, weight, bias = random_linear(rng, lead, int(rng.integers(1, 50)), int(rng.integers(1, 50)))
    grad_out = rng.standard_normal(lead + (weight.shape[0],)).astype(np.float32)
    expected = autograd(lambda a, w, b: torch_activation(F.linear(a, w, b)), x, weight, bias, grad_out)
    ours = linear_activation_backward(x, weight, bias, grad_out, activation)
    for mine, theirs, what in zip(ours, expected, ("dx", "dW", "db")):
        assert_rel_close(mine, theirs, KERNEL_TOL, what)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_geglu_backward_matches_autograd(rng, approximate):
    def torch_geglu(a, w, b):
        value, gate = F.linear(a, w, b).chunk(2, dim=-1)  # diffusers' GEGLU
        return value * F.gelu(gate, approximate=approximate)

    lead = (int(rng.integers(1, 4)), int(rng.integers(1, 40)))
    half = int(rng.integers(1, 40))
    x, weight, bias = random_linear(rng, lead, int(rng.integers(1, 50)), 2 * half)
    grad_out = rng.standard_normal(lead + (half,)).astype(np.float32)
    expected = autograd(torch_geglu, x, weight, bias, grad_out)
    ours = geglu_backward(x, weight, bias, grad_out, approximate)
    for mine, theirs, what in zip(ours, expected, ("dx", "dW", "db")):
        assert_rel_close(mine, theirs, KERNEL_TOL, what)


@pytest.mark.parametrize("rows", ["few", "blocks"])
def test_geglu_with_kept_hidden_layer_matches_autograd(rng, rows):
    """geglu_forward_saved's output and hidden layer against torch's forward, geglu_input_grad's dx
    (fast and reference) against autograd; "blocks": enough rows for the pool's blocks, the last partial."""
    if rows == "few":
        lead = (int(rng.integers(1, 4)), int(rng.integers(1, 40)))
    else:
        lead = (1, GEGLU_BLOCKS_MIN_ROWS + int(rng.integers(1, GEGLU_BLOCK_ROWS)))
    half = int(rng.integers(1, 40))
    x, weight, bias = random_linear(rng, lead, int(rng.integers(1, 50)), 2 * half)
    grad_out = rng.standard_normal(lead + (half,)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    hidden_t = F.linear(xt, torch.from_numpy(weight), torch.from_numpy(bias))
    value, gate = hidden_t.chunk(2, dim=-1)  # diffusers' GEGLU
    out_t = value * F.gelu(gate)
    out_t.backward(torch.from_numpy(grad_out))
    out, hidden = geglu_forward_saved(x, weight, bias)
    assert_rel_close(out, out_t, KERNEL_TOL, "geglu_forward_saved y")
    assert_rel_close(hidden, hidden_t, KERNEL_TOL, "geglu_forward_saved hidden")
    assert_rel_close(geglu_input_grad(hidden, weight, grad_out), xt.grad, KERNEL_TOL, "geglu_input_grad")
    assert_rel_close(geglu_input_grad_ref(hidden, weight, grad_out), xt.grad, KERNEL_TOL, "geglu_input_grad_ref")


def test_geglu_input_grad_refuses_mismatched_shapes():
    weight = np.zeros((6, 5), np.float32)
    with pytest.raises(NpdiffError, match=r"geglu_input_grad: hidden \[\.\.\., 2D\] .* got hidden \[4,8\]"):
        geglu_input_grad(np.zeros((4, 8), np.float32), weight, np.zeros((4, 3), np.float32))
    with pytest.raises(NpdiffError, match=r"geglu_input_grad: grad_out must have the forward output's shape \[4,3\]"):
        geglu_input_grad(np.zeros((4, 6), np.float32), weight, np.zeros((4, 2), np.float32))


def test_linear_backward_refuses_a_wrong_grad_shape():
    with pytest.raises(NpdiffError, match=r"grad_out must have the forward output's shape \[4,3\]"):
        linear_backward(np.zeros((4, 5), np.float32), np.zeros((3, 5), np.float32), np.zeros((4, 5), np.float32))
