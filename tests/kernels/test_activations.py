"""silu, gelu (erf and tanh), quick_gelu: fast and reference versions against torch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close
from npdiff import NpdiffError
from npdiff.kernels import gelu, quick_gelu, silu
from npdiff.kernels import activations


def random_input(rng):
    shape = tuple(int(s) for s in rng.integers(1, 40, size=int(rng.integers(1, 4))))
    return (rng.standard_normal(shape) * rng.uniform(0.5, 8)).astype(np.float32)


def torch_quick_gelu(t):
    return t * torch.sigmoid(1.702 * t)


CASES = [
    ("silu", silu, activations.silu_ref, F.silu),
    ("gelu", gelu, activations.gelu_ref, F.gelu),
    ("gelu_tanh", lambda x: gelu(x, approximate="tanh"), lambda x: activations.gelu_ref(x, "tanh"),
     lambda t: F.gelu(t, approximate="tanh")),
    ("quick_gelu", quick_gelu, activations.quick_gelu_ref, torch_quick_gelu),
]


@pytest.mark.parametrize("name,ours,reference,torch_fn", CASES, ids=[c[0] for c in CASES])
def test_activation_matches_torch(rng, name, ours, reference, torch_fn):
    # torch evaluated in float64 on the float32 inputs: with few elements, all in a tail (seed 974991922
    # drew one, x = -4.27), torch's float32 GELU is itself 5.9e-4 (erf) / 2.2e-3 (tanh: 1 + tanh cancels)
    # from the true value, where ours is 1.1e-7 / 4.8e-7.
    x = random_input(rng)
    expected = torch_fn(torch.from_numpy(x).double())
    assert_rel_close(ours(x), expected, KERNEL_TOL, name)
    assert_rel_close(reference(x), expected, KERNEL_TOL, f"{name} reference")


@pytest.mark.parametrize("name,ours,reference,torch_fn", CASES, ids=[c[0] for c in CASES])
def test_activation_tails_elementwise(name, ours, reference, torch_fn):
    # Large |x| (the sigmoid must not overflow, erf must not lose the negative tail) and a strided
    # view; compared element by element, not only in norm.
    x = np.linspace(-40, 40, 2001, dtype=np.float32)[::2]
    expected = torch_fn(torch.from_numpy(x.copy())).numpy()
    for got in (ours(x), reference(x)):
        assert np.all(np.isfinite(got))
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_erfc_ref_against_torch(rng):
    z = (rng.standard_normal(5000) * 3).astype(np.float64)
    expected = torch.special.erfc(torch.from_numpy(z)).numpy()
    got = activations.erfc_ref(z)
    assert np.max(np.abs(got - expected) / np.maximum(expected, 1e-300)) < 2e-7  # fractional error


def test_activations_reject_bad_input():
    with pytest.raises(NpdiffError, match=r"gelu: x must be float32, got float64"):
        gelu(np.zeros(3))
    with pytest.raises(NpdiffError, match=r"gelu: approximate must be one of \('none', 'tanh'\), got 'erf'"):
        gelu(np.zeros(3, np.float32), approximate="erf")
    with pytest.raises(NpdiffError, match=r"silu: x must be a float32 array, got list"):
        silu([1.0, 2.0])
