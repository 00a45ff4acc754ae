"""softmax, and the row pieces attention's Numba passes are built from.

Versions:
  1. softmax_ref    NumPy API (numpy or cupy): max, exp, sum, divide; four passes, temporaries.
  2. softmax_fast   NumPy arrays: row maxima first (row_maxima), then Numba, prange over blocks of
                    SOFTMAX_BLOCK_ROWS rows (softmax_rows_block): subtract the max, exp of the
                    block as one flat run (the vectorised exp of vecmath.py, no per-row scalar
                    remainder), sum (float64) and scale each row.
  cupy arrays run the CUDA kernel of npdiff/kernels/cuda/attention.py (npdiff/kernels/dispatch.py).

The row pieces are public because attention (npdiff/kernels/attention/) uses them on its score
tiles: row_maxima, exp_in_place and softmax_rows_block.

Fully masked rows: softmax(x) of a row that is all -inf gives NaN, as torch.softmax does.
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.lane_sums import sum_f64
from npdiff.kernels.validate import require_float32, shape_text
from npdiff.kernels.vecmath import exp_f32

SOFTMAX_BLOCK_ROWS = 64  # rows per parallel task of softmax_fast
WIDE_ROW = 256  # rows at least this wide take NumPy's max reduction (row_maxima)


# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------
def softmax_ref(x, axis=-1):
    xp = backend.array_module(x)
    row_max = x.max(axis=axis, keepdims=True)  # [..., 1, ...]
    with np.errstate(invalid="ignore"):  # an all -inf row: -inf - -inf = NaN, as torch
        exps = xp.exp(x - row_max)  # [...]
    return exps / exps.sum(axis=axis, keepdims=True)  # [...]


# ---------------------------------------------------------------------------------------------
# Row pieces (Numba, serial, nogil: also called from attention's worker threads)
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def _rows_max_loop(x, out):
    for r in range(x.shape[0]):
        row = x[r]
        row_max = -np.inf
        for j in range(row.size):
            if row[j] > row_max:
                row_max = row[j]
        out[r] = row_max


def row_maxima(x):
    """[R, M] -> [R] row maxima. NumPy's reduction is vectorised (0.13 ns/float at M = 1024), but
    pays a per-row cost that makes it slower than a plain Numba loop on narrow rows (77 keys of
    cross-attention: 3.9 vs 2.1 ms for 5M floats). The Numba loop is not vectorised: a max
    reduction only is when the compiler may assume there is no NaN, which masked rows rule out."""
    if x.shape[1] >= WIDE_ROW:
        return x.max(axis=1)
    out = np.empty(x.shape[0], np.float32)
    _rows_max_loop(x, out)
    return out


@njit(**SERIAL)
def exp_in_place(flat):
    """flat[i] = exp(flat[i]) over one contiguous run: a single vectorised loop (its scalar
    remainder is at most 15 elements in all, where a loop per 77-wide row pays one per row)."""
    for i in range(flat.size):
        flat[i] = exp_f32(flat[i])


@njit(**SERIAL)
def softmax_rows_block(x, row_max, out):
    """out = softmax of each row of x [R, M] (contiguous) with row maxima row_max [R]: subtract the
    max row by row, exp of the whole block as one flat vectorised run, then scale each row by
    1 / its sum. -inf entries give 0; a row that is all -inf gives NaN (-inf - -inf), as torch.
    No fastmath flag: the same bits in every compiled copy (lane_sums.py says why)."""
    for r in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[r, j] = x[r, j] - row_max[r]
    exp_in_place(out.reshape(-1))
    for r in range(x.shape[0]):
        total = sum_f64(out[r])  # float64, in an order fixed by the source (lane_sums.py)
        inv_total = np.float32(1.0 / total)
        for j in range(x.shape[1]):
            out[r, j] *= inv_total


# ---------------------------------------------------------------------------------------------
# 2. Fast
# ---------------------------------------------------------------------------------------------
@njit(**PARALLEL)
def _softmax_rows(x, row_max, out):
    """x, out: [R, M] contiguous rows; row_max [R] (row_maxima). prange over blocks of
    SOFTMAX_BLOCK_ROWS rows."""
    rows = x.shape[0]
    for block in prange((rows + SOFTMAX_BLOCK_ROWS - 1) // SOFTMAX_BLOCK_ROWS):
        start = block * SOFTMAX_BLOCK_ROWS
        stop = min(rows, start + SOFTMAX_BLOCK_ROWS)
        softmax_rows_block(x[start:stop], row_max[start:stop], out[start:stop])


def softmax_fast(x, axis=-1):
    moved = np.moveaxis(x, axis, -1)  # [..., M] (a view)
    rows = np.ascontiguousarray(moved).reshape(-1, moved.shape[-1])  # [..., M] -> [R, M]
    out = np.empty_like(rows)  # [R, M]
    _softmax_rows(rows, row_maxima(rows), out)
    return np.moveaxis(out.reshape(moved.shape), -1, axis)  # [R, M] -> x's layout


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
SOFTMAX = dispatch.register("softmax", fast=softmax_fast, reference=softmax_ref, cuda="softmax")


def softmax(x, axis=-1):
    """torch.softmax(x, axis): numerically stable (subtracts the row max). x: float32 array."""
    require_float32("softmax", "x", x)
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise NpdiffError(f"softmax: axis must be in [-{x.ndim}, {x.ndim}) for x of shape "
                          f"{shape_text(x.shape)}, got {axis}")
    return SOFTMAX(x, axis)
