"""The Box-Muller kernels behind torch.randn on the CPU, bit for bit (called by torch_cpu.py).

torch.randn(n) with n >= 16 (contiguous output) works on blocks of 16 uniforms d[0..16):

    for j in 0..7:   u1 = 1 - d[j]            (in (0, 1], so log is finite)
                     u2 = d[j + 8]
                     radius = sqrt(-2 * log(u1)),  theta = 2*pi * u2
                     d[j] = radius * cos(theta) * std + mean,  d[j + 8] = radius * sin(theta) * std + mean

with std = 1, mean = 0 here (the `+ 0.0` is kept: it turns a -0.0 into +0.0, as torch's does).
Which log/sin/cos, and in what precision, depends on the dtype and on the CPU kernel torch runs:

  box_muller_16_cephes   float32, torch's AVX2 kernel (x86 with AVX2 or AVX-512: the default):
                         the Cephes float32 polynomials of avx_mathfun.h (npdiff/rng/cephes.py),
                         2*pi as the float32 6.2831855, theta = 2pi * u2 in float32.
  box_muller_16_libm     float32, torch's portable kernel (ATEN_CPU_CAPABILITY=default, aarch64,
                         x86 without AVX2): libm logf/cosf/sinf, theta computed in float64 and
                         rounded to float32. Differs from the Cephes path by up to a few ULP.
  box_muller_16_f64      float64 (every CPU): libm log/cos/sin in double.

Fewer than 16 elements go through torch's serial path instead: `serial_normals` (double precision
Box-Muller that returns cos and caches sin for the next call; see torch_cpu.py).

Parallelism: `transform_blocks_*` run one prange over the blocks of 16 (independent: each block
reads and writes only its own 16 contiguous floats). The inner loop over the 8 lanes j is the one
torch runs as 8 SIMD lanes; LLVM vectorises it the same way for the Cephes kernel. The libm
kernels call scalar logf/cosf/sinf (no vector math library: those would round differently).
"""

import math

import numpy as np

from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.rng.cephes import log_ps, sincos_ps
from npdiff.rng.intrinsics import fma32
from npdiff.rng.mt19937 import next_uniform_f64

BLOCK = 16
HALF_BLOCK = 8

ONE_F32 = np.float32(1.0)
ZERO_F32 = np.float32(0.0)
MINUS_TWO_F32 = np.float32(-2.0)
TWO_PI_F32 = np.float32(2.0 * math.pi)  # 6.2831855: _mm256_set1_ps(2.0f * c10::pi<double>)
TWO_PI_F64 = 2.0 * math.pi  # 2.0f * c10::pi<double> in the portable kernel: a double


# ---------------------------------------------------------------------------------------------
# One block of 16, three ways.
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def box_muller_16_cephes(data, start):
    """data[start:start+16] (float32 uniforms) -> normals, as torch's normal_fill_16_AVX2."""
    for j in range(HALF_BLOCK):
        u1 = ONE_F32 - data[start + j]
        u2 = data[start + j + HALF_BLOCK]
        radius = math.sqrt(MINUS_TWO_F32 * log_ps(u1))
        theta = TWO_PI_F32 * u2
        sin_theta, cos_theta = sincos_ps(theta)
        # torch: _mm256_fmadd_ps(radius * cos, std, mean) with std = 1, mean = +0
        data[start + j] = fma32(radius * cos_theta, ONE_F32, ZERO_F32)
        data[start + j + HALF_BLOCK] = fma32(radius * sin_theta, ONE_F32, ZERO_F32)


@njit(**SERIAL)
def box_muller_16_libm(data, start):
    """data[start:start+16] (float32 uniforms) -> normals, as torch's portable normal_fill_16<float>."""
    for j in range(HALF_BLOCK):
        u1 = ONE_F32 - data[start + j]
        u2 = data[start + j + HALF_BLOCK]
        radius = math.sqrt(MINUS_TWO_F32 * math.log(u1))  # logf, sqrtf
        theta = np.float32(TWO_PI_F64 * np.float64(u2))  # double product, rounded to float
        data[start + j] = fma32(radius * math.cos(theta), ONE_F32, ZERO_F32)  # cosf
        data[start + j + HALF_BLOCK] = fma32(radius * math.sin(theta), ONE_F32, ZERO_F32)  # sinf


@njit(**SERIAL)
def box_muller_16_f64(data, start):
    """data[start:start+16] (float64 uniforms) -> normals, as torch's normal_fill_16<double>."""
    for j in range(HALF_BLOCK):
        u1 = 1.0 - data[start + j]
        u2 = data[start + j + HALF_BLOCK]
        radius = math.sqrt(-2.0 * math.log(u1))
        theta = TWO_PI_F64 * u2
        data[start + j] = radius * math.cos(theta) + 0.0  # fma(r*cos, 1, 0) == r*cos + 0 exactly
        data[start + j + HALF_BLOCK] = radius * math.sin(theta) + 0.0


# ---------------------------------------------------------------------------------------------
# All full blocks of an array, in parallel.
# ---------------------------------------------------------------------------------------------
@njit(**PARALLEL)
def transform_blocks_cephes(data, n_blocks):
    for block in prange(n_blocks):
        box_muller_16_cephes(data, block * BLOCK)


@njit(**PARALLEL)
def transform_blocks_libm(data, n_blocks):
    for block in prange(n_blocks):
        box_muller_16_libm(data, block * BLOCK)


@njit(**PARALLEL)
def transform_blocks_f64(data, n_blocks):
    for block in prange(n_blocks):
        box_muller_16_f64(data, block * BLOCK)


# ---------------------------------------------------------------------------------------------
# Fewer than 16 elements: torch's serial normal_distribution<double>, with its one-value cache.
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def serial_normals(mt, counters, cache, out):
    """out[i] (float64) = next normal of torch's serial path.

    cache: float64 [2] = (1.0 if a cached normal is waiting else 0.0, the cached value).
    Each fresh pair: u1, u2 = two 53-bit uniforms, r = sqrt(-2 log1p(-u2)), theta = 2pi u1;
    return r cos(theta) now and keep r sin(theta) for the next normal drawn on this path.
    """
    for i in range(out.shape[0]):
        if cache[0] != 0.0:
            cache[0] = 0.0
            out[i] = cache[1] + 0.0  # torch: cached * std + mean
            continue
        u1 = next_uniform_f64(mt, counters)
        u2 = next_uniform_f64(mt, counters)
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = TWO_PI_F64 * u1
        cache[0] = 1.0
        cache[1] = radius * math.sin(theta)
        out[i] = radius * math.cos(theta) + 0.0
