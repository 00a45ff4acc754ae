"""The GEMMs of the Winograd convolutions (conv_winograd.py), on operands already in the micro-kernel's order.

For each of the a*a frequencies xi of F(m x m, 3 x 3) (a = m + 2), summed over the input channels c:

    M[o, xi, t] = sum_c U[xi][o, c] V[xi][c, t]     U: transformed weights, V: transformed input tiles

Versions:
  1. np.matmul(U, V, out=M.transpose(1, 0, 2)) with U [a*a, C_out, C_in], V [a*a, C_in, T]: what
     conv_winograd.py did before (session 11). OpenBLAS runs the a*a GEMMs one after another and packs both
     operands again in each: 64 packings of each per call of F(6,3), at 88-119 GFLOP/s per core.
  2. winograd_gemm (this file): the register-blocked 6 x 64 micro-kernel of the lesson's matmul chapter
     (matmul_numba._micro_kernel, imported: 24 zmm accumulators, explicit fma32), over operands that are
     never packed by the GEMM: the weight transform writes U straight into MR-row panels and the input
     transform writes V straight into NR-column panels (the layouts below), so a call reads each operand
     where its producer left it.

Layouts (the micro-kernel reads A [depth, MR] and B [depth, NR], each one contiguous run):
    U_packed [a*a, ceil(C_out/MR), C_in, MR]   U_packed[xi, q, c, r] = U[xi][q*MR + r, c] (rows past C_out 0)
    V_packed [a*a, ceil(T/NR), C_in + 1, NR]   V_packed[xi, p, c, j] = V[xi][c, p*NR + j] (the lanes past T of
                                               the last panel: zero, as the input transforms store them; their
                                               columns of M are never written; row C_in of each panel is never read)
The spare row: with C_in a power of two, panels C_in * NR * 4 bytes apart (128 KiB at 512 channels) fall on
the same L1 and L2 sets (a 2 MiB 16-way L2 has 128 KiB between same-set lines), so the input transform's
64 write streams (one per frequency) and the GEMM's group of panels evicted each other (measured, one core,
[1,512,128,128]: the input transform 3x slower than into [a*a, C_in, T]; the GEMM 105-115 GFLOP/s).
Loop order in winograd_gemm, per frequency: depth blocks of KC input channels; per block, each tile panel's
[KC, NR] block of V (32 KiB at KC = 128: in L1) meets every row panel of U's [rows, KC] block (in L2), whose
6 values per step of k are all the micro-kernel streams from L2. M's tile is stored by the first depth block
and added to by the later ones.

Bits: every element of M is made by one thread in one order of k (the micro-kernel's fma32 chain, depth
blocks in order), whatever the thread count; no fastmath flag anywhere (matmul_numba.py's header).
"""

import numpy as np

from npdiff.jit import SERIAL, njit
from npdiff.kernels.matmul_numba import CACHE_LINE_FLOATS, MR, NR, _micro_kernel, prefetch_to_l2

SPARE_ROWS = 1  # V's panels are C_in + 1 rows apart (the spare row never read): see the header
GROUP_BYTES = 512 << 10  # V per group of panels (winograd_gemm): in L2 beside the frequency's U rows


def panel_count(size, width):
    """Panels of `width` covering `size` rows or columns."""
    return -(-size // width)


def u_packed_shape(alpha, c_out, c_in):
    """The shape of the transformed weights in MR-row panels: [a*a, ceil(C_out/MR), C_in, MR]."""
    return (alpha * alpha, panel_count(c_out, MR), c_in, MR)


def v_packed_shape(alpha, c_in, tiles):
    """The shape of the transformed input in NR-column panels: [a*a, ceil(T/NR), C_in + SPARE_ROWS, NR]."""
    return (alpha * alpha, panel_count(tiles, NR), c_in + SPARE_ROWS, NR)


@njit(**SERIAL)
def store_channel(staged, V_packed, c):
    """V_packed[xi, p, c, :] = staged[xi, p*NR:(p+1)*NR] for every frequency xi and panel p: one channel's
    transformed tiles, made in staged [a*a, >= P*NR] as contiguous rows, stored as whole NR-float panel rows.

    Why the detour: written straight into the panels, each tile row of the transform is a run of < NR floats in
    each of the a*a * P panel rows of its channel (different pages, lines partly written): the input transform
    took 1.5-3x its time into [a*a, C_in, T] (one core, [1,512,128,128]). Whole aligned 256-byte rows stream."""
    for xi in range(V_packed.shape[0]):
        for p in range(V_packed.shape[1]):
            target = V_packed[xi, p, c]  # [NR]
            source = staged[xi, p * NR:(p + 1) * NR]
            for j in range(NR):
                target[j] = source[j]


@njit(**SERIAL)
def pack_weight_rows(U_rows, U_packed, q):
    """U_rows [a*a, rows <= MR, C_in] (the transformed weights of output channels q*MR ..) -> U_packed[:, q]
    [a*a, C_in, MR]; rows past `rows` zero."""
    rows = U_rows.shape[1]
    for xi in range(U_rows.shape[0]):
        for c in range(U_rows.shape[2]):
            for r in range(rows):
                U_packed[xi, q, c, r] = U_rows[xi, r, c]
            for r in range(rows, MR):
                U_packed[xi, q, c, r] = 0.0


@njit(**SERIAL)
def winograd_gemm(U_packed, q0, rows, V_packed, tiles, M, group_panels):
    """M[o, xi, t] = sum_c U[xi][q0*MR + o, c] V[xi][c, t] for o < rows, t < tiles (M [>= rows, a*a, >= T]).

    U_packed [a*a, Q, C_in, MR] (row panels q0 .. q0 + ceil(rows/MR) - 1 used), V_packed [a*a, P, C_in + 1, NR];
    group_panels: V's panels per group (group_size). One thread (the caller's): the pool runs one call per block
    of output channels. Prefetches (into L2, while the FMAs run): the next group's V panels, a slice in each
    micro-kernel call of this group, and the next frequency's U rows, a few lines before each call."""
    frequencies, tile_panels, c_in = V_packed.shape[0], V_packed.shape[1], U_packed.shape[2]
    panel_floats = V_packed.shape[2] * NR  # one V panel, spare row included
    row_panels = (rows + MR - 1) // MR
    u_floats = row_panels * c_in * MR  # the U rows of one frequency (contiguous)
    u_lines_per_call = -(-u_floats // (row_panels * tile_panels * CACHE_LINE_FLOATS))
    for xi in range(frequencies):
        product = M[:, xi, :]  # [rows, T] (rows a*a*T apart)
        u_next = ((xi + 1) * U_packed.shape[1] + q0) * c_in * MR  # flat start of the next frequency's rows
        u_line = 0
        for p0 in range(0, tile_panels, group_panels):
            p1 = min(tile_panels, p0 + group_panels)
            # 1. the block of V the next group reads: this frequency's next panels, or the next frequency's first
            if p1 < tile_panels:
                v_next, v_count = (xi * tile_panels + p1) * panel_floats, min(group_panels, tile_panels - p1)
            else:
                v_next, v_count = (xi + 1) * tile_panels * panel_floats, min(group_panels, tile_panels)
            v_count = v_count * panel_floats if xi + 1 < frequencies or p1 < tile_panels else 0
            calls = row_panels * (p1 - p0)
            v_slice = -(-v_count // (calls * CACHE_LINE_FLOATS)) * CACHE_LINE_FLOATS  # floats per call
            call = 0
            for q in range(row_panels):
                a_panel = U_packed[xi, q0 + q, :c_in]  # [C_in, MR] (C-contiguous: [:, :] would type as strided), in L1 while the group passes
                valid_rows = min(MR, rows - q * MR)
                for p in range(p0, p1):
                    # 2. a few lines of the next frequency's U
                    for _ in range(u_lines_per_call):
                        if xi + 1 < frequencies and u_line * CACHE_LINE_FLOATS < u_floats:
                            prefetch_to_l2(U_packed, u_next + u_line * CACHE_LINE_FLOATS)
                        u_line += 1
                    # 3. the 6 x 64 tile, a slice of the next V block prefetched inside
                    start = call * v_slice
                    _micro_kernel(c_in, a_panel, V_packed[xi, p, :c_in], product, q * MR, p * NR, valid_rows,
                                  min(NR, tiles - p * NR), False, V_packed, v_next + start,
                                  max(0, min(v_slice, v_count - start)))
                    call += 1


def group_size(c_in):
    """V panels per group of winograd_gemm: about GROUP_BYTES of V, the block in L2 while U's rows pass."""
    return max(1, GROUP_BYTES // ((c_in + SPARE_ROWS) * NR * 4))


def unpack_tiles(V_packed, tiles):
    """V_packed [a*a, P, C_in + 1, NR] -> V [a*a, C_in, T] (a new array): the inverse of the panel layout."""
    frequencies, panels, rows, _ = V_packed.shape
    c_in = rows - SPARE_ROWS
    spread = V_packed[:, :, :c_in].transpose(0, 2, 1, 3).reshape(frequencies, c_in, panels * NR)  # [a*a,C_in,P*NR]
    return np.ascontiguousarray(spread[:, :, :tiles])


def winograd_gemm_ref(U, V):
    """NumPy: M [C_out, a*a, T] from U [a*a, C_out, C_in] and V [a*a, C_in, T] (version 1's product)."""
    return np.matmul(U, V).transpose(1, 0, 2)  # [a*a,C_out,T] -> [C_out,a*a,T]
