"""Attention backward version 4: version 3's steps on one Numba register tile, in one call per slice.

Where version 3 (backward.py) spends its time, one slice [4096,40] on one core (thread CPU time, the
steps timed apart, load ~3): 93 ms, of which the five one-thread OpenBLAS GEMMs 72 ms (88-95 GFLOP/s:
depth or width d = 40, against ~150 on square GEMMs here), the softmax pass over its [M, Q] tile of
4 MiB 7.5 ms, the dS pass 10.5 ms, summing dk, dv over the query blocks 2.4 ms. At [1024,80]: 8.2 ms,
the GEMMs 110-127 GFLOP/s. Version 4 runs all five products on backward_tiles.tile (a 6 x 64 register
tile, 100-130 GFLOP/s alone at depth 40-1024), with the element-wise steps as vectorised Numba passes.

For one (batch, head) slice, q [N,d], k [M,d], v [M,dv], dO [N,dv], with M padded to Mp, a multiple
of 64, and queries in blocks of Q = QUERY_BLOCK rows; the [Q, Mp] tiles are stored block-major,
[Mp/64, Q, 64] (keys along the 64 lanes), in the worker's buffers:
  0. once per slice: qs = q * scale * log2(e) [N,d]; k^T and v^T block-major [Mp/64, d|dv, 64] (zero
     padded); k [Mp,Dp] padded to Dp, a multiple of 64 columns (dq's B operand); dk^T, dv^T = 0
  per query block (rows q0 .. q0 + Q; with is_causal only the keys up to its last query):
  1. S [Q,Mp] = qs k^T (log2 units)
  2. E = 2^(S - row max) in place, 0 past M or above the diagonal; row sums l (P = E / l never written)
  3. dP [Q,Mp] = dO v^T
  4. dS = E * (dP - Dr) * scale / l in place of dP, Dr = rowsum(E * dP) / l = rowsum(P * dP)
  5. dv^T [dv,Mp] += (dO / l)^T E                    (dO's rows divided by their sums: P^T dO)
  6. dk^T [d,Mp]  += q^T dS
  7. dq [Q,Dp]     = dS k, 64 keys (one block of dS) per step
  end of the slice: dk, dv = dk^T, dv^T transposed, the padding cut off.
The GEMMs sweep the 64-key blocks outermost, so B's block (k^T, v^T, E or dS: 10-12 KiB) stays in L1
while every row group of A passes over it.

Measured (one slice [4096,40], one core, thread CPU time, steps timed apart, load ~4): S 17 ms, softmax
7 ms, dP 18, dS 12-15, dv 15-17, dk 14-16, dq 20-22 (64 lanes for d = 40: 37.5% of its products are
padding): ~105 ms against version 3's 93 in the same conditions, but ~0.9x version 3's process CPU time
per whole call (benchmarks/training_kernels.py, RESULTS.md): these figures drift +-10% with the load.
What limits is not the tile but the working set: per query block, k^T, v^T, k and dk^T, dv^T (3.3 MiB at
M = 4096, d = 40) and the two tiles (768 KiB each) are more than the 2 MiB L2, so they stream from L3:
S alone on warm data runs at ~105 GFLOP/s, in place at ~75. With the forward's output and log-sum-exp
(backward_stats.py) no tile needs a whole row, and that version keeps everything in L1.
What was tried and measured slower: the row max and rowsum(P * dP) in the GEMM's store (per-lane, in
the tile's epilogue: +8-12 ms in S and dP against 1-3 ms as passes); tiles stored row-major [Q, Mp]
(rows 16 KiB apart: the GEMMs at 35-60 GFLOP/s; Mp + 64 floats apart: no better); dq from a row-major
copy of dS in 512-key chunks (the copy cost what the longer depth saved); Q = 24, 36, 72, 96 (within
noise of 48).

Parallel: one task per slice on the block pool (kernels/block_pool.py) as version 3; when there are
fewer slices than workers, each slice's queries are cut into as many parts as make every worker busy,
each part summing its own dk^T, dv^T (added up after). Every task's arithmetic depends only on its
rows: the same bytes on 1 or 2 threads for a given split. Taken without a mask (self, cross, causal),
from backward.V4_MIN_KEYS keys on; masks go to version 2.
"""

import math

import numpy as np
from numba import carray

from npdiff.jit import FASTMATH_CONTRACT, SERIAL, njit
from npdiff.kernels.attention.backward_tiles import TILE_COLS, TILE_ROWS, tile
from npdiff.kernels.attention.common import default_scale
from npdiff.kernels.block_pool import run_blocks, worker_count
from npdiff.kernels.matmul_numba import _stack_row, sum_lanes_in_tree  # sums in registers, fixed order
from npdiff.kernels.scratch import scratch
from npdiff.kernels.vecmath import LOG2E, exp2_nonpositive_f32

QUERY_BLOCK = 48  # queries per block: a multiple of TILE_ROWS; the two [Q, Mp] tiles (768 KiB each at M = 4096)
NO_LIMIT = 1 << 40  # a column limit that never bites (not causal)


@njit(**SERIAL)
def padded(count, multiple):
    """count rounded up to a multiple of `multiple`."""
    return -(-count // multiple) * multiple


@njit(**SERIAL)
def pack_key_blocks(x, out):
    """x [M, d] -> out [Mp/64, d, 64]: out[b, c, j] = x[64 b + j, c] (block-major x^T), zero past M."""
    n_keys, dim = x.shape
    for block in range(out.shape[0]):
        for c in range(dim):
            for j in range(TILE_COLS):
                key = block * TILE_COLS + j
                out[block, c, j] = x[key, c] if key < n_keys else np.float32(0.0)


@njit(**SERIAL)
def unpack_key_blocks(blocks, out):
    """blocks [Mp/64, d, 64] -> out [M, d] (pack_key_blocks' inverse, the padding dropped)."""
    n_keys, dim = out.shape
    for key in range(n_keys):
        block, j = key // TILE_COLS, key % TILE_COLS
        for c in range(dim):
            out[key, c] = blocks[block, c, j]


@njit(**SERIAL)
def pack_padded(x, out):
    """x [M, d] -> out [Mp, Dp]: x in the top-left corner, zeros around it."""
    n_keys, dim = x.shape
    out[:, :] = 0.0
    out[:n_keys, :dim] = x


@njit(fastmath=FASTMATH_CONTRACT, **SERIAL)
def _softmax_rows(scores, rows, key_blocks, limit_base, visible, inverse_sum):
    """Step 2: scores [blocks, Q, 64] (rows < rows, blocks < key_blocks) <- 2^(s - row max) in place,
    0 for the keys row r may not see (from key min(visible, limit_base + r) on); inverse_sum[r] =
    1 / the row sum. The maxima and sums are kept per column of a block (`lanes`, 64 floats on the
    stack, promoted to 4 zmm registers), so the loops are element-wise and vectorise (a max reduction
    does not: LLVM needs 'nnan' for it, which no kernel here assumes: 1.9 against ~0.3 ns per score)."""
    lanes = carray(_stack_row(), TILE_COLS)
    for r in range(rows):
        limit = min(visible, limit_base + r)
        for j in range(TILE_COLS):
            lanes[j] = -np.inf
        for block in range(key_blocks):
            row = scores[block, r]  # [64]
            for j in range(TILE_COLS):
                x = row[j] if block * TILE_COLS + j < limit else np.float32(-np.inf)
                lanes[j] = x if x > lanes[j] else lanes[j]
        row_max = lanes[0]
        for j in range(1, TILE_COLS):
            row_max = lanes[j] if lanes[j] > row_max else row_max
        row_max = row_max if row_max != -np.inf else np.float32(0.0)  # a row with no key: all 0
        for j in range(TILE_COLS):
            lanes[j] = 0.0
        for block in range(key_blocks):
            row = scores[block, r]
            for j in range(TILE_COLS):
                e = exp2_nonpositive_f32(row[j] - row_max)
                e = e if block * TILE_COLS + j < limit else np.float32(0.0)
                row[j] = e
                lanes[j] += e
        total = sum_lanes_in_tree(lanes)  # the 64 lanes in a fixed order
        inverse_sum[r] = np.float32(1.0) / total if total != 0 else np.float32(0.0)


@njit(fastmath=FASTMATH_CONTRACT, **SERIAL)
def _grad_scores_rows(exps, grads, rows, key_blocks, inverse_sum, scale):
    """Step 4: grads (dP, [blocks, Q, 64]) <- dS = E * (dP - Dr) * scale / l in place, Dr = rowsum(E *
    dP) / l = rowsum(P * dP) (per-column sums, as _softmax_rows)."""
    lanes = carray(_stack_row(), TILE_COLS)
    for r in range(rows):
        for j in range(TILE_COLS):
            lanes[j] = 0.0
        for block in range(key_blocks):
            exp_row, grad_row = exps[block, r], grads[block, r]  # [64], [64]
            for j in range(TILE_COLS):
                lanes[j] += exp_row[j] * grad_row[j]
        total = sum_lanes_in_tree(lanes)
        row_dot = total * inverse_sum[r]  # rowsum(P * dP)
        factor = inverse_sum[r] * scale
        for block in range(key_blocks):
            exp_row, grad_row = exps[block, r], grads[block, r]
            for j in range(TILE_COLS):
                grad_row[j] = exp_row[j] * (grad_row[j] - row_dot) * factor


@njit(**SERIAL)
def gemm_into_tiles(depth, a, a_start, a_row_step, a_depth_step, rows, b, b_start, b_block_step, b_row_step,
                     c, c_start, c_block_step, c_row_step, width, accumulate):
    """C[rows, width] (+)= A[rows, depth] B[depth, width] over flat arrays; column block n of B starts
    b_block_step floats after block n - 1 (64 for a row-major B, rows * 64 for a block-major one),
    likewise C. 64-column blocks outermost (B's block stays in L1), TILE_ROWS row groups inside."""
    for block in range(width // TILE_COLS):
        b_at = b_start + block * b_block_step
        c_at = c_start + block * c_block_step
        for r0 in range(0, rows, TILE_ROWS):
            tile(depth, a, a_start + r0 * a_row_step, a_row_step, a_depth_step, min(TILE_ROWS, rows - r0),
                 b, b_at, b_row_step, c, c_at + r0 * c_row_step, c_row_step, accumulate)


@njit(**SERIAL)
def query_blocks_backward(qs, q, keys_t, values_t, keys_padded, grad_rows, n_keys, causal, scale, q_begin,
                          q_end, grad_q, grad_keys_t, grad_values_t, exps, grads, grad_scaled, dq_block,
                          inverse_sum):
    """Steps 1-7 for the queries [q_begin, q_end) of one slice (module docstring); dk^T, dv^T are
    added into grad_keys_t [Mp/64, d, 64], grad_values_t [Mp/64, dv, 64]. Block-major (keys_t,
    values_t, exps, grads, grad_*_t: [Mp/64, rows, 64]): a tile's 6 rows of 64 and a block's rows of B
    are contiguous runs, which the hardware prefetcher follows (row-major [Q, Mp] tiles, rows 16 KiB
    apart, ran the GEMMs at 35-60 GFLOP/s in place against ~100 alone)."""
    dim, value_dim = qs.shape[1], grad_rows.shape[1]
    block_rows = exps.shape[1]  # Q
    padded_dim = keys_padded.shape[1]
    qs_flat, q_flat, do_flat = qs.reshape(-1), q.reshape(-1), grad_rows.reshape(-1)
    kt_flat, vt_flat, kp_flat = keys_t.reshape(-1), values_t.reshape(-1), keys_padded.reshape(-1)
    exps_flat, grads_flat = exps.reshape(-1), grads.reshape(-1)
    dkt_flat, dvt_flat = grad_keys_t.reshape(-1), grad_values_t.reshape(-1)
    scaled_flat, dq_flat = grad_scaled.reshape(-1), dq_block.reshape(-1)
    tile_block = block_rows * TILE_COLS  # floats per key block of exps, grads
    for q0 in range(q_begin, q_end, block_rows):
        rows = min(block_rows, q_end - q0)
        visible = min(n_keys, q0 + rows) if causal else n_keys  # keys any query of the block sees
        width = padded(visible, TILE_COLS)
        key_blocks = width // TILE_COLS
        limit_base = q0 + 1 if causal else NO_LIMIT  # row 0 sees the keys before q0 + 1
        # 1. S = qs k^T
        gemm_into_tiles(dim, qs_flat, q0 * dim, dim, 1, rows, kt_flat, 0, dim * TILE_COLS, TILE_COLS,
                         exps_flat, 0, tile_block, TILE_COLS, width, False)
        # 2. E = 2^(S - max) in place (0 where masked), 1 / row sums
        _softmax_rows(exps, rows, key_blocks, limit_base, visible, inverse_sum)
        # 3. dP = dO v^T
        gemm_into_tiles(value_dim, do_flat, q0 * value_dim, value_dim, 1, rows, vt_flat, 0,
                         value_dim * TILE_COLS, TILE_COLS, grads_flat, 0, tile_block, TILE_COLS, width, False)
        # 4. dS in place of dP
        _grad_scores_rows(exps, grads, rows, key_blocks, inverse_sum, scale)
        # 5. dv^T += (dO / l)^T E: A(r, t) = dO[q0 + t, r] / l[t], read from grad_scaled [Q, dv]
        for t in range(rows):
            for c in range(value_dim):
                grad_scaled[t, c] = grad_rows[q0 + t, c] * inverse_sum[t]
        gemm_into_tiles(rows, scaled_flat, 0, 1, value_dim, value_dim, exps_flat, 0, tile_block, TILE_COLS,
                         dvt_flat, 0, value_dim * TILE_COLS, TILE_COLS, width, True)
        # 6. dk^T += q^T dS
        gemm_into_tiles(rows, q_flat, q0 * dim, 1, dim, dim, grads_flat, 0, tile_block, TILE_COLS,
                         dkt_flat, 0, dim * TILE_COLS, TILE_COLS, width, True)
        # 7. dq = dS k, one key block (depth 64) at a time from the block-major dS: the first stores
        for block in range(key_blocks):
            gemm_into_tiles(TILE_COLS, grads_flat, block * tile_block, TILE_COLS, 1, rows, kp_flat,
                             block * TILE_COLS * padded_dim, TILE_COLS, padded_dim, dq_flat, 0, TILE_COLS,
                             padded_dim, padded_dim, block > 0)
        grad_q[q0:q0 + rows, :] = dq_block[:rows, :dim]


def slice_operands(q, k, v, grad_out, log2_scale):
    """One slice's operands (views, any strides) in this worker's buffers, laid out for the tiles:
    -> qs [N,d] = q * scale * log2(e), q [N,d] and dO [N,dv] contiguous, k^T and v^T by key blocks
    [Mp/64, d|dv, 64], k padded [Mp,Dp] (Mp, Dp: M, d rounded up to 64; the padding zero)."""
    dim = q.shape[1]
    key_blocks = padded(max(1, k.shape[0]), TILE_COLS) // TILE_COLS
    qs = scratch("attn_v4_qs", q.shape)                                 # [N,d] = q * scale * log2(e)
    np.multiply(q, log2_scale, out=qs)
    q_rows = scratch("attn_v4_q", q.shape)                              # [N,d] contiguous
    np.copyto(q_rows, q)
    grad_rows = scratch("attn_v4_do", grad_out.shape)                   # [N,dv] contiguous
    np.copyto(grad_rows, grad_out)
    keys_t = scratch("attn_v4_kt", (key_blocks, dim, TILE_COLS))       # [Mp/64,d,64] = k^T by key blocks
    pack_key_blocks(k, keys_t)
    values_t = scratch("attn_v4_vt", (key_blocks, v.shape[1], TILE_COLS))  # [Mp/64,dv,64]
    pack_key_blocks(v, values_t)
    keys_padded = scratch("attn_v4_kp", (key_blocks * TILE_COLS, padded(dim, TILE_COLS)))  # [Mp,Dp]
    pack_padded(k, keys_padded)
    return qs, q_rows, grad_rows, keys_t, values_t, keys_padded


def slice_parts(slices, n_queries, workers):
    """Query ranges per slice: one when there are enough slices, else as many as keep `workers` busy
    (each at least one QUERY_BLOCK)."""
    parts = 1 if slices >= workers else -(-workers // max(1, slices))
    parts = max(1, min(parts, -(-n_queries // QUERY_BLOCK)))
    step = max(QUERY_BLOCK, padded(-(-n_queries // parts), QUERY_BLOCK))
    return [(start, min(n_queries, start + step)) for start in range(0, n_queries, step)] or [(0, 0)]


def outputs_and_slices(q, k, v):
    """-> dq, dk, dv (empty float32 arrays shaped as q, k, v, each in its input's memory order) and the
    index of every [N,d] slice (each (batch, head) of the leading axes). The memory order: the heads of
    split_heads are [B,h,N,d] views of [B,N,h*d], so the gradients come out token-major too and
    merge_heads finds them ready (no [B,N,h*d] transposing copy on one thread per gradient)."""
    lead = q.shape[:-2]
    grad_q = np.empty_like(q, np.float32)                               # [...,N,d]
    grad_k = np.empty_like(k, np.float32)                               # [...,M,d]
    grad_v = np.empty_like(v, np.float32)                               # [...,M,dv]
    slices = [np.unravel_index(index, lead) if lead else () for index in range(math.prod(lead))]
    return grad_q, grad_k, grad_v, slices


def attention_backward_fused(q, k, v, grad_out, scale=None, is_causal=False):
    """Version 4 (no mask): -> (dq [...,N,d], dk [...,M,d], dv [...,M,dv])."""
    scale = default_scale(q, scale)
    n_queries, n_keys, dim, value_dim = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    padded_keys, padded_dim = padded(max(1, n_keys), TILE_COLS), padded(dim, TILE_COLS)
    key_blocks = padded_keys // TILE_COLS
    grad_q, grad_k, grad_v, slices = outputs_and_slices(q, k, v)
    parts = slice_parts(len(slices), n_queries, worker_count())
    part_grads = {}                                                     # (slice, part) -> (dk^T, dv^T)
    log2_scale = np.float32(scale * float(LOG2E))

    def run_part(task):
        index, part = task
        at = slices[index]
        q_begin, q_end = parts[part]
        # 0. the slice's operands, packed into this worker's buffers
        qs, q_rows, grad_rows, keys_t, values_t, keys_padded = slice_operands(q[at], k[at], v[at], grad_out[at],
                                                                             log2_scale)
        grad_keys_t = np.zeros((key_blocks, dim, TILE_COLS), np.float32)  # [Mp/64,d,64] summed over query blocks
        grad_values_t = np.zeros((key_blocks, value_dim, TILE_COLS), np.float32)  # [Mp/64,dv,64]
        query_blocks_backward(
            qs, q_rows, keys_t, values_t, keys_padded, grad_rows, n_keys, is_causal, np.float32(scale),
            q_begin, q_end, grad_q[at], grad_keys_t, grad_values_t,
            scratch("attn_v4_exps", (key_blocks, QUERY_BLOCK, TILE_COLS)),  # [Mp/64,Q,64] S, then E
            scratch("attn_v4_grads", (key_blocks, QUERY_BLOCK, TILE_COLS)),  # [Mp/64,Q,64] dP, then dS
            scratch("attn_v4_do_scaled", (QUERY_BLOCK, value_dim)),     # [Q,dv]
            scratch("attn_v4_dq", (QUERY_BLOCK, padded_dim)),           # [Q,Dp]
            scratch("attn_v4_inverse_sum", (QUERY_BLOCK,)))             # [Q]
        part_grads[task] = (grad_keys_t, grad_values_t)

    tasks = [(index, part) for index in range(len(slices)) for part in range(len(parts))]
    run_blocks(run_part, tasks)
    for index, at in enumerate(slices):
        grad_keys_t, grad_values_t = part_grads[(index, 0)]
        for part in range(1, len(parts)):
            grad_keys_t += part_grads[(index, part)][0]
            grad_values_t += part_grads[(index, part)][1]
        unpack_key_blocks(grad_keys_t, grad_k[at])                      # [Mp/64,d,64] -> [M,d]
        unpack_key_blocks(grad_values_t, grad_v[at])                    # [Mp/64,dv,64] -> [M,dv]
    return grad_q, grad_k, grad_v
