"""linear, linear_activation and geglu against torch (F.linear, diffusers' GEGLU)."""

import importlib
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU

from helpers import KERNEL_TOL, assert_rel_close

from npdiff import NpdiffError, blas
from npdiff.kernels import geglu, linear, linear_activation
from npdiff.kernels.linear import geglu_ref, linear_activation_ref, linear_ref

linear_kernels = importlib.import_module("npdiff.kernels.linear")  # the module (npdiff.kernels.linear is the function)

TORCH_ACTIVATIONS = {
    "silu": F.silu,
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),  # transformers' QuickGELUActivation
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}


@pytest.mark.parametrize("leading", [(), (5,), (2, 7), (2, 3, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_torch(rng, leading, with_bias):
    n_in, n_out = int(rng.integers(1, 70)), int(rng.integers(1, 70))
    x = rng.standard_normal((*leading, n_in), dtype=np.float32)
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32)
    bias = rng.standard_normal(n_out, dtype=np.float32) if with_bias else None
    expected = F.linear(torch.from_numpy(x), torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias))
    assert_rel_close(linear(x, weight, bias), expected, KERNEL_TOL, "linear")
    assert_rel_close(linear_ref(x, weight, bias), expected, KERNEL_TOL, "linear_ref")


@pytest.mark.parametrize("leading", [(700,), (1, 333), (2, 3, 90)])
def test_linear_in_pool_blocks_with_bias_matches_torch(rng, leading):
    """Large enough for block_pool.matmul's parallel blocks, each adding the bias to its part."""
    n_in, n_out = int(rng.integers(60, 130)), int(rng.integers(60, 130))
    x = rng.standard_normal((*leading, n_in), dtype=np.float32)
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32)
    bias = rng.standard_normal(n_out, dtype=np.float32)
    expected = F.linear(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias))
    assert_rel_close(linear(x, weight, bias), expected, KERNEL_TOL, "linear in blocks")


@pytest.mark.parametrize("leading", [(3,), (2, 9)])
def test_geglu_matches_diffusers(rng, leading):
    n_in, half = int(rng.integers(2, 50)), int(rng.integers(1, 40))
    module = GEGLU(n_in, half)  # diffusers' own module: proj = Linear(n_in, 2*half)
    with torch.no_grad():
        module.proj.weight.copy_(torch.from_numpy(rng.standard_normal((2 * half, n_in), dtype=np.float32)))
        module.proj.bias.copy_(torch.from_numpy(rng.standard_normal(2 * half, dtype=np.float32)))
        x = rng.standard_normal((*leading, n_in), dtype=np.float32)
        expected = module(torch.from_numpy(x))
    weight, bias = module.proj.weight.detach().numpy(), module.proj.bias.detach().numpy()
    assert_rel_close(geglu(x, weight, bias), expected, KERNEL_TOL, "geglu")
    assert_rel_close(geglu_ref(x, weight, bias), expected, KERNEL_TOL, "geglu_ref")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("max_hidden_floats", [None, 5000])
def test_geglu_in_blocks_matches_torch(rng, approximate, max_hidden_floats, monkeypatch):
    """Enough rows for version 3 (blocks of rows on the pool, each GEMM into a worker's scratch; an
    odd row count, so the blocks differ in size), with the hidden cap as shipped (one block per worker)
    and small enough to force several uneven blocks per worker; the same bytes on the second call
    (the scratch reused) and with OpenBLAS on one thread (the block GEMMs are one-threaded either way)."""
    if max_hidden_floats is not None:
        monkeypatch.setattr(linear_kernels, "GEGLU_MAX_HIDDEN_FLOATS", max_hidden_floats)
    rows = 2 * (linear_kernels.GEGLU_FORWARD_MIN_ROWS // 2 + int(rng.integers(1, 200))) + 1
    x = rng.standard_normal((rows, 24), dtype=np.float32)
    weight = rng.standard_normal((2 * 40, 24), dtype=np.float32) / np.float32(5.0)
    bias = rng.standard_normal(2 * 40, dtype=np.float32)
    hidden = F.linear(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias))
    value, gate = hidden.chunk(2, dim=-1)
    expected = value * F.gelu(gate, approximate=approximate)
    ours = geglu(x, weight, bias, approximate)
    assert_rel_close(ours, expected, KERNEL_TOL, "geglu in blocks")
    assert np.array_equal(geglu(x, weight, bias, approximate), ours)
    threads = blas.get_num_threads()
    if threads is not None:
        try:
            blas.set_num_threads(1)
            assert np.array_equal(geglu(x, weight, bias, approximate), ours)
        finally:
            blas.set_num_threads(threads)


def test_geglu_in_blocks_keeps_the_hidden_layer_with_its_bias(rng):
    """The training tape's hidden_out in the blocks path: the bias is added in the gate's pass, and the kept
    hidden layer is torch's h = x W^T + b (the backward reads it), the output torch's GEGLU; with no bias too."""
    rows = linear_kernels.GEGLU_FORWARD_MIN_ROWS + 2 * int(rng.integers(1, 300)) + 1
    x = rng.standard_normal((rows, 48), dtype=np.float32)
    weight = rng.standard_normal((2 * 56, 48), dtype=np.float32) / np.float32(7.0)
    for bias in (rng.standard_normal(2 * 56, dtype=np.float32), None):
        torch_bias = None if bias is None else torch.from_numpy(bias)
        hidden = F.linear(torch.from_numpy(x), torch.from_numpy(weight), torch_bias)
        value, gate = hidden.chunk(2, dim=-1)
        kept = np.full((rows, 2 * 56), np.nan, np.float32)
        ours = linear_kernels.geglu_fast(x, weight, bias, hidden_out=kept)
        assert_rel_close(kept, hidden, KERNEL_TOL, "geglu's kept hidden layer")
        assert_rel_close(ours, value * F.gelu(gate), KERNEL_TOL, "geglu in blocks, hidden kept")
        assert np.array_equal(ours, geglu(x, weight, bias))  # keeping the hidden layer changes no bit


@pytest.mark.parametrize("n_rows, hidden_width, workers", [(8192, 5120, 2), (2048, 20480, 2), (1025, 80, 3),
                                                           (9000, 1 << 14, 2)])
def test_geglu_row_blocks_cover_the_rows(n_rows, hidden_width, workers):
    """One block per worker while the hidden rows fit GEGLU_MAX_HIDDEN_FLOATS, else a multiple of workers;
    the blocks tile range(n_rows) in order."""
    blocks = linear_kernels.geglu_row_blocks(n_rows, hidden_width, workers)
    assert blocks[0][0] == 0 and blocks[-1][1] == n_rows
    assert all(stop == next_first for (_, stop), (next_first, _) in pairwise(blocks))
    assert all((stop - first) * hidden_width <= linear_kernels.GEGLU_MAX_HIDDEN_FLOATS for first, stop in blocks)
    assert len(blocks) % workers == 0
    if n_rows * hidden_width <= workers * linear_kernels.GEGLU_MAX_HIDDEN_FLOATS:
        assert len(blocks) == workers


def test_linear_on_a_strided_view_matches_torch(rng):
    """[B,C,N] seen as [B,N,C] (the UNet's proj_in on NCHW): one sgemm per slice, no flattening copy."""
    x = rng.standard_normal((2, 30, 50), dtype=np.float32).transpose(0, 2, 1)  # [B,N,C] view
    weight = rng.standard_normal((20, 30), dtype=np.float32)
    bias = rng.standard_normal(20, dtype=np.float32)
    expected = F.linear(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(weight), torch.from_numpy(bias))
    assert_rel_close(linear(x, weight, bias), expected, KERNEL_TOL, "linear on a strided view")
    assert np.array_equal(linear(x, weight, bias), linear(np.ascontiguousarray(x), weight, bias))


def test_geglu_tanh_matches_torch(rng):
    x = rng.standard_normal((4, 10), dtype=np.float32)
    weight = rng.standard_normal((12, 10), dtype=np.float32)
    hidden = F.linear(torch.from_numpy(x), torch.from_numpy(weight))
    value, gate = hidden.chunk(2, dim=-1)
    expected = value * F.gelu(gate, approximate="tanh")
    assert_rel_close(geglu(x, weight, None, approximate="tanh"), expected, KERNEL_TOL)
    assert_rel_close(geglu_ref(x, weight, None, approximate="tanh"), expected, KERNEL_TOL)


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("leading", [(5,), (2, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_activation_matches_torch(rng, activation, leading, with_bias):
    n_in, n_out = int(rng.integers(1, 70)), int(rng.integers(1, 300))
    x = rng.standard_normal((*leading, n_in), dtype=np.float32)
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))
    bias = rng.standard_normal(n_out, dtype=np.float32) if with_bias else None
    hidden = F.linear(torch.from_numpy(x), torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias))
    expected = TORCH_ACTIVATIONS[activation](hidden)
    assert_rel_close(linear_activation(x, weight, bias, activation), expected, KERNEL_TOL, activation)
    assert_rel_close(linear_activation_ref(x, weight, bias, activation), expected, KERNEL_TOL, activation + " ref")
    # a weight laid out as [in, out] in memory (CLIP's TransposedLinear): another sgemm path, same bound
    weight_t = np.ascontiguousarray(weight.T).T  # [out,in] view of [in,out] memory
    assert_rel_close(linear_activation(x, weight_t, bias, activation), expected, KERNEL_TOL, activation + " [in,out]")


def test_linear_rejects_bad_input(rng):
    x = rng.standard_normal((2, 5), dtype=np.float32)
    weight = rng.standard_normal((4, 5), dtype=np.float32)
    with pytest.raises(NpdiffError, match=r"linear: x must have shape \[..., in_features=6\] .* got \[2,5\]"):
        linear(x, rng.standard_normal((4, 6), dtype=np.float32))
    with pytest.raises(NpdiffError, match=r"linear: weight must be 2-D \[out_features, in_features\], got shape \[20\]"):
        linear(x, weight.reshape(-1))
    with pytest.raises(NpdiffError, match=r"linear: bias must have shape \[4\], got \[5\]"):
        linear(x, weight, np.zeros(5, np.float32))
    with pytest.raises(NpdiffError, match=r"geglu: weight must have an even number of rows .* got \[3,5\]"):
        geglu(x, weight[:3])
    with pytest.raises(NpdiffError, match=r"linear_activation: activation must be one of .* got 'relu'"):
        linear_activation(x, weight, None, "relu")
    with pytest.raises(NpdiffError, match=r"linear_activation: x must be float32, got float64"):
        linear_activation(x.astype(np.float64), weight)
