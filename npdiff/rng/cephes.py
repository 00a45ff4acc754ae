"""float32 log and sincos exactly as PyTorch's AVX2 kernel computes them (Cephes polynomials).

torch.randn on x86 CPUs with AVX2 (and AVX-512) turns uniforms into normals with `log256_ps` and
`sincos256_ps` from ATen's `avx_mathfun.h` (Julien Pommier's SSE/AVX port of the Cephes float32
functions), 8 lanes at a time. These are the same functions for ONE lane, written so that every
operation rounds exactly as the compiled torch binary does:

  * all arithmetic is float32 (constants are np.float32: `float32 * 0.5` in Numba would be float64);
  * the compiler that built torch fused some multiply-adds into FMAs (one rounding instead of two).
    Each `fma32(a, b, c)` below stands where torch's binary has an FMA; every other `a*b + c` is two
    roundings, as in the source. Measured on 1M values, dropping the FMAs changes ~1% of the outputs.
  * the branches of the SIMD code are masks; here they are `if`s on the same conditions (LLVM turns
    them back into selects when it vectorises the caller's loop).

Differences from the SIMD source, none of which changes a value torch.randn can produce:
  * log: the NaN mask for x <= 0 is left out: the callers pass u in (0, 1].
  * sincos: the SIMD code selects between the two polynomials by adding a masked +0.0; a selected
    -0.0 may come out as +0.0 there and as -0.0 here. randn's final `n * std + mean` (mean = +0.0)
    turns every zero into +0.0, so the outputs agree bit for bit.

Called from the Numba kernels in npdiff/rng/torch_normal.py (njit functions, inlined by LLVM).
"""

import numpy as np

from npdiff.intrinsics import bits_float32, float32_bits, fma32
from npdiff.jit import SERIAL, njit

f32 = np.float32

# ---- log256_ps constants ----------------------------------------------------------------------
ONE = f32(1.0)
HALF = f32(0.5)
MIN_NORM_POS = f32(1.17549435e-38)  # bits 0x00800000: smallest normal float32
SQRT_HALF = f32(0.707106781186547524)
LOG_P = (f32(7.0376836292e-2), f32(-1.1514610310e-1), f32(1.1676998740e-1), f32(-1.2420140846e-1),
         f32(1.4249322787e-1), f32(-1.6668057665e-1), f32(2.0000714765e-1), f32(-2.4999993993e-1),
         f32(3.3333331174e-1))
LOG_P0, LOG_P1, LOG_P2, LOG_P3, LOG_P4, LOG_P5, LOG_P6, LOG_P7, LOG_P8 = LOG_P
LOG_Q1 = f32(-2.12194440e-4)
LOG_Q2 = f32(0.693359375)

# ---- sincos256_ps constants -------------------------------------------------------------------
FOUR_OVER_PI = f32(1.27323954473516)
MINUS_DP1 = f32(-0.78515625)  # pi/4 = DP1 + DP2 + DP3, split for exact range reduction
MINUS_DP2 = f32(-2.4187564849853515625e-4)
MINUS_DP3 = f32(-3.77489497744594108e-8)
SIN_P0, SIN_P1, SIN_P2 = f32(-1.9515295891e-4), f32(8.3321608736e-3), f32(-1.6666654611e-1)
COS_P0, COS_P1, COS_P2 = f32(2.443315711809948e-5), f32(-1.388731625493765e-3), f32(4.166664568298827e-2)

SIGN_BIT = 0x80000000
EXPONENT_BITS = 0x7F800000
HALF_BITS = 0x3F000000  # the bits of 0.5f


@njit(**SERIAL)
def log_ps(x):
    """Natural log of a float32 x > 0, as torch's log256_ps computes it (one lane)."""
    # 1. Split x = m * 2^e with m in [0.5, 1): exponent from the bits, mantissa with exponent of 0.5.
    x = max(x, MIN_NORM_POS)
    bits = np.int64(float32_bits(x))
    exponent = f32((bits >> 23) - 127) + ONE
    m = bits_float32(np.uint32((bits & ~EXPONENT_BITS) | HALF_BITS))
    # 2. Cephes' fix-up: if m < sqrt(1/2) use 2m - 1 and e - 1, else m - 1  (so |m - 1| is small).
    if m < SQRT_HALF:
        exponent = exponent - ONE
        m = (m - ONE) + m
    else:
        m = m - ONE
    z = m * m
    # 3. Polynomial in m (Horner; torch's binary fuses each step into an FMA).
    y = fma32(LOG_P0, m, LOG_P1)
    y = fma32(y, m, LOG_P2)
    y = fma32(y, m, LOG_P3)
    y = fma32(y, m, LOG_P4)
    y = fma32(y, m, LOG_P5)
    y = fma32(y, m, LOG_P6)
    y = fma32(y, m, LOG_P7)
    y = fma32(y, m, LOG_P8)
    y = y * m
    # 4. log(x) = m - m^2/2 + m^3 * P(m) + e*log(2), with log(2) = q2 - q1 split in two parts.
    y = fma32(y, z, exponent * LOG_Q1)
    y = y - z * HALF
    m = m + y
    return fma32(exponent, LOG_Q2, m)


@njit(**SERIAL)
def sincos_ps(x):
    """(sin x, cos x) of a float32, as torch's sincos256_ps computes them (one lane)."""
    # 1. Work on |x|; remember the sign for the sine.
    sign_sin = np.int64(float32_bits(x)) & SIGN_BIT
    x = abs(x)
    # 2. Octant: j = trunc(x * 4/pi) rounded up to even; y = j as float.
    octant = np.int64(x * FOUR_OVER_PI)
    octant = (octant + 1) & ~1
    y = f32(octant)
    # 3. Which polynomial gives sin (octant bit 1) and the sign flips (octant bit 2).
    swap_sign_sin = (octant & 4) << 29
    sine_poly_is_sin = (octant & 2) == 0
    sign_cos = (~(octant - 2) & 4) << 29
    sign_sin = sign_sin ^ swap_sign_sin
    # 4. Reduce: x = x - y*pi/4 in three exact-ish steps (fused in torch's binary).
    x = fma32(y, MINUS_DP1, x)
    x = fma32(y, MINUS_DP2, x)
    x = fma32(y, MINUS_DP3, x)
    z = x * x
    # 5. cos polynomial on [-pi/4, pi/4]: 1 - z/2 + z^2 * C(z).
    yc = fma32(COS_P0, z, COS_P1)
    yc = fma32(yc, z, COS_P2)
    yc = yc * z
    yc = fma32(yc, z, -(z * HALF))
    yc = yc + ONE
    # 6. sin polynomial on [-pi/4, pi/4]: x + x * z * S(z).
    ys = fma32(SIN_P0, z, SIN_P1)
    ys = fma32(ys, z, SIN_P2)
    ys = ys * z
    ys = fma32(ys, x, x)
    # 7. Pick the polynomials for this octant and apply the signs.
    if sine_poly_is_sin:
        sin_value, cos_value = ys, yc
    else:
        sin_value, cos_value = yc, ys
    sin_value = bits_float32(np.uint32(np.int64(float32_bits(sin_value)) ^ sign_sin))
    cos_value = bits_float32(np.uint32(np.int64(float32_bits(cos_value)) ^ sign_cos))
    return sin_value, cos_value
