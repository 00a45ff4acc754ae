"""Normalisation: group_norm (optionally fused with SiLU) and layer_norm.

Versions:
  group_norm_ref / layer_norm_ref   NumPy API (numpy or cupy): statistics in float64 via mean/var
                                    over a reshaped view, then normalise in float32 (several passes
                                    and temporaries; easy to read).
  _group_norm_numba                 Numba, prange over (batch, group) pairs. Each task owns one
                                    contiguous slab x[b, g*Cg:(g+1)*Cg, ...] (C_per_group * spatial
                                    floats in a row, since NCHW puts the spatial axes innermost).
                                    Pass 1 accumulates sum and sum of squares in float64 (exact
                                    enough: float64 keeps ~16 digits, the variance needs ~7); pass
                                    2 writes (x - mean) * rstd * weight + bias (in float64, cast
                                    once on the write), with SiLU fused in
                                    the same write, so the ResNet block's GroupNorm+SiLU reads x
                                    twice and writes once.
  _layer_norm_numba                 Numba, prange over rows (all leading axes flattened); each row
                                    is contiguous; same two passes.

torch semantics: biased variance (divide by n), eps added to the variance, rstd = 1/sqrt(var+eps).
"""

import math

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import FASTMATH_SAFE, PARALLEL, njit, prange
from npdiff.kernels.activations import silu_ref
from npdiff.kernels.validate import require_min_ndim, require_optional_vector


# ---------------------------------------------------------------------------------------------
# Reference (NumPy API, numpy or cupy)
# ---------------------------------------------------------------------------------------------
def group_norm_ref(x, num_groups, weight, bias, eps=1e-5, silu=False):
    xp = backend.array_module(x)
    batch, channels = x.shape[0], x.shape[1]
    grouped = x.reshape(batch, num_groups, -1).astype(xp.float64)  # [B,C,...] -> [B,G,Cg*S]
    mean = grouped.mean(axis=2, keepdims=True)  # [B,G,1]
    var = grouped.var(axis=2, keepdims=True)  # [B,G,1] biased, as torch
    normed = ((grouped - mean) / xp.sqrt(var + eps)).astype(xp.float32)  # [B,G,Cg*S]
    normed = normed.reshape(x.shape)  # [B,G,Cg*S] -> [B,C,...]
    per_channel = (1, channels) + (1,) * (x.ndim - 2)  # weight/bias broadcast over [B,C,...]
    if weight is not None:
        normed = normed * weight.reshape(per_channel)  # [B,C,...]
    if bias is not None:
        normed = normed + bias.reshape(per_channel)  # [B,C,...]
    return silu_ref(normed) if silu else normed


def layer_norm_ref(x, weight, bias, eps=1e-5):
    xp = backend.array_module(x)
    x64 = x.astype(xp.float64)  # [..., D]
    mean = x64.mean(axis=-1, keepdims=True)  # [..., 1]
    var = x64.var(axis=-1, keepdims=True)  # [..., 1]
    normed = ((x64 - mean) / xp.sqrt(var + eps)).astype(xp.float32)  # [..., D]
    if weight is not None:
        normed = normed * weight  # [..., D]
    if bias is not None:
        normed = normed + bias  # [..., D]
    return normed


# ---------------------------------------------------------------------------------------------
# Numba (NumPy arrays)
# ---------------------------------------------------------------------------------------------
@njit(**PARALLEL, fastmath=FASTMATH_SAFE)
def _group_norm_numba(x, weight, bias, eps, apply_silu, out):
    """x, out: [B, G, Cg, S] contiguous (S = product of spatial axes); weight, bias: [G, Cg]."""
    batch, groups, per_group, spatial = x.shape
    count = per_group * spatial
    for task in prange(batch * groups):
        b = task // groups
        g = task % groups
        # 1. statistics of the whole group in float64, of x - x[first] (the shift keeps
        #    sum_sq - sum^2/n from cancelling when |mean| >> std)
        shift0 = np.float64(x[b, g, 0, 0])
        total = 0.0
        total_sq = 0.0
        for c in range(per_group):
            for s in range(spatial):
                v = np.float64(x[b, g, c, s]) - shift0
                total += v
                total_sq += v * v
        mean_shifted = total / count
        var = max(total_sq / count - mean_shifted * mean_shifted, 0.0)
        mean = mean_shifted + shift0
        rstd = 1.0 / math.sqrt(var + eps)
        # 2. normalise, scale and shift per channel (+ SiLU), one write. (x - mean) is taken in
        #    float64: folding mean into a float32 shift (x*scale + shift) cancels when |mean| >> std.
        for c in range(per_group):
            scale = rstd * weight[g, c]
            shift = np.float64(bias[g, c])
            if apply_silu:
                for s in range(spatial):
                    v = (np.float64(x[b, g, c, s]) - mean) * scale + shift
                    e = math.exp(-abs(v))  # sigmoid from exp(-|v|) <= 1: never overflows
                    sigmoid = 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)
                    out[b, g, c, s] = v * sigmoid
            else:
                for s in range(spatial):
                    out[b, g, c, s] = (np.float64(x[b, g, c, s]) - mean) * scale + shift


@njit(**PARALLEL, fastmath=FASTMATH_SAFE)
def _layer_norm_numba(x, weight, bias, eps, out):
    """x, out: [R, D] contiguous rows; weight, bias: [D]."""
    rows, width = x.shape
    for r in prange(rows):
        shift0 = np.float64(x[r, 0])  # shifted sums, as in group norm
        total = 0.0
        total_sq = 0.0
        for i in range(width):
            v = np.float64(x[r, i]) - shift0
            total += v
            total_sq += v * v
        mean_shifted = total / width
        var = max(total_sq / width - mean_shifted * mean_shifted, 0.0)
        mean = mean_shifted + shift0
        rstd = 1.0 / math.sqrt(var + eps)
        for i in range(width):  # (x - mean) in float64, as in group norm
            out[r, i] = (np.float64(x[r, i]) - mean) * rstd * weight[i] + bias[i]


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False):
    """torch.nn.functional.group_norm (then SiLU if silu=True). x: [B,C,...]; weight, bias: [C] or None."""
    require_min_ndim("group_norm", "x", x, 2, "[B,C,...]")
    channels = x.shape[1]
    if not isinstance(num_groups, (int, np.integer)) or num_groups <= 0 or channels % num_groups:
        raise NpdiffError(f"group_norm: num_groups must be a positive divisor of the channel count "
                          f"C={channels} of x {list(x.shape)}, got {num_groups!r}")
    require_optional_vector("group_norm", "weight", weight, channels)
    require_optional_vector("group_norm", "bias", bias, channels)
    if not backend.is_numpy(x):
        return group_norm_ref(x, num_groups, weight, bias, eps, silu)
    batch = x.shape[0]
    per_group = channels // num_groups
    slabs = np.ascontiguousarray(x).reshape(batch, num_groups, per_group, -1)  # [B,C,...] -> [B,G,Cg,S]
    scale = np.ones(channels, np.float32) if weight is None else np.ascontiguousarray(weight)  # [C]
    shift = np.zeros(channels, np.float32) if bias is None else np.ascontiguousarray(bias)  # [C]
    out = np.empty_like(slabs)  # [B,G,Cg,S]
    _group_norm_numba(slabs, scale.reshape(num_groups, per_group), shift.reshape(num_groups, per_group),
                      float(eps), bool(silu), out)
    return out.reshape(x.shape)  # [B,G,Cg,S] -> [B,C,...]


def layer_norm(x, weight, bias, eps=1e-5):
    """torch.nn.functional.layer_norm over the last axis. x: [..., D]; weight, bias: [D] or None."""
    require_min_ndim("layer_norm", "x", x, 1, "[..., D]")
    width = x.shape[-1]
    require_optional_vector("layer_norm", "weight", weight, width)
    require_optional_vector("layer_norm", "bias", bias, width)
    if not backend.is_numpy(x):
        return layer_norm_ref(x, weight, bias, eps)
    rows = np.ascontiguousarray(x).reshape(-1, width)  # [..., D] -> [R, D]
    scale = np.ones(width, np.float32) if weight is None else np.ascontiguousarray(weight)  # [D]
    shift = np.zeros(width, np.float32) if bias is None else np.ascontiguousarray(bias)  # [D]
    out = np.empty_like(rows)  # [R, D]
    _layer_norm_numba(rows, scale, shift, float(eps), out)
    return out.reshape(x.shape)  # [R, D] -> [..., D]
