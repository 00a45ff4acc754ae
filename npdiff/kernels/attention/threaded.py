"""Attention versions 3 and 4: NumPy arrays, blocks of work on the block-parallel pool.

Both run their blocks on npdiff/kernels/block_pool.py's workers, one block per core at a time, each
block's GEMMs single-threaded on its core (OpenBLAS's own threads left spinning would slow the Numba
kernels that follow), and the element-wise work in Numba (nogil).

  3. attention_blocked  version 2's arithmetic (reference.py: attention_chunked_ref), made fast:
       * work is cut into blocks of query_block queries of one (batch, head) slice, one task each;
       * inside a block, keys are visited in chunks of key_chunk; the score tile
         [query_block, key_chunk] stays in the core's L2 cache between the GEMM that writes it
         (q_block @ k_chunk^T), the Numba pass that turns it into probabilities, and the GEMM that
         reads it (probs @ v_chunk). Memory: one tile and one [query_block, dv] accumulator per
         worker, whatever N and M are;
       * the Numba pass (online_softmax_update) fuses: new running max, exp(s - max) in place
         (vectorised exp of vecmath.py), row sums, and the rescaling exp(old_max - new_max) of
         the running sum and of the accumulator rows;
       * with is_causal, key chunks that lie wholly above the diagonal for a block are skipped.
     With one block of all N queries and one chunk of all M keys, the running softmax is a plain
     softmax: that is how the "full" path runs slices too big for version 4 when they have more
     keys than version 5 (fused.py) takes. Up to that, both paths run version 5, which is faster
     at every shape of Stable Diffusion (benchmarks/sd15_kernels.py keeps a row of this version).
  4. attention_batched  many small slices (CLIP's 77x77, the shipped model's 64x77): the slices
     in a few groups, two tasks per worker; per group one batched matmul for the scores (NumPy
     loops over the slices in C, not Python), a serial Numba softmax over all its rows
     (softmax.py: softmax_rows_block), one batched matmul with v. For 512 slices of 64x77 the
     Python work per slice of version 3 costs more than the arithmetic.
Queries that may attend to no key give 0 (as torch's scaled_dot_product_attention).
"""

import numpy as np

from npdiff.jit import SERIAL, njit
from npdiff.kernels.attention.common import (
    KEY_CHUNK,
    QUERY_BLOCK,
    causal_additive,
    default_scale,
    mask_to_additive,
)
from npdiff.kernels.block_pool import run_blocks, worker_count
from npdiff.kernels.lane_sums import sum_f64
from npdiff.kernels.scratch import contiguous_in_scratch
from npdiff.kernels.softmax import exp_in_place, row_maxima, softmax_rows_block
from npdiff.kernels.vecmath import exp_f32


# ---------------------------------------------------------------------------------------------
# 3. Query blocks x key chunks, running softmax
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)  # no fastmath flag: the same bits in every compiled copy (lane_sums.py)
def online_softmax_update(scores, chunk_max, running_max, running_sum, acc):
    """One key chunk of the running softmax, for every query row of a block.

    scores [Q, m] (this chunk's scaled, masked scores, contiguous) is overwritten with
    exp(scores - new_max); chunk_max [Q] is its row max (row_maxima); running_max, running_sum [Q]
    and acc [Q, dv] are rescaled to the new max. Rows whose scores are all -inf so far keep
    running_max = -inf and contribute zeros (their shift is 0, so exp(-inf - 0) = 0, not NaN).
    """
    # 1. new max per row; subtract it
    new_max = np.empty_like(running_max)
    for i in range(scores.shape[0]):
        new_max[i] = max(running_max[i], chunk_max[i])
        shift = new_max[i] if new_max[i] != -np.inf else np.float32(0.0)
        for j in range(scores.shape[1]):
            scores[i, j] -= shift
    # 2. exp of the whole tile as one flat run
    exp_in_place(scores.reshape(-1))
    # 3. row sums; rescale the running sum and the accumulator rows to the new max
    for i in range(scores.shape[0]):
        total = sum_f64(scores[i])  # float64, fixed order
        shift = new_max[i] if new_max[i] != -np.inf else np.float32(0.0)
        correction = exp_f32(running_max[i] - shift)  # 0 when running_max was -inf
        running_sum[i] = running_sum[i] * correction + total
        for c in range(acc.shape[1]):
            acc[i, c] *= correction
        running_max[i] = new_max[i]


def attention_blocked(q, k, v, mask=None, scale=None, is_causal=False, key_chunk=KEY_CHUNK,
                      query_block=QUERY_BLOCK):
    """q [..., N, d], k [..., M, d], v [..., M, dv] NumPy float32; mask bool (True = attend) or
    additive float, broadcastable to [..., N, M]. Returns [..., N, dv]."""
    lead = q.shape[:-2]
    n_queries, n_keys, value_dim = q.shape[-2], k.shape[-2], v.shape[-1]
    q_scaled = (q * np.float32(default_scale(q, scale))).reshape(-1, n_queries, q.shape[-1])  # [L,N,d]
    keys = np.ascontiguousarray(k).reshape(-1, n_keys, k.shape[-1])  # [L,M,d]
    values = np.ascontiguousarray(v).reshape(-1, n_keys, value_dim)  # [L,M,dv]
    if mask is not None:
        mask = np.broadcast_to(mask, lead + (n_queries, n_keys))  # a view [...,N,M], nothing copied
    out = np.empty((q_scaled.shape[0], n_queries, value_dim), np.float32)  # [L,N,dv]

    def run_block(block):
        slice_index, query_start = block
        query_stop = min(query_start + query_block, n_queries)
        rows = query_stop - query_start
        q_block = q_scaled[slice_index, query_start:query_stop]  # [Q,d]
        running_max = np.full(rows, -np.inf, np.float32)  # [Q]
        running_sum = np.zeros(rows, np.float32)  # [Q]
        acc = np.zeros((rows, value_dim), np.float32)  # [Q,dv]
        slice_mask = None if mask is None else mask[np.unravel_index(slice_index, lead)]  # [N,M] view
        for key_start in range(0, n_keys, key_chunk):
            if is_causal and key_start > query_stop - 1:
                break  # this chunk and all after it lie above the diagonal for every query here
            key_stop = min(key_start + key_chunk, n_keys)
            # 1. scores of the tile (k_chunk^T is a view: BLAS reads it transposed, no copy)
            scores = q_block @ keys[slice_index, key_start:key_stop].T  # [Q,d] @ [d,m] -> [Q,m]
            if slice_mask is not None:
                tile = slice_mask[query_start:query_stop, key_start:key_stop]  # [Q,m]
                if tile.dtype == bool:
                    scores[~tile] = -np.inf
                else:
                    scores += tile
            if is_causal:
                scores += causal_additive(query_start, query_stop, key_start, key_stop)  # [Q,m]
            # 2. probabilities in place, running max/sum and accumulator rescaled (Numba, nogil)
            online_softmax_update(scores, row_maxima(scores), running_max, running_sum, acc)
            # 3. add this chunk's values
            acc += scores @ values[slice_index, key_start:key_stop]  # [Q,m] @ [m,dv] -> [Q,dv]
        safe_sum = np.where(running_sum == 0, np.float32(1.0), running_sum)  # [Q]; masked rows: acc = 0
        out[slice_index, query_start:query_stop] = acc / safe_sum[:, None]  # [Q,dv]

    blocks = [(s, start) for s in range(q_scaled.shape[0]) for start in range(0, n_queries, query_block)]
    run_blocks(run_block, blocks)
    return out.reshape(lead + (n_queries, value_dim))  # [L,N,dv] -> [...,N,dv]


# ---------------------------------------------------------------------------------------------
# 4. Groups of small slices, batched matmuls
# ---------------------------------------------------------------------------------------------
def attention_batched(q, k, v, mask=None, scale=None, is_causal=False):
    """q [..., N, d], k [..., M, d], v [..., M, dv] NumPy float32, many small (batch, head) slices:
    a few groups of slices, each group done at once. Returns [..., N, dv]."""
    scale = default_scale(q, scale)
    lead, n_queries, n_keys = q.shape[:-2], q.shape[-2], k.shape[-2]
    # strided inputs (the heads of transformer.split_heads) are copied into reused buffers: a fresh
    # copy per call, mmap'd and unmapped, made this version 3x slower on CLIP's [2,12,77,64]
    queries = contiguous_in_scratch(q, "batched_q").reshape(-1, n_queries, q.shape[-1])  # [L,N,d]
    keys = contiguous_in_scratch(k, "batched_k").reshape(-1, n_keys, k.shape[-1])  # [L,M,d]
    values = contiguous_in_scratch(v, "batched_v").reshape(-1, n_keys, v.shape[-1])  # [L,M,dv]
    additive = None  # [L,N,M] or [N,M]: mask and causal mask as numbers to add to the scores
    if mask is not None:
        additive = mask_to_additive(np.broadcast_to(mask, lead + (n_queries, n_keys)))
        additive = additive.reshape(-1, n_queries, n_keys)  # [...,N,M] -> [L,N,M]
    if is_causal:
        causal = causal_additive(0, n_queries, 0, n_keys)  # [N,M]
        additive = causal if additive is None else additive + causal
    out = np.empty((queries.shape[0], n_queries, values.shape[-1]), np.float32)  # [L,N,dv]

    def run_group(bounds):
        first, stop = bounds
        # 1. the group's scores in one batched matmul (+ mask, + causal mask)
        scores = np.matmul(queries[first:stop], keys[first:stop].transpose(0, 2, 1))  # [G,N,d]@[G,d,M] -> [G,N,M]
        scores *= np.float32(scale)
        if additive is not None:
            scores += additive if additive.ndim == 2 else additive[first:stop]
        # 2. softmax of every row (serial Numba); a row with no key to attend to gives 0, as torch
        rows = scores.reshape(-1, n_keys)  # [G*N,M]
        probs = np.empty_like(rows)  # [G*N,M]
        softmax_rows_block(rows, row_maxima(rows), probs)
        if additive is not None:
            probs[np.isneginf(rows).all(axis=1)] = 0.0
        # 3. the group's outputs in one batched matmul
        out[first:stop] = np.matmul(probs.reshape(stop - first, n_queries, n_keys), values[first:stop])

    group = -(-queries.shape[0] // (2 * worker_count()))  # slices per task: two tasks per worker
    run_blocks(run_group, [(first, min(first + group, queries.shape[0]))
                           for first in range(0, queries.shape[0], group)])
    return out.reshape(lead + (n_queries, values.shape[-1]))  # [L,N,dv] -> [...,N,dv]
