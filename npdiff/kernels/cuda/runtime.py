"""What every CUDA kernel file shares: the C header, compiling a source once per element type, and
the launch arithmetic.

Compiling. Each op family keeps its CUDA C source as a Python string beside its wrapper. The first
call of a kernel compiles the source with NVRTC through cupy.RawModule (cupy caches the binary on
disk under ~/.cupy/kernel_cache), once for float (`float32`) and once for __half (`float16`,
compiled with -DNPDIFF_HALF). Nothing here imports cupy until a kernel is launched, so this file
and the wrappers can be imported (and their arithmetic tested) on a machine without a GPU.

The shared header (HEADER, prepended to every source) gives the kernels:
  scalar_t          the element type of the arrays (float, or __half with NPDIFF_HALF);
  FLOAT_INF         +infinity as a float;
  load(p, i)        p[i] widened to float: all arithmetic is in float (sums in double where said);
  store(p, i, v)    v rounded to scalar_t (round to nearest even) and written to p[i];
  warp_sum / warp_max / block_sum_double / block_max: reductions with warp shuffles, then one
                    value per warp through shared memory (blockDim.x must be a multiple of 32).

Launch arithmetic (plain Python, unit-tested without a GPU):
  grid_for(n)       blocks for a grid-stride loop over n elements (at most MAX_GRID blocks; each
                    thread then takes every (blocks*threads)-th element).
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError

THREADS = 256  # threads per block for element-wise and row kernels: 8 warps
WARP = 32
MAX_GRID = 65535 * 8  # grid-stride loops never need more blocks than this (x-dimension limit is 2^31-1)
DTYPES = ("float32", "float16")

HEADER = r"""
#include <cuda_fp16.h>

#ifdef NPDIFF_HALF
typedef __half scalar_t;
#else
typedef float scalar_t;
#endif

// +infinity as a float (NVRTC compiles without math.h, so there is no INFINITY macro)
#define FLOAT_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ double warp_sum_double(double v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum of one double per thread over the whole block; every thread gets the total.
// `scratch` holds 32 doubles of shared memory; the block size is a multiple of 32 (<= 1024).
__device__ double block_sum_double(double v, double* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum_double(v);                       // 1. within each warp
    __syncthreads();                              //    (scratch may still be read by a previous call)
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;       // 2. the warps' sums, by every warp
    return warp_sum_double(v);
}
"""


def grid_for(n, threads=THREADS):
    """Blocks for a grid-stride loop over n elements: enough to cover n once, at most MAX_GRID."""
    if n <= 0:
        return 1
    return int(min(-(-n // threads), MAX_GRID))


def import_cupy():
    """cupy, or NpdiffError with the install hint (the same message as npdiff.backend)."""
    return backend._import_cupy()


_modules = {}  # (family, dtype name) -> cupy.RawModule


def compile_options(dtype):
    """NVRTC options: C++17, and -DNPDIFF_HALF for float16. Contraction of a*b+c into FMA stays on
    (nvcc's and NVRTC's default, and what torch's kernels are built with)."""
    options = ["--std=c++17"]
    if dtype == "float16":
        options.append("-DNPDIFF_HALF")
    return tuple(options)


def module(family, source, dtype):
    """The compiled RawModule of `source` (HEADER + source) for `dtype`, compiled on first use."""
    if dtype not in DTYPES:
        raise NpdiffError(f"the CUDA kernels take float32 or float16 arrays, got {dtype}")
    key = (family, dtype)
    if key not in _modules:
        cupy = import_cupy()
        _modules[key] = cupy.RawModule(code=HEADER + source, options=compile_options(dtype))
    return _modules[key]


def kernel(family, source, dtype, name):
    """One `extern "C" __global__` function of a family's source, compiled for dtype."""
    return module(family, source, dtype).get_function(name)


def i64(value):
    """A `long long` kernel argument (cupy passes NumPy scalars by value with their own size)."""
    return np.int64(value)


def f32(value):
    """A `float` kernel argument."""
    return np.float32(value)


def i32(value):
    """An `int` kernel argument."""
    return np.int32(value)


def as_dtype(a, dtype):
    """a in `dtype` (None stays None): a copy only where the dtypes differ. On the GPU a kernel
    computes in its weight's dtype, so float32 latents meet float16 weights without a float32 copy
    of the weights."""
    if a is None or a.dtype == dtype:
        return a
    return a.astype(dtype)
