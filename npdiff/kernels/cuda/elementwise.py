"""Element-wise CUDA kernels: silu, quick_gelu, gelu (erf or tanh), the GEGLU gate, nearest 2x upsampling.

How they differ from the NumPy-API references (npdiff/kernels/activations.py, resample.py, linear.py):
  the references make several passes with temporaries (exp, add, divide; gelu's erfc polynomial in
  float64, a Python loop of array operations); here each output element is one thread's work:
  one read, the arithmetic in float registers, one write. All of them are memory-bound.

Thread layout: a grid-stride loop. Thread t of T = blocks * 256 handles elements t, t+T, t+2T, ...,
so the 32 threads of a warp touch 32 neighbouring elements (coalesced loads and stores) and a grid
of at most MAX_GRID blocks covers any size.

Formulas (torch's, in float; float16 arrays are widened to float and rounded once on the store):
  silu(v)       = v / (1 + expf(-v))
  quick_gelu(v) = v / (1 + expf(-1.702 v))
  gelu(v)       = 0.5 v erfcf(-v / sqrt 2)     (= 0.5 v (1 + erf(v / sqrt 2)), accurate also where
                                                 1 + erf cancels, as the CPU version)
  gelu_tanh(v)  = 0.5 v (1 + tanhf(sqrt(2/pi) (v + 0.044715 v^3)))
expf/erfcf/tanhf are CUDA's full-precision functions (no --use_fast_math), within 2 ulp.
"""

from npdiff.kernels.cuda.runtime import THREADS, grid_for, i32, i64, import_cupy, kernel

# Codes of the activations (the same numbering as npdiff/kernels/activations.py's Numba kernels).
SILU, QUICK_GELU, GELU_ERF, GELU_TANH = 0, 1, 2, 3
GELU_CODES = {"none": GELU_ERF, "tanh": GELU_TANH}

SOURCE = r"""
#define GRID_STRIDE_LOOP(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

__device__ __forceinline__ float activation(float v, int which) {
    if (which == 0) return v / (1.0f + expf(-v));                             // silu
    if (which == 1) return v / (1.0f + expf(-1.702f * v));                    // quick_gelu
    if (which == 2) return 0.5f * v * erfcf(-v * 0.70710678118654752f);       // gelu (erf)
    const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);    // gelu (tanh)
    return 0.5f * v * (1.0f + tanhf(inner));
}

// out[i] = activation(x[i]) for i < n; x and out contiguous (out may be x).
extern "C" __global__ void activation_kernel(const scalar_t* x, scalar_t* out, long long n, int which) {
    GRID_STRIDE_LOOP(i, n) {
        store(out, i, activation(load(x, i), which));
    }
}

// GEGLU gate: hidden [rows, 2*width] contiguous, out [rows, width]:
// out[r, j] = hidden[r, j] * gelu(hidden[r, width + j]). One thread per output element.
extern "C" __global__ void geglu_gate_kernel(const scalar_t* hidden, scalar_t* out, long long rows,
                                             long long width, int which) {
    GRID_STRIDE_LOOP(i, rows * width) {
        const long long r = i / width, j = i % width;
        const float value = load(hidden, r * 2 * width + j);
        const float gate = load(hidden, r * 2 * width + width + j);
        store(out, i, value * activation(gate, which));
    }
}

// Nearest-neighbour 2x: x [planes, height, width] -> out [planes, 2*height, 2*width], both contiguous.
// One thread per OUTPUT element (consecutive threads write consecutive pixels of an output row).
extern "C" __global__ void upsample_nearest2x_kernel(const scalar_t* x, scalar_t* out, long long planes,
                                                     long long height, long long width) {
    const long long out_width = 2 * width, out_plane = 4 * height * width;
    GRID_STRIDE_LOOP(i, planes * out_plane) {
        const long long plane = i / out_plane;
        const long long y = (i % out_plane) / out_width, col = i % out_width;
        out[i] = x[(plane * height + y / 2) * width + col / 2];
    }
}
"""


def _launch(name, dtype, n, args):
    if n > 0:
        kernel("elementwise", SOURCE, dtype, name)((grid_for(n),), (THREADS,), args)


def activation(x, which):
    """out = activation(x) for a cupy array of any shape (a new contiguous array)."""
    cupy = import_cupy()
    x = cupy.ascontiguousarray(x)  # [...]
    out = cupy.empty_like(x)  # [...]
    _launch("activation_kernel", x.dtype.name, x.size, (x, out, i64(x.size), i32(which)))
    return out


def silu(x):
    return activation(x, SILU)


def quick_gelu(x):
    return activation(x, QUICK_GELU)


def gelu(x, approximate="none"):
    return activation(x, GELU_CODES[approximate])


def geglu_gate(hidden, approximate="none"):
    """hidden [..., 2D] -> [..., D]: hidden[..., :D] * gelu(hidden[..., D:]) in one pass."""
    cupy = import_cupy()
    hidden = cupy.ascontiguousarray(hidden)  # [..., 2D]
    width = hidden.shape[-1] // 2
    rows = hidden.size // max(1, hidden.shape[-1])
    out = cupy.empty(hidden.shape[:-1] + (width,), dtype=hidden.dtype)  # [..., D]
    _launch("geglu_gate_kernel", hidden.dtype.name, rows * width,
            (hidden, out, i64(rows), i64(width), i32(GELU_CODES[approximate])))
    return out


def upsample_nearest2x(x):
    """[B,C,H,W] -> [B,C,2H,2W], each pixel repeated in a 2x2 block."""
    cupy = import_cupy()
    batch, channels, height, width = x.shape
    x = cupy.ascontiguousarray(x)  # [B,C,H,W] = [P,H,W] planes
    out = cupy.empty((batch, channels, 2 * height, 2 * width), dtype=x.dtype)  # [B,C,2H,2W]
    _launch("upsample_nearest2x_kernel", x.dtype.name, out.size,
            (x, out, i64(batch * channels), i64(height), i64(width)))
    return out
