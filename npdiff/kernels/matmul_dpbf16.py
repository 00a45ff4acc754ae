"""The vdpbf16ps GEMM (version 2 of matmul_bf16.py) and the packed weight layout both bf16 GEMMs
read: a Numba micro-kernel on AVX-512 BF16, register-blocked like the float32 lesson kernel
(matmul_numba.py) and readable beside it.

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

from npdiff.intrinsics import bits_float32
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels.bf16_intrinsics import NR, accumulator_row, dot_pairs_row
from npdiff.kernels.bf16_rounding import bf16_bits, pair_word
from npdiff.kernels.block_pool import run_blocks, worker_count
from npdiff.kernels.matmul_amx import TILE
from npdiff.kernels.matmul_numba import (
    _write_row,  # the float32 kernel's: one row of a tile into C
)
from npdiff.kernels.scratch import scratch

MR = 6  # rows of the register tile of C
KC = 512  # steps of k per depth block (KC/2 pairs) of the vdpbf16ps kernel
NC = 512  # columns of B one thread sweeps while its A block sits in L2
ROW_BLOCK = 120  # most rows of C per block-pool task (a multiple of MR)
NC_PANELS = NC // NR
PAIRS = KC // 2


# ---------------------------------------------------------------------------------------------
# The packed weight (B): pairs of k in 32-bit words, 64 columns a panel
# ---------------------------------------------------------------------------------------------
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
