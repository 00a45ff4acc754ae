"""Attention backward version 4 with the forward's statistics: key blocks outermost (flash-attention-2).

When the caller still has the forward's output O [..., N, dv] and its per-query log-sum-exp
lse [..., N] (log of the sum over keys of exp(scale * q.k), natural log, as torch's flash attention
returns it), nothing of a whole row is needed any more: P = exp(S - lse) is known tile by tile, and
Dr = rowsum(P * dP) = rowsum(dO * O) is one pass over dO and O. So the loop can run over key blocks
of 64 keys outermost, with every tile in L1 and the key block's dk^T, dv^T accumulators beside it:

  per slice: qs = q * scale * log2(e), lse2 = lse * log2(e), Dr = rowsum(dO * O)          [N,d], [N], [N]
  per group of KEY_GROUP key blocks, per query block of Q rows, per key block j of the group (64 keys:
  k^T, v^T [d|dv, 64] block-major from backward_fused; dk^T, dv^T [d|dv, 64]; with is_causal only the
  query blocks that see a key of block j):
      1. S [Q,64] = qs k_j^T                    2. P = 2^(S - lse2), 0 for keys not seen
      3. dP [Q,64] = dO v_j^T                   4. dS = P * (dP - Dr) * scale
      5. dv_j^T += dO^T P                        6. dk_j^T += q^T dS
      7. dq [Q, Dp] += dS k_j                    (dq [N, Dp] summed over key blocks, k_j padded to Dp)

The same five GEMMs as the version without statistics (backward_fused.py: query blocks outermost,
the row max and sums recomputed), but no [Q, M] tile leaves L1, and there is no max pass and no
rowsum(P * dP) pass. The forward (fused.py) computes every query's max and sum already; keeping
lse = (max + log2(sum)) / log2(e) and O on the training tape is what this version needs (fused.py's
lse_out; transformer_backward.attention_forward_saved keeps both where this version runs). Given O
alone, lse is recomputed first (log_sum_exp_rows: one more sweep of S tiles, an online softmax per
column).

Measured at [1,8,4096,40] (benchmarks/training_kernels.py, load 2.5, process CPU per call): 0.604 s
given O and lse, against version 3's 0.705 s and torch's 0.564 s; given O alone 0.771 s (the extra
sweep costs more than it saves). Below M ~ 2048 version 3 is ahead (RESULTS.md, "Training").

Parallel as backward_fused: one task per (batch, head) slice; with fewer slices than workers, the
slice's key blocks are cut into parts, each summing its own dq (added up after).
"""

import numpy as np

from npdiff.jit import FASTMATH_CONTRACT, SERIAL, njit
from npdiff.kernels.attention.backward_fused import (
    NO_LIMIT,
    QUERY_BLOCK,
    gemm_into_tiles,
    outputs_and_slices,
    padded,
    slice_operands,
    unpack_key_blocks,
)
from npdiff.kernels.attention.backward_tiles import TILE_COLS
from npdiff.kernels.attention.common import default_scale
from npdiff.kernels.block_pool import run_blocks, worker_count
from npdiff.kernels.scratch import scratch
from npdiff.kernels.vecmath import LOG2E, exp2_nonpositive_f32

# key blocks of 64 swept together (1, 4, 8, 16 measured within noise of each other, 8 a little ahead):
# a query block's rows of qs, q, dO and dq are read once per group
# instead of once per key block, and the group's k^T, v^T, k and dk^T, dv^T blocks (62 KiB each at
# d = 40) stay in L2
KEY_GROUP = 8


@njit(fastmath=FASTMATH_CONTRACT, **SERIAL)
def _probabilities(scores, rows, lse2, q0, limit_base, valid_keys, key0):
    """Step 2: scores [Q, 64] <- 2^(s - lse2[q0 + r]) in place; 0 for key key0 + j past
    min(valid_keys, limit_base + r) (keys past M; above the diagonal when causal)."""
    for r in range(rows):
        limit = min(valid_keys, limit_base + r) - key0
        shift = lse2[q0 + r]
        row = scores[r]
        for j in range(TILE_COLS):
            p = exp2_nonpositive_f32(min(row[j] - shift, np.float32(0.0)))  # s <= lse2 up to rounding
            row[j] = p if j < limit else np.float32(0.0)


@njit(fastmath=FASTMATH_CONTRACT, **SERIAL)
def _grad_scores(probs, grads, rows, row_dot, q0, scale):
    """Step 4: grads [Q, 64] (dP) <- P * (dP - Dr) * scale in place."""
    for r in range(rows):
        dot = row_dot[q0 + r]
        prob_row, grad_row = probs[r], grads[r]
        for j in range(TILE_COLS):
            grad_row[j] = prob_row[j] * (grad_row[j] - dot) * scale


@njit(**SERIAL)
def _query_and_key_blocks(first_query, n_queries, block_rows, group, group_end):
    """(q0, key block) pairs: query blocks outer, the group's key blocks inner."""
    pairs = []
    for q0 in range(first_query, n_queries, block_rows):
        for block in range(group, group_end):
            pairs.append((q0, block))
    return pairs


@njit(**SERIAL)
def key_blocks_backward(qs, q, keys_t, values_t, keys_padded, grad_rows, lse2, row_dot, n_keys, causal, scale,
                        block_begin, block_end, grad_q_padded, grad_keys_t, grad_values_t, probs, grads):
    """Steps 1-7 for the key blocks [block_begin, block_end) of one slice (module docstring). Adds
    into grad_q_padded [N, Dp] and grad_keys_t, grad_values_t [Mp/64, d|dv, 64]; probs and grads are
    [Q, 64] tiles."""
    n_queries, dim = qs.shape
    value_dim = grad_rows.shape[1]
    block_rows = probs.shape[0]
    padded_dim = keys_padded.shape[1]
    qs_flat, q_flat, do_flat = qs.reshape(-1), q.reshape(-1), grad_rows.reshape(-1)
    kt_flat, vt_flat, kp_flat = keys_t.reshape(-1), values_t.reshape(-1), keys_padded.reshape(-1)
    probs_flat, grads_flat = probs.reshape(-1), grads.reshape(-1)
    dkt_flat, dvt_flat, dq_flat = grad_keys_t.reshape(-1), grad_values_t.reshape(-1), grad_q_padded.reshape(-1)
    tile_block = block_rows * TILE_COLS
    for group in range(block_begin, block_end, KEY_GROUP):
        group_end = min(block_end, group + KEY_GROUP)
        # causal: the first query that sees the group's first key is that key's index (top-left aligned)
        first_query = min(group * TILE_COLS, n_queries) // block_rows * block_rows if causal else 0
        for q0, block in _query_and_key_blocks(first_query, n_queries, block_rows, group, group_end):
            key0 = block * TILE_COLS
            rows = min(block_rows, n_queries - q0)
            if causal and q0 + rows <= key0:
                continue  # no query of this block sees a key of this key block
            limit_base = q0 + 1 if causal else NO_LIMIT
            # 1-2. P = 2^(qs k_j^T - lse2)
            gemm_into_tiles(dim, qs_flat, q0 * dim, dim, 1, rows, kt_flat, block * dim * TILE_COLS, 0,
                             TILE_COLS, probs_flat, 0, tile_block, TILE_COLS, TILE_COLS, False)
            _probabilities(probs, rows, lse2, q0, limit_base, n_keys, key0)
            # 3-4. dS = P * (dO v_j^T - Dr) * scale
            gemm_into_tiles(value_dim, do_flat, q0 * value_dim, value_dim, 1, rows, vt_flat,
                             block * value_dim * TILE_COLS, 0, TILE_COLS, grads_flat, 0, tile_block, TILE_COLS,
                             TILE_COLS, False)
            _grad_scores(probs, grads, rows, row_dot, q0, scale)
            # 5. dv_j^T += dO^T P: A(r, t) = dO[q0 + t, r]
            gemm_into_tiles(rows, do_flat, q0 * value_dim, 1, value_dim, value_dim, probs_flat, 0, tile_block,
                             TILE_COLS, dvt_flat, block * value_dim * TILE_COLS, 0, TILE_COLS, TILE_COLS, True)
            # 6. dk_j^T += q^T dS
            gemm_into_tiles(rows, q_flat, q0 * dim, 1, dim, dim, grads_flat, 0, tile_block, TILE_COLS,
                             dkt_flat, block * dim * TILE_COLS, 0, TILE_COLS, TILE_COLS, True)
            # 7. dq += dS k_j
            gemm_into_tiles(TILE_COLS, grads_flat, 0, TILE_COLS, 1, rows, kp_flat, key0 * padded_dim, TILE_COLS,
                             padded_dim, dq_flat, q0 * padded_dim, TILE_COLS, padded_dim, padded_dim, True)


@njit(fastmath=FASTMATH_CONTRACT, **SERIAL)
def _fold_tile_into_lanes(scores, rows, limit_base, valid_keys, key0, lane_max, lane_sum):
    """The online softmax of one [Q, 64] tile of scores, column by column: lane_max[r, j] and
    lane_sum[r, j] hold the max and the sum of 2^(s - max) of the scores row r had in column j of every
    tile so far (keys past min(valid_keys, limit_base + r) left out). Element-wise: it vectorises."""
    for r in range(rows):
        limit = min(valid_keys, limit_base + r) - key0
        row, maxima, sums = scores[r], lane_max[r], lane_sum[r]
        for j in range(TILE_COLS):
            x = row[j] if j < limit else np.float32(-np.inf)
            old = maxima[j]
            new = x if x > old else old
            kept = exp2_nonpositive_f32(old - new) if old != -np.inf else np.float32(0.0)
            added = exp2_nonpositive_f32(x - new) if x != -np.inf else np.float32(0.0)
            sums[j] = sums[j] * kept + added
            maxima[j] = new


@njit(**SERIAL)
def log_sum_exp_rows(qs, keys_t, n_keys, causal, lse2, probs, lane_max, lane_sum):
    """lse2 [N] = log2 of the sum over keys of 2^(qs k^T) per query (the forward's log-sum-exp in log2
    units, recomputed when the caller has only the forward's output): one sweep of S = qs k^T tiles
    (the GEMM the forward did) folded into per-column running maxima and sums, combined per row at
    the end. probs [Q, 64], lane_max and lane_sum [Q, 64]: buffers."""
    n_queries, dim = qs.shape
    block_rows = probs.shape[0]
    qs_flat, kt_flat, probs_flat = qs.reshape(-1), keys_t.reshape(-1), probs.reshape(-1)
    for q0 in range(0, n_queries, block_rows):
        rows = min(block_rows, n_queries - q0)
        visible = min(n_keys, q0 + rows) if causal else n_keys
        limit_base = q0 + 1 if causal else NO_LIMIT
        lane_max[:rows, :] = -np.inf
        lane_sum[:rows, :] = 0.0
        for block in range(padded(visible, TILE_COLS) // TILE_COLS):
            gemm_into_tiles(dim, qs_flat, q0 * dim, dim, 1, rows, kt_flat, block * dim * TILE_COLS, 0,
                             TILE_COLS, probs_flat, 0, 0, TILE_COLS, TILE_COLS, False)
            _fold_tile_into_lanes(probs, rows, limit_base, n_keys, block * TILE_COLS, lane_max, lane_sum)
        for r in range(rows):
            row_max = np.float32(-np.inf)
            for j in range(TILE_COLS):
                row_max = max(row_max, lane_max[r, j])
            total = 0.0
            for j in range(TILE_COLS):
                if lane_max[r, j] != -np.inf:
                    total += lane_sum[r, j] * exp2_nonpositive_f32(lane_max[r, j] - row_max)
            lse2[q0 + r] = row_max + np.log2(total)


def key_block_parts(slices, key_blocks, workers):
    """Key-block ranges per slice: one when there are enough slices, else enough to keep `workers` busy."""
    parts = 1 if slices >= workers else min(key_blocks, -(-workers // max(1, slices)))
    step = -(-key_blocks // max(1, parts))
    return [(start, min(key_blocks, start + step)) for start in range(0, key_blocks, step)]


def attention_backward_with_stats(q, k, v, grad_out, out, lse=None, scale=None, is_causal=False):
    """Version 4 given the forward's output out [..., N, dv] and log-sum-exp lse [..., N] (no mask; lse
    None: recomputed, log_sum_exp_rows): -> (dq [...,N,d], dk [...,M,d], dv [...,M,dv])."""
    scale = default_scale(q, scale)
    n_queries, n_keys, dim, value_dim = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    padded_keys, padded_dim = padded(max(1, n_keys), TILE_COLS), padded(dim, TILE_COLS)
    key_blocks = padded_keys // TILE_COLS
    grad_q, grad_k, grad_v, slices = outputs_and_slices(q, k, v)
    parts = key_block_parts(len(slices), key_blocks, worker_count())
    part_grads = {}                                                     # (slice, part) -> dq [N,Dp]
    log2_scale = np.float32(scale * float(LOG2E))

    def run_part(task):
        index, part = task
        at = slices[index]
        block_begin, block_end = parts[part]
        # 0. the slice's operands in this worker's buffers; lse in log2 units; Dr = rowsum(dO * O)
        qs, q_rows, grad_rows, keys_t, values_t, keys_padded = slice_operands(q[at], k[at], v[at], grad_out[at],
                                                                             log2_scale)
        lse2 = scratch("attn_v4s_lse2", (n_queries,))                   # [N] log-sum-exp in log2 units
        if lse is not None:
            np.multiply(lse[at], LOG2E, out=lse2)
        else:
            log_sum_exp_rows(qs, keys_t, n_keys, is_causal, lse2, scratch("attn_v4s_probs", (QUERY_BLOCK, TILE_COLS)),
                             scratch("attn_v4s_lane_max", (QUERY_BLOCK, TILE_COLS)),
                             scratch("attn_v4s_lane_sum", (QUERY_BLOCK, TILE_COLS)))
        row_dot = scratch("attn_v4s_row_dot", (n_queries,))             # [N]
        np.einsum("nc,nc->n", grad_rows, out[at], out=row_dot)
        grad_q_padded = np.zeros((n_queries, padded_dim), np.float32)   # [N,Dp] summed over key blocks
        grad_keys_t = np.zeros((key_blocks, dim, TILE_COLS), np.float32)  # [Mp/64,d,64]
        grad_values_t = np.zeros((key_blocks, value_dim, TILE_COLS), np.float32)  # [Mp/64,dv,64]
        key_blocks_backward(
            qs, q_rows, keys_t, values_t, keys_padded, grad_rows, lse2, row_dot, n_keys, is_causal,
            np.float32(scale), block_begin, block_end, grad_q_padded, grad_keys_t, grad_values_t,
            scratch("attn_v4s_probs", (QUERY_BLOCK, TILE_COLS)),        # [Q,64] P
            scratch("attn_v4s_grads", (QUERY_BLOCK, TILE_COLS)))        # [Q,64] dP, then dS
        if len(parts) == 1:  # the slice's gradients are complete: stored here, on this worker
            store_slice_grads(grad_q_padded, grad_keys_t, grad_values_t, grad_q[at], grad_k[at], grad_v[at])
        else:
            part_grads[task] = (grad_q_padded, grad_keys_t, grad_values_t)

    tasks = [(index, part) for index in range(len(slices)) for part in range(len(parts))]
    run_blocks(run_part, tasks)
    for index, at in enumerate(slices if len(parts) > 1 else ()):
        grad_q_padded, grad_keys_t, grad_values_t = part_grads[(index, 0)]
        for part in range(1, len(parts)):  # each part wrote only its key blocks (the rest are 0)
            grad_q_padded += part_grads[(index, part)][0]
            grad_keys_t += part_grads[(index, part)][1]
            grad_values_t += part_grads[(index, part)][2]
        store_slice_grads(grad_q_padded, grad_keys_t, grad_values_t, grad_q[at], grad_k[at], grad_v[at])
    return grad_q, grad_k, grad_v


def store_slice_grads(grad_q_padded, grad_keys_t, grad_values_t, grad_q, grad_k, grad_v):
    """One slice's summed gradients into its (views of the) outputs dq [N,d], dk [M,d], dv [M,dv]."""
    grad_q[:] = grad_q_padded[:, :grad_q.shape[1]]                      # [N,Dp] -> [N,d]
    unpack_key_blocks(grad_keys_t, grad_k)                              # [Mp/64,d,64] -> [M,d]
    unpack_key_blocks(grad_values_t, grad_v)                            # [Mp/64,dv,64] -> [M,dv]
