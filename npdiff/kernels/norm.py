"""Normalisation: group_norm (optionally fused with SiLU) and layer_norm.

Versions:
  1. group_norm_ref / layer_norm_ref   NumPy API (numpy or cupy): statistics in float64 via mean/var
                                    over a reshaped view, then normalise in float32 (several passes
                                    and temporaries; easy to read).
  2. group_norm_fast (_group_norm_numba)  Numba, prange over (batch, group) pairs. Each task owns one
                                    contiguous slab x[b, g*Cg:(g+1)*Cg, ...] (Cg * spatial floats in
                                    a row, since NCHW puts the spatial axes innermost).
                                    Pass 1 (mean_and_rstd) sums x and x^2 in float64 (the variance
                                    needs ~7 digits, float64 keeps ~16; the sums are of x - x[0] so
                                    a large mean does not cancel them). Pass 2 (normalize_run)
                                    writes (x - mean) * rstd * weight + bias per channel, in float64
                                    cast once on the write, with SiLU fused in that write, so the
                                    ResNet block's GroupNorm+SiLU reads x twice and writes once.
                                    Both passes are serial functions over contiguous runs, which
                                    LLVM vectorises (a loop inside the prange body is not).
  2. layer_norm_fast (_layer_norm_numba)  Numba, prange over rows (all leading axes flattened); each row
                                    is contiguous; the same two passes. Inputs of at most
                                    LAYER_NORM_SERIAL_MAX floats: the same rows on the calling thread
                                    (_layer_norm_serial; waking the threads costs more than the work).
  cupy arrays: npdiff/kernels/cuda/norm.py (npdiff/kernels/dispatch.py).
  group_norm_affine: pass 1 alone, as one affine map per (image, channel) for kernels that normalise
                                    while they read x (conv_fused.py: GroupNorm + SiLU inside a conv).

torch semantics: biased variance (divide by n), eps added to the variance, rstd = 1/sqrt(var+eps).
"""

import math

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from numba import carray

from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.activations import silu_ref
from npdiff.kernels.matmul_numba import _stack_row_f64, sum_lanes_in_tree
from npdiff.kernels.validate import require_min_ndim, require_optional_vector
from npdiff.kernels.vecmath import sigmoid_f32


# ---------------------------------------------------------------------------------------------
# Reference (NumPy API, numpy or cupy)
# ---------------------------------------------------------------------------------------------
def group_norm_ref(x, num_groups, weight, bias, eps=1e-5, silu=False):
    xp = backend.array_module(x)
    batch, channels = x.shape[0], x.shape[1]
    per_group = math.prod(x.shape[1:]) // num_groups  # Cg*S (spelled out: -1 is ambiguous when B = 0)
    grouped = x.reshape(batch, num_groups, per_group).astype(xp.float64)  # [B,C,...] -> [B,G,Cg*S]
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


# layer_norm of at most this many floats runs on the calling thread (CLIP's [2,77,768] = 118k):
# inside the CLIP forward (25 calls, right after OpenBLAS GEMMs) measured 5.3 ms per forward with
# the parallel kernel, 2.2 ms serial (load ~2-3); the forward's median 185 -> 181 ms.
LAYER_NORM_SERIAL_MAX = 1 << 18

# ---------------------------------------------------------------------------------------------
# Numba (NumPy arrays)
# ---------------------------------------------------------------------------------------------
STAT_LANES = 32  # float64 lanes of the partial sums: 4 zmm registers (a stack row of matmul_numba)


@njit(**SERIAL)
def mean_and_rstd(run, eps):
    """Mean and 1/sqrt(biased var + eps) of a contiguous run, accumulated in float64 as sums of
    x - run[0] (the shift keeps sum_sq - sum^2/n from cancelling when |mean| >> std).

    The sums run in STAT_LANES lanes (stack rows: registers) added in an order written out here, with
    no fastmath flag, so every compiled copy gives the same bits. (Numba links a copy of this function
    into each caller and optimises it again there; with fastmath 'reassoc' each copy's vectoriser chose
    its own order, and a process that compiled group_norm after other kernels gave other bits than a
    fresh one: tests/kernels/test_cache_bits.py.)"""
    shift0 = np.float64(run[0])
    sums = carray(_stack_row_f64(), STAT_LANES)
    squares = carray(_stack_row_f64(), STAT_LANES)
    for lane in range(STAT_LANES):
        sums[lane] = 0.0
        squares[lane] = 0.0
    full = run.size - run.size % STAT_LANES
    for k0 in range(0, full, STAT_LANES):
        block = run[k0:k0 + STAT_LANES]  # constant indices below: one vector load
        for lane in range(STAT_LANES):
            v = np.float64(block[lane]) - shift0
            sums[lane] += v
            squares[lane] += v * v
    tail_sum = 0.0  # the last run.size % STAT_LANES values, after the lanes
    tail_squares = 0.0
    for k in range(full, run.size):
        v = np.float64(run[k]) - shift0
        tail_sum += v
        tail_squares += v * v
    mean_shifted = (sum_lanes_in_tree(sums) + tail_sum) / run.size
    var = max((sum_lanes_in_tree(squares) + tail_squares) / run.size - mean_shifted * mean_shifted, 0.0)
    return mean_shifted + shift0, 1.0 / math.sqrt(var + eps)


@njit(**SERIAL)  # (no fastmath flag: the same bits in every compiled copy, as mean_and_rstd)
def normalize_run(run, mean, scale, shift, apply_silu, out):
    """out = (run - mean) * scale + shift (+ SiLU); (x - mean) in float64: folding the mean into a
    float32 shift (x*scale + shift') would cancel when |mean| >> std."""
    if apply_silu:
        for i in range(run.size):
            v = np.float32((np.float64(run[i]) - mean) * scale + shift)
            out[i] = v * sigmoid_f32(v)
    else:
        for i in range(run.size):
            out[i] = (np.float64(run[i]) - mean) * scale + shift


@njit(**SERIAL, inline="always")
def normalize_rows(x, b, c, first_y, mean, scale, shift, carried, rows):
    """rows[r] = SiLU((x[b, c, first_y + r] - mean[b, c]) * scale[b, c] + shift[c]) by normalize_run (group_norm's
    bits), zero for rows outside x; the first `carried` rows are the last `carried` of rows' previous
    content, moved up (a convolution's input transform that normalises as it reads: conv_fused.py).
    x [B,C,H,W]; rows [n, W] scratch; mean, scale [B,C], shift [C] from group_norm_affine."""
    count, height = rows.shape[0], x.shape[2]
    for r in range(carried):
        rows[r] = rows[count - carried + r]
    for r in range(carried, count):
        y = first_y + r
        if 0 <= y < height:
            normalize_run(x[b, c, y], mean[b, c], scale[b, c], shift[c], True, rows[r])
        else:
            rows[r] = 0.0


@njit(**PARALLEL)
def _group_norm_numba(x, weight, bias, eps, apply_silu, out):
    """x, out: [B, G, Cg*S] contiguous (S = product of spatial axes); weight, bias: [G, Cg]."""
    batch, groups, count = x.shape
    per_group = weight.shape[1]
    spatial = count // per_group
    for task in prange(batch * groups):
        b = task // groups
        g = task % groups
        # 1. statistics of the whole group (one contiguous slab of Cg*S floats)
        mean, rstd = mean_and_rstd(x[b, g], eps)
        # 2. normalise, scale and shift channel by channel (+ SiLU), one write
        for c in range(per_group):
            start = c * spatial
            normalize_run(x[b, g, start:start + spatial], mean, rstd * weight[g, c], np.float64(bias[g, c]),
                          apply_silu, out[b, g, start:start + spatial])


@njit(**PARALLEL)
def _group_statistics_numba(x, eps, mean, rstd):
    """x: [B, G, Cg*S] contiguous; mean, rstd: [B, G] float64 (pass 1 of _group_norm_numba alone)."""
    batch, groups = x.shape[0], x.shape[1]
    for task in prange(batch * groups):
        b = task // groups
        g = task % groups
        mean[b, g], rstd[b, g] = mean_and_rstd(x[b, g], eps)


def group_norm_affine(x, num_groups, weight, bias, eps=1e-5):
    """group_norm as one affine map per (image, channel): y = (x - mean[b,c]) * scale[b,c] + shift[c],
    float64, with the statistics of pass 1 and the products of pass 2 of group_norm_fast (so
    normalize_run(x[b, c], mean[b, c], scale[b, c], shift[c], ...) gives group_norm's bits). For kernels
    that normalise while they read x (conv_fused.py). x [B,C,...] NumPy float32; weight, bias [C] or None.
    Returns mean [B,C], scale [B,C], shift [C]."""
    batch, channels = x.shape[0], x.shape[1]
    slabs = np.ascontiguousarray(x).reshape(batch, num_groups, -1)  # [B,C,...] -> [B,G,Cg*S]
    mean = np.empty((batch, num_groups), np.float64)  # [B,G]
    rstd = np.empty((batch, num_groups), np.float64)  # [B,G]
    _group_statistics_numba(slabs, float(eps), mean, rstd)
    per_group = channels // num_groups
    weight = np.ones(channels, np.float32) if weight is None else weight  # [C]
    shift = np.zeros(channels, np.float64) if bias is None else bias.astype(np.float64)  # [C]
    # (rstd * weight: a float64 product of a float32, as _group_norm_numba's rstd * weight[g, c])
    scale = np.repeat(rstd, per_group, axis=1) * weight.astype(np.float64)  # [B,G] -> [B,C]
    return np.repeat(mean, per_group, axis=1), scale, shift  # [B,C], [B,C], [C]


@njit(**SERIAL)
def _layer_norm_row(row, weight, bias, eps, out):
    mean, rstd = mean_and_rstd(row, eps)
    for i in range(row.size):
        out[i] = (np.float64(row[i]) - mean) * rstd * weight[i] + bias[i]


@njit(**PARALLEL)
def _layer_norm_numba(x, weight, bias, eps, out):
    """x, out: [R, D] contiguous rows; weight, bias: [D]."""
    for r in prange(x.shape[0]):
        _layer_norm_row(x[r], weight, bias, eps, out[r])


@njit(**SERIAL)
def _layer_norm_serial(x, weight, bias, eps, out):
    """_layer_norm_numba on the calling thread, for inputs too small to pay for waking the threads."""
    for r in range(x.shape[0]):
        _layer_norm_row(x[r], weight, bias, eps, out[r])


def group_norm_fast(x, num_groups, weight, bias, eps=1e-5, silu=False):
    batch, channels = x.shape[0], x.shape[1]
    per_group = channels // num_groups
    slabs = np.ascontiguousarray(x).reshape(batch, num_groups, -1)  # [B,C,...] -> [B,G,Cg*S]
    scale = np.ones(channels, np.float32) if weight is None else np.ascontiguousarray(weight)  # [C]
    shift = np.zeros(channels, np.float32) if bias is None else np.ascontiguousarray(bias)  # [C]
    out = np.empty_like(slabs)  # [B,G,Cg*S]
    _group_norm_numba(slabs, scale.reshape(num_groups, per_group), shift.reshape(num_groups, per_group),
                      float(eps), bool(silu), out)
    return out.reshape(x.shape)  # [B,G,Cg*S] -> [B,C,...]


def layer_norm_fast(x, weight, bias, eps=1e-5):
    width = x.shape[-1]
    rows = np.ascontiguousarray(x).reshape(-1, width)  # [..., D] -> [R, D]
    scale = np.ones(width, np.float32) if weight is None else np.ascontiguousarray(weight)  # [D]
    shift = np.zeros(width, np.float32) if bias is None else np.ascontiguousarray(bias)  # [D]
    out = np.empty_like(rows)  # [R, D]
    small = rows.size <= LAYER_NORM_SERIAL_MAX
    (_layer_norm_serial if small else _layer_norm_numba)(rows, scale, shift, float(eps), out)
    return out.reshape(x.shape)  # [R, D] -> [..., D]


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
GROUP_NORM = dispatch.register("group_norm", fast=group_norm_fast, reference=group_norm_ref, cuda="group_norm")
LAYER_NORM = dispatch.register("layer_norm", fast=layer_norm_fast, reference=layer_norm_ref, cuda="layer_norm")


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False):
    """torch.nn.functional.group_norm (then SiLU if silu=True). x: [B,C,...]; weight, bias: [C] or None."""
    check_group_norm(x, num_groups, weight, bias)
    return GROUP_NORM(x, num_groups, weight, bias, eps, silu)


def check_group_norm(x, num_groups, weight, bias):
    """group_norm's input checks (NpdiffError naming the argument)."""
    require_min_ndim("group_norm", "x", x, 2, "[B,C,...]")
    channels = x.shape[1]
    if not isinstance(num_groups, (int, np.integer)) or num_groups <= 0 or channels % num_groups:
        raise NpdiffError(f"group_norm: num_groups must be a positive divisor of the channel count "
                          f"C={channels} of x {list(x.shape)}, got {num_groups!r}")
    require_optional_vector("group_norm", "weight", weight, channels)
    require_optional_vector("group_norm", "bias", bias, channels)


def layer_norm(x, weight, bias, eps=1e-5):
    """torch.nn.functional.layer_norm over the last axis. x: [..., D]; weight, bias: [D] or None."""
    require_min_ndim("layer_norm", "x", x, 1, "[..., D]")
    width = x.shape[-1]
    require_optional_vector("layer_norm", "weight", weight, width)
    require_optional_vector("layer_norm", "bias", bias, width)
    return LAYER_NORM(x, weight, bias, eps)
