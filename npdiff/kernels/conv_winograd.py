"""Winograd convolution for 3x3, stride-1 convs (Lavin & Gray 2015, "Fast Algorithms for
Convolutional Neural Networks"): F(m x m, 3 x 3) computes an m x m tile of output from an
(m+2) x (m+2) tile of input with (m+2)^2 multiplications per (input, output) channel pair instead
of 9 m^2:

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* element-wise, summed over the input channels)

g is a 3x3 filter, d an input tile, Y the output tile. Summed over C_in, the element-wise product
becomes (m+2)^2 independent GEMMs  M[xi] [C_out,T] = U[xi] [C_out,C_in] @ V[xi] [C_in,T]  over the
T tiles, with U = G g G^T (the transformed weights) and V = B^T d B (the transformed input).
  F(2x2,3x3): 16 GEMMs instead of 36 multiplies per output pixel: 2.25x fewer multiplies.
  F(4x4,3x3): 36 GEMMs per 16 output pixels instead of 144: 4x fewer, at a larger rounding error
              (its transforms use 4, 5, 8 and 1/6, 1/24), measured in conv.py's header.
  F(6x6,3x3): 64 GEMMs per 36 output pixels instead of 324: 5.06x fewer; rounding about twice
              F(4,3)'s (points +-1/2 too; still within the kernel tolerance, conv.py's header).

Versions (both tested against torch and against each other):
  winograd_conv2d_ref   NumPy: pad, cut all tiles, four einsums with the literal matrices below.
  winograd_conv2d       fast: the tile rows of the batch are cut into groups (input transform V of a
                        group ~V_GROUP_BYTES); per group, step 1 transforms the input (Numba, channel
                        blocks on the block-parallel pool; zero padding handled in the gather, no
                        padded copy of x), step 2 runs per block of output channels: transform that
                        block's weights (conv_winograd_weights.py; with one group: one row of G, m+2
                        frequencies, at a time, each multiplied at once while in cache; with several:
                        all of U by the first group, kept for the call), its (m+2)^2 GEMMs
                        (np.matmul: single-threaded sgemm on the worker's core) into a per-worker M, and
                        the output transform + bias straight into out (edge tiles clipped). Few tiles
                        (16 px) take small blocks and GEMMs over spans of input channels (blocking()).
                        For F(4x4,3x3) (padding 1) the transforms are conv_winograd4.py's
                        input_transform4 and output_transform4: B^T and A^T written out, each
                        output made in one pass from all its sources (the generic kernels add one
                        coefficient's row at a time: up to 5 read-modify-write passes); same terms
                        in the same order, so the same bytes. 2-2.7x faster input, ~1.4x faster
                        output transform.
                        F(6x6,3x3)'s are written out in conv_winograd6.py (with shared partial sums:
                        within float32 rounding of the generic kernels, not the same bytes); its
                        groups and output blocks are larger (blocking(): 2 blocks of <= 256 channels).
The groups and the output-channel blocks depend only on the shapes (never on the worker count), so
every GEMM sees the same operands at any thread count: the same bytes at 1 and 2 threads.

Memory: the transformed weights are not cached across calls (F(4,3)'s U is 4x the 3x3 weights:
~8 GiB for SD's UNet). Per call: V (<= ONE_GROUP_BYTES, or one group's) and, with several groups,
U for the call ((m+2)^2/9 x that conv's weight: 44 MiB at the UNet's 960->320); per worker thread,
kept for the next call: M, a block's taps and U for one row of G (a frequencies) of a block (at most ~5.5 MiB
each at 1920->640), or at 16 px (small blocks) U for a block.
"""

import math
import time

import numpy as np

from npdiff.jit import SERIAL, njit
from npdiff.kernels.block_pool import run_blocks, split_evenly, worker_count
from npdiff.kernels.conv_winograd4 import input_transform4, input_transform4_rows, output_transform4
from npdiff.kernels.conv_winograd6 import input_transform6, input_transform6_rows, output_transform6
from npdiff.kernels.conv_winograd_weights import gather_taps, transform_taps, weight_transform
from npdiff.kernels.scratch import scratch
from npdiff.kernels.validate import output_size

# The transforms of Lavin & Gray (section 4.1 and 4.2), written out. float64; the fast path uses
# B^T and A^T in float32 (small integers: exact) and G in float64 for the weight transform.
WINOGRAD = {
    2: dict(
        BT=np.array([[1, 0, -1, 0],
                     [0, 1, 1, 0],
                     [0, -1, 1, 0],
                     [0, 1, 0, -1]], np.float64),
        G=np.array([[1, 0, 0],
                    [1 / 2, 1 / 2, 1 / 2],
                    [1 / 2, -1 / 2, 1 / 2],
                    [0, 0, 1]], np.float64),
        AT=np.array([[1, 1, 1, 0],
                     [0, 1, -1, -1]], np.float64),
    ),
    4: dict(
        BT=np.array([[4, 0, -5, 0, 1, 0],
                     [0, -4, -4, 1, 1, 0],
                     [0, 4, -4, -1, 1, 0],
                     [0, -2, -1, 2, 1, 0],
                     [0, 2, -1, -2, 1, 0],
                     [0, 4, 0, -5, 0, 1]], np.float64),
        G=np.array([[1 / 4, 0, 0],
                    [-1 / 6, -1 / 6, -1 / 6],
                    [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6],
                    [1 / 24, -1 / 12, 1 / 6],
                    [0, 0, 1]], np.float64),
        AT=np.array([[1, 1, 1, 1, 1, 0],
                     [0, 1, -1, 2, -2, 0],
                     [0, 1, 1, 4, 4, 0],
                     [0, 1, -1, 8, -8, 1]], np.float64),
    ),
    # points 0, +-1, +-2, +-1/2 (NNPACK's choice; Barabasz et al. 2020 find these among the most
    # accurate for m = 6): 64 multiplies per 36 output pixels instead of 324, 5.06x fewer
    6: dict(
        BT=np.array([[1, 0, -21 / 4, 0, 21 / 4, 0, -1, 0],
                     [0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0],
                     [0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0],
                     [0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0],
                     [0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0],
                     [0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0],
                     [0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0],
                     [0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1]], np.float64),
        G=np.array([[1, 0, 0],
                    [-2 / 9, -2 / 9, -2 / 9],
                    [-2 / 9, 2 / 9, -2 / 9],
                    [1 / 90, 1 / 45, 2 / 45],
                    [1 / 90, -1 / 45, 2 / 45],
                    [32 / 45, 16 / 45, 8 / 45],
                    [32 / 45, -16 / 45, 8 / 45],
                    [0, 0, 1]], np.float64),
        AT=np.array([[1, 1, 1, 1, 1, 1, 1, 0],
                     [0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0],
                     [0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0],
                     [0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0],
                     [0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0],
                     [0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1]], np.float64),
    ),
}

V_GROUP_BYTES = 6 << 20  # transformed input per group: stays in L3 while every output block reads it
ONE_GROUP_BYTES = 16 << 20  # ... unless all of it is at most this: one group, U made block by block
MIN_GROUP_TILES = 128  # and never fewer tiles per group (the GEMMs' N) than this
# output channels per step-2 block, about (their count is rounded to 4 blocks). 160, not 96, since the weights are
# transformed one row of G at a time (U no longer a whole block in memory): one core, CPU ms, 96 -> 160, best of 3
# alternated: 640 -> 640 at 32 px 64.1 -> 59.4, 1280 -> 1280 at 32 px 234.8 -> 216.1, 320 -> 640 34.3 -> 32.3,
# 1920 -> 640 186.3 -> 185.8; 320 rows (2 blocks): 60.1, 222.8, 32.1, 189.0 (its U rows leave L2)
OUT_BLOCK_ROWS = 160
F6_OUT_BLOCK_ROWS = 256  # ... for F(6x6,3x3), in an even number of blocks (blocking())
# ... and with at most SMALL_GEMM_MAX_TILES tiles in all (the UNet's 16 px convs at batch 2: 32 tiles), blocks
# of rows such that rows * C_in * tiles <= SMALL_GEMM_MAX_WORK, each GEMM over spans of <= SMALL_GEMM_DEPTH input
# channels, added in order (blocking())
SMALL_GEMM_MAX_TILES, SMALL_GEMM_MAX_WORK, SMALL_GEMM_DEPTH = 32, 1_000_000, 320
KEPT_SCRATCH_BYTES = 16 << 20  # larger M and U blocks are allocated per call (worker_buffer())


NO_NORMALIZATION = (np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1))  # mean, scale, shift when upsampling


def tile_counts(height, width, ph, pw, m):
    """Output size and the number of m x m tiles covering it (the last row/column may stick out)."""
    h_out, w_out = output_size(height, 3, 1, ph), output_size(width, 3, 1, pw)
    return h_out, w_out, -(-h_out // m), -(-w_out // m)


# ---------------------------------------------------------------------------------------------
# Reference: the formula, all tiles at once
# ---------------------------------------------------------------------------------------------
def winograd_conv2d_ref(x, weight, bias=None, padding=1, m=2):
    """conv2d(x, weight, bias, stride=1, padding) for 3x3 weights by F(m x m, 3 x 3), in NumPy."""
    BT, G, AT = (WINOGRAD[m][name].astype(x.dtype) for name in ("BT", "G", "AT"))
    ph, pw = (padding, padding) if np.isscalar(padding) else padding
    batch, c_in, height, width = x.shape
    c_out = weight.shape[0]
    alpha = m + 2
    h_out, w_out, tiles_h, tiles_w = tile_counts(height, width, ph, pw, m)
    # 1. zero-pad so the tiles cover the output: [B,C_in,H,W] -> [B,C_in,tiles_h*m+2,tiles_w*m+2]
    padded = np.zeros((batch, c_in, tiles_h * m + 2, tiles_w * m + 2), x.dtype)
    padded[:, :, ph:ph + height, pw:pw + width] = x
    # 2. tiles overlapping by 2: d[b,c,i,j,r,s] = padded[b,c,i*m+r,j*m+s]
    d = np.empty((batch, c_in, tiles_h, tiles_w, alpha, alpha), x.dtype)
    for r in range(alpha):
        for s in range(alpha):
            d[..., r, s] = padded[:, :, r:r + tiles_h * m:m, s:s + tiles_w * m:m]
    # 3. transforms and the element-wise product summed over input channels
    V = np.einsum("kr,bcijrs,ls->bcijkl", BT, d, BT, optimize=True)  # B^T d B   [B,C_in,th,tw,a,a]
    U = np.einsum("kr,ocrs,ls->ockl", G, weight, G, optimize=True)  # G g G^T   [C_out,C_in,a,a]
    M = np.einsum("ockl,bcijkl->boijkl", U, V, optimize=True)  # sum over c  [B,C_out,th,tw,a,a]
    Y = np.einsum("pk,boijkl,ql->boijpq", AT, M, AT, optimize=True)  # A^T M A  [B,C_out,th,tw,m,m]
    # 4. tiles back to an image, the part past the output's edge dropped
    out = Y.transpose(0, 1, 2, 4, 3, 5).reshape(batch, c_out, tiles_h * m, tiles_w * m)[:, :, :h_out, :w_out]
    if bias is not None:
        out = out + bias[:, None, None]
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------------
# Fast: Numba transforms, sgemm per (m+2)^2 frequency, groups of tile rows on the pool
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def combine_rows(coefs, rows, row0, col0, dst):
    """dst[:] = sum_i coefs[i] * rows[row0 + i, col0:col0 + len(dst)] (zero coefficients skipped),
    vectorised along the rows (rows: a C-contiguous 2-D array, so every run is contiguous)."""
    first = True
    for i in range(coefs.shape[0]):
        coef = coefs[i]
        if coef == 0.0:
            continue
        source = rows[row0 + i, col0:col0 + dst.shape[0]]
        if first:
            for j in range(dst.shape[0]):
                dst[j] = coef * source[j]
            first = False
        else:
            for j in range(dst.shape[0]):
                dst[j] += coef * source[j]
    if first:
        dst[:] = 0.0


@njit(**SERIAL)
def input_transform(x, BT, m, ph, pw, row0, row1, tiles_h, c0, c1, gathered, mixed, V):
    """V[k*a+l, c, t] = (B^T d B)[k,l] for the tiles of tile rows row0..row1-1 (flat over the
    batch: row = b*tiles_h + tile row) and channels c0..c1-1; t counts tiles from row0.

    Scratch gathered, mixed [a, m, tiles_w+1]: "deinterleaved" rows, column j*m+p of a row at
    [p, j], so that column s of every tile j (j*m+s) is the contiguous run [s%m, s//m + j]:
    every transform step is a sum of contiguous rows, vectorised along the tiles.
    """
    alpha = BT.shape[0]
    height, width = x.shape[2], x.shape[3]
    tiles_w = gathered.shape[2] - 1
    gathered[:] = 0.0
    column_range = np.empty((m, 2), np.int64)  # tiles j whose column j*m + p - pw is inside x
    for p in range(m):
        j_lo = min(tiles_w + 1, max(0, (pw - p + m - 1) // m))
        column_range[p, 0] = j_lo
        column_range[p, 1] = max(j_lo, min(tiles_w + 1, (width - 1 + pw - p) // m + 1))
    for row in range(row0, row1):
        b, tile_row = row // tiles_h, row % tiles_h
        t0 = (row - row0) * tiles_w
        for c in range(c0, c1):
            # 1. gathered[r, p, j] = x[b, c, tile_row*m - ph + r, j*m + p - pw]; the columns outside x
            #    are never written, so they keep the zeros they got before the loops
            for r in range(alpha):
                y = tile_row * m - ph + r
                inside = 0 <= y < height
                for p in range(m):
                    j_lo, j_hi = column_range[p, 0], column_range[p, 1]
                    first_column = j_lo * m + p - pw
                    for j in range(j_hi - j_lo):
                        gathered[r, p, j_lo + j] = x[b, c, y, first_column + j * m] if inside else 0.0
            # 2. mixed[k] = sum_r B^T[k,r] gathered[r]   (B^T d, for the whole tile row)
            flat_gathered = gathered.reshape(alpha, -1)
            for k in range(alpha):
                combine_rows(BT[k], flat_gathered, 0, 0, mixed[k].reshape(-1))
            # 3. V[k*a+l, c, t0+j] = sum_s B^T[l,s] mixed[k, s%m, s//m + j]   ((B^T d) B, per tile)
            for k in range(alpha):
                for l in range(alpha):
                    dst = V[k * alpha + l, c, t0:t0 + tiles_w]
                    first = True
                    for s in range(alpha):
                        coef = BT[l, s]
                        if coef == 0.0:
                            continue
                        source = mixed[k, s % m, s // m:s // m + tiles_w]
                        if first:
                            for j in range(tiles_w):
                                dst[j] = coef * source[j]
                            first = False
                        else:
                            for j in range(tiles_w):
                                dst[j] += coef * source[j]


@njit(**SERIAL)
def output_transform(M, AT, bias, o0, row0, row1, tiles_h, mixed, rows_out, out):
    """out[b, o, rows of tile row, :] = A^T M A + bias[o] for the output channels o0.. of block M
    [block, a*a, T] and tile rows row0..row1-1 (flat over the batch); edge tiles clipped.

    Scratch mixed [a, m, tiles_w], rows_out [m, tiles_w]: deinterleaved as in input_transform
    (column q of tile j at [q, j]); only the final store interleaves into out's rows.
    """
    m, alpha = AT.shape
    h_out, w_out = out.shape[2], out.shape[3]
    tiles_w = mixed.shape[2]
    for row in range(row0, row1):
        b, tile_row = row // tiles_h, row % tiles_h
        t0 = (row - row0) * tiles_w
        for local in range(M.shape[0]):
            o = o0 + local
            # 1. mixed[k, q, j] = sum_l A^T[q,l] M[k*a+l, o, t0+j]   (M A, per tile)
            for k in range(alpha):
                for q in range(m):
                    combine_rows(AT[q], M[local], k * alpha, t0, mixed[k, q])
            # 2. out[b, o, tile_row*m+p, j*m+q] = bias[o] + sum_k A^T[p,k] mixed[k, q, j]
            flat_mixed = mixed.reshape(alpha, -1)
            for p in range(m):
                y = tile_row * m + p
                if y >= h_out:
                    break
                combine_rows(AT[p], flat_mixed, 0, 0, rows_out.reshape(-1))
                target = out[b, o, y]
                for q in range(m):
                    across = rows_out[q]
                    for j in range((w_out - q + m - 1) // m):  # tiles whose column q is inside
                        target[j * m + q] = across[j] + bias[o]


def output_blocks(c_out, block_rows=None, multiple=4):
    """Step 2's blocks of output channels: about block_rows (OUT_BLOCK_ROWS) each, a multiple of
    `multiple` blocks (4: balanced on 1, 2 or 4 workers), from the shape alone."""
    block_rows = OUT_BLOCK_ROWS if block_rows is None else block_rows
    parts = multiple * max(1, -(-c_out // (multiple * block_rows)))
    return split_evenly(c_out, -(-c_out // parts), images=1, workers=multiple)


def tile_row_groups(rows, tiles_w, c_in, alpha, min_tiles=None):
    """Groups of tile rows (flat over the batch): one if the whole transformed input V is at most
    ONE_GROUP_BYTES, else groups whose V is ~V_GROUP_BYTES but which hold >= min_tiles
    (MIN_GROUP_TILES) tiles."""
    min_tiles = MIN_GROUP_TILES if min_tiles is None else min_tiles
    row_bytes = alpha * alpha * c_in * tiles_w * 4
    if rows * row_bytes <= ONE_GROUP_BYTES:
        return [(0, rows)]
    return split_evenly(rows, max(1, V_GROUP_BYTES // row_bytes, -(-min_tiles // tiles_w)))


def blocking(m, c_in, c_out, rows, tiles_w):
    """(groups of tile rows, blocks of output channels) for F(m x m, 3 x 3), from the shapes alone.
    F(6,3) (large pictures) takes larger GEMMs: groups of at least 2 * C_in tiles and an even number
    of blocks of at most F6_OUT_BLOCK_ROWS channels (each sgemm call packs both operands again: larger
    GEMMs pack less per multiply). Measured on one core (CPU time; F(6,3) with F(4,3)'s blocking ->
    groups of C_in tiles, 4 blocks -> this): [1,512,128,128] 286 -> 213 -> 195 ms, [1,256,256,256]
    -> 318 -> 266 ms, 256 -> 128 at 512 px 676 -> 661 ms; [1,128,512,512] 327 -> 344 ms (noise).
    Their M and U blocks are larger than the scratch keeps (worker_buffer()).
    With few tiles (at most SMALL_GEMM_MAX_TILES in one group: the UNet's 16 px convs at batch 2, 32 tiles)
    the blocks are small: rows * C_in * tiles <= SMALL_GEMM_MAX_WORK (1e6). There the GEMMs are weight-bound
    (U is 36 x C_out x C_in, the tiles only 32): a U block of 12-24 rows stays in cache from the weight
    transform to the GEMM, and such sgemm calls ran ~1.4x faster per FLOP (with 32 tiles, not with 128 or
    242; as if OpenBLAS took an unpacked small-matrix path up to M*N*K ~1e6: 983k was fast, 1.31M not; not
    checked in its source). One core, CPU ms, 96-row blocks -> these: 640 -> 1280 44.3 -> 39.4, 1280 -> 1280 102.6 ->
    82.7, 1920 -> 1280 175.3 -> 125.2, 2560 -> 1280 255.9 -> 177.4; at 32 px (128 tiles) blocks of 12 rows
    lost (640 -> 640 66.2 -> 79.3 ms), and so did 64 px (320 -> 320 F(6,3) 52.2 -> 72.5).
    Those small sgemm calls round worse over long sums (relative error against a float64 conv, 16 px,
    batch 2: 4.9e-6 at 1280 -> 1280, 7.0e-6 at 2560 -> 1280, against 2.9-3.0e-6 with 96-row blocks), so each
    block's GEMM runs over spans of SMALL_GEMM_DEPTH (320) input channels added in order: 2.5-2.6e-6, for
    8-15% of the time (spans of 640: 3.5e-6). Both from the shapes alone, like the blocks."""
    if m == 6:
        groups = tile_row_groups(rows, tiles_w, c_in, m + 2, max(MIN_GROUP_TILES, 2 * c_in))
        return groups, output_blocks(c_out, F6_OUT_BLOCK_ROWS, multiple=2)
    groups = tile_row_groups(rows, tiles_w, c_in, m + 2)
    if few_tiles(groups, tiles_w):  # (16 px) small GEMMs, U blocks in cache
        return groups, output_blocks(c_out, max(4, SMALL_GEMM_MAX_WORK // (c_in * rows * tiles_w)))
    return groups, output_blocks(c_out)


def few_tiles(groups, tiles_w):
    """Whether blocking() sizes the output blocks for small GEMMs: one group of at most SMALL_GEMM_MAX_TILES."""
    return len(groups) == 1 and (groups[0][1] - groups[0][0]) * tiles_w <= SMALL_GEMM_MAX_TILES


def worker_buffer(name, shape):
    """The worker's scratch buffer `name`, or, above KEPT_SCRATCH_BYTES, a fresh array freed after the
    call: F(6,3)'s U blocks reach 33 MiB per worker at 512 channels, and scratch would keep them to
    the end of the process (with them and the M blocks kept, the VAE decode's peak RSS, at 512 px
    after the 512-channel convs, grew by ~140 MiB)."""
    if math.prod(shape) * 4 > KEPT_SCRATCH_BYTES:
        return np.empty(shape, np.float32)
    return scratch(name, shape)


def product_buffers(out_blocks, per_channel):
    """None when every block's product M [block, a*a, T] fits in KEPT_SCRATCH_BYTES (then each worker's
    scratch holds it), else one flat buffer per output block for this call (made once, reused by
    every group, freed after the call; see worker_buffer)."""
    if max(stop - start for start, stop in out_blocks) * per_channel * 4 <= KEPT_SCRATCH_BYTES:
        return None
    return {block: np.empty((block[1] - block[0]) * per_channel, np.float32) for block in out_blocks}


def add_seconds(step_seconds, step, since):
    """step_seconds[step] += this thread's CPU seconds since `since` (a time.thread_time()); returns now.
    No-op (returns None) when step_seconds is None: the kernels are only timed when a caller asks."""
    if step_seconds is None:
        return None
    now = time.thread_time()
    step_seconds[step] = step_seconds.get(step, 0.0) + now - since
    return now


def winograd_conv2d(x, weight, bias, padding, m, normalized=None, upsampled=False, step_seconds=None):
    """conv2d(x, weight, bias, stride=1, padding=(ph, pw)) for 3x3 float32 weights by F(m x m, 3 x 3).

    With m 4 or 6 and padding 1, the conv may read a picture made from x row by row as its input transform
    needs it, never whole (conv_fused.py):
      normalized=(mean, scale, shift): SiLU((x - mean) * scale + shift) per (image, channel), GroupNorm +
                 SiLU folded in (mean, scale [B,C_in], shift [C_in], float64: norm.group_norm_affine);
      upsampled=True: upsample_nearest2x(x), [B,C_in,2H,2W], and the output is that size.
    step_seconds: a dict, or None; a dict gets every worker's CPU seconds per step added under "input",
    "weights", "gemm" and "output" (benchmarks/winograd_shapes.py; dict updates are atomic under the GIL)."""
    ph, pw = padding
    batch, c_in, height, width = x.shape
    if upsampled:
        height, width = 2 * height, 2 * width  # the conv's input: x upsampled
    c_out = weight.shape[0]
    alpha = m + 2
    BT, G, AT = (WINOGRAD[m][name].astype(np.float32) for name in ("BT", "G", "AT"))
    h_out, w_out, tiles_h, tiles_w = tile_counts(height, width, ph, pw, m)
    x = np.ascontiguousarray(x)  # [B,C_in,H,W]
    weight = np.ascontiguousarray(weight)  # [C_out,C_in,3,3]
    bias = np.zeros(c_out, np.float32) if bias is None else np.ascontiguousarray(bias)  # [C_out]
    out = np.empty((batch, c_out, h_out, w_out), np.float32)  # [B,C_out,Ho,Wo]
    groups, out_blocks = blocking(m, c_in, c_out, batch * tiles_h, tiles_w)
    one_group = len(groups) == 1  # then each block's U is made where it is used, in the worker's scratch
    U = None if one_group else np.empty((alpha * alpha, c_out, c_in), np.float32)  # G g G^T, by the first group
    most_tiles = max(stop - start for start, stop in groups) * tiles_w
    V_all = np.empty(alpha * alpha * c_in * most_tiles, np.float32)
    in_blocks = split_evenly(c_in, -(-c_in // (2 * worker_count())))  # element-wise: any split
    products = product_buffers(out_blocks, alpha * alpha * most_tiles)  # M per block, or None: scratch
    # the GEMMs of small blocks over spans of input channels (blocking(): rounding), else whole
    spanned_gemms = few_tiles(groups, tiles_w)
    depth_spans = split_evenly(c_in, SMALL_GEMM_DEPTH) if spanned_gemms and c_in > SMALL_GEMM_DEPTH else None

    for group, (row0, row1) in enumerate(groups):
        tiles = (row1 - row0) * tiles_w
        V = V_all[:alpha * alpha * tiles * c_in].reshape(alpha * alpha, c_in, tiles)  # [a*a,C_in,T]

        def transform_input(block):  # 1. V = B^T d B for channels c0..c1
            since = None if step_seconds is None else time.thread_time()
            gathered = scratch("winograd input", (alpha, m, tiles_w + 1))
            mixed = scratch("winograd input mixed", (alpha, m, tiles_w + 1))
            if normalized is not None or upsampled:  # (m 4 or 6, padding 1: conv_fused.py checks)
                rows = scratch("winograd input rows", (alpha, width))  # the tile row's input rows, made from x
                from_rows = input_transform4_rows if m == 4 else input_transform6_rows
                mean, scale, shift = normalized if normalized is not None else NO_NORMALIZATION
                from_rows(x, upsampled, mean, scale, shift, row0, row1, tiles_h, block[0], block[1], rows,
                          gathered, mixed, V)
            elif m == 4 and ph == pw == 1:
                input_transform4(x, row0, row1, tiles_h, block[0], block[1], gathered, mixed, V)
            elif m == 6 and ph == pw == 1:
                input_transform6(x, row0, row1, tiles_h, block[0], block[1], gathered, mixed, V)
            else:
                input_transform(x, BT, m, ph, pw, row0, row1, tiles_h, block[0], block[1], gathered, mixed, V)
            add_seconds(step_seconds, "input", since)

        def multiply_and_transform_output(block, first=group == 0, row0=row0, row1=row1, V=V, tiles=tiles):
            o0, o1 = block
            since = None if step_seconds is None else time.thread_time()
            if products is None:  # [block,a*a,T]
                M = scratch("winograd product", (o1 - o0, alpha * alpha, tiles))
            else:
                M = products[block][:(o1 - o0) * alpha * alpha * tiles].reshape(o1 - o0, alpha * alpha, tiles)
            product = M.transpose(1, 0, 2)  # [a*a,block,T] view

            def multiply(U_part, f0, f1):  # 3. product[f] = U_part[f - f0] @ V[f] for frequencies f0..f1-1
                if depth_spans is None:
                    np.matmul(U_part, V[f0:f1], out=product[f0:f1])  # [f,block,C_in] @ [f,C_in,T]
                    return
                partial = scratch("winograd partial", (f1 - f0, o1 - o0, tiles))  # (spans of C_in added in order)
                for span, (c0, c1) in enumerate(depth_spans):
                    np.matmul(U_part[:, :, c0:c1], V[f0:f1, c0:c1], out=product[f0:f1] if span == 0 else partial)
                    if span > 0:
                        product[f0:f1] += partial

            if one_group and spanned_gemms:  # 2. U = G g G^T for this (small) block, then its GEMMs
                U_block = worker_buffer("winograd weights", (alpha * alpha, o1 - o0, c_in))  # [a*a,block,C_in]
                weight_transform(weight, G, o0, o1, scratch("winograd taps", (1, 9, c_in)),
                                 scratch("winograd half", (3 * alpha, c_in)), U_block, o0)
                since = add_seconds(step_seconds, "weights", since)
                multiply(U_block, 0, alpha * alpha)
                since = add_seconds(step_seconds, "gemm", since)
            elif one_group:  # (or one row k of G, a frequencies, at a time, each multiplied at once while in
                # cache: the whole block's U, 15-22 MiB at 1280-1920 channels, was written to memory and read
                # back, 33-37 ns per channel pair at 32 px against 15-18; per row at 16 px, 6x the small
                # spanned GEMM calls: 4-12% slower there)
                taps = worker_buffer("winograd block taps", (o1 - o0, 9, c_in))  # [block,9,C_in]
                gather_taps(weight, o0, o1, taps)
                U_part = worker_buffer("winograd weights", (alpha, o1 - o0, c_in))  # [a,block,C_in]
                half = scratch("winograd half", (3, c_in))
                for k in range(alpha):
                    transform_taps(taps, G, k, k + 1, half, U_part, 0)
                    since = add_seconds(step_seconds, "weights", since)
                    multiply(U_part, k * alpha, (k + 1) * alpha)
                    since = add_seconds(step_seconds, "gemm", since)
            else:  # (or U made by the first group for all: the whole U lives for this call)
                if first:
                    weight_transform(weight, G, o0, o1, scratch("winograd taps", (1, 9, c_in)),
                                     scratch("winograd half", (3 * alpha, c_in)), U, 0)
                    since = add_seconds(step_seconds, "weights", since)
                multiply(U[:, o0:o1, :], 0, alpha * alpha)
                since = add_seconds(step_seconds, "gemm", since)
            mixed = scratch("winograd output", (alpha, m, tiles_w))
            if m in (4, 6):  # 4. A^T M A + bias
                rows_out = scratch("winograd output rows", (m, m, tiles_w))
                written_out = output_transform4 if m == 4 else output_transform6
                written_out(M, bias, o0, row0, row1, tiles_h, mixed, rows_out, out)
            else:
                rows_out = scratch("winograd output rows", (m, tiles_w))
                output_transform(M, AT, bias, o0, row0, row1, tiles_h, mixed, rows_out, out)
            add_seconds(step_seconds, "output", since)

        run_blocks(transform_input, in_blocks)
        run_blocks(multiply_and_transform_output, out_blocks)
    return out
