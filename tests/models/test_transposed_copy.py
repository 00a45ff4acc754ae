"""TransposedLinear's tiled transposed copy (npdiff/models/transformer.py): the same bytes as NumPy's own
transposed copy, in [in,out] memory, for shapes that are and are not multiples of the tile."""

import numpy as np
import pytest

from npdiff.models.transformer import TRANSPOSE_TILE, transposed_copy


@pytest.mark.parametrize("shape", [(1, 1), (3, 200), (TRANSPOSE_TILE, TRANSPOSE_TILE), (130, 67), (768, 3072)])
def test_transposed_copy_matches_numpy(rng, shape):
    value = rng.standard_normal(shape).astype(np.float32)  # [out,in]
    copied = transposed_copy(value)
    assert copied.shape == shape and copied.T.flags.c_contiguous  # [out,in] seen, [in,out] in memory
    np.testing.assert_array_equal(copied, value)
    np.testing.assert_array_equal(copied.T, np.ascontiguousarray(value.T))
    assert not np.shares_memory(copied, value)
