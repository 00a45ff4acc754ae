"""Backward of the element-wise activations of activations.py: dx = dy * activation'(x).

Versions (the pair of activations.py's, numbered alike):
  1. *_backward_ref   NumPy API: the derivative formula in float64 where the forward uses float64
                      (exact gelu), else float32.
  2. *_backward_fast  Numba: the same runs of CHUNK elements as the forward, one parallel task per
                      run, the vectorisable sigmoid/erfc/exp of vecmath.py; reads x and dy once,
                      writes dx once.

The derivatives (torch's autograd formulas):
  silu'(x)        = s (1 + x (1 - s)),            s = sigmoid(x)
  quick_gelu'(x)  = s + 1.702 x s (1 - s),        s = sigmoid(1.702 x)
  gelu'(x)        = Phi(x) + x phi(x)  = 0.5 erfc(-x/sqrt2) + x exp(-x^2/2) / sqrt(2 pi)
  gelu_tanh'(x)   = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 0.044715 x^2),
                    t = tanh(sqrt(2/pi) (x + 0.044715 x^3))
"""

import math

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import FASTMATH_CONTRACT, PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.activations import (
    ACTIVATION_CODES,
    CHUNK,
    GELU_ERF,
    GELU_TANH_COEFF,
    INV_SQRT2,
    QUICK_GELU,
    QUICK_GELU_ALPHA,
    SILU,
    SQRT_2_OVER_PI,
    check_approximate,
    erfc_ref,
    sigmoid_ref,
)
from npdiff.kernels.validate import require_float32, shape_text
from npdiff.kernels.vecmath import erfc_f32, exp_f32, sigmoid_f32

INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# Reference (NumPy API)
# ---------------------------------------------------------------------------------------------
def silu_backward_ref(x, grad_out):
    s = sigmoid_ref(x)  # [...]
    return grad_out * s * (np.float32(1.0) + x * (np.float32(1.0) - s))


def quick_gelu_backward_ref(x, grad_out):
    s = sigmoid_ref(np.float32(QUICK_GELU_ALPHA) * x)  # [...]
    return grad_out * (s + np.float32(QUICK_GELU_ALPHA) * x * s * (np.float32(1.0) - s))


def gelu_backward_ref(x, grad_out, approximate="none"):
    xp = backend.array_module(x)
    x64 = x.astype(xp.float64)  # [...]
    if approximate == "tanh":
        t = xp.tanh(SQRT_2_OVER_PI * (x64 + GELU_TANH_COEFF * x64 ** 3))
        slope = 0.5 * (1.0 + t) + 0.5 * x64 * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_COEFF * x64 ** 2)
    else:
        slope = 0.5 * erfc_ref(-x64 * INV_SQRT2) + x64 * xp.exp(-0.5 * x64 * x64) * INV_SQRT_2PI
    return (grad_out * slope).astype(xp.float32)


# ---------------------------------------------------------------------------------------------
# Numba (NumPy arrays)
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def activation_slope_block(x, grad_out, grad_in, which):
    """grad_in[i] = grad_out[i] * activation'(x[i]) over a contiguous run (codes of activations.py)."""
    one = np.float32(1.0)
    if which == SILU:
        for i in range(x.size):
            s = sigmoid_f32(x[i])
            grad_in[i] = grad_out[i] * s * (one + x[i] * (one - s))
    elif which == QUICK_GELU:
        for i in range(x.size):
            s = sigmoid_f32(np.float32(QUICK_GELU_ALPHA) * x[i])
            grad_in[i] = grad_out[i] * (s + np.float32(QUICK_GELU_ALPHA) * x[i] * s * (one - s))
    elif which == GELU_ERF:
        for i in range(x.size):
            v = x[i]
            cdf = np.float32(0.5) * erfc_f32(-v * np.float32(INV_SQRT2))
            pdf = exp_f32(np.float32(-0.5) * v * v) * np.float32(INV_SQRT_2PI)
            grad_in[i] = grad_out[i] * (cdf + v * pdf)
    else:
        for i in range(x.size):
            v = x[i]
            inner = np.float32(SQRT_2_OVER_PI) * (v + np.float32(GELU_TANH_COEFF) * v * v * v)
            t = np.float32(2.0) * sigmoid_f32(np.float32(2.0) * inner) - one  # tanh(inner)
            inner_slope = np.float32(SQRT_2_OVER_PI) * (one + np.float32(3.0 * GELU_TANH_COEFF) * v * v)
            grad_in[i] = grad_out[i] * (np.float32(0.5) * (one + t) + np.float32(0.5) * v * (one - t * t) * inner_slope)


@njit(**PARALLEL)
def _slope_parallel(x, grad_out, grad_in, which):
    n = x.size
    for chunk in prange((n + CHUNK - 1) // CHUNK):
        start = chunk * CHUNK
        stop = min(n, start + CHUNK)
        activation_slope_block(x[start:stop], grad_out[start:stop], grad_in[start:stop], which)


def _slope_numba(x, grad_out, which):
    x_flat = np.ascontiguousarray(x).reshape(-1)  # [...] -> [n]
    grad_flat = np.ascontiguousarray(grad_out, dtype=np.float32).reshape(-1)  # [n]
    grad_in = np.empty_like(x_flat)  # [n]
    _slope_parallel(x_flat, grad_flat, grad_in, which)
    return grad_in.reshape(x.shape)


def silu_backward_fast(x, grad_out):
    return _slope_numba(x, grad_out, SILU)


def quick_gelu_backward_fast(x, grad_out):
    return _slope_numba(x, grad_out, QUICK_GELU)


def gelu_backward_fast(x, grad_out, approximate="none"):
    return _slope_numba(x, grad_out, ACTIVATION_CODES[approximate])


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
SILU_BACKWARD = dispatch.register("silu_backward", fast=silu_backward_fast, reference=silu_backward_ref)
QUICK_GELU_BACKWARD = dispatch.register("quick_gelu_backward", fast=quick_gelu_backward_fast,
                                        reference=quick_gelu_backward_ref)
GELU_BACKWARD = dispatch.register("gelu_backward", fast=gelu_backward_fast, reference=gelu_backward_ref)


def check_same_shape(kernel, x, grad_out):
    require_float32(kernel, "x", x)
    require_float32(kernel, "grad_out", grad_out)
    if tuple(x.shape) != tuple(grad_out.shape):
        raise NpdiffError(f"{kernel}: grad_out must have the shape of x {shape_text(x.shape)}, "
                          f"got {shape_text(grad_out.shape)}")


def silu_backward(x, grad_out):
    """d(loss)/dx of y = silu(x), given x (the forward's input) and d(loss)/dy."""
    check_same_shape("silu_backward", x, grad_out)
    return SILU_BACKWARD(x, grad_out)


def quick_gelu_backward(x, grad_out):
    """d(loss)/dx of y = quick_gelu(x), given x and d(loss)/dy."""
    check_same_shape("quick_gelu_backward", x, grad_out)
    return QUICK_GELU_BACKWARD(x, grad_out)


def gelu_backward(x, grad_out, approximate="none"):
    """d(loss)/dx of y = gelu(x, approximate), given x and d(loss)/dy."""
    check_same_shape("gelu_backward", x, grad_out)
    check_approximate("gelu_backward", approximate)
    return GELU_BACKWARD(x, grad_out, approximate)


# activation name (as linear.py's LINEAR_ACTIVATIONS) -> its backward
ACTIVATION_BACKWARDS = {
    "silu": silu_backward,
    "quick_gelu": quick_gelu_backward,
    "gelu": lambda x, g: gelu_backward(x, g, "none"),
    "gelu_tanh": lambda x, g: gelu_backward(x, g, "tanh"),
}
