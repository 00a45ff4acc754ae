"""Winograd F(4x4,3x3)'s input and output transforms written out (padding 1), for conv_winograd.py.

F(4x4,3x3) makes a 4x4 output tile from a 6x6 input tile with 36 multiplies per (input, output)
channel pair instead of 9 * 16 = 144. The generic kernels of conv_winograd.py (input_transform,
output_transform) add one coefficient's row at a time, up to 5 read-modify-write passes over a tile
row; these spell B^T (6x6) and A^T (4x6) out, so each output is made in one pass from all its
sources. They use the same terms in the same order as the generic kernels, so they give the same
bytes (tests/kernels/test_conv_winograd.py checks it); measured 2-2.7x faster input and ~1.4x
faster output transform.

    B^T = [[4,  0, -5,  0, 1, 0],        A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4,  1, 1, 0],               [0, 1, -1, 2, -2, 0],
           [0,  4, -4, -1, 1, 0],               [0, 1,  1, 4,  4, 0],
           [0, -2, -1,  2, 1, 0],               [0, 1, -1, 8, -8, 1]]
           [0,  2, -1, -2, 1, 0],
           [0,  4,  0, -5, 0, 1]]

Layout: columns deinterleaved (column j*4 + p of a tile row at [p, j]) so every step is a sum of
contiguous runs along the tiles; channel loop outermost so each V and out row is written in one
sequential run. conv_winograd6.py does the same for F(6x6,3x3).
"""

import numpy as np

from npdiff.jit import SERIAL, njit
from npdiff.kernels.norm import normalize_rows
from npdiff.kernels.resample import nearest2x_rows


# F(4x4,3x3)'s transform coefficients as float32, so the written-out transforms stay in float32
P2, P4, P8, N1, N2, N4, N5, N8 = (np.float32(v) for v in (2, 4, 8, -1, -2, -4, -5, -8))


@njit(**SERIAL, inline="always")
def _transform_tile_row4(source, y0, height, width, c, t0, gathered, mixed, V):
    """Steps 1-3 of input_transform4 for one tile row of channel c: its 6 input rows are source's rows
    y0 .. y0+5 (rows outside 0 .. height-1: zero); its tiles go to V[:, c, t0:t0+tiles_w]."""
    tiles_w = gathered.shape[2] - 1
    run = gathered.shape[1] * gathered.shape[2]  # m * (tiles_w + 1)
    # 1. gathered[r, p, j] = source[y0 + r, j*4 + p - 1] (outside: zero; the columns outside are never
    #    written and keep the zeros the caller set)
    for r in range(6):
        y = y0 + r
        inside = 0 <= y < height
        for p in range(4):
            j_lo = 1 if p == 0 else 0
            j_hi = min(tiles_w + 1, (width - p) // 4 + 1)
            for j in range(j_lo, j_hi):
                gathered[r, p, j] = source[y, j * 4 + p - 1] if inside else 0.0
    # 2. mixed[k] = sum_r B^T[k,r] gathered[r]   (B^T d, whole tile row) [6, 4*(tiles_w+1)]
    g, mx = gathered.reshape(6, run), mixed.reshape(6, run)
    for i in range(run):
        d0, d1, d2, d3, d4, d5 = g[0, i], g[1, i], g[2, i], g[3, i], g[4, i], g[5, i]
        mx[0, i] = P4 * d0 + N5 * d2 + d4
        mx[1, i] = N4 * d1 + N4 * d2 + d3 + d4
        mx[2, i] = P4 * d1 + N4 * d2 + N1 * d3 + d4
        mx[3, i] = N2 * d1 + N1 * d2 + P2 * d3 + d4
        mx[4, i] = P2 * d1 + N1 * d2 + N2 * d3 + d4
        mx[5, i] = P4 * d1 + N5 * d3 + d5
    # 3. V[k*6+l, c, t0+j] = sum_s B^T[l,s] mixed[k, s%4, s//4 + j]   ((B^T d) B, per tile)
    for k in range(6):
        for j in range(tiles_w):
            s0, s1, s2 = mixed[k, 0, j], mixed[k, 1, j], mixed[k, 2, j]
            s3, s4, s5 = mixed[k, 3, j], mixed[k, 0, j + 1], mixed[k, 1, j + 1]
            V[6 * k + 0, c, t0 + j] = P4 * s0 + N5 * s2 + s4
            V[6 * k + 1, c, t0 + j] = N4 * s1 + N4 * s2 + s3 + s4
            V[6 * k + 2, c, t0 + j] = P4 * s1 + N4 * s2 + N1 * s3 + s4
            V[6 * k + 3, c, t0 + j] = N2 * s1 + N1 * s2 + P2 * s3 + s4
            V[6 * k + 4, c, t0 + j] = P2 * s1 + N1 * s2 + N2 * s3 + s4
            V[6 * k + 5, c, t0 + j] = P4 * s1 + N5 * s3 + s5


@njit(**SERIAL)
def input_transform4(x, row0, row1, tiles_h, c0, c1, gathered, mixed, V):
    """input_transform for F(4x4,3x3) (padding 1), B^T written out: each output is made in one pass
    from all its sources (same terms, same order as input_transform: the same bytes)."""
    height, width = x.shape[2], x.shape[3]
    tiles_w = gathered.shape[2] - 1
    gathered[:] = 0.0
    for c in range(c0, c1):  # (channel outer: each V[kl, c] row is written in one sequential run)
        for row in range(row0, row1):
            b, tile_row = row // tiles_h, row % tiles_h
            _transform_tile_row4(x[b, c], tile_row * 4 - 1, height, width, c, (row - row0) * tiles_w,
                                 gathered, mixed, V)


@njit(**SERIAL)
def input_transform4_rows(x, upsampled, mean, scale, shift, row0, row1, tiles_h, c0, c1, rows, gathered, mixed, V):
    """input_transform4 of SiLU(GroupNorm(x)) or of upsample_nearest2x(x), its 6 input rows per tile row
    made into the scratch rows [6, W] (conv_winograd6.input_transform6_rows, with 4 new rows per tile row)."""
    tiles_w = gathered.shape[2] - 1
    gathered[:] = 0.0
    for c in range(c0, c1):
        for row in range(row0, row1):
            b, tile_row = row // tiles_h, row % tiles_h
            # 0. rows[r] = input row tile_row*4 - 1 + r of the conv (zero outside the picture); the tile
            #    row above (same image, made just before) holds the first two in its last two
            carried = 2 if row > row0 and tile_row > 0 else 0
            if upsampled:
                nearest2x_rows(x, b, c, tile_row * 4 - 1, carried, rows)
            else:
                normalize_rows(x, b, c, tile_row * 4 - 1, mean, scale, shift, carried, rows)
            # 1.-3. as input_transform4, reading those rows
            _transform_tile_row4(rows, 0, 6, rows.shape[1], c, (row - row0) * tiles_w, gathered, mixed, V)


@njit(**SERIAL)
def output_transform4(M, bias, o0, row0, row1, tiles_h, mixed, rows_out, out):
    """output_transform for F(4x4,3x3), A^T written out (same terms, same order: the same bytes).
    Scratch rows_out [4, 4, tiles_w]: all four output rows of a tile row at once."""
    h_out, w_out = out.shape[2], out.shape[3]
    tiles_w = mixed.shape[2]
    for local in range(M.shape[0]):  # (channel outer: M[local] read, out[b, o] written in order)
        o = o0 + local
        for row in range(row0, row1):
            b, tile_row = row // tiles_h, row % tiles_h
            t0 = (row - row0) * tiles_w
            # 1. mixed[k, q, j] = sum_l A^T[q,l] M[k*6+l, o, t0+j]   (M A, per tile)
            for k in range(6):
                for j in range(tiles_w):
                    m0, m1, m2 = M[local, 6 * k, t0 + j], M[local, 6 * k + 1, t0 + j], M[local, 6 * k + 2, t0 + j]
                    m3, m4, m5 = M[local, 6 * k + 3, t0 + j], M[local, 6 * k + 4, t0 + j], M[local, 6 * k + 5, t0 + j]
                    mixed[k, 0, j] = m0 + m1 + m2 + m3 + m4
                    mixed[k, 1, j] = m1 + N1 * m2 + P2 * m3 + N2 * m4
                    mixed[k, 2, j] = m1 + m2 + P4 * m3 + P4 * m4
                    mixed[k, 3, j] = m1 + N1 * m2 + P8 * m3 + N8 * m4 + m5
            # 2. rows_out[p, q, j] = sum_k A^T[p,k] mixed[k, q, j]   (A^T (M A), whole tile row)
            mx, ro = mixed.reshape(6, -1), rows_out.reshape(4, -1)
            for i in range(mx.shape[1]):
                m0, m1, m2, m3, m4, m5 = mx[0, i], mx[1, i], mx[2, i], mx[3, i], mx[4, i], mx[5, i]
                ro[0, i] = m0 + m1 + m2 + m3 + m4
                ro[1, i] = m1 + N1 * m2 + P2 * m3 + N2 * m4
                ro[2, i] = m1 + m2 + P4 * m3 + P4 * m4
                ro[3, i] = m1 + N1 * m2 + P8 * m3 + N8 * m4 + m5
            # 3. out[b, o, tile_row*4+p, j*4+q] = rows_out[p, q, j] + bias[o] (edge tiles clipped)
            for p in range(min(4, h_out - tile_row * 4)):
                target = out[b, o, tile_row * 4 + p]
                for q in range(4):
                    across = rows_out[p, q]
                    for j in range((w_out - q + 3) // 4):
                        target[j * 4 + q] = across[j] + bias[o]
