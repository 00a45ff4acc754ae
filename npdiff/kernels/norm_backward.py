"""Backward of norm.py: layer_norm and group_norm (optionally followed by SiLU).

Over one normalised set of n values (a row for layer_norm, a (batch, group) slab for group_norm),
with xhat = (x - mean) * rstd and y = xhat * w + b (w, b per feature / per channel):
    g      = dy * w                                  (for group_norm + SiLU, dy is first multiplied
                                                      by silu'(z), z = xhat * w + b recomputed)
    dx     = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dw     = sum over the other axes of dy * xhat,   db = sum of dy
The statistics are recomputed from x (cheaper than storing them: one pass over x).
residual: the gradient of a residual branch around the norm (x also added to the block's output,
as every norm of the UNet and CLIP sits), added to dx in the same pass: dx + residual, so the
backward's residual sums are not a separate one-thread NumPy add over the whole activation.

Versions:
  1. layer_norm_backward_ref / group_norm_backward_ref   NumPy API, statistics and sums in float64.
  2. layer_norm_backward_fast / group_norm_backward_fast  Numba, prange over rows / (batch, group)
     slabs, each contiguous (the forward's layout); pass 1 mean_and_rstd of norm.py, pass 2 the two
     float64 sums mean(g) and mean(g * xhat), pass 3 writes dx. The weight/bias gradients are
     reductions across rows / batch: NumPy sums of dy * xhat (recomputed once more, only when asked:
     need_weight_grad=False, a frozen layer, skips those passes and returns None for both).
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.activations_backward import silu_backward_ref
from npdiff.kernels.lane_sums import dot_centred_f64, sum_f64
from npdiff.kernels.norm import mean_and_rstd
from npdiff.kernels.validate import (
    require_min_ndim,
    require_optional_vector,
    shape_text,
)
from npdiff.kernels.vecmath import sigmoid_f32


# ---------------------------------------------------------------------------------------------
# Reference (NumPy API)
# ---------------------------------------------------------------------------------------------
def _normalised_backward_ref(x64, g64, eps, axis):
    """x64, g64 float64 with the normalised axes `axis`: -> (dx, xhat), float64."""
    xp = backend.array_module(x64)
    mean = x64.mean(axis=axis, keepdims=True)
    rstd = 1.0 / xp.sqrt(x64.var(axis=axis, keepdims=True) + eps)
    xhat = (x64 - mean) * rstd
    grad_x = rstd * (g64 - g64.mean(axis=axis, keepdims=True) - xhat * (g64 * xhat).mean(axis=axis, keepdims=True))
    return grad_x, xhat


def layer_norm_backward_ref(x, weight, bias, grad_out, eps=1e-5, need_weight_grad=True, residual=None):
    xp = backend.array_module(x)
    x64, dy64 = x.astype(xp.float64), grad_out.astype(xp.float64)  # [..., D]
    g64 = dy64 * weight if weight is not None else dy64  # [..., D]
    grad_x, xhat = _normalised_backward_ref(x64, g64, eps, axis=-1)  # [..., D]
    if residual is not None:
        grad_x = grad_x + residual  # [..., D]
    if not need_weight_grad:
        return grad_x.astype(xp.float32), None, None
    lead = tuple(range(x.ndim - 1))
    grad_weight = (dy64 * xhat).sum(axis=lead).astype(xp.float32)  # [D]
    grad_bias = dy64.sum(axis=lead).astype(xp.float32)  # [D]
    return grad_x.astype(xp.float32), grad_weight, grad_bias


def group_norm_backward_ref(x, num_groups, weight, bias, grad_out, eps=1e-5, silu=False, need_weight_grad=True,
                            residual=None):
    xp = backend.array_module(x)
    batch, channels = x.shape[0], x.shape[1]
    per_channel = (1, channels) + (1,) * (x.ndim - 2)  # weight/bias broadcast over [B,C,...]
    grouped = x.reshape(batch, num_groups, -1).astype(xp.float64)  # [B,G,Cg*S]
    dy64 = grad_out.astype(xp.float64)  # [B,C,...]
    w64 = xp.ones(per_channel) if weight is None else weight.reshape(per_channel).astype(xp.float64)
    if silu:
        # 1. recompute z = xhat * w + b, then dy <- dy * silu'(z)
        mean = grouped.mean(axis=2, keepdims=True)  # [B,G,1]
        rstd = 1.0 / xp.sqrt(grouped.var(axis=2, keepdims=True) + eps)  # [B,G,1]
        z = ((grouped - mean) * rstd).reshape(x.shape) * w64  # [B,C,...]
        if bias is not None:
            z = z + bias.reshape(per_channel)
        dy64 = silu_backward_ref(z, dy64)  # [B,C,...]
    # 2. through the normalisation, per (batch, group)
    g64 = (dy64 * w64).reshape(batch, num_groups, -1)  # [B,G,Cg*S]
    grad_x, xhat = _normalised_backward_ref(grouped, g64, eps, axis=2)  # [B,G,Cg*S]
    if residual is not None:
        grad_x = grad_x + residual.reshape(grad_x.shape)  # [B,G,Cg*S]
    if not need_weight_grad:
        return grad_x.reshape(x.shape).astype(xp.float32), None, None
    xhat = xhat.reshape(x.shape)  # [B,C,...]
    others = (0,) + tuple(range(2, x.ndim))
    grad_weight = (dy64 * xhat).sum(axis=others).astype(xp.float32)  # [C]
    grad_bias = dy64.sum(axis=others).astype(xp.float32)  # [C]
    return grad_x.reshape(x.shape).astype(xp.float32), grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Numba (NumPy arrays)
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def normalised_run_backward(x, g, mean, rstd, grad_x, residual, add_residual):
    """grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ residual where add_residual) over
    one contiguous normalised set. The two sums in float64 in an order fixed by the source
    (lane_sums.py; no fastmath flag: the same bits in every compiled copy)."""
    mean_g = sum_f64(g) / x.size
    mean_g_xhat = dot_centred_f64(g, x, mean) * rstd / x.size  # sum of g * (x - mean) * rstd
    if add_residual:
        for i in range(x.size):
            xhat = (np.float64(x[i]) - mean) * rstd
            grad_x[i] = rstd * (g[i] - mean_g - xhat * mean_g_xhat) + residual[i]
    else:
        for i in range(x.size):
            xhat = (np.float64(x[i]) - mean) * rstd
            grad_x[i] = rstd * (g[i] - mean_g - xhat * mean_g_xhat)


@njit(**PARALLEL)
def _layer_norm_backward_numba(x, weight, grad_out, eps, residual, add_residual, grad_x):
    """x, grad_out, grad_x: [R, D] contiguous rows; weight: [D]; residual [R, D] (read where add_residual)."""
    for r in prange(x.shape[0]):
        mean, rstd = mean_and_rstd(x[r], eps)
        g = grad_out[r] * weight  # [D]
        normalised_run_backward(x[r], g, mean, rstd, grad_x[r], residual[r], add_residual)


@njit(**PARALLEL)
def _group_norm_backward_numba(x, weight, bias, grad_out, eps, apply_silu, residual, add_residual, grad_x, grad_y,
                               keep_grad_y):
    """x, grad_out, grad_x, grad_y: [B, G, Cg*S] contiguous; weight, bias: [G, Cg]. grad_y receives
    the gradient at the norm's output (dy, or dy * silu'(z) with SiLU) for the weight gradients where
    keep_grad_y (else it is not written: frozen layers need no weight gradients, and the pass
    writes one array fewer); residual [B, G, Cg*S] is added to grad_x where add_residual."""
    batch, groups, count = x.shape
    per_group = weight.shape[1]
    spatial = count // per_group
    for task in prange(batch * groups):
        b = task // groups
        grp = task % groups
        # 1. statistics of the group
        mean, rstd = mean_and_rstd(x[b, grp], eps)
        # 2. dy (through SiLU) and g = dy * w, channel by channel
        g = np.empty(count, np.float32)
        for c in range(per_group):
            w = weight[grp, c]
            for s in range(c * spatial, (c + 1) * spatial):
                dy = grad_out[b, grp, s]
                if apply_silu:
                    z = np.float32((np.float64(x[b, grp, s]) - mean) * rstd * w + bias[grp, c])
                    sig = sigmoid_f32(z)
                    dy = dy * sig * (np.float32(1.0) + z * (np.float32(1.0) - sig))
                if keep_grad_y:
                    grad_y[b, grp, s] = dy
                g[s] = dy * w
        # 3. through the normalisation
        normalised_run_backward(x[b, grp], g, mean, rstd, grad_x[b, grp], residual[b, grp], add_residual)


def residual_like(residual, shape):
    """-> (residual as a contiguous float32 array of `shape`, whether to add it); a 1-element stand-in
    broadcast to `shape` (never read) when there is none."""
    if residual is None:
        return np.broadcast_to(np.zeros(1, np.float32), shape), False
    return np.ascontiguousarray(residual, dtype=np.float32).reshape(shape), True


def layer_norm_backward_fast(x, weight, bias, grad_out, eps=1e-5, need_weight_grad=True, residual=None):
    width = x.shape[-1]
    rows = np.ascontiguousarray(x).reshape(-1, width)  # [..., D] -> [R, D]
    grad_rows = np.ascontiguousarray(grad_out).reshape(-1, width)  # [R, D]
    scale = np.ones(width, np.float32) if weight is None else np.ascontiguousarray(weight)  # [D]
    residual_rows, add_residual = residual_like(residual, rows.shape)  # [R, D]
    grad_x = np.empty_like(rows)  # [R, D]
    _layer_norm_backward_numba(rows, scale, grad_rows, float(eps), residual_rows, add_residual, grad_x)
    if not need_weight_grad:
        return grad_x.reshape(x.shape), None, None
    # weight/bias gradients: sums over rows of dy * xhat and dy
    mean = rows.mean(axis=1, keepdims=True, dtype=np.float64)  # [R,1]
    rstd = 1.0 / np.sqrt(rows.var(axis=1, keepdims=True, dtype=np.float64) + eps)  # [R,1]
    xhat = ((rows - mean) * rstd).astype(np.float32)  # [R, D]
    grad_weight = np.einsum("rd,rd->d", grad_rows, xhat, dtype=np.float64).astype(np.float32)  # [D]
    grad_bias = grad_rows.sum(axis=0, dtype=np.float64).astype(np.float32)  # [D]
    return grad_x.reshape(x.shape), grad_weight, grad_bias


def group_norm_backward_fast(x, num_groups, weight, bias, grad_out, eps=1e-5, silu=False, need_weight_grad=True,
                             residual=None):
    batch, channels = x.shape[0], x.shape[1]
    per_group = channels // num_groups
    slabs = np.ascontiguousarray(x).reshape(batch, num_groups, -1)  # [B,C,...] -> [B,G,Cg*S]
    grad_slabs = np.ascontiguousarray(grad_out).reshape(slabs.shape)  # [B,G,Cg*S]
    scale = np.ones(channels, np.float32) if weight is None else np.ascontiguousarray(weight)  # [C]
    shift = np.zeros(channels, np.float32) if bias is None else np.ascontiguousarray(bias)  # [C]
    residual_slabs, add_residual = residual_like(residual, slabs.shape)  # [B,G,Cg*S]
    grad_x = np.empty_like(slabs)  # [B,G,Cg*S]
    # dy at the norm's output (after SiLU's backward), for the weight gradients only: else a
    # stand-in of the same type that the kernel never writes
    grad_y = np.empty_like(slabs) if need_weight_grad else np.empty((1, 1, 1), np.float32)  # [B,G,Cg*S]
    _group_norm_backward_numba(slabs, scale.reshape(num_groups, per_group), shift.reshape(num_groups, per_group),
                               grad_slabs, float(eps), bool(silu), residual_slabs, add_residual, grad_x, grad_y,
                               bool(need_weight_grad))
    if not need_weight_grad:
        return grad_x.reshape(x.shape), None, None
    # weight/bias gradients: per channel sums over batch and space of dy * xhat and dy
    mean = slabs.mean(axis=2, keepdims=True, dtype=np.float64)  # [B,G,1]
    rstd = 1.0 / np.sqrt(slabs.var(axis=2, keepdims=True, dtype=np.float64) + eps)  # [B,G,1]
    xhat = ((slabs - mean) * rstd).astype(np.float32).reshape(batch, channels, -1)  # [B,C,S]
    grad_y = grad_y.reshape(batch, channels, -1)  # [B,C,S]
    grad_weight = np.einsum("bcs,bcs->c", grad_y, xhat, dtype=np.float64).astype(np.float32)  # [C]
    grad_bias = grad_y.sum(axis=(0, 2), dtype=np.float64).astype(np.float32)  # [C]
    return grad_x.reshape(x.shape), grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
LAYER_NORM_BACKWARD = dispatch.register("layer_norm_backward", fast=layer_norm_backward_fast,
                                        reference=layer_norm_backward_ref)
GROUP_NORM_BACKWARD = dispatch.register("group_norm_backward", fast=group_norm_backward_fast,
                                        reference=group_norm_backward_ref)


def check_grad_like_x(kernel, x, grad, name="grad_out"):
    """NpdiffError unless grad (None passes) has x's shape."""
    if grad is not None and tuple(grad.shape) != tuple(x.shape):
        raise NpdiffError(f"{kernel}: {name} must have the shape of x {shape_text(x.shape)}, "
                          f"got {shape_text(grad.shape)}")


def layer_norm_backward(x, weight, bias, grad_out, eps=1e-5, need_weight_grad=True, residual=None):
    """Gradients of y = layer_norm(x, weight, bias, eps) -> (dx [..., D], dweight [D], dbias [D]);
    dweight, dbias are None unless need_weight_grad. residual (x's shape): added to dx (a residual
    branch's gradient, in the same pass)."""
    require_min_ndim("layer_norm_backward", "x", x, 1, "[..., D]")
    require_optional_vector("layer_norm_backward", "weight", weight, x.shape[-1])
    check_grad_like_x("layer_norm_backward", x, grad_out)
    check_grad_like_x("layer_norm_backward", x, residual, "residual")
    return LAYER_NORM_BACKWARD(x, weight, bias, grad_out, eps, need_weight_grad, residual)


def group_norm_backward(x, num_groups, weight, bias, grad_out, eps=1e-5, silu=False, need_weight_grad=True,
                        residual=None):
    """Gradients of y = group_norm(x, num_groups, weight, bias, eps, silu) -> (dx [B,C,...],
    dweight [C], dbias [C]); x is the forward's input (the statistics are recomputed from it);
    dweight, dbias are None unless need_weight_grad. residual (x's shape): added to dx (a residual
    branch's gradient, in the same pass)."""
    require_min_ndim("group_norm_backward", "x", x, 2, "[B,C,...]")
    channels = x.shape[1]
    if not isinstance(num_groups, (int, np.integer)) or num_groups <= 0 or channels % num_groups:
        raise NpdiffError(f"group_norm_backward: num_groups must be a positive divisor of C={channels}, "
                          f"got {num_groups!r}")
    require_optional_vector("group_norm_backward", "weight", weight, channels)
    require_optional_vector("group_norm_backward", "bias", bias, channels)
    check_grad_like_x("group_norm_backward", x, grad_out)
    check_grad_like_x("group_norm_backward", x, residual, "residual")
    return GROUP_NORM_BACKWARD(x, num_groups, weight, bias, grad_out, eps, silu, need_weight_grad, residual)

