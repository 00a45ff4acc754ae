"""Nearest-neighbour 2x upsampling (torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")).

Versions:
  1. upsample_nearest2x_ref   NumPy API (numpy or cupy): np.repeat along H, then along W (two passes,
                           one temporary of the half-upsampled size).
  2. upsample_nearest2x_fast  Numba (_upsample_numba), prange over the B*C planes (each plane is contiguous in NCHW):
                           each input row is widened once into output row 2h and copied to row
                           2h+1, so x is read once and the output written once.
  cupy arrays: one thread per output pixel (npdiff/kernels/cuda/elementwise.py).
"""

import numpy as np

from npdiff import backend
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.validate import require_ndim


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
