"""The register tile of attention version 4's backward (backward_fused.py): one micro-kernel for all
five GEMMs of a query block.

    tile(...):  C[R, 64] (+)= sum over t < depth of A(r, t) * B[t, 0:64]       R <= TILE_ROWS = 6

A is read in place through two strides (A(r, t) = a[a_start + r * a_row_step + t * a_depth_step]),
so the same kernel reads q's rows (S = q k^T), dO's columns (dv^T = dO^T P) and dS's rows
(dq = dS k) without a packed copy; B is 64 floats of a contiguous row per step of t (k^T or v^T by
key blocks, a block of the P or dS tile, or k padded to 64 columns). The 6 x 64 tile of C lives in
24 zmm registers (the stack rows of matmul_numba.py, promoted by LLVM): each step of t is 6
broadcasts of A, 4 loads of B and 24 FMAs, as matmul_numba's micro-kernel, but without packing A
(its 6 values per step are a few cache lines that stay in L1 across the 64-column blocks).
`accumulate` adds the tile to C (dk^T, dv^T summed over query blocks; dq over key chunks) instead of
storing it. Rows past R are computed from row R - 1 again (A is never read out of bounds) and not
written. Compiled with fastmath 'contract' only, as matmul_numba's micro-kernel: a*b + c may be one
FMA, nothing is reordered.

Measured alone (one core of this Xeon, operands in L1, thread CPU time): 100-115 GFLOP/s at depth
40, ~130 at depth 1024 (an equivalent kernel with constant strides and no edge rows: 146-160 at
depth 40). What it took: every index is unsigned or a range variable. With a signed computed index
(b[b_at + j]) Numba adds the negative-index wrap-around, and LLVM then loads B with gathers: 22
GFLOP/s. And the accumulators must not be handed to another function (a shared epilogue taking
them as arrays kept them in memory: 4x slower at depth 40), so the epilogue is written out here.
"""

import numpy as np
from numba import carray

from npdiff.jit import FASTMATH_CONTRACT, SERIAL, njit
from npdiff.kernels.matmul_numba import _stack_row  # the register tile's rows

TILE_ROWS = 6  # rows of C per tile (acc0..acc5)
TILE_COLS = 64  # columns of C per tile: 4 zmm vectors of 16 float32; must equal matmul_numba.NR


@njit(fastmath=FASTMATH_CONTRACT, **SERIAL)
def tile(depth, a, a_start, a_row_step, a_depth_step, rows, b, b_start, b_row_step, c, c_start, c_row_step,
         accumulate):
    """C[rows, 64] (+)= A[rows, depth] @ B[depth, 64] (module docstring); a, b, c are flat float32
    arrays; B's row t starts at b_start + t * b_row_step, C's row r at c_start + r * c_row_step."""
    acc0 = carray(_stack_row(), TILE_COLS)
    acc1 = carray(_stack_row(), TILE_COLS)
    acc2 = carray(_stack_row(), TILE_COLS)
    acc3 = carray(_stack_row(), TILE_COLS)
    acc4 = carray(_stack_row(), TILE_COLS)
    acc5 = carray(_stack_row(), TILE_COLS)
    for j in range(TILE_COLS):
        acc0[j] = 0.0
        acc1[j] = 0.0
        acc2[j] = 0.0
        acc3[j] = 0.0
        acc4[j] = 0.0
        acc5[j] = 0.0
    # A's row offsets, rows past `rows` folded onto the last valid one (unsigned: see the docstring)
    last = rows - 1
    off1 = np.uint64(min(1, last) * a_row_step)
    off2 = np.uint64(min(2, last) * a_row_step)
    off3 = np.uint64(min(3, last) * a_row_step)
    off4 = np.uint64(min(4, last) * a_row_step)
    off5 = np.uint64(min(5, last) * a_row_step)
    for t in range(depth):
        at = np.uint64(a_start + t * a_depth_step)
        a0 = a[at]  # the six rows' A values for this t, broadcast across j
        a1 = a[at + off1]
        a2 = a[at + off2]
        a3 = a[at + off3]
        a4 = a[at + off4]
        a5 = a[at + off5]
        b_at = np.uint64(b_start + t * b_row_step)
        for j in range(TILE_COLS):  # contiguous in b: 4 zmm loads
            b_tj = b[b_at + np.uint64(j)]
            acc0[j] += a0 * b_tj
            acc1[j] += a1 * b_tj
            acc2[j] += a2 * b_tj
            acc3[j] += a3 * b_tj
            acc4[j] += a4 * b_tj
            acc5[j] += a5 * b_tj
    # the rows of C as views (range indices); rows past `rows` are empty or unused
    c0 = c[c_start:c_start + TILE_COLS]
    c1 = c[c_start + c_row_step:c_start + c_row_step + TILE_COLS]
    c2 = c[c_start + 2 * c_row_step:c_start + 2 * c_row_step + TILE_COLS]
    c3 = c[c_start + 3 * c_row_step:c_start + 3 * c_row_step + TILE_COLS]
    c4 = c[c_start + 4 * c_row_step:c_start + 4 * c_row_step + TILE_COLS]
    c5 = c[c_start + 5 * c_row_step:c_start + 5 * c_row_step + TILE_COLS]
    if rows == TILE_ROWS:
        for j in range(TILE_COLS):  # straight from the registers
            c0[j] = acc0[j] + c0[j] if accumulate else acc0[j]
            c1[j] = acc1[j] + c1[j] if accumulate else acc1[j]
            c2[j] = acc2[j] + c2[j] if accumulate else acc2[j]
            c3[j] = acc3[j] + c3[j] if accumulate else acc3[j]
            c4[j] = acc4[j] + c4[j] if accumulate else acc4[j]
            c5[j] = acc5[j] + c5[j] if accumulate else acc5[j]
        return
    for j in range(TILE_COLS):  # an edge tile: row 0 always, the others while valid
        c0[j] = acc0[j] + c0[j] if accumulate else acc0[j]
    if rows > 1:
        for j in range(TILE_COLS):
            c1[j] = acc1[j] + c1[j] if accumulate else acc1[j]
    if rows > 2:
        for j in range(TILE_COLS):
            c2[j] = acc2[j] + c2[j] if accumulate else acc2[j]
    if rows > 3:
        for j in range(TILE_COLS):
            c3[j] = acc3[j] + c3[j] if accumulate else acc3[j]
    if rows > 4:
        for j in range(TILE_COLS):
            c4[j] = acc4[j] + c4[j] if accumulate else acc4[j]
