"""Attention version 6: bfloat16 attention on AMX tiles, for models loaded at precision="bf16".

What is computed (what torch's CPU attention does for bf16 tensors, and OpenVINO's bf16 mode):
q, k and v rounded to bf16; the scores q k^T summed in float32 (AMX's tdpbf16ps); scale, mask and
softmax in float32; the unnormalised probabilities p = exp(s - row max) rounded to bf16 and
multiplied with v on the tiles (float32 sums); each row divided by the float32 sum of its
UNROUNDED p at the end. attention_bf16_ref is that recipe in NumPy (version 1 on the rounded
operands), the reference the tests hold this version to (with torch doing the same rounding).

  per (batch, head) slice, once:  k -> key_bits [M32, d32] uint16, v^T -> value_bits [dv32, M32]
                                  (bf16, zero-padded to multiples of 32: AMX's A operands)
  per task = one slice, queries [start, start + Q), Q32 = Q rounded up to 32:
    0. q_words [Q32/64 panels, d32/2 pairs, 64] uint32 = pairs of bf16 of q^T (B operand layout of
       matmul_amx.py; the padded queries are zero)
    1. scores^T [M32, Q32] = key_bits @ q^T                     (AMX, matmul_amx.amx_gemm_block)
    2. softmax down every column (one query's scores over all keys), as version 5 does
       (fused.py): column max, 2^(s * scale * log2 e - max), column sums; each pair of keys'
       probabilities rounded to bf16 into one word: p_words [Q32/64, M32/2, 64] uint32, the B
       operand of step 3 (softmax_keys_to_pairs, Numba)
    3. out^T [dv32, Q32] = value_bits @ p^T                     (AMX)
    4. out [Q, dv] = out^T transposed, each row times 1 / its sum (fused.store_normalised_transposed)
  A mask or is_causal: between 1 and 2 the tile is scaled and the mask added in NumPy (as version
  5 does), and step 2 runs with scale 1.

Why transposed (keys along rows): the softmax's max and sum run per lane down the columns (no
horizontal reductions), and a pair of keys is two neighbouring rows, so step 2 writes the
VNNI pairs that step 3's tiles read with no transposition. Both GEMMs reuse the bf16 GEMM's tile
kernel (matmul_amx.py): its A is row-major bf16, its B panels of 64 columns of pairs.

Padding: d = 40 runs as 64 (two steps of 32 k), 80 as 96, 64 and 160 as they are; the second
product's output rows dv likewise. The padded products are zeros and never read.

Where the time goes (one core, [4096 keys, 64 queries, d = 40], ns per score): step 1 0.31, step 2
0.41, step 3 0.24. The tile products themselves are a small part (tdpbf16ps ~5 ns each on resident
tiles, i.e. ~0.04 ns per score per product): the tile stores of step 1 into the 1 MiB scores^T tile
(~35 ns per 1 KiB tile) and the loads of each step, waiting on one another in the 8 tile registers,
are what cost. Tried and slower: steps 1-2 in 16-key chunks kept in L1 (the products made twice, once
for the column maxima, once for the probabilities; one C tile at a time): 0.89 against 0.72 for
steps 1-2, the chain of dependent tile instructions of a chunk being longer than the stores saved.

Every block's arithmetic depends only on its own rows, never on which worker runs it: the same
bytes on 1 or 2 threads. Queries that may attend to no key give 0 (as every version).
"""

import math

import numpy as np

from npdiff.jit import FASTMATH_CONTRACT, SERIAL, njit
from npdiff.kernels.attention.common import default_scale, mask_to_additive, masked_row_max
from npdiff.kernels.attention.amx_bf16 import bf16_of
from npdiff.kernels.attention.fused import KEY_INTERLEAVE, column_maxima, store_normalised_transposed
from npdiff.kernels.attention.reference import full_scores
from npdiff.kernels.bf16_rounding import round_rows, rounded_to_bf16
from npdiff.kernels.block_pool import run_blocks, worker_count
from npdiff.kernels.matmul_amx import BLOCK, START_ZERO, TILE_CONFIG, amx_gemm_block
from npdiff.kernels.scratch import scratch
from npdiff.kernels.vecmath import LOG2E, exp2_nonpositive_f32

PANEL = 64  # columns of a B panel of the AMX kernel (matmul_dpbf16.NR)
AMX_TILE_FLOATS = 1 << 18  # scores per task's tile: 1 MiB (M32 x Q32), in a core's L2
AMX_MIN_QUERY_BLOCK = 32
AMX_MAX_QUERY_BLOCK = 512
AMX_MAX_KEYS = (4 << 20) // AMX_MIN_QUERY_BLOCK  # 131072 keys: a 4 MiB tile at the smallest block


def round_up(n, multiple):
    return -(-n // multiple) * multiple


def amx_query_block(n_keys):
    """Queries per task for M = n_keys keys: about AMX_TILE_FLOATS scores, a multiple of 64 (one B panel)
    when it can be, never below AMX_MIN_QUERY_BLOCK."""
    fitting = AMX_TILE_FLOATS // round_up(max(1, n_keys), BLOCK) // PANEL * PANEL
    return min(AMX_MAX_QUERY_BLOCK, max(AMX_MIN_QUERY_BLOCK, fitting))


# ---------------------------------------------------------------------------------------------
# The reference: version 1 on bf16-rounded operands, probabilities rounded before @ v
# ---------------------------------------------------------------------------------------------
def attention_bf16_ref(q, k, v, mask=None, scale=None, is_causal=False):
    """softmax(q k^T * scale + mask) v as version 6 computes it, in NumPy: q, k, v rounded to bf16,
    the unnormalised probabilities rounded to bf16 before @ v, rows divided by the float32 sums."""
    if q.shape[-2] == 0 or k.shape[-2] == 0:  # no query, or no key to attend to: 0 (as torch)
        return np.zeros(q.shape[:-1] + (v.shape[-1],), np.float32)  # [...,N,dv]
    q, k, v = rounded_to_bf16(q), rounded_to_bf16(k), rounded_to_bf16(v)  # [...,N,d], [...,M,d], [...,M,dv]
    scores = full_scores(q, k, mask, default_scale(q, scale), is_causal, np)  # [...,N,M]
    probs = np.exp(scores - masked_row_max(scores))  # [...,N,M]
    row_sum = probs.sum(axis=-1, keepdims=True)  # [...,N,1], of the unrounded probabilities
    out = np.matmul(rounded_to_bf16(probs), v)  # [...,N,M] @ [...,M,dv] -> [...,N,dv]
    return out / np.where(row_sum == 0, np.float32(1.0), row_sum)  # masked rows stay 0


# ---------------------------------------------------------------------------------------------
# Operand packing and the softmax pass (Numba, serial: they run on pool workers)
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def pack_query_pairs(q_block, q_words):
    """q_block [Q, d] float32 (any strides) -> q_words [panels, pairs, 64] uint32: word (panel, p, j)
    = bf16(q[i, 2p]) | bf16(q[i, 2p+1]) << 16 for query i = panel * 64 + j (B = q^T in pairs);
    queries past Q, pairs past d and an odd d's missing partner are zero. bf16_of rounds (branch-free:
    39 -> 9 ns per query of 40 values with bf16_rounding.pair_word; a denormal becomes 0, as the tiles
    read a denormal bf16 anyway)."""
    rows, depth = q_block.shape
    q_words[:] = 0
    for i in range(rows):
        panel, j = i // PANEL, i % PANEL
        row = q_block[i]  # [d]
        for p in range(depth // 2):
            q_words[panel, p, j] = bf16_of(row[2 * p]) | (bf16_of(row[2 * p + 1]) << np.uint32(16))
        if depth % 2:
            q_words[panel, depth // 2, j] = bf16_of(row[depth - 1])


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def softmax_keys_to_pairs(scores_t, n_keys, factor, p_words, col_sum):
    """scores_t [M32, Q32] (rows = keys; the first n_keys count) -> p_words [panels, M32/2, 64] uint32:
    the bf16 pairs of 2^(s * factor - column max) (keys 2p and 2p+1 of column j in word (j // 64,
    p, j % 64); pairs past n_keys zero), col_sum [Q32] = the float32 column sums (unrounded values).
    A column that is all -inf gets max 0: its probabilities and sum are 0; NaN stays NaN. factor > 0.

    As fused.softmax_keys_in_place: the column maxima and sums in KEY_INTERLEAVE rows (column_maxima,
    `partial`), so that neighbouring keys do not wait for each other's store. Measured on one core
    at [4096, 64]: 0.41 ns per score (version 5's pass, which writes float32 and no pairs: 0.33);
    with bf16_bits' integer rounding 0.48; with the pair's two rows in a helper called per pair 0.56."""
    keys_padded, cols = scores_t.shape
    # 1. column maxima of the raw scores (factor > 0 keeps the order), NaN skipped; in s * factor units
    col_max = column_maxima(scores_t, n_keys)  # [Q32]
    for c in range(cols):
        col_max[c] = col_max[c] * factor if col_max[c] != -np.inf else np.float32(0.0)
    # 2. probabilities of keys 2p and 2p+1, rounded into one word; sums of the float32 values
    partial = np.zeros((KEY_INTERLEAVE, cols), np.float32)  # [4,Q32] sums
    for pair in range(n_keys // 2):
        lane = 2 * (pair % 2)
        low_row, high_row = scores_t[2 * pair], scores_t[2 * pair + 1]  # [Q32] each
        for panel in range(p_words.shape[0]):
            first = panel * PANEL
            words = p_words[panel, pair]  # [64]
            for j in range(min(PANEL, cols - first)):
                c = first + j
                low = exp2_nonpositive_f32(low_row[c] * factor - col_max[c])
                high = exp2_nonpositive_f32(high_row[c] * factor - col_max[c])
                partial[lane, c] += low
                partial[lane + 1, c] += high
                words[j] = bf16_of(low) | (bf16_of(high) << np.uint32(16))
    # 3. an odd last key pairs with a zero; the padded keys' pairs are zero
    if n_keys % 2:
        last_row = scores_t[n_keys - 1]  # [Q32]
        for c in range(cols):
            low = exp2_nonpositive_f32(last_row[c] * factor - col_max[c])
            partial[0, c] += low
            p_words[c // PANEL, n_keys // 2, c % PANEL] = bf16_of(low)
    p_words[:, (n_keys + 1) // 2:, :] = 0
    for c in range(cols):
        col_sum[c] = (partial[0, c] + partial[1, c]) + (partial[2, c] + partial[3, c])


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def mask_scores(scores_t, query_start, rows, n_keys, factor, additive, has_mask, is_causal):
    """scores_t[:n_keys, :rows] (keys x the block's queries) -> log2 units (times factor), plus the
    mask (additive [N, M] float32, the slice's) in log2 units; keys after each query -inf (causal)."""
    for r in range(n_keys):
        for c in range(rows):
            x = scores_t[r, c] * factor
            if has_mask:
                x += additive[query_start + c, r] * LOG2E
            if is_causal and r > query_start + c:
                x = -np.inf
            scores_t[r, c] = x


@njit(**SERIAL)
def attend_query_blocks(config, key_bits, value_bits, queries, n_keys, factor, additive, has_mask, is_causal,
                        first, stop, query_block, out, q_words, scores_t, p_words, col_sum, out_t, edge, no_init):
    """Steps 0-4 of the header for the query blocks of one slice that start in [first, stop), on this
    thread's tiles: queries [N, d] and out [N, dv] the slice's (any strides); key_bits [M32, d32] and
    value_bits [dv32, M32] its rounded operands; the rest this worker's buffers (q_words [panels,
    d32/2, 64], scores_t [M32, Q32], p_words [panels, M32/2, 64], col_sum [Q32], out_t [dv32, Q32])."""
    n_queries, value_dim = queries.shape[0], out.shape[1]
    keys_padded, cols = scores_t.shape
    depth_steps = key_bits.shape[1] // BLOCK
    for query_start in range(first, stop, query_block):
        query_stop = min(query_start + query_block, n_queries)
        rows = query_stop - query_start
        # 0. q^T as bf16 pairs (queries past the block zero)
        pack_query_pairs(queries[query_start:query_stop], q_words)
        # 1. scores^T = k @ q^T on the tiles
        amx_gemm_block(config, key_bits, 0, depth_steps, q_words, q_words.shape[1] * PANEL, 0,
                       scores_t, 0, keys_padded, 0, cols, START_ZERO, no_init, (0, 1), edge)
        block_factor = factor
        if has_mask or is_causal:
            mask_scores(scores_t, query_start, rows, n_keys, factor, additive, has_mask, is_causal)
            block_factor = np.float32(1.0)
        # 2. probabilities as bf16 pairs of keys, float32 column sums
        softmax_keys_to_pairs(scores_t, n_keys, block_factor, p_words, col_sum)
        # 3. out^T = v^T @ p^T on the tiles
        amx_gemm_block(config, value_bits, 0, keys_padded // BLOCK, p_words, p_words.shape[1] * PANEL, 0,
                       out_t, 0, out_t.shape[0], 0, cols, START_ZERO, no_init, (0, 1), edge)
        # 4. transposed into the output, rows divided by their sums
        store_normalised_transposed(out_t[:value_dim, :rows], col_sum[:rows], out[query_start:query_stop])


# ---------------------------------------------------------------------------------------------
# Version 6
# ---------------------------------------------------------------------------------------------
def attention_amx(q, k, v, mask=None, scale=None, is_causal=False, query_block=None):
    """q [..., N, d], k [..., M, d], v [..., M, dv] NumPy float32 (any strides); mask bool (True =
    attend) or additive float, broadcastable to [..., N, M]. Runs on AMX tiles: the caller checks
    bf16_kernel() == "amx". query_block: queries per block (default from M, amx_query_block).
    Returns [..., N, dv] float32."""
    lead = q.shape[:-2]
    n_queries, n_keys, depth, value_dim = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    query_block = query_block or amx_query_block(n_keys)
    scale_log2 = np.float32(default_scale(q, scale) * float(LOG2E))  # scores -> log2 units
    additive = np.zeros((1, 1), np.float32)  # no mask
    if mask is not None:
        additive = mask_to_additive(np.broadcast_to(mask, lead + (n_queries, n_keys)))  # [...,N,M] float32
    keys_padded, depth_padded, value_padded = round_up(n_keys, BLOCK), round_up(depth, BLOCK), round_up(value_dim, BLOCK)
    cols = round_up(min(query_block, n_queries), BLOCK)  # queries of a block, padded for the tiles
    panels = -(-cols // PANEL)
    slices = [np.unravel_index(s, lead) for s in range(math.prod(lead))]  # index of each [N,d] slice
    out = np.empty_like(q, np.float32, shape=lead + (n_queries, value_dim))  # [...,N,dv], q's memory order
    # the rounded k and v^T of every slice: the calling thread's buffers, read by every worker
    key_bits = scratch("amx_attention_k", (len(slices), keys_padded, depth_padded // 2)).view(np.uint16)  # [L,M32,d32]
    value_bits = scratch("amx_attention_v", (len(slices), value_padded, keys_padded // 2)).view(np.uint16)  # [L,dv32,M32]

    def round_slice(s):
        round_rows(k[slices[s]], 0, n_keys, key_bits[s])  # [M,d] -> [M32,d32] bf16
        round_rows(v[slices[s]].T, 0, value_dim, value_bits[s])  # [M,dv] -> [dv,M] -> [dv32,M32] bf16

    run_blocks(round_slice, list(range(len(slices))))

    def run_task(task):
        s, first, stop = task
        at = slices[s]
        q_words = scratch("amx_attention_q", (panels, depth_padded // 2, PANEL)).view(np.uint32)  # [panels,d32/2,64]
        scores_t = scratch("amx_attention_scores_t", (keys_padded, cols))  # [M32,Q32]
        p_words = scratch("amx_attention_p", (panels, keys_padded // 2, PANEL)).view(np.uint32)  # [panels,M32/2,64]
        col_sum = scratch("amx_attention_sums", (cols,))  # [Q32]
        out_t = scratch("amx_attention_out_t", (value_padded, cols))  # [dv32,Q32]
        edge = scratch("amx_attention_edge", (BLOCK, BLOCK))  # unused: every tile block is whole
        no_init = scratch("amx_attention_no_init", (1, 1))
        slice_mask = additive if mask is None else additive[at]  # [N,M] (a view)
        attend_query_blocks(TILE_CONFIG, key_bits[s], value_bits[s], q[at], n_keys, scale_log2, slice_mask,
                            mask is not None, is_causal, first, stop, query_block, out[at], q_words, scores_t,
                            p_words, col_sum, out_t, edge, no_init)

    run_blocks(run_task, query_tasks(len(slices), n_queries, query_block, worker_count()))
    return out


def query_tasks(n_slices, n_queries, query_block, workers):
    """[(slice, first query, stop), ...]: each slice's query blocks in runs of whole blocks, about
    4 tasks per worker in all (one Python call per task, however many blocks it holds)."""
    blocks_per_slice = -(-n_queries // query_block)
    per_task = max(1, -(-n_slices * blocks_per_slice // (4 * workers)))  # blocks per task
    span = per_task * query_block
    return [(s, first, min(first + span, n_queries)) for s in range(n_slices) for first in range(0, n_queries, span)]
