"""Attention version 8: both products on register-blocked Numba micro-kernels, queries along the lanes.

Version 5 (fused.py) gives its two products to BLAS. At Stable Diffusion's head sizes they are skinny
(k [M, 40] @ q^T [40, Q]: K = 40; probs [Q, M] @ v [M, 40]: N = 40, which does not fill 16-lane
vectors evenly), BLAS packs every operand again per call, and the score tile makes three passes
through the caches: measured ~77-82 GFLOP/s per core at [*,*,4096,4096,40] against sgemm's ~150.
Here the two products are written as micro-kernels shaped for attention, the way matmul_numba.py's
6 x 64 kernel is written (accumulators in stack rows that LLVM keeps in zmm registers), with the
64 queries of a block along the vector lanes (4 zmm of 16 float32) in both:

  per block of LANES = 64 queries of one (batch, head) slice:
    1. q_t [d, 64] = (q_block * scale * log2(e))^T             (_pack_queries; zero past the last query)
    2. scores^T [M, 64] = k @ q_t, 6 keys x 64 queries per register tile (24 zmm): each step of d
       broadcasts 6 key values and loads 4 vectors of q_t for 24 FMAs; the tile's column maxima are
       taken in registers before it is stored (the max fused into the first product)   (_score_tile)
    3. per chunk of KEY_CHUNK keys (the chunk stays in L1 from its exp to its product):
       a. p = 2^(s - column max) in place, column sums      (_exp_columns: vecmath's exp2, per lane)
       b. out^T [dv, 64] += v_chunk^T @ p_chunk, 5 value columns x 64 queries per register tile
          (20 zmm): each key broadcasts 5 values of v and loads 4 vectors of p for 20 FMAs
                                                                                      (_value_tile)
    4. out [64, dv] = out^T transposed, each row divided by its sum   (fused.store_normalised_transposed)

Why queries along the lanes: the lanes then never depend on d (40, 80 and 160 are not multiples of a
64-float tile, 64 queries always are, the last block padded with zeros), the column max and sum of a
query are per-lane operations (no horizontal reduction), and both products keep the long operand
(scores, probabilities) as the vector stream while the short one (keys, values: rows of 40 floats)
is broadcast. Why 5 value columns: 40, 80 and 160 are multiples of 5 (a 6-row tile would leave 2 of
its 42 rows idle at d = 40; measured: the same speed as 5 rows at d = 40, 64 and 80, within noise); columns
past dv repeat the last one and are not stored.

Where the time goes on one core of the 2-core Xeon at [4096 queries, 4096 keys, d = 40] (thread CPU
time, each step alone over the slice; benchmarks/attention_flash.py, load 2.0): step 2 at 116-135
GFLOP/s (its epilogue, the max and the stores of 24 vectors, weighs on a depth of only 40), step 3a
0.15 ns per score, step 3b 123-129 GFLOP/s (KEY_CHUNK = 32, 64, 128, 256: 113, 125-129, 127-129, 113;
its probabilities read from L2 in one sweep of all M keys: 105-114); the whole 101-117 GFLOP/s per
core against version 5's 74-75 (its BLAS products 101 and 92, its softmax pass 0.41 ns per score)
and OpenBLAS's 150 on a 2048^3 sgemm. Tried and no faster: a running ("online") max per chunk of
KEY_CHUNK keys, so the scores never leave L1 (no M x 64 tile; the sums rescaled when the max rises):
112-113 against 114-117 GFLOP/s, one thread, in the same process.

Numerics: every product is an explicit fma32 (one rounding, no reliance on fastmath's 'contract'), in
the order of the loops: the bits do not depend on how LLVM chose to contract, so a kernel Numba
compiled fresh and one it loaded from its disk cache give the same bytes (tests/kernels/
test_attention_flash.py runs both in subprocesses). Each chunk's products and sums start from 0 and
are added to the running ones at the chunk's end (sums of KEY_CHUNK terms, then of M / KEY_CHUNK),
not one running sum of all M terms. A block's arithmetic depends only on its own queries, never on
the worker that runs it or how many there are: the same bytes on 1 or 2 threads.

Strided inputs (the heads of split_heads): q is read in place when its block is packed (step 1) and
the output written through its strides; k and v are made contiguous once per call (kernels/scratch.py),
as in version 5: read strided in steps 2 and 3b they made [2,8,4096,4096,40] 320 -> 372 ms and
[2,8,4096,77,40] 12.6 -> 15.1 ms (same bytes; loaded machine, one run).

No mask and no is_causal: the dispatch (__init__.py) sends those to version 5. The attention of
Stable Diffusion's UNet has neither.
"""

import math

import numpy as np
from numba import carray

from npdiff.intrinsics import fma32
from npdiff.jit import FASTMATH_CONTRACT, SERIAL, njit
from npdiff.kernels.attention.common import default_scale
from npdiff.kernels.attention.fused import store_normalised_transposed
from npdiff.kernels.block_pool import run_blocks, worker_count
from npdiff.kernels.matmul_numba import NR, _stack_row
from npdiff.kernels.scratch import contiguous_in_scratch, scratch
from npdiff.kernels.vecmath import LOG2E, exp2_nonpositive_f32

LANES = NR  # queries per block: 4 zmm vectors of 16 float32 (a stack row of matmul_numba's NR floats)
KEY_ROWS = 6  # keys per register tile of the first product: 6 x 64 scores in 24 zmm
VALUE_ROWS = 5  # value columns per register tile of the second product: 5 x 64 sums in 20 zmm
KEY_CHUNK = 64  # keys per step of 3a-3b: the chunk's probabilities, 16 KiB, stay in L1
# Head sizes it is dispatched for (__init__.py): measured faster than version 5 at d = 40, 64, 80 (2 workers,
# [2,8,N,M,d] with M = 77-4096: 0.75-0.98x its time); even at d = 160 ([2,8,256,256,160]: 1.02x), whose
# q_t [160, 64] (40 KiB) no longer leaves room in L1.
FLASH_MAX_HEAD_DIM = 80
BLOCKS_PER_WORKER = 16  # tasks of the pool per worker, at least (fewer blocks of 64: one block each)


def round_up(n, multiple):
    return -(-n // multiple) * multiple


@njit(**SERIAL)
def _pack_queries(q, query0, rows, log2_scale, q_t):
    """Step 1: q_t [d, 64] = (q[query0:query0 + rows] * log2_scale)^T, zero past rows. q any strides."""
    for c in range(q.shape[1]):
        for j in range(rows):
            q_t[c, j] = q[query0 + j, c] * log2_scale
        for j in range(rows, LANES):
            q_t[c, j] = 0.0


@njit(**SERIAL)
def _score_tile(keys, key0, q_t, scores_t, col_max):
    """Step 2 for keys key0..key0+5: scores_t[key0:key0 + 6] = keys[key0:key0 + 6] @ q_t
    ([6, d] @ [d, 64]), and col_max [64] raised to the tile's column maxima (NaN skipped). Keys past
    the end repeat the last key: their rows of scores_t (which has rows up to a multiple of 6) are
    never read."""
    last = keys.shape[0] - 1
    acc0 = carray(_stack_row(), LANES)  # [64] each: six rows of the tile, held in registers
    acc1 = carray(_stack_row(), LANES)
    acc2 = carray(_stack_row(), LANES)
    acc3 = carray(_stack_row(), LANES)
    acc4 = carray(_stack_row(), LANES)
    acc5 = carray(_stack_row(), LANES)
    for j in range(LANES):
        acc0[j] = 0.0
        acc1[j] = 0.0
        acc2[j] = 0.0
        acc3[j] = 0.0
        acc4[j] = 0.0
        acc5[j] = 0.0
    row1 = min(key0 + 1, last)
    row2 = min(key0 + 2, last)
    row3 = min(key0 + 3, last)
    row4 = min(key0 + 4, last)
    row5 = min(key0 + 5, last)
    for c in range(keys.shape[1]):
        k0 = keys[key0, c]  # the six keys' values at c, broadcast across the lanes
        k1 = keys[row1, c]
        k2 = keys[row2, c]
        k3 = keys[row3, c]
        k4 = keys[row4, c]
        k5 = keys[row5, c]
        for j in range(LANES):  # contiguous in q_t: 4 zmm loads
            x = q_t[c, j]
            acc0[j] = fma32(k0, x, acc0[j])
            acc1[j] = fma32(k1, x, acc1[j])
            acc2[j] = fma32(k2, x, acc2[j])
            acc3[j] = fma32(k3, x, acc3[j])
            acc4[j] = fma32(k4, x, acc4[j])
            acc5[j] = fma32(k5, x, acc5[j])
    for j in range(LANES):
        top01 = acc0[j] if acc0[j] > acc1[j] else acc1[j]
        top23 = acc2[j] if acc2[j] > acc3[j] else acc3[j]
        top45 = acc4[j] if acc4[j] > acc5[j] else acc5[j]
        top = top01 if top01 > top23 else top23
        top = top if top > top45 else top45
        col_max[j] = top if top > col_max[j] else col_max[j]
    for j in range(LANES):
        scores_t[key0, j] = acc0[j]
        scores_t[key0 + 1, j] = acc1[j]
        scores_t[key0 + 2, j] = acc2[j]
        scores_t[key0 + 3, j] = acc3[j]
        scores_t[key0 + 4, j] = acc4[j]
        scores_t[key0 + 5, j] = acc5[j]


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def _exp_columns(scores_t, col_max, col_sum):
    """Step 3a for one chunk: scores_t [m, 64] (log2 units) -> 2^(s - column max) in place; col_sum
    [64] += their column sums (the chunk's sum first, from 0). A column max of -inf counts as 0."""
    top = carray(_stack_row(), LANES)  # [64]
    total = carray(_stack_row(), LANES)  # [64]
    for j in range(LANES):
        top[j] = col_max[j] if col_max[j] != -np.inf else np.float32(0.0)
        total[j] = 0.0
    for r in range(scores_t.shape[0]):
        for j in range(LANES):
            e = exp2_nonpositive_f32(scores_t[r, j] - top[j])
            scores_t[r, j] = e
            total[j] += e
    for j in range(LANES):
        col_sum[j] += total[j]


@njit(**SERIAL)
def _value_tile(values, col0, probs_t, out_t):
    """Step 3b for one chunk of m keys and value columns col0..col0+4: out_t[col0:col0 + 5] +=
    values[:, col0:col0 + 5]^T @ probs_t ([5, m] @ [m, 64]), the chunk's sums from 0. Columns past dv
    repeat the last one (out_t has rows up to a multiple of 5; those are never read). The chunk comes
    as views from 0 (an index from 0 needs no negative-index wraparound code in the loop)."""
    last = values.shape[1] - 1
    acc0 = carray(_stack_row(), LANES)  # [64] each: five rows of out^T, held in registers
    acc1 = carray(_stack_row(), LANES)
    acc2 = carray(_stack_row(), LANES)
    acc3 = carray(_stack_row(), LANES)
    acc4 = carray(_stack_row(), LANES)
    for j in range(LANES):
        acc0[j] = 0.0
        acc1[j] = 0.0
        acc2[j] = 0.0
        acc3[j] = 0.0
        acc4[j] = 0.0
    col1 = min(col0 + 1, last)
    col2 = min(col0 + 2, last)
    col3 = min(col0 + 3, last)
    col4 = min(col0 + 4, last)
    for m in range(probs_t.shape[0]):
        v0 = values[m, col0]  # the five columns' values of key m, broadcast across the lanes
        v1 = values[m, col1]
        v2 = values[m, col2]
        v3 = values[m, col3]
        v4 = values[m, col4]
        for j in range(LANES):  # contiguous in probs_t: 4 zmm loads
            p = probs_t[m, j]
            acc0[j] = fma32(v0, p, acc0[j])
            acc1[j] = fma32(v1, p, acc1[j])
            acc2[j] = fma32(v2, p, acc2[j])
            acc3[j] = fma32(v3, p, acc3[j])
            acc4[j] = fma32(v4, p, acc4[j])
    for j in range(LANES):
        out_t[col0, j] += acc0[j]
        out_t[col0 + 1, j] += acc1[j]
        out_t[col0 + 2, j] += acc2[j]
        out_t[col0 + 3, j] += acc3[j]
        out_t[col0 + 4, j] += acc4[j]


@njit(**SERIAL)
def attend_query_range(q, keys, values, log2_scale, query_start, query_stop, out, q_t, scores_t, out_t,
                       col_max, col_sum):
    """out[query_start:query_stop] of one (batch, head) slice, 64 queries at a time (steps 1-4).

    q [N, d] and out [N, dv] any strides (the heads of split_heads); keys [M, d], values [M, dv]
    contiguous. Buffers: q_t [d, 64], scores_t [M rounded up to 6, 64], out_t [dv rounded up to 5,
    64], col_max and col_sum [64]."""
    n_keys, value_dim = keys.shape[0], values.shape[1]
    for query0 in range(query_start, query_stop, LANES):
        rows = min(LANES, query_stop - query0)
        # 1. the block's queries in log2 units, transposed
        _pack_queries(q, query0, rows, log2_scale, q_t)  # [64,d] -> [d,64]
        # 2. scores^T and their column maxima
        for j in range(LANES):
            col_max[j] = -np.inf
        for key0 in range(0, n_keys, KEY_ROWS):
            _score_tile(keys, key0, q_t, scores_t, col_max)  # [6,d] @ [d,64] -> [6,64]
        # 3. per chunk of keys: probabilities in place, column sums, out^T += v_chunk^T @ p_chunk
        col_sum[:] = 0.0
        out_t[:] = 0.0
        for key0 in range(0, n_keys, KEY_CHUNK):
            probs_t = scores_t[key0:min(key0 + KEY_CHUNK, n_keys)]  # [m,64] view
            values_chunk = values[key0:key0 + probs_t.shape[0]]  # [m,dv] view
            _exp_columns(probs_t, col_max, col_sum)
            for col0 in range(0, value_dim, VALUE_ROWS):
                _value_tile(values_chunk, col0, probs_t, out_t)  # [5,m] @ [m,64] -> [5,64]
        # 4. out^T transposed into the output rows, each divided by its sum
        store_normalised_transposed(out_t[:value_dim, :rows], col_sum[:rows], out[query0:query0 + rows])


def flash_queries_per_task(n_slices, n_queries, workers):
    """Queries per task of the pool: a multiple of LANES, at least BLOCKS_PER_WORKER tasks per worker
    where there are that many blocks of 64 (the Python per task, ~20 us, stays under 1% at SD's sizes)."""
    blocks = n_slices * -(-n_queries // LANES)
    return LANES * max(1, blocks // (BLOCKS_PER_WORKER * workers))


def attention_flash(q, k, v, scale=None):
    """q [..., N, d], k [..., M, d], v [..., M, dv] NumPy float32 (any strides), M >= 1, no mask.
    Returns [..., N, dv] in q's memory order (merge_heads then copies nothing)."""
    lead = q.shape[:-2]
    n_queries, n_keys, value_dim = q.shape[-2], k.shape[-2], v.shape[-1]
    log2_scale = np.float32(default_scale(q, scale) * float(LOG2E))
    k = contiguous_in_scratch(k, "flash_k")  # [...,M,d]: strided heads copied once, into a reused buffer
    v = contiguous_in_scratch(v, "flash_v")  # [...,M,dv]
    out = np.empty_like(q, np.float32, shape=lead + (n_queries, value_dim))  # [...,N,dv]
    slices = [np.unravel_index(s, lead) for s in range(math.prod(lead))]  # index of each [N,d] slice
    per_task = flash_queries_per_task(len(slices), n_queries, worker_count())

    def run_task(task):
        slice_index, query_start = task
        at = slices[slice_index]
        q_t = scratch("flash_q_t", (q.shape[-1], LANES))  # [d,64]
        scores_t = scratch("flash_scores_t", (round_up(n_keys, KEY_ROWS), LANES))  # [M6,64]
        out_t = scratch("flash_out_t", (round_up(value_dim, VALUE_ROWS), LANES))  # [dv5,64]
        col_max = scratch("flash_col_max", (LANES,))  # [64]
        col_sum = scratch("flash_col_sum", (LANES,))  # [64]
        attend_query_range(q[at], k[at], v[at], log2_scale, query_start, min(query_start + per_task, n_queries),
                           out[at], q_t, scores_t, out_t, col_max, col_sum)

    tasks = [(s, start) for s in range(len(slices)) for start in range(0, n_queries, per_task)]
    run_blocks(run_task, tasks)
    return out
