"""Attention version 5: one query block against all keys per task, the score tile kept in cache.

For the self- and cross-attention of Stable Diffusion (M up to a few thousand keys, head sizes
40-160) a block of queries times ALL keys is a tile of a few MiB at most, so the running softmax of
version 3 (threaded.py: key chunks, a running max, rescaling the accumulator) is not needed: each
task is a few steps over one tile, and the tile never leaves the caches (L2, L3).
Version 8 (flash.py) computes the same tile with its own micro-kernels instead of BLAS and takes every
call without a mask or is_causal at head sizes up to 80 (__init__.py); this version keeps masks,
is_causal, larger heads and lse_out (the training forward).

  per task = one (batch, head) slice, queries [start, start + Q):
    0. q_block [Q, d] = q[start:start + Q] * scale * log2(e)    (into the worker's buffer)
    1. scores^T [M, Q] = k [M, d] @ q_block^T [d, Q]            (BLAS, into the worker's buffer)
    2. softmax of every column (one query's scores over all keys) in place, not yet divided by
       its sum: max, 2^(s - max), sum (Numba, one fused pass after the max; softmax_keys_in_place)
    3. out [Q, dv] = probs [Q, M] @ v [M, dv], straight into the output (BLAS reads the tile
       transposed)
    4. each row of out times 1 / its sum                           (normalise_rows)
    (lse_out given: 5. each query's log-sum-exp, (max + log2(sum)) * ln 2 (store_log_sum_exp), for the
    training backward's version 4 (backward_stats.py); the default call skips it)

Why transposed (scores^T, keys along rows, queries along columns): measured on one Zen 4 core with
OpenBLAS, k @ q_block^T ([4096,40] @ [40,128]) runs at ~92 GFLOP/s where q_block @ k^T ([128,40] @
[40,4096], the same product) runs at ~60; and the softmax then works down the columns, so its max
and sum are per-lane vector operations (no horizontal reduction per row): 0.5 against 0.63 ns per
score, both with vecmath.exp_f32 (0.23 ns now: 2^x, and the running max/sum interleaved, below).
For the second product, v^T @ probs^T (then a transposed store, store_normalised_transposed) and
probs @ v (straight into the output) were measured. On the Zen 4, 2 workers: at M = 4096 within
noise of each other (148 and 145 GFLOP/s at [2,8,4096,40]); at M <= 1024 the direct one faster (M =
1024, d = 80: 159 vs 148; M = 77, d = 80: 111 vs 81). On the Intel Xeon of the SDXL measurements
(one worker, thread CPU time, best of 8 alternated, three runs) the direct one is faster at every
size too: [1,4,4096,4096,64] 93.6-96.3 -> 98.0-99.4 GFLOP/s per core, [1,4,4096,4096,40] 77.1-79.3
-> 81.8-81.9, [1,4,2048,2048,64] 87.9-89.2 -> 93.2-96.8; so it is the only one now (the bf16
version 6, amx.py, still stores its transposed product with store_normalised_transposed).

Why 2^x: q is multiplied once by scale * log2(e), so the scores come out in log2 units and the
exponential is 2^(s - max) (vecmath.exp2_nonpositive_f32): no ln 2 reduction per score, and no
overflow side, since s - max <= 0.

Q (query_block) is chosen from M so that the tile holds about TILE_FLOATS scores (256 queries at
M = 4096, 512 for M <= 2048). Measured at [2,8,4096,40] on 2 workers: Q = 64, 128, 192, 256, 384
gave 146, 151, 152, 157, 150 GFLOP/s (larger Q: k and v are packed by BLAS once per Q queries;
the 4 MiB tile is in L3, not L2, but the passes over it are not what limits). Each worker
thread keeps its tile, query and sum buffers between calls (kernels/scratch.py), so no array is allocated
per task. Above FUSED_MAX_KEYS keys even MIN_QUERY_BLOCK queries would not fit: those shapes take
version 3 (npdiff/kernels/attention/__init__.py decides).

Where the time goes at [2,8,4096,40] (one Zen 4 core, Q = 256, the steps timed apart, before step 3 was
always direct): the first GEMM
94 GFLOP/s (43% of the time), the softmax pass 0.24 ns per score (12%), the second GEMM 89 GFLOP/s
(45%): 80 GFLOP/s per core against OpenBLAS's ~100 on large square GEMMs. The GEMMs with K or N =
d = 40 are what limits, and BLAS packs each operand per call (k and v once per Q queries, the
probabilities once). Tried and slower: cutting a task's keys into L2-sized chunks (GEMM, max,
then exp and the second GEMM per chunk: 135-146 against 150 GFLOP/s on 2 workers).

Strided inputs (the heads of transformer.split_heads: [B,h,N,d] views of [B,N,h*d]): q is read
in place, each block's queries once, scaled into the worker's buffer (step 0); k and v are made
contiguous once (read strided, BLAS would pack their scattered rows again for every block: measured
slower), into buffers reused from call to call (kernels/scratch.py: no mmap/munmap per call); the
output is allocated in q's memory order, so merge_heads finds it token-major and copies nothing. Measured in the UNet's call pattern (split_heads -> attention -> merge_heads, load
average ~2.3): cross-attention [2,8,4096,77,40] 21.5 -> 15.4 ms, [2,8,1024,77,80] 11.3 -> 7.9 ms;
self-attention [2,8,4096,4096,40] within noise (three copies of q/out saved, strided q and output
cost about as much).

Every block's arithmetic depends only on its own rows, never on which worker runs it or how many
there are: the same bytes on 1 or 2 threads. Masks, is_causal and queries that may attend to no key
(-> 0) behave as in every other version (__init__.py). With is_causal, a block reads only the keys
up to its last query.
"""

import math

import numpy as np

from npdiff.jit import FASTMATH_CONTRACT, SERIAL, njit
from npdiff.kernels.attention.common import causal_additive, default_scale
from npdiff.kernels.block_pool import run_blocks
from npdiff.kernels.scratch import contiguous_in_scratch, scratch
from npdiff.kernels.vecmath import LN2_64, LOG2E, exp2_nonpositive_f32

TILE_FLOATS = 1 << 20  # scores per task's tile: 4 MiB (Q x M)
MIN_QUERY_BLOCK = 32
MAX_QUERY_BLOCK = 512
FUSED_MAX_KEYS = TILE_FLOATS // MIN_QUERY_BLOCK  # 32768: more keys -> version 3's key chunks
ALIGN = 16  # query blocks are a multiple of one zmm vector of float32
KEY_INTERLEAVE = 4  # running max/sum rows of softmax_keys_in_place (combined there as 4)


def fused_query_block(n_keys):
    """Queries per task for M = n_keys keys: about TILE_FLOATS scores, a multiple of ALIGN."""
    fitting = TILE_FLOATS // max(1, n_keys) // ALIGN * ALIGN
    return min(MAX_QUERY_BLOCK, max(MIN_QUERY_BLOCK, fitting))


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def column_maxima(scores_t, n_keys):
    """[Q] the maxima of the columns of scores_t[:n_keys] ([M, Q], keys along rows), -inf for a column
    that is all -inf; NaN is skipped. Key r folds into row r % KEY_INTERLEAVE of a [4, Q] buffer, the
    rows combined at the end (see softmax_keys_in_place)."""
    cols = scores_t.shape[1]
    partial = np.full((KEY_INTERLEAVE, cols), -np.inf, np.float32)  # [4,Q]
    for r in range(n_keys):
        lane = r % KEY_INTERLEAVE
        for c in range(cols):
            x = scores_t[r, c]
            partial[lane, c] = x if x > partial[lane, c] else partial[lane, c]
    col_max = np.empty(cols, np.float32)  # [Q]
    for c in range(cols):
        m01 = partial[0, c] if partial[0, c] > partial[1, c] else partial[1, c]
        m23 = partial[2, c] if partial[2, c] > partial[3, c] else partial[3, c]
        col_max[c] = m01 if m01 > m23 else m23
    return col_max


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def softmax_keys_in_place(scores_t, col_sum):
    """scores_t [M, Q] (log2 units, contiguous) -> 2^(s - column max) in place; col_sum [Q] = the
    column sums (the softmax is not yet divided by them). A column that is all -inf (a query that
    may attend to no key) gets max 0, so its entries are 2^-inf = 0 and its sum 0. NaN stays NaN.
    Returns the column maxima [Q] it subtracted (what the log-sum-exp needs: store_log_sum_exp).

    The running max and sum of a column live in memory; with one row of them, every key would wait
    for the previous key's store of the same entry (measured at Q = 128: 0.15 + 0.25 ns per score).
    So key r updates row r % KEY_INTERLEAVE of `partial`, and the rows are combined at the end
    (0.05 + 0.17 ns per score)."""
    n_keys, cols = scores_t.shape
    # 1. column maxima (NaN skipped: it stays NaN through step 2)
    col_max = column_maxima(scores_t, n_keys)  # [Q]
    for c in range(cols):
        col_max[c] = col_max[c] if col_max[c] != -np.inf else np.float32(0.0)
    # 2. 2^(s - max) in place and the column sums, in one pass
    partial = np.zeros((KEY_INTERLEAVE, cols), np.float32)  # [4,Q] sums
    for r in range(n_keys):
        lane = r % KEY_INTERLEAVE
        for c in range(cols):
            e = exp2_nonpositive_f32(scores_t[r, c] - col_max[c])
            scores_t[r, c] = e
            partial[lane, c] += e
    for c in range(cols):
        col_sum[c] = (partial[0, c] + partial[1, c]) + (partial[2, c] + partial[3, c])
    return col_max


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def store_log_sum_exp(col_max, col_sum, lse_block):
    """lse_block [Q] = log of each query's sum of exp(scale * q.k), natural log (torch's lse): the
    scores were in log2 units, so lse = (max + log2(sum)) * ln 2; -inf for a query that sees no key."""
    for c in range(col_max.shape[0]):
        lse_block[c] = (col_max[c] + np.log2(col_sum[c])) * np.float32(LN2_64)


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def normalise_rows(out_block, col_sum):
    """out_block [Q, dv] row i times 1 / col_sum[i] in place (0 where the sum is 0)."""
    rows, value_dim = out_block.shape
    for i in range(rows):
        total = col_sum[i]
        inverse = np.float32(1.0) / total if total != 0 else np.float32(0.0)
        for c in range(value_dim):
            out_block[i, c] *= inverse


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def store_normalised_transposed(out_t, col_sum, out_block):
    """out_block [Q, dv] = out_t [dv, Q] transposed, row i times 1 / col_sum[i] (0 where the sum is
    0: a query that attends to no key gives 0, as torch)."""
    value_dim, cols = out_t.shape
    for i in range(cols):
        total = col_sum[i]
        inverse = np.float32(1.0) / total if total != 0 else np.float32(0.0)
        for c in range(value_dim):
            out_block[i, c] = out_t[c, i] * inverse


def attention_fused(q, k, v, mask=None, scale=None, is_causal=False, query_block=None, lse_out=None):
    """q [..., N, d], k [..., M, d], v [..., M, dv] NumPy float32; mask bool (True = attend) or
    additive float, broadcastable to [..., N, M]. query_block: queries per task (default from M,
    fused_query_block). lse_out: None, or a float32 array [..., N] that receives each query's
    log-sum-exp (natural log of the sum over keys of exp(scaled score + mask), as torch's flash
    attention returns it; what the training backward's version 4 takes). Returns [..., N, dv]."""
    lead = q.shape[:-2]
    n_queries, n_keys, value_dim = q.shape[-2], k.shape[-2], v.shape[-1]
    query_block = query_block or fused_query_block(n_keys)
    log2_scale = np.float32(default_scale(q, scale) * float(LOG2E))
    if mask is not None:
        mask = np.broadcast_to(mask, lead + (n_queries, n_keys))  # a view [...,N,M], nothing copied
    # q is read in place, whatever its strides (the heads of split_heads are views [B,h,N,d] of
    # [B,N,h*d]: each slice is [N,d] with rows h*d apart, which BLAS reads as is); each block's
    # queries are read once. k and v, read once per block, are made contiguous once.
    # The output takes q's memory order, so merge_heads finds it already token-major.
    k = contiguous_in_scratch(k, "fused_k")  # [...,M,d], reused buffer when strided
    v = contiguous_in_scratch(v, "fused_v")  # [...,M,dv]
    out = np.empty_like(q, np.float32, shape=lead + (n_queries, value_dim))  # [...,N,dv]
    slices = [np.unravel_index(s, lead) for s in range(math.prod(lead))]  # index of each [N,d] slice

    def run_block(block):
        slice_index, query_start = block
        at = slices[slice_index]
        query_stop = min(query_start + query_block, n_queries)
        rows = query_stop - query_start
        # causal: keys after the block's last query are masked for every query in it
        visible = min(n_keys, query_stop) if is_causal else n_keys
        scores_t = scratch("scores_t", (visible, rows))  # [m,Q]
        col_sum = scratch("col_sum", (rows,))  # [Q]
        q_block = scratch("q_block", (rows, q.shape[-1]))  # [Q,d]
        keys, values = k[at][:visible], v[at][:visible]  # [m,d], [m,dv] views
        # 1. scores^T, in log2 units (q_block^T is a view: BLAS reads it transposed)
        np.multiply(q[at][query_start:query_stop], log2_scale, out=q_block)  # [Q,d]
        np.matmul(keys, q_block.T, out=scores_t)  # [m,d] @ [d,Q] -> [m,Q]
        if mask is not None:
            tile = mask[at][query_start:query_stop, :visible].T  # [m,Q]
            if tile.dtype == bool:
                scores_t[~tile] = -np.inf
            else:
                scores_t += tile * LOG2E
        if is_causal:
            scores_t += causal_additive(query_start, query_stop, 0, visible).T  # [Q,m] -> [m,Q]
        # 2. unnormalised probabilities in place, column sums (Numba, nogil)
        col_max = softmax_keys_in_place(scores_t, col_sum)  # [Q]
        if lse_out is not None:
            store_log_sum_exp(col_max, col_sum, lse_out[at][query_start:query_stop])
        out_block = out[at][query_start:query_stop]  # [Q,dv] view
        # 3. probs @ v straight into the output (probs^T's transpose is a view BLAS reads as is)
        np.matmul(scores_t.T, values, out=out_block)  # [Q,m] @ [m,dv] -> [Q,dv]
        # 4. rows divided by the sums
        normalise_rows(out_block, col_sum)

    blocks = [(s, start) for s in range(len(slices)) for start in range(0, n_queries, query_block)]
    run_blocks(run_block, blocks)
    return out
