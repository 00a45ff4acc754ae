"""CUDA softmax and scaled dot-product attention: cuBLAS GEMMs around one fused softmax kernel.

softmax_rows (the kernel). How it differs from the NumPy-API reference (npdiff/kernels/softmax.py
softmax_ref): the reference makes four passes with temporaries (max, subtract + exp, sum, divide);
here one warp owns one row and makes three passes over it without temporaries (max; exp and sum,
writing exp; scale by 1/sum). The row is read from global memory once and then from cache.
  Thread layout: blocks of 256 threads = 8 warps = 8 rows; lane l of a warp takes the row's
  elements l, l+32, l+64, ... (32 neighbouring elements per step: coalesced), and the warp combines
  its lanes' max and sum with shuffles. No shared memory, no __syncthreads.
  For attention the score of key j in a row is
      s[j] + mask[j]          (has_mask: an additive float mask laid out like the scores)
      -inf where j > i        (causal: i = query_start + row % queries, torch's top-left alignment)
  and a row whose scores are all -inf gives zeros (zero_if_all_masked, as torch's attention), or
  NaN (as torch.softmax) otherwise. The output may be the input (in place): pass 2 writes
  exp(s - max) over the scores it has just read, pass 3 rescales what pass 2 wrote. In float16 that
  exp is rounded to half before the scaling (one extra rounding, < 1 half ulp).

scaled_dot_product_attention. How it differs from the references (attention_ref: the whole
[..., N, M] score matrix and five passes over it with temporaries; attention_chunked_ref: key chunks
with a running max):
  1. queries are taken in blocks of n rows, n chosen (query_block_size) so that one block's scores
     [..., n, M] stay under SCORE_BUDGET_BYTES (the whole matrix when it fits: [2,8,4096,4096]
     float32 is 1 GiB, which a GPU holds but need not);
  2. scores = (q * scale) @ k^T by cuBLAS (batched GEMM over the leading axes; q is scaled first,
     an [..., n, d] pass instead of an [..., n, M] one, and in float16 it keeps the products far
     from half's overflow; the result differs from torch's (q @ k^T) * scale by about one rounding);
  3. softmax_rows in place, with the additive/bool mask and the causal mask fused in, and
     all-masked rows giving 0 as torch's attention does;
  4. out[..., block, :] = probs @ v by cuBLAS.
cuBLAS does the O(N M d) work with tensor cores (float16) or FMA units (float32, no TF32 unless
CUPY_TF32=1); the kernel adds one read and one write of the scores. A fused flash-attention kernel
(scores never leaving shared memory) would save that traffic; it is not written here.
"""

import math

import numpy as np

from npdiff.kernels.cuda.runtime import (
    THREADS,
    WARP,
    as_dtype,
    i32,
    i64,
    import_cupy,
    kernel,
)

ROWS_PER_BLOCK = THREADS // WARP
SOURCE = r"""
extern "C" __global__ void softmax_rows(const scalar_t* x, scalar_t* out, long long rows, long long cols,
                                        const scalar_t* mask, int has_mask, int causal, long long queries,
                                        long long query_start, int zero_if_all_masked) {
    const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;                       // the whole warp leaves together
    const scalar_t* in = x + row * cols;
    scalar_t* row_out = out + row * cols;
    const scalar_t* row_mask = mask + (has_mask ? row * cols : 0);
    const long long last_key = causal ? query_start + row % queries : cols - 1;   // keys j <= last_key

    // 1. row max of the masked scores
    float row_max = -FLOAT_INF;
    for (long long j = lane; j < cols; j += 32) {
        float s = j <= last_key ? load(in, j) : -FLOAT_INF;
        if (has_mask) s += load(row_mask, j);
        row_max = fmaxf(row_max, s);
    }
    row_max = warp_max(row_max);
    if (zero_if_all_masked && row_max == -FLOAT_INF) {
        for (long long j = lane; j < cols; j += 32) store(row_out, j, 0.0f);
        return;
    }
    // 2. exp(s - max), written to out, and its sum (-inf scores give exactly 0)
    float total = 0.0f;
    for (long long j = lane; j < cols; j += 32) {
        float s = j <= last_key ? load(in, j) : -FLOAT_INF;
        if (has_mask) s += load(row_mask, j);
        const float e = expf(s - row_max);
        store(row_out, j, e);
        total += e;
    }
    total = warp_sum(total);
    // 3. scale by 1/sum
    const float inv_total = 1.0f / total;
    for (long long j = lane; j < cols; j += 32) store(row_out, j, load(row_out, j) * inv_total);
}
"""


def blocks_for_rows(rows):
    """Blocks of ROWS_PER_BLOCK warps, one warp per row."""
    return max(1, -(-rows // ROWS_PER_BLOCK))


def softmax_rows(scores, out=None, mask=None, causal=False, queries=1, query_start=0, zero_if_all_masked=False):
    """Softmax over the last axis of contiguous `scores` [..., M] into `out` (default: a new array;
    `out=scores` works in place). mask: None or a contiguous additive mask shaped like scores."""
    cupy = import_cupy()
    if out is None:
        out = cupy.empty_like(scores)
    cols = scores.shape[-1] if scores.ndim else 1
    rows = scores.size // max(1, cols)
    if rows == 0:
        return out
    mask_argument = mask if mask is not None else cupy.zeros(1, dtype=scores.dtype)  # never read without has_mask
    kernel("attention", SOURCE, scores.dtype.name, "softmax_rows")(
        (blocks_for_rows(rows),), (THREADS,),
        (scores, out, i64(rows), i64(cols), mask_argument, i32(mask is not None), i32(bool(causal)),
         i64(max(1, queries)), i64(query_start), i32(bool(zero_if_all_masked))))
    return out


def softmax(x, axis=-1):
    """torch.softmax(x, axis) for a cupy array: the axis is moved last (a copy if it is not last)."""
    cupy = import_cupy()
    moved = cupy.moveaxis(x, axis, -1)  # [..., M] view
    rows = cupy.ascontiguousarray(moved)  # [..., M]
    if rows.size == 0:
        return cupy.moveaxis(rows.copy(), -1, axis)
    out = softmax_rows(rows)  # [..., M]
    return cupy.moveaxis(out, -1, axis)  # x's layout


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
SCORE_BUDGET_BYTES = 512 << 20  # scores of one query block


def query_block_size(lead_size, n_queries, n_keys, itemsize, budget=SCORE_BUDGET_BYTES):
    """Queries per block so that the block's scores [lead, n, M] fit in `budget` bytes (>= 1)."""
    bytes_per_query = max(1, lead_size * n_keys * itemsize)
    return int(max(1, min(n_queries, budget // bytes_per_query)))


def query_blocks(n_queries, block):
    """[(start, stop), ...] covering range(n_queries) in blocks of `block`."""
    return [(start, min(n_queries, start + block)) for start in range(0, n_queries, block)]


def additive_mask(cupy, mask, dtype):
    """A bool mask (True = attend) -> 0 / -inf in dtype; a float mask is cast to dtype."""
    if mask.dtype == bool:
        return cupy.where(mask, 0.0, -np.inf).astype(dtype)
    return mask.astype(dtype, copy=False)


def scaled_dot_product_attention(q, k, v, mask=None, scale=None, is_causal=False, path="auto",
                                 budget=SCORE_BUDGET_BYTES):
    """softmax(q k^T * scale + mask) v for cupy q [..., N, d], k [..., M, d], v [..., M, dv].

    path "full" takes all N queries in one block; "auto"/"chunked" keep blocks under `budget`.
    Computes in q's dtype (k, v and a float mask are cast to it)."""
    cupy = import_cupy()
    dtype = q.dtype
    k, v = as_dtype(k, dtype), as_dtype(v, dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    lead = q.shape[:-2]
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    out = cupy.empty(lead + (n_queries, v.shape[-1]), dtype=dtype)  # [...,N,dv]
    if out.size == 0:
        return out
    if n_keys == 0:
        out[...] = 0  # no key to attend to: 0, as torch
        return out
    block = n_queries if path == "full" else query_block_size(math.prod(lead), n_queries, n_keys, dtype.itemsize,
                                                               budget)
    q_scaled = q * dtype.type(scale)  # [...,N,d] (a new array in q's dtype)
    keys_t = cupy.swapaxes(k, -1, -2)  # [...,d,M] view; cuBLAS reads it transposed
    full_mask = None
    if mask is not None:
        full_mask = cupy.broadcast_to(additive_mask(cupy, mask, dtype), lead + (n_queries, n_keys))  # view
    for start, stop in query_blocks(n_queries, block):
        # 1. scores of this block of queries
        scores = cupy.matmul(q_scaled[..., start:stop, :], keys_t)  # [...,n,d] @ [...,d,M] -> [...,n,M]
        scores = cupy.ascontiguousarray(scores)
        # 2. masked softmax in place
        mask_block = None
        if full_mask is not None:
            mask_block = cupy.ascontiguousarray(full_mask[..., start:stop, :])  # [...,n,M]
        softmax_rows(scores, out=scores, mask=mask_block, causal=is_causal, queries=stop - start,
                     query_start=start, zero_if_all_masked=True)
        # 3. weighted sum of the values
        out[..., start:stop, :] = cupy.matmul(scores, v)  # [...,n,M] @ [...,M,dv] -> [...,n,dv]
        del scores, mask_block
    return out
