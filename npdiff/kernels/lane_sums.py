"""Sums of a contiguous run whose order is written in the source: the same bits in every compiled copy.

  sum_f64(run)                 run[0] + ... + run[n-1], in float64
  dot_f64(a, b)                a[0]*b[0] + ... , products and sum in float64
  dot_centred_f64(a, b, centre)  a[0]*(b[0] - centre) + ... , in float64

Why not a plain loop with fastmath 'reassoc': that flag lets LLVM's vectoriser pick the order of a sum
(how many vectors, how they are combined at the end), and it may pick differently in each compiled copy
of a function. Numba links a copy of every jitted callee into each caller and optimises it again there;
a process that compiled the caller reaches one copy, a process that loaded it from the disk cache
another. So the same kernel gave other bits on a clean CI clone than on a warm machine (the causal
softmax of CLIP, then group norm's statistics: tests/kernels/test_cache_bits.py checks every kernel).

Here the sum runs in SUM_LANES float64 lanes on the stack (a stack row of matmul_numba: LLVM promotes it
to 4 zmm registers): value i goes to lane i % SUM_LANES for the whole multiples of SUM_LANES, the lanes
are added in a fixed tree (sum_lanes_in_tree), then the last run.size % SUM_LANES values in order. No
fastmath flag is needed for the lane loop to vectorise: its 32 lanes are independent, written out.
"""

import numpy as np
from numba import carray

from npdiff.jit import SERIAL, njit
from npdiff.kernels.matmul_numba import _stack_row_f64, sum_lanes_in_tree

SUM_LANES = 32  # float64 lanes: the 256 bytes of one stack row, 4 zmm registers


@njit(**SERIAL)
def sum_f64(run):
    """sum(run) in float64, in a fixed order (module docstring)."""
    lanes = carray(_stack_row_f64(), SUM_LANES)
    for lane in range(SUM_LANES):
        lanes[lane] = 0.0
    full = run.size - run.size % SUM_LANES
    for k0 in range(0, full, SUM_LANES):
        block = run[k0:k0 + SUM_LANES]  # constant indices below: vector loads
        for lane in range(SUM_LANES):
            lanes[lane] += np.float64(block[lane])
    total = sum_lanes_in_tree(lanes)
    for k in range(full, run.size):
        total += np.float64(run[k])
    return total


@njit(**SERIAL)
def dot_centred_f64(a, b, centre):
    """sum(a * (b - centre)) over two runs of the same size, in float64 (centre a float64), fixed order."""
    lanes = carray(_stack_row_f64(), SUM_LANES)
    for lane in range(SUM_LANES):
        lanes[lane] = 0.0
    full = a.size - a.size % SUM_LANES
    for k0 in range(0, full, SUM_LANES):
        block_a = a[k0:k0 + SUM_LANES]
        block_b = b[k0:k0 + SUM_LANES]
        for lane in range(SUM_LANES):
            lanes[lane] += np.float64(block_a[lane]) * (np.float64(block_b[lane]) - centre)
    total = sum_lanes_in_tree(lanes)
    for k in range(full, a.size):
        total += np.float64(a[k]) * (np.float64(b[k]) - centre)
    return total


@njit(**SERIAL)
def dot_f64(a, b):
    """sum(a * b) over two runs of the same size, each product and the sum in float64, fixed order
    (dot_centred_f64 with centre 0: b - 0.0 is b exactly)."""
    return dot_centred_f64(a, b, 0.0)
