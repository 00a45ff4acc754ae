"""Exact float32 building blocks that Numba does not offer: fused multiply-add, bit casts, square root.

Used by the noise generators (npdiff/rng: bit-exact copies of torch's C and SIMD code) and by the
kernels' vectorisable exp (npdiff/kernels/vecmath.py): one file below both.

Bit-exact copies of C/SIMD code need two things plain Numba lacks:

  fma32(a, b, c)      a*b + c with ONE rounding (IEEE fusedMultiplyAdd), float32 in and out.
                      Emitted as LLVM's `llvm.fma.f32`: a vfmadd instruction on CPUs with FMA, and
                      glibc's exact `fmaf` elsewhere, so the result is the same on every machine.
                      (float64 tricks such as `float32(float64(a)*b + c)` round twice and are NOT
                      exact; Numba never fuses `a*b + c` on its own because the kernels here do not
                      pass fastmath's 'contract' flag.)
  float32_bits(x)     the IEEE-754 bits of a float32 as uint32 (C's `*(uint32_t*)&x`).
  bits_float32(b)     the float32 whose bits are the uint32 or int32 b (C's `*(float*)&b`).
  sqrt32(x)           the correctly rounded float32 square root, as LLVM's `llvm.sqrt.f32`.

All four are Numba intrinsics: callable only from @njit code, inlined, and vectorisable by LLVM.
Only float32 arguments type-check: passing a float64 is a typing error, which keeps a silent
promotion to float64 (Numba's default for `float32 op python-float`) from creeping into a kernel.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def fma32(typingctx, a, b, c):
    """a*b + c rounded once to float32 (all three arguments must be float32)."""
    if not (a == types.float32 and b == types.float32 and c == types.float32):
        return None
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        x, y, z = args
        return builder.fma(x, y, z)

    return signature, codegen


@intrinsic
def float32_bits(typingctx, x):
    """The 32 bits of a float32, as uint32."""
    if x != types.float32:
        return None
    signature = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return signature, codegen


@intrinsic
def bits_float32(typingctx, bits):
    """The float32 whose bits are `bits` (uint32 or int32: the same 32 bits either way)."""
    if bits not in (types.uint32, types.int32):
        return None
    signature = types.float32(bits)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


@intrinsic
def sqrt32(typingctx, x):
    """Correctly rounded float32 square root as `llvm.sqrt.f32`. (math.sqrt compiles to a call to
    libm's sqrtf, which may set errno, and that call keeps LLVM from vectorising the loop.)"""
    if x != types.float32:
        return None
    signature = types.float32(types.float32)

    def codegen(context, builder, sig, args):
        function = builder.module.declare_intrinsic("llvm.sqrt", [ir.FloatType()])
        return builder.call(function, args)

    return signature, codegen
