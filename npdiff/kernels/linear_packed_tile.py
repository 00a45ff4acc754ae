"""The micro-kernel of linear_packed.py: one MR x NR tile of y = x W^T, x read as it lies (row-major rows), W from
its packed column panels, with the layer's epilogue (bias, activation, residual) applied as the tile is written.

    row_tile(depth, x, k0, row0, valid_rows, b_block, out, col0, valid_cols, accumulate, finish,
             bias, has_bias, which, residual, has_residual, tile, prefetch_from, prefetch_start, prefetch_count)

A copy of matmul_numba.py's _micro_kernel (the lesson's step 6: the 6 x 64 tile of C in 24 zmm registers, each step
of k 6 broadcasts of A, 4 loads of B, 24 explicit FMAs; no fastmath flag), changed in two places:

  1. A is not packed. The six rows' values for one k are read from x's own rows (x[row0 + i, k0 + k]: six streams
     of consecutive floats, which the L1 prefetcher follows; the tile's [depth, 6] block of x, 18 KiB at
     depth 768, stays in L1 as the packed panel did). No pass per call packs x, and the layer norm before a GEMM
     and the GEMM before another (fc1 -> fc2) write plain rows. Rows past the valid ones read the last valid row
     (their sums are never stored). One view of x a call (six row views were six reference counts taken and
     dropped a call, atomic adds on the header of an array both threads use).
  2. After the last depth block (`finish`), the tile is finished in place of being stored: + the earlier blocks'
     sums (in out), + bias, the activation, + residual, then written once. Without an activation everything runs
     on the registers (loops of constant trip count NR, unrolled, like the store of _write_full_tile); with one,
     the biased tile is stored into the thread's buffer tile[0] and activated as one run of MR * NR floats into
     tile[1] (in place, the loop would fail LLVM's run-time overlap check and run scalar; per row, 64 floats a
     call, it ran ~1.6x slower a float), then placed in out's rows with the residual. Edge tiles (the last row
     panel, the last column panel) take the same steps on their valid part, row by row. Quick-GELU (CLIP-L's
     fc1) is _quick_gelu_run, its sigmoid from one 2^x: fc1's epilogue at 77 rows 0.36-0.39 -> 0.24-0.27 ms
     (one thread); the other activations are activations.activation_block's.

Why: the epilogue as a pass over each finished column panel (from L2) cost CLIP-L's fc1 ~20% of its GEMM, and
packing x and fc1's output per call another ~10%; here they cost a few per cent.

The same bits in every process: the FMAs are explicit, no function here carries a fastmath flag (vecmath's
exponentials and activations.activation_block carry 'contract' only), and each element of the result is made by
one call, in one order of k, through the same activation whichever tile (full or edge) holds it.

Edit note: Numba's disk cache of a caller (linear_packed.py, clip_layer_rows.py, causal_rows.py) is keyed on the
caller's own file; after editing this one, delete npdiff/kernels/**/__pycache__ (or use a fresh
NUMBA_CACHE_DIR), or the callers run their cached copies of the old code.
"""

import numpy as np
from numba import carray

from npdiff.intrinsics import fma32
from npdiff.jit import SERIAL, njit
from npdiff.kernels.activations import QUICK_GELU, QUICK_GELU_ALPHA, activation_block
from npdiff.kernels.matmul_numba import (
    CACHE_LINE_FLOATS,
    MR,
    NR,
    _stack_row,
    prefetch_to_l2,
)
from npdiff.kernels.vecmath import LOG2E, ONE, exp2_nonpositive_f32

NO_ACTIVATION = -1  # activation code: bias (and residual) only
# steps of k per prefetched cache line of the next weight block: at 4 (matmul_numba's) a call of depth 768 can
# fetch 192 lines, and with 77 rows (13 calls a panel) a [768, 64] panel's 3072 lines need 237 a call
PREFETCH_EVERY = 2


@njit(**SERIAL)
def row_tile(depth, x, k0, row0, valid_rows, b_block, out, col0, valid_cols, accumulate, finish, bias, has_bias,
             which, residual, has_residual, tile, prefetch_from, prefetch_start, prefetch_count):
    """out[row0:row0+MR, col0:col0+NR] (+)= x[row0:row0+MR, k0:k0+depth] @ b_block[:depth], finished (bias,
    activation `which`, residual) when `finish`; only the valid_rows x valid_cols corner is written.

    x [M, K] C-contiguous rows; b_block [depth, NR] one packed panel's rows k0..; accumulate: add out's sums of
    the earlier depth blocks; tile [2, MR, NR]: the calling thread's own buffers (an array of its own: a view of
    an array the threads share takes its reference count, an atomic add on a header both cores write); every PREFETCH_EVERY steps of k one cache
    line of prefetch_from's flat elements prefetch_start .. + prefetch_count goes to L2 (matmul_numba.py)."""
    last = valid_rows - 1
    rows_of_x = x[row0:row0 + valid_rows, k0:k0 + depth]  # [valid_rows, depth]: the six rows of A, as they lie
    r1 = min(1, last)  # rows past the valid ones read the last valid row
    r2 = min(2, last)
    r3 = min(3, last)
    r4 = min(4, last)
    r5 = min(5, last)
    acc0 = carray(_stack_row(), NR)
    acc1 = carray(_stack_row(), NR)
    acc2 = carray(_stack_row(), NR)
    acc3 = carray(_stack_row(), NR)
    acc4 = carray(_stack_row(), NR)
    acc5 = carray(_stack_row(), NR)
    for j in range(NR):
        acc0[j] = 0.0
        acc1[j] = 0.0
        acc2[j] = 0.0
        acc3[j] = 0.0
        acc4[j] = 0.0
        acc5[j] = 0.0
    # 1. the tile's sums over this depth block: rank-1 updates, 6 broadcasts of A times one row of B
    for k in range(depth):
        if k % PREFETCH_EVERY == 0 and (k // PREFETCH_EVERY) * CACHE_LINE_FLOATS < prefetch_count:
            prefetch_to_l2(prefetch_from, prefetch_start + (k // PREFETCH_EVERY) * CACHE_LINE_FLOATS)
        a0 = rows_of_x[0, k]  # the six rows' A values for this k, broadcast across j
        a1 = rows_of_x[r1, k]
        a2 = rows_of_x[r2, k]
        a3 = rows_of_x[r3, k]
        a4 = rows_of_x[r4, k]
        a5 = rows_of_x[r5, k]
        for j in range(NR):  # contiguous in b_block: 4 zmm loads
            b_kj = b_block[k, j]
            acc0[j] = fma32(a0, b_kj, acc0[j])  # acc0[j] + a0 * b_kj, one rounding
            acc1[j] = fma32(a1, b_kj, acc1[j])
            acc2[j] = fma32(a2, b_kj, acc2[j])
            acc3[j] = fma32(a3, b_kj, acc3[j])
            acc4[j] = fma32(a4, b_kj, acc4[j])
            acc5[j] = fma32(a5, b_kj, acc5[j])
    # 2. into out. A full tile: the earlier blocks' sums and the bias added on the registers, then the residual
    #    there too (no activation), or the tile through the activation, one run of MR * NR floats in the thread's
    #    buffers, into out with the residual. An edge tile: the same, row by row, on its valid corner.
    if valid_rows == MR and valid_cols == NR:
        if accumulate:
            _add_tile(acc0, acc1, acc2, acc3, acc4, acc5, out, row0, col0)
        if finish and has_bias:
            _add_row_to_all(acc0, acc1, acc2, acc3, acc4, acc5, bias, col0)
        if finish and which != NO_ACTIVATION:
            _store_tile(acc0, acc1, acc2, acc3, acc4, acc5, tile[0], 0, 0)
            _activate(tile[0].reshape(MR * NR), tile[1].reshape(MR * NR), which)  # [MR*NR] -> [MR*NR]
            _place_tile(tile[1], out, row0, col0, residual, has_residual)
        else:
            if finish and has_residual:
                _add_tile(acc0, acc1, acc2, acc3, acc4, acc5, residual, row0, col0)
            _store_tile(acc0, acc1, acc2, acc3, acc4, acc5, out, row0, col0)
    else:
        _store_tile(acc0, acc1, acc2, acc3, acc4, acc5, tile[0], 0, 0)
        _finish_rows(tile[0], out, row0, col0, valid_rows, valid_cols, accumulate, finish, bias, has_bias, which,
                     residual, has_residual)


@njit(**SERIAL)
def _activate(x, out, which):
    """out = activation(x) over a run: quick-GELU here (below), the others activations.activation_block. Both the
    full and the edge tiles come through here, so a row's bits do not depend on the tile it falls in."""
    if which == QUICK_GELU:
        _quick_gelu_run(x, out)
    else:
        activation_block(x, out, which)


@njit(**SERIAL)
def _quick_gelu_run(x, out):
    """out[i] = x[i] * sigmoid(1.702 x[i]) (CLIP's quick-GELU), the sigmoid from one power of two: with
    z = 1.702 x, t = e^-|z| = 2^(-|z| log2 e) (vecmath.exp2_nonpositive_f32: fewer operations than exp_f32, whose
    argument reduction it needs no part of here), sigmoid(z) = 1 / (1 + t) for z >= 0, t / (1 + t) below.
    Relative error within ~1e-6 where |z| < 20 (the rounding of -|z| log2 e, times ln 2 |z|), far below float32's
    worth of the output elsewhere."""
    for i in range(x.size):
        value = x[i]
        z = np.float32(QUICK_GELU_ALPHA) * value
        t = exp2_nonpositive_f32(-abs(z) * LOG2E)  # e^-|z|, in (0, 1]
        sigmoid_abs = ONE / (ONE + t)  # sigmoid(|z|)
        out[i] = value * (sigmoid_abs if z >= 0 else t * sigmoid_abs)


@njit(**SERIAL)
def _add_tile(acc0, acc1, acc2, acc3, acc4, acc5, source, row0, col0):
    """acc_r[j] += source[row0 + r, col0 + j]: constant indices into the accumulators (they stay registers)."""
    for j in range(NR):
        acc0[j] += source[row0 + 0, col0 + j]
        acc1[j] += source[row0 + 1, col0 + j]
        acc2[j] += source[row0 + 2, col0 + j]
        acc3[j] += source[row0 + 3, col0 + j]
        acc4[j] += source[row0 + 4, col0 + j]
        acc5[j] += source[row0 + 5, col0 + j]


@njit(**SERIAL)
def _add_row_to_all(acc0, acc1, acc2, acc3, acc4, acc5, row, col0):
    """acc_r[j] += row[col0 + j] for every r (the bias)."""
    for j in range(NR):
        value = row[col0 + j]
        acc0[j] += value
        acc1[j] += value
        acc2[j] += value
        acc3[j] += value
        acc4[j] += value
        acc5[j] += value


@njit(**SERIAL)
def _store_tile(acc0, acc1, acc2, acc3, acc4, acc5, target, row0, col0):
    """target[row0 + r, col0 + j] = acc_r[j], the whole MR x NR tile."""
    for j in range(NR):
        target[row0 + 0, col0 + j] = acc0[j]
        target[row0 + 1, col0 + j] = acc1[j]
        target[row0 + 2, col0 + j] = acc2[j]
        target[row0 + 3, col0 + j] = acc3[j]
        target[row0 + 4, col0 + j] = acc4[j]
        target[row0 + 5, col0 + j] = acc5[j]


@njit(**SERIAL)
def _place_tile(finished, out, row0, col0, residual, has_residual):
    """out[row0 + r, col0 + j] = finished[r, j] (+ residual[row0 + r, col0 + j]), the whole MR x NR tile (indexed,
    not sliced: each view of an array is a reference count taken and dropped, an atomic add on the array's
    header, which the two threads share)."""
    for r in range(MR):
        if has_residual:
            for j in range(NR):
                out[row0 + r, col0 + j] = finished[r, j] + residual[row0 + r, col0 + j]
        else:
            for j in range(NR):
                out[row0 + r, col0 + j] = finished[r, j]


@njit(**SERIAL)
def _finish_rows(tile, out, row0, col0, valid_rows, valid_cols, accumulate, finish, bias, has_bias, which, residual,
                 has_residual):
    """The tile's valid corner from the buffer into out, row by row: + the earlier blocks' sums, and when
    `finish` + bias, the activation (tile -> out), + residual."""
    for r in range(valid_rows):
        sums = tile[r, :valid_cols]  # [valid_cols]
        target = out[row0 + r, col0:col0 + valid_cols]  # [valid_cols]
        if accumulate:
            for j in range(valid_cols):
                sums[j] += target[j]
        if finish and has_bias:
            for j in range(valid_cols):
                sums[j] += bias[col0 + j]
        if finish and which != NO_ACTIVATION:
            _activate(sums, target, which)
        else:
            target[:] = sums
        if finish and has_residual:
            for j in range(valid_cols):
                target[j] += residual[row0 + r, col0 + j]
