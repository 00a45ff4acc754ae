"""Version 7: causal self-attention of a few tokens on the projections' rows as they are (CLIP's 77 tokens).

    out = causal_attention_rows(q, k, v, batch, heads, scale)   # q, k, v, out: [B*L, heads*d]

q, k and v are the q_proj/k_proj/v_proj outputs, token rows [B*L, heads*d] (head h in columns h*d..h*d+d):
no [B,h,L,d] transposed copies are made, and the output is written merged, [B*L, heads*d], the rows out_proj
reads. Query i attends to keys 0..i (torch's is_causal: top-left aligned); no mask.

Why not versions 3-5 (kernels/attention/__init__.py): at L = 77 a head's scores are 77 x 77 floats, and the
BLAS calls, the merge copy and the pool's hand-offs cost more than the arithmetic (CLIP-L: 12 heads x 2
prompts, 36 MFLOP in a layer): measured ~1 ms per CLIP-L layer with version 4 against ~0.2 ms here.

One task per (prompt, head), prange over them (24 for CLIP-L: 12 per core). Per task:
  1. k's head columns transposed into kT [d, L] (20 KB for d = 64, L = 77), so that a query's scores
     against its keys are one loop over the contiguous key axis, vectorised, for each of the d columns;
     v's head columns copied into v_head [L, d] (with v's own row stride LLVM left the loop of step 3
     scalar: measured 3.4 -> 0.9 ms per CLIP-L layer).
  2. per query i: scores s_j = q_i . k_j * scale * log2(e) for the keys j <= i, rounded up to whole
     vectors of 16 keys, the keys past i set to -inf; then 2^(s_j - max) (vecmath's exp2_nonpositive_f32:
     exactly 0 at -inf) and their sum, all loops over whole vectors (a loop of i + 1 keys would run its
     remainder one key at a time).
  3. out_i = sum_j p_j v_j / sum, over v_head's contiguous rows.
"""

import numpy as np

from npdiff.jit import FASTMATH_SAFE, PARALLEL, njit, prange
from npdiff.kernels.vecmath import LOG2E, exp2_nonpositive_f32

KEY_VECTOR = 16  # float32 lanes of one AVX-512 register


@njit(**PARALLEL, fastmath=FASTMATH_SAFE)
def _causal_attention_rows_numba(q, k, v, batch, heads, scale_log2, out):
    length = q.shape[0] // batch
    head_dim = q.shape[1] // heads
    padded = (length + KEY_VECTOR - 1) // KEY_VECTOR * KEY_VECTOR  # keys rounded up to whole vectors
    for task in prange(batch * heads):
        b = task // heads
        c0 = (task - b * heads) * head_dim
        row0 = b * length
        # 1. this head's keys, transposed: kT[c, j] = k[row0 + j, c0 + c], zero past L
        k_t = np.zeros((head_dim, padded), np.float32)  # [d, L padded]
        for j in range(length):
            for c in range(head_dim):
                k_t[c, j] = k[row0 + j, c0 + c]
        v_head = np.empty((length, head_dim), np.float32)  # [L, d]: v's head columns, contiguous rows
        for j in range(length):
            for c in range(head_dim):
                v_head[j, c] = v[row0 + j, c0 + c]
        scores = np.empty(padded, np.float32)  # [L padded]
        acc = np.empty(head_dim, np.float32)  # [d]
        for i in range(length):
            keys = i + 1
            # 2. scores of keys 0..i, in log2 units, over whole vectors of keys
            width = min(padded, (keys + KEY_VECTOR - 1) // KEY_VECTOR * KEY_VECTOR)
            for j in range(width):
                scores[j] = 0.0
            for c in range(head_dim):
                q_ic = q[row0 + i, c0 + c] * scale_log2
                for j in range(width):
                    scores[j] += q_ic * k_t[c, j]
            top = scores[0]
            for j in range(1, keys):
                top = max(top, scores[j])
            for j in range(keys, width):
                scores[j] = -np.inf  # the masked keys: 2^-inf = 0 exactly
            total = np.float32(0.0)
            for j in range(width):
                p = exp2_nonpositive_f32(scores[j] - top)
                scores[j] = p
                total += p
            # 3. the probabilities' weighted sum of v's rows, normalised
            for c in range(head_dim):
                acc[c] = 0.0
            for j in range(keys):
                p = scores[j]
                for c in range(head_dim):
                    acc[c] += p * v_head[j, c]
            inverse = np.float32(1.0) / total
            for c in range(head_dim):
                out[row0 + i, c0 + c] = acc[c] * inverse


def causal_attention_rows(q, k, v, batch, heads, scale, out=None):
    """softmax(q k^T * scale, causal) v per (prompt, head): q, k, v [B*L, heads*d] float32 C-contiguous
    token rows -> [B*L, heads*d], the heads merged (into `out` when given: C-contiguous, q's shape)."""
    out = np.empty_like(q) if out is None else out  # [B*L, heads*d]
    if q.size:
        _causal_attention_rows_numba(q, k, v, batch, heads, np.float32(scale * LOG2E), out)
    return out
