"""bfloat16 rounding, and which bf16 GEMM runs on this machine: what matmul_bf16.py and conv_bf16.py
(and the models' bf16 weights) share.

  float32_to_bf16(a)     float32 -> uint16 bf16 bits, round to nearest even: torch's
                         `.to(torch.bfloat16)` bit for bit (NaN stays a NaN)
  bf16_to_float32(u)     uint16 bf16 bits -> float32 (exact)
  rounded_to_bf16(a)     both: float32 a as the bf16 GEMM sees it
  bf16_bits, pair_word   the same rounding inside Numba loops (one value; a pair of k in one word)
  round_rows             rows of a float32 matrix -> bf16 bits, zero-padded (AMX's A operand)
  split_bf16(a)          float32 -> (hi, lo) bf16 bits: hi = bf16(a), lo = bf16(a - hi) (bf16x3)
  split_rows             round_rows for bf16x3: [lo | hi | hi] of each row, each part zero-padded
  PackedBf16             what a packed bf16 weight holds (data, shape, layout, nbytes)
  cpu_has_avx512_bf16()  the CPU has AVX512_BF16 (vdpbf16ps) and Numba may use it
  bf16_kernel()          the GEMM bf16 runs on here: "amx" (AMX tiles, matmul_amx.py), "dpbf16"
                         (vdpbf16ps, matmul_bf16.py), or "float32" (the float32 GEMM of the rounded
                         values: the same numbers where the CPU has neither). NPDIFF_NO_AMX=1 rules
                         out AMX, NPDIFF_NO_BF16=1 both (to test the other paths on any machine).
"""

import os

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.intrinsics import bits_float32, float32_bits
from npdiff.jit import SERIAL, njit
from npdiff.kernels.amx_intrinsics import amx_usable, numba_may_use
from npdiff.kernels.validate import shape_text


# ---------------------------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------------------------
def float32_to_bf16(a):
    """float32 array -> uint16 bf16 bits, rounded to nearest even (torch's `.to(torch.bfloat16)`).

    bf16 is the top 16 bits of a float32. Adding 0x7FFF plus the lowest kept bit before dropping
    the low 16 bits rounds to nearest, ties to even; an overflow carries into the exponent (the
    largest values round to inf, as torch's). NaN stays NaN (a quiet NaN of the same sign)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def bf16_to_float32(u):
    """uint16 bf16 bits -> float32 (exact: the bits become the top half of a float32)."""
    u = np.asarray(u)
    if u.dtype != np.uint16:
        raise NpdiffError(f"bf16_to_float32: expected uint16 bfloat16 bits, got {u.dtype} "
                          f"with shape {shape_text(u.shape)}")
    return (u.astype(np.uint32) << 16).view(np.float32)


def rounded_to_bf16(a):
    """float32 a rounded to bf16 and widened back: what the bf16 GEMM multiplies."""
    return bf16_to_float32(float32_to_bf16(a))


@njit(**SERIAL)
def bf16_bits(value):
    """One float32 -> its bf16 bits in the low 16 bits of a uint32 (float32_to_bf16, scalar)."""
    bits = float32_bits(value)
    if np.isnan(value):
        return np.uint32((bits >> np.uint32(16)) | np.uint32(0x0040))
    return np.uint32((bits + ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16))


@njit(**SERIAL)
def pair_word(low, high):
    """The 32-bit word vdpbf16ps reads for one pair of k: bf16(low) | bf16(high) << 16."""
    return np.uint32(bf16_bits(low) | (bf16_bits(high) << np.uint32(16)))


class PackedBf16:
    """A weight rounded to bf16 once, in the layout its kernel reads (PackedBf16Weight for linear
    layers, PackedBf16Conv for convolutions): `data`, the weight's own `shape`, the `layout` name."""

    def __init__(self, data, shape, layout):
        self.data = data
        self.shape = tuple(shape)
        self.layout = layout

    @property
    def nbytes(self):
        return self.data.nbytes


# ---------------------------------------------------------------------------------------------
# Which GEMM: AMX tiles, the vdpbf16ps micro-kernel, or the float32 GEMM of the rounded values
# ---------------------------------------------------------------------------------------------
def cpu_has_avx512_bf16():
    """True when this CPU has AVX512_BF16 (vdpbf16ps) and Numba may use it."""
    return numba_may_use("avx512bf16")


def bf16_kernel():
    """The bf16 GEMM that runs here: "amx", "dpbf16" or "float32" (see the header)."""
    if os.environ.get("NPDIFF_NO_BF16", "") == "1" or not cpu_has_avx512_bf16():
        return "float32"
    if os.environ.get("NPDIFF_NO_AMX", "") != "1" and amx_usable():
        return "amx"
    return "dpbf16"


@njit(**SERIAL)
def round_rows(a, row0, rows, bits):
    """a[row0:row0+rows] float32 [*, K] -> bits[:rows, :K] bf16 (uint16); bits' other rows and
    columns (the padding AMX tiles read) are zero."""
    depth = a.shape[1]
    for r in range(bits.shape[0]):
        if r < rows:
            source = a[row0 + r]  # [K]
            for k in range(depth):
                bits[r, k] = np.uint16(bf16_bits(source[k]))
            for k in range(depth, bits.shape[1]):
                bits[r, k] = 0
        else:
            for k in range(bits.shape[1]):
                bits[r, k] = 0


# ---------------------------------------------------------------------------------------------
# bf16x3: a float32 as the sum of two bf16 (matmul_bf16x3.py)
# ---------------------------------------------------------------------------------------------
def split_bf16(a):
    """float32 a -> (hi, lo) uint16 bf16 bits with a ~ hi + lo: hi = bf16(a), lo = bf16(a - hi).
    a - hi is exact in float32; hi + lo keeps 16 bits of a's mantissa (relative error <= 2^-17)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    hi = float32_to_bf16(a)
    lo = float32_to_bf16(a - bf16_to_float32(hi))
    return hi, lo


@njit(**SERIAL)
def split_rows(a, row0, rows, bits):
    """a[row0:row0+rows] float32 [*, K] -> bits [rows padded, 3 * Kp] bf16 (uint16), Kp = bits' width / 3:
    each row as [lo | hi | hi] (hi = bf16(a), lo = bf16(a - hi)), each part K values then zeros to Kp;
    rows past `rows` all zero (the padding AMX tiles read)."""
    depth = a.shape[1]
    part = bits.shape[1] // 3  # Kp, a multiple of 32
    for r in range(bits.shape[0]):
        for k in range(bits.shape[1]):
            bits[r, k] = 0
        if r < rows:
            source = a[row0 + r]  # [K]
            for k in range(depth):
                high = bf16_bits(source[k])
                rest = source[k] - bits_float32(np.uint32(high << np.uint32(16)))  # exact in float32
                bits[r, k] = np.uint16(bf16_bits(rest))  # lo
                bits[r, part + k] = np.uint16(high)  # hi
                bits[r, 2 * part + k] = np.uint16(high)  # hi again
