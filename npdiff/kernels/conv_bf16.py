"""2-D convolution in bfloat16: x and the weight rounded to bf16, products summed in float32 on AMX
tiles or AVX-512 BF16's vdpbf16ps (the GEMMs of matmul_bf16.py), the bias added in float32. NCHW, torch's
weight layout [C_out, C_in, kH, kW], as conv.py.

Versions:
  1. conv2d_bf16_ref    conv.py's conv2d_ref on the bf16-rounded x and weight (float32 GEMMs of
                        the rounded values: the same products, summed in another order). Where the
                        CPU has no AVX512_BF16 (or NPDIFF_NO_BF16=1), conv.py's fast conv2d runs on
                        the rounded values instead: the same numbers, float32 speed.
  2. the bf16 conv      the image unfolded by tiles (im2col, as conv.py's version 3), then the bf16
                        GEMM C [C_out, pixels] = W [C_out, K] @ cols [K, pixels], K = C_in*kH*kW,
        on AMX tiles (matmul_amx.py) where the CPU has them, else on the vdpbf16ps micro-kernel.
        The weight is A, packed once (pack_conv_bf16): for AMX its bf16 rows [C_out, K] as they
        are, for vdpbf16ps MR-row panels of pairs. The unfolded image is B: _unfold_pairs writes it
        straight from the zero-padded image as [pixels/NR, pairs, NR] words of bf16 pairs (both
        kernels read that; no float32 cols are made), so a row of C runs along the pixels of one
        output channel, NCHW's own order: the GEMM writes the output in place. On AMX the first
        depth block starts from the bias (no pass to add it).
        Depth blocks are whole channels, a multiple of 32 of them (64 for 3x3: 576 k; 576 for 1x1),
        so a block's depth is whole 32-k AMX steps. 1x1 stride-1 convs skip the unfolding (the
        image's [C_in, H*W] rows are the B operand as they lie: _pack_pixel_pairs).
  Per tile of TILE_PIXELS output pixels of one image (the words of one depth block, 576 x 256 x 2 =
  288 KiB, stay in L2 beside the weight's depth block), tiles spread over the block pool; every
  depth block after the first adds into the output tile.
  3. the implicit GEMM on AMX (conv_bf16_amx.py): no unfolding; the image converted once into bf16 pair
        rows, each B tile one tileloadd straight from them, the weight packed per tap ("amx_taps").
        Every AMX conv with at least IMPLICIT_MIN_C_IN input channels (fewer: their k, padded to 32
        per tap, would be mostly zeros), any kernel size, stride and padding; 1x1 convs too (measured
        0.38-0.93x version 2's pointwise path's time at SD's shortcut shapes: the pair conversion
        beats the per-tile packing). pack_conv_bf16(weight, implicit=False) keeps version 2.
"""

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.intrinsics import bits_float32
from npdiff.jit import SERIAL, njit
from npdiff.kernels.bf16_rounding import (
    PackedBf16,
    bf16_bits,
    bf16_kernel,
    bf16_to_float32,
    pair_word,
    rounded_to_bf16,
)
from npdiff.kernels.block_pool import run_blocks, split_evenly, worker_count
from npdiff.kernels.conv import check_conv2d, conv2d, conv2d_ref, pad_image
from npdiff.kernels.conv_bf16_amx import CHANNELS_PER_BLOCK, conv2d_bf16_implicit, pack_conv_taps, unpack_conv_taps
from npdiff.kernels.matmul_amx import (
    BLOCK,
    START_FROM_C,
    START_FROM_INIT,
    START_ZERO,
    TILE,
    TILE_CONFIG,
    amx_gemm_block,
)
from npdiff.kernels.matmul_bf16 import _weight_bits
from npdiff.kernels.matmul_dpbf16 import MR, NR, gemm_packed_block
from npdiff.kernels.scratch import scratch
from npdiff.kernels.validate import output_size, shape_text

# Measured on AMX (thread CPU time, one core, 3x3 convs of the UNet at 64 and 32 px): 256 pixels and
# 576-deep blocks 358-366 GFLOP/s; 512 pixels and 288-deep blocks 279-288; 512 and 576: 293-296.
TILE_PIXELS = 256  # output pixels per tile (whole output rows, at least one)
BLOCK_DEPTH = 576  # k per depth block (rounded to whole channels, a multiple of 32)
IMPLICIT_MIN_C_IN = 16  # input channels from which a conv on AMX takes version 3


class PackedBf16Conv(PackedBf16):
    """A conv weight [C_out, C_in, kH, kW] rounded to bf16 once, in the layout its GEMM reads.

    layout "amx": `data` is the weight's bf16 bits [C_out, K = C_in*kH*kW] uint16, zero-padded to
    multiples of 32 (the A tiles of matmul_amx.py).
    layout "amx_taps": version 3's weight (conv_bf16_amx.pack_conv_taps): k ordered (tap, C_in), in
    depth blocks of `channels_per_block` input channels.
    layout "dpbf16": `data` is [K blocks, C_out/MR, block pairs, MR] uint32 words (vdpbf16ps's A panels).
    layout "float32": `data` is the rounded weight as float32 (CPUs without AVX512_BF16).
    The depth blocks are `channels_per_block` input channels each (see the header).
    """

    def __init__(self, data, shape, layout, channels_per_block):
        super().__init__(data, shape, layout)  # shape (C_out, C_in, kH, kW)
        self.channels_per_block = channels_per_block

    def to_float32(self):
        """The bf16-rounded weight [C_out, C_in, kH, kW] as float32."""
        if self.layout == "float32":
            return self.data
        c_out, c_in, kh, kw = self.shape
        if self.layout == "amx":
            return bf16_to_float32(self.data[:c_out, :c_in * kh * kw]).reshape(self.shape)
        if self.layout == "amx_taps":
            return bf16_to_float32(unpack_conv_taps(self.data, self.shape, self.channels_per_block))
        out = np.empty((c_out, c_in * kh * kw), np.float32)  # [C_out, K]
        _unpack_weight(self.data, self.channels_per_block * kh * kw, out)
        return out.reshape(self.shape)


def pack_conv_bf16(weight, implicit=True):
    """weight [C_out, C_in, kH, kW] (float32, or uint16 bf16 bits) -> PackedBf16Conv. implicit=False: on
    AMX, version 2's layout even where version 3 would run (to compare the two)."""
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise NpdiffError(f"pack_conv_bf16: weight must be 4-D [C_out,C_in,kH,kW], got shape "
                          f"{shape_text(weight.shape)}")
    bits = _weight_bits(weight, "pack_conv_bf16")  # [C_out, C_in, kH, kW] uint16
    c_out, c_in, kh, kw = weight.shape
    channels_per_block = BLOCK * max(1, BLOCK_DEPTH // (BLOCK * kh * kw))  # depth: a multiple of 32
    kernel = bf16_kernel()
    if kernel == "float32":
        return PackedBf16Conv(bf16_to_float32(bits), weight.shape, "float32", channels_per_block)
    if kernel == "amx" and implicit and c_in >= IMPLICIT_MIN_C_IN:
        taps = pack_conv_taps(bits, CHANNELS_PER_BLOCK)  # [C_out_pad, taps*C_in_pad] in depth blocks
        return PackedBf16Conv(taps, weight.shape, "amx_taps", CHANNELS_PER_BLOCK)
    rows = np.ascontiguousarray(bits).reshape(c_out, c_in * kh * kw)  # [C_out, K]
    if kernel == "amx":
        padded = np.zeros((-(-c_out // BLOCK) * BLOCK, -(-rows.shape[1] // BLOCK) * BLOCK), np.uint16)
        padded[:c_out, :rows.shape[1]] = rows  # [C_out, K] -> zero-padded to multiples of 32
        return PackedBf16Conv(padded, weight.shape, "amx", channels_per_block)
    block_depth = channels_per_block * kh * kw
    blocks = -(-c_in // channels_per_block)
    packed = np.zeros((blocks, -(-c_out // MR), (block_depth + 1) // 2, MR), np.uint32)
    _pack_weight(rows, block_depth, packed)
    return PackedBf16Conv(packed, weight.shape, "dpbf16", channels_per_block)


@njit(**SERIAL)
def _pack_weight(rows, block_depth, packed):
    """rows [C_out, K] uint16 -> packed [K blocks, C_out/MR, pairs, MR]: word (block, panel, p, r) =
    W[o, k] | W[o, k+1] << 16, o = panel*MR + r, k = block*block_depth + 2p (zero past the block)."""
    c_out, depth = rows.shape
    for o in range(c_out):
        for k in range(depth):
            block = k // block_depth
            within = k - block * block_depth
            shift = np.uint32(16) if within % 2 else np.uint32(0)
            packed[block, o // MR, within // 2, o % MR] |= np.uint32(rows[o, k]) << shift


@njit(**SERIAL)
def _unpack_weight(packed, block_depth, out):
    """The inverse of _pack_weight, widened to float32: out [C_out, K]."""
    c_out, depth = out.shape
    for o in range(c_out):
        for k in range(depth):
            block = k // block_depth
            within = k - block * block_depth
            word = packed[block, o // MR, within // 2, o % MR]
            half = (word >> np.uint32(16)) if within % 2 else (word & np.uint32(0xFFFF))
            out[o, k] = bits_float32(np.uint32(half << np.uint32(16)))


@njit(**SERIAL)
def _pack_pixel_pairs(cols, b_block):
    """cols [depth, pixels] float32 (rows contiguous) -> b_block [pixels/NR, pairs, NR] words,
    rounded to bf16: word (panel, p, j) = bf16(cols[2p, q]) | bf16(cols[2p+1, q]) << 16,
    q = panel*NR + j. Pixels past the tile, an odd depth's missing partner and the pairs past the
    depth (b_block's padding to whole AMX tiles) are zero. The j loop reads two rows and writes one
    panel row, all contiguous."""
    depth, pixels = cols.shape
    for panel in range((pixels + NR - 1) // NR):
        first = panel * NR
        width = min(NR, pixels - first)
        for p in range(depth // 2):
            low, high = cols[2 * p], cols[2 * p + 1]  # [pixels] each
            for j in range(width):
                b_block[panel, p, j] = pair_word(low[first + j], high[first + j])
            for j in range(width, NR):
                b_block[panel, p, j] = 0
        if depth % 2:
            last = cols[depth - 1]
            for j in range(width):
                b_block[panel, depth // 2, j] = bf16_bits(last[first + j])
            for j in range(width, NR):
                b_block[panel, depth // 2, j] = 0
        for p in range((depth + 1) // 2, b_block.shape[1]):
            b_block[panel, p, :] = 0


@njit(**SERIAL)
def _unfold_pairs(padded, c0, channels, kh, kw, row0, rows, w_out, sh, sw, b_block):
    """im2col of output rows row0 .. row0+rows-1 for input channels c0 .. c0+channels-1, straight
    into b_block [pixels/NR, pairs, NR] words of bf16 pairs: what _pack_pixel_pairs makes of
    conv.py's im2col_tile cols, without writing those. padded [C, H+2ph, W+2pw] is the image with
    its zero border, so every tap of every output pixel reads inside it (no bounds per row).
    For each pair of k (two taps) and output row, the run of pixels along the row is joined into
    words, one contiguous run per panel the row crosses. Padding (pixels past the tile, the odd
    partner, pairs past the depth) is zero."""
    taps = kh * kw
    depth = channels * taps
    panels, pairs = b_block.shape[0], b_block.shape[1]
    for p in range(pairs):
        if 2 * p >= depth:
            for panel in range(panels):
                b_block[panel, p, :] = 0
            continue
        k_low = 2 * p
        k_high = min(2 * p + 1, depth - 1)  # the odd partner reads tap k_low again, then is dropped
        keep_high = np.uint32(0xFFFFFFFF) if 2 * p + 1 < depth else np.uint32(0xFFFF)
        c_low, i_low, j_low = c0 + k_low // taps, (k_low % taps) // kw, k_low % kw
        c_high, i_high, j_high = c0 + k_high // taps, (k_high % taps) // kw, k_high % kw
        for r in range(rows):
            low = padded[c_low, (row0 + r) * sh + i_low]  # [W+2pw]: the tap's input row
            high = padded[c_high, (row0 + r) * sh + i_high]
            first = r * w_out  # the row's first pixel in the tile
            col = 0
            while col < w_out:
                panel, lane = (first + col) // NR, (first + col) % NR
                run = min(w_out - col, NR - lane)  # pixels until the row or the panel ends
                words = b_block[panel, p, lane:lane + run]  # [run]
                if sw == 1:  # contiguous reads: a vectorised loop
                    from_low = low[col + j_low:col + j_low + run]
                    from_high = high[col + j_high:col + j_high + run]
                    for q in range(run):
                        words[q] = pair_word(from_low[q], from_high[q]) & keep_high
                else:
                    for q in range(run):
                        words[q] = pair_word(low[(col + q) * sw + j_low], high[(col + q) * sw + j_high]) & keep_high
                col += run
        for q in range(rows * w_out, panels * NR):  # pixels past the tile in its last panel
            b_block[q // NR, p, q % NR] = 0


def conv2d_bf16_ref(x, weight, bias=None, stride=1, padding=0):
    """conv2d_ref of the bf16-rounded x and weight (float32 [C_out, C_in, kH, kW])."""
    return conv2d_ref(rounded_to_bf16(x), rounded_to_bf16(weight), bias, stride, padding)


def _check_packed_conv(x, packed, bias, stride, padding):
    if not isinstance(packed, PackedBf16Conv):
        raise NpdiffError(f"conv2d_bf16: the weight must be a PackedBf16Conv from pack_conv_bf16, "
                          f"got {type(packed).__name__}")
    shape_only = np.broadcast_to(np.float32(0), packed.shape)  # the weight's shape for check_conv2d
    return check_conv2d(x, shape_only, bias, stride, padding)


def conv2d_bf16(x, packed, bias=None, stride=1, padding=0):
    """torch's conv2d with x and the weight in bf16, products summed in float32: x [B,C_in,H,W]
    float32, packed from pack_conv_bf16, bias [C_out] float32 or None -> [B,C_out,H_out,W_out]."""
    sh, sw, ph, pw = _check_packed_conv(x, packed, bias, stride, padding)
    kernel = "amx" if packed.layout == "amx_taps" else packed.layout  # the GEMM the layout was packed for
    if kernel == "float32" or kernel != bf16_kernel() or x.size == 0:  # or ruled out since packing
        return conv2d(rounded_to_bf16(x), packed.to_float32(), bias, (sh, sw), (ph, pw))
    if packed.layout == "amx_taps":  # version 3
        return conv2d_bf16_implicit(np.ascontiguousarray(x), packed.data, packed.shape, packed.channels_per_block,
                                    bias, sh, sw, ph, pw)
    return _conv_bf16_tiles(np.ascontiguousarray(x), packed, bias, sh, sw, ph, pw)


@njit(**SERIAL)
def _conv_tile_amx(padded, weight_bits, per_block, kh, kw, row0, rows, w_out, sh, sw, out, first, first_start,
                   bias_rows, words_flat, edge):
    """One tile (output rows row0 .. row0+rows-1 of one image) of a conv on AMX, all its depth
    blocks in one compiled loop: unfold a block's channels into words, then the tiles' GEMM into
    out [C_out, Ho*Wo] (the first block from the bias, later ones adding). words_flat: scratch for
    the largest block's words."""
    c_in = padded.shape[0]
    c_out = out.shape[0]
    pixels = rows * w_out
    for c0 in range(0, c_in, per_block):
        channels = min(per_block, c_in - c0)
        depth = channels * kh * kw
        pairs = (depth + 2 * TILE - 1) // (2 * TILE) * TILE  # whole AMX tiles of 16 pairs
        panels = (pixels + NR - 1) // NR
        words = words_flat[:panels * pairs * NR].reshape((panels, pairs, NR))  # [pixels/NR, pairs, NR]
        _unfold_pairs(padded, c0, channels, kh, kw, row0, rows, w_out, sh, sw, words)
        start = START_FROM_C if c0 > 0 else first_start
        amx_gemm_block(TILE_CONFIG, weight_bits, c0 * kh * kw, (depth + BLOCK - 1) // BLOCK, words, pairs * NR, 0,
                       out, 0, c_out, first, pixels, start, bias_rows, (TILE, 0), edge)


def _conv_bf16_tiles(x, packed, bias, sh, sw, ph, pw):
    """Tiles of output rows of each image on the block pool; per tile, per depth block: unfold
    (or take the 1x1 rows), pack to bf16 pairs, GEMM into the output tile."""
    batch, c_in, height, width = x.shape
    c_out, _, kh, kw = packed.shape
    h_out, w_out = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    pointwise = kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0
    per_block = packed.channels_per_block
    out = np.empty((batch, c_out, h_out * w_out), np.float32)  # [B,C_out,Ho*Wo]
    pixels_of = x.reshape(batch, c_in, height * width)  # [B,C_in,H*W] (1x1: the B operand itself)
    padded = x if pointwise else pad_image(x, ph, pw)  # [B,C_in,H+2ph,W+2pw], zeros around
    bias_rows = np.zeros((-(-c_out // BLOCK) * BLOCK, TILE), np.float32)  # [C_out, 16]: AMX's start
    if bias is not None:
        bias_rows[:c_out] = bias[:, None]  # each output channel's bias across a tile's 16 columns
    first_start = START_ZERO if bias is None else START_FROM_INIT

    def run_tile(tile):
        b, (row0, row1) = tile
        first, pixels = row0 * w_out, (row1 - row0) * w_out
        if packed.layout == "amx" and not pointwise:  # the main case: one compiled call per tile
            most_pairs = -(-(per_block * kh * kw + 1) // 2 // TILE) * TILE
            words_flat = scratch("conv_bf16 words", -(-pixels // NR) * most_pairs * NR).view(np.uint32)
            _conv_tile_amx(padded[b], packed.data, per_block, kh, kw, row0, row1 - row0, w_out, sh, sw, out[b],
                           first, first_start, bias_rows, words_flat, scratch("amx edge", (BLOCK, BLOCK)))
            return
        for block, c0 in enumerate(range(0, c_in, per_block)):
            c1 = min(c_in, c0 + per_block)
            depth = (c1 - c0) * kh * kw
            pairs = -(-(depth + 1) // 2 // TILE) * TILE  # whole AMX tiles of 16 pairs
            words = scratch("conv_bf16 words", (-(-pixels // NR), pairs, NR)).view(np.uint32)
            if pointwise:  # the image's rows are the B operand: [C_blk, pixels], rows contiguous
                _pack_pixel_pairs(pixels_of[b, c0:c1, first:first + pixels], words)
            else:  # [pixels/NR, pairs, NR] words of bf16 pairs, unfolded from the padded image
                _unfold_pairs(padded[b], c0, c1 - c0, kh, kw, row0, row1 - row0, w_out, sh, sw, words)
            if packed.layout == "amx":  # the first depth block starts from the bias, later ones from C
                start = START_FROM_C if block > 0 else first_start
                amx_gemm_block(TILE_CONFIG, packed.data, c0 * kh * kw, -(-depth // BLOCK), words, pairs * NR, 0,
                               out[b], 0, c_out, first, pixels, start, bias_rows, (TILE, 0),
                               scratch("amx edge", (BLOCK, BLOCK)))
            else:
                gemm_packed_block(packed.data[block], (depth + 1) // 2, words, 0, out[b], 0, c_out, first, pixels,
                                  block > 0)
        if bias is not None and packed.layout != "amx":
            out[b, :, first:first + pixels] += bias[:, None]  # [C_out, pixels] + [C_out, 1], in cache

    spans = split_evenly(h_out, max(1, TILE_PIXELS // w_out), batch, worker_count())
    run_blocks(run_tile, [(b, span) for b in range(batch) for span in spans])
    return out.reshape(batch, c_out, h_out, w_out)  # [B,C_out,Ho*Wo] -> [B,C_out,Ho,Wo]
