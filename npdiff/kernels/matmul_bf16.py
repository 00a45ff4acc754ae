"""The bfloat16 GEMM: linear layers (and, through conv_bf16.py, convolutions) with both operands
rounded to bfloat16 and the products summed in float32, on AVX-512 BF16's vdpbf16ps.

What is computed: x and the weight are rounded to bf16 (round to nearest even, as torch's
`.to(torch.bfloat16)`), and C = x_bf16 @ W_bf16^T is summed in float32; the bias is added in float32.
Every product of two bf16 is exact in float32, so the result differs from the float32 GEMM of the
rounded operands (the reference) only in the order of the float32 additions.

Versions:
  1. linear_bf16_ref       NumPy: float32_to_bf16 of both operands, widened back to float32, then
                           np.matmul. Also what runs where the CPU has no AVX512_BF16 (or with
                           NPDIFF_NO_BF16=1): the packed weight is then the rounded float32 weight.
  2. the dpbf16 GEMM       a Numba micro-kernel on vdpbf16ps (bf16_intrinsics.py), register-blocked
                           like the float32 lesson kernel (matmul_numba.py), laid out below.
  3. the AMX GEMM          the same packed weight read by AMX tiles (matmul_amx.py): 16 x 16 x 32
                           products per instruction. Runs where bf16_kernel() says "amx" (an AMX
                           CPU whose OS grants the tiles); version 2 where it says "dpbf16".
  linear_bf16, geglu_bf16, linear_activation_bf16: the GEMM, then linear.py's own passes (bias +
                           activation in place; geglu's gate) on the float32 result.

How the GEMM is laid out (beside matmul_numba.py's step 6; what differs is the pairs of k):

    pack B once, at load:  b_packed [N/NR, K/2, NR] uint32: column panel, then one 32-bit word
                           per (pair of k, column): bf16(B[2p, j]) in the low half, bf16(B[2p+1, j])
                           in the high half, 2 bytes a weight. For linear, B = W^T: the pair is two
                           neighbours of a row of W [out, in], read once at load. A depth block is
                           a range of KC/2 pairs of each panel (one contiguous run of KC/2 * 256 B).
    blocks of ROW_BLOCK rows of C on the block pool (block_pool.run_blocks, one per core):
        for each depth block of KC steps of k:
            pack A's [rows, KC] block as a_packed [rows/MR, KC/2, MR] uint32, rounding x to bf16
            for each group of NC columns:
                for each MR-row panel of A:             A micro-panel MR*KC*2 = 6 KiB: L1
                    for each NR-column panel of B:      B micro-panel KC*NR*2 = 64 KiB, from L2
                        micro-kernel: C[MR, NR] (+)= A micro-panel^T @ B micro-panel

  MR x NR = 6 x 64   24 zmm accumulators; each pair of k broadcasts 6 words of A and loads 4
                     vectors of B for 24 vdpbf16ps (48 products each of float32's 24 FMAs).
  KC = 512           A micro-panel 6 KiB as in the float32 kernel (bf16 is half the bytes).
  NC = 512           the B block one thread sweeps, KC*NC*2 = 512 KiB.
The C tile stays in registers as in matmul_numba.py: accumulator_row() is a stack row LLVM
promotes to 4 zmm; `micro_kernel_asm()` shows the k loop (tests/kernels/test_matmul_bf16.py checks
it holds 24 vdpbf16ps on zmm registers and no stack access).
"""

import numpy as np
from numba import carray

from npdiff.errors import NpdiffError
from npdiff.intrinsics import bits_float32
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels.activations import ACTIVATION_CODES, check_approximate
from npdiff.kernels.bf16_intrinsics import NR, accumulator_row, dot_pairs_row
from npdiff.kernels.bf16_rounding import (  # also what callers import from here (interface of issue 26)
    PackedBf16,
    bf16_bits,
    bf16_kernel,
    bf16_to_float32,
    cpu_has_avx512_bf16,
    float32_to_bf16,
    pair_word,
    round_rows,
    rounded_to_bf16,
)

__all__ = ["PackedBf16Weight", "bf16_kernel", "bf16_to_float32", "cpu_has_avx512_bf16", "float32_to_bf16",
           "geglu_bf16", "linear_activation_bf16", "linear_bf16", "linear_bf16_ref", "pack_linear_bf16"]
from npdiff.kernels.block_pool import run_blocks, worker_count
from npdiff.kernels.linear import (  # linear.py's element-wise passes after the GEMM
    LINEAR_ACTIVATIONS,
    _bias_activation_numba,
    _bias_activation_row,
    _geglu_gate_numba,
    _geglu_gate_serial,
)
from npdiff.kernels.matmul_amx import (
    BLOCK,
    START_FROM_INIT,
    START_ZERO,
    TILE,
    TILE_CONFIG,
    amx_gemm_block,
)
from npdiff.kernels.matmul_numba import (
    _write_row,  # the float32 kernel's: one row of a tile into C
)
from npdiff.kernels.scratch import scratch
from npdiff.kernels.validate import require_float32, shape_text

MR = 6  # rows of the register tile of C
KC = 512  # steps of k per depth block (KC/2 pairs) of the vdpbf16ps kernel
NC = 512  # columns of B one thread sweeps while its A block sits in L2
ROW_BLOCK = 120  # most rows of C per block-pool task (a multiple of MR)
AMX_ROW_BLOCK = 256  # most rows per task on AMX (a multiple of 32): its rounded A block stays in L2
NC_PANELS = NC // NR
PAIRS = KC // 2


# ---------------------------------------------------------------------------------------------
# The packed weight
# ---------------------------------------------------------------------------------------------
class PackedBf16Weight(PackedBf16):
    """A linear weight [out, in] rounded to bf16 once, kept in the layout its GEMM reads.

    layout "pairs": `data` is b_packed [out/NR, in/2, NR] uint32 (see the header), which both
    the vdpbf16ps micro-kernel and the AMX tiles read.
    layout "float32": `data` is the rounded weight as float32 [out, in] (CPUs without AVX512_BF16).
    """

    def to_float32(self):
        """The bf16-rounded weight [out, in] as float32 (for references and LoRA)."""
        if self.layout == "float32":
            return self.data
        return _unpack_b(self.data, *self.shape)


def _weight_bits(weight, what):
    """weight as uint16 bf16 bits: float32 is rounded, uint16 is taken as bf16 bits already."""
    weight = np.asarray(weight)
    if weight.dtype == np.uint16:
        return weight
    if weight.dtype != np.float32:
        raise NpdiffError(f"{what}: weight must be float32 or uint16 (bfloat16 bits), got {weight.dtype} "
                          f"with shape {shape_text(weight.shape)}")
    return float32_to_bf16(weight)


def pack_linear_bf16(weight):
    """weight [out, in] (float32, or uint16 bf16 bits from a file) -> PackedBf16Weight."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise NpdiffError(f"pack_linear_bf16: weight must be 2-D [out_features, in_features], "
                          f"got shape {shape_text(weight.shape)}")
    bits = _weight_bits(weight, "pack_linear_bf16")  # [out, in] uint16
    if bf16_kernel() == "float32":
        return PackedBf16Weight(bf16_to_float32(bits), weight.shape, "float32")
    return PackedBf16Weight(_pack_b(np.ascontiguousarray(bits)), weight.shape, "pairs")


@njit(**PARALLEL)
def _pack_b(bits):
    """W bits [N, K] uint16 -> b_packed [ceil(N/NR), pairs, NR] uint32 (B = W^T), pairs = K/2
    rounded up to a multiple of 16 (whole AMX tiles; K = 320, 640, 768, 1280: no padding at all).

    Word (panel, p, j) holds W[col, k] | W[col, k+1] << 16, col = panel*NR + j, k = 2p. Columns
    past N, the missing partner of an odd K and the pairs past K are zero. A depth block of the
    GEMM is a range of pairs of every panel. prange over column panels (each its own slices)."""
    cols, depth = bits.shape
    panels = (cols + NR - 1) // NR
    pairs = (depth + 2 * TILE - 1) // (2 * TILE) * TILE
    b_packed = np.zeros((panels, pairs, NR), dtype=np.uint32)  # [N/NR, K/2, NR]
    for panel in prange(panels):
        for j in range(min(NR, cols - panel * NR)):
            row = bits[panel * NR + j]  # [K], the pairs are neighbours
            for k in range(0, depth, 2):
                high = np.uint32(row[k + 1]) if k + 1 < depth else np.uint32(0)
                word = np.uint32(row[k]) | (high << np.uint32(16))
                b_packed[panel, k // 2, j] = word
    return b_packed


@njit(**PARALLEL)
def _unpack_b_numba(b_packed, cols, depth, out):
    for panel in prange(b_packed.shape[0]):
        for j in range(min(NR, cols - panel * NR)):
            for k in range(depth):
                word = b_packed[panel, k // 2, j]
                half = (word >> np.uint32(16)) if k % 2 else (word & np.uint32(0xFFFF))
                out[panel * NR + j, k] = bits_float32(np.uint32(half << np.uint32(16)))


def _unpack_b(b_packed, cols, depth):
    """b_packed -> the rounded weight [N, K] float32 (the inverse of _pack_b)."""
    out = np.empty((cols, depth), np.float32)  # [out, in]
    _unpack_b_numba(b_packed, cols, depth, out)
    return out


# ---------------------------------------------------------------------------------------------
# The micro-kernel and the blocked GEMM
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def _micro_kernel(pairs, a_panel, b_panel, b_pair0, c, row0, col0, valid_rows, valid_cols, accumulate):
    """C[row0:row0+MR, col0:col0+NR] (+)= the tile's dot products over `pairs` pairs of k.

    a_panel [pairs, MR] and b_panel[b_pair0:b_pair0+pairs] [pairs, NR] are packed uint32 words
    (pairs of bf16; b_pair0: the depth block's first pair in the packed weight). The tile
    of C is held in acc0..acc5 (24 zmm registers); each pair of k is 6 rows x 4 vdpbf16ps. Only the
    valid part of the tile is written; `accumulate` adds to C (later depth blocks) instead of storing.
    """
    acc0 = accumulator_row()
    acc1 = accumulator_row()
    acc2 = accumulator_row()
    acc3 = accumulator_row()
    acc4 = accumulator_row()
    acc5 = accumulator_row()
    for p in range(pairs):
        dot_pairs_row(acc0, b_panel, b_pair0 + p, a_panel[p, 0])  # row 0: += its pair of A . 64 columns' pairs
        dot_pairs_row(acc1, b_panel, b_pair0 + p, a_panel[p, 1])
        dot_pairs_row(acc2, b_panel, b_pair0 + p, a_panel[p, 2])
        dot_pairs_row(acc3, b_panel, b_pair0 + p, a_panel[p, 3])
        dot_pairs_row(acc4, b_panel, b_pair0 + p, a_panel[p, 4])
        dot_pairs_row(acc5, b_panel, b_pair0 + p, a_panel[p, 5])
    _write_row(c, row0, col0, valid_cols, carray(acc0, NR), accumulate)
    if valid_rows > 1:
        _write_row(c, row0 + 1, col0, valid_cols, carray(acc1, NR), accumulate)
    if valid_rows > 2:
        _write_row(c, row0 + 2, col0, valid_cols, carray(acc2, NR), accumulate)
    if valid_rows > 3:
        _write_row(c, row0 + 3, col0, valid_cols, carray(acc3, NR), accumulate)
    if valid_rows > 4:
        _write_row(c, row0 + 4, col0, valid_cols, carray(acc4, NR), accumulate)
    if valid_rows > 5:
        _write_row(c, row0 + 5, col0, valid_cols, carray(acc5, NR), accumulate)


@njit(**SERIAL)
def gemm_packed_block(a_packed, pairs, b_panels, b_pair0, c, row0, rows, col0, cols, accumulate):
    """C[row0:row0+rows, col0:col0+cols] (+)= A block @ B block, one depth block, on this thread.

    a_packed [>= rows/MR, >= pairs, MR] and b_panels [>= cols/NR, >= b_pair0 + pairs, NR] uint32
    words, the depth block being pairs b_pair0 .. b_pair0+pairs-1 of each panel; the column groups
    of NC keep one B block in L2 while every row panel of A passes over it."""
    row_panels = (rows + MR - 1) // MR
    col_panels = (cols + NR - 1) // NR
    for panel0 in range(0, col_panels, NC_PANELS):
        for row_panel in range(row_panels):
            tile_row = row_panel * MR
            a_panel = a_packed[row_panel]  # [pairs, MR] -> 6 KiB, stays in L1
            for col_panel in range(panel0, min(col_panels, panel0 + NC_PANELS)):
                tile_col = col_panel * NR
                _micro_kernel(pairs, a_panel, b_panels[col_panel], b_pair0, c, row0 + tile_row, col0 + tile_col,
                              min(MR, rows - tile_row), min(NR, cols - tile_col), accumulate)


@njit(**SERIAL)
def _pack_a_block(a, row0, rows, k0, depth, a_packed):
    """a[row0:row0+rows, k0:k0+depth] float32 -> a_packed[:, :ceil(depth/2), :] [rows/MR, pairs, MR]
    uint32 words, rounded to bf16. Rows past `rows` and the partner of an odd last k are zero."""
    pairs = (depth + 1) // 2
    for panel in range((rows + MR - 1) // MR):
        for r in range(MR):
            row = panel * MR + r
            if row >= rows:
                for p in range(pairs):
                    a_packed[panel, p, r] = 0
                continue
            x_row = a[row0 + row]  # [K], the pairs are neighbours
            for p in range(depth // 2):
                a_packed[panel, p, r] = pair_word(x_row[k0 + 2 * p], x_row[k0 + 2 * p + 1])
            if depth % 2:
                a_packed[panel, pairs - 1, r] = bf16_bits(x_row[k0 + depth - 1])


@njit(**SERIAL)
def _linear_row_block(a, b_packed, c, row0, rows, a_packed):
    """Rows row0 .. row0+rows-1 of C = a @ B (B packed by _pack_b), on the calling thread."""
    depth = a.shape[1]
    cols = c.shape[1]
    for k0 in range(0, depth, KC):
        block_depth = min(KC, depth - k0)
        _pack_a_block(a, row0, rows, k0, block_depth, a_packed)
        gemm_packed_block(a_packed, (block_depth + 1) // 2, b_packed, k0 // 2, c, row0, rows, 0, cols,
                          k0 > 0)


def row_blocks(rows, workers, most=ROW_BLOCK, multiple=MR):
    """[(row0, rows), ...]: blocks of at most `most` rows (multiples of `multiple`), their number a
    multiple of `workers` where the rows allow, so every core gets the same work."""
    tasks = -(-rows // most)  # ceil
    tasks = -(-tasks // workers) * workers  # up to a multiple of workers
    rows_per_task = -(-rows // tasks)
    per_task = max(multiple, -(-rows_per_task // multiple) * multiple)  # up to a multiple of `multiple`
    return [(row0, min(per_task, rows - row0)) for row0 in range(0, rows, per_task)]


def gemm_dpbf16(a, b_packed, cols):
    """a [M, K] float32 (C-contiguous) @ B (packed by _pack_b) -> C [M, cols] on vdpbf16ps."""
    rows = a.shape[0]
    c = np.empty((rows, cols), np.float32)  # [M, N], stored by the first depth block

    def run_block(block):
        row0, block_rows = block
        a_packed = scratch("bf16 a block", ((block_rows + MR - 1) // MR, PAIRS, MR)).view(np.uint32)
        _linear_row_block(a, b_packed, c, row0, block_rows, a_packed)  # [rows/MR, KC/2, MR] words

    run_blocks(run_block, row_blocks(rows, worker_count()))
    return c


def gemm_amx(a, b_packed, cols, bias=None, finish_block=None):
    """a [M, K] float32 (C-contiguous) @ B (packed by _pack_b) (+ bias) -> C [M, cols] on AMX tiles.

    Per task: its rows of a rounded to bf16 rows (zero-padded to 32 rows and 32 k), then every
    32 x 32 block of C over all of K in the tiles, each block starting from the bias (loaded into
    the tiles: no pass over C to add it). finish_block(row0, c_rows), if given, runs on each task's
    rows of C right after (while they are in cache): linear_activation's and geglu's element-wise
    pass. Few rows (CLIP's 77 tokens): the columns are split too, so every core has work, and
    finish_block runs once at the end on all rows."""
    rows, depth = a.shape
    k_padded = -(-depth // BLOCK) * BLOCK
    panel_stride = b_packed.shape[1] * NR  # words between column panels of B
    c = np.empty((rows, cols), np.float32)  # [M, N]
    workers = worker_count()
    spans = row_blocks(rows, workers, AMX_ROW_BLOCK, BLOCK)
    column_parts = workers if len(spans) < 2 * workers else 1
    part = -(-cols // (column_parts * NR)) * NR  # columns per part, whole panels
    if bias is None:
        start, init = START_ZERO, np.zeros((1, 1), np.float32)
    else:
        start, init = START_FROM_INIT, np.zeros((1, b_packed.shape[0] * NR), np.float32)  # [1, N padded]
        init[0, :cols] = bias  # each C tile's 16 rows are loaded from here with row stride 0

    def run_block(block):
        (row0, block_rows), col0 = block
        a_bits = scratch("amx a rows", (-(-block_rows // BLOCK) * BLOCK, k_padded // 2)).view(np.uint16)
        round_rows(a, row0, block_rows, a_bits)  # [rows32, K32] bf16 bits
        edge = scratch("amx edge", (BLOCK, BLOCK))
        amx_gemm_block(TILE_CONFIG, a_bits, 0, k_padded // BLOCK, b_packed, panel_stride, col0,
                       c, row0, block_rows, col0, min(part, cols - col0), start, init, (0, 1), edge)
        if finish_block is not None and column_parts == 1:
            finish_block(row0, c[row0:row0 + block_rows])

    run_blocks(run_block, [(span, col0) for span in spans for col0 in range(0, cols, part)])
    if finish_block is not None and column_parts > 1:
        finish_block(0, c)  # few rows: one serial pass on the calling thread
    return c


# ---------------------------------------------------------------------------------------------
# linear, linear_activation, geglu
# ---------------------------------------------------------------------------------------------
def linear_bf16_ref(x, weight, bias=None):
    """Both operands rounded to bf16, then the float32 GEMM: x [..., in], weight [out, in] float32."""
    out = np.matmul(rounded_to_bf16(x), rounded_to_bf16(weight).T)  # [..., in] @ [in, out] -> [..., out]
    if bias is not None:
        out = out + bias  # [..., out]
    return out


def _check_linear_bf16(kernel, x, packed, bias):
    if not isinstance(packed, PackedBf16Weight):
        raise NpdiffError(f"{kernel}: the weight must be a PackedBf16Weight from pack_linear_bf16, "
                          f"got {type(packed).__name__}")
    require_float32(kernel, "x", x)
    if x.ndim < 1 or x.shape[-1] != packed.shape[1]:
        raise NpdiffError(f"{kernel}: x must have shape [..., in_features={packed.shape[1]}] to match "
                          f"weight {shape_text(packed.shape)}, got {shape_text(x.shape)}")
    if bias is not None:
        require_float32(kernel, "bias", bias)
        if bias.shape != (packed.shape[0],):
            raise NpdiffError(f"{kernel}: bias must have shape [{packed.shape[0]}], got {shape_text(bias.shape)}")


def _gemm_rows(x, packed, bias=None, finish_block=None, finish_all=None):
    """x [..., in] -> [R, out] float32 = x @ W^T + bias, on the kernel bf16_kernel() names (the
    rounded float32 GEMM for a "float32" weight). An element-wise pass after the GEMM runs as
    finish_block(row0, rows of C) on each AMX task's rows while they are in cache (serial: it runs
    on a pool worker), or as finish_all(C) once after the other kernels (parallel)."""
    rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [R, in]
    cols = packed.shape[0]
    kernel = bf16_kernel() if packed.layout == "pairs" else "float32"
    if kernel == "amx" and rows.shape[0] and rows.shape[1]:
        # [R, in] @ [in, out] + bias -> [R, out], finish_block on each task's rows
        return gemm_amx(np.ascontiguousarray(rows), packed.data, cols, bias, finish_block)
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        out = np.zeros((rows.shape[0], cols), np.float32)  # [R, out]: an empty sum is 0
    elif kernel == "dpbf16":
        out = gemm_dpbf16(np.ascontiguousarray(rows), packed.data, cols)  # [R, in] @ [in, out] -> [R, out]
    else:
        out = np.matmul(rounded_to_bf16(rows), packed.to_float32().T)  # [R, in] @ [in, out] -> [R, out]
    if bias is not None:
        out += bias  # [R, out], in place
    if finish_all is not None and out.size:
        finish_all(out)
    return out


def linear_bf16(x, packed, bias=None):
    """torch's linear in bf16: x [..., in] float32 and the packed weight rounded to bf16, products
    summed in float32, bias added in float32 -> float32 [..., out]."""
    _check_linear_bf16("linear_bf16", x, packed, bias)
    out = _gemm_rows(x, packed, bias)  # [R, out]
    return out.reshape(x.shape[:-1] + (packed.shape[0],))  # [R, out] -> [..., out]


@njit(**SERIAL)
def _activation_rows(hidden, which):
    """hidden [rows, D] = activation(hidden), in place, on the calling thread (linear.py's row pass)."""
    for r in range(hidden.shape[0]):
        _bias_activation_row(hidden[r], hidden[r], False, which)


def linear_activation_bf16(x, packed, bias=None, activation="quick_gelu"):
    """activation(linear_bf16(x, packed, bias)): linear.py's activation pass on each block of rows
    of the GEMM's result while it is in cache (AMX), or once after it."""
    _check_linear_bf16("linear_activation_bf16", x, packed, bias)
    if activation not in LINEAR_ACTIVATIONS:
        raise NpdiffError(f"linear_activation_bf16: activation must be one of "
                          f"{tuple(LINEAR_ACTIVATIONS)}, got {activation!r}")
    which = LINEAR_ACTIVATIONS[activation][1]

    def finish_block(row0, rows):
        _activation_rows(rows, which)  # [block, out], in place

    def finish_all(hidden):
        _bias_activation_numba(hidden, hidden[0], False, which)  # [R, out], in place, parallel over rows

    hidden = _gemm_rows(x, packed, bias, finish_block, finish_all)  # [R, out]
    return hidden.reshape(x.shape[:-1] + (packed.shape[0],))  # [R, out] -> [..., out]


def geglu_bf16(x, packed, bias=None, approximate="none"):
    """diffusers' GEGLU in bf16: h = linear_bf16(x, packed, bias) [..., 2D]; h[..., :D] * gelu(h[..., D:]),
    the gate computed on each block of rows of h while it is in cache (AMX), or once after the GEMM."""
    _check_linear_bf16("geglu_bf16", x, packed, bias)
    check_approximate("geglu_bf16", approximate)
    if packed.shape[0] % 2:
        raise NpdiffError(f"geglu_bf16: weight must have an even number of rows [2*D, in], "
                          f"got {shape_text(packed.shape)}")
    which = ACTIVATION_CODES[approximate]
    out = np.empty((x.size // x.shape[-1], packed.shape[0] // 2), np.float32)  # [R, D]

    def finish_block(row0, hidden_rows):
        _geglu_gate_serial(hidden_rows, which, out[row0:row0 + hidden_rows.shape[0]])  # [block, 2D] -> [block, D]

    def finish_all(hidden):
        _geglu_gate_numba(hidden, which, out)  # [R, 2D] -> [R, D], parallel over rows

    _gemm_rows(x, packed, bias, finish_block, finish_all)  # [R, 2D]
    return out.reshape(x.shape[:-1] + (out.shape[1],))  # [R, D] -> [..., D]


def micro_kernel_asm():
    """The dpbf16 micro-kernel's machine code (x86 assembly), compiled privately (uncached) with
    the same flags: on an AVX512_BF16 CPU the k loop is 24 `vdpbf16ps` on zmm registers."""
    from numba import types  # local: only this inspection needs Numba's type objects

    compile_flags = {key: value for key, value in SERIAL.items() if key != "cache"}
    fresh = njit(**compile_flags)(_micro_kernel.py_func)
    panel = types.Array(types.uint32, 2, "C")
    c = types.Array(types.float32, 2, "C")
    fresh.compile((types.intp, panel, panel, types.intp, c, types.intp, types.intp, types.intp, types.intp,
                   types.boolean))
    return fresh.inspect_asm(fresh.signatures[0])
