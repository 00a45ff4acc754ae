"""2-D convolution, NCHW, torch's weight layout [C_out, C_in, kH, kW] (cross-correlation, as torch).

Versions (each is tested against torch and the reference):
  1. conv2d_ref       NumPy API (numpy or cupy): pad once, then for each of the kH*kW taps add
                      W[:, :, i, j] @ (the strided window of x that tap sees). A temporary per tap.
  conv2d_fast         NumPy arrays: picks one of the four below by shape (conv_method).
  2. _conv1x1         1x1, stride 1, no padding: a plain GEMM W [C_out,C_in] @ x[b] [C_in,H*W] on
                      column tiles of each image (BLAS reads the tiles in place: no copy at all).
  3. _conv_im2col_tiled  everything else with more than DIRECT_MAX_C_OUT output channels (strided
                      convs, 3x3 convs on small images or few input channels): a tile of output
                      rows is unfolded by Numba (im2col_tile, zero padding and stride handled in
                      the copy, so x is never padded as a whole) into cols [C_in*kH*kW,
                      rows*W_out], and one sgemm
                      W [C_out, C_in*kH*kW] @ cols writes those output rows in place. Memory stays
                      bounded by IM2COL_TILE_BYTES per worker at the VAE's 512x512 images (a
                      whole-image im2col there is >1 GB).
  4. _conv_direct     stride 1 with at most DIRECT_MAX_C_OUT output channels (UNet conv_out 320->4,
                      VAE conv_out 128->3): Numba loops, prange over output rows. A GEMM with 3-4
                      rows wastes most of each BLAS micro-kernel while im2col still copies 9x the
                      input; measured here 2.8x faster than im2col+GEMM at 128->3 on 512x512.
  5. Winograd F(4x4,3x3) (conv_winograd.py + conv_winograd4.py, beside F(2x2,3x3) and a NumPy
                      reference with the transform matrices written out): 3x3, stride 1, at least WINOGRAD_MIN_C_IN
                      input channels and WINOGRAD_MIN_PIXELS output pixels per image: SD's resnet
                      convs at 32 and 16 px. 4x fewer GEMM multiplies.
  6. Winograd F(6x6,3x3) (conv_winograd.py + conv_winograd6.py): the same where both output sides
                      are at least WINOGRAD6_MIN_SIDE (64) and C_in at least WINOGRAD6_MIN_C_IN
                      (128): the VAE's 64..512 px convs, the UNet's at 64 px. 5.06x fewer multiplies.
  cupy arrays: im2col kernel + cuBLAS GEMMs (npdiff/kernels/cuda/conv.py; npdiff/kernels/dispatch.py).
  The step before a conv folded into versions 5 and 6 (GroupNorm + SiLU, nearest 2x upsampling: the
  tensor in between never made): conv_fused.py.

Why im2col + GEMM for the big convs that are not Winograd's: the GEMM has K = 9*C_in (2880-11520), the shape OpenBLAS's
AVX-512 sgemm runs at its peak, and the unfolding costs one write + one read of the tile per
2*C_out FLOP per element (~10% of the GEMM time at C_out = 320). Tiles are large (16 MiB) because
each GEMM call packs the whole weight matrix again: fewer, larger calls pack it less often. An
implicit GEMM (9 accumulating sgemm calls, beta=1, over shifted views of a padded x) avoids the
copy but needs the weight re-laid out per tap and re-reads/writes the output tile 9 times; a ctypes
prototype of it was not faster than this in our (noisy, shared-machine) measurements.

Winograd vs im2col, measured (benchmarks/sd15_kernels.py, 2 threads, best of rounds alternated with
torch in one process; GFLOP/s counted as the direct conv's 2*B*C_out*C_in*9*H*W for every method,
so they compare; shared machine, load average 2-4; NumPy's sgemm peak 203 GFLOP/s):

    shape (3x3, pad 1)          im2col  F(2,3)  F(4,3)  torch   GFLOP/s
    [2,320,64,64] -> 320          182     258     329     228   UNet 64 px
    [2,960,64,64] -> 320          164     246     303     224   UNet up block, 64 px
    [2,640,32,32] -> 640          190     240     297     230   UNet 32 px
    [2,1280,16,16] -> 1280        187     182     229     176   UNet 16 px
    [2,2560,16,16] -> 1280 *       91     112     121      88   UNet up block, 16 px
    [2,640,16,16] -> 1280 *        98     104     110      82   UNet down block, 16 px
    [2,1280,8,8] -> 1280          148      90      67     102   UNet 8 px
    [2,4,64,64] -> 320             97      13      25     157   UNet conv_in (4 input channels)
    [1,512,64,64] -> 512          191     278     316     229   VAE 64 px
    [1,512,128,128] -> 512        182     276     414     204   VAE 128 px
    [1,256,256,256] -> 256        160     226     350     173   VAE 256 px
    [1,128,512,512] -> 128        140     201     244     158   VAE 512 px
    [1,3,512,512] -> 128           55      16      21      18   VAE conv_in (RGB)
    (* from a run at load average 4, sgemm peak measured 100 instead of 203: compare within the row)
    With F(4,3)'s transforms written out (conv_winograd4.py), conv2d's time / torch's, same benchmark,
    load average 1.9, before -> after: 320@64 px 0.63 -> 0.57, 960->320@64 0.65 -> 0.56, 640@32
    0.73 -> 0.56, 1280@16 0.79 -> 0.70, 2560->1280@16 0.74 -> 0.68, 640->1280@16 1.14 (im2col) -> 0.81.

Hence the rule in conv_method: F(4,3) from 32 input channels and 32x32 output pixels up, and at
16x16 from 640 input channels (batch 2 and more; batch 1 from 1280 channels: im2col, IM2COL_FEW_*)
(there F(4,3)/im2col measured 0.5-0.87x in 5 of 6 alternated runs at 1280 and 2560 channels, 1.05x
in one; at 640 -> 1280 first a tie, then, with the written-out F(4,3) transforms, 0.74-0.80x in 3
alternated runs: 44.6 vs 60.4 ms, 63.4 vs 79.7, 53.8 vs 83.8 at load average 1-1.4); im2col below
(at 8 px the tiles are too few for the GEMMs). F(2,3) was faster than F(4,3) only at 640 -> 1280, 16 px.
Rounding (relative error against a float64 conv, x ~ N(0,1), weights ~ N(0,1)/sqrt(9*C_in), bias
~ N(0,1)): torch float32 1.7-2.5e-7, im2col 2.6-2.8e-7, F(2,3) 2.7-4.4e-7, F(4,3) 1.7-2.9e-6 at the
shapes above (the kernel tolerance is 1e-5). Where F(4,3)'s time goes, one core, [2,320,64,64]:
GEMMs 45 ms (~85 GFLOP/s), input transform ~21 ms, output transform ~18 ms, weights ~4 ms: the
transforms are ~half of the work, the input transform the larger (a strided gather per tile row).

F(6x6,3x3) against F(4x4,3x3) (each with its own blocking, conv_winograd.blocking), alternated in one
process, load average 2.4-2.7, wall time F(6,3) / F(4,3) (CPU time within 0.03 of it):
    VAE [1,512,64,64] 0.71, [1,512,128,128] 0.73, 512 ch at 256 px 0.73, 512 -> 256 at 256 px 0.85,
    [1,256,256,256] 0.88, 256 ch at 512 px 0.83, 256 -> 128 at 512 px 0.78, [1,128,512,512] 0.84;
    UNet [2,320,64,64] 0.85, [2,960,64,64] -> 320 0.89; but [2,640,32,32] 1.26, 1280 ch at 16 px 1.7
    (6x6 tiles overhang 32 px by 4 and 16 px by 2: 27% of the multiplies wasted), hence the rule.
Its rounding (same measure as above, 64-512 channels, N(0,1) and SiLU'd inputs): 2.1-4.3e-6.

Threads: the tiles of versions 2, 3, 5 and 6 are spread over the block-parallel pool of block_pool.py
(each GEMM single-threaded on its own core: no fork/join of OpenBLAS threads per call); version 4
uses Numba's prange.
"""


import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import FASTMATH_CONTRACT, PARALLEL, SERIAL, njit, prange
from npdiff.kernels import conv_winograd, dispatch
from npdiff.kernels.block_pool import run_blocks, split_evenly, worker_count
from npdiff.kernels.scratch import scratch
from npdiff.kernels.validate import (
    output_size,
    pair,
    require_ndim,
    require_optional_vector,
    shape_text,
)

IM2COL_TILE_BYTES = 16 << 20  # unfolded input per GEMM (per worker): large, so the weight is packed rarely
# Images of at most IM2COL_BATCH_MAX_PIXELS output pixels (batch > 1): _conv_im2col_batch, in IM2COL_OUT_BLOCKS
# output-channel blocks (from the shape alone: balanced on 1, 2 or 4 workers). Measured against one tile per
# image (alternated, best of 4, load 1.5-1.8, wall ms at 2 threads / CPU ms on one core): 1280 -> 1280 at
# 8 px 22.6 -> 21.5 / 47.3 -> 40.8, 2560 -> 1280 at 8 px 43.9 -> 42.4 / 93.0 -> 80.7, 1280 stride 2 16 -> 8
# px 22.3 -> 21.9 / 46.9 -> 41.6; but 640 stride 2 32 -> 16 px (256 pixels) 19.1 -> 21.4 / 36.8 -> 41.3.
IM2COL_BATCH_MAX_PIXELS, IM2COL_OUT_BLOCKS = 8 * 8, 4
PIXELS_PER_TILE_1X1 = 4096  # least columns per GEMM of a 1x1 conv
DIRECT_MAX_C_OUT = 16  # stride-1 convs with at most this many output channels: direct Numba loops
WINOGRAD_MIN_C_IN = 32  # 3x3 stride-1 convs with at least this many input channels ...
WINOGRAD_MIN_PIXELS = 32 * 32  # ... and output pixels per image: Winograd F(4x4,3x3)
WINOGRAD_DEEP_C_IN, WINOGRAD_DEEP_MIN_PIXELS = 640, 16 * 16  # and with this many channels, from 16x16
# ... but not with at most this many output pixels IN ALL (batch 1 at 16x16: Winograd's 16 tiles are too
# few to split) from this many input channels: im2col there. Measured at batch 1, 16x16 (benchmarks/
# training_kernels.py, one process, load ~4, best of 3, im2col / F(4,3) / torch ms): 1920 -> 1280
# 107 / 154 / 133, 2560 -> 1280 144 / 197 / 166, 1280 -> 1280 73 / 77 / 89, and 640 -> 1280 37 / 30 / 44
# (stays F(4,3)); the backward's input-gradient convs (1280 input channels) 1280 -> 1280 67 / 92 / 92,
# 1280 -> 2560 137 / 181 / 147. The tape forward of SD 1.5 training (batch 1) and batch-1 sampling.
IM2COL_FEW_MAX_PIXELS, IM2COL_FEW_MIN_C_IN = 16 * 16, 1280
# F(6x6,3x3) instead of F(4x4,3x3) where both output sides are at least this and C_in at least this
# (header: 0.73-0.89x F(4,3)'s time at the VAE's and the UNet's 64x64 shapes; at 32 and 16 px its 6x6
# tiles overhang the picture by 12% per side and it took 1.3-1.8x F(4,3)'s time)
WINOGRAD6_MIN_SIDE, WINOGRAD6_MIN_C_IN = 64, 128


def pad_image(x, ph, pw):
    """[B,C,H,W] -> [B,C,H+2ph,W+2pw], zeros around (a copy only when padding is needed)."""
    if ph == 0 and pw == 0:
        return x
    xp = backend.array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


# ---------------------------------------------------------------------------------------------
# Reference (NumPy API, numpy or cupy)
# ---------------------------------------------------------------------------------------------
def conv2d_ref(x, weight, bias=None, stride=1, padding=0):
    xp = backend.array_module(x)
    sh, sw = pair("conv2d", "stride", stride)
    ph, pw = pair("conv2d", "padding", padding)
    batch, _, height, width = x.shape
    c_out, c_in, kh, kw = weight.shape
    h_out, w_out = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    padded = pad_image(x, ph, pw)  # [B,C_in,H+2ph,W+2pw]
    out = xp.zeros((batch, c_out, h_out * w_out), dtype=xp.float32)  # [B,C_out,Ho*Wo]
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i:i + sh * (h_out - 1) + 1:sh, j:j + sw * (w_out - 1) + 1:sw]  # [B,C_in,Ho,Wo]
            window = window.reshape(batch, c_in, h_out * w_out)  # [B,C_in,Ho*Wo] (a copy)
            out += xp.matmul(weight[:, :, i, j], window)  # [C_out,C_in] @ [B,C_in,Ho*Wo] -> [B,C_out,Ho*Wo]
    if bias is not None:
        out += bias[:, None]  # [B,C_out,Ho*Wo] + [C_out,1]
    return out.reshape(batch, c_out, h_out, w_out)  # [B,C_out,Ho*Wo] -> [B,C_out,Ho,Wo]


# ---------------------------------------------------------------------------------------------
# Fast (NumPy arrays): tiles on the block-parallel pool
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def im2col_tile(image, row0, sh, sw, ph, pw, cols):
    """Unfold output rows row0 .. row0+rows-1 of one image into cols, zero padding included.

    image [C,H,W]; cols [C,kH,kW,rows,W_out] (contiguous; its reshape [C*kH*kW, rows*W_out] is the
    GEMM's right operand, rows ordered (c, i, j) like weight.reshape(C_out, C*kH*kW)). For each tap
    (i, j) output column col reads image column col*sw + j - pw: the valid columns form one range
    [col_lo, col_hi), copied as one slice for stride 1, the rest are zeros. (Slices, not index
    loops: Numba wraps negative indices, and that check kept an index loop from vectorising; the
    slice copy measured 5x faster.)
    """
    channels, height, width = image.shape
    kh, kw, rows, w_out = cols.shape[1], cols.shape[2], cols.shape[3], cols.shape[4]
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                col_lo = 0 if pw <= j else (pw - j + sw - 1) // sw
                col_hi = min(w_out, (width - 1 + pw - j) // sw + 1) if width - 1 + pw - j >= 0 else 0
                col_lo = min(col_lo, col_hi)
                for r in range(rows):
                    dst = cols[c, i, j, r]  # [W_out]
                    src_row = (row0 + r) * sh + i - ph
                    if src_row < 0 or src_row >= height:
                        dst[:] = 0.0
                        continue
                    dst[:col_lo] = 0.0
                    dst[col_hi:] = 0.0
                    src = image[c, src_row]  # [W]
                    if sw == 1:
                        dst[col_lo:col_hi] = src[col_lo + j - pw:col_hi + j - pw]
                    else:
                        for col in range(col_lo, col_hi):
                            dst[col] = src[col * sw + j - pw]


def _conv1x1(x, weight, bias):
    """1x1, stride 1, no padding: out[b][:, p0:p1] = W [C_out,C_in] @ x[b][:, p0:p1], no copies."""
    batch, c_in, height, width = x.shape
    c_out = weight.shape[0]
    pixels = np.ascontiguousarray(x).reshape(batch, c_in, height * width)  # [B,C_in,H*W]
    weight_2d = weight.reshape(c_out, c_in)  # [C_out,C_in]
    out = np.empty((batch, c_out, height * width), np.float32)  # [B,C_out,H*W]
    max_pixels = max(PIXELS_PER_TILE_1X1, -(-height * width * batch // (2 * worker_count())))

    def run_tile(tile):
        b, (p0, p1) = tile
        np.matmul(weight_2d, pixels[b, :, p0:p1], out=out[b, :, p0:p1])  # [C_out,C_in] @ [C_in,n]
        if bias is not None:
            out[b, :, p0:p1] += bias[:, None]  # [C_out,n] + [C_out,1], while in cache

    # at least one tile per worker: at batch 1 (training, sampling without CFG) up to 2 * PIXELS_PER_TILE_1X1
    # pixels were one tile, a one-core GEMM with the other core idle
    spans = split_evenly(height * width, max_pixels, batch, worker_count())
    run_blocks(run_tile, [(b, span) for b in range(batch) for span in spans])
    return out.reshape(batch, c_out, height, width)


def _conv_im2col_tiled(x, weight, bias, sh, sw, ph, pw):
    """im2col by tiles of output rows, one GEMM per tile, tiles spread over the pool's workers
    (or, where every image's columns together fit one tile, _conv_im2col_batch)."""
    batch, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    x = np.ascontiguousarray(x)  # [B,C_in,H,W]
    weight_2d = weight.reshape(c_out, c_in * kh * kw)  # [C_out, K = C_in*kH*kW] (a view)
    depth = c_in * kh * kw
    all_columns_bytes = batch * depth * h_out * w_out * 4
    if 1 < batch and h_out * w_out <= IM2COL_BATCH_MAX_PIXELS and all_columns_bytes <= IM2COL_TILE_BYTES:
        return _conv_im2col_batch(x, weight_2d, bias, (kh, kw), (h_out, w_out), sh, sw, ph, pw)
    out = np.empty((batch, c_out, h_out, w_out), np.float32)  # [B,C_out,Ho,Wo]
    max_rows = max(1, IM2COL_TILE_BYTES // (depth * w_out * 4))

    def run_tile(tile):
        b, (row0, row1) = tile
        rows = row1 - row0
        cols = scratch("conv cols", (c_in, kh, kw, rows, w_out))  # [C_in,kH,kW,rows,Wo]
        im2col_tile(x[b], row0, sh, sw, ph, pw, cols)
        out_tile = out[b, :, row0:row1, :].reshape(c_out, rows * w_out)  # [C_out, rows*Wo] view
        np.matmul(weight_2d, cols.reshape(depth, rows * w_out), out=out_tile)  # [C_out,K] @ [K,rows*Wo]
        if bias is not None:
            out_tile += bias[:, None]  # while the tile is in cache

    spans = split_evenly(h_out, max_rows, batch, worker_count())
    run_blocks(run_tile, [(b, span) for b in range(batch) for span in spans])
    return out


def _conv_im2col_batch(x, weight_2d, bias, kernel, out_size, sh, sw, ph, pw):
    """im2col of small images (the UNet's 8x8 and the downsamplers' 16x16 outputs at batch 2): every
    image unfolded into one cols [K, B*Ho*Wo], then one GEMM per block of IM2COL_OUT_BLOCKS output
    channels over all images' columns. Per image (one tile each) every GEMM packed the whole weight
    matrix again (59 MB at 1280 channels) for 64 columns; here each weight row is packed once."""
    batch, c_in = x.shape[:2]
    (kh, kw), (h_out, w_out) = kernel, out_size
    c_out, depth = weight_2d.shape
    pixels = h_out * w_out
    cols = np.empty((c_in, kh, kw, batch, h_out, w_out), np.float32)  # [C_in,kH,kW,B,Ho,Wo]
    out = np.empty((batch, c_out, pixels), np.float32)  # [B,C_out,Ho*Wo]

    def unfold(b):  # 1. cols[:, :, :, b] = image b's columns
        im2col_tile(x[b], 0, sh, sw, ph, pw, cols[:, :, :, b])

    def multiply(block):  # 2. out[:, o0:o1] = W[o0:o1] @ cols, all images at once
        o0, o1 = block
        product = scratch("conv batch product", (o1 - o0, batch * pixels))  # [block,B*Ho*Wo]
        np.matmul(weight_2d[o0:o1], cols.reshape(depth, batch * pixels), out=product)  # [block,K] @ [K,B*Ho*Wo]
        for b in range(batch):
            out[b, o0:o1] = product[:, b * pixels:(b + 1) * pixels]  # [block,Ho*Wo]
            if bias is not None:
                out[b, o0:o1] += bias[o0:o1, None]  # [block,Ho*Wo] + [block,1]

    run_blocks(unfold, range(batch))
    run_blocks(multiply, split_evenly(c_out, -(-c_out // IM2COL_OUT_BLOCKS)))
    return out.reshape(batch, c_out, h_out, w_out)


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)  # per-column sums in a written order: nothing to reassociate
def _direct_conv_row(x, weight, bias, b, r, ph, pw, padded_row, out):
    """One output row out[b, :, r, :] of a stride-1 conv, accumulated in place (it stays in L1).

    For each input row that output row r sees, the row is copied once into padded_row (zeros at
    both ends), so every tap reads padded_row[col + j] with col, j >= 0: no negative indices, and
    the loop over output columns (contiguous in NCHW) is vectorised. Output channels are the next
    loop out: each padded row is reused C_out * kW times from L1.
    """
    c_out, c_in, kh, kw = weight.shape
    height, width = x.shape[2], x.shape[3]
    w_out = out.shape[3]
    for o in range(c_out):
        out[b, o, r, :] = bias[o]
    for c in range(c_in):
        for i in range(kh):
            src_row = r + i - ph
            if src_row < 0 or src_row >= height:
                continue
            padded_row[pw:pw + width] = x[b, c, src_row]
            for j in range(kw):
                for o in range(c_out):
                    tap = weight[o, c, i, j]
                    for col in range(w_out):
                        out[b, o, r, col] += tap * padded_row[col + j]


@njit(**PARALLEL)
def _conv_direct_numba(x, weight, bias, ph, pw, out):
    """Direct stride-1 conv, prange over the B*H_out output rows (independent)."""
    batch, h_out = out.shape[0], out.shape[2]
    width = x.shape[3]
    for task in prange(batch * h_out):
        padded_row = np.zeros(width + 2 * pw, np.float32)  # zero ends, middle refilled per input row
        _direct_conv_row(x, weight, bias, task // h_out, task % h_out, ph, pw, padded_row, out)


def _conv_direct(x, weight, bias, ph, pw):
    batch, _, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    out = np.empty((batch, c_out, output_size(height, kh, 1, ph), output_size(width, kw, 1, pw)), np.float32)
    bias = np.zeros(c_out, np.float32) if bias is None else np.ascontiguousarray(bias)  # [C_out]
    _conv_direct_numba(np.ascontiguousarray(x), np.ascontiguousarray(weight), bias, ph, pw, out)
    return out


def check_conv2d(x, weight, bias, stride, padding, upsampling=1):
    """conv2d's input checks; upsampling 2: the conv's input is x upsampled 2x (conv_fused.py)."""
    require_ndim("conv2d", "x", x, 4, "[B,C_in,H,W]")
    require_ndim("conv2d", "weight", weight, 4, "[C_out,C_in,kH,kW]")
    if weight.shape[1] != x.shape[1]:
        raise NpdiffError(f"conv2d: weight must have shape [C_out,C_in={x.shape[1]},kH,kW] to match "
                          f"x {shape_text(x.shape)}, got {shape_text(weight.shape)}")
    require_optional_vector("conv2d", "bias", bias, weight.shape[0])
    sh, sw = pair("conv2d", "stride", stride)
    ph, pw = pair("conv2d", "padding", padding)
    if sh == 0 or sw == 0:
        raise NpdiffError(f"conv2d: stride must be >= 1, got {stride!r}")
    kh, kw = weight.shape[2:]
    h_out = output_size(upsampling * x.shape[2], kh, sh, ph)
    w_out = output_size(upsampling * x.shape[3], kw, sw, pw)
    if h_out < 1 or w_out < 1:
        upsampled = "" if upsampling == 1 else f" upsampled {upsampling}x"
        raise NpdiffError(f"conv2d: x {shape_text(x.shape)}{upsampled} with padding {(ph, pw)} is smaller than "
                          f"the kernel {kh}x{kw} of weight {shape_text(weight.shape)}")
    return sh, sw, ph, pw


def conv_method(x_shape, weight_shape, stride, padding):
    """The fast path conv2d_fast takes for these shapes (rule measured in this file's header):
    "1x1", "direct", "winograd6" (F(6x6,3x3)), "winograd4" (F(4x4,3x3)) or "im2col"."""
    (sh, sw), (ph, pw) = stride, padding
    c_out, c_in, kh, kw = weight_shape
    h_out, w_out = output_size(x_shape[2], kh, sh, ph), output_size(x_shape[3], kw, sw, pw)
    if kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0:
        return "1x1"
    if sh == 1 and sw == 1 and c_out <= DIRECT_MAX_C_OUT:
        return "direct"
    pixels = h_out * w_out
    if x_shape[0] * pixels <= IM2COL_FEW_MAX_PIXELS and c_in >= IM2COL_FEW_MIN_C_IN:
        return "im2col"
    if kh == 3 and kw == 3 and sh == 1 and sw == 1 and (
            (c_in >= WINOGRAD_MIN_C_IN and pixels >= WINOGRAD_MIN_PIXELS)
            or (c_in >= WINOGRAD_DEEP_C_IN and pixels >= WINOGRAD_DEEP_MIN_PIXELS)):
        if min(h_out, w_out) >= WINOGRAD6_MIN_SIDE and c_in >= WINOGRAD6_MIN_C_IN and (ph, pw) == (1, 1):
            return "winograd6"
        return "winograd4"
    return "im2col"


def conv2d_fast(x, weight, bias, stride, padding):
    """NumPy arrays: the version conv_method picks (1x1 GEMM, direct loops, Winograd, im2col)."""
    method = conv_method(x.shape, weight.shape, stride, padding)
    if method == "1x1":
        return _conv1x1(x, weight, bias)
    if method == "direct":
        return _conv_direct(x, weight, bias, *padding)
    if method == "winograd6":
        return conv_winograd.winograd_conv2d(x, weight, bias, padding, 6)
    if method == "winograd4":
        return conv_winograd.winograd_conv2d(x, weight, bias, padding, 4)
    return _conv_im2col_tiled(x, weight, bias, *stride, *padding)


CONV2D = dispatch.register("conv2d", fast=conv2d_fast, reference=conv2d_ref, cuda="conv2d")


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """torch.nn.functional.conv2d(x, weight, bias, stride, padding) for float32 NCHW.

    x [B,C_in,H,W], weight [C_out,C_in,kH,kW], bias [C_out] or None; stride, padding: int or (h, w).
    Returns [B,C_out,H_out,W_out].
    """
    sh, sw, ph, pw = check_conv2d(x, weight, bias, stride, padding)
    return CONV2D(x, weight, bias, (sh, sw), (ph, pw))
