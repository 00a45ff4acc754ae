"""Backward of linear.py: linear, linear_activation and geglu.

For y = x W^T + b over rows x [R, in] (all leading axes flattened), W [out, in]:
    dx = dy W          [R, out] @ [out, in]  -> [R, in]
    dW = dy^T x        [out, R] @ [R, in]    -> [out, in]
    db = sum_rows dy   [R, out]              -> [out]

Versions:
  1. linear_backward_ref   NumPy API: the three products as written.
  2. linear_backward_fast  the same two GEMMs through block_pool.matmul (one-thread OpenBLAS sgemm
                           per block on npdiff's own threads, as the forward's: OpenBLAS's threads
                           and their busy-wait never meet the Numba kernels around; the transposes
                           are views read with sgemm's transpose flags, no copies); the rows are
                           flattened once, and the weight/bias gradients are only computed when
                           asked for (weights frozen: textual inversion needs dx only).
  linear_input_grad: dx alone for a frozen layer whose input is not at hand (dy W, the same GEMM).
  linear_input_grads_summed: sum_i dy_i W_i for frozen layers that read one input (a self-attention's
  to_q, to_k, to_v): per block of rows on the pool, each product added while in cache (no whole-array
  one-thread NumPy adds after three GEMMs).
  geglu_backward / linear_activation_backward: the forward's hidden layer h = x W^T + b is
  recomputed (one GEMM; no [R, 2D] kept per call: CLIP's MLP, and the UNet's recompute path), the
  activation's backward (activations_backward.py) gives dh, then linear_backward. GEGLU with the exact gelu (SD's)
  on NumPy arrays: dh in one Numba pass over h and dy (geglu_hidden_grad).
  geglu_forward_saved / geglu_input_grad: the hidden layer KEPT instead (the UNet tape, weights
  frozen): the forward writes h [R, 2D] into an array it returns (40 MiB per SD 1.5 block at 64x64),
  the backward starts from it: dh, then dh W, one GEMM per call instead of two.
    1. geglu_input_grad_ref   NumPy API: dh from the formulas of activations_backward.py, then dh W.
    2. geglu_input_grad_fast  at >= GEGLU_BLOCKS_MIN_ROWS rows, blocks of GEGLU_BLOCK_ROWS on the pool
                              (linear.py's geglu version 3, backwards): per block the serial Numba dh
                              pass into a block-sized scratch, then its one-thread GEMM while dh is in
                              cache; fewer rows: the parallel dh pass, then block_pool.matmul.
  lora_backward_ref / lora_backward_fast: the gradients of a LoRA pair on a linear layer (below).

LoRA (Hu et al. 2021; peft's and kohya's Linear LoRA): y = x (W + s U D)^T + b with down D [r, in],
up U [out, r] and s = alpha / r. The layer's weight gradient G = dy^T x [out, in] routed through the
product s U D:
    dU = s G D^T       [out, in] @ [in, r]   -> [out, r]
    dD = s U^T G       [r, out] @ [out, in]  -> [r, in]
    (dx = dy (W + s U D), the plain linear backward over the merged weight)
  1. lora_backward_ref   as written: G first (R*out*in multiply-adds), then the two small products.
  2. lora_backward_fast  G is never made: dU = s dy^T (x D^T), dD = s (dy U)^T x, four thin GEMMs (block_pool) of
                         R*r*(in+out) multiply-adds in all (r = 4, in = out = 320: ~40x fewer than G).
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import FASTMATH_CONTRACT, PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.activations import INV_SQRT2, check_approximate, gelu, gelu_ref
from npdiff.kernels.activations_backward import (
    ACTIVATION_BACKWARDS,
    INV_SQRT_2PI,
    gelu_backward,
    gelu_backward_ref,
)
from npdiff.kernels.block_pool import matmul, run_blocks, split_evenly, worker_count
from npdiff.kernels.linear import (
    GEGLU_BLOCK_ROWS,
    GEGLU_BLOCKS_MIN_ROWS,
    LINEAR_ACTIVATIONS,
    check_linear,
    geglu_fast,
    linear,
)
from npdiff.kernels.scratch import scratch
from npdiff.kernels.validate import require_float32, shape_text
from npdiff.kernels.vecmath import erfc_f32, exp_f32


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def linear_backward_ref(x, weight, grad_out, need_weight_grad=True):
    xp = backend.array_module(x)
    grad_x = xp.matmul(grad_out, weight)  # [..., out] @ [out, in] -> [..., in]
    if not need_weight_grad:
        return grad_x, None, None
    rows = x.reshape(-1, x.shape[-1])  # [R, in]
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # [R, out]
    grad_weight = grad_rows.T @ rows  # [out, R] @ [R, in] -> [out, in]
    grad_bias = grad_rows.sum(axis=0)  # [out]
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Fast
# ---------------------------------------------------------------------------------------------
def linear_backward_fast(x, weight, grad_out, need_weight_grad=True):
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # [..., out] -> [R, out] (a copy if strided)
    grad_x = matmul(grad_rows, weight)  # [R, out] @ [out, in] -> [R, in]
    grad_x = grad_x.reshape(x.shape)  # [R, in] -> [..., in]
    if not need_weight_grad:
        return grad_x, None, None
    rows = x.reshape(-1, x.shape[-1])  # [R, in]
    grad_weight = matmul(grad_rows.T, rows)  # [out, R] @ [R, in] -> [out, in]
    grad_bias = grad_rows.sum(axis=0, dtype=np.float64).astype(np.float32)  # [out]
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
LINEAR_BACKWARD = dispatch.register("linear_backward", fast=linear_backward_fast, reference=linear_backward_ref)


def check_grad_out(kernel, grad_out, expected_shape):
    if tuple(grad_out.shape) != tuple(expected_shape):
        raise NpdiffError(f"{kernel}: grad_out must have the forward output's shape {shape_text(expected_shape)}, "
                          f"got {shape_text(grad_out.shape)}")


def lora_backward_ref(x, down, up, grad_out, scale):
    xp = backend.array_module(x)
    rows = x.reshape(-1, x.shape[-1])  # [R, in]
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # [R, out]
    grad_weight = xp.matmul(grad_rows.T, rows)  # [out, R] @ [R, in] -> [out, in]
    grad_up = scale * xp.matmul(grad_weight, down.T)  # [out, in] @ [in, r] -> [out, r]
    grad_down = scale * xp.matmul(up.T, grad_weight)  # [r, out] @ [out, in] -> [r, in]
    return grad_down, grad_up


def lora_backward_fast(x, down, up, grad_out, scale):
    rows = x.reshape(-1, x.shape[-1])  # [R, in]
    grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # [R, out]
    down_rows = matmul(rows, down.T)  # [R, in] @ [in, r] -> [R, r]: the forward's x D^T
    grad_up = matmul(grad_rows.T, down_rows)  # [out, R] @ [R, r] -> [out, r]
    grad_down_rows = matmul(grad_rows, up)  # [R, out] @ [out, r] -> [R, r]
    grad_down = matmul(grad_down_rows.T, rows)  # [r, R] @ [R, in] -> [r, in]
    scale = np.float32(scale)
    return grad_down * scale, grad_up * scale


LORA_BACKWARD = dispatch.register("lora_backward", fast=lora_backward_fast, reference=lora_backward_ref)


def linear_backward(x, weight, grad_out, need_weight_grad=True):
    """Gradients of y = linear(x, weight, bias): -> (dx [..., in], dW [out, in], db [out]); dW and db
    are None when need_weight_grad is False. x: the forward's input; grad_out: d(loss)/dy [..., out]."""
    check_linear("linear_backward", x, weight, None)
    check_grad_out("linear_backward", grad_out, x.shape[:-1] + (weight.shape[0],))
    return LINEAR_BACKWARD(x, weight, grad_out, need_weight_grad)


def linear_input_grad(weight, grad_out):
    """dx = dy W of y = linear(x, weight, bias) with the weight frozen (x not needed):
    grad_out [..., out], weight [out, in] -> [..., in]."""
    if weight.ndim != 2 or grad_out.ndim < 1 or grad_out.shape[-1] != weight.shape[0]:
        raise NpdiffError(f"linear_input_grad: grad_out [..., out] must end in the weight's out = "
                          f"{weight.shape[0] if weight.ndim else '?'} (weight {shape_text(weight.shape)}), "
                          f"got {shape_text(grad_out.shape)}")
    if grad_out.ndim in (2, 3):
        return matmul(grad_out, weight)  # [(B,)N,out] @ [out,in] -> [(B,)N,in] (strided views read in place)
    rows = grad_out.reshape(-1, grad_out.shape[-1])  # [..., out] -> [R, out]
    return matmul(rows, weight).reshape(grad_out.shape[:-1] + (weight.shape[1],))  # [R, in] -> [..., in]


SUMMED_BLOCK_ROWS = 256  # rows per block of linear_input_grads_summed: a [256, in] partial product stays in L2


def linear_input_grads_summed(weights, grads_out):
    """sum_i grads_out[i] @ weights[i]: dx of frozen linear layers that all read the same input x
    (weights [out_i, in], grads_out [..., out_i] with the same leading axes) -> [..., in]. Per block of
    rows on the pool: the first product into the output, each next one into the worker's scratch and
    added while both are in cache."""
    lead, width = grads_out[0].shape[:-1], weights[0].shape[1]
    for weight, grad in zip(weights, grads_out):
        if weight.ndim != 2 or weight.shape[1] != width or grad.shape != lead + (weight.shape[0],):
            raise NpdiffError(f"linear_input_grads_summed: weight {shape_text(weight.shape)} and grad_out "
                              f"{shape_text(grad.shape)} do not match [..., out] @ [out, {width}] with leading axes "
                              f"{shape_text(lead)}")
    rows = [grad.reshape(-1, grad.shape[-1]) for grad in grads_out]    # [R, out_i] each
    if rows[0].shape[0] == 0 or width == 0:  # nothing to sum over (out_i = 0 gives zeros)
        return np.zeros(lead + (width,), np.float32)
    grad_x = np.empty((rows[0].shape[0], width), np.float32)           # [R, in]

    def run_block(bounds):
        first, stop = bounds
        block = grad_x[first:stop]                                      # [block, in] view
        np.matmul(rows[0][first:stop], weights[0], out=block)           # [block, out_0] @ [out_0, in]
        part = scratch("linear_summed_part", block.shape)               # [block, in]
        for grad_rows, weight in zip(rows[1:], weights[1:]):
            np.matmul(grad_rows[first:stop], weight, out=part)          # [block, out_i] @ [out_i, in]
            block += part

    run_blocks(run_block, split_evenly(rows[0].shape[0], SUMMED_BLOCK_ROWS, workers=worker_count()))
    return grad_x.reshape(lead + (width,))                              # [R, in] -> [..., in]


def lora_backward(x, down, up, grad_out, scale):
    """Gradients of a LoRA pair on a linear layer, y = x (W + scale * up @ down)^T + b:
    -> (d down [r, in], d up [out, r]). x: the layer's input [..., in]; grad_out: d(loss)/dy [..., out];
    down [r, in], up [out, r] float32; scale: alpha / r (times the user's multiplier)."""
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise NpdiffError(f"lora_backward: down must be [r, in] and up [out, r]; got down "
                          f"{shape_text(down.shape)}, up {shape_text(up.shape)}")
    check_linear("lora_backward", x, down, None)
    check_grad_out("lora_backward", grad_out, x.shape[:-1] + (up.shape[0],))
    return LORA_BACKWARD(x, down, up, grad_out, scale)


def linear_activation_backward(x, weight, bias, grad_out, activation="quick_gelu", need_weight_grad=True):
    """Gradients of y = activation(linear(x, weight, bias)) -> (dx, dW, db) as linear_backward."""
    if activation not in LINEAR_ACTIVATIONS:
        raise NpdiffError(f"linear_activation_backward: activation must be one of {tuple(LINEAR_ACTIVATIONS)}, "
                          f"got {activation!r}")
    hidden = linear(x, weight, bias)  # [..., in] -> [..., out] (recomputed)
    check_grad_out("linear_activation_backward", grad_out, hidden.shape)
    grad_hidden = ACTIVATION_BACKWARDS[activation](hidden, grad_out)  # [..., out]
    return linear_backward(x, weight, grad_hidden, need_weight_grad)


@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def _geglu_hidden_grad_row(hidden_row, grad_row, grad_hidden_row):
    """One row: hidden_row [2D], grad_row [D] -> grad_hidden_row [2D]. With Phi(g) = 0.5 erfc(-g/sqrt2),
    phi(g) = exp(-g^2/2)/sqrt(2 pi): d value = dy g Phi(g) (gelu(g)), d gate = dy value (Phi(g) + g phi(g))
    (gelu'(g), activations_backward.py's formula)."""
    half = grad_row.size
    for j in range(half):
        value = hidden_row[j]
        gate = hidden_row[half + j]
        dy = grad_row[j]
        cdf = np.float32(0.5) * erfc_f32(-gate * np.float32(INV_SQRT2))
        pdf = exp_f32(np.float32(-0.5) * gate * gate) * np.float32(INV_SQRT_2PI)
        grad_hidden_row[j] = dy * (gate * cdf)
        grad_hidden_row[half + j] = (dy * value) * (cdf + gate * pdf)


@njit(**PARALLEL)
def _geglu_hidden_grad_rows(hidden, grad_out, grad_hidden):
    """hidden [R,2D], grad_out [R,D], grad_hidden [R,2D] contiguous rows; prange over rows."""
    for r in prange(grad_out.shape[0]):
        _geglu_hidden_grad_row(hidden[r], grad_out[r], grad_hidden[r])


@njit(**SERIAL)
def _geglu_hidden_grad_serial(hidden, grad_out, grad_hidden):
    """_geglu_hidden_grad_rows on the calling thread (a block-pool worker)."""
    for r in range(grad_out.shape[0]):
        _geglu_hidden_grad_row(hidden[r], grad_out[r], grad_hidden[r])


def geglu_hidden_grad(hidden, grad_out):
    """GEGLU (exact gelu) dh [..., 2D] from the hidden layer h [..., 2D] and dy [..., D]: one pass that
    reads h and dy once and writes dh once (NumPy took ~10 passes with its temporaries)."""
    half = grad_out.shape[-1]
    rows = np.ascontiguousarray(hidden).reshape(-1, 2 * half)  # [R, 2D]
    grad_rows = np.ascontiguousarray(grad_out, dtype=np.float32).reshape(-1, half)  # [R, D]
    grad_hidden = np.empty_like(rows)  # [R, 2D]
    _geglu_hidden_grad_rows(rows, grad_rows, grad_hidden)
    return grad_hidden.reshape(hidden.shape)


def geglu_backward(x, weight, bias, grad_out, approximate="none", need_weight_grad=True):
    """Gradients of diffusers' GEGLU y = h[..., :D] * gelu(h[..., D:]), h = linear(x, weight, bias)
    -> (dx [..., in], dW [2D, in], db [2D]) as linear_backward."""
    check_approximate("geglu_backward", approximate)
    xp = backend.array_module(x)
    # 1. recompute the hidden layer and split it as the forward does
    hidden = linear(x, weight, bias)  # [..., in] -> [..., 2D]
    half = hidden.shape[-1] // 2
    check_grad_out("geglu_backward", grad_out, hidden.shape[:-1] + (half,))
    if xp is np and approximate == "none":
        # 2-3. the exact-gelu gate (SD's): both halves of dh in one Numba pass, then the projection
        return linear_backward(x, weight, geglu_hidden_grad(hidden, grad_out), need_weight_grad)
    value = hidden[..., :half]  # [..., D]
    gate = xp.ascontiguousarray(hidden[..., half:])  # [..., D]
    # 2. d value = dy * gelu(gate); d gate = gelu'(gate) * (dy * value)
    grad_hidden = xp.empty_like(hidden)  # [..., 2D]
    grad_hidden[..., :half] = grad_out * gelu(gate, approximate)
    grad_hidden[..., half:] = gelu_backward(gate, xp.ascontiguousarray(grad_out * value), approximate)
    # 3. through the projection
    return linear_backward(x, weight, grad_hidden, need_weight_grad)



# ---------------------------------------------------------------------------------------------
# GEGLU with its hidden layer kept (the UNet tape's): the forward hands h over, the backward
# starts from it instead of recomputing it
# ---------------------------------------------------------------------------------------------
def geglu_forward_saved(x, weight, bias=None):
    """GEGLU (exact gelu; NumPy arrays) -> (y [..., D], hidden [..., 2D]): linear.py's geglu_fast with
    its hidden layer h = x W^T + b written into an array that is kept, for geglu_input_grad."""
    check_linear("geglu_forward_saved", x, weight, bias)
    hidden = np.empty((x.size // x.shape[-1], weight.shape[0]), np.float32)  # [R, 2D]
    out = geglu_fast(x, weight, bias, "none", hidden_out=hidden)  # [..., in] -> [..., D]
    return out, hidden.reshape(x.shape[:-1] + (weight.shape[0],))  # [R, 2D] -> [..., 2D]


def geglu_input_grad_ref(hidden, weight, grad_out):
    xp = backend.array_module(hidden)
    half = grad_out.shape[-1]
    value, gate = hidden[..., :half], hidden[..., half:]  # [..., D] each
    grad_hidden = xp.concatenate([grad_out * gelu_ref(gate),  # d value [..., D]
                                  gelu_backward_ref(gate, grad_out * value)], axis=-1)  # d gate [..., D]
    return xp.matmul(grad_hidden, weight)  # [..., 2D] @ [2D, in] -> [..., in]


def geglu_input_grad_fast(hidden, weight, grad_out):
    half = grad_out.shape[-1]
    rows = np.ascontiguousarray(hidden).reshape(-1, 2 * half)  # [R, 2D]
    grad_rows = np.ascontiguousarray(grad_out).reshape(-1, half)  # [R, D]
    if rows.shape[0] < GEGLU_BLOCKS_MIN_ROWS:
        grad_hidden = np.empty_like(rows)  # [R, 2D]
        _geglu_hidden_grad_rows(rows, grad_rows, grad_hidden)
        grad_x = matmul(grad_hidden, weight)  # [R, 2D] @ [2D, in] -> [R, in]
        return grad_x.reshape(grad_out.shape[:-1] + (weight.shape[1],))
    # as linear.py's geglu_blocks, backwards: per block of rows, dh into a block-sized scratch by
    # the serial pass, then its one-thread GEMM while dh is still in cache; no [R, 2D] array of dh
    grad_x = np.empty((rows.shape[0], weight.shape[1]), np.float32)  # [R, in]

    def run_block(bounds):
        first, stop = bounds
        grad_hidden = np.empty((stop - first, 2 * half), np.float32)  # [block, 2D]
        _geglu_hidden_grad_serial(rows[first:stop], grad_rows[first:stop], grad_hidden)
        np.matmul(grad_hidden, weight, out=grad_x[first:stop])  # [block, 2D] @ [2D, in] -> [block, in]

    run_blocks(run_block, [(first, min(first + GEGLU_BLOCK_ROWS, rows.shape[0]))
                           for first in range(0, rows.shape[0], GEGLU_BLOCK_ROWS)])
    return grad_x.reshape(grad_out.shape[:-1] + (weight.shape[1],))  # [R, in] -> [..., in]


GEGLU_INPUT_GRAD = dispatch.register("geglu_input_grad", fast=geglu_input_grad_fast, reference=geglu_input_grad_ref)


def geglu_input_grad(hidden, weight, grad_out):
    """dx of diffusers' GEGLU (exact gelu) with the weight frozen, from the forward's hidden layer
    (geglu_forward_saved's) instead of its input: hidden [..., 2D], weight [2D, in], grad_out [..., D]
    -> [..., in]. The same dx as geglu_backward, one GEMM fewer (no recomputed h)."""
    require_float32("geglu_input_grad", "hidden", hidden)
    require_float32("geglu_input_grad", "grad_out", grad_out)
    if weight.ndim != 2 or hidden.ndim < 1 or hidden.shape[-1] != weight.shape[0] or weight.shape[0] % 2:
        raise NpdiffError(f"geglu_input_grad: hidden [..., 2D] must end in the weight's 2D rows "
                          f"(weight {shape_text(weight.shape)}), got hidden {shape_text(hidden.shape)}")
    check_grad_out("geglu_input_grad", grad_out, hidden.shape[:-1] + (weight.shape[0] // 2,))
    return GEGLU_INPUT_GRAD(hidden, weight, grad_out)
