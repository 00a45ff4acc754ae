"""upsample_nearest2x against torch's nearest interpolation (scale factor 2)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npdiff import NpdiffError
from npdiff.kernels import upsample_nearest2x
from npdiff.kernels.resample import upsample_nearest2x_ref


def test_upsample_matches_torch(rng):
    shape = tuple(int(s) for s in rng.integers(1, 12, size=4))
    x = rng.standard_normal(shape, dtype=np.float32)
    expected = F.interpolate(torch.from_numpy(x), scale_factor=2, mode="nearest").numpy()
    assert np.array_equal(upsample_nearest2x(x), expected)  # a copy of values: exact
    assert np.array_equal(upsample_nearest2x_ref(x), expected)
    assert np.array_equal(upsample_nearest2x(x[:, :, ::-1]), F.interpolate(
        torch.from_numpy(x[:, :, ::-1].copy()), scale_factor=2, mode="nearest").numpy())


def test_upsample_rejects_bad_input():
    with pytest.raises(NpdiffError, match=r"upsample_nearest2x: x must be 4-D \[B,C,H,W\], got shape \[3,4,5\]"):
        upsample_nearest2x(np.zeros((3, 4, 5), np.float32))
