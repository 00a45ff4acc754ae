"""The bf16 rounding of attention version 6's softmax pass (amx.py), as one LLVM
instruction: float32 -> bfloat, which LLVM turns into AVX512_BF16's vcvtneps2bf16 (every AMX CPU has it).
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from npdiff.kernels.bf16_intrinsics import BFloatType


@intrinsic
def bf16_of(typingctx, x):
    """float32 -> its bf16 bits (uint32, low half): LLVM's fptrunc to bfloat, which LLVM vectorises to
    vcvtneps2bf16 (AVX512_BF16, on every AMX CPU): round to nearest even, NaN kept quiet, the same bits
    as bf16_rounding.bf16_bits (and torch) for every float32 except denormals, read as zero; two
    instructions per 32 values (vcvtneps2bf16 and a vpermi2w that interleaves two rows' halves)
    where bf16_bits' integer rounding took ~25, 15% of softmax_keys_to_pairs."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        half = builder.bitcast(builder.fptrunc(args[0], BFloatType()), ir.IntType(16))
        return builder.zext(half, ir.IntType(32))

    return types.uint32(types.float32), codegen
