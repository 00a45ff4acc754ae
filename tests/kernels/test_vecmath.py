"""The vectorisable exp / sigmoid / erfc of npdiff/kernels/vecmath.py against torch, element by element."""

import numpy as np
import pytest
import torch

from npdiff.jit import SERIAL, njit
from npdiff.kernels.vecmath import erfc_f32, exp2_nonpositive_f32, exp_f32, sigmoid_f32

FLOAT32_EPS = float(np.finfo(np.float32).eps)


@njit(**SERIAL)
def apply_exp(x, out):
    for i in range(x.size):
        out[i] = exp_f32(x[i])


@njit(**SERIAL)
def apply_sigmoid(x, out):
    for i in range(x.size):
        out[i] = sigmoid_f32(x[i])


@njit(**SERIAL)
def apply_erfc(x, out):
    for i in range(x.size):
        out[i] = erfc_f32(x[i])


def run(kernel, x):
    out = np.empty_like(x)
    kernel(x, out)
    return out


def test_exp_within_two_ulp_of_torch_float64(rng):
    x = rng.uniform(-87, 88, 200_000).astype(np.float32)
    exact = torch.exp(torch.from_numpy(x).double()).numpy()
    relative = np.abs(run(apply_exp, x) - exact) / exact
    assert relative.max() <= 2 * FLOAT32_EPS


def test_exp_special_values():
    x = np.array([-np.inf, np.inf, np.nan, 0.0, -100.0, 100.0, 88.5, -87.0], np.float32)
    got = run(apply_exp, x)
    expected = torch.exp(torch.from_numpy(x)).numpy()
    assert got[0] == 0.0 and got[1] == np.inf and np.isnan(got[2]) and got[3] == 1.0
    assert got[4] == 0.0 and got[5] == np.inf  # torch: 0 (underflow) and inf
    assert np.allclose(got[6:], expected[6:], rtol=2 * FLOAT32_EPS, atol=0)


def test_sigmoid_matches_torch(rng):
    x = (rng.standard_normal(100_000) * 20).astype(np.float32)
    x[:4] = [-np.inf, np.inf, -200.0, 200.0]
    expected = torch.sigmoid(torch.from_numpy(x).double()).numpy()
    got = run(apply_sigmoid, x)
    assert np.all(np.isfinite(got))
    assert np.allclose(got, expected, rtol=4 * FLOAT32_EPS, atol=1e-38)


@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_erfc_relative_error_small_everywhere(rng, spread):
    x = (rng.standard_normal(100_000) * spread).astype(np.float32)
    exact = torch.special.erfc(torch.from_numpy(x).double()).numpy()
    got = run(apply_erfc, x)
    normal = exact > 1e-30  # below that the float32 result is subnormal or 0
    assert (np.abs(got - exact)[normal] / exact[normal]).max() < 1e-6
    assert np.all(np.abs(got - exact)[~normal] < 1e-30)


@njit(**SERIAL)
def apply_exp2_nonpositive(x, out):
    for i in range(x.size):
        out[i] = exp2_nonpositive_f32(x[i])


def test_exp2_nonpositive_within_two_ulp_of_torch_float64(rng):
    # softmax's 2^(s - max) (attention version 5): arguments in [-126, 0], 0 included
    x = np.concatenate([rng.uniform(-126, 0, 200_000), rng.uniform(-1, 0, 10_000), [0.0, -126.0]])
    x = x.astype(np.float32)
    exact = torch.exp2(torch.from_numpy(x).double()).numpy()
    relative = np.abs(run(apply_exp2_nonpositive, x) - exact) / exact
    assert relative.max() <= 2 * FLOAT32_EPS


def test_exp2_nonpositive_special_values():
    got = run(apply_exp2_nonpositive, np.array([-np.inf, np.nan, -126.5, -200.0, 0.0, -1.0], np.float32))
    assert got[0] == 0.0 and np.isnan(got[1]) and got[2] == 0.0 and got[3] == 0.0
    assert got[4] == 1.0 and got[5] == 0.5
