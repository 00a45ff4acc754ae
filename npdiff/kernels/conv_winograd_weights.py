"""Winograd's weight transform U = G g G^T, for conv_winograd.py's F(m x m, 3 x 3) (any m: G is [m+2, 3]).

For every output channel o and input channel c, g = weight[o, c] is a 3x3 filter and U[k*a+l, o, c] =
(G g G^T)[k, l] its a x a transform (a = m+2). U is made per call, never cached (conv_winograd.py's
header: it is (m+2)^2/9 x the weights), so this runs on every call, block by block of output channels:
  1. gather_taps     the 9 taps of each input channel into rows along C_in (a strided gather from
                     [C_out, C_in, 3, 3]), so that every later step is a sum of contiguous rows;
  2. transform_taps  G g then (G g) G^T as 3-term sums of those rows, vectorised along C_in, for all a rows
                     of G or for one row k of G at a time (a frequencies: small enough to stay in cache until
                     that part's GEMMs read it);
  weight_transform   both steps for a range of output channels, one channel at a time.
The reference is the einsum of conv_winograd.winograd_conv2d_ref (tests compare the two, and with torch).
"""

from npdiff.jit import SERIAL, njit


@njit(**SERIAL)
def gather_taps(weight, o0, o1, taps):
    """taps[o - o0, 3s + r, c] = weight[o, c, r, s]: the 9 taps of output channels o0..o1-1 as rows along C_in."""
    c_in = weight.shape[1]
    for o in range(o0, o1):
        for c in range(c_in):
            for r in range(3):
                for s in range(3):
                    taps[o - o0, 3 * s + r, c] = weight[o, c, r, s]


@njit(**SERIAL)
def transform_taps(taps, G, k0, k1, half, U, u_row0):
    """U[(k - k0)*a + l, u_row0 + o, c] = (G g G^T)[k,l] for g the 3x3 taps[o, :, c] (gather_taps), the rows
    k0..k1-1 of the transform (all a of them, or one row k: a frequencies at a time, as
    conv_winograd.winograd_conv2d makes them with one group of tile rows).

    Scratch half [3*(k1-k0), C_in]: G g and (G g) G^T are 3-term sums of rows (g0*r0 + g1*r1) + g2*r2 in one
    pass, vectorised along C_in (conv_winograd.combine_rows per row, up to 3 read-modify-write passes, took
    1.1-1.5x this time, one core, 80-row blocks: 1280 -> 1280 27.7 against 25.4 ms, 320 -> 320 F(6,3) 2.6
    against 1.8 ms). Zero coefficients of G are multiplied, not skipped as in combine_rows: the same values but
    for the sign of a zero. Tried and slower: the same in chunks of 256 or 16 input channels (to stay in L1):
    1.6x and 2.4x this time (Numba's index loops from a non-zero start keep their negative-index checks and
    do not vectorise as these do)."""
    alpha = G.shape[0]
    c_in = taps.shape[2]
    for o in range(taps.shape[0]):
        row = u_row0 + o
        for k in range(k0, k1):  # G g: [a,3] @ [3,3]
            g0, g1, g2 = G[k, 0], G[k, 1], G[k, 2]
            for s in range(3):
                for c in range(c_in):
                    half[3 * (k - k0) + s, c] = g0 * taps[o, 3 * s, c] + g1 * taps[o, 3 * s + 1, c] \
                        + g2 * taps[o, 3 * s + 2, c]
        for l in range(alpha):  # (G g) G^T: [a,3] @ [3,a]
            g0, g1, g2 = G[l, 0], G[l, 1], G[l, 2]
            for k in range(k1 - k0):
                for c in range(c_in):
                    U[k * alpha + l, row, c] = g0 * half[3 * k, c] + g1 * half[3 * k + 1, c] \
                        + g2 * half[3 * k + 2, c]


@njit(**SERIAL)
def weight_transform(weight, G, o0, o1, taps, half, U, u0):
    """U[k*a+l, o - u0, c] = (G g G^T)[k,l] for g = weight[o, c] (3x3), o in o0..o1-1, one output channel at a
    time (scratch taps [1, 9, C_in], half [3a, C_in]: that channel's, kept in cache between the two steps; the
    block's taps gathered first measured 5-15% slower at the 16 px shapes)."""
    for o in range(o0, o1):
        gather_taps(weight, o, o + 1, taps)
        transform_taps(taps, G, 0, G.shape[0], half, U, o - u0)
