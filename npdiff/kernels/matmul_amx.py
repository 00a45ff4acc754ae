"""The bf16 GEMM on AMX tiles (version 3 of matmul_bf16.py): the same products as the vdpbf16ps
micro-kernel (pairs of bf16, float32 sums), 8192 multiply-adds per instruction instead of 32.

Why a third version: on the Xeon this was written on, vdpbf16ps issues at half the rate of the
float32 FMA, so the vdpbf16ps kernel does fewer GFLOP/s than OpenBLAS's sgemm (benchmarks/RESULTS.md,
"bfloat16 kernels"); the AMX tile unit does many times more. Where the CPU has AMX-BF16 and Linux
grants the tile state (amx_intrinsics.amx_usable), linear_bf16 and conv2d_bf16 run this one.

The operands, in the layouts the tiles read (tileloadd takes any row stride):
  A   bf16 bits, row-major [rows (padded to 32), K (padded to 32)] uint16: a tile is 16 rows x 32 k
      (64 bytes a row), the row stride is the padded K. linear: x rounded per row block;
      conv: the weight [C_out, C_in*kH*kW], rounded once at load.
  B   the pairs layout of matmul_dpbf16.py: one uint32 word per (pair of k, column), NR = 64 columns a
      panel: a tile is 16 pairs x 16 columns, rows NR*4 = 256 bytes apart. linear: the packed weight
      [N/NR, K/2, NR]; conv: one depth block of unfolded pixels [pixels/NR, pairs, NR].
  C   float32, row-major, any row stride (the output itself; edge tiles go through a 32 x 32 scratch).

The tile registers, tmm0..tmm7, all 16 rows x 64 bytes:
    tmm0 tmm1    the 32 x 32 block of C (2 x 2 tiles of 16 x 16 float32), kept in the tiles while
    tmm2 tmm3    every step of 32 k passes: C += A rows [32, 32 k] @ B [32 k, 32 columns]
    tmm4 tmm5    A: rows 0-15 and 16-31 of the block, 32 k
    tmm6 tmm7    B: columns 0-15 and 16-31, 16 pairs
  each step: 4 tile loads, 4 tdpbf16ps (each A tile meets both B tiles, each B tile both A tiles).
Loop order in amx_gemm_block: columns of C in blocks of 32 outermost, then the row blocks of 32 (the
B strip of one column block, K x 32 bf16, is reused by every row block from L1/L2; the caller's A
block, rows x K, stays in L2 across the columns), then k.
"""

import numpy as np

from npdiff.jit import SERIAL, njit
from npdiff.kernels.amx_intrinsics import (
    tile_config,
    tile_dpbf16ps,
    tile_load,
    tile_release,
    tile_store,
    tile_zero,
)

TILE = 16  # rows of a tile; float32 columns of a C tile; pairs of a B tile
BLOCK = 32  # rows and columns of the C block held in tmm0..tmm3; k per step


def tile_configuration():
    """ldtilecfg's 64 bytes: palette 1, all 8 tiles 16 rows x 64 bytes."""
    config = np.zeros(64, np.uint8)
    config[0] = 1  # palette 1
    config[16:32].view(np.uint16)[:] = 64  # bytes per row of tmm0..tmm7
    config[48:56] = TILE  # rows of tmm0..tmm7
    return config


TILE_CONFIG = tile_configuration()


@njit(**SERIAL)
def _load_edge_block(c, row0, col0, rows, cols, edge):
    """The valid rows x cols corner of a C block into edge [32, 32] (zeros around)."""
    edge[:] = 0.0
    for r in range(rows):
        for j in range(cols):
            edge[r, j] = c[row0 + r, col0 + j]


@njit(**SERIAL)
def _store_edge_block(edge, c, row0, col0, rows, cols):
    for r in range(rows):
        for j in range(cols):
            c[row0 + r, col0 + j] = edge[r, j]


START_ZERO, START_FROM_C, START_FROM_INIT = 0, 1, 2  # what amx_gemm_block's C blocks start from


@njit(**SERIAL)
def amx_gemm_block(config, a_bits, a_k0, steps, b_words, b_panel_stride, b_col0, c, row0, rows, col0, cols,
                   start, init, init_steps, edge):
    """C[row0:row0+rows, col0:col0+cols] (+)= A @ B over `steps` steps of 32 k, on this thread's tiles:
    amx_gemm_block_cycling with B's steps read once each (b_steps = steps); its arguments there."""
    amx_gemm_block_cycling(config, a_bits, a_k0, steps, steps, b_words, b_panel_stride, b_col0, c, row0, rows,
                           col0, cols, start, init, init_steps, edge)


@njit(**SERIAL)
def amx_gemm_block_cycling(config, a_bits, a_k0, steps, b_steps, b_words, b_panel_stride, b_col0, c, row0, rows,
                           col0, cols, start, init, init_steps, edge):
    """C[row0:row0+rows, col0:col0+cols] (+)= A @ B over `steps` steps of 32 k, on this thread's tiles.

    b_steps: the steps of 32 k stored in B; step s of A meets B's step s % b_steps, so B's steps are read
    over again when steps > b_steps (bf16x3's [A_hi | A_lo | A_hi] against [B_hi ; B_lo], matmul_bf16x3.py).

    a_bits [>= rows rounded up to 32, >= a_k0 + 32*steps] uint16 (row-major bf16; k past K zero).
    b_words: uint32 words of B, C-contiguous: the word of (step s, pair p of its 16, column j) is at
    (j // NR) * b_panel_stride + (s * 16 + p) * NR + j % NR (NR = 64), where column j = b_col0 +
    the column within C (b_col0 a multiple of 32).
    c [*, ldc] float32 C-contiguous; edge a [32, 32] float32 scratch for blocks past the edges.
    start: START_ZERO (C = A @ B), START_FROM_C (C += A @ B: later depth blocks) or START_FROM_INIT
    (C = init + A @ B, the bias added for free: tile rows are loaded from the float32 array init,
    element (i, j) of the C block from init's flat index i * row_step + (b_col0 + j) * col_step,
    init_steps = (row_step, col_step): (0, 1) for a bias per column, (16, 0) for a bias per row
    broadcast into 16 columns).
    """
    a_width = a_bits.shape[1]
    a_stride = a_width * 2  # bytes between rows of A
    ldc = c.shape[1]
    c_stride = ldc * 4
    row_step, col_step = init_steps
    tile_config(config)
    for col in range(0, cols, BLOCK):
        b_column = ((b_col0 + col) // 64) * b_panel_stride + (b_col0 + col) % 64  # word of pair 0
        for row in range(0, rows, BLOCK):
            full = row + BLOCK <= rows and col + BLOCK <= cols
            c_first = (row0 + row) * ldc + col0 + col  # flat index of the block's top-left in c
            # 1. the C block into tmm0..tmm3: zeros, the bias, or what earlier depth blocks summed
            if start == START_ZERO:
                tile_zero(0)
                tile_zero(1)
                tile_zero(2)
                tile_zero(3)
            elif start == START_FROM_INIT:
                init_first = row * row_step + (b_col0 + col) * col_step
                tile_load(0, init, init_first, row_step * 4)
                tile_load(1, init, init_first + TILE * col_step, row_step * 4)
                tile_load(2, init, init_first + TILE * row_step, row_step * 4)
                tile_load(3, init, init_first + TILE * row_step + TILE * col_step, row_step * 4)
            elif full:
                tile_load(0, c, c_first, c_stride)
                tile_load(1, c, c_first + TILE, c_stride)
                tile_load(2, c, c_first + TILE * ldc, c_stride)
                tile_load(3, c, c_first + TILE * ldc + TILE, c_stride)
            else:
                _load_edge_block(c, row0 + row, col0 + col, min(BLOCK, rows - row), min(BLOCK, cols - col), edge)
                tile_load(0, edge, 0, BLOCK * 4)
                tile_load(1, edge, TILE, BLOCK * 4)
                tile_load(2, edge, TILE * BLOCK, BLOCK * 4)
                tile_load(3, edge, TILE * BLOCK + TILE, BLOCK * 4)
            # 2. every step of 32 k: two A tiles, two B tiles, four tile products
            b_step = 0  # step % b_steps, without a division in the loop
            for step in range(steps):
                a_first = row * a_width + a_k0 + step * BLOCK
                tile_load(4, a_bits, a_first, a_stride)  # A rows 0-15, 32 k
                tile_load(5, a_bits, a_first + TILE * a_width, a_stride)  # A rows 16-31
                b_first = b_step * TILE * 64 + b_column
                b_step = 0 if b_step + 1 == b_steps else b_step + 1
                tile_load(6, b_words, b_first, 64 * 4)  # B columns 0-15, 16 pairs
                tile_load(7, b_words, b_first + TILE, 64 * 4)  # B columns 16-31
                tile_dpbf16ps(0, 4, 6)
                tile_dpbf16ps(1, 4, 7)
                tile_dpbf16ps(2, 5, 6)
                tile_dpbf16ps(3, 5, 7)
            # 3. the C block back
            if full:
                tile_store(0, c, c_first, c_stride)
                tile_store(1, c, c_first + TILE, c_stride)
                tile_store(2, c, c_first + TILE * ldc, c_stride)
                tile_store(3, c, c_first + TILE * ldc + TILE, c_stride)
            else:
                tile_store(0, edge, 0, BLOCK * 4)
                tile_store(1, edge, TILE, BLOCK * 4)
                tile_store(2, edge, TILE * BLOCK, BLOCK * 4)
                tile_store(3, edge, TILE * BLOCK + TILE, BLOCK * 4)
                _store_edge_block(edge, c, row0 + row, col0 + col, min(BLOCK, rows - row), min(BLOCK, cols - col))
    tile_release()


def amx_kernel_asm():
    """amx_gemm_block's machine code (x86 assembly; the kernel is amx_gemm_block_cycling), compiled
    privately (uncached) with the same flags: the k loop holds 4 tileloadd and 4 tdpbf16ps on tmm registers."""
    from numba import types  # local: only this inspection needs Numba's type objects

    compile_flags = {key: value for key, value in SERIAL.items() if key != "cache"}
    fresh = njit(**compile_flags)(amx_gemm_block_cycling.py_func)
    index = types.intp
    floats = types.Array(types.float32, 2, "C")
    fresh.compile((types.Array(types.uint8, 1, "C"), types.Array(types.uint16, 2, "C"), index, index, index,
                   types.Array(types.uint32, 3, "C"), index, index, floats, index, index, index, index,
                   index, floats, types.UniTuple(index, 2), floats))
    return fresh.inspect_asm(fresh.signatures[0])
