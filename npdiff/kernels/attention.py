"""softmax and scaled dot-product attention.

Versions:
  softmax_ref        NumPy API (numpy or cupy): max, exp, sum, divide; four passes, temporaries.
  softmax (fast)     row maxima first (attention_blocked.row_maxima), then Numba, prange over
                     blocks of rows: subtract the max, exp of the block as one flat run (the
                     vectorised exp of vecmath.py, no per-row scalar remainder), sum (float64)
                     and scale each row.
  attention_ref      the textbook attention in the NumPy API (numpy or cupy): the whole score
                     matrix [..., N, M] = q k^T * scale (+ mask), softmax over M, then @ v.
                     Memory grows with N*M: [2,8,4096,4096] scores are 1 GiB (plus temporaries).
  attention_full     NumPy arrays: the full [N, M] score matrix of one (batch, head) slice at a time,
                     softmax in place by a Numba row pass, slices spread over the BLAS worker
                     threads (attention_blocked.py with one query block and one key chunk).
                     Small slices (at most BATCHED_MAX_SLICE_SCORES scores: CLIP's 77x77, the
                     shipped model's 64x77) go to attention_batched instead.
  attention_batched  NumPy arrays, many small slices: the slices in a few groups on the BLAS
                     workers; per group one batched matmul for the scores (NumPy loops over the
                     slices in C, not Python), a serial Numba softmax over all its rows, one batched
                     matmul with v. For 512 slices of 64x77 the Python work per slice of
                     attention_full costs more than the arithmetic.
  attention_chunked_ref  memory-efficient ("flash attention"), NumPy API: keys/values are visited
                     in chunks of KEY_CHUNK; for each chunk the scores [..., N, KEY_CHUNK] are made,
                     and a running row max m, running sum l and running output acc are updated:
                         m_new = max(m, rowmax(s));  p = exp(s - m_new)
                         l = l * exp(m - m_new) + rowsum(p);  acc = acc * exp(m - m_new) + p @ v_chunk
                     and the output is acc / l. Memory is linear in N (and in M).
  attention_chunked  the same algorithm, fast for NumPy arrays (attention_blocked.py: query blocks on
                     worker threads, cache-sized score tiles, fused Numba update); cupy arrays go
                     to attention_chunked_ref.
  scaled_dot_product_attention picks attention_chunked when the full score matrix would hold more
                     than MEMORY_EFFICIENT_MIN_SCORES floats, attention_full otherwise;
                     `path="full"|"chunked"` forces one.

Masks follow torch.nn.functional.scaled_dot_product_attention: a bool mask says True = may attend,
a float mask is added to the scores, either broadcasts to [..., N, M]; is_causal keeps key j <= query
i (top-left aligned, as torch) and is combined with a mask if both are given (as torch 2.13 does).

Fully masked rows: softmax(x) of a row that is all -inf gives NaN, as torch.softmax does. The
attention of a query that may attend to no key gives 0, as torch 2.13's scaled_dot_product_attention
does (its fused CPU kernel returns zeros there); every attention version returns 0 for such rows.
"""

import math

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import FASTMATH_SAFE, PARALLEL, SERIAL, njit, prange
from npdiff.kernels import cuda
from npdiff.kernels.attention_blocked import KEY_CHUNK as BLOCKED_KEY_CHUNK
from npdiff.kernels.attention_blocked import attention_blocked, causal_additive, exp_in_place, row_maxima
from npdiff.kernels.openblas import run_blocks, worker_count
from npdiff.kernels.validate import require_float32, require_min_ndim, shape_text

MEMORY_EFFICIENT_MIN_SCORES = 1 << 23  # full score matrix above this many floats (32 MiB) -> chunked
BATCHED_MAX_SLICE_SCORES = 128 * 128  # attention_full: slices of at most this many scores -> attention_batched
KEY_CHUNK = 512  # keys per step of attention_chunked_ref
PATHS = ("auto", "full", "chunked")
SOFTMAX_BLOCK_ROWS = 64  # rows per parallel task of softmax()


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------
def softmax_ref(x, axis=-1):
    xp = backend.array_module(x)
    row_max = x.max(axis=axis, keepdims=True)  # [..., 1, ...]
    with np.errstate(invalid="ignore"):  # an all -inf row: -inf - -inf = NaN, as torch
        exps = xp.exp(x - row_max)  # [...]
    return exps / exps.sum(axis=axis, keepdims=True)  # [...]


@njit(**SERIAL, fastmath=FASTMATH_SAFE)
def softmax_rows_block(x, row_max, out):
    """out = softmax of each row of x [R, M] (contiguous) with row maxima row_max [R]: subtract the
    max row by row, exp of the whole block as one flat vectorised run, then scale each row by
    1 / its sum. -inf entries give 0; a row that is all -inf gives NaN (-inf - -inf), as torch."""
    for r in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[r, j] = x[r, j] - row_max[r]
    exp_in_place(out.reshape(-1))
    for r in range(x.shape[0]):
        total = 0.0
        for j in range(x.shape[1]):
            total += out[r, j]
        inv_total = np.float32(1.0 / total)
        for j in range(x.shape[1]):
            out[r, j] *= inv_total


@njit(**PARALLEL)
def _softmax_rows(x, row_max, out):
    """x, out: [R, M] contiguous rows; row_max [R] (attention_blocked.row_maxima). prange over
    blocks of SOFTMAX_BLOCK_ROWS rows."""
    rows = x.shape[0]
    for block in prange((rows + SOFTMAX_BLOCK_ROWS - 1) // SOFTMAX_BLOCK_ROWS):
        start = block * SOFTMAX_BLOCK_ROWS
        stop = min(rows, start + SOFTMAX_BLOCK_ROWS)
        softmax_rows_block(x[start:stop], row_max[start:stop], out[start:stop])


def softmax(x, axis=-1):
    """torch.softmax(x, axis): numerically stable (subtracts the row max). x: float32 array."""
    require_float32("softmax", "x", x)
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise NpdiffError(f"softmax: axis must be in [-{x.ndim}, {x.ndim}) for x of shape "
                          f"{shape_text(x.shape)}, got {axis}")
    if cuda.is_cupy(x):  # npdiff/kernels/cuda/attention.py
        return cuda.softmax(x, axis)
    if not backend.is_numpy(x) or x.size == 0:
        return softmax_ref(x, axis)
    moved = np.moveaxis(x, axis, -1)  # [..., M] (a view)
    rows = np.ascontiguousarray(moved).reshape(-1, moved.shape[-1])  # [..., M] -> [R, M]
    out = np.empty_like(rows)  # [R, M]
    _softmax_rows(rows, row_maxima(rows), out)
    return np.moveaxis(out.reshape(moved.shape), -1, axis)  # [R, M] -> x's layout


# ---------------------------------------------------------------------------------------------
# attention: shared pieces
# ---------------------------------------------------------------------------------------------
def mask_to_additive(mask, xp):
    """A bool mask (True = attend) -> 0 / -inf floats; a float mask is already additive."""
    if mask.dtype == bool:
        return xp.where(mask, np.float32(0.0), np.float32(-np.inf)).astype(xp.float32)
    return mask


def masked_row_max(scores, xp):
    """Row max over the last axis, with rows that are all -inf given 0, so exp(s - max) stays 0."""
    row_max = scores.max(axis=-1, keepdims=True)  # [..., N, 1]
    return xp.where(row_max == -np.inf, np.float32(0.0), row_max)  # [..., N, 1]


# ---------------------------------------------------------------------------------------------
# attention: textbook (full score matrix)
# ---------------------------------------------------------------------------------------------
def full_scores(q, k, mask, scale, is_causal, xp):
    """q k^T * scale (+ mask, + causal mask): the whole [..., N, M] score matrix."""
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2))  # [...,N,d] @ [...,d,M] -> [...,N,M]
    scores *= np.float32(scale)  # in place: no second [...,N,M] temporary
    if mask is not None:
        scores = scores + mask_to_additive(mask, xp)  # [...,N,M] + broadcast mask
    if is_causal:
        scores += causal_additive(0, q.shape[-2], 0, k.shape[-2], xp)  # [...,N,M] + [N,M]
    return scores


def attention_ref(q, k, v, mask=None, scale=None, is_causal=False):
    """The textbook attention in the NumPy API only (numpy or cupy): softmax(q k^T * scale + mask) v."""
    xp = backend.array_module(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = full_scores(q, k, mask, scale, is_causal, xp)  # [...,N,M]
    row_max = masked_row_max(scores, xp)  # [...,N,1]
    probs = xp.exp(scores - row_max)  # [...,N,M]
    row_sum = probs.sum(axis=-1, keepdims=True)  # [...,N,1]
    probs = probs / xp.where(row_sum == 0, np.float32(1.0), row_sum)  # [...,N,M]; masked rows stay 0
    return xp.matmul(probs, v)  # [...,N,M] @ [...,M,dv] -> [...,N,dv]


def attention_batched(q, k, v, mask=None, scale=None, is_causal=False):
    """NumPy arrays with many small (batch, head) slices: the slices are cut into a few groups, one
    group per task on the BLAS workers (single-threaded BLAS each, as attention_blocked: OpenBLAS's own
    threads left spinning slow the Numba kernels that follow), and each group is done at once."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    lead, n_queries, n_keys = q.shape[:-2], q.shape[-2], k.shape[-2]
    queries = q.reshape(-1, n_queries, q.shape[-1])  # [L,N,d]
    keys = k.reshape(-1, n_keys, k.shape[-1])  # [L,M,d]
    values = v.reshape(-1, n_keys, v.shape[-1])  # [L,M,dv]
    additive = None  # [L,N,M] or [N,M]: mask and causal mask as numbers to add to the scores
    if mask is not None:
        additive = mask_to_additive(np.broadcast_to(mask, lead + (n_queries, n_keys)), np)
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


def attention_full(q, k, v, mask=None, scale=None, is_causal=False):
    """The full score matrix of one (batch, head) slice at a time: for NumPy arrays the slices go to
    the BLAS workers (attention_blocked with one block of all N queries and one chunk of all M keys,
    so the running softmax is a plain softmax), or in groups to attention_batched when they are
    small; other arrays go to attention_ref."""
    if not backend.is_numpy(q):
        return attention_ref(q, k, v, mask, scale, is_causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    if n_queries * n_keys <= BATCHED_MAX_SLICE_SCORES:
        return attention_batched(q, k, v, mask, scale, is_causal)
    return attention_blocked(q, k, v, mask, scale, is_causal, key_chunk=max(1, n_keys),
                             query_block=max(1, n_queries))


# ---------------------------------------------------------------------------------------------
# attention: memory-efficient (key chunks, running max and sum)
# ---------------------------------------------------------------------------------------------
def attention_chunked_ref(q, k, v, mask=None, scale=None, is_causal=False, key_chunk=KEY_CHUNK):
    """Same result as attention_ref; never holds more than [..., N, key_chunk] scores (NumPy API)."""
    xp = backend.array_module(q)
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    lead = q.shape[:-2]
    q_scaled = q * np.float32(scale)  # [...,N,d]
    if mask is not None:
        mask = xp.broadcast_to(mask, lead + (n_queries, n_keys))  # a view [...,N,M]
    running_max = xp.full(lead + (n_queries, 1), -np.inf, dtype=xp.float32)  # [...,N,1]
    running_sum = xp.zeros(lead + (n_queries, 1), dtype=xp.float32)  # [...,N,1]
    acc = xp.zeros(lead + (n_queries, v.shape[-1]), dtype=xp.float32)  # [...,N,dv]
    for start in range(0, n_keys, key_chunk):
        stop = min(start + key_chunk, n_keys)
        if is_causal and start > n_queries - 1:
            break  # every key from here on lies above the diagonal for every query
        # 1. scores of this chunk, masked
        k_chunk = k[..., start:stop, :]  # [...,m,d]
        scores = xp.matmul(q_scaled, xp.swapaxes(k_chunk, -1, -2))  # [...,N,d] @ [...,d,m] -> [...,N,m]
        if mask is not None:
            scores = scores + mask_to_additive(mask[..., start:stop], xp)  # [...,N,m]
        if is_causal:
            scores = scores + causal_additive(0, n_queries, start, stop, xp)  # [...,N,m] + [N,m]
        # 2. new running max; rows still all -inf keep a max of 0 so exp() gives 0, not NaN
        new_max = xp.maximum(running_max, scores.max(axis=-1, keepdims=True))  # [...,N,1]
        new_max = xp.where(new_max == -np.inf, np.float32(0.0), new_max)  # [...,N,1]
        correction = xp.exp(running_max - new_max)  # [...,N,1]; 0 while running_max is -inf
        probs = xp.exp(scores - new_max)  # [...,N,m]
        # 3. rescale what was accumulated, add this chunk
        running_sum = running_sum * correction + probs.sum(axis=-1, keepdims=True)  # [...,N,1]
        acc = acc * correction + xp.matmul(probs, v[..., start:stop, :])  # [...,N,m] @ [...,m,dv]
        running_max = new_max
    return acc / xp.where(running_sum == 0, np.float32(1.0), running_sum)  # [...,N,dv]


def attention_chunked(q, k, v, mask=None, scale=None, is_causal=False, key_chunk=None):
    """Memory-efficient attention: attention_blocked.py's threaded kernel for NumPy arrays,
    attention_chunked_ref otherwise. key_chunk: keys per step (default: that file's KEY_CHUNK)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not backend.is_numpy(q):
        return attention_chunked_ref(q, k, v, mask, scale, is_causal, key_chunk or KEY_CHUNK)
    return attention_blocked(q, k, v, mask, scale, is_causal, key_chunk or BLOCKED_KEY_CHUNK)


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
def check_attention_inputs(q, k, v, mask, is_causal, path):
    kernel = "scaled_dot_product_attention"
    require_min_ndim(kernel, "q", q, 2, "[..., N, d]")
    require_min_ndim(kernel, "k", k, 2, "[..., M, d]")
    require_min_ndim(kernel, "v", v, 2, "[..., M, dv]")
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise NpdiffError(f"{kernel}: k must have shape [{','.join(map(str, q.shape[:-2] + ('M',)))},"
                          f"{q.shape[-1]}] to match q {shape_text(q.shape)}, got {shape_text(k.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise NpdiffError(f"{kernel}: v must have shape {shape_text(k.shape[:-1] + ('dv',))} to match "
                          f"k {shape_text(k.shape)}, got {shape_text(v.shape)}")
    if mask is not None:
        if mask.dtype != bool and mask.dtype != np.float32:
            raise NpdiffError(f"{kernel}: mask must be bool (True = attend) or float32, got {mask.dtype}")
        target = q.shape[:-2] + (q.shape[-2], k.shape[-2])
        try:
            np.broadcast_shapes(mask.shape, target)
            ok = len(mask.shape) <= len(target)
        except ValueError:
            ok = False
        if not ok or np.broadcast_shapes(mask.shape, target) != target:
            raise NpdiffError(f"{kernel}: mask must broadcast to [..., N, M] = {shape_text(target)}, "
                              f"got {shape_text(mask.shape)}")
    if path not in PATHS:
        raise NpdiffError(f"{kernel}: path must be one of {PATHS}, got {path!r}")


def scaled_dot_product_attention(q, k, v, mask=None, scale=None, is_causal=False, path="auto"):
    """torch.nn.functional.scaled_dot_product_attention. q [..., N, d], k [..., M, d], v [..., M, dv].

    mask: bool (True = may attend) or float (added to the scores), broadcastable to [..., N, M].
    scale: default 1/sqrt(d). path: "auto" (chunked above MEMORY_EFFICIENT_MIN_SCORES score
    entries), "full" or "chunked". Returns [..., N, dv].
    """
    check_attention_inputs(q, k, v, mask, is_causal, path)
    if cuda.is_cupy(q):  # cuBLAS + the fused masked softmax (npdiff/kernels/cuda/attention.py)
        return cuda.scaled_dot_product_attention(q, k, v, mask, scale, is_causal, path)
    if path == "auto":
        n_scores = math.prod(q.shape[:-1]) * k.shape[-2]
        path = "chunked" if n_scores > MEMORY_EFFICIENT_MIN_SCORES else "full"
    if path == "chunked":
        return attention_chunked(q, k, v, mask, scale, is_causal)
    return attention_full(q, k, v, mask, scale, is_causal)
