"""Backward of conv.py's conv2d (NCHW, weight [C_out, C_in, kH, kW], stride s, padding p).

    dx  the input gradient is a convolution of dy (with s-1 zeros put between its pixels when
        s > 1) by the kernel flipped in both spatial axes with C_in and C_out swapped,
        W' [C_in, C_out, kH, kW] = W[:, :, ::-1, ::-1].transpose(1, 0), stride 1, padding k-1-p;
        rows/columns of x that no window reached (when (H + 2p - k) % s != 0) get 0.
    dW  the weight gradient is a correlation of the padded input with dy:
        dW[o, c, i, j] = sum over b, y, x of dy[b, o, y, x] * x_padded[b, c, y*s + i, x*s + j]
    db  = sum of dy over batch and space.

Versions:
  1. conv2d_backward_ref    NumPy API: dx tap by tap (the transposed product of each tap scattered
                            back into a padded buffer); dW tap by tap (dy @ the tap's window^T).
  2. conv2d_backward_fast   dx through conv.py's own conv2d (a frozen layer's flipped kernel is made
                            once and kept: FlippedKernels), so it takes the same fast path as a
                            forward of that shape: for the 3x3 stride-1 convs of SD (and the
                            stride-2 downsamplers, whose zero-dilated dy is a stride-1 conv too)
                            that is Winograd F(4x4,3x3) where conv_method picks it (at
                            batch 1 and 16x16 from 1280 channels, im2col: IM2COL_FEW_*), else im2col,
                            1x1 GEMM or the direct loops. dW: tiles of output rows unfolded by
                            conv.py's im2col_tile, one GEMM per tile dy_tile [C_out, n] @ cols^T
                            [n, C_in*kH*kW] accumulated (the forward's im2col read the other way).
"""

import weakref

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.kernels import dispatch
from npdiff.kernels.conv import (
    IM2COL_TILE_BYTES,
    check_conv2d,
    conv2d,
    im2col_tile,
    pad_image,
)
from npdiff.kernels.validate import output_size, shape_text


# ---------------------------------------------------------------------------------------------
# 1. Reference (NumPy API)
# ---------------------------------------------------------------------------------------------
def conv2d_backward_ref(x, weight, grad_out, stride=(1, 1), padding=(0, 0), need_weight_grad=True):
    xp = backend.array_module(x)
    (sh, sw), (ph, pw) = stride, padding
    batch, c_in, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = grad_out.shape[2], grad_out.shape[3]
    grad_rows = grad_out.reshape(batch, c_out, h_out * w_out)  # [B,C_out,Ho*Wo]
    padded = pad_image(x, ph, pw)  # [B,C_in,H+2ph,W+2pw]
    grad_padded = xp.zeros(padded.shape, xp.float32)  # [B,C_in,H+2ph,W+2pw]
    grad_weight = xp.zeros(weight.shape, xp.float32) if need_weight_grad else None  # [C_out,C_in,kH,kW]
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + sh * (h_out - 1) + 1, sh)
            cols = slice(j, j + sw * (w_out - 1) + 1, sw)
            # dx: the tap's weight^T times dy, added where this tap read x
            tap_grad = xp.matmul(weight[:, :, i, j].T, grad_rows)  # [C_in,C_out] @ [B,C_out,Ho*Wo] -> [B,C_in,Ho*Wo]
            grad_padded[:, :, rows, cols] += tap_grad.reshape(batch, c_in, h_out, w_out)
            if need_weight_grad:
                window = padded[:, :, rows, cols].reshape(batch, c_in, h_out * w_out)  # [B,C_in,Ho*Wo]
                per_image = xp.matmul(grad_rows, xp.swapaxes(window, 1, 2))  # [B,C_out,Ho*Wo] @ [B,Ho*Wo,C_in]
                grad_weight[:, :, i, j] = per_image.sum(axis=0)  # [C_out,C_in]
    grad_x = grad_padded[:, :, ph:ph + height, pw:pw + width]  # [B,C_in,H,W]
    grad_bias = grad_out.sum(axis=(0, 2, 3)) if need_weight_grad else None  # [C_out]
    return xp.ascontiguousarray(grad_x), grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# 2. Fast (NumPy arrays)
# ---------------------------------------------------------------------------------------------
class FlippedKernels:
    """The flipped, transposed kernels of FROZEN weights, made once per weight array and kept while
    that array lives (textual inversion runs the same frozen convs every step). NumPy's strided copy
    of the reversed taps runs at ~0.5-1 GB/s: ~60-130 ms for one 1280x1280x3x3 kernel, and it was
    made again for every conv of every backward (at SD 1.5 size several seconds per step). Memory:
    one more copy of each conv weight that a backward has used (SD 1.5's UNet: 564 M conv parameters,
    2.10 GiB float32).
    Keyed by the array's identity: a layer given a new weight array (LoRA fusing assigns a new one)
    gets a new entry; a weight changed IN PLACE needs forget() first."""

    def __init__(self):
        self.entries = {}  # id(weight) -> (weakref to weight, flipped)

    def get(self, weight):
        key = id(weight)
        entry = self.entries.get(key)
        if entry is not None and entry[0]() is weight:
            return entry[1]
        flipped = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # [C_in,C_out,kH,kW]
        self.entries[key] = (weakref.ref(weight, lambda _, key=key: self.entries.pop(key, None)), flipped)
        return flipped

    def forget(self):
        self.entries.clear()


FLIPPED_KERNELS = FlippedKernels()


def conv2d_input_grad(x_shape, weight, grad_out, stride, padding, frozen=False, input_channels=None):
    """dx [B,C_in,H,W]: dy (zero-dilated by the stride) convolved with the flipped, transposed kernel.
    frozen: the weight never changes in place, so its flipped kernel is kept (FLIPPED_KERNELS).
    input_channels: only dx[:, :input_channels] is made and returned (the flipped kernel's first rows,
    a contiguous slice), for a caller that needs the gradient of the leading channels only."""
    (sh, sw), (ph, pw) = stride, padding
    batch, c_out, h_out, w_out = grad_out.shape
    kh, kw = weight.shape[2], weight.shape[3]
    height, width = x_shape[2], x_shape[3]
    # 1. put s-1 zeros between dy's pixels, and r = (H + 2p - k) % s more after the last row/column
    #    (input rows past the last window but inside the padding's reach):
    #    [B,C_out,Ho,Wo] -> [B,C_out,(Ho-1)s+1+r_h,(Wo-1)s+1+r_w]
    rest_h, rest_w = (height + 2 * ph - kh) % sh, (width + 2 * pw - kw) % sw
    if sh > 1 or sw > 1:
        dilated = np.zeros((batch, c_out, (h_out - 1) * sh + 1 + rest_h, (w_out - 1) * sw + 1 + rest_w), np.float32)
        dilated[:, :, :(h_out - 1) * sh + 1:sh, :(w_out - 1) * sw + 1:sw] = grad_out
    else:
        dilated = grad_out
    # 2. the flipped kernel with the channel axes swapped: [C_out,C_in,kH,kW] -> [C_in,C_out,kH,kW]
    if frozen:
        flipped = FLIPPED_KERNELS.get(weight)
    else:
        flipped = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    if input_channels is not None:
        flipped = flipped[:input_channels]  # [c,C_out,kH,kW]: the leading input channels only (contiguous)
    # 3. a stride-1 "full" convolution (padding k-1-p) -> [B,C_in,H,W]; a padding p > k-1 (taps
    #    that only ever read zeros) is a crop of the result instead
    pad_h, pad_w = kh - 1 - ph, kw - 1 - pw
    full_padding = (max(pad_h, 0), max(pad_w, 0))
    grad_x = conv2d(dilated, flipped, None, stride=1, padding=full_padding)
    grad_x = grad_x[:, :, max(-pad_h, 0):max(-pad_h, 0) + height, max(-pad_w, 0):max(-pad_w, 0) + width]
    return np.ascontiguousarray(grad_x)


def conv2d_weight_grad(x, weight_shape, grad_out, stride, padding):
    """dW [C_out,C_in,kH,kW]: per tile of output rows, dy_tile @ im2col(x)_tile^T, accumulated."""
    (sh, sw), (ph, pw) = stride, padding
    batch, c_in = x.shape[0], x.shape[1]
    c_out, _, kh, kw = weight_shape
    h_out, w_out = grad_out.shape[2], grad_out.shape[3]
    depth = c_in * kh * kw
    x = np.ascontiguousarray(x)  # [B,C_in,H,W]
    grad_weight = np.zeros((c_out, depth), np.float32)  # [C_out, C_in*kH*kW]
    max_rows = max(1, IM2COL_TILE_BYTES // (depth * w_out * 4))
    for b in range(batch):
        for row0 in range(0, h_out, max_rows):
            rows = min(max_rows, h_out - row0)
            cols = np.empty((c_in, kh, kw, rows, w_out), np.float32)  # [C_in,kH,kW,rows,Wo]
            im2col_tile(x[b], row0, sh, sw, ph, pw, cols)
            grad_tile = np.ascontiguousarray(grad_out[b, :, row0:row0 + rows, :]).reshape(c_out, rows * w_out)
            grad_weight += np.matmul(grad_tile, cols.reshape(depth, rows * w_out).T)  # [C_out,n] @ [n,K]
    return grad_weight.reshape(weight_shape)


def conv2d_backward_fast(x, weight, grad_out, stride=(1, 1), padding=(0, 0), need_weight_grad=True):
    grad_x = conv2d_input_grad(x.shape, weight, grad_out, stride, padding)  # [B,C_in,H,W]
    if not need_weight_grad:
        return grad_x, None, None
    grad_weight = conv2d_weight_grad(x, weight.shape, grad_out, stride, padding)  # [C_out,C_in,kH,kW]
    grad_bias = grad_out.sum(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)  # [C_out]
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
CONV2D_BACKWARD = dispatch.register("conv2d_backward", fast=conv2d_backward_fast, reference=conv2d_backward_ref)


def conv2d_backward(x, weight, grad_out, stride=1, padding=0, need_weight_grad=True):
    """Gradients of y = conv2d(x, weight, bias, stride, padding) given dy [B,C_out,Ho,Wo] ->
    (dx [B,C_in,H,W], dW [C_out,C_in,kH,kW], db [C_out]); dW, db are None unless need_weight_grad."""
    sh, sw, ph, pw = check_conv2d(x, weight, None, stride, padding)
    kh, kw = weight.shape[2:]
    expected = (x.shape[0], weight.shape[0], output_size(x.shape[2], kh, sh, ph), output_size(x.shape[3], kw, sw, pw))
    if tuple(grad_out.shape) != expected:
        raise NpdiffError(f"conv2d_backward: grad_out must have conv2d's output shape {shape_text(expected)}, "
                          f"got {shape_text(grad_out.shape)}")
    return CONV2D_BACKWARD(x, weight, grad_out, (sh, sw), (ph, pw), need_weight_grad)
