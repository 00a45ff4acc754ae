"""Linear layers with many rows (the UNet's R = 128..8192 tokens) on weights packed once, at load.

    panels = pack_panels(weight)                                    # [out,in] -> [out/NR, in, NR], once
    y = linear_rows(x, panels, out_features, bias, residual)        # [R,in] -> [R,out]

Versions:
  1. linear_rows_ref   NumPy: x @ W^T + bias, + residual (linear_packed.linear_packed_ref).
  2. linear_rows       Numba, on linear_packed_tile.row_tile (the 6 x 64 register micro-kernel, x read as its
                       rows lie, the bias and residual added on the tile after its last depth block). Each
                       thread takes a contiguous run of whole row panels (MR = 6 rows) and runs them
                       BLOCK_ROWS rows at a time through all the weight's column panels. Two drivers, by the
                       packed weight's size (pick_driver):
       "rows"          weights that stay in L2 (SD 1.5's 320 and 640 channels: 0.4-1.6 MB): depth blocks of
                       up to DEPTH_BLOCK, and while a block runs its tiles fetch the NEXT block's rows of x and
                       y into L2 (gemm_row_block). Without that, the first tile to touch a row of x or y
                       waited on memory: one thread, [8192,320] x [320,320], 88 -> 123 GFLOP/s.
       "panels"        larger weights (1280 channels: 6.5 and 26 MB): linear_packed.gemm_panels on each row
                       block, whose tiles fetch the weight's next panel into L2 (CLIP's driver): at
                       [512,5120] x [5120,1280] 133 against the "rows" driver's 108-112 (one thread).

Why try packed rows instead of OpenBLAS: an sgemm call packs its weight again on every call (npdiff's pool calls
it once per worker), and the bias is a pass of its own after it. Measured (benchmarks/RESULTS.md, "The UNet's
linear layers on packed weights", a loaded host): alone, best of 11, 2 threads, 7-13% faster than the sgemm path
at most UNet shapes, ~45% at the mid block's 128 rows, even at [2048,2560] x [2560,640], 3-12% below torch; but
in SD 1.5's UNet forward no faster (1.45 s against 1.43 for the same layers), so the UNet does not use it
(models/packed_linear.UNET_PACKS_ROWS). Per thread the micro-kernel runs 123-141 GFLOP/s at these shapes,
OpenBLAS 121-146, oneDNN 129-159 (one thread, CPU time): it is not faster than OpenBLAS's, only its packing and
bias pass are saved.

Same bits for any thread count: each element of y is made by one tile per depth block, in one order of k,
whichever thread or row block holds it (tasks start on whole row panels); no kernel here carries a fastmath
flag; the driver depends on the weight only.
"""

import numpy as np
from numba import get_num_threads

from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels.linear_packed import aligned_empty, gemm_panels, linear_packed_ref
from npdiff.kernels.linear_packed_tile import NO_ACTIVATION, row_tile
from npdiff.kernels.matmul_numba import CACHE_LINE_FLOATS, MR, NR

BLOCK_ROWS = 96  # rows of x per block (16 row panels); one thread, CPU time: 48 and 192 within 1-6% either way
# steps of k per depth block of the "rows" driver: the UNet's depths up to 1280 in one block (the tile's six rows
# of x, 30 KB at 1280, stay in L1), 2560 and 5120 in blocks of 1280. Measured (one thread, CPU time, blocks of
# 96 rows): 1280 against 768 at [8192,1280] x [1280,320] 141 / 134 GFLOP/s; 160 or 96 (a [KC, 64] weight block
# in L1): 117 and 96 at [8192,320] x [320,320] against 131 (the tile's sums loaded and stored once per block)
DEPTH_BLOCK = 1280
# the "rows" driver (the next block's x and y fetched into L2) for packed weights up to this size, which stay in
# the core's L2 (2 MiB here) between row blocks; larger ones (the UNet's 6.5 and 26 MB) take the "panels" driver,
# whose tiles fetch the weight's next panel instead. Measured in benchmarks/unet_packed_linear.py (RESULTS.md)
ROWS_DRIVER_MAX_WEIGHT_BYTES = 2 * 2**20
DRIVERS = ("rows", "panels")


@njit(**SERIAL)
def gemm_row_block(x, panels, row_first, row_stop, next_stop, depth_block, bias, has_bias, residual, has_residual,
                   out, tile):
    """out[row_first:row_stop] = x[row_first:row_stop] @ W^T + bias + residual: depth blocks of depth_block steps
    of k outermost, then each column panel, then each row panel of the block (its MR x NR tile: row_tile).
    Meanwhile the next block's rows of x and out (row_stop .. next_stop) are fetched into L2, a slice of their
    cache lines in each tile (x first, then out: its lines then arrive owned, so the tiles' stores do not wait
    on memory). x, out and residual are the whole arrays (no views: a view of an array both threads use takes
    its reference count, an atomic add on a shared header)."""
    depth = panels.shape[1]
    cols = out.shape[1]
    n_panels = panels.shape[0]
    row_panels = (row_stop - row_first + MR - 1) // MR
    step = max(depth_block, 1)
    depth_blocks = max(1, (depth + step - 1) // step)
    # 1. the next block's cache lines, and how many each tile fetches
    next_rows = next_stop - row_stop
    x_lines = (next_rows * depth + CACHE_LINE_FLOATS - 1) // CACHE_LINE_FLOATS
    out_lines = (next_rows * cols + CACHE_LINE_FLOATS - 1) // CACHE_LINE_FLOATS
    tiles = depth_blocks * n_panels * row_panels
    per_tile = (x_lines + out_lines + tiles - 1) // tiles  # cache lines
    tile_index = 0
    # 2. the tiles
    for k0 in range(0, depth_blocks * step, step):
        block_depth = min(step, depth - k0)
        last_block = k0 + step >= depth
        for panel in range(n_panels):
            col0 = panel * NR
            b_block = panels[panel, k0:k0 + block_depth]  # [KC, NR]
            for row_panel in range(row_panels):
                row0 = row_first + row_panel * MR
                line = tile_index * per_tile
                tile_index += 1
                if line < x_lines:
                    source, start, count = x, row_stop * depth + line * CACHE_LINE_FLOATS, \
                        min(per_tile, x_lines - line) * CACHE_LINE_FLOATS
                else:
                    source, start, count = out, row_stop * cols + (line - x_lines) * CACHE_LINE_FLOATS, \
                        max(0, min(per_tile, x_lines + out_lines - line)) * CACHE_LINE_FLOATS
                row_tile(block_depth, x, k0, row0, min(MR, row_stop - row0), b_block, out, col0,
                         min(NR, cols - col0), k0 > 0, last_block, bias, has_bias, NO_ACTIVATION, residual,
                         has_residual, tile, source, start, count)


@njit(**PARALLEL)
def _linear_rows_numba(x, panels, bias, has_bias, residual, has_residual, out, tasks):
    """The "rows" driver: out [M,N] = x @ W^T + bias + residual, x [M,K] rows, W's panels [N/NR, K, NR]. One task
    per thread, each a contiguous run of whole row panels, BLOCK_ROWS rows at a time (gemm_row_block)."""
    rows = x.shape[0]
    row_panels = (rows + MR - 1) // MR
    for task in prange(tasks):
        first = task * row_panels // tasks * MR
        stop = min(rows, (task + 1) * row_panels // tasks * MR)
        tile = np.empty((2, MR, NR), np.float32)  # row_tile's buffers, this thread's own
        for row0 in range(first, stop, BLOCK_ROWS):
            row1 = min(stop, row0 + BLOCK_ROWS)
            gemm_row_block(x, panels, row0, row1, min(stop, row1 + BLOCK_ROWS), DEPTH_BLOCK, bias, has_bias,
                           residual, has_residual, out, tile)


@njit(**PARALLEL)
def _linear_panels_numba(x, panels, bias, has_bias, residual, has_residual, out, tasks):
    """The "panels" driver: the same product, each thread's row panels BLOCK_ROWS rows at a time through
    linear_packed.gemm_panels (depth blocks of KC_PANEL, each tile fetching a slice of the weight's next panel
    into L2): for weights that do not stay in L2."""
    rows = x.shape[0]
    row_panels = (rows + MR - 1) // MR
    n_panels = panels.shape[0]
    for task in prange(tasks):
        first = task * row_panels // tasks * MR
        stop = min(rows, (task + 1) * row_panels // tasks * MR)
        for row0 in range(first, stop, BLOCK_ROWS):
            row1 = min(stop, row0 + BLOCK_ROWS)
            gemm_panels(x[row0:row1], panels, 0, n_panels, bias, has_bias, NO_ACTIVATION, residual[row0:row1],
                        has_residual, out[row0:row1])


def pick_driver(panels):
    """"rows" for packed weights that stay in L2 (ROWS_DRIVER_MAX_WEIGHT_BYTES), else "panels"."""
    return "rows" if panels.nbytes <= ROWS_DRIVER_MAX_WEIGHT_BYTES else "panels"


def linear_rows(x, panels, outputs, bias=None, residual=None, out=None, driver=None):
    """x @ W^T + bias + residual -> [rows, outputs] float32.

    x [rows, in] float32 C-contiguous; panels: W [outputs, in] as linear_packed.pack_panels packs it; bias
    [outputs] or None; residual [rows, outputs] C-contiguous or None; out: None (a new array) or a C-contiguous
    float32 [rows, outputs] array to write, neither x nor the residual; driver: None (pick_driver's rule), or
    "rows" / "panels" (benchmarks/unet_packed_linear.py compares them)."""
    rows = x.shape[0]
    out = aligned_empty((rows, outputs)) if out is None else out  # [M,N]
    if rows == 0 or outputs == 0:
        return out
    has_bias, has_residual = bias is not None, residual is not None
    tasks = max(1, min(get_num_threads(), (rows + MR - 1) // MR))
    kernel = _linear_rows_numba if (driver or pick_driver(panels)) == "rows" else _linear_panels_numba
    kernel(x, panels, bias if has_bias else out[0], has_bias, residual if has_residual else out, has_residual, out,
           tasks)
    return out


def linear_rows_ref(x, weight, bias=None, residual=None):
    """NumPy: x @ weight^T + bias + residual, x [M,in], weight [out,in]."""
    return linear_packed_ref(x, weight, bias, None, residual)
