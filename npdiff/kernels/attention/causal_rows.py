"""Version 7: causal self-attention of a few tokens on the projections' rows as they are (CLIP's 77 tokens).

    out = causal_attention_rows(q, k, v, batch, heads, scale)   # q, k, v, out: [B*L, heads*d]

q, k and v are the q_proj/k_proj/v_proj outputs, token rows [B*L, heads*d] (head h in columns h*d..h*d+d):
no [B,h,L,d] transposed copies are made, and the output is written merged, [B*L, heads*d], the rows out_proj
reads. Query i attends to keys 0..i (torch's is_causal: top-left aligned); no mask.

Why not versions 3-5 (kernels/attention/__init__.py): at L = 77 a head's scores are 77 x 77 floats, and the
BLAS calls, the head transposes, the merge copy and the pool's hand-offs cost more than the arithmetic
(CLIP-L: 12 heads x 2 prompts, 36 MFLOP a layer).

One task per (prompt, head), prange over them (24 for CLIP-L: 12 per core). Both products run on
linear_packed_tile.row_tile (the 6 x 64 register-blocked micro-kernel of matmul_numba.py, the lesson's step 6,
reading its A operand as rows), so only k and v are copied per task (a few KB: L1/L2):
  1. k's head rows as NR-column panels of k^T [L/NR, d, NR], v's head rows as NR-column panels [d/NR, L, NR]
     (zero past the ends); q is read where it lies (its head's columns of the prompt's rows).
  2. scores S = q k^T into a [L, L/NR * NR] row buffer, for each MR-query panel only the key panels it may
     attend to (causal).
  3. per query i, in its row: s * scale * log2(e), the keys past i set to -inf, the max (in 16 lanes),
     p_j = 2^(s_j - max) (vecmath's exp2_nonpositive_f32: 0 at -inf exactly), over whole vectors of 16 keys
     (a loop of i + 1 keys would run its remainder one key at a time); p / sum in place, zero past key i.
  4. out = P v, for each MR-query panel only over the keys 0..its last query, straight into out's rows.
Session 11's version packed q (times the scale) and P into MR-row panels for the micro-kernel: those copies and
the scalar max were half of its time (one thread, a CLIP-L layer: pack 0.21 ms, softmax 0.22, the products 0.25).

Same bits in every process: no fastmath flag anywhere in this file or the micro-kernel; the softmax's sum runs
in 16 lanes combined in an order written out (step 3), the max is exact in any order, and the GEMMs' FMAs are
explicit. Each query's arithmetic is the same whichever thread runs its task, so the thread count changes
nothing either.
"""

import numpy as np
from numba import carray, config, get_thread_id

from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels.linear_packed_tile import NO_ACTIVATION, row_tile
from npdiff.kernels.matmul_numba import MR, NR, _stack_row, sum_lanes_in_tree
from npdiff.kernels.scratch import scratch
from npdiff.kernels.vecmath import LOG2E, exp2_nonpositive_f32

KEY_VECTOR = 16  # float32 lanes of one AVX-512 register


@njit(**SERIAL)
def _pack_head(k, v, row0, c0, length, head_dim, k_panels, v_panels):
    """Step 1: one (prompt, head)'s k and v rows into the micro-kernel's B layouts (zero past the ends)."""
    k_panels[:] = 0.0
    v_panels[:] = 0.0
    for j in range(length):
        k_panel, k_lane = j // NR, j % NR
        for c in range(head_dim):
            k_panels[k_panel, c, k_lane] = k[row0 + j, c0 + c]
        for value_panel in range(v_panels.shape[0]):
            c_first = value_panel * NR
            for c in range(c_first, min(head_dim, c_first + NR)):
                v_panels[value_panel, j, c - c_first] = v[row0 + j, c0 + c]


@njit(**SERIAL)
def _lanes_max(scores, query, width):
    """max(scores[query, :width]) for width a multiple of KEY_VECTOR: a lane-wise max over the vectors (the loop
    LLVM vectorises; a max carried through one scalar ran a key at a time), then over the lanes. Exact in any
    order. (Rows and chunks are indexed, not sliced: a view of the work buffer the threads share takes its
    reference count, an atomic add on a header both cores write.)"""
    lanes = carray(_stack_row(), KEY_VECTOR)
    for lane in range(KEY_VECTOR):
        lanes[lane] = scores[query, lane]
    for j0 in range(KEY_VECTOR, width, KEY_VECTOR):
        for lane in range(KEY_VECTOR):
            lanes[lane] = max(lanes[lane], scores[query, j0 + lane])
    top = lanes[0]
    for lane in range(1, KEY_VECTOR):
        top = max(top, lanes[lane])
    return top


@njit(**SERIAL)
def _lanes_exp2_sum(scores, query, width, top):
    """scores[query, j] = 2^(scores[query, j] - top) for j < width (a multiple of KEY_VECTOR) -> their sum,
    accumulated in KEY_VECTOR lanes (a stack row) and the lanes added in a fixed tree: no fastmath flag reorders
    it. The exponentials first, in a loop of their own (elementwise: LLVM vectorises it without reordering
    anything)."""
    for j in range(width):
        scores[query, j] = exp2_nonpositive_f32(scores[query, j] - top)
    lanes = carray(_stack_row(), KEY_VECTOR)
    for lane in range(KEY_VECTOR):
        lanes[lane] = scores[query, lane]
    for j0 in range(KEY_VECTOR, width, KEY_VECTOR):
        for lane in range(KEY_VECTOR):
            lanes[lane] += scores[query, j0 + lane]
    return sum_lanes_in_tree(lanes)


@njit(**SERIAL)
def _softmax_row(scores, query, depth, scale_log2):
    """Step 3 for one query: scores[query, :query + 1] (q.k) -> p_j = softmax(scale * q.k)_j over the keys
    j <= query, in place; scores[query, query + 1:depth] = 0 (the keys its query panel's P v reads past it). No
    fastmath flag: the sum runs in KEY_VECTOR lanes in an order written out (_lanes_exp2_sum), so every compiled
    copy of this function gives the same bits (with 'reassoc' the vectoriser chose the order, and the copy Numba
    compiled in the process and the one it loaded from its disk cache added in different orders:
    matmul_numba.py's header says why two exist)."""
    keys = query + 1
    width = (keys + KEY_VECTOR - 1) // KEY_VECTOR * KEY_VECTOR  # whole vectors: within the row buffer's padding
    for j in range(keys):
        scores[query, j] *= scale_log2  # log2 units: 2^x below
    for j in range(keys, width):
        scores[query, j] = -np.inf  # the masked keys: 2^-inf = 0 exactly
    top = _lanes_max(scores, query, width)
    inverse = np.float32(1.0) / _lanes_exp2_sum(scores, query, width, top)
    for j in range(keys):
        scores[query, j] *= inverse
    for j in range(keys, depth):
        scores[query, j] = 0.0


def _work_sizes(length, head_dim):
    """Floats of each per-thread buffer of a task: k_panels, v_panels, scores."""
    query_panels = (length + MR - 1) // MR
    key_panels = (length + NR - 1) // NR
    value_panels = (head_dim + NR - 1) // NR
    return (key_panels * head_dim * NR, value_panels * length * NR, query_panels * MR * key_panels * NR)


_work_sizes_numba = njit(**SERIAL)(_work_sizes)


@njit(**SERIAL)
def attention_head_rows(q_rows, k_rows, v_rows, c0, head_dim, scale_log2, out_rows, mine):
    """One prompt's one head: out_rows[:, c0:c0+d] = softmax(q k^T * scale, causal) v over the columns c0..c0+d
    of the prompt's rows q_rows, k_rows, v_rows [L, heads*d]; mine: the calling thread's buffers (work_floats)."""
    length = q_rows.shape[0]
    query_panels = (length + MR - 1) // MR
    key_panels = (length + NR - 1) // NR
    value_panels = (head_dim + NR - 1) // NR
    k_size, v_size, scores_size = _work_sizes_numba(length, head_dim)
    start = 0
    k_panels = mine[start:start + k_size].reshape((key_panels, head_dim, NR))  # [L/NR, d, NR]: k^T's columns
    start += k_size
    v_panels = mine[start:start + v_size].reshape((value_panels, length, NR))  # [d/NR, L, NR]
    start += v_size
    scores = mine[start:start + scores_size].reshape((query_panels * MR, key_panels * NR))  # [L, L] padded
    tile = np.empty((2, MR, NR), np.float32)  # row_tile's buffers: an array of this thread's own (row_tile says why)
    unused_bias = mine[:1]  # row_tile's bias and residual arguments (neither is read: no epilogue)
    # 1. k and v packed into this thread's buffers (a few KB each)
    _pack_head(k_rows, v_rows, 0, c0, length, head_dim, k_panels, v_panels)
    for panel in range(query_panels):
        first = panel * MR
        valid = min(MR, length - first)
        last = first + valid - 1  # the panel's last query: it sees keys 0..last
        # 2. scores of the key panels this query panel may attend to (the head's columns of q's rows)
        for key_panel in range(last // NR + 1):
            row_tile(head_dim, q_rows, c0, first, valid, k_panels[key_panel], scores, key_panel * NR, NR, False,
                     True, unused_bias, False, NO_ACTIVATION, scores, False, tile, k_panels, 0, 0)
        # 3. softmax of each query's keys 0..i, in its row of the scores
        for query in range(first, last + 1):
            _softmax_row(scores, query, last + 1, scale_log2)
        # 4. this panel's rows of P v, into out (the head's columns)
        depth = last + 1
        for value_panel in range(value_panels):
            row_tile(depth, scores, 0, first, valid, v_panels[value_panel, :depth], out_rows,
                     c0 + value_panel * NR, min(NR, head_dim - value_panel * NR), False, True, unused_bias, False,
                     NO_ACTIVATION, scores, False, tile, k_panels, 0, 0)


def work_floats(length, head_dim):
    """Floats of the buffers attention_head_rows needs for a prompt of `length` tokens and heads of head_dim."""
    return sum(_work_sizes(length, head_dim))


@njit(**PARALLEL)
def _causal_attention_rows_numba(q, k, v, batch, heads, scale_log2, out, work):
    """One task per (prompt, head). work [threads, floats]: each thread's buffers (np.empty inside the prange
    made the two threads ~5x slower than one: measured 3.4-8 ms against 0.7 ms for a CLIP-L layer)."""
    length = q.shape[0] // batch
    head_dim = q.shape[1] // heads
    for task in prange(batch * heads):
        b = task // heads
        rows = slice(b * length, (b + 1) * length)
        attention_head_rows(q[rows], k[rows], v[rows], (task - b * heads) * head_dim, head_dim, scale_log2, out[rows],
                            work[get_thread_id()])


def causal_attention_rows(q, k, v, batch, heads, scale, out=None):
    """softmax(q k^T * scale, causal) v per (prompt, head): q, k, v [B*L, heads*d] float32 C-contiguous
    token rows -> [B*L, heads*d], the heads merged (into `out` when given: C-contiguous, q's shape)."""
    out = np.empty_like(q) if out is None else out  # [B*L, heads*d]
    if q.size:
        floats = work_floats(q.shape[0] // batch, q.shape[1] // heads)
        work = scratch("causal attention work", (config.NUMBA_NUM_THREADS, floats))  # [threads, floats]
        _causal_attention_rows_numba(q, k, v, batch, heads, np.float32(scale * LOG2E), out, work)
    return out
