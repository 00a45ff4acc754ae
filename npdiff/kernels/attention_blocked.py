"""Memory-efficient attention for NumPy arrays: query blocks on worker threads, key chunks with a
running max and sum ("flash attention" on the CPU). The same arithmetic as attention.py's
attention_chunked_ref, which is the readable version; this one is how it is made fast.

How it differs from attention_chunked_ref:
  * Work is cut into blocks of QUERY_BLOCK queries of one (batch, head) slice. Each block is one
    task for a worker of openblas.blas_worker_pool(): its GEMMs run on that worker's core only, so
    two workers keep two cores busy without OpenBLAS threads fighting over them.
  * Inside a block, keys are visited in chunks of KEY_CHUNK; the score tile
    [QUERY_BLOCK, KEY_CHUNK] (1 MiB at 256 x 1024) stays in the core's L2 cache between the GEMM
    that writes it (q_block @ k_chunk^T), the Numba pass that turns it into probabilities, and the
    GEMM that reads it (probs @ v_chunk). Memory: one tile and one [QUERY_BLOCK, dv] accumulator
    per worker, whatever N and M are.
  * The Numba pass (online_softmax_update, nogil) fuses: row max of the tile, new running max,
    exp(s - max) in place (vectorised exp of vecmath.py), row sums, and the rescaling
    exp(old_max - new_max) of the running sum and of the accumulator rows.
  * With is_causal, key chunks that lie wholly above the diagonal for a block are skipped.
Queries that may attend to no key give 0 (as torch's scaled_dot_product_attention).
"""

import numpy as np

from npdiff.jit import FASTMATH_SAFE, SERIAL, njit
from npdiff.kernels.openblas import run_blocks
from npdiff.kernels.vecmath import exp_f32

QUERY_BLOCK = 256
KEY_CHUNK = 1024
WIDE_ROW = 256  # rows at least this wide take NumPy's max reduction (row_maxima)


@njit(**SERIAL, fastmath=FASTMATH_SAFE)
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


@njit(**SERIAL, fastmath=FASTMATH_SAFE)
def exp_in_place(flat):
    """flat[i] = exp(flat[i]) over one contiguous run: a single vectorised loop (its scalar
    remainder is at most 15 elements in all, where a loop per 77-wide row pays one per row)."""
    for i in range(flat.size):
        flat[i] = exp_f32(flat[i])


@njit(**SERIAL, fastmath=FASTMATH_SAFE)
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
        total = 0.0
        for j in range(scores.shape[1]):
            total += scores[i, j]
        shift = new_max[i] if new_max[i] != -np.inf else np.float32(0.0)
        correction = exp_f32(running_max[i] - shift)  # 0 when running_max was -inf
        running_sum[i] = running_sum[i] * correction + total
        for c in range(acc.shape[1]):
            acc[i, c] *= correction
        running_max[i] = new_max[i]


def causal_additive(query_start, query_stop, key_start, key_stop, xp=np):
    """[n, m] of 0 where key j <= query i, -inf above the diagonal (torch's top-left alignment).
    Shared with attention.py (which imports this file), for numpy or cupy (xp)."""
    query_index = xp.arange(query_start, query_stop)[:, None]  # [n,1]
    key_index = xp.arange(key_start, key_stop)[None, :]  # [1,m]
    return xp.where(key_index <= query_index, np.float32(0.0), np.float32(-np.inf)).astype(xp.float32)


def attention_blocked(q, k, v, mask=None, scale=1.0, is_causal=False, key_chunk=KEY_CHUNK,
                      query_block=QUERY_BLOCK):
    """q [..., N, d], k [..., M, d], v [..., M, dv] NumPy float32; mask as in attention.py (bool or
    additive float, broadcastable to [..., N, M]); scale: a number. Returns [..., N, dv]."""
    lead = q.shape[:-2]
    n_queries, n_keys, value_dim = q.shape[-2], k.shape[-2], v.shape[-1]
    q_scaled = (q * np.float32(scale)).reshape(-1, n_queries, q.shape[-1])  # [...,N,d] -> [L,N,d]
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
