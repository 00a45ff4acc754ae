"""The AVX-512 BF16 dot-product instruction, reached from Numba through LLVM: the bf16 GEMM's
building blocks (npdiff/kernels/matmul_dpbf16.py), which Numba cannot express in Python code.

  vdpbf16ps acc, a, b   (LLVM: <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> acc,
                        <32 x bfloat> a, <32 x bfloat> b)): in each of the 16 float32 lanes i,
                            acc[i] = (acc[i] + a[2i+1] * b[2i+1]) + a[2i] * b[2i]
                        the two bf16 products of a PAIR of k values added into one float32 lane.
                        A product of two bf16 (8-bit significands) is exact in float32; each add
                        rounds to nearest even. Inputs and outputs below float32's normal range are
                        taken as zero (the instruction ignores MXCSR). Twice the multiplies of one
                        float32 FMA (vfmadd231ps) per instruction.

So the operands are laid out in pairs of k: a 32-bit word holds the bf16 of k = 2p (low half) and of
k = 2p+1 (high half). The GEMM packs B (16 columns per vector, one word per column) and broadcasts
one word of A (one row's pair) to all 16 lanes.

  accumulator_row()                 a pointer to NR = 64 float32 on the stack, zeroed: one row of
                                    the C tile (4 zmm vectors once LLVM promotes it to registers)
  dot_pairs_row(acc, b_panel, pair, a_word)
                                    acc[0:64] += the 64 columns' dot products of b_panel[pair, 0:64]
                                    (64 words: pair `pair` of k for 64 columns) with a_word (one
                                    row's pair, broadcast): 4 vdpbf16ps, one per 16 columns

Only callable from @njit code, and only compiled on a CPU with AVX512_BF16 (bf16_rounding.bf16_kernel()
checks cpu_has_avx512_bf16() first: LLVM cannot select the instruction for a CPU without it).
llvmlite 0.50 has no bfloat type: BFloatType below is LLVM's `bfloat` spelled out.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16  # float32 lanes of one zmm vector
NR = 64  # columns of the C tile: 4 vectors
ROW_VECTORS = NR // LANES


class BFloatType(ir.types._BaseFloatType):
    """LLVM's 16-bit brain float (`bfloat`), which llvmlite does not name."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"


BFloatType._create_instance()

FLOAT32X16 = ir.VectorType(ir.FloatType(), LANES)  # one zmm of float32
INT32X16 = ir.VectorType(ir.IntType(32), LANES)  # one zmm of 32-bit words (pairs of bf16)
BF16X32 = ir.VectorType(BFloatType(), 2 * LANES)  # the same zmm seen as 32 bf16
DPBF16PS = "llvm.x86.avx512bf16.dpbf16ps.512"


def _dpbf16ps(builder, acc, a_pairs, b_pairs):
    """acc + pairwise dot products of a_pairs and b_pairs (see the header), one instruction."""
    signature = ir.FunctionType(FLOAT32X16, [FLOAT32X16, BF16X32, BF16X32])
    function = cgutils.get_or_insert_function(builder.module, signature, DPBF16PS)
    return builder.call(function, [acc, a_pairs, b_pairs])


@intrinsic
def accumulator_row(typingctx):
    """A pointer to NR float32 on the stack, zeroed (alloca of constant size: register-promotable)."""

    def codegen(context, builder, signature, args):
        row = cgutils.alloca_once(builder, FLOAT32X16, size=context.get_constant(types.intp, ROW_VECTORS))
        for v in range(ROW_VECTORS):
            builder.store(ir.Constant(FLOAT32X16, None), builder.gep(row, [ir.IntType(64)(v)]), align=4)
        return builder.bitcast(row, ir.FloatType().as_pointer())

    return types.CPointer(types.float32)(), codegen


@intrinsic
def dot_pairs_row(typingctx, acc, b_panel, pair, a_word):
    """acc[0:NR] += dot of b_panel[pair, 0:NR] (uint32 pairs, C-contiguous [pairs, NR]) with a_word."""
    if not (acc == types.CPointer(types.float32) and isinstance(b_panel, types.Array)
            and b_panel.dtype == types.uint32 and b_panel.ndim == 2 and b_panel.layout == "C"
            and isinstance(pair, types.Integer) and a_word == types.uint32):
        return None
    signature = types.void(acc, b_panel, pair, a_word)

    def codegen(context, builder, sig, args):
        acc_pointer, panel, pair_index, word = args
        data = context.make_array(sig.args[1])(context, builder, panel).data  # uint32* of [pairs, NR]
        pair_index = builder.sext(pair_index, ir.IntType(64)) if pair_index.type.width < 64 else pair_index
        first_word = builder.mul(pair_index, ir.IntType(64)(NR))
        b_words = builder.bitcast(builder.gep(data, [first_word]), INT32X16.as_pointer())
        # 1. the row's pair of A in all 16 lanes: insert into lane 0, then shuffle lane 0 everywhere
        lane0 = builder.insert_element(ir.Constant(INT32X16, None), word, ir.IntType(32)(0))
        a_pairs = builder.shuffle_vector(lane0, ir.Constant(INT32X16, None), ir.Constant(INT32X16, None))
        a_pairs = builder.bitcast(a_pairs, BF16X32)
        acc_vectors = builder.bitcast(acc_pointer, FLOAT32X16.as_pointer())
        for v in range(ROW_VECTORS):
            # 2. 16 columns: their pairs of B (one vector), the accumulator, one vdpbf16ps
            index = [ir.IntType(64)(v)]
            b_pairs = builder.bitcast(builder.load(builder.gep(b_words, index), align=4), BF16X32)
            acc_slot = builder.gep(acc_vectors, index)
            total = _dpbf16ps(builder, builder.load(acc_slot, align=4), a_pairs, b_pairs)
            builder.store(total, acc_slot, align=4)
        return context.get_dummy_value()

    return signature, codegen
