"""CUDA group_norm (optionally fused with SiLU) and layer_norm.

How they differ from the NumPy-API references (npdiff/kernels/norm.py group_norm_ref, layer_norm_ref):
  the references reshape, take mean and var in float64 over whole temporaries, then normalise in
  several passes; here the statistics are block reductions and the normalisation (+ affine, + SiLU)
  is one pass that reads x once and writes once. The arithmetic follows the Numba kernels: sums of
  x - x[0] in double (the shift keeps sum_sq - sum^2/n from cancelling when |mean| >> std), biased
  variance, rstd = 1/sqrt(var + eps), then (x - mean) in double, rounded to float, * rstd * w + b.

group_norm: two kernels, both over a grid of (slab, chunk) blocks.
  A slab is the group x[b, g*Cg:(g+1)*Cg] = Cg*S contiguous elements (NCHW puts the spatial axes
  innermost). SD has few slabs (batch 2 x 32 groups = 64), far fewer than a GPU has SMs, and a VAE
  slab at 512x512 holds a million elements, so each slab is cut into `chunks` pieces
  (group_norm_chunks below) to put a few blocks on every SM:
  1. group_norm_partial_sums: block (slab s, chunk c) sums its chunk (256 threads stride through
     it; consecutive threads read consecutive elements) and writes (sum, sum_sq) to partial[s, c].
  2. group_norm_apply: block (s, c): thread 0 adds up the `chunks` partial sums of slab s in a fixed
     order (so the result does not depend on scheduling) and puts mean and rstd in shared memory;
     then the block normalises its chunk, channel = g*Cg + offset / S picks weight and bias.
layer_norm: one block per row (all leading axes flattened; a row is contiguous, D elements):
  block sums, then the same normalisation. SD has thousands of rows, so no chunking is needed.
"""

import math

import numpy as np

from npdiff.kernels.cuda.runtime import THREADS, i32, i64, import_cupy, kernel

TARGET_BLOCKS = 1024  # aim for at least this many blocks per group_norm kernel (~8 per SM on 132 SMs)
MIN_CHUNK = 4096  # but no chunk under this many elements (16 per thread)
MAX_CHUNKS = 1024

SOURCE = r"""
// 1. Partial sums of x - x[slab start] over chunk blockIdx.y of slab blockIdx.x.
extern "C" __global__ void group_norm_partial_sums(const scalar_t* x, double* partial, long long count,
                                                   long long chunk_len, int chunks) {
    __shared__ double scratch[32];
    const long long slab = blockIdx.x;
    const scalar_t* slab_x = x + slab * count;
    const double shift = load(slab_x, 0);
    const long long start = blockIdx.y * chunk_len;
    const long long stop = min(start + chunk_len, count);
    double sum = 0.0, sum_sq = 0.0;
    for (long long i = start + threadIdx.x; i < stop; i += blockDim.x) {
        const double v = (double)load(slab_x, i) - shift;
        sum += v;
        sum_sq += v * v;
    }
    sum = block_sum_double(sum, scratch);
    sum_sq = block_sum_double(sum_sq, scratch);
    if (threadIdx.x == 0) {
        partial[2 * (slab * chunks + blockIdx.y)] = sum;
        partial[2 * (slab * chunks + blockIdx.y) + 1] = sum_sq;
    }
}

// 2. Normalise chunk blockIdx.y of slab blockIdx.x: (x - mean) * rstd * weight[c] + bias[c] (+ SiLU).
extern "C" __global__ void group_norm_apply(const scalar_t* x, const double* partial, const scalar_t* weight,
                                            const scalar_t* bias, scalar_t* out, long long count,
                                            long long chunk_len, int chunks, long long spatial,
                                            int channels_per_group, int groups, double eps, int apply_silu) {
    __shared__ double mean;
    __shared__ float rstd;
    const long long slab = blockIdx.x;
    const scalar_t* slab_x = x + slab * count;
    if (threadIdx.x == 0) {
        double sum = 0.0, sum_sq = 0.0;
        for (int c = 0; c < chunks; c++) {                  // fixed order: deterministic
            sum += partial[2 * (slab * chunks + c)];
            sum_sq += partial[2 * (slab * chunks + c) + 1];
        }
        const double shifted_mean = sum / count;
        const double var = fmax(sum_sq / count - shifted_mean * shifted_mean, 0.0);
        mean = shifted_mean + (double)load(slab_x, 0);
        rstd = (float)(1.0 / sqrt(var + eps));
    }
    __syncthreads();
    const int first_channel = (int)(slab % groups) * channels_per_group;
    const long long start = blockIdx.y * chunk_len;
    const long long stop = min(start + chunk_len, count);
    for (long long i = start + threadIdx.x; i < stop; i += blockDim.x) {
        const int channel = first_channel + (int)(i / spatial);
        const float centered = (float)((double)load(slab_x, i) - mean);
        float v = centered * rstd * load(weight, channel) + load(bias, channel);
        if (apply_silu) v = v / (1.0f + expf(-v));
        store(out + slab * count, i, v);
    }
}

// layer_norm: one block per row of `width` contiguous elements.
extern "C" __global__ void layer_norm_rows(const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                           scalar_t* out, long long width, double eps) {
    __shared__ double scratch[32];
    const scalar_t* row = x + blockIdx.x * width;
    const double shift = load(row, 0);
    double sum = 0.0, sum_sq = 0.0;
    for (long long i = threadIdx.x; i < width; i += blockDim.x) {
        const double v = (double)load(row, i) - shift;
        sum += v;
        sum_sq += v * v;
    }
    sum = block_sum_double(sum, scratch);
    sum_sq = block_sum_double(sum_sq, scratch);
    const double shifted_mean = sum / width;
    const double mean = shifted_mean + shift;
    const float rstd = (float)(1.0 / sqrt(fmax(sum_sq / width - shifted_mean * shifted_mean, 0.0) + eps));
    for (long long i = threadIdx.x; i < width; i += blockDim.x) {
        const float centered = (float)((double)load(row, i) - mean);
        store(out + blockIdx.x * width, i, centered * rstd * load(weight, i) + load(bias, i));
    }
}
"""


def group_norm_chunks(count, slabs, target_blocks=TARGET_BLOCKS, min_chunk=MIN_CHUNK, max_chunks=MAX_CHUNKS):
    """(chunks, chunk_len): each slab of `count` elements is cut into `chunks` pieces of chunk_len
    (the last may be shorter, none is empty), so that slabs * chunks reaches target_blocks where
    the slabs are big enough for pieces of at least min_chunk elements."""
    wanted = math.ceil(target_blocks / max(1, slabs))
    most = max(1, count // min_chunk)
    chunks = max(1, min(wanted, most, max_chunks))
    chunk_len = math.ceil(count / chunks) if count else 1
    chunks = math.ceil(count / chunk_len) if count else 1  # no empty chunk at the end
    return chunks, chunk_len


def _affine(cupy, vector, length, fill, dtype):
    """weight/bias as a contiguous vector of x's dtype (ones/zeros when None)."""
    if vector is None:
        return cupy.full(length, fill, dtype=dtype)  # [C]
    return cupy.ascontiguousarray(vector.astype(dtype, copy=False))  # [C]


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False):
    """x [B,C,...] cupy; weight, bias [C] or None. Computes in weight's dtype (x's if weight is None)."""
    cupy = import_cupy()
    dtype = x.dtype if weight is None else weight.dtype
    x = cupy.ascontiguousarray(x.astype(dtype, copy=False))  # [B,C,...]
    if x.size == 0:
        return x.copy()
    batch, channels = x.shape[0], x.shape[1]
    slabs = batch * num_groups
    count = x.size // slabs  # Cg * S elements per slab
    spatial = count // (channels // num_groups)
    chunks, chunk_len = group_norm_chunks(count, slabs)
    partial = cupy.empty((slabs, chunks, 2), dtype=np.float64)  # [B*G, chunks, (sum, sum_sq)]
    out = cupy.empty_like(x)  # [B,C,...]
    scale = _affine(cupy, weight, channels, 1.0, dtype)  # [C]
    shift = _affine(cupy, bias, channels, 0.0, dtype)  # [C]
    grid = (slabs, chunks)
    kernel("norm", SOURCE, dtype.name, "group_norm_partial_sums")(
        grid, (THREADS,), (x, partial, i64(count), i64(chunk_len), i32(chunks)))
    kernel("norm", SOURCE, dtype.name, "group_norm_apply")(
        grid, (THREADS,), (x, partial, scale, shift, out, i64(count), i64(chunk_len), i32(chunks), i64(spatial),
                           i32(channels // num_groups), i32(num_groups), np.float64(eps), i32(bool(silu))))
    return out


def layer_norm(x, weight, bias, eps=1e-5):
    """x [..., D] cupy; weight, bias [D] or None; over the last axis."""
    cupy = import_cupy()
    dtype = x.dtype if weight is None else weight.dtype
    x = cupy.ascontiguousarray(x.astype(dtype, copy=False))  # [..., D]
    width = x.shape[-1]
    out = cupy.empty_like(x)  # [..., D]
    rows = x.size // max(1, width)
    if rows == 0 or width == 0:
        return out
    scale = _affine(cupy, weight, width, 1.0, dtype)  # [D]
    shift = _affine(cupy, bias, width, 0.0, dtype)  # [D]
    kernel("norm", SOURCE, dtype.name, "layer_norm_rows")(
        (rows,), (THREADS,), (x, scale, shift, out, i64(width), np.float64(eps)))
    return out
