"""2-D convolution, NCHW, torch's weight layout [C_out, C_in, kH, kW] (cross-correlation, as torch).

Versions:
  conv2d_ref     NumPy API (numpy or cupy): pad once, then for each of the kH*kW taps add
                 W[:, :, i, j] @ (the strided window of x that tap sees). Simple, a temporary per tap.
  conv2d (fast)  1x1, stride 1, no padding: a plain GEMM W [C_out, C_in] @ x [C_in, H*W] per image.
                 Otherwise im2col tiled over output rows: a tile of rows is unfolded into
                 cols [C_in*kH*kW, rows*W_out] (never more than IM2COL_TILE_BYTES), and one sgemm
                 W [C_out, C_in*kH*kW] @ cols writes those output rows. Memory stays bounded at the
                 VAE's 512x512 images (a whole-image im2col would be >1 GB).
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.kernels.validate import pair, require_ndim, require_optional_vector, shape_text

IM2COL_TILE_BYTES = 8 << 20  # at most this much unfolded input per GEMM


def output_size(size, kernel_size, stride, padding):
    return (size + 2 * padding - kernel_size) // stride + 1


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
# Fast (NumPy arrays): GEMM through OpenBLAS
# ---------------------------------------------------------------------------------------------
def _conv1x1(x, weight, bias):
    batch, c_in, height, width = x.shape
    c_out = weight.shape[0]
    pixels = np.ascontiguousarray(x).reshape(batch, c_in, height * width)  # [B,C_in,H*W]
    out = np.matmul(weight.reshape(c_out, c_in), pixels)  # [C_out,C_in] @ [B,C_in,H*W] -> [B,C_out,H*W]
    if bias is not None:
        out += bias[:, None]  # [B,C_out,H*W]
    return out.reshape(batch, c_out, height, width)


def _conv_im2col_tiled(x, weight, bias, sh, sw, ph, pw):
    batch, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = output_size(height, kh, sh, ph), output_size(width, kw, sw, pw)
    padded = pad_image(x, ph, pw)  # [B,C_in,H+2ph,W+2pw]
    weight_2d = weight.reshape(c_out, c_in * kh * kw)  # [C_out, C_in*kH*kW]
    bytes_per_row = c_in * kh * kw * w_out * 4
    rows_per_tile = max(1, min(h_out, IM2COL_TILE_BYTES // bytes_per_row))
    cols = np.empty((c_in, kh, kw, rows_per_tile, w_out), np.float32)  # one tile of unfolded input
    out = np.empty((batch, c_out, h_out, w_out), np.float32)  # [B,C_out,Ho,Wo]
    for b in range(batch):
        for row0 in range(0, h_out, rows_per_tile):
            rows = min(rows_per_tile, h_out - row0)
            tile = cols[:, :, :, :rows, :]  # [C_in,kH,kW,rows,Wo]
            for i in range(kh):
                for j in range(kw):
                    top = row0 * sh + i
                    tile[:, i, j] = padded[b, :, top:top + sh * (rows - 1) + 1:sh,
                                           j:j + sw * (w_out - 1) + 1:sw]  # [C_in,rows,Wo]
            if rows == rows_per_tile:
                unfolded = cols.reshape(c_in * kh * kw, rows * w_out)  # [C_in*kH*kW, rows*Wo]
            else:
                unfolded = np.ascontiguousarray(tile).reshape(c_in * kh * kw, rows * w_out)
            result = weight_2d @ unfolded  # [C_out, C_in*kH*kW] @ [.., rows*Wo] -> [C_out, rows*Wo]
            out[b, :, row0:row0 + rows, :] = result.reshape(c_out, rows, w_out)
    if bias is not None:
        out += bias[:, None, None]  # [B,C_out,Ho,Wo] + [C_out,1,1]
    return out


def check_conv2d(x, weight, bias, stride, padding):
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
    h_out = output_size(x.shape[2], kh, sh, ph)
    w_out = output_size(x.shape[3], kw, sw, pw)
    if h_out < 1 or w_out < 1:
        raise NpdiffError(f"conv2d: x {shape_text(x.shape)} with padding {(ph, pw)} is smaller than "
                          f"the kernel {kh}x{kw} of weight {shape_text(weight.shape)}")
    return sh, sw, ph, pw


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """torch.nn.functional.conv2d(x, weight, bias, stride, padding) for float32 NCHW.

    x [B,C_in,H,W], weight [C_out,C_in,kH,kW], bias [C_out] or None; stride, padding: int or (h, w).
    Returns [B,C_out,H_out,W_out].
    """
    sh, sw, ph, pw = check_conv2d(x, weight, bias, stride, padding)
    if not backend.is_numpy(x):
        return conv2d_ref(x, weight, bias, (sh, sw), (ph, pw))
    kh, kw = weight.shape[2:]
    if kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0:
        return _conv1x1(x, weight, bias)
    return _conv_im2col_tiled(x, weight, bias, sh, sw, ph, pw)
