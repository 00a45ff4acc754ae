"""Resampling: nearest-neighbour 2x upsampling (the UNet's and VAE's upsamplers), and resizing to any size
as torch.nn.functional.interpolate(x, size=(H', W'), mode=...) does (hires fix's latent upscalers).

Nearest 2x (torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")), versions:
  1. upsample_nearest2x_ref   NumPy API (numpy or cupy): np.repeat along H, then along W (two passes,
                           one temporary of the half-upsampled size).
  2. upsample_nearest2x_fast  Numba (_upsample_numba), prange over the B*C planes (each plane is contiguous in NCHW):
                           each input row is widened once into output row 2h and copied to row
                           2h+1, so x is read once and the output written once.
  cupy arrays: one thread per output pixel (npdiff/kernels/cuda/elementwise.py).

Resize to (H', W') (torch's interpolate with size=, align_corners=False, antialias=False), modes "nearest",
"nearest-exact", "bilinear", "bicubic" (Keys' cubic with torch's a = -0.75). Every mode is separable: an
output row mixes a few input rows with weights that depend only on the row, and likewise for columns.
With scale = in / out (torch's rule when size is given) output index d reads input position
  nearest        floor(d * scale)                      (one tap, weight 1)
  nearest-exact  floor((d + 0.5) * scale)              (one tap, weight 1)
  bilinear       (d + 0.5) * scale - 0.5, clamped >= 0 (two taps: 1 - t, t)
  bicubic        (d + 0.5) * scale - 0.5, not clamped  (four taps at floor - 1 .. floor + 2, Keys' weights)
and taps past the edge read the edge (indices clamped to [0, in - 1]).
Versions:
  1. resize_ref   per axis the tap indices and weights (resize_taps), summed with fancy indexing:
                  out[..., d] = sum_k weight[d, k] * x[..., index[d, k]], first along H, then along W.
  2. resize_fast  the same taps as one [out, in] matrix per axis: out = Wh @ x @ Ww^T, two BLAS products.

Backward (training): each input pixel was copied into a 2x2 block, so its gradient is the sum of
the block's four gradients.
  1. upsample_nearest2x_backward_ref   NumPy API: reshape [B,C,H,2,W,2] and sum the two 2-axes.
  2. upsample_nearest2x_backward_fast  Numba, prange over the B*C planes: rows 2h and 2h+1 of the
                           plane's gradient read once, each output pixel written once.
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.validate import require_ndim, shape_text


def upsample_nearest2x_ref(x):
    xp = backend.array_module(x)
    taller = xp.repeat(x, 2, axis=2)  # [B,C,H,W] -> [B,C,2H,W]
    return xp.repeat(taller, 2, axis=3)  # [B,C,2H,W] -> [B,C,2H,2W]


@njit(**SERIAL)
def _upsample_plane(plane, out):
    """plane [H, W] -> out [2H, 2W]: widen row h into out row 2h, then copy it to row 2h+1."""
    height, width = plane.shape
    for h in range(height):
        wide = out[2 * h]
        src = plane[h]
        for w in range(width):
            wide[2 * w] = src[w]
            wide[2 * w + 1] = src[w]
        out[2 * h + 1, :] = wide


@njit(**PARALLEL)
def _upsample_numba(planes, out):
    """planes [P, H, W] -> out [P, 2H, 2W], both contiguous; P = B*C, one plane per task."""
    for p in prange(planes.shape[0]):
        _upsample_plane(planes[p], out[p])


def upsample_nearest2x_fast(x):
    batch, channels, height, width = x.shape
    planes = np.ascontiguousarray(x).reshape(batch * channels, height, width)  # [B,C,H,W] -> [P,H,W]
    out = np.empty((batch * channels, 2 * height, 2 * width), np.float32)  # [P,2H,2W]
    _upsample_numba(planes, out)
    return out.reshape(batch, channels, 2 * height, 2 * width)  # [P,2H,2W] -> [B,C,2H,2W]


@njit(**SERIAL, inline="always")
def nearest2x_rows(x, b, c, first_y, carried, rows):
    """rows[r] = row first_y + r of upsample_nearest2x(x)[b, c] (zero for rows outside it), x [B,C,H,W],
    rows [n, 2W] scratch; the first `carried` rows are the last `carried` of rows' previous content, moved
    up (a convolution's input transform that reads the upsampled picture from x: conv_fused.py)."""
    count, height, width = rows.shape[0], 2 * x.shape[2], x.shape[3]
    for r in range(carried):
        rows[r] = rows[count - carried + r]
    for r in range(carried, count):
        y = first_y + r
        if 0 <= y < height:
            source, wide = x[b, c, y // 2], rows[r]  # [W], [2W]
            for w in range(width):
                wide[2 * w] = source[w]
                wide[2 * w + 1] = source[w]
        else:
            rows[r] = 0.0


UPSAMPLE_NEAREST2X = dispatch.register("upsample_nearest2x", fast=upsample_nearest2x_fast,
                                       reference=upsample_nearest2x_ref, cuda="upsample_nearest2x")


def upsample_nearest2x(x):
    """x [B,C,H,W] -> [B,C,2H,2W], each pixel repeated in a 2x2 block (torch's nearest, factor 2)."""
    require_ndim("upsample_nearest2x", "x", x, 4, "[B,C,H,W]")
    return UPSAMPLE_NEAREST2X(x)


# ---------------------------------------------------------------------------------------------
# Resize to any size (torch's interpolate with size=, align_corners=False, antialias=False)
# ---------------------------------------------------------------------------------------------
RESIZE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")
BICUBIC_A = -0.75  # torch's (and OpenCV's) Keys cubic coefficient


def _cubic_weights(t):
    """Keys' cubic convolution weights for taps at -1, 0, 1, 2 around a point t in [0, 1) past tap 0
    (torch's get_cubic_upsample_coefficients): t [N] -> [N, 4]."""
    a = BICUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)  # [N,4]


def resize_taps(in_size, out_size, mode):
    """One axis: -> (index [out, taps] int64, weight [out, taps] float64) of torch's interpolate."""
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)  # [out]
    if mode in ("nearest", "nearest-exact"):
        offset = np.float32(0.5 if mode == "nearest-exact" else 0.0)
        position = (dst.astype(np.float32) + offset) * np.float32(scale)  # [out], in float32 as torch computes it
        index = np.minimum(np.floor(position).astype(np.int64), in_size - 1)
        return index[:, None], np.ones((out_size, 1))  # [out,1] each
    src = (dst + 0.5) * scale - 0.5  # [out] real input position
    if mode == "bilinear":
        src = np.maximum(src, 0.0)
        first = np.floor(src).astype(np.int64)  # [out]
        t = src - first  # [out] in [0, 1)
        index = np.stack([first, first + 1], axis=1)  # [out,2]
        weight = np.stack([1 - t, t], axis=1)  # [out,2]
    elif mode == "bicubic":
        first = np.floor(src).astype(np.int64)  # [out]
        t = src - first  # [out] in [0, 1)
        index = first[:, None] + np.arange(-1, 3)  # [out,4]
        weight = _cubic_weights(t)  # [out,4]
    else:
        raise NpdiffError(f"resize: mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    return np.clip(index, 0, in_size - 1), weight


def _taps_matrix(in_size, out_size, mode):
    """The taps of one axis as a dense matrix [out, in] (repeated edge taps add up)."""
    index, weight = resize_taps(in_size, out_size, mode)  # [out,taps] each
    matrix = np.zeros((out_size, in_size))  # [out,in]
    rows = np.repeat(np.arange(out_size), index.shape[1])  # [out*taps]
    np.add.at(matrix, (rows, index.ravel()), weight.ravel())
    return matrix.astype(np.float32)


def resize_ref(x, size, mode):
    xp = backend.array_module(x)
    (out_h, out_w), (in_h, in_w) = size, x.shape[2:]
    rows, row_weights = resize_taps(in_h, out_h, mode)  # [H',taps] each
    cols, col_weights = resize_taps(in_w, out_w, mode)  # [W',taps] each
    taller = sum(x[:, :, rows[:, k], :] * xp.asarray(row_weights[:, k, None], dtype=np.float32)
                 for k in range(rows.shape[1]))  # [B,C,H,W] -> [B,C,H',W]
    return sum(taller[:, :, :, cols[:, k]] * xp.asarray(col_weights[:, k], dtype=np.float32)
               for k in range(cols.shape[1]))  # [B,C,H',W] -> [B,C,H',W']


def resize_fast(x, size, mode):
    xp = backend.array_module(x)
    (out_h, out_w), (in_h, in_w) = size, x.shape[2:]
    rows = xp.asarray(_taps_matrix(in_h, out_h, mode))  # [H',H]
    cols = xp.asarray(_taps_matrix(in_w, out_w, mode))  # [W',W]
    taller = xp.matmul(rows, x.astype(np.float32))  # [H',H] @ [B,C,H,W] -> [B,C,H',W]
    return xp.matmul(taller, cols.T)  # [B,C,H',W] @ [W,W'] -> [B,C,H',W']


def resize(x, size, mode="bilinear"):
    """x [B,C,H,W] -> [B,C,H',W'] for size = (H', W'), as torch.nn.functional.interpolate(x, size=size,
    mode=mode) with align_corners=False and no antialias; mode: one of RESIZE_MODES."""
    require_ndim("resize", "x", x, 4, "[B,C,H,W]")
    if mode not in RESIZE_MODES:
        raise NpdiffError(f"resize: mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    if (len(size) != 2 or not all(isinstance(side, (int, np.integer)) and not isinstance(side, bool) and side >= 1
                                  for side in size)):
        raise NpdiffError(f"resize: size must be two integers >= 1 (height, width), got {size!r}")
    if min(x.shape[2:]) < 1:
        raise NpdiffError(f"resize: x has an empty side, shape {list(x.shape)}")
    return resize_fast(x, tuple(int(side) for side in size), mode)
# Backward
# ---------------------------------------------------------------------------------------------
def upsample_nearest2x_backward_ref(grad_out):
    batch, channels, height2, width2 = grad_out.shape
    blocks = grad_out.reshape(batch, channels, height2 // 2, 2, width2 // 2, 2)  # [B,C,H,2,W,2]
    return blocks.sum(axis=(3, 5))  # [B,C,H,W]


@njit(**SERIAL)
def _downsum_plane(grad_plane, out):
    """grad_plane [2H, 2W] -> out [H, W]: the sum of each 2x2 block."""
    height, width = out.shape
    for h in range(height):
        top = grad_plane[2 * h]
        bottom = grad_plane[2 * h + 1]
        for w in range(width):
            out[h, w] = (top[2 * w] + top[2 * w + 1]) + (bottom[2 * w] + bottom[2 * w + 1])


@njit(**PARALLEL)
def _downsum_numba(grad_planes, out):
    """grad_planes [P, 2H, 2W] -> out [P, H, W], both contiguous; one plane per task."""
    for p in prange(grad_planes.shape[0]):
        _downsum_plane(grad_planes[p], out[p])


def upsample_nearest2x_backward_fast(grad_out):
    batch, channels, height2, width2 = grad_out.shape
    planes = np.ascontiguousarray(grad_out).reshape(batch * channels, height2, width2)  # [P,2H,2W]
    out = np.empty((batch * channels, height2 // 2, width2 // 2), np.float32)  # [P,H,W]
    _downsum_numba(planes, out)
    return out.reshape(batch, channels, height2 // 2, width2 // 2)  # [P,H,W] -> [B,C,H,W]


UPSAMPLE_NEAREST2X_BACKWARD = dispatch.register("upsample_nearest2x_backward", fast=upsample_nearest2x_backward_fast,
                                                reference=upsample_nearest2x_backward_ref)


def upsample_nearest2x_backward(grad_out):
    """Gradient of y = upsample_nearest2x(x) given dy [B,C,2H,2W] -> dx [B,C,H,W]."""
    require_ndim("upsample_nearest2x_backward", "grad_out", grad_out, 4, "[B,C,2H,2W]")
    if grad_out.shape[2] % 2 or grad_out.shape[3] % 2:
        raise NpdiffError(f"upsample_nearest2x_backward: grad_out must have an even height and width "
                          f"[B,C,2H,2W], got {shape_text(grad_out.shape)}")
    return UPSAMPLE_NEAREST2X_BACKWARD(grad_out)
