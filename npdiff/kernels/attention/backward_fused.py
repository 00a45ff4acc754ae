"""Attention backward version 4: every step of a query block in one Numba call, on register tiles.

Version 3 (backward.py) spends most of its time in five one-thread OpenBLAS sgemm calls per query
block whose shapes BLAS handles poorly (depth or width d = 40: ~92 GFLOP/s against ~150 on square
GEMMs, one core of this Xeon), plus three element-wise passes over a [M, Q] tile of 4 MiB (the
softmax's max, its exp, dS), out of L2. Version 4 computes the same thing with one micro-kernel
(backward_tiles.tile: a 6 x 64 register tile, ~110-150 GFLOP/s at depth 40-4096) whose store does
the element-wise work that can ride along: the scores' row max (SCORES), dP's rowsum(P * dP) (DOT).

For one (batch, head) slice, q [N,d], k [M,d], v [M,dv], dO [N,dv], with M padded to Mp, a multiple
of 64 (the padded keys masked), and queries in blocks of Q = QUERY_BLOCK rows (tiles [Q, Mp] in the
worker's buffers; queries along rows, keys along the 64 lanes of a tile):
  0. once per slice: qs = q * scale * log2(e) [N,d]; k^T [d,Mp] and v^T [dv,Mp] packed (zero padded);
     k [Mp,Dp] padded to Dp, a multiple of 64 columns (dq's B operand); dk^T [d,Mp], dv^T [dv,Mp] = 0
  per query block (rows q0 .. q0 + Q; with is_causal only the keys up to its last query):
  1. S [Q,Mp] = qs k^T (log2 units), -inf past M or above the diagonal; the row maxima on the way
  2. E = 2^(S - row max) in place, row sums l; P = E / l is never written
  3. dP [Q,Mp] = dO v^T; rowsum(E * dP) on the way, so Dr = rowsum(P * dP) = rowsum(E * dP) / l
  4. dS = E * (dP - Dr) * scale / l, in place of dP
  5. dv^T [dv,Mp] += (dO / l)^T E                    (dO's rows divided by their sums: P^T dO)
  6. dk^T [d,Mp]  += q^T dS
  7. dq [Q,Dp]     = dS k, in key chunks of DQ_KEY_CHUNK (k's chunk stays in L2 across the rows)
  end of the slice: dk = (dk^T)^T, dv = (dv^T)^T, the padding cut off.
Steps 1, 3, 5, 6 sweep the key columns outermost, so the 64-column slice of B (k^T, v^T, E or dS)
stays in L1 while every row group of A passes over it.

Parallel: one task per slice on the block pool (kernels/block_pool.py) as version 3; when there are
fewer slices than workers, each slice's queries are cut into as many parts as make every worker busy,
each part summing its own dk^T, dv^T (added up after). Every task's arithmetic depends only on its
rows: the same bytes on 1 or 2 threads for a given split.

Taken without a mask (self, cross, causal); masks go to version 2. Measured: backward.py's header and
benchmarks/RESULTS.md ("Training").
"""

import math

import numpy as np

from npdiff.jit import FASTMATH_SAFE, SERIAL, njit
from npdiff.kernels.attention.backward_tiles import (
    ADD,
    DOT,
    LANES,
    SCORES,
    STORE,
    TILE_COLS,
    TILE_ROWS,
    lane_max,
    lane_sum,
    tile,
)
from npdiff.kernels.attention.common import default_scale
from npdiff.kernels.block_pool import run_blocks, worker_count
from npdiff.kernels.scratch import scratch
from npdiff.kernels.vecmath import LOG2E, exp2_nonpositive_f32

QUERY_BLOCK = 48  # queries per block: a multiple of TILE_ROWS; the two [Q, Mp] tiles (768 KiB each at M = 4096)
DQ_KEY_CHUNK = 512  # keys per step of dq = dS k: k's chunk [512, 64] (128 KiB) stays in L2
NO_LIMIT = 1 << 40  # a column limit that never bites (not causal)


def padded(count, multiple):
    return -(-count // multiple) * multiple


@njit(**SERIAL)
def pack_transposed(x, out):
    """x [M, d] -> out [d, Mp] = x^T, the columns past M zero."""
    n_keys, dim = x.shape
    for c in range(dim):
        for j in range(n_keys):
            out[c, j] = x[j, c]
        for j in range(n_keys, out.shape[1]):
            out[c, j] = 0.0


@njit(**SERIAL)
def pack_padded(x, out):
    """x [M, d] -> out [Mp, Dp]: x in the top-left corner, zeros around it."""
    n_keys, dim = x.shape
    out[:, :] = 0.0
    out[:n_keys, :dim] = x


@njit(fastmath=FASTMATH_SAFE, **SERIAL)
def _softmax_rows(tile_rows, rows, width, row_lanes, inverse_sum):
    """Step 2: tile_rows[:rows, :width] <- 2^(s - row max) in place; inverse_sum[r] = 1 / the row sum."""
    for r in range(rows):
        row_max = lane_max(row_lanes[r])
        row_max = row_max if row_max != -np.inf else np.float32(0.0)  # a row with no key: all 0
        total = np.float32(0.0)
        for j in range(width):
            e = exp2_nonpositive_f32(tile_rows[r, j] - row_max)
            tile_rows[r, j] = e
            total += e
        inverse_sum[r] = np.float32(1.0) / total if total != 0 else np.float32(0.0)


@njit(fastmath=FASTMATH_SAFE, **SERIAL)
def _grad_scores_rows(exps, grads, rows, width, row_lanes, inverse_sum, scale):
    """Step 4: grads[:rows, :width] (dP) <- E * (dP - Dr) * scale / l in place, Dr from DOT's lanes."""
    for r in range(rows):
        row_dot = np.float32(lane_sum(row_lanes[r]) * inverse_sum[r])  # rowsum(P * dP)
        factor = inverse_sum[r] * scale
        for j in range(width):
            grads[r, j] = exps[r, j] * (grads[r, j] - row_dot) * factor


@njit(**SERIAL)
def _gemm_into_tile(depth, a, a_start, a_row_step, a_depth_step, rows, b, b_row_step, c, c_row_step, width,
                    epilogue, limit_base, valid_keys, row_lanes, p, staged):
    """C[rows, width] (epilogue)= A[rows, depth] B[depth, width]: 64-column slices outermost (B's slice
    stays in L1), TILE_ROWS row groups inside. limit_base: row 0's column limit (SCORES)."""
    for c0 in range(0, width, TILE_COLS):
        valid_cols = min(TILE_COLS, valid_keys - c0)
        for r0 in range(0, rows, TILE_ROWS):
            tile(depth, a, a_start + r0 * a_row_step, a_row_step, a_depth_step, min(TILE_ROWS, rows - r0),
                 b, c0, b_row_step, c, r0 * c_row_step + c0, c_row_step, epilogue, limit_base + r0 - c0,
                 valid_cols, row_lanes, r0, p, r0 * c_row_step + c0, staged)


@njit(**SERIAL)
def query_blocks_backward(qs, q, keys_t, values_t, keys_padded, grad_rows, n_keys, causal, scale, q_begin,
                          q_end, grad_q, grad_keys_t, grad_values_t, exps, grads, grad_scaled, dq_block,
                          row_lanes, inverse_sum, staged):
    """Steps 1-7 for the queries [q_begin, q_end) of one slice (module docstring); dk^T, dv^T are
    added into grad_keys_t [d, Mp], grad_values_t [dv, Mp]. Flat views are taken of every operand."""
    dim, value_dim = qs.shape[1], grad_rows.shape[1]
    padded_keys = keys_t.shape[1]
    padded_dim = keys_padded.shape[1]
    qs_flat, q_flat, do_flat = qs.reshape(-1), q.reshape(-1), grad_rows.reshape(-1)
    kt_flat, vt_flat, kp_flat = keys_t.reshape(-1), values_t.reshape(-1), keys_padded.reshape(-1)
    exps_flat, grads_flat = exps.reshape(-1), grads.reshape(-1)
    dkt_flat, dvt_flat = grad_keys_t.reshape(-1), grad_values_t.reshape(-1)
    scaled_flat, dq_flat = grad_scaled.reshape(-1), dq_block.reshape(-1)
    unused = np.zeros((1, LANES), np.float32)  # row lanes of epilogues that keep none
    for q0 in range(q_begin, q_end, exps.shape[0]):
        rows = min(exps.shape[0], q_end - q0)
        visible = min(n_keys, q0 + rows) if causal else n_keys  # keys any query of the block sees
        width = min(padded_keys, -(-visible // TILE_COLS) * TILE_COLS)
        limit_base = q0 + 1 if causal else NO_LIMIT  # row 0 sees keys < q0 + 1
        # 1. S = qs k^T, masked, with the row maxima
        row_lanes[:rows, :] = -np.inf
        _gemm_into_tile(dim, qs_flat, q0 * dim, dim, 1, rows, kt_flat, padded_keys, exps_flat, padded_keys,
                        width, SCORES, limit_base, visible, row_lanes, exps_flat, staged)
        # 2. E = 2^(S - max) in place, 1 / row sums
        _softmax_rows(exps, rows, width, row_lanes, inverse_sum)
        # 3. dP = dO v^T with rowsum(E * dP)
        row_lanes[:rows, :] = 0.0
        _gemm_into_tile(value_dim, do_flat, q0 * value_dim, value_dim, 1, rows, vt_flat, padded_keys, grads_flat,
                        padded_keys, width, DOT, NO_LIMIT, width, row_lanes, exps_flat, staged)
        # 4. dS in place of dP
        _grad_scores_rows(exps, grads, rows, width, row_lanes, inverse_sum, scale)
        # 5. dv^T += (dO / l)^T E: A(r, t) = dO[q0 + t, r] / l[t], read from grad_scaled [Q, dv]
        for t in range(rows):
            for c in range(value_dim):
                grad_scaled[t, c] = grad_rows[q0 + t, c] * inverse_sum[t]
        _gemm_into_tile(rows, scaled_flat, 0, 1, value_dim, value_dim, exps_flat, padded_keys, dvt_flat,
                        padded_keys, width, ADD, NO_LIMIT, width, unused, exps_flat, staged)
        # 6. dk^T += q^T dS
        _gemm_into_tile(rows, q_flat, q0 * dim, 1, dim, dim, grads_flat, padded_keys, dkt_flat,
                        padded_keys, width, ADD, NO_LIMIT, width, unused, exps_flat, staged)
        # 7. dq = dS k, in key chunks (the first stores, the others add)
        for k0 in range(0, width, DQ_KEY_CHUNK):
            depth = min(DQ_KEY_CHUNK, width - k0)
            _gemm_into_tile(depth, grads_flat, k0, padded_keys, 1, rows, kp_flat[k0 * padded_dim:],
                            padded_dim, dq_flat, padded_dim, padded_dim, STORE if k0 == 0 else ADD, NO_LIMIT,
                            padded_dim, unused, exps_flat, staged)
        grad_q[q0:q0 + rows, :] = dq_block[:rows, :dim]


def slice_parts(slices, n_queries, workers):
    """Query ranges per slice: one when there are enough slices, else as many as keep `workers` busy
    (each at least one QUERY_BLOCK)."""
    parts = 1 if slices >= workers else -(-workers // max(1, slices))
    parts = max(1, min(parts, -(-n_queries // QUERY_BLOCK)))
    step = max(QUERY_BLOCK, padded(-(-n_queries // parts), QUERY_BLOCK))
    return [(start, min(n_queries, start + step)) for start in range(0, n_queries, step)] or [(0, 0)]


def attention_backward_fused(q, k, v, grad_out, scale=None, is_causal=False):
    """Version 4 (no mask): -> (dq [...,N,d], dk [...,M,d], dv [...,M,dv])."""
    scale = default_scale(q, scale)
    lead = q.shape[:-2]
    n_queries, n_keys, dim, value_dim = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    padded_keys, padded_dim = padded(max(1, n_keys), TILE_COLS), padded(dim, TILE_COLS)
    grad_q = np.empty(q.shape, np.float32)                              # [...,N,d]
    grad_k = np.empty(k.shape, np.float32)                              # [...,M,d]
    grad_v = np.empty(v.shape, np.float32)                              # [...,M,dv]
    slices = [np.unravel_index(index, lead) if lead else () for index in range(math.prod(lead))]
    parts = slice_parts(len(slices), n_queries, worker_count())
    part_grads = {}                                                     # (slice, part) -> (dk^T, dv^T)
    log2_scale = np.float32(scale * float(LOG2E))

    def run_part(task):
        index, part = task
        at = slices[index]
        q_begin, q_end = parts[part]
        # 0. the slice's operands, packed into this worker's buffers
        qs = scratch("attn_v4_qs", (n_queries, dim))                    # [N,d] = q * scale * log2(e)
        np.multiply(q[at], log2_scale, out=qs)
        q_rows = scratch("attn_v4_q", (n_queries, dim))                 # [N,d] contiguous
        np.copyto(q_rows, q[at])
        grad_rows = scratch("attn_v4_do", (n_queries, value_dim))       # [N,dv] contiguous
        np.copyto(grad_rows, grad_out[at])
        keys_t = scratch("attn_v4_kt", (dim, padded_keys))              # [d,Mp]
        pack_transposed(np.ascontiguousarray(k[at]), keys_t)
        values_t = scratch("attn_v4_vt", (value_dim, padded_keys))      # [dv,Mp]
        pack_transposed(np.ascontiguousarray(v[at]), values_t)
        keys_padded = scratch("attn_v4_kp", (padded_keys, padded_dim))  # [Mp,Dp]
        pack_padded(np.ascontiguousarray(k[at]), keys_padded)
        grad_keys_t = np.zeros((dim, padded_keys), np.float32)          # [d,Mp] summed over query blocks
        grad_values_t = np.zeros((value_dim, padded_keys), np.float32)  # [dv,Mp]
        query_blocks_backward(
            qs, q_rows, keys_t, values_t, keys_padded, grad_rows, n_keys, is_causal, np.float32(scale),
            q_begin, q_end, grad_q[at], grad_keys_t, grad_values_t,
            scratch("attn_v4_exps", (QUERY_BLOCK, padded_keys)),        # [Q,Mp] S, then E
            scratch("attn_v4_grads", (QUERY_BLOCK, padded_keys)),       # [Q,Mp] dP, then dS
            scratch("attn_v4_do_scaled", (QUERY_BLOCK, value_dim)),     # [Q,dv]
            scratch("attn_v4_dq", (QUERY_BLOCK, padded_dim)),           # [Q,Dp]
            scratch("attn_v4_lanes", (QUERY_BLOCK, LANES)),             # [Q,16]
            scratch("attn_v4_inverse_sum", (QUERY_BLOCK,)),             # [Q]
            scratch("attn_v4_staged", (TILE_ROWS, TILE_COLS)))          # [6,64]
        part_grads[task] = (grad_keys_t, grad_values_t)

    tasks = [(index, part) for index in range(len(slices)) for part in range(len(parts))]
    run_blocks(run_part, tasks)
    for index, at in enumerate(slices):
        grad_keys_t, grad_values_t = part_grads[(index, 0)]
        for part in range(1, len(parts)):
            grad_keys_t += part_grads[(index, part)][0]
            grad_values_t += part_grads[(index, part)][1]
        grad_k[at] = grad_keys_t[:, :n_keys].T                          # [d,M] -> [M,d]
        grad_v[at] = grad_values_t[:, :n_keys].T                        # [dv,M] -> [M,dv]
    return grad_q, grad_k, grad_v
