"""Nearest-neighbour 2x upsampling (torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")).

Versions:
  1. upsample_nearest2x_ref   NumPy API (numpy or cupy): np.repeat along H, then along W (two passes,
                           one temporary of the half-upsampled size).
  2. upsample_nearest2x_fast  Numba (_upsample_numba), prange over the B*C planes (each plane is contiguous in NCHW):
                           each input row is widened once into output row 2h and copied to row
                           2h+1, so x is read once and the output written once.
  cupy arrays: one thread per output pixel (npdiff/kernels/cuda/elementwise.py).

Backward (training): each input pixel was copied into a 2x2 block, so its gradient is the sum of
the block's four gradients.
  1. upsample_nearest2x_backward_ref   NumPy API: reshape [B,C,H,2,W,2] and sum the two 2-axes.
  2. upsample_nearest2x_backward_fast  Numba, prange over the B*C planes: rows 2h and 2h+1 of the
                           plane's gradient read once, each output pixel written once.
"""

import numpy as np

from npdiff import backend
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.errors import NpdiffError
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


UPSAMPLE_NEAREST2X = dispatch.register("upsample_nearest2x", fast=upsample_nearest2x_fast,
                                       reference=upsample_nearest2x_ref, cuda="upsample_nearest2x")


def upsample_nearest2x(x):
    """x [B,C,H,W] -> [B,C,2H,2W], each pixel repeated in a 2x2 block (torch's nearest, factor 2)."""
    require_ndim("upsample_nearest2x", "x", x, 4, "[B,C,H,W]")
    return UPSAMPLE_NEAREST2X(x)


# ---------------------------------------------------------------------------------------------
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
