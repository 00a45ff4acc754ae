"""Version 3 of the bf16 convolution (conv_bf16.py): an implicit GEMM on AMX tiles, no unfolding.

Version 2 unfolds the image (im2col into bf16 pair words: 9x the image's bytes written, then read by
the GEMM). Here the image is converted once per call into bf16 "pair rows", and every B tile of the
GEMM is one tileloadd straight from them (tileloadd takes any row stride), so nothing is unfolded.

The GEMM is version 2's: C [C_out, pixels] = W [C_out, K] @ B [K, pixels], the output written in NCHW in
place, but with k ordered (tap, c_in) instead of (c_in, tap):
  A   the weight, packed once at load (pack_conv_taps): bf16 bits [C_out (padded to 32), taps, C_in
      (padded to 32)] uint16 as rows of taps*C_in_pad k, so one tap's channels are whole AMX steps of
      32 k (an A tile: 16 output channels x 32 input channels of one tap).
  B   the pair rows (_pair_rows): [H + 2*ph, pairs, row_words] uint32 per image, pairs = C_in_pad/2,
      word (r, p, phase * phase_words + i) = bf16(x[2p, r - ph, c - pw]) | bf16(x[2p+1, ...]) << 16 for the
      padded column c = i * sw + phase (zero outside the image, and for the channels past C_in). One
      padded input row holds every pair's row of words, one after the other: the B tile of tap (ky, kx),
      pairs p..p+15 and the 16 output pixels x0..x0+15 of output row y is the 16 rows p..p+15 of input row
      y*sh + ky from word (kx % sw) * phase_words + x0 + kx // sw, `row_words` words apart: one tileloadd.
      With stride sw the columns are stored as sw phases (even columns, then odd ones), so a strided
      row is contiguous too. row_words is an odd number of 64-byte lines, so a tile's 16 rows fall on
      different L1 sets.
  C   float32 [C_out, Ho*Wo] of one image (the output itself): a 32 x 32 block is two 16-pixel segments
      (16 output pixels of one output row each; the next segment may start the next row) times 32 output
      channels, 2 x 2 tiles in tmm0..tmm3 as in matmul_amx.py. Segments past the row's end (widths not a
      multiple of 16) and the channels past C_out go through a 32 x 32 scratch.
Loops per task (output rows of one image): depth blocks of PAIRS_PER_BLOCK pairs (the weight's block,
C_out x taps x 2*PAIRS_PER_BLOCK bf16, stays in L2 across the task), then pairs of segments, then blocks
of 32 output channels (the segments' B tiles, taps x 2 KiB per 16 pairs, are read again from L1 by every
channel block), then taps, then steps of 16 pairs. The first depth block starts from the bias (or zero),
later ones add into the output.

Every kernel size and stride runs here; conv_bf16.py sends 1x1 convs (no taps to gather: version 2's
pointwise path reads the image's rows as they lie) and convs with fewer than 16 input channels (whose
k, padded to 32 per tap, would be mostly zeros) to version 2.
"""

import numpy as np

from npdiff.jit import SERIAL, njit
from npdiff.kernels.amx_intrinsics import tile_config, tile_dpbf16ps, tile_load, tile_release, tile_store, tile_zero
from npdiff.kernels.bf16_rounding import pair_word
from npdiff.kernels.block_pool import run_blocks, split_evenly, worker_count
from npdiff.kernels.matmul_amx import BLOCK, START_FROM_C, START_FROM_INIT, START_ZERO, TILE, TILE_CONFIG
from npdiff.kernels.scratch import scratch
from npdiff.kernels.validate import output_size

PAIRS_PER_BLOCK = 32  # channel pairs per depth block (64 channels: 9 taps x 64 = 576 k for a 3x3 conv)
TASK_PIXELS = 256  # output pixels per task (whole output rows, at least one)
LINE_WORDS = 16  # uint32 words in a 64-byte cache line (and pixels in a tile row)


def pack_conv_taps(bits):
    """bits [C_out, C_in, kH, kW] uint16 (bf16) -> [C_out_pad, kH*kW*C_in_pad] uint16: each output
    channel's k ordered (tap, c_in), C_out and C_in zero-padded to multiples of 32 (the A tiles)."""
    c_out, c_in, kh, kw = bits.shape
    c_in_pad = -(-c_in // BLOCK) * BLOCK
    packed = np.zeros((-(-c_out // BLOCK) * BLOCK, kh * kw, c_in_pad), np.uint16)  # [C_out_pad, taps, C_in_pad]
    packed[:c_out, :, :c_in] = bits.transpose(0, 2, 3, 1).reshape(c_out, kh * kw, c_in)  # [C_out,C_in,kH,kW] -> taps
    return packed.reshape(packed.shape[0], kh * kw * c_in_pad)


def pair_rows_geometry(width, kw, sw, pw, w_out):
    """(phase_words, row_words) of the pair rows: each of the sw column phases holds every padded column
    of its phase and every column a 16-pixel segment reads (its last segment may run past the row);
    row_words, the sw phases rounded to an odd number of 64-byte lines."""
    segments = -(-w_out // TILE)
    padded_columns = -(-(width + 2 * pw) // sw)  # columns of one phase
    phase_words = max(padded_columns, segments * TILE + (kw - 1) // sw)
    lines = -(-(sw * phase_words) // LINE_WORDS)
    lines += 1 - lines % 2  # odd: 16 rows that far apart fall on 16 different L1 sets
    return phase_words, lines * LINE_WORDS


@njit(**SERIAL)
def _pair_rows(image, row0, row1, ph, pw, sw, phase_words, rows_out):
    """Padded rows row0 .. row1-1 of image [C_in, H, W] float32 -> rows_out [Hp, pairs, row_words] uint32
    (the header's B layout), every word written: zeros for the border, the channels past C_in, the odd
    channel's missing partner and the words past each phase."""
    c_in, height, width = image.shape
    pairs = rows_out.shape[1]
    for r in range(row0, row1):
        y = r - ph
        for p in range(pairs):
            words = rows_out[r, p]  # [row_words]
            words[:] = 0
            if y < 0 or y >= height or 2 * p >= c_in:
                continue
            low = image[2 * p, y]  # [W]
            high = image[2 * p + 1, y] if 2 * p + 1 < c_in else image[2 * p, y]
            keep_high = np.uint32(0xFFFFFFFF) if 2 * p + 1 < c_in else np.uint32(0xFFFF)
            if sw == 1:  # contiguous: a vectorised loop
                out = words[pw:pw + width]
                for x in range(width):
                    out[x] = pair_word(low[x], high[x]) & keep_high
            else:
                for x in range(width):
                    column = x + pw
                    words[(column % sw) * phase_words + column // sw] = pair_word(low[x], high[x]) & keep_high


@njit(**SERIAL)
def _edge_in(c, c_first, ldc, channels, valid0, first1, valid1, edge):
    """The valid part of a C block into edge [32, 32] (zeros around): segment 0 (valid0 pixels from
    flat c index c_first) in columns 0-15, segment 1 (valid1 from first1) in columns 16-31."""
    edge[:] = 0.0
    for i in range(channels):
        for j in range(valid0):
            edge[i, j] = c[c_first + i * ldc + j]
        for j in range(valid1):
            edge[i, TILE + j] = c[first1 + i * ldc + j]


@njit(**SERIAL)
def _edge_out(edge, c, c_first, ldc, channels, valid0, first1, valid1):
    """The inverse of _edge_in: the valid part of edge back into c."""
    for i in range(channels):
        for j in range(valid0):
            c[c_first + i * ldc + j] = edge[i, j]
        for j in range(valid1):
            c[first1 + i * ldc + j] = edge[i, TILE + j]


@njit(**SERIAL)
def implicit_gemm_rows(weight, taps_shape, rows_in, phase_words, sh, sw, row0, rows, w_out, out, start, bias_rows,
                       pairs_per_block, edge):
    """Output rows row0 .. row0+rows-1 of one image: out [C_out, Ho*Wo] (flat) (+)= the conv, on this
    thread's tiles. weight: pack_conv_taps's [C_out_pad, taps*C_in_pad]; taps_shape (kH, kW);
    rows_in: _pair_rows's [Hp, pairs, row_words]; start: START_ZERO / START_FROM_INIT (bias_rows
    [C_out_pad, 16], each channel's bias in 16 columns) for the first depth block (later ones add);
    edge: a [32, 32] float32 scratch."""
    kh, kw = taps_shape
    c_out, ldc = out.shape[0], out.shape[1]
    c_flat = out.reshape(c_out * ldc)  # tile_load/store address C by flat index
    pairs, row_words = rows_in.shape[1], rows_in.shape[2]
    in_row_words = pairs * row_words  # words between padded input rows
    a_width = weight.shape[1]
    c_in_pad = a_width // (kh * kw)
    a_stride, b_stride, c_stride = a_width * 2, row_words * 4, ldc * 4  # bytes between tile rows
    segments_per_row = (w_out + TILE - 1) // TILE
    segments = rows * segments_per_row
    tile_config(TILE_CONFIG)
    for p0 in range(0, pairs, pairs_per_block):
        p1 = min(pairs, p0 + pairs_per_block)
        block_start = start if p0 == 0 else START_FROM_C
        for s in range(0, segments, 2):
            # 1. the two segments: output row, first pixel, valid pixels, flat index in C; the word of
            #    tap (0, 0), pair p0 in the pair rows (a lone last segment pairs with itself, not stored)
            s1 = s + 1 if s + 1 < segments else s
            y0, x0 = row0 + s // segments_per_row, (s % segments_per_row) * TILE
            y1, x1 = row0 + s1 // segments_per_row, (s1 % segments_per_row) * TILE
            valid0 = min(TILE, w_out - x0)
            valid1 = min(TILE, w_out - x1) if s1 != s else 0
            first0, first1 = y0 * w_out + x0, y1 * w_out + x1
            b0 = y0 * sh * in_row_words + p0 * row_words + x0
            b1 = y1 * sh * in_row_words + p0 * row_words + x1
            for row in range(0, c_out, BLOCK):
                channels = min(BLOCK, c_out - row)
                full = channels == BLOCK and valid0 == TILE and valid1 == TILE
                c0 = row * ldc + first0  # flat index of channel `row`, segment 0
                c1 = row * ldc + first1
                # 2. the C block into tmm0..tmm3 (tmm0/1: channels 0-15 of segments 0/1; tmm2/3: 16-31)
                if block_start == START_ZERO:
                    tile_zero(0)
                    tile_zero(1)
                    tile_zero(2)
                    tile_zero(3)
                elif block_start == START_FROM_INIT:
                    tile_load(0, bias_rows, row * TILE, TILE * 4)
                    tile_load(1, bias_rows, row * TILE, TILE * 4)
                    tile_load(2, bias_rows, (row + TILE) * TILE, TILE * 4)
                    tile_load(3, bias_rows, (row + TILE) * TILE, TILE * 4)
                elif full:
                    tile_load(0, c_flat, c0, c_stride)
                    tile_load(1, c_flat, c1, c_stride)
                    tile_load(2, c_flat, c0 + TILE * ldc, c_stride)
                    tile_load(3, c_flat, c1 + TILE * ldc, c_stride)
                else:
                    _edge_in(c_flat, c0, ldc, channels, valid0, c1, valid1, edge)
                    tile_load(0, edge, 0, BLOCK * 4)
                    tile_load(1, edge, TILE, BLOCK * 4)
                    tile_load(2, edge, TILE * BLOCK, BLOCK * 4)
                    tile_load(3, edge, TILE * BLOCK + TILE, BLOCK * 4)
                # 3. every tap, every 16 pairs: two A tiles, two B tiles (one tileloadd each), four products
                for tap in range(kh * kw):
                    ky, kx = tap // kw, tap % kw
                    tap_words = ky * in_row_words + (kx % sw) * phase_words + kx // sw
                    a_first = row * a_width + tap * c_in_pad + 2 * p0
                    for p in range(p0, p1, TILE):
                        b_offset = (p - p0) * row_words + tap_words
                        tile_load(4, weight, a_first, a_stride)  # channels 0-15, 32 k
                        tile_load(5, weight, a_first + TILE * a_width, a_stride)  # channels 16-31
                        tile_load(6, rows_in, b0 + b_offset, b_stride)  # segment 0: 16 pairs x 16 pixels
                        tile_load(7, rows_in, b1 + b_offset, b_stride)  # segment 1
                        tile_dpbf16ps(0, 4, 6)
                        tile_dpbf16ps(1, 4, 7)
                        tile_dpbf16ps(2, 5, 6)
                        tile_dpbf16ps(3, 5, 7)
                        a_first += BLOCK
                # 4. the C block back
                if full:
                    tile_store(0, c_flat, c0, c_stride)
                    tile_store(1, c_flat, c1, c_stride)
                    tile_store(2, c_flat, c0 + TILE * ldc, c_stride)
                    tile_store(3, c_flat, c1 + TILE * ldc, c_stride)
                else:
                    tile_store(0, edge, 0, BLOCK * 4)
                    tile_store(1, edge, TILE, BLOCK * 4)
                    tile_store(2, edge, TILE * BLOCK, BLOCK * 4)
                    tile_store(3, edge, TILE * BLOCK + TILE, BLOCK * 4)
                    _edge_out(edge, c_flat, c0, ldc, channels, valid0, c1, valid1)
    tile_release()


def conv2d_bf16_implicit(x, weight_taps, kernel_shape, bias, sh, sw, ph, pw):
    """x [B,C_in,H,W] float32 (C-contiguous), weight_taps from pack_conv_taps for a [C_out,C_in,kH,kW]
    weight (kernel_shape), bias [C_out] float32 or None -> [B,C_out,Ho,Wo] float32."""
    batch, c_in, height, width = x.shape
    c_out, _, kh, kw = kernel_shape
    h_out, w_out = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    padded_height = height + 2 * ph
    pairs = weight_taps.shape[1] // (kh * kw) // 2
    phase_words, row_words = pair_rows_geometry(width, kw, sw, pw, w_out)
    # 1. the pair rows of every image, in row spans over the pool
    rows_in = np.empty((batch, padded_height, pairs, row_words), np.uint32)  # [B,Hp,pairs,row_words]
    spans = split_evenly(padded_height, -(-padded_height // worker_count()), batch, worker_count())

    def convert(task):
        b, (r0, r1) = task
        _pair_rows(x[b], r0, r1, ph, pw, sw, phase_words, rows_in[b])

    run_blocks(convert, [(b, span) for b in range(batch) for span in spans])
    # 2. the implicit GEMM, in tasks of whole output rows of one image
    out = np.empty((batch, c_out, h_out * w_out), np.float32)  # [B,C_out,Ho*Wo]
    bias_rows = np.zeros((weight_taps.shape[0], TILE), np.float32)  # [C_out_pad, 16]: AMX's start
    if bias is not None:
        bias_rows[:c_out] = bias[:, None]  # each output channel's bias across a tile's 16 columns
    start = START_ZERO if bias is None else START_FROM_INIT

    def run_task(task):
        b, (row0, row1) = task
        implicit_gemm_rows(weight_taps, (kh, kw), rows_in[b], phase_words, sh, sw, row0, row1 - row0, w_out, out[b],
                           start, bias_rows, PAIRS_PER_BLOCK, scratch("amx edge", (BLOCK, BLOCK)))

    spans = split_evenly(h_out, max(1, TASK_PIXELS // w_out), batch, worker_count())
    run_blocks(run_task, [(b, span) for b in range(batch) for span in spans])
    return out.reshape(batch, c_out, h_out, w_out)  # [B,C_out,Ho*Wo] -> [B,C_out,Ho,Wo]
