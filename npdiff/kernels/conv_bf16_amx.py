"""Version 3 of the bf16 convolution (conv_bf16.py): an implicit GEMM on AMX tiles, no unfolding.

Version 2 unfolds the image (im2col into bf16 pair words: 9x the image's bytes written, then read by
the GEMM). Here the image is converted once per call into bf16 pair words (one pass, about the image's
own bytes), and every B tile of the GEMM is one tileloadd straight from them (tileloadd takes any row
stride), so nothing is unfolded.

The GEMM is version 2's: C [C_out, pixels] = W [C_out, K] @ B [K, pixels], the output written in NCHW in
place, but with k ordered (tap, c_in) instead of (c_in, tap):
  A   the weight, packed once at load (pack_conv_taps): bf16 bits, C_out and C_in zero-padded to multiples
      of 32, stored by depth blocks of CHANNELS_PER_BLOCK input channels: block [C_out_pad, taps, block
      channels] after block, so one tap's channels are whole AMX steps of 32 k (an A tile: 16 output
      channels x 32 input channels of one tap) and one depth block's A tiles are one contiguous run
      (with the taps C_in_pad apart, rows 23 KB apart for C_in = 1280, the 1280-channel convs ran at
      ~60% of this layout's speed: every row of a tile on its own pages).
  B   the image's pair words, in one of two layouts (PixelLayout), pairs = C_in_pad / 2, a word =
      bf16(x[2p, ...]) | bf16(x[2p+1, ...]) << 16 (zero outside the image and past C_in):
      pair rows (_pair_rows) [H + 2ph, pairs, row_words]: one padded input row holds every pair's row,
        one after the other; the padded column c = i * sw + phase at word phase * phase_words + i (the
        columns of a stride-sw conv stored as sw phases, even columns then odd ones, so a strided
        row's taps are contiguous too). The B tile of tap (ky, kx), pairs p..p+15 and the 16 output
        pixels x0..x0+15 of output row y: rows p..p+15 of input row y*sh + ky from word
        (kx % sw) * phase_words + x0 + kx // sw, row_words apart: one tileloadd. A segment (16 pixels)
        never leaves its output row, so a row of 8 pixels fills half a tile.
      flat (_flat_planes) [kW, pairs, plane_words], for narrow stride-1 outputs (width < 64, not a multiple
        of 16): plane kx holds the padded image's rows shifted by kx and cut to the output's width, one
        after the other, so output pixels are consecutive words across rows: the B tile of tap (ky, kx)
        and the 16 consecutive output pixels q..q+15 (in the flat [Ho*Wo] order) is rows p..p+15 of plane
        kx from word q + ky * Wo. No part tiles at 8 or 20 pixels a row, for kW copies of the image
        (measured, 8x8 with 1280 channels: 694 GFLOP/s a core against 350 in pair rows).
      Row strides are an odd number of 64-byte lines, so a tile's 16 rows fall on 16 different L1 sets.
  C   float32 [C_out, Ho*Wo] of one image (the output itself): a 32 x 32 block is two 16-pixel segments
      times 32 output channels, 2 x 2 tiles in tmm0..tmm3 as in matmul_amx.py. Part segments (a row's
      end, a task's end) and the channels past C_out go through a 32 x 32 scratch.
Every operand starts on a 64-byte line (aligned_empty): the same conv ran at 626 or 1071 GFLOP/s a
core by where malloc had put the weight (a tile row across two lines loads both).

Loops per task (output rows of one image, TASK_PIXELS pixels): depth blocks (C_out x taps x 256 bf16 of
A, in L2), then blocks of 32 output channels (their A, 32 x taps x 256 bf16, stays in L1/L2 across the
segments), then pairs of segments (the B words, in L2), then taps, then steps of 16 pairs. The first
depth block starts from the bias (or zero), later ones add into the output. Measured on one core
(thread CPU time) at SD's 3x3 shapes: depth blocks of 256 channels 1.1-1.3 TFLOP/s at 32-512 px, ahead
of 64 (0.8-1.1) and 128; channel blocks outside the segments 5-25% ahead of inside; tasks of 128-1024
pixels within noise.

Every kernel size, stride and padding runs here, 1x1 included; conv_bf16.py sends convs with fewer than
16 input channels (whose k, padded to 32 per tap, would be mostly zeros) to version 2.
"""

import numpy as np

from npdiff.jit import SERIAL, njit
from npdiff.kernels.amx_intrinsics import tile_config, tile_dpbf16ps, tile_load, tile_release, tile_store, tile_zero
from npdiff.kernels.bf16_rounding import pair_word
from npdiff.kernels.block_pool import run_blocks, split_evenly, worker_count
from npdiff.kernels.matmul_amx import BLOCK, START_FROM_C, START_FROM_INIT, START_ZERO, TILE, TILE_CONFIG
from npdiff.kernels.scratch import scratch
from npdiff.kernels.validate import output_size

CHANNELS_PER_BLOCK = 256  # input channels per depth block (a multiple of 32; measured below)
TASK_PIXELS = 256  # output pixels per task (whole output rows, at least one)
FLAT_BELOW_WIDTH = 64  # stride-1 outputs narrower than this, not a multiple of 16, take the flat layout
LINE_BYTES = 64  # a cache line, and a tile row
LINE_WORDS = LINE_BYTES // 4  # uint32 words in a line (and pixels in a tile row)


def aligned_empty(shape, dtype):
    """np.empty(shape, dtype) starting on a 64-byte line: a tile row that is one line then loads one line,
    not two (measured: the same conv at 626 or 1071 GFLOP/s on one core, by where malloc put the weight)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + LINE_BYTES, np.uint8)
    skip = -raw.ctypes.data % LINE_BYTES
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


def pack_conv_taps(bits, channels_per_block=CHANNELS_PER_BLOCK):
    """bits [C_out, C_in, kH, kW] uint16 (bf16) -> [C_out_pad, kH*kW*C_in_pad] uint16, C_out and C_in
    zero-padded to multiples of 32, stored by depth blocks of `channels_per_block` input channels (the
    last one narrower): block b, channels c0 .. c0+n, is [C_out_pad, taps, n] at flat offset
    C_out_pad*taps*c0, so the A tiles of one depth block read one contiguous run (the header)."""
    c_out, c_in, kh, kw = bits.shape
    taps = kh * kw
    c_in_pad = -(-c_in // BLOCK) * BLOCK
    c_out_pad = -(-c_out // BLOCK) * BLOCK
    by_tap = np.zeros((c_out_pad, taps, c_in_pad), np.uint16)  # [C_out_pad, taps, C_in_pad]
    by_tap[:c_out, :, :c_in] = bits.transpose(0, 2, 3, 1).reshape(c_out, taps, c_in)  # [C_out,C_in,kH,kW] -> taps
    packed = aligned_empty(c_out_pad * taps * c_in_pad, np.uint16)
    for c0 in range(0, c_in_pad, channels_per_block):
        c1 = min(c_in_pad, c0 + channels_per_block)
        block = packed[c_out_pad * taps * c0:c_out_pad * taps * c1].reshape(c_out_pad, taps, c1 - c0)
        block[:] = by_tap[:, :, c0:c1]  # [C_out_pad, taps, block channels]
    return packed.reshape(c_out_pad, taps * c_in_pad)


def unpack_conv_taps(packed, shape, channels_per_block):
    """The inverse of pack_conv_taps: -> the bf16 bits [C_out, C_in, kH, kW] uint16."""
    c_out, c_in, kh, kw = shape
    c_out_pad, taps = packed.shape[0], kh * kw
    c_in_pad = packed.shape[1] // taps
    flat = packed.reshape(-1)
    by_tap = np.empty((c_out_pad, taps, c_in_pad), np.uint16)  # [C_out_pad, taps, C_in_pad]
    for c0 in range(0, c_in_pad, channels_per_block):
        c1 = min(c_in_pad, c0 + channels_per_block)
        by_tap[:, :, c0:c1] = flat[c_out_pad * taps * c0:c_out_pad * taps * c1].reshape(c_out_pad, taps, c1 - c0)
    return by_tap[:c_out, :, :c_in].reshape(c_out, kh, kw, c_in).transpose(0, 3, 1, 2)  # -> [C_out,C_in,kH,kW]


class PixelLayout:
    """Where the B words of one image lie (the header's two layouts), and how its kernel finds them.

    flat        True: the flat layout [kW, pairs, plane_words]; False: pair rows [Hp, pairs, row_words]
    shape       the words array of one image
    pair_words  words between pair p and p+1 (a B tile's row stride, in words)
    tap_words   [taps] int64: the word of tap (ky, kx), relative to its segment's word of tap (0, 0)
    y_words     pair rows: words between the first words of two output rows (sh input rows)
    phase_words pair rows: words of one column phase
    """

    def __init__(self, x_shape, kernel_shape, sh, sw, ph, pw):
        _, c_in, height, width = x_shape
        kh, kw = kernel_shape[2:]
        h_out, w_out = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
        pairs = -(-c_in // BLOCK) * TILE  # C_in_pad / 2
        self.flat = sh == 1 and sw == 1 and w_out % TILE != 0 and w_out < FLAT_BELOW_WIDTH
        taps = np.arange(kh * kw, dtype=np.int64)
        ky, kx = taps // kw, taps % kw
        if self.flat:  # the last segment reads up to 2 tiles' words past the last pixel
            self.pair_words = _odd_lines((height + 2 * ph) * w_out + 2 * TILE)
            self.shape = (kw, pairs, self.pair_words)
            self.tap_words = kx * pairs * self.pair_words + ky * w_out
            self.y_words, self.phase_words = w_out, 0
        else:  # every padded column of a phase, and every column a 16-pixel segment reads
            padded_columns = -(-(width + 2 * pw) // sw)
            self.phase_words = max(padded_columns, -(-w_out // TILE) * TILE + (kw - 1) // sw)
            self.pair_words = _odd_lines(sw * self.phase_words)
            self.shape = (height + 2 * ph, pairs, self.pair_words)
            self.tap_words = ky * pairs * self.pair_words + (kx % sw) * self.phase_words + kx // sw
            self.y_words = sh * pairs * self.pair_words


def _odd_lines(words):
    """words rounded up to an odd number of 64-byte lines: 16 tile rows that far apart fall on 16
    different L1 sets."""
    lines = -(-words // LINE_WORDS)
    return (lines + 1 - lines % 2) * LINE_WORDS


@njit(**SERIAL)
def _pair_rows(image, p0, p1, ph, pw, sw, phase_words, rows_out):
    """Pairs p0 .. p1-1 of image [C_in, H, W] float32 -> rows_out [Hp, pairs, row_words] uint32 (the
    header's pair rows), every word written: zeros for the border, the channels past C_in, the odd
    channel's missing partner and the words past each phase."""
    c_in, height, width = image.shape
    padded_row = np.zeros((width + 2 * pw + 1) // 2 * 2, np.uint32)  # strided convs: one row's words, zero border
    padded_row_64 = padded_row.view(np.uint64)  # little-endian: word 2i in the low half, 2i+1 in the high
    for r in range(rows_out.shape[0]):
        y = r - ph
        for p in range(p0, p1):
            words = rows_out[r, p]  # [row_words]
            words[:] = 0
            if y < 0 or y >= height or 2 * p >= c_in:
                continue
            low = image[2 * p, y]  # [W]
            high = image[2 * p + 1, y] if 2 * p + 1 < c_in else low
            keep_high = np.uint32(0xFFFFFFFF) if 2 * p + 1 < c_in else np.uint32(0xFFFF)
            if sw == 1:  # contiguous: a vectorised loop
                out = words[pw:pw + width]
                for x in range(width):
                    out[x] = pair_word(low[x], high[x]) & keep_high
            else:  # the words of the padded row in order (vectorised), then each phase's columns
                for x in range(width):
                    padded_row[pw + x] = pair_word(low[x], high[x]) & keep_high
                if sw == 2:  # a vectorised split: each 64-bit pair of words is (even column, odd column)
                    even, odd = words[:phase_words], words[phase_words:2 * phase_words]
                    for i in range(min(phase_words, padded_row.size // 2)):
                        both = padded_row_64[i]
                        even[i] = np.uint32(both & np.uint64(0xFFFFFFFF))
                        odd[i] = np.uint32(both >> np.uint64(32))
                    continue
                for phase in range(sw):
                    out = words[phase * phase_words:(phase + 1) * phase_words]
                    for i in range(min(phase_words, (width + 2 * pw - phase + sw - 1) // sw)):
                        out[i] = padded_row[i * sw + phase]


@njit(**SERIAL)
def _flat_planes(image, p0, p1, ph, pw, w_out, planes):
    """Pairs p0 .. p1-1 of image [C_in, H, W] float32 -> planes [kW, pairs, plane_words] uint32 (the
    header's flat layout): word (kx, p, r * Wo + x) = the pair of padded row r, padded column x + kx;
    every word written (zeros outside the image, past C_in, past the planes' Hp * Wo words)."""
    c_in, height, width = image.shape
    kw = planes.shape[0]
    padded_height = height + 2 * ph
    for kx in range(kw):
        for p in range(p0, p1):
            words = planes[kx, p]  # [plane_words]
            words[:] = 0
            if 2 * p >= c_in:
                continue
            keep_high = np.uint32(0xFFFFFFFF) if 2 * p + 1 < c_in else np.uint32(0xFFFF)
            high_channel = 2 * p + 1 if 2 * p + 1 < c_in else 2 * p
            for r in range(ph, min(padded_height, height + ph)):
                low, high = image[2 * p, r - ph], image[high_channel, r - ph]  # [W] each
                first = max(0, pw - kx)  # output columns whose padded column x + kx is inside the image
                last = min(w_out, width + pw - kx)
                for x in range(first, last):
                    words[r * w_out + x] = pair_word(low[x + kx - pw], high[x + kx - pw]) & keep_high


@njit(**SERIAL)
def _segment(s, flat, row0, rows, w_out, y_words):
    """Segment s of a task (16 output pixels): (its flat index in C [Ho*Wo], its valid pixels, its word
    of tap (0, 0), pair 0). Flat layout: 16 consecutive pixels (rows run on); pair rows: 16 pixels of
    one output row."""
    if flat:
        first = row0 * w_out + s * TILE
        return first, min(TILE, (row0 + rows) * w_out - first), first
    per_row = (w_out + TILE - 1) // TILE
    y, x = row0 + s // per_row, (s % per_row) * TILE
    return y * w_out + x, min(TILE, w_out - x), y * y_words + x


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
def _load_c_tiles(array, first0, first1, half_step, stride):
    """tmm0..tmm3 <- a C block of `array` (flat indices): tmm0/tmm1 the 16 rows from first0/first1,
    tmm2/tmm3 those from half_step elements further; rows `stride` bytes apart."""
    tile_load(0, array, first0, stride)
    tile_load(1, array, first1, stride)
    tile_load(2, array, first0 + half_step, stride)
    tile_load(3, array, first1 + half_step, stride)


@njit(**SERIAL)
def _store_c_tiles(array, first0, first1, half_step, stride):
    """The inverse of _load_c_tiles: tmm0..tmm3 -> array."""
    tile_store(0, array, first0, stride)
    tile_store(1, array, first1, stride)
    tile_store(2, array, first0 + half_step, stride)
    tile_store(3, array, first1 + half_step, stride)


@njit(**SERIAL)
def implicit_gemm_rows(weight, taps, words, pair_words, tap_words, flat, y_words, row0, rows, w_out, out, start,
                       bias_rows, pairs_per_block, edge):
    """Output rows row0 .. row0+rows-1 of one image: out [C_out, Ho*Wo] (+)= the conv, on this thread's
    tiles. weight: pack_conv_taps's [C_out_pad, taps*C_in_pad] in depth blocks of 2*pairs_per_block
    channels; words: the image's B words (PixelLayout: pair_words, tap_words, flat, y_words);
    start: START_ZERO or START_FROM_INIT (bias_rows [C_out_pad, 16], each channel's bias in 16 columns)
    for the first depth block (later ones add); edge: a [32, 32] float32 scratch."""
    c_out, ldc = out.shape[0], out.shape[1]
    c_flat = out.reshape(c_out * ldc)  # [C_out*Ho*Wo]: tiles address C by flat index
    b_flat = words.reshape(words.size)
    weight_flat = weight.reshape(weight.size)  # depth blocks one after the other (pack_conv_taps)
    c_out_pad, pairs = weight.shape[0], weight.shape[1] // taps // 2
    b_stride, c_stride = pair_words * 4, ldc * 4  # bytes between tile rows
    segments = (rows * w_out + TILE - 1) // TILE if flat else rows * ((w_out + TILE - 1) // TILE)
    tile_config(TILE_CONFIG)
    for p0 in range(0, pairs, pairs_per_block):
        p1 = min(pairs, p0 + pairs_per_block)
        block_start = start if p0 == 0 else START_FROM_C
        a_width = taps * 2 * (p1 - p0)  # k of this depth block, [C_out_pad, taps, 2*(p1-p0)] from a_block
        a_block, a_stride = c_out_pad * taps * 2 * p0, a_width * 2
        for row in range(0, c_out, BLOCK):  # the block's 32 output channels: A stays in L1 over the segments
            channels = min(BLOCK, c_out - row)
            for s in range(0, segments, 2):
                # 1. the block's two segments (a lone last one pairs with itself and is not stored)
                c0, valid0, b0 = _segment(s, flat, row0, rows, w_out, y_words)
                c1, valid1, b1 = _segment(min(s + 1, segments - 1), flat, row0, rows, w_out, y_words)
                valid1 = valid1 if s + 1 < segments else 0
                c0, c1 = c0 + row * ldc, c1 + row * ldc  # flat index in C of channel `row`
                b0, b1 = b0 + p0 * pair_words, b1 + p0 * pair_words
                full = channels == BLOCK and valid0 == TILE and valid1 == TILE
                # 2. the C block into tmm0..tmm3 (tmm0/1: channels 0-15 of segments 0/1; tmm2/3: 16-31)
                if block_start == START_ZERO:
                    tile_zero(0)
                    tile_zero(1)
                    tile_zero(2)
                    tile_zero(3)
                elif block_start == START_FROM_INIT:  # each channel's bias, the same for both segments
                    _load_c_tiles(bias_rows, row * TILE, row * TILE, TILE * TILE, TILE * 4)
                elif full:
                    _load_c_tiles(c_flat, c0, c1, TILE * ldc, c_stride)
                else:
                    _edge_in(c_flat, c0, ldc, channels, valid0, c1, valid1, edge)
                    _load_c_tiles(edge, 0, TILE, TILE * BLOCK, BLOCK * 4)
                # 3. every tap, every 16 pairs: two A tiles, two B tiles (one tileloadd each), four products
                a_first = a_block + row * a_width
                for tap in range(taps):
                    for p in range(p0, p1, TILE):
                        b_offset = tap_words[tap] + (p - p0) * pair_words
                        tile_load(4, weight_flat, a_first, a_stride)  # channels 0-15, 32 k
                        tile_load(5, weight_flat, a_first + TILE * a_width, a_stride)  # channels 16-31
                        tile_load(6, b_flat, b0 + b_offset, b_stride)  # segment 0: 16 pairs x 16 pixels
                        tile_load(7, b_flat, b1 + b_offset, b_stride)  # segment 1
                        tile_dpbf16ps(0, 4, 6)
                        tile_dpbf16ps(1, 4, 7)
                        tile_dpbf16ps(2, 5, 6)
                        tile_dpbf16ps(3, 5, 7)
                        a_first += BLOCK
                # 4. the C block back
                if full:
                    _store_c_tiles(c_flat, c0, c1, TILE * ldc, c_stride)
                else:
                    _store_c_tiles(edge, 0, TILE, TILE * BLOCK, BLOCK * 4)
                    _edge_out(edge, c_flat, c0, ldc, channels, valid0, c1, valid1)
    tile_release()


def conv2d_bf16_implicit(x, weight_taps, kernel_shape, channels_per_block, bias, sh, sw, ph, pw):
    """x [B,C_in,H,W] float32 (C-contiguous), weight_taps from pack_conv_taps(bits, channels_per_block) for
    a [C_out,C_in,kH,kW] weight (kernel_shape), bias [C_out] float32 or None -> [B,C_out,Ho,Wo] float32."""
    batch, _, height, width = x.shape
    c_out, _, kh, kw = kernel_shape
    h_out, w_out = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    layout = PixelLayout(x.shape, kernel_shape, sh, sw, ph, pw)
    # 1. every image's B words, in spans of pairs over the pool
    words = aligned_empty((batch, *layout.shape), np.uint32)  # [B, *layout.shape]
    pairs = layout.shape[1]
    pair_spans = split_evenly(pairs, -(-pairs // worker_count()), batch, worker_count())

    def convert(task):
        b, (p0, p1) = task
        if layout.flat:
            _flat_planes(x[b], p0, p1, ph, pw, w_out, words[b])
        else:
            _pair_rows(x[b], p0, p1, ph, pw, sw, layout.phase_words, words[b])

    run_blocks(convert, [(b, span) for b in range(batch) for span in pair_spans])
    # 2. the implicit GEMM, in tasks of whole output rows of one image
    out = aligned_empty((batch, c_out, h_out * w_out), np.float32)  # [B,C_out,Ho*Wo]
    bias_rows = aligned_empty((weight_taps.shape[0], TILE), np.float32)  # [C_out_pad, 16]: AMX's start
    bias_rows[:] = 0.0
    if bias is not None:
        bias_rows[:c_out] = bias[:, None]  # each output channel's bias across a tile's 16 columns
    start = START_ZERO if bias is None else START_FROM_INIT

    def run_task(task):
        b, (row0, row1) = task
        implicit_gemm_rows(weight_taps, kh * kw, words[b], layout.pair_words, layout.tap_words, layout.flat,
                           layout.y_words, row0, row1 - row0, w_out, out[b], start, bias_rows, channels_per_block // 2,
                           scratch("amx edge", (BLOCK, BLOCK)))

    spans = split_evenly(h_out, max(1, TASK_PIXELS // w_out), batch, worker_count())
    run_blocks(run_task, [(b, span) for b in range(batch) for span in spans])
    return out.reshape(batch, c_out, h_out, w_out)  # [B,C_out,Ho*Wo] -> [B,C_out,Ho,Wo]
