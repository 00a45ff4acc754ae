"""linear (x @ W^T + b, torch layout), linear_activation (an MLP's first layer and its activation)
and geglu (SD's feed-forward input projection).

Versions:
  1. linear_ref / geglu_ref / linear_activation_ref   NumPy API (numpy or cupy): matmul with the
                           transposed weight, add bias; geglu splits h in halves and multiplies by
                           gelu_ref of the gate; linear_activation applies the activation's _ref.
  2. linear_fast           the same GEMM (OpenBLAS sgemm, cut into blocks on npdiff's own threads by
                           block_pool.matmul; the transposed
                           weight is a view, sgemm reads it with its transpose flag, no copy); the
                           leading axes are flattened so the GEMM is one [R, in] @ [in, out]
                           (a strided 3-D view that would need a copy to flatten: one sgemm per
                           [N, in] slice instead). Each block adds the bias to its rows while they are
                           in cache (block_pool.matmul's bias=; the same sums as a bias pass after the
                           GEMM, which ran on one thread).
  2. geglu_fast            the GEMM, then one Numba pass, parallel over rows, that reads both
                           halves of each row of h and writes a * gelu(gate) (the vectorised gelu
                           of activations.py into the output row, then the multiply while that
                           row is still in L1), instead of a gelu temporary and a multiply pass.
  3. geglu_fast, R >= GEGLU_FORWARD_MIN_ROWS  one block of rows per worker of the block-parallel
                           pool (npdiff/kernels/block_pool.py; more when a block's hidden rows would
                           pass GEGLU_MAX_HIDDEN_FLOATS): per block a one-thread GEMM into the
                           worker's [block, 2D] hidden scratch (kernels/scratch.py, reused from call
                           to call) and the serial gate pass over it, both cores each on their own
                           block; no [R, 2D] temporary and no fresh array per block. The bias is added
                           in the gate's pass (_geglu_bias_rows), not by a pass of its own over the
                           hidden rows: the same sums, bit for bit; measured in one process, CPU time,
                           best of 9, loaded machine: [8192,320] -> 2x1280 123.3 -> 119.5 ms, [2048,640]
                           -> 2x2560 106.1 -> 104.2, [512,1280] -> 2x5120 109.5 -> 109.0.
                           Tried and slower: blocks of 256 rows cut into chunks of 512 outputs (value
                           and gate GEMMs per chunk into L2-sized scratch, the gate while in L2):
                           123.9 -> 154.5 ms CPU at [8192,320] (OpenBLAS packs both operands again
                           for every small call), 105.8 -> 129.8 at [2048,640].
  None of the element-wise Numba passes here carries a fastmath flag (there is no sum to reorder; the
  activation's own flags are activations.py's).
  2. linear_activation_fast  the GEMM without its bias, then one Numba pass, parallel over rows, that
                           adds the bias and applies the activation in place, each row L1-resident
                           (CLIP's fc1 + quick_gelu: one pass and no [R, I] temporary instead of a
                           bias pass, an activation pass and a new array).
  cupy arrays: cuBLAS in the weight's dtype, then one gate kernel for geglu (npdiff/kernels/cuda/),
               or the activation's CUDA kernel for linear_activation.

geglu follows diffusers.models.activations.GEGLU: h = proj(x); value, gate = h.chunk(2, dim=-1);
return value * gelu(gate). The FIRST half is the value, the SECOND half goes through gelu.
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.activations import (
    ACTIVATION_CODES,
    GELU_KERNEL,
    QUICK_GELU_KERNEL,
    SILU_KERNEL,
    activation_block,
    check_approximate,
    gelu_ref,
    quick_gelu_ref,
    silu_ref,
)
from npdiff.kernels.block_pool import matmul, run_blocks, shared_pool, split_evenly
from npdiff.kernels.scratch import scratch
from npdiff.kernels.validate import (
    require_float32,
    require_min_ndim,
    require_ndim,
    require_optional_vector,
    shape_text,
)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def linear_ref(x, weight, bias=None):
    xp = backend.array_module(x)
    out = xp.matmul(x, weight.T)  # [..., in] @ [in, out] -> [..., out]
    if bias is not None:
        out = out + bias  # [..., out]
    return out


def geglu_ref(x, weight, bias=None, approximate="none"):
    hidden = linear_ref(x, weight, bias)  # [..., in] -> [..., 2*D]
    half = hidden.shape[-1] // 2
    value, gate = hidden[..., :half], hidden[..., half:]  # [..., D] each
    return value * gelu_ref(gate, approximate)  # [..., D]


# geglu with at least GEGLU_FORWARD_MIN_ROWS rows runs in blocks on the pool (version 3): one block of
# rows per worker, each a one-thread GEMM into the worker's hidden scratch. Large blocks, because each
# block's sgemm packs the whole weight once: with blocks of 512 rows, packing [640, 5120] 16 times cost
# ~10% (measured on the Intel Xeon, 2 workers, load ~2, best of 6, GFLOP/s on the wall clock):
#   SDXL [8192,640] -> 2x2560:   blocks of 512 rows, fresh hidden arrays 245-250; 2 blocks of 4096 in
#                                scratch 269 (the bare GEMM, no gate: 277)
#   SDXL [2048,1280] -> 2x5120:  version 2 (column-split GEMM into a fresh [2048, 10240] array, then a
#                                parallel gate pass) 266-271; 2 blocks of 1024 in scratch 285-288 (the
#                                bare GEMM: 286)
# A block's hidden rows are at most GEGLU_MAX_HIDDEN_FLOATS (128 MiB; SDXL's largest is 80 MiB), or more
# blocks are made: the scratch stays allocated per thread between calls.
GEGLU_FORWARD_MIN_ROWS = 1024
GEGLU_MAX_HIDDEN_FLOATS = 1 << 25
# geglu's backward (linear_backward.py) keeps fixed blocks of GEGLU_BLOCK_ROWS rows from
# GEGLU_BLOCKS_MIN_ROWS rows up (measured there, on its own products)
GEGLU_BLOCK_ROWS = 512
GEGLU_BLOCKS_MIN_ROWS = 4096

# linear_activation's activations: name -> (reference, code of activations.activation_block, the
# dispatched activation kernel that cupy arrays use after the CUDA linear)
LINEAR_ACTIVATIONS = {
    "silu": (silu_ref, ACTIVATION_CODES["silu"], SILU_KERNEL),
    "quick_gelu": (quick_gelu_ref, ACTIVATION_CODES["quick_gelu"], QUICK_GELU_KERNEL),
    "gelu": (lambda h: gelu_ref(h, "none"), ACTIVATION_CODES["none"], lambda h: GELU_KERNEL(h, "none")),
    "gelu_tanh": (lambda h: gelu_ref(h, "tanh"), ACTIVATION_CODES["tanh"], lambda h: GELU_KERNEL(h, "tanh")),
}


def linear_activation_ref(x, weight, bias=None, activation="quick_gelu"):
    return LINEAR_ACTIVATIONS[activation][0](linear_ref(x, weight, bias))  # [..., in] -> [..., out]


# ---------------------------------------------------------------------------------------------
# Fast
# ---------------------------------------------------------------------------------------------
def check_linear(kernel, x, weight, bias):
    require_ndim(kernel, "weight", weight, 2, "[out_features, in_features]")
    require_min_ndim(kernel, "x", x, 1, "[..., in_features]")
    if x.shape[-1] != weight.shape[1]:
        raise NpdiffError(f"{kernel}: x must have shape [..., in_features={weight.shape[1]}] to match "
                          f"weight {shape_text(weight.shape)}, got {shape_text(x.shape)}")
    require_optional_vector(kernel, "bias", bias, weight.shape[0])


def linear_fast(x, weight, bias=None):
    if x.ndim == 3 and not x.flags.c_contiguous and x.itemsize in (x.strides[1], x.strides[2]):
        # a strided view whose [N, in] slices are BLAS operands as they lie (the UNet's proj_in and
        # the VAE's attention get NCHW seen as [B,H*W,C]): one sgemm per slice, no flattening copy.
        # Measured (separate processes, load ~1.6): [2,4096,320] @ [320,320] 95 -> 158-175 GFLOP/s,
        # [2,1024,640] @ [640,640] 113-131 -> 175-195; the same bytes.
        return matmul(x, weight.T, bias=bias)  # [B,N,in] @ [in,out] + [out] -> [B,N,out]
    rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [R, in]
    out = matmul(rows, weight.T, bias=bias)  # [R, in] @ [in, out] + [out] -> [R, out]
    return out.reshape(x.shape[:-1] + (weight.shape[0],))  # [R, out] -> [..., out]


@njit(**SERIAL)
def _geglu_row(hidden_row, which, out_row):
    """out_row [D] = hidden_row[:D] * gelu(hidden_row[D:]); both halves contiguous, L1-resident."""
    width = out_row.size
    activation_block(hidden_row[width:], out_row, which)  # gelu(gate)
    for j in range(width):
        out_row[j] *= hidden_row[j]  # * value


@njit(**SERIAL)
def _geglu_bias_rows(hidden, bias, which, out, summed, keep_hidden):
    """out [m, D] = (hidden[:, :D] + bias[:D]) * gelu(hidden[:, D:] + bias[D:]), row by row: the bias added
    in the gate's pass (the same float32 sums and products as `hidden += bias`, then _geglu_row, without a
    pass of its own over the hidden rows). keep_hidden: the sums are written back into hidden too (the
    training tape keeps h = x W^T + b). summed [D]: a scratch row."""
    width = out.shape[1]
    value_bias = bias[:width]  # [D]
    gate_bias = bias[width:]  # [D]
    for r in range(hidden.shape[0]):
        value = hidden[r, :width]  # [D]
        gate = hidden[r, width:]  # [D]
        out_row = out[r]  # [D]
        for j in range(width):
            summed[j] = gate[j] + gate_bias[j]
        activation_block(summed, out_row, which)  # gelu(gate + b)
        if keep_hidden:
            for j in range(width):
                gate[j] = summed[j]
                value[j] += value_bias[j]
                out_row[j] *= value[j]  # * (value + b)
        else:
            for j in range(width):
                out_row[j] *= value[j] + value_bias[j]  # * (value + b)


@njit(**PARALLEL)
def _geglu_gate_numba(hidden, which, out):
    """hidden [R, 2D] contiguous rows, out [R, D]: out = hidden[:, :D] * gelu(hidden[:, D:])."""
    for r in prange(hidden.shape[0]):
        _geglu_row(hidden[r], which, out[r])


@njit(**SERIAL)
def _geglu_gate_serial(hidden, which, out):
    """_geglu_gate_numba on the calling thread (a block-pool worker)."""
    for r in range(hidden.shape[0]):
        _geglu_row(hidden[r], which, out[r])


def geglu_row_blocks(n_rows, hidden_width, workers):
    """[(first, stop), ...]: n_rows in one block per worker, or in more (a multiple of workers) when a
    block's [rows, hidden_width] hidden scratch would pass GEGLU_MAX_HIDDEN_FLOATS."""
    fitting_rows = max(1, GEGLU_MAX_HIDDEN_FLOATS // hidden_width)
    per_worker = -(-n_rows // workers)
    return split_evenly(n_rows, min(per_worker, fitting_rows), workers=workers)


def geglu_blocks(rows, weight, bias, which, hidden_out=None):
    """rows [R, in] -> [R, D] in blocks of rows on the block-parallel pool (geglu_row_blocks): each
    worker's GEMM (one OpenBLAS thread) writes its [block, 2D] hidden scratch, which its serial gate
    pass then reads; no [R, 2D] array is made unless the caller passes one as hidden_out (the
    training tape keeps the hidden layer for the backward): then the blocks are written there."""
    out = np.empty((rows.shape[0], weight.shape[0] // 2), np.float32)  # [R, D]

    def run_block(bounds):
        first, stop = bounds
        if hidden_out is None:
            hidden = scratch("geglu hidden", (stop - first, weight.shape[0]))  # [block, 2D], this thread's
        else:
            hidden = hidden_out[first:stop]  # [block, 2D] view of the caller's array
        np.matmul(rows[first:stop], weight.T, out=hidden)  # [block, in] @ [in, 2D] -> [block, 2D]
        if bias is None:
            _geglu_gate_serial(hidden, which, out[first:stop])
        else:  # the bias added in the gate's pass; the tape's hidden_out gets it too
            _geglu_bias_rows(hidden, bias, which, out[first:stop], scratch("geglu summed", (out.shape[1],)),
                             hidden_out is not None)

    run_blocks(run_block, geglu_row_blocks(rows.shape[0], weight.shape[0], shared_pool().workers))
    return out


def geglu_fast(x, weight, bias=None, approximate="none", hidden_out=None):
    """hidden_out: None, or a contiguous float32 [R, 2D] array that receives the hidden layer h."""
    if x.size // x.shape[-1] >= GEGLU_FORWARD_MIN_ROWS:
        rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # [..., in] -> [R, in]
        out = geglu_blocks(rows, weight, bias, ACTIVATION_CODES[approximate], hidden_out)  # [R, D]
        return out.reshape(x.shape[:-1] + (out.shape[1],))  # [R, D] -> [..., D]
    if hidden_out is None:
        hidden = linear_fast(x, weight, bias)  # [..., in] -> [..., 2D]
    else:
        rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [R, in]
        hidden = matmul(rows, weight.T, out=hidden_out, bias=bias)  # [R, in] @ [in, 2D] + [2D] -> [R, 2D]
    rows = hidden.reshape(-1, hidden.shape[-1])  # [R, 2D] (contiguous: fresh from matmul)
    out = np.empty((rows.shape[0], rows.shape[1] // 2), np.float32)  # [R, D]
    _geglu_gate_numba(rows, ACTIVATION_CODES[approximate], out)
    return out.reshape(x.shape[:-1] + (out.shape[1],))  # [R, D] -> [..., D]


@njit(**SERIAL)
def _bias_activation_row(row, bias, has_bias, which):
    """row [D] = activation(row + bias), in place. The sum goes to a scratch row first: with its
    input and output the same array the activation loop is not vectorised (measured 8 ns per
    element instead of ~1)."""
    summed = np.empty_like(row)  # [D], L1-resident
    if has_bias:
        for j in range(row.size):
            summed[j] = row[j] + bias[j]
    else:
        summed[:] = row
    activation_block(summed, row, which)


@njit(**PARALLEL)
def _bias_activation_numba(hidden, bias, has_bias, which):
    """hidden [R, D] contiguous rows, bias [D] (ignored unless has_bias): in place."""
    for r in prange(hidden.shape[0]):
        _bias_activation_row(hidden[r], bias, has_bias, which)


def linear_activation_fast(x, weight, bias=None, activation="quick_gelu"):
    rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [R, in]
    hidden = matmul(rows, weight.T)  # [R, in] @ [in, out] -> [R, out], contiguous
    has_bias = bias is not None
    _bias_activation_numba(hidden, bias if has_bias else hidden[0], has_bias, LINEAR_ACTIVATIONS[activation][1])
    return hidden.reshape(x.shape[:-1] + (weight.shape[0],))  # [R, out] -> [..., out]


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
LINEAR = dispatch.register("linear", fast=linear_fast, reference=linear_ref, cuda="linear")
GEGLU = dispatch.register("geglu", fast=geglu_fast, reference=geglu_ref, cuda="geglu")
# cupy arrays never reach this one: linear_activation sends them to the CUDA linear, then the
# CUDA activation kernel
LINEAR_ACTIVATION = dispatch.register("linear_activation", fast=linear_activation_fast,
                                      reference=linear_activation_ref)


def linear(x, weight, bias=None):
    """torch.nn.functional.linear: x [..., in] @ weight[out, in]^T + bias[out] -> [..., out]."""
    check_linear("linear", x, weight, bias)
    return LINEAR(x, weight, bias)


def linear_activation(x, weight, bias=None, activation="quick_gelu"):
    """activation(linear(x, weight, bias)), activation one of "silu", "quick_gelu", "gelu" (erf),
    "gelu_tanh": an MLP's first layer and its activation in one call (one pass after the GEMM)."""
    check_linear("linear_activation", x, weight, bias)
    if activation not in LINEAR_ACTIVATIONS:
        raise NpdiffError(f"linear_activation: activation must be one of {tuple(LINEAR_ACTIVATIONS)}, "
                          f"got {activation!r}")
    require_float32("linear_activation", "x", x)
    if dispatch.is_cupy(x):
        return LINEAR_ACTIVATIONS[activation][2](LINEAR(x, weight, bias))  # cuBLAS, then one CUDA kernel
    return LINEAR_ACTIVATION(x, weight, bias, activation)


def geglu(x, weight, bias=None, approximate="none"):
    """diffusers GEGLU: h = linear(x, weight, bias) [..., 2D]; return h[..., :D] * gelu(h[..., D:])."""
    check_linear("geglu", x, weight, bias)
    check_approximate("geglu", approximate)
    if weight.shape[0] % 2:
        raise NpdiffError(f"geglu: weight must have an even number of rows [2*D, in], "
                          f"got {shape_text(weight.shape)}")
    return GEGLU(x, weight, bias, approximate)
