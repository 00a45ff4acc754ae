"""Every CUDA kernel against torch on the same GPU (marked gpu: skipped without CuPy + CUDA + torch CUDA).

float32: relative error <= KERNEL_TOL (1e-5) against torch CUDA in float32 with TF32 off (conftest).
float16: npdiff in half precision against torch CUDA in float32 on the same (half-rounded) inputs,
relative error <= HALF_TOL: what half storage allows (2^-11 ~ 5e-4 per rounding, a few roundings).
Inputs are fresh random arrays per run (the `rng` fixture); the kernels are reached through the
public npdiff.kernels functions, as the models call them.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gpu_helpers import host, to_torch_cuda
from helpers import KERNEL_TOL, assert_rel_close

import npdiff.kernels as kernels
from npdiff.kernels import cuda

pytestmark = pytest.mark.gpu

HALF_TOL = 3e-3
DTYPES = ["float32", "float16"]


def tolerance(dtype):
    return KERNEL_TOL if dtype == "float32" else HALF_TOL


def device_array(cp, host_array, dtype):
    """numpy float32 -> cupy in dtype; and the torch float32 tensor of the SAME (rounded) values."""
    ours = cp.asarray(host_array).astype(dtype)
    reference = to_torch_cuda(host(ours).astype(np.float32))
    return ours, reference


def normal(rng, shape, scale=1.0, offset=0.0):
    return (offset + scale * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# element-wise
# ---------------------------------------------------------------------------------------------
ACTIVATIONS = {
    "silu": (kernels.silu, F.silu),
    "quick_gelu": (kernels.quick_gelu, lambda t: t * torch.sigmoid(1.702 * t)),
    "gelu": (kernels.gelu, F.gelu),
    "gelu_tanh": (lambda x: kernels.gelu(x, approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations(cp, rng, name, dtype):
    ours_fn, torch_fn = ACTIVATIONS[name]
    shape = (int(rng.integers(1, 5)), int(rng.integers(1, 300)), int(rng.integers(1, 300)))
    x, reference = device_array(cp, normal(rng, shape, scale=4.0), dtype)
    out = ours_fn(x)
    assert type(out).__module__.startswith("cupy") and out.dtype == np.dtype(dtype) and out.shape == shape
    assert_rel_close(out, torch_fn(reference), tolerance(dtype), name)
    strided = ours_fn(x.T)  # a non-contiguous view
    assert_rel_close(strided, torch_fn(reference.T), tolerance(dtype), f"{name} on a transposed view")


@pytest.mark.parametrize("dtype", DTYPES)
def test_upsample_nearest2x(cp, rng, dtype):
    shape = (int(rng.integers(1, 3)), int(rng.integers(1, 9)), int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    x, reference = device_array(cp, normal(rng, shape), dtype)
    out = kernels.upsample_nearest2x(x)
    expected = F.interpolate(reference, scale_factor=2.0, mode="nearest")
    np.testing.assert_array_equal(host(out).astype(np.float32), host(expected))  # a copy: exact


# ---------------------------------------------------------------------------------------------
# norms
# ---------------------------------------------------------------------------------------------
GROUP_NORM_CASES = [
    # (batch, channels, groups, height, width): SD UNet 64x64 (2 x 320), VAE 512x512-like (few big slabs)
    (2, 320, 32, 64, 64),
    (1, 128, 32, 256, 256),
    (3, 12, 4, 5, 7),
    (2, 8, 8, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("case", GROUP_NORM_CASES)
def test_group_norm(cp, rng, case, silu, dtype):
    batch, channels, groups, height, width = case
    offset = float(rng.uniform(-20, 20))  # |mean| >> std: the shifted sums must not cancel
    x, reference = device_array(cp, normal(rng, (batch, channels, height, width), 0.5, offset), dtype)
    weight, weight_t = device_array(cp, normal(rng, (channels,), 0.3, 1.0), dtype)
    bias, bias_t = device_array(cp, normal(rng, (channels,), 0.3), dtype)
    out = kernels.group_norm(x, groups, weight, bias, eps=1e-5, silu=silu)
    expected = F.group_norm(reference, groups, weight_t, bias_t, eps=1e-5)
    if silu:
        expected = F.silu(expected)
    assert out.dtype == np.dtype(dtype)
    assert_rel_close(out, expected, tolerance(dtype), f"group_norm {case} silu={silu}")


def test_group_norm_without_affine_and_5d(cp, rng):
    x, reference = device_array(cp, normal(rng, (2, 6, 3, 4, 5)), "float32")
    assert_rel_close(kernels.group_norm(x, 3, None, None, eps=1e-6), F.group_norm(reference, 3, eps=1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4096, 320), (2, 77, 768), (3, 5), (7, 1)])
def test_layer_norm(cp, rng, shape, dtype):
    x, reference = device_array(cp, normal(rng, shape, 2.0, float(rng.uniform(-5, 5))), dtype)
    weight, weight_t = device_array(cp, normal(rng, shape[-1:], 0.3, 1.0), dtype)
    bias, bias_t = device_array(cp, normal(rng, shape[-1:], 0.3), dtype)
    out = kernels.layer_norm(x, weight, bias, eps=1e-5)
    assert_rel_close(out, F.layer_norm(reference, shape[-1:], weight_t, bias_t, eps=1e-5), tolerance(dtype),
                     f"layer_norm {shape}")


# ---------------------------------------------------------------------------------------------
# softmax and attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((16, 4096), -1), ((2, 8, 77, 77), -1), ((5, 33, 7), 1), ((3, 4), 0)])
def test_softmax(cp, rng, shape, axis, dtype):
    x, reference = device_array(cp, normal(rng, shape, 3.0), dtype)
    out = kernels.softmax(x, axis=axis)
    assert out.shape == shape
    assert_rel_close(out, torch.softmax(reference, dim=axis), tolerance(dtype), f"softmax {shape} axis {axis}")


def test_softmax_of_masked_rows_is_nan_as_torch(cp, rng):
    values = normal(rng, (4, 9))
    values[1, :] = -np.inf
    values[2, ::2] = -np.inf
    out = host(kernels.softmax(cp.asarray(values)))
    expected = host(torch.softmax(to_torch_cuda(values), dim=-1))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert_rel_close(out[finite], expected[finite])


ATTENTION_CASES = [
    # (lead, queries, keys, head dim, value dim, causal): SD self-attention 64x64, cross-attention, CLIP, odd
    ((2, 8), 4096, 4096, 40, 40, False),
    ((2, 8), 1024, 77, 80, 80, False),
    ((2, 12), 77, 77, 64, 64, True),
    ((3,), 33, 17, 8, 5, False),
    ((3,), 29, 29, 8, 5, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(cp, rng, case, dtype):
    lead, n, m, d, dv, causal = case
    q, q_t = device_array(cp, normal(rng, lead + (n, d)), dtype)
    k, k_t = device_array(cp, normal(rng, lead + (m, d)), dtype)
    v, v_t = device_array(cp, normal(rng, lead + (m, dv)), dtype)
    out = kernels.scaled_dot_product_attention(q, k, v, is_causal=causal)
    expected = F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=causal)
    assert out.dtype == np.dtype(dtype)
    assert_rel_close(out, expected, tolerance(dtype), f"attention {case} causal={causal}")


@pytest.mark.parametrize("mask_kind", ["bool", "float", "bool_broadcast"])
def test_attention_masks_and_query_blocks(cp, rng, mask_kind):
    lead, n, m, d = (2, 3), 50, 40, 16
    q, q_t = device_array(cp, normal(rng, lead + (n, d)), "float32")
    k, k_t = device_array(cp, normal(rng, lead + (m, d)), "float32")
    v, v_t = device_array(cp, normal(rng, lead + (m, d)), "float32")
    if mask_kind == "float":
        mask = normal(rng, (n, m), 2.0)
    elif mask_kind == "bool":
        mask = rng.random(lead + (n, m)) < 0.7
        mask[..., 0] = True  # every query may attend to something (all-masked rows: next test)
    else:
        mask = rng.random((1, 1, n, m)) < 0.7
        mask[..., 0] = True
    scale = float(rng.uniform(0.05, 0.5))
    expected = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=to_torch_cuda(mask), scale=scale)
    through_kernels = kernels.scaled_dot_product_attention(q, k, v, mask=cp.asarray(mask), scale=scale)
    assert_rel_close(through_kernels, expected, KERNEL_TOL, f"attention mask {mask_kind}")
    # small score budgets: many query blocks, the masks and causal offsets sliced per block
    for budget in (1, 7 * m * 6 * 4):
        blocked = cuda.scaled_dot_product_attention(q, k, v, cp.asarray(mask), scale, False, "auto", budget)
        assert_rel_close(blocked, expected, KERNEL_TOL, f"attention mask {mask_kind} budget {budget}")
    causal = cuda.scaled_dot_product_attention(q[..., :m, :], k, v, None, None, True, "auto", 5 * m * 6 * 4)
    assert_rel_close(causal, F.scaled_dot_product_attention(q_t[..., :m, :], k_t, v_t, is_causal=True),
                     KERNEL_TOL, "causal attention in query blocks")


def test_attention_rows_that_see_no_key_are_zero(cp, rng):
    q = cp.asarray(normal(rng, (2, 6, 8)))
    k = cp.asarray(normal(rng, (2, 5, 8)))
    v = cp.asarray(normal(rng, (2, 5, 3)))
    mask = rng.random((2, 6, 5)) < 0.6
    mask[:, 2, :] = False  # query 2 may attend to nothing
    mask[:, [0, 1, 3, 4, 5], 0] = True
    out = host(kernels.scaled_dot_product_attention(q, k, v, mask=cp.asarray(mask)))
    assert (out[:, 2] == 0).all()
    expected = host(F.scaled_dot_product_attention(to_torch_cuda(q), to_torch_cuda(k), to_torch_cuda(v),
                                                   attn_mask=to_torch_cuda(mask)))
    rows = [0, 1, 3, 4, 5]
    assert_rel_close(out[:, rows], expected[:, rows], KERNEL_TOL, "attention, rows with keys")


# ---------------------------------------------------------------------------------------------
# conv, linear, geglu
# ---------------------------------------------------------------------------------------------
CONV_CASES = [
    # (batch, c_in, c_out, height, width, kernel, stride, padding)
    (2, 320, 320, 64, 64, 3, 1, 1),      # UNet resnet conv
    (2, 320, 320, 64, 64, 3, 2, 1),      # UNet downsample
    (1, 512, 512, 64, 64, 1, 1, 0),      # 1x1 (VAE shortcut / attention proj)
    (1, 4, 128, 64, 64, 3, 1, 1),        # VAE conv_in
    (2, 5, 7, 11, 13, 5, 1, 2),          # odd sizes, 5x5
    (1, 3, 4, 9, 10, 3, (2, 1), (0, 2)), # different strides and paddings per axis
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(cp, rng, case, dtype):
    batch, c_in, c_out, height, width, size, stride, padding = case
    x, x_t = device_array(cp, normal(rng, (batch, c_in, height, width)), dtype)
    weight, weight_t = device_array(cp, normal(rng, (c_out, c_in, size, size), (c_in * size * size) ** -0.5), dtype)
    bias, bias_t = device_array(cp, normal(rng, (c_out,)), dtype)
    out = kernels.conv2d(x, weight, bias, stride=stride, padding=padding)
    assert out.dtype == np.dtype(dtype)
    assert_rel_close(out, F.conv2d(x_t, weight_t, bias_t, stride=stride, padding=padding), tolerance(dtype),
                     f"conv2d {case}")


@pytest.mark.parametrize("budget_rows", [1, 3])
def test_conv2d_in_row_tiles(cp, rng, budget_rows):
    """A small im2col budget: tiles of a few output rows of one image (what the VAE at 512x512 gets)."""
    x, x_t = device_array(cp, normal(rng, (2, 6, 17, 15)), "float32")
    weight, weight_t = device_array(cp, normal(rng, (5, 6, 3, 3), 0.2), "float32")
    budget = budget_rows * 6 * 9 * 15 * 4  # bytes of budget_rows output rows (stride 1: W_out = 15)
    out = cuda.conv2d(x, weight, None, (1, 1), (1, 1), budget=budget)
    assert_rel_close(out, F.conv2d(x_t, weight_t, padding=1), KERNEL_TOL, f"conv2d tiles of {budget_rows} rows")


def test_conv2d_casts_float32_input_to_float16_weights(cp, rng):
    x = cp.asarray(normal(rng, (1, 4, 8, 8)))  # float32 latents, as a scheduler hands them over
    weight, weight_t = device_array(cp, normal(rng, (8, 4, 3, 3), 0.3), "float16")
    out = kernels.conv2d(x, weight, None, padding=1)
    assert out.dtype == np.float16
    assert_rel_close(out, F.conv2d(to_torch_cuda(host(x).astype(np.float16).astype(np.float32)), weight_t,
                                   padding=1), HALF_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_and_geglu(cp, rng, dtype):
    rows, width, inner = (2, int(rng.integers(1, 300))), int(rng.integers(1, 400)), int(rng.integers(1, 300))
    x, x_t = device_array(cp, normal(rng, rows + (width,)), dtype)
    weight, weight_t = device_array(cp, normal(rng, (2 * inner, width), width ** -0.5), dtype)
    bias, bias_t = device_array(cp, normal(rng, (2 * inner,)), dtype)
    assert_rel_close(kernels.linear(x, weight, bias), F.linear(x_t, weight_t, bias_t), tolerance(dtype), "linear")
    assert_rel_close(kernels.linear(x, weight), F.linear(x_t, weight_t), tolerance(dtype), "linear without bias")
    hidden = F.linear(x_t, weight_t, bias_t)
    value, gate = hidden.chunk(2, dim=-1)
    for approximate in ("none", "tanh"):
        out = kernels.geglu(x, weight, bias, approximate=approximate)
        assert_rel_close(out, value * F.gelu(gate, approximate=approximate), tolerance(dtype), f"geglu {approximate}")
