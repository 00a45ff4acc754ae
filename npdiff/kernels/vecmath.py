"""exp, sigmoid and erfc for Numba loops that LLVM can vectorise.

Why: Numba turns math.exp / math.erf into calls to libm, one element at a time (there is no vector
math library unless Intel's SVML is installed), so a softmax or gelu loop runs at scalar speed,
several times slower than torch's vectorised kernels. These functions use only arithmetic, compares,
float<->int conversion and one bit cast, all of which LLVM vectorises (16 float32 lanes on AVX-512).
They are ordinary Numba functions, so they keep their own fast-math flags (contraction to FMA
only: a caller's `reassoc` must not regroup the two-part ln2 reduction); LLVM inlines them into the
caller's loop, where the instructions keep those flags, and vectorises the loop.

Numba's on-disk cache (cache=True) of a caller is keyed on the caller's own file only: after editing
this file, delete npdiff/kernels/__pycache__ so the callers are recompiled with the new code.

  exp_f32(x)      Cephes expf: n = round(x / ln2), r = x - n ln2 (ln2 split in two parts so the
                  product is exact), exp(r) by a degree-7 polynomial on |r| <= ln2/2, times 2^n
                  built directly in the exponent bits. Relative error <= 2 ulp on float32. Below
                  -87.33 (where exp is subnormal) it returns 0, above 88.72 +inf, and NaN stays NaN;
                  exp(-inf) = 0 exactly, which masked softmax relies on.
  exp2_nonpositive_f32(x)
                  2^x for x <= 0 (softmax's s - max, with the scores in log2 units): n = rint(x),
                  f = x - n in [-1/2, 1/2], 2^f = 1 + f P(f) with a degree-4 P, times 2^n in the
                  exponent bits. Relative error <= 2e-7 (measured on [-126, 0]). Fewer operations
                  than exp_f32 (no ln2 reduction, no clamp, no overflow side: 13 vector operations
                  per 16 floats): below -126 it returns 0 (so 2^-inf = 0 exactly), NaN stays NaN;
                  x > 0 is outside its range.
  sigmoid_f32(x)  1 / (1 + exp(-x)): exp(-x) = inf for x < -88 gives exactly 0, no overflow trap.
  erfc_f32(z)     Numerical Recipes' erfcc: t = 1/(1 + |z|/2), erfc(|z|) = t exp(-z^2 + P(t)) with a
                  degree-9 polynomial P; fractional error < 1.2e-7 for every z (also deep in the tail,
                  where 1 + erf(z) would cancel), erfc(-z) = 2 - erfc(z). The exp argument is formed
                  in float64 (see the comment there).
"""

import numpy as np

from npdiff.intrinsics import bits_float32
from npdiff.jit import FASTMATH_CONTRACT, njit

LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)  # ln2 = LN2_HI + LN2_LO, LN2_HI with few mantissa bits: n*LN2_HI exact
LN2_LO = np.float32(-2.12194440e-4)
LOG2E_64 = 1.4426950408889634
LN2_64 = 0.6931471805599453
EXP_MAX = np.float32(88.72283)  # exp overflows float32 above this
EXP_MIN = np.float32(-87.33654)  # exp is subnormal below this (returned as 0)
EXP_POLY = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
            np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))
EXP2_MIN = np.float32(-126.0)  # 2^x is subnormal below this (returned as 0)
# 2^f = 1 + f P(f) on [-1/2, 1/2], P of degree 4: a minimax fit for the relative error (1e-7 in
# exact arithmetic, 1.9e-7 evaluated in float32; Cephes' exp2f has one degree more, 1.7e-7)
EXP2_POLY = (np.float32(1.3269955070585782e-3), np.float32(9.671510964091716e-3),
             np.float32(5.5507157375416304e-2), np.float32(2.4022242125768692e-1),
             np.float32(6.931469912763158e-1))
ONE = np.float32(1.0)
TWO = np.float32(2.0)
HALF = np.float32(0.5)


@njit(fastmath=FASTMATH_CONTRACT)
def exp_poly_times_pow2(r, n):
    """exp(r) * 2^n for |r| <= ln2/2 (float32) and an integral float n in [-126, 128]."""
    p = EXP_POLY[0]
    p = p * r + EXP_POLY[1]
    p = p * r + EXP_POLY[2]
    p = p * r + EXP_POLY[3]
    p = p * r + EXP_POLY[4]
    p = p * r + EXP_POLY[5]
    p = p * (r * r) + r + ONE  # exp(r)
    n_int = np.int32(n)
    # 2^n as float32 bits: exponent field n + 127. n = 128 (x near EXP_MAX) is split as 2^127 * 2.
    high = n_int == 128
    scale = bits_float32(np.int32((n_int - np.int32(high) + np.int32(127)) << np.int32(23)))
    result = p * scale
    if high:
        result = result * TWO
    return result


@njit(fastmath=FASTMATH_CONTRACT)
def exp_f32(x):
    x = np.float32(x)
    clamped = min(max(x, EXP_MIN), EXP_MAX)  # keeps n in [-126, 128]; NaN handled below
    n = np.floor(clamped * LOG2E + HALF)  # nearest integer to x / ln2, as a float32
    r = (clamped - n * LN2_HI) - n * LN2_LO  # |r| <= ln2/2; n*LN2_HI is exact
    result = exp_poly_times_pow2(r, n)
    if x < EXP_MIN:
        result = np.float32(0.0)
    if x > EXP_MAX:
        result = np.float32(np.inf)
    if x != x:
        result = x
    return result


@njit(fastmath=FASTMATH_CONTRACT)
def exp2_nonpositive_f32(x):
    x = np.float32(x)
    n = np.rint(x)  # nearest integer, as a float32
    f = x - n  # [-1/2, 1/2]
    p = EXP2_POLY[0]
    p = p * f + EXP2_POLY[1]
    p = p * f + EXP2_POLY[2]
    p = p * f + EXP2_POLY[3]
    p = p * f + EXP2_POLY[4]
    p = p * f + ONE  # 2^f
    # 2^n in the exponent bits; for x < -126 (-inf included, whose f is NaN) n is out of range and
    # the bits are garbage, but the result is replaced by 0 below. NaN gives NaN (p is NaN).
    scale = bits_float32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    result = p * scale
    if x < EXP2_MIN:
        result = np.float32(0.0)
    return result


@njit
def sigmoid_f32(x):
    return ONE / (ONE + exp_f32(-np.float32(x)))


@njit(fastmath=FASTMATH_CONTRACT)
def erfc_f32(z):
    z = np.float32(z)
    a = abs(z)
    t = ONE / (ONE + HALF * a)
    poly = np.float32(0.17087277)
    poly = poly * t + np.float32(-0.82215223)
    poly = poly * t + np.float32(1.48851587)
    poly = poly * t + np.float32(-1.13520398)
    poly = poly * t + np.float32(0.27886807)
    poly = poly * t + np.float32(-0.18628806)
    poly = poly * t + np.float32(0.09678418)
    poly = poly * t + np.float32(0.37409196)
    poly = poly * t + np.float32(1.00002368)
    poly = poly * t + np.float32(-1.26551223)
    # exp(poly - a^2): the argument reaches -80 here, where a float32 argument would carry an
    # absolute error of ~5e-6 (and the result that relative error), so it is formed and reduced
    # in float64; only the polynomial runs in float32.
    a64 = np.float64(a)
    argument = np.float64(poly) - a64 * a64
    clamped = max(argument, np.float64(EXP_MIN))
    n = np.floor(clamped * LOG2E_64 + 0.5)
    r = np.float32(clamped - n * LN2_64)
    tail = t * exp_poly_times_pow2(r, np.float32(n))  # erfc(|z|)
    if argument < EXP_MIN:
        tail = np.float32(0.0)
    if z < 0:
        return TWO - tail
    return tail
