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
                         rounded to float32. Measured on 2M values: 38% differ from the Cephes
                         path, by at most ~2.3e-6 (mostly 1-2 ulp; near-zero values more ulp).
  box_muller_16_f64      float64 (every CPU): libm log/cos/sin in double.

Fewer than 16 elements go through torch's serial path instead: `serial_normals` (double precision
Box-Muller that returns cos and caches sin for the next call; see torch_cpu.py).

Versions (tests check that all give torch's bits):
  transform_blocks_reference(data, n_blocks, cephes)   block by block with box_muller_16_*: the
                                                       algorithm as written above, serial.
  transform_blocks_f32(data, n_blocks, cephes)         the same float32 operations, regrouped into
                                                       long lane loops LLVM vectorises, one prange
                                                       over chunks of blocks (see its comment).
  transform_blocks_f64(data, n_blocks)                 float64: prange over blocks (libm calls).
The libm kernels call scalar logf/cosf/sinf (no vector math library: it would round differently).
"""

import math

import numpy as np

from npdiff.intrinsics import fma32, sqrt32
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.rng.cephes import log_ps, sincos_ps
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
        radius = sqrt32(MINUS_TWO_F32 * log_ps(u1))
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
        radius = sqrt32(MINUS_TWO_F32 * math.log(u1))  # logf, sqrtf
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
# Reference: all full blocks, one after the other, with the per-block functions above.
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def transform_blocks_reference(data, n_blocks, cephes):
    """float32 data[0 : 16*n_blocks] uniforms -> normals, block by block (the readable version)."""
    for block in range(n_blocks):
        if cephes:
            box_muller_16_cephes(data, block * BLOCK)
        else:
            box_muller_16_libm(data, block * BLOCK)


# ---------------------------------------------------------------------------------------------
# Fast: the same arithmetic, laid out so LLVM can vectorise it, and threaded.
#
# How it differs from the reference: LLVM does not vectorise the 8-lane loop of a block (it unrolls
# it and its SLP pass gives up on the Cephes code). So the fast kernel takes CHUNK_BLOCKS blocks at
# a time, copies their first halves (the u1 lanes) into one contiguous scratch array and their
# second halves (the u2 lanes) into another, runs ONE long loop over all lanes (vectorised 16
# wide on AVX-512), and copies the normals back. Every lane does exactly the reference's float32
# operations in the same order, so the bits are the same (tests check fast == reference == torch).
# (The lane loop runs k = 0..len-1 over whole arrays: with an index Numba cannot prove >= 0 it
# adds negative-index wraparound, and that alone stops LLVM from vectorising.)
# One prange over the chunks: chunks are independent and each touches only its own 16*256 floats.
# ---------------------------------------------------------------------------------------------
CHUNK_BLOCKS = 256  # 4096 floats = 16 KiB per chunk: the scratch stays in L1/L2
PARALLEL_MIN_BLOCKS = 8192  # 131072 floats: below this one thread is faster than two


@njit(**SERIAL)
def _normals_from_lanes_cephes(lanes_1, lanes_2):
    """In place: lanes_1[k] (u) -> r*cos, lanes_2[k] (u) -> r*sin, torch's AVX2 arithmetic."""
    for k in range(lanes_1.shape[0]):
        radius = sqrt32(MINUS_TWO_F32 * log_ps(ONE_F32 - lanes_1[k]))
        sin_theta, cos_theta = sincos_ps(TWO_PI_F32 * lanes_2[k])
        lanes_1[k] = fma32(radius * cos_theta, ONE_F32, ZERO_F32)
        lanes_2[k] = fma32(radius * sin_theta, ONE_F32, ZERO_F32)


@njit(**SERIAL)
def _normals_from_lanes_libm(lanes_1, lanes_2):
    """In place, torch's portable arithmetic (libm logf/cosf/sinf: scalar calls)."""
    for k in range(lanes_1.shape[0]):
        radius = sqrt32(MINUS_TWO_F32 * math.log(ONE_F32 - lanes_1[k]))
        theta = np.float32(TWO_PI_F64 * np.float64(lanes_2[k]))
        lanes_1[k] = fma32(radius * math.cos(theta), ONE_F32, ZERO_F32)
        lanes_2[k] = fma32(radius * math.sin(theta), ONE_F32, ZERO_F32)


@njit(**SERIAL)
def _transform_chunk(data, first_block, count, cephes):
    """Blocks first_block .. first_block+count-1 of float32 data: uniforms -> normals."""
    lanes_1 = np.empty(count * HALF_BLOCK, dtype=np.float32)  # [count*8] first halves (u1)
    lanes_2 = np.empty(count * HALF_BLOCK, dtype=np.float32)  # [count*8] second halves (u2)
    blocks = data[first_block * BLOCK:(first_block + count) * BLOCK]  # [count*16] view
    # 1. Gather: block b's data[16b : 16b+8] -> lanes_1[8b : 8b+8], data[16b+8 : 16b+16] -> lanes_2.
    for b in range(count):
        for j in range(HALF_BLOCK):
            lanes_1[b * HALF_BLOCK + j] = blocks[b * BLOCK + j]
            lanes_2[b * HALF_BLOCK + j] = blocks[b * BLOCK + HALF_BLOCK + j]
    # 2. Box-Muller on every lane (the vectorised loop).
    if cephes:
        _normals_from_lanes_cephes(lanes_1, lanes_2)
    else:
        _normals_from_lanes_libm(lanes_1, lanes_2)
    # 3. Scatter back: cos normals to the first halves, sin normals to the second halves.
    for b in range(count):
        for j in range(HALF_BLOCK):
            blocks[b * BLOCK + j] = lanes_1[b * HALF_BLOCK + j]
            blocks[b * BLOCK + HALF_BLOCK + j] = lanes_2[b * HALF_BLOCK + j]


@njit(**PARALLEL)
def _transform_blocks_f32_parallel(data, n_blocks, cephes):
    n_chunks = (n_blocks + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
    for chunk in prange(n_chunks):
        first_block = chunk * CHUNK_BLOCKS
        _transform_chunk(data, first_block, min(CHUNK_BLOCKS, n_blocks - first_block), cephes)


@njit(**SERIAL)
def _transform_blocks_f32_serial(data, n_blocks, cephes):
    for first_block in range(0, n_blocks, CHUNK_BLOCKS):
        _transform_chunk(data, first_block, min(CHUNK_BLOCKS, n_blocks - first_block), cephes)


def transform_blocks_f32(data, n_blocks, cephes):
    """float32 data[0 : 16*n_blocks] uniforms -> normals; cephes: AVX2 arithmetic, else libm.
    Threads only for big arrays: waking the pool costs more than a latent's worth of work."""
    if n_blocks >= PARALLEL_MIN_BLOCKS:
        _transform_blocks_f32_parallel(data, n_blocks, cephes)
    else:
        _transform_blocks_f32_serial(data, n_blocks, cephes)


@njit(**PARALLEL)
def _transform_blocks_f64_parallel(data, n_blocks):
    for block in prange(n_blocks):
        box_muller_16_f64(data, block * BLOCK)


@njit(**SERIAL)
def _transform_blocks_f64_serial(data, n_blocks):
    for block in range(n_blocks):
        box_muller_16_f64(data, block * BLOCK)


def transform_blocks_f64(data, n_blocks):
    """float64 data[0 : 16*n_blocks] -> normals (libm double: scalar calls, so no lane layout)."""
    if n_blocks >= PARALLEL_MIN_BLOCKS:
        _transform_blocks_f64_parallel(data, n_blocks)
    else:
        _transform_blocks_f64_serial(data, n_blocks)


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
