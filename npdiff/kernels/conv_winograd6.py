"""Winograd F(6x6,3x3)'s input and output transforms written out (padding 1), for conv_winograd.py.

F(6x6,3x3) makes a 6x6 output tile from an 8x8 input tile with 64 multiplies per (input, output)
channel pair instead of 9 * 36 = 324: 5.06x fewer, against F(4x4,3x3)'s 4x. Per output pixel its
GEMMs do 64/36 = 1.78 multiply-adds per channel pair (F(4,3): 36/16 = 2.25), and its transformed
input V and product M are as much smaller: the large-picture convs of the VAE spend most of their
time there. The interpolation points are 0, +-1, +-2, +-1/2 (conv_winograd.WINOGRAD[6]); rounding
measured in conv.py's header (at most ~5e-6 against a float64 conv; the kernel tolerance is 1e-5).

The matrices B^T (8x8) and A^T (6x8) are spelled out with their symmetric pairs shared, as NNPACK
writes them (rows 1/2, 3/4 and 5/6 of B^T are t1 + t2 and t1 - t2 of the same two partial sums):

    B^T d:  v0 = d0 - d6 + 21/4 (d4 - d2)            v7 = d7 - d1 + 21/4 (d3 - d5)
            v1, v2 = (d2 + d6 - 17/4 d4) +- (d1 + d5 - 17/4 d3)
            v3, v4 = (1/4 d2 - 5/4 d4 + d6) +- (1/2 d1 - 5/2 d3 + 2 d5)
            v5, v6 = (4 d2 - 5 d4 + d6) +- (2 d1 - 5/2 d3 + 1/2 d5)
    A^T m:  with a = m1 + m2, b = m1 - m2, c = m3 + m4, e = m3 - m4, f = m5 + m6, g = m5 - m6:
            y0 = m0 + a + c + f,   y_p = a + 2^p c + 2^-p f (p = 2, 4),
            y_p = b + 2^p e + 2^-p g (p = 1, 3),   y5 = b + 32 e + g/32 + m7

Layout and loop order are input_transform4's and output_transform4's (conv_winograd4.py): columns
deinterleaved (column j*6 + p of a tile row at [p, j]) so every step is a sum of contiguous runs
along the tiles, channel loop outermost so each V and out row is written in one sequential run.
These kernels use a different (shorter) order of the same terms than the generic kernels, so their
results differ from those in the last bits; the tests compare them within float32 rounding.
"""

import numpy as np

from npdiff.jit import SERIAL, njit
from npdiff.kernels.norm import normalize_rows
from npdiff.kernels.resample import nearest2x_rows

F32 = np.float32
# B^T's and A^T's coefficients as float32, so the transforms stay in float32
Q21, Q17, Q5, HALF, QUARTER = F32(21 / 4), F32(17 / 4), F32(5 / 4), F32(0.5), F32(0.25)
TWO, FOUR, FIVE, HALF5 = F32(2), F32(4), F32(5), F32(5 / 2)
P8, P16, P32, R8, R16, R32 = F32(8), F32(16), F32(32), F32(1 / 8), F32(1 / 16), F32(1 / 32)


@njit(**SERIAL, inline="always")
def _bt_column(d0, d1, d2, d3, d4, d5, d6, d7, out, i):
    """out[0..7][i] = B^T [d0..d7] (the shared partial sums of the module header); out: 8 rows.

    The rows are passed as a tuple of 1-D contiguous views (array[..., integers, start:stop]) indexed from 0,
    never as one 2-D slice (array[f0:f0+8, c, t0:t1], which Numba types as of unknown layout) or with an offset
    index (array[f, c, t0 + j]): with either, LLVM moved the elements one at a time (gather/scatter instructions in
    the assembly). Measured on one core, in cache, step 3 of _transform_tile_row6, offset index -> views: 0.89 ->
    0.45 ns per input pixel at 128 channels, 512 px (1.76 -> 1.51 at 512 channels, 128 px, where V leaves L2)."""
    out[0][i] = d0 - d6 + Q21 * (d4 - d2)
    out[7][i] = d7 - d1 + Q21 * (d3 - d5)
    t1 = d2 + d6 - Q17 * d4
    t2 = d1 + d5 - Q17 * d3
    out[1][i] = t1 + t2
    out[2][i] = t1 - t2
    t1 = QUARTER * d2 - Q5 * d4 + d6
    t2 = HALF * d1 - HALF5 * d3 + TWO * d5
    out[3][i] = t1 + t2
    out[4][i] = t1 - t2
    t1 = FOUR * d2 - FIVE * d4 + d6
    t2 = TWO * d1 - HALF5 * d3 + HALF * d5
    out[5][i] = t1 + t2
    out[6][i] = t1 - t2


@njit(**SERIAL, inline="always")
def _at_column(m0, m1, m2, m3, m4, m5, m6, m7, out, i):
    """out[0..5][i] = A^T [m0..m7]; out: 6 rows (1-D contiguous views, as in _bt_column)."""
    a, b = m1 + m2, m1 - m2
    c, e = m3 + m4, m3 - m4
    f, g = m5 + m6, m5 - m6
    out[0][i] = m0 + a + c + f
    out[1][i] = b + TWO * e + HALF * g
    out[2][i] = a + FOUR * c + QUARTER * f
    out[3][i] = b + P8 * e + R8 * g
    out[4][i] = a + P16 * c + R16 * f
    out[5][i] = b + P32 * e + R32 * g + m7


@njit(**SERIAL, inline="always")
def _transform_tile_row6(source, y0, height, width, c, t0, gathered, mixed, V):
    """Steps 1-3 of input_transform6 for one tile row of channel c: its 8 input rows are source's rows
    y0 .. y0+7 (rows outside 0 .. height-1: zero); its tiles go to V[:, c, t0:t0+tiles_w]."""
    tiles_w = gathered.shape[2] - 1
    run = gathered.shape[1] * gathered.shape[2]  # 6 * (tiles_w + 1)
    # 1. gathered[r, p, j] = source[y0 + r, j*6 + p - 1] (outside: zero; the columns outside are never
    #    written and keep the zeros the caller set). input_transform4's gather with 6 for 4: one shared
    #    helper taking m as a value measured 15-30% slower (the constants let Numba unroll and
    #    strength-reduce these loops)
    for r in range(8):
        y = y0 + r
        inside = 0 <= y < height
        for p in range(6):
            j_lo = 1 if p == 0 else 0
            j_hi = min(tiles_w + 1, (width - p) // 6 + 1)
            for j in range(j_lo, j_hi):
                gathered[r, p, j] = source[y, j * 6 + p - 1] if inside else 0.0
    # 2. mixed[k] = sum_r B^T[k,r] gathered[r]   (B^T d, whole tile row) [8, 6*(tiles_w+1)]
    g, mx = gathered.reshape(8, run), mixed.reshape(8, run)
    mixed_rows = (mx[0], mx[1], mx[2], mx[3], mx[4], mx[5], mx[6], mx[7])
    for i in range(run):
        _bt_column(g[0, i], g[1, i], g[2, i], g[3, i], g[4, i], g[5, i], g[6, i], g[7, i], mixed_rows, i)
    # 3. V[k*8+l, c, t0+j] = sum_s B^T[l,s] mixed[k, s%6, s//6 + j]   ((B^T d) B, per tile)
    t_end = t0 + tiles_w
    for k in range(8):
        s0, s1, s2, s3, s4, s5 = mixed[k, 0], mixed[k, 1], mixed[k, 2], mixed[k, 3], mixed[k, 4], mixed[k, 5]
        f = 8 * k
        targets = (V[f, c, t0:t_end], V[f + 1, c, t0:t_end], V[f + 2, c, t0:t_end], V[f + 3, c, t0:t_end],
                   V[f + 4, c, t0:t_end], V[f + 5, c, t0:t_end], V[f + 6, c, t0:t_end],
                   V[f + 7, c, t0:t_end])  # 8 x [tiles_w]
        for j in range(tiles_w):
            _bt_column(s0[j], s1[j], s2[j], s3[j], s4[j], s5[j], s0[j + 1], s1[j + 1], targets, j)


@njit(**SERIAL)
def input_transform6(x, row0, row1, tiles_h, c0, c1, gathered, mixed, V):
    """V[k*8+l, c, t] = (B^T d B)[k,l] for F(6x6,3x3), padding 1: the tiles of tile rows row0..row1-1
    (flat over the batch: row = b*tiles_h + tile row) and channels c0..c1-1; t counts tiles from row0.
    Scratch gathered, mixed [8, 6, tiles_w+1] (deinterleaved rows, as input_transform4's)."""
    height, width = x.shape[2], x.shape[3]
    tiles_w = gathered.shape[2] - 1
    gathered[:] = 0.0
    for c in range(c0, c1):
        for row in range(row0, row1):
            b, tile_row = row // tiles_h, row % tiles_h
            _transform_tile_row6(x[b, c], tile_row * 6 - 1, height, width, c, (row - row0) * tiles_w,
                                 gathered, mixed, V)


@njit(**SERIAL)
def input_transform6_rows(x, upsampled, mean, scale, shift, row0, row1, tiles_h, c0, c1, rows, gathered, mixed, V):
    """input_transform6 of SiLU(GroupNorm(x)) (upsampled False) or of upsample_nearest2x(x) (upsampled
    True) without making that tensor: for each tile row its 8 input rows are made into the scratch rows
    [8, W] (the picture's width, 2 x x's when upsampled) by norm.normalize_rows (group_norm's own
    normalize_run: the same float32 values, bit for bit) or resample.nearest2x_rows, and the tiles are
    cut from there (conv_fused.py).

    mean, scale [B,C] and shift [C] (float64; unused when upsampled): channel c of image b is
    (x - mean) * scale + shift, then SiLU (norm.group_norm_affine). A tile row's last two input rows are
    the next one's first two: they are moved up, not made again, so each row is made once per call (twice
    at the edge between two groups of tile rows)."""
    tiles_w = gathered.shape[2] - 1
    gathered[:] = 0.0
    for c in range(c0, c1):
        for row in range(row0, row1):
            b, tile_row = row // tiles_h, row % tiles_h
            # 0. rows[r] = input row tile_row*6 - 1 + r of the conv (zero outside the picture); the tile
            #    row above (same image, made just before) holds the first two in its last two
            carried = 2 if row > row0 and tile_row > 0 else 0
            if upsampled:
                nearest2x_rows(x, b, c, tile_row * 6 - 1, carried, rows)
            else:
                normalize_rows(x, b, c, tile_row * 6 - 1, mean, scale, shift, carried, rows)
            # 1.-3. as input_transform6, reading those rows
            _transform_tile_row6(rows, 0, 8, rows.shape[1], c, (row - row0) * tiles_w, gathered, mixed, V)


@njit(**SERIAL)
def output_transform6(M, bias, o0, row0, row1, tiles_h, mixed, rows_out, out):
    """out[b, o, rows of tile row, :] = A^T M A + bias[o] for F(6x6,3x3): output channels o0.. of block
    M [block, 64, T], tile rows row0..row1-1 (flat over the batch); edge tiles clipped.
    Scratch mixed [8, 6, tiles_w], rows_out [6, 6, tiles_w] (all six output rows of a tile row)."""
    h_out, w_out = out.shape[2], out.shape[3]
    tiles_w = mixed.shape[2]
    for local in range(M.shape[0]):
        o = o0 + local
        for row in range(row0, row1):
            b, tile_row = row // tiles_h, row % tiles_h
            t0 = (row - row0) * tiles_w
            # 1. mixed[k, q, j] = sum_l A^T[q,l] M[k*8+l, o, t0+j]   (M A, per tile)
            t_end = t0 + tiles_w
            for k in range(8):
                f = 8 * k
                m0, m1, m2, m3 = (M[local, f, t0:t_end], M[local, f + 1, t0:t_end], M[local, f + 2, t0:t_end],
                                  M[local, f + 3, t0:t_end])  # 4 x [tiles_w]
                m4, m5, m6, m7 = (M[local, f + 4, t0:t_end], M[local, f + 5, t0:t_end], M[local, f + 6, t0:t_end],
                                  M[local, f + 7, t0:t_end])
                targets = (mixed[k, 0], mixed[k, 1], mixed[k, 2], mixed[k, 3], mixed[k, 4], mixed[k, 5])
                for j in range(tiles_w):
                    _at_column(m0[j], m1[j], m2[j], m3[j], m4[j], m5[j], m6[j], m7[j], targets, j)
            # 2. rows_out[p, q, j] = sum_k A^T[p,k] mixed[k, q, j]   (A^T (M A), whole tile row)
            mx, ro = mixed.reshape(8, -1), rows_out.reshape(6, -1)
            out_rows = (ro[0], ro[1], ro[2], ro[3], ro[4], ro[5])
            for i in range(mx.shape[1]):
                _at_column(mx[0, i], mx[1, i], mx[2, i], mx[3, i], mx[4, i], mx[5, i], mx[6, i], mx[7, i], out_rows, i)
            # 3. out[b, o, tile_row*6+p, j*6+q] = rows_out[p, q, j] + bias[o] (edge tiles clipped): tile by
            #    tile, its 6 columns stored in order (one pass per q, a stride-6 scatter: 1.06-1.24x the time, in cache)
            shift = bias[o]
            whole_tiles = w_out // 6
            for p in range(min(6, h_out - tile_row * 6)):
                y = tile_row * 6 + p
                for j in range(whole_tiles):
                    x0 = 6 * j
                    out[b, o, y, x0] = rows_out[p, 0, j] + shift
                    out[b, o, y, x0 + 1] = rows_out[p, 1, j] + shift
                    out[b, o, y, x0 + 2] = rows_out[p, 2, j] + shift
                    out[b, o, y, x0 + 3] = rows_out[p, 3, j] + shift
                    out[b, o, y, x0 + 4] = rows_out[p, 4, j] + shift
                    out[b, o, y, x0 + 5] = rows_out[p, 5, j] + shift
                for q in range(w_out - 6 * whole_tiles):  # the last tile, clipped
                    out[b, o, y, 6 * whole_tiles + q] = rows_out[p, q, whole_tiles] + shift
