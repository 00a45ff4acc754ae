"""linear_packed (npdiff/kernels/linear_packed.py: CLIP's GEMMs on weights packed at load, x read as rows, the
bias, activation and residual applied to each tile as it is finished: linear_packed_tile.py), CLIP's layer norm
into rows, and the causal attention of token rows (npdiff/kernels/attention/causal_rows.py), against torch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close

from npdiff.kernels.attention.causal_rows import causal_attention_rows
from npdiff.kernels.linear_packed import (
    KC_PANEL,
    layer_norm_rows,
    linear_packed,
    linear_packed_ref,
    pack_panels,
    unpack_panels,
)
from npdiff.kernels.matmul_numba import NR

TORCH_ACTIVATIONS = {
    None: lambda h: h,
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),  # transformers' QuickGELUActivation
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}
DEPTHS = {"short": (1, 100), "several blocks": (KC_PANEL + 1, 2 * KC_PANEL + 60)}  # in_features drawn from


def torch_linear(x, weight, bias, activation, residual):
    out = F.linear(torch.from_numpy(x), torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias))
    out = TORCH_ACTIVATIONS[activation](out)
    return out if residual is None else out + torch.from_numpy(residual)


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("depth", list(DEPTHS))
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (True, False), (False, True), (False, False)])
def test_linear_packed_matches_torch(rng, activation, depth, with_bias, with_residual):
    rows, n_in, n_out = int(rng.integers(1, 40)), int(rng.integers(*DEPTHS[depth])), int(rng.integers(1, 200))
    x = rng.standard_normal((rows, n_in), dtype=np.float32)
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(n_in ** -0.5)
    bias = rng.standard_normal(n_out, dtype=np.float32) if with_bias else None
    residual = rng.standard_normal((rows, n_out), dtype=np.float32) if with_residual else None
    expected = torch_linear(x, weight, bias, activation, residual)
    ours = linear_packed(x, pack_panels(weight), n_out, bias, activation, residual)
    assert ours.shape == (rows, n_out) and ours.dtype == np.float32
    assert_rel_close(ours, expected, KERNEL_TOL, f"linear_packed ({activation})")
    assert_rel_close(linear_packed_ref(x, weight, bias, activation, residual), expected, KERNEL_TOL, "reference")


def test_clip_l_shapes_match_torch(rng):
    """CLIP-L's three GEMM shapes, 2 x 77 rows, as the model runs them (bias; quick_gelu on fc1; residual)."""
    rows = 154
    for n_in, n_out, activation, with_residual in ((768, 768, None, True), (768, 3072, "quick_gelu", False),
                                                  (3072, 768, None, True)):
        x = rng.standard_normal((rows, n_in), dtype=np.float32)
        weight = rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(0.02)
        bias = rng.standard_normal(n_out, dtype=np.float32)
        residual = rng.standard_normal((rows, n_out), dtype=np.float32) if with_residual else None
        ours = linear_packed(x, pack_panels(weight), n_out, bias, activation, residual)
        assert_rel_close(ours, torch_linear(x, weight, bias, activation, residual), KERNEL_TOL, f"{n_in}->{n_out}")


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
def test_every_element_is_written_once_into_out(rng, activation):
    """out given (a scratch full of NaN): every element is written, finished once (a second epilogue on an
    element, or one left out, would show), for shapes with edge tiles on both sides and several depth blocks."""
    rows, n_in, n_out = int(rng.integers(1, 40)), int(rng.integers(KC_PANEL + 1, 2 * KC_PANEL + 60)), int(
        rng.integers(1, 200))
    x = rng.standard_normal((rows, n_in), dtype=np.float32)
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(n_in ** -0.5)
    bias = rng.standard_normal(n_out, dtype=np.float32)
    residual = rng.standard_normal((rows, n_out), dtype=np.float32)
    out = np.full((rows, n_out), np.nan, np.float32)
    ours = linear_packed(x, pack_panels(weight), n_out, bias, activation, residual, out=out)
    assert ours is out
    assert_rel_close(out, torch_linear(x, weight, bias, activation, residual), KERNEL_TOL, "linear_packed into out")


def test_no_input_features_gives_the_bias(rng):
    rows, n_out = 5, 70
    bias = rng.standard_normal(n_out, dtype=np.float32)
    residual = rng.standard_normal((rows, n_out), dtype=np.float32)
    x = np.zeros((rows, 0), np.float32)
    ours = linear_packed(x, pack_panels(np.zeros((n_out, 0), np.float32)), n_out, bias, None, residual)
    assert np.array_equal(ours, np.broadcast_to(bias, (rows, n_out)) + residual)


def test_packing_round_trips_with_zero_padding(rng):
    n_in, n_out = int(rng.integers(1, 90)), int(rng.integers(1, 150))
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32)
    panels = pack_panels(weight.T.copy().T)  # an F-ordered weight packs the same
    assert panels.shape == (-(-n_out // NR), n_in, NR)
    assert np.array_equal(unpack_panels(panels, n_out), weight)
    assert not panels.transpose(0, 2, 1).reshape(-1, n_in)[n_out:].any()  # the spare columns are zero


def test_layer_norm_rows_matches_torch(rng):
    rows, width = int(rng.integers(1, 50)), int(rng.integers(2, 900))
    offset = np.float32(rng.uniform(-50, 50))  # a large mean: the float64 sums must not cancel
    x = rng.standard_normal((rows, width), dtype=np.float32) + offset
    gamma = rng.standard_normal(width, dtype=np.float32)
    beta = rng.standard_normal(width, dtype=np.float32)
    expected = F.layer_norm(torch.from_numpy(x), (width,), torch.from_numpy(gamma), torch.from_numpy(beta), 1e-5)
    ours = layer_norm_rows(x, gamma, beta, 1e-5, out=np.full((rows, width), np.nan, np.float32))
    assert_rel_close(ours, expected, KERNEL_TOL, "layer norm into rows")


@pytest.mark.parametrize("head_dim", [8, 40, 64])
def test_causal_attention_rows_matches_torch(rng, head_dim):
    batch, heads, length = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 90))
    q, k, v = (rng.standard_normal((batch * length, heads * head_dim), dtype=np.float32) for _ in range(3))
    scale = float(rng.uniform(0.05, 1.0))

    def heads_first(rows):  # [B*L, h*d] -> [B,h,L,d]
        return torch.from_numpy(rows).reshape(batch, length, heads, head_dim).transpose(1, 2)

    expected = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True,
                                              scale=scale)                       # [B,h,L,d]
    expected = expected.transpose(1, 2).reshape(batch * length, heads * head_dim)  # [B*L, h*d]
    assert_rel_close(causal_attention_rows(q, k, v, batch, heads, scale), expected, KERNEL_TOL, "causal attention")
