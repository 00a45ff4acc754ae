"""Element-wise activations: silu, gelu (exact erf or tanh), quick_gelu.

Versions (npdiff/kernels/dispatch.py picks: the fast one for NumPy arrays, the CUDA kernel of
npdiff/kernels/cuda/elementwise.py for cupy arrays, the reference otherwise):
  1. *_ref   NumPy API (runs on cupy arrays too). NumPy has no erf, so the exact gelu uses
             `erfc_ref`: the Chebyshev-fitted erfc of Numerical Recipes (fractional error < 1.2e-7
             everywhere), evaluated in float64, so gelu is float32-accurate in both tails.
  2. *_fast  (activation_block + _map_parallel) Numba: the array is made contiguous and cut into runs of
             CHUNK elements, one run per parallel task; each run is a vectorised loop over the
             arithmetic-only exp/erfc of vecmath.py (float32, <= 2 ulp exp; erfc < 5e-7 relative
             everywhere). One read, one write per element, no temporaries: memory-bound.

torch's formulas, which both versions follow:
  silu(x)       = x * sigmoid(x)
  gelu(x)       = 0.5 * x * (1 + erf(x / sqrt(2)))
  gelu_tanh(x)  = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
  quick_gelu(x) = x * sigmoid(1.702 x)          (CLIP)
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import FASTMATH_CONTRACT, PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.validate import require_float32
from npdiff.kernels.vecmath import erfc_f32, sigmoid_f32

INV_SQRT2 = 0.7071067811865476
SQRT_2_OVER_PI = 0.7978845608028654
GELU_TANH_COEFF = 0.044715
QUICK_GELU_ALPHA = 1.702
CHUNK = 16384  # elements per parallel task: 64 KiB of float32, big enough to amortise scheduling

APPROXIMATIONS = ("none", "tanh")


# ---------------------------------------------------------------------------------------------
# Reference (NumPy API, numpy or cupy)
# ---------------------------------------------------------------------------------------------
def erfc_ref(z):
    """Complementary error function, float64, fractional error < 1.2e-7 (Numerical Recipes erfcc)."""
    xp = backend.array_module(z)
    z = z.astype(xp.float64)
    t = 1.0 / (1.0 + 0.5 * xp.abs(z))
    poly = -0.82215223 + t * 0.17087277
    for coeff in (1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196,
                  1.00002368, -1.26551223):
        poly = coeff + t * poly
    tail = t * xp.exp(-z * z + poly)  # erfc(|z|)
    return xp.where(z >= 0, tail, 2.0 - tail)


def sigmoid_ref(x):
    """1 / (1 + exp(-x)) without overflow: uses e = exp(-|x|) <= 1 on both sides."""
    xp = backend.array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)


def silu_ref(x):
    return x * sigmoid_ref(x)


def quick_gelu_ref(x):
    return x * sigmoid_ref(np.float32(QUICK_GELU_ALPHA) * x)


def gelu_ref(x, approximate="none"):
    xp = backend.array_module(x)
    x64 = x.astype(xp.float64)  # both in float64, rounded once: in the negative tail 1 + tanh and 1 + erf
    if approximate == "tanh":  # cancel (in float32, GELU-tanh(-4.27) came out 2.2e-3 off)
        inner = SQRT_2_OVER_PI * (x64 + GELU_TANH_COEFF * x64 * x64 * x64)
        return (0.5 * x64 * (1.0 + xp.tanh(inner))).astype(xp.float32)
    # 1 + erf(x/sqrt2) = erfc(-x/sqrt2): accurate also where erf ~ -1 (large negative x)
    return (0.5 * x64 * erfc_ref(-x64 * INV_SQRT2)).astype(xp.float32)


# ---------------------------------------------------------------------------------------------
# Numba (NumPy arrays): flat contiguous in -> flat contiguous out
# ---------------------------------------------------------------------------------------------
# Each activation is a serial block function over one contiguous run (LLVM vectorises it: the
# vecmath functions are plain arithmetic), and `_map_parallel` hands runs of CHUNK elements to the
# threads. (A loop written directly inside the prange body is not vectorised by Numba's parfor
# lowering: measured 5x slower per element than the same loop in a called function.)
SILU, QUICK_GELU, GELU_ERF, GELU_TANH = 0, 1, 2, 3
ACTIVATION_CODES = {"silu": SILU, "quick_gelu": QUICK_GELU, "none": GELU_ERF, "tanh": GELU_TANH}


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def activation_block(x, out, which):
    """out[i] = activation(x[i]) over a contiguous run; `which` is one of the codes above. fastmath 'contract'
    only: with 'reassoc' the product in GELU-tanh's c*v*v*v could be grouped differently in each compiled copy
    of this function (linear_packed.py's epilogue calls it; Numba links a copy into every caller)."""
    if which == SILU:
        for i in range(x.size):
            out[i] = x[i] * sigmoid_f32(x[i])
    elif which == QUICK_GELU:
        for i in range(x.size):
            out[i] = x[i] * sigmoid_f32(np.float32(QUICK_GELU_ALPHA) * x[i])
    elif which == GELU_ERF:
        for i in range(x.size):
            out[i] = np.float32(0.5) * x[i] * erfc_f32(-x[i] * np.float32(INV_SQRT2))
    else:
        for i in range(x.size):
            v = x[i]
            inner = np.float32(SQRT_2_OVER_PI) * (v + np.float32(GELU_TANH_COEFF) * v * v * v)
            # 1 + tanh(u) = 2 sigmoid(2u): one exp, exact limits at both ends
            out[i] = v * sigmoid_f32(np.float32(2.0) * inner)


@njit(**PARALLEL)
def _map_parallel(x, out, which):
    n = x.size
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(n, start + CHUNK)
        activation_block(x[start:stop], out[start:stop], which)


def _elementwise_numba(x, which):
    x_contig = np.ascontiguousarray(x)  # [...] (a copy only if x was a strided view)
    out = np.empty_like(x_contig)  # [...]
    _map_parallel(x_contig.reshape(-1), out.reshape(-1), which)  # flat views of the same memory
    return out


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
def silu_fast(x):
    return _elementwise_numba(x, SILU)


def quick_gelu_fast(x):
    return _elementwise_numba(x, QUICK_GELU)


def gelu_fast(x, approximate="none"):
    return _elementwise_numba(x, ACTIVATION_CODES[approximate])


SILU_KERNEL = dispatch.register("silu", fast=silu_fast, reference=silu_ref, cuda="silu")
QUICK_GELU_KERNEL = dispatch.register("quick_gelu", fast=quick_gelu_fast, reference=quick_gelu_ref,
                                      cuda="quick_gelu")
GELU_KERNEL = dispatch.register("gelu", fast=gelu_fast, reference=gelu_ref, cuda="gelu")


def silu(x):
    """x * sigmoid(x), as torch.nn.functional.silu. x: float32 array of any shape."""
    require_float32("silu", "x", x)
    return SILU_KERNEL(x)


def quick_gelu(x):
    """x * sigmoid(1.702 x), CLIP's activation. x: float32 array of any shape."""
    require_float32("quick_gelu", "x", x)
    return QUICK_GELU_KERNEL(x)


def check_approximate(kernel, approximate):
    if approximate not in APPROXIMATIONS:
        raise NpdiffError(f"{kernel}: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def gelu(x, approximate="none"):
    """torch.nn.functional.gelu: exact erf form ("none") or the tanh approximation ("tanh")."""
    require_float32("gelu", "x", x)
    check_approximate("gelu", approximate)
    return GELU_KERNEL(x, approximate)
