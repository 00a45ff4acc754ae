"""npdiff/kernels/dispatch.py: one rule picks every kernel's version (cupy -> CUDA, NumPy -> fast,
else the reference), and every public kernel goes through it."""

import sys

import numpy as np
import pytest

import npdiff.kernels as kernels
from npdiff.kernels import cuda, dispatch, matmul  # noqa: F401  (matmul registers its Numba steps)

PUBLIC = ["conv2d", "linear", "geglu", "group_norm", "layer_norm", "silu", "gelu", "quick_gelu", "softmax",
          "upsample_nearest2x", "scaled_dot_product_attention", "attention_full", "attention_chunked"]


class FakeCupyArray:
    """Looks like a cupy array to dispatch.is_cupy (the type's module); holds no data."""

    __module__ = "cupy"

    def __init__(self, shape):
        self.shape, self.dtype, self.size = tuple(shape), np.dtype(np.float32), int(np.prod(shape))


def test_every_public_kernel_is_registered():
    assert set(PUBLIC) <= set(dispatch.KERNELS)
    for name in PUBLIC:
        assert callable(getattr(kernels, name))


@pytest.mark.parametrize("name", sorted(dispatch.KERNELS))
def test_the_rule_for_each_kernel(name):
    versions = dispatch.KERNELS[name]
    assert versions.pick(np.ones((2, 3), np.float32)) is versions.fast
    assert versions.pick(np.ones((0, 3), np.float32)) is versions.reference  # empty: the reference
    on_cupy = versions.pick(FakeCupyArray((2, 3)))
    if versions.cuda is None:
        assert on_cupy is versions.reference
    else:
        assert on_cupy is getattr(cuda, versions.cuda)  # looked up at call time: replaceable
    if name != "scaled_dot_product_attention":  # its two entries pick a path, then dispatch again
        module = sys.modules[versions.reference.__module__]
        ref_names = [n for n in dir(module) if n.endswith("_ref") and getattr(module, n) is versions.reference]
        assert ref_names, f"{name}: the reference is not named *_ref in its module"
        assert versions.fast is not versions.reference


def test_versions_call_the_picked_one():
    calls = []
    versions = dispatch.Versions("probe", fast=lambda x, k: calls.append(("fast", k)),
                                 reference=lambda x, k: calls.append(("reference", k)))
    versions(np.ones(3, np.float32), 1)
    versions(np.ones(0, np.float32), 2)
    versions([1.0], 3)  # not an array npdiff knows: the reference
    versions(FakeCupyArray((3,)), k=4)  # no CUDA version: the reference
    assert calls == [("fast", 1), ("reference", 2), ("reference", 3), ("reference", 4)]


def test_public_kernels_use_the_table(monkeypatch, rng):
    # Each public kernel hands over to its registered versions (no array checks of its own).
    x = rng.standard_normal((2, 5), dtype=np.float32)
    seen = []
    original = dispatch.Versions.pick

    def spy(self, a):
        seen.append(self.name)
        return original(self, a)

    monkeypatch.setattr(dispatch.Versions, "pick", spy)
    kernels.silu(x)
    kernels.softmax(x)
    kernels.linear(x, rng.standard_normal((4, 5), dtype=np.float32))
    assert seen == ["silu", "softmax", "linear"]


def test_empty_arrays_get_the_references_result(rng):
    empty = np.zeros((0, 4, 3, 3), np.float32)
    assert kernels.group_norm(empty, 2, None, None).shape == (0, 4, 3, 3)
    assert kernels.silu(empty).shape == empty.shape
    assert kernels.conv2d(empty, rng.standard_normal((2, 4, 3, 3), dtype=np.float32), padding=1).shape == (0, 2, 3, 3)
    assert kernels.upsample_nearest2x(empty).shape == (0, 4, 6, 6)
