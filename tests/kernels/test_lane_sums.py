"""lane_sums: sums whose order is written in the source. Checked two ways on fresh random runs:
against the exact sum (math.fsum), and bit for bit against the order the module's docstring states
(lane i % 32 for the whole multiples of 32, a fixed tree over the lanes, then the tail in order),
written here in NumPy: so a compiler that reordered the sum would fail the second check."""

import math

import numpy as np
import pytest

from npdiff.kernels.lane_sums import SUM_LANES, dot_centred_f64, dot_f64, sum_f64

SIZES = [0, 1, 31, 32, 33, 77, 640, 4096 + 5]


def sum_in_stated_order(terms):
    """terms: float64 [n] -> their sum in lane_sums' order (NumPy: each lane's adds in sequence)."""
    full = terms.size - terms.size % SUM_LANES
    lanes = np.zeros(SUM_LANES, np.float64)
    for k0 in range(0, full, SUM_LANES):
        lanes += terms[k0:k0 + SUM_LANES]  # lane by lane, in order of k0
    half = SUM_LANES // 2
    while half > 0:
        lanes[:half] += lanes[half:2 * half]
        half //= 2
    total = lanes[0]
    for k in range(full, terms.size):
        total += terms[k]
    return total


@pytest.mark.parametrize("size", SIZES)
def test_sum_f64(rng, size):
    run = (rng.standard_normal(size) * 10.0 + 3.0).astype(np.float32)
    got = sum_f64(run)
    exact = math.fsum(run.astype(np.float64))
    assert abs(got - exact) <= 1e-12 * max(1.0, np.abs(run).astype(np.float64).sum())
    assert got == sum_in_stated_order(run.astype(np.float64))


@pytest.mark.parametrize("size", SIZES)
def test_dot_f64_and_centred(rng, size):
    a = rng.standard_normal(size).astype(np.float32)
    b = (rng.standard_normal(size) + 5.0).astype(np.float32)
    centre = float(rng.standard_normal())
    products = a.astype(np.float64) * b.astype(np.float64)
    centred = a.astype(np.float64) * (b.astype(np.float64) - centre)
    scale = max(1.0, np.abs(centred).sum(), np.abs(products).sum())
    assert abs(dot_f64(a, b) - math.fsum(products)) <= 1e-12 * scale
    assert abs(dot_centred_f64(a, b, centre) - math.fsum(centred)) <= 1e-12 * scale
    assert dot_f64(a, b) == sum_in_stated_order(products)
    assert dot_centred_f64(a, b, centre) == sum_in_stated_order(centred)


def test_sum_of_a_row_view(rng):
    """A row of a 2-D array (what the kernels pass) is a contiguous view: same result as a copy."""
    x = rng.standard_normal((3, 100)).astype(np.float32)
    assert sum_f64(x[1]) == sum_f64(np.ascontiguousarray(x[1]))
