"""upsample_nearest2x and resize against torch's interpolate (nearest 2x; nearest, nearest-exact, bilinear,
bicubic to any size)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npdiff import NpdiffError
from npdiff.kernels import resize, upsample_nearest2x
from npdiff.kernels.resample import resize_ref, upsample_nearest2x_ref


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


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "bilinear", "bicubic"])
def test_resize_matches_torch(rng, mode):
    for in_size, out_size in [((5, 7), (8, 11)), ((8, 8), (12, 12)), ((9, 6), (4, 13)), ((3, 4), (3, 4))]:
        x = rng.standard_normal((2, 3) + in_size, dtype=np.float32)
        expected = F.interpolate(torch.from_numpy(x), size=out_size, mode=mode,
                                 **({} if mode.startswith("nearest") else {"align_corners": False})).numpy()
        for ours in (resize(x, out_size, mode), resize_ref(x, out_size, mode)):
            assert ours.shape == expected.shape
            assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) <= 1e-5


def test_resize_rejects_bad_input():
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(NpdiffError, match="mode must be one of"):
        resize(x, (16, 16), "area")
    with pytest.raises(NpdiffError, match="size must be two integers"):
        resize(x, (16, 0))
    with pytest.raises(NpdiffError, match=r"resize: x must be 4-D"):
        resize(x[0], (16, 16))
