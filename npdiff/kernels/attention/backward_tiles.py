"""The register-blocked tile of attention version 4's backward (backward_fused.py): one micro-kernel
for all five GEMMs, each with its element-wise step fused into the store of the tile.

    tile(...):  C[R, 64] = sum over t < depth of A(r, t) * B[t, 0:64]       R <= TILE_ROWS = 6

A is read in place through two strides (A(r, t) = a[a_start + r * a_row_step + t * a_depth_step]),
so the same kernel reads q's rows (S = q k^T), dO's columns (dv^T = dO^T P) and dS's rows
(dq = dS k) without a packed copy; B is 64 floats of a contiguous row per step of t (a packed k^T,
v^T, the P or dS tile, or k padded to 64 columns). The 6 x 64 tile of C lives in 24 zmm registers
(the stack rows of matmul_numba.py, promoted by LLVM): each step of t is 6 broadcasts of A, 4
loads of B and 24 FMAs, as matmul_numba's micro-kernel, but without packing A (its 6 values per
step are a few cache lines that stay in L1 across the 64-column tiles of a block).

What happens to the tile when it is done (`epilogue`), per valid row r and column j:
  STORE   C = acc                       (dq's tile; the first query block of dk^T, dv^T)
  ADD     C += acc                      (dk^T, dv^T summed over query blocks)
  SCORES  C = acc for j < limit(r), -inf past it (keys past M, or after the query when causal);
          row_values[r] = max(row_values[r], the row's maximum)     (S, and its running row max)
  DOT     C = acc; row_values[r] += sum_j P[r, j] * acc[j]           (dP, and rowsum(P * dP) in
          float64, which equals rowsum(dO * O): O is never formed)
Rows past R are computed from row R - 1 again (A is never read out of bounds) and not written.
Compiled with fastmath 'contract' only, as matmul_numba's micro-kernel: a*b + c may be one FMA.
"""

import numpy as np
from numba import carray

from npdiff.jit import FASTMATH_CONTRACT, FASTMATH_SAFE, SERIAL, njit
from npdiff.kernels.matmul_numba import _stack_row  # the one stack-row intrinsic (register tile)

TILE_ROWS = 6  # rows of C per tile (acc0..acc5)
TILE_COLS = 64  # columns of C per tile: 4 zmm vectors of 16 float32; must equal matmul_numba.NR
LANES = 16  # float32 lanes of one zmm vector: the per-lane row maxima and dot products
STORE, ADD, SCORES, DOT = 0, 1, 2, 3


@njit(fastmath=FASTMATH_SAFE, **SERIAL)
def _finish_rows(staged, rows, c, c_start, c_row_step, epilogue, limit_base, valid_cols, row_lanes, row0, p,
                 p_start):
    """The tile's valid rows (staged [TILE_ROWS, 64]) into C, as `epilogue` says (module docstring).
    The row maxima and dot products are kept per lane (row_lanes [rows, LANES]: lane l holds columns
    l, l + 16, l + 32, l + 48 of every tile of the row), so this loop is element-wise and vectorises;
    the caller reduces the 16 lanes of a row once, after its last tile (lane_max, lane_sum)."""
    for r in range(rows):
        c_at = c_start + r * c_row_step
        if epilogue == STORE:
            for j in range(TILE_COLS):
                c[c_at + j] = staged[r, j]
        elif epilogue == ADD:
            for j in range(TILE_COLS):
                c[c_at + j] += staged[r, j]
        elif epilogue == SCORES:
            limit = min(valid_cols, limit_base + r)
            lanes = row_lanes[row0 + r]  # [LANES]
            for j in range(TILE_COLS):
                value = staged[r, j] if j < limit else np.float32(-np.inf)
                staged[r, j] = value
                c[c_at + j] = value
            for lane in range(LANES):
                for part in range(TILE_COLS // LANES):
                    value = staged[r, part * LANES + lane]
                    lanes[lane] = value if value > lanes[lane] else lanes[lane]
        else:  # DOT
            p_at = p_start + r * c_row_step
            lanes = row_lanes[row0 + r]  # [LANES]
            for j in range(TILE_COLS):
                c[c_at + j] = staged[r, j]
            for lane in range(LANES):
                for part in range(TILE_COLS // LANES):
                    j = part * LANES + lane
                    lanes[lane] += p[p_at + j] * staged[r, j]


@njit(**SERIAL)
def lane_max(lanes):
    """The maximum of one row's lanes (SCORES' row_lanes[row])."""
    result = lanes[0]
    for lane in range(1, lanes.size):
        result = lanes[lane] if lanes[lane] > result else result
    return result


@njit(**SERIAL)
def lane_sum(lanes):
    """The sum of one row's lanes (DOT's row_lanes[row]), in float64."""
    total = 0.0
    for lane in range(lanes.size):
        total += lanes[lane]
    return total


@njit(fastmath=FASTMATH_CONTRACT, **SERIAL)
def tile(depth, a, a_start, a_row_step, a_depth_step, rows, b, b_start, b_row_step,
         c, c_start, c_row_step, epilogue, limit_base, valid_cols, row_lanes, row0, p, p_start, staged):
    """C[rows, 64] (epilogue)= A[rows, depth] @ B[depth, 64] (module docstring); a, b, c, p are flat
    float32 arrays. Row r's column limit (SCORES) is min(valid_cols, limit_base + r); row r's entry
    of row_values is row_values[row0 + r]; P's row r starts at p_start + r * c_row_step (DOT)."""
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
    # A's row offsets, rows past `rows` folded onto the last valid one
    last = rows - 1
    off1 = min(1, last) * a_row_step
    off2 = min(2, last) * a_row_step
    off3 = min(3, last) * a_row_step
    off4 = min(4, last) * a_row_step
    off5 = min(5, last) * a_row_step
    for t in range(depth):
        at = a_start + t * a_depth_step
        a0 = a[at]  # the six rows' A values for this t, broadcast across j
        a1 = a[at + off1]
        a2 = a[at + off2]
        a3 = a[at + off3]
        a4 = a[at + off4]
        a5 = a[at + off5]
        b_at = b_start + t * b_row_step
        for j in range(TILE_COLS):  # contiguous in b: 4 zmm loads
            b_tj = b[b_at + j]
            acc0[j] += a0 * b_tj
            acc1[j] += a1 * b_tj
            acc2[j] += a2 * b_tj
            acc3[j] += a3 * b_tj
            acc4[j] += a4 * b_tj
            acc5[j] += a5 * b_tj
    if rows == TILE_ROWS and epilogue == STORE:
        for j in range(TILE_COLS):  # straight from the registers
            c[c_start + j] = acc0[j]
            c[c_start + c_row_step + j] = acc1[j]
            c[c_start + 2 * c_row_step + j] = acc2[j]
            c[c_start + 3 * c_row_step + j] = acc3[j]
            c[c_start + 4 * c_row_step + j] = acc4[j]
            c[c_start + 5 * c_row_step + j] = acc5[j]
        return
    if rows == TILE_ROWS and epilogue == ADD:
        for j in range(TILE_COLS):
            c[c_start + j] += acc0[j]
            c[c_start + c_row_step + j] += acc1[j]
            c[c_start + 2 * c_row_step + j] += acc2[j]
            c[c_start + 3 * c_row_step + j] += acc3[j]
            c[c_start + 4 * c_row_step + j] += acc4[j]
            c[c_start + 5 * c_row_step + j] += acc5[j]
        return
    # otherwise the accumulators go to `staged` (24 stores) and the epilogue works from there: handing
    # the stack rows to another function would keep them out of registers (measured: 4x slower at d = 40)
    for j in range(TILE_COLS):
        staged[0, j] = acc0[j]
        staged[1, j] = acc1[j]
        staged[2, j] = acc2[j]
        staged[3, j] = acc3[j]
        staged[4, j] = acc4[j]
        staged[5, j] = acc5[j]
    _finish_rows(staged, rows, c, c_start, c_row_step, epilogue, limit_base, valid_cols, row_lanes, row0, p,
                 p_start)
