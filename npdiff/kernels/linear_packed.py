"""Linear layers with few rows (CLIP's 2 x 77 tokens) on weights packed once, at load.

    panels = pack_panels(weight)                               # [out,in] -> [out/NR, in, NR], once
    a_rows = pack_rows(x)                                      # [M,in] -> [M/MR, in, MR], per call
    a_rows = pack_rows_layer_norm(h, gamma, beta, eps)         # the same, of layer_norm(h)
    y = linear_packed(a_rows, panels, rows, out_features, bias, "quick_gelu", residual)  # [M,out]

Versions:
  1. linear_packed_ref    NumPy: x @ W^T + bias, the activation, + residual.
  2. linear_packed        Numba: the register-blocked 6 x 64 micro-kernel of matmul_numba.py (step 6 of
                          the lesson's matmul chapter) over operands packed in its reading order, with
                          the bias, the activation and the residual added to each column panel while it
                          is still in cache (and, on request, the result packed for the next GEMM).

Why: with M = 154 rows a GEMM is short, and a BLAS that packs its B operand (here the weight: 2.4-9.4 MB
for CLIP-L) on every call spends a large part of the call reading and rewriting it. Here the weight is
packed once, when the model is loaded, into column panels of NR = 64 outputs, each panel contiguous
[in, NR], so each weight value is read from memory once per call and used M times. x is small (154 x 768
floats: 473 KB) and packed per call into MR-row panels [M/MR, in, MR] (the micro-kernel's A order), in the
same pass as the layer norm that precedes CLIP's q/k/v and fc1 (pack_rows_layer_norm: no normed copy); fc1
writes fc2's packed operand in its epilogue (packed_out).

Threads: one task per thread, each a contiguous run of the weight's column panels (12 panels for a
[768,768] weight, 48 for [3072,768]), computing whole columns of y for all rows; within a task, depth
blocks of KC_PANEL steps of k outermost, so A's [M, KC_PANEL] block (473 KB) stays in L2 while the task's
panels pass under it. While one weight block is used, the next is prefetched into L2, a cache line every 4
steps of k inside the micro-kernel (the weights of a CLIP call, 340 MB, come from memory every call). The
epilogue of a task's panels runs on the thread that wrote them. Rows of y past M and columns past `out`
are never written (the packed operands' spare rows/columns are zero). Every packed array and CLIP's scratch
starts on a 64-byte boundary (aligned_view).

Same bits in every process and for any thread count: no kernel here carries a fastmath flag (the micro-kernel's
FMAs are explicit; the layer norm's statistics are summed in lanes in an order written out, norm.mean_and_rstd),
so the copies of them Numba compiles into each caller round alike (matmul_numba.py's header), and each element
of y is made by one thread, in one order of k, whichever thread it is.

Layout of the packed weight: panels[p, k, j] = weight[p*NR + j, k] (zero where p*NR + j >= out): the
[in, out] transpose, cut into NR-wide column panels, each panel's rows consecutive, so the micro-kernel's
B stream of a panel is one contiguous run. Same bytes as the weight when `out` is a multiple of NR.

Measured (one thread, CPU time, loaded 2-core Xeon; the practical peak, OpenBLAS sgemm 2048^2 on one
thread, is 152-161 GFLOP/s): a hot [154,768] x [768,768] 146-149 GFLOP/s (OpenBLAS on the [in,out] copy
126-136); CLIP-L's 72 weights streamed 134-137 (before alignment 120); inside the CLIP-L forward, with the
epilogues, 118-122.
"""

import numpy as np
from numba import config, get_num_threads, get_thread_id

from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels.activations import ACTIVATION_CODES, activation_block, gelu_ref, quick_gelu_ref
from npdiff.kernels.matmul_numba import CACHE_LINE_FLOATS, MR, NR, _micro_kernel
from npdiff.kernels.norm import mean_and_rstd
from npdiff.kernels.scratch import scratch

# steps of k per depth block. Measured (one thread, [154,768] x [768,768]): KC 128 122 GFLOP/s, 256 123,
# 384 130, 768 137-139 (fewer loads and stores of the C tile, whose cost outweighs keeping the weight's block
# in L1); for [154,3072] x [3072,768] 768 and 1536 within noise (159-166)
KC_PANEL = 768
NO_ACTIVATION = -1  # activation code: bias (and residual) only
ACTIVATIONS = {None: NO_ACTIVATION, "quick_gelu": ACTIVATION_CODES["quick_gelu"],
               "gelu": ACTIVATION_CODES["none"], "gelu_tanh": ACTIVATION_CODES["tanh"]}
ACTIVATION_REFS = {None: lambda h: h, "quick_gelu": quick_gelu_ref, "gelu": lambda h: gelu_ref(h, "none"),
                   "gelu_tanh": lambda h: gelu_ref(h, "tanh")}


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
ALIGN_FLOATS = 16  # 64 bytes: one cache line, one zmm register


def aligned_view(flat, shape):
    """A C-contiguous float32 view of `shape` into the 1-D float32 array `flat` (at least ALIGN_FLOATS longer than
    the shape's size), starting on a 64-byte boundary. NumPy's own arrays start 16 bytes past one: then every
    64-float row of a panel straddles 5 cache lines instead of 4 and each zmm load of the micro-kernel is split in
    two (measured, one thread, CLIP-L's 72 weights streamed: 120 -> 134 GFLOP/s)."""
    size = int(np.prod(shape))
    skip = (-flat.ctypes.data % (4 * ALIGN_FLOATS)) // 4
    return flat[skip:skip + size].reshape(shape)


def aligned_empty(shape):
    """np.empty(shape, float32), starting on a 64-byte boundary."""
    return aligned_view(np.empty(int(np.prod(shape)) + ALIGN_FLOATS, np.float32), shape)


def aligned_scratch(name, shape):
    """This thread's scratch buffer `name` (kernels/scratch.py) as a float32 array of `shape` starting on a
    64-byte boundary."""
    return aligned_view(scratch(name, int(np.prod(shape)) + ALIGN_FLOATS), shape)


PACK_DEPTH = 256  # steps of k per block of pack_panels: a [NR, 256] block of the weight and its image, 64 KiB each


def pack_panels(weight):
    """A Linear's weight [out,in] (any strides) -> its column panels [ceil(out/NR), in, NR], float32.

    NumPy, one [NR, PACK_DEPTH] block at a time (both sides in L1/L2): as fast as a parallel Numba loop
    (measured 31 vs 32 ms for 8 CLIP-L fc weights, 75 MB) and it runs at load, where a first Numba call would
    add loading the compiled kernel and starting the threads (~0.3-0.6 s) to the model's load time."""
    outputs, depth = weight.shape
    panels = aligned_empty(((outputs + NR - 1) // NR, depth, NR))  # [out/NR, in, NR]
    for panel in range(panels.shape[0]):
        slab = weight[panel * NR:(panel + 1) * NR]  # [<=NR, in]
        width = slab.shape[0]
        panels[panel, :, width:] = 0.0  # the spare columns of the last panel
        for k0 in range(0, depth, PACK_DEPTH):
            np.copyto(panels[panel, k0:k0 + PACK_DEPTH, :width], slab[:, k0:k0 + PACK_DEPTH].T)  # [NR,256] -> [256,NR]
    return panels


def unpack_panels(panels, outputs):
    """panels [out/NR, in, NR] -> the weight [out,in] (a new array): the inverse of pack_panels."""
    depth = panels.shape[1]
    return np.ascontiguousarray(panels.transpose(0, 2, 1).reshape(-1, depth)[:outputs])  # [out,in]


@njit(**SERIAL)
def _pack_row(row_values, a_packed, row):
    panel = row // MR
    lane = row - panel * MR
    for k in range(row_values.size):
        a_packed[panel, k, lane] = row_values[k]


@njit(**SERIAL)
def _zero_spare_rows(a_packed, rows):
    for row in range(rows, a_packed.shape[0] * MR):
        panel = row // MR
        lane = row - panel * MR
        for k in range(a_packed.shape[1]):
            a_packed[panel, k, lane] = 0.0


@njit(**SERIAL)
def _pack_rows_numba(x, a_packed):
    """x [M,K] -> a_packed [ceil(M/MR), K, MR] (rows past M zero). On the calling thread: 154 x 768
    floats take ~0.1 ms, less than waking the pool."""
    for row in range(x.shape[0]):
        _pack_row(x[row], a_packed, row)
    _zero_spare_rows(a_packed, x.shape[0])


@njit(**SERIAL)
def _pack_rows_layer_norm_numba(x, gamma, beta, eps, a_packed):
    """layer_norm(x) [M,K] -> a_packed [ceil(M/MR), K, MR]: each row normed into an L1 scratch row (the
    arithmetic of norm.py's layer norm), then written to its lane of the packed panel."""
    normed = np.empty(x.shape[1], np.float32)  # [K], L1-resident
    for row in range(x.shape[0]):
        values = x[row]
        mean, rstd = mean_and_rstd(values, eps)
        for k in range(values.size):
            normed[k] = (np.float64(values[k]) - mean) * rstd * gamma[k] + beta[k]
        _pack_row(normed, a_packed, row)
    _zero_spare_rows(a_packed, x.shape[0])


def row_panels_shape(rows, depth):
    """The shape pack_rows gives x [rows, depth]: [ceil(rows/MR), depth, MR]."""
    return ((rows + MR - 1) // MR, depth, MR)


def _row_panels(x, out):
    shape = row_panels_shape(*x.shape)
    return aligned_empty(shape) if out is None else out.reshape(shape)  # [M/MR, K, MR]


def pack_rows(x, out=None):
    """x [M,K] float32 -> [ceil(M/MR), K, MR], the micro-kernel's A order (rows past M zero). out: None,
    or a C-contiguous float32 array of that shape to write (a scratch buffer: no fresh pages per call)."""
    a_packed = _row_panels(x, out)
    _pack_rows_numba(x, a_packed)
    return a_packed


def pack_rows_layer_norm(x, gamma, beta, eps, out=None):
    """layer_norm(x, gamma, beta, eps) [M,K] (torch's, over the last axis), packed as pack_rows packs."""
    a_packed = _row_panels(x, out)
    _pack_rows_layer_norm_numba(x, gamma, beta, float(eps), a_packed)
    return a_packed


# ---------------------------------------------------------------------------------------------
# The GEMM and its epilogue
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def _epilogue(out, col0, width, rows, bias, has_bias, which, residual, has_residual, packed_out, has_packed_out,
              summed):
    """out[:rows, col0:col0+width] = activation(out + bias) + residual, row by row, in place; with
    has_packed_out the same columns also written packed, as pack_rows would write them (spare rows zero).
    summed [>= width]: the thread's row the activation reads (it writes into out)."""
    for r in range(rows):
        segment = out[r, col0:col0 + width]
        if has_bias:
            for j in range(width):
                segment[j] += bias[col0 + j]
        if which != NO_ACTIVATION:
            summed[:width] = segment
            activation_block(summed[:width], segment, which)
        if has_residual:
            for j in range(width):
                segment[j] += residual[r, col0 + j]
        if has_packed_out:
            panel, lane = r // MR, r % MR
            for j in range(width):
                packed_out[panel, col0 + j, lane] = segment[j]
    if has_packed_out:
        for r in range(rows, packed_out.shape[0] * MR):
            for j in range(width):
                packed_out[r // MR, col0 + j, r % MR] = 0.0


@njit(**PARALLEL)
def _linear_packed_numba(a_packed, panels, rows, bias, has_bias, which, residual, has_residual, out, depth_step,
                         tasks, packed_out, has_packed_out, rows_scratch):
    """out [M,N] = activation(A @ W^T + bias) + residual; A packed [M/MR, K, MR], W's panels [N/NR, K, NR].
    One task per thread, each a contiguous run of column panels. rows_scratch [threads, NR]: each thread's row
    for the epilogue (no np.empty inside the prange: allocating there slowed causal_rows.py's two threads ~5x)."""
    n_panels, depth = panels.shape[0], panels.shape[1]
    cols = out.shape[1]
    row_panels = (rows + MR - 1) // MR
    for task in prange(tasks):
        first = task * n_panels // tasks
        stop = (task + 1) * n_panels // tasks
        # 1. the GEMM of this task's column panels, depth_step steps of k at a time: A's [M, depth_step] block
        #    stays in L2 while the task's panels pass under it
        for k0 in range(0, depth, depth_step):
            block_depth = min(depth_step, depth - k0)
            for panel in range(first, stop):
                col0 = panel * NR
                b_block = panels[panel, k0:k0 + block_depth]  # [KC, NR]
                # the weight block this task reads next (the next panel, or the first one at the next k0),
                # fetched into L2 while this one is used: a slice of it in each row panel's micro-kernel
                next_panel, next_k0 = (panel + 1, k0) if panel + 1 < stop else (first, k0 + depth_step)
                next_floats = max(0, min(depth_step, depth - next_k0)) * NR
                next_start = (next_panel * depth + next_k0) * NR  # a flat element of panels
                slice_floats = -(-next_floats // (row_panels * CACHE_LINE_FLOATS)) * CACHE_LINE_FLOATS
                for row_panel in range(row_panels):
                    row0 = row_panel * MR
                    sliced = row_panel * slice_floats
                    _micro_kernel(block_depth, a_packed[row_panel, k0:k0 + block_depth], b_block, out, row0, col0,
                                  min(MR, rows - row0), min(NR, cols - col0), k0 > 0,
                                  panels, next_start + sliced, max(0, min(slice_floats, next_floats - sliced)))
        # 2. bias, activation, residual on the panels just written (in L2)
        for panel in range(first, stop):
            col0 = panel * NR
            _epilogue(out, col0, min(NR, cols - col0), rows, bias, has_bias, which, residual, has_residual, packed_out,
                      has_packed_out, rows_scratch[get_thread_id()])


def linear_packed(a_packed, panels, rows, outputs, bias=None, activation=None, residual=None, out=None,
                  packed_out=None):
    """activation(x @ W^T + bias) + residual -> [rows, outputs] float32.

    a_packed: x [rows, in] as pack_rows (or pack_rows_layer_norm) packs it; panels: W [outputs, in] as
    pack_panels packs it; bias [outputs] or None; activation None, "quick_gelu", "gelu" (erf) or
    "gelu_tanh"; residual [rows, outputs] C-contiguous or None (added after the activation); out: None
    (a new array) or a C-contiguous float32 [rows, outputs] array to write, not the residual itself;
    packed_out: None, or a float32 array of row_panels_shape(rows, outputs) that receives the result packed
    as pack_rows packs it (the next GEMM's operand, made by both threads in the epilogue, not after it)."""
    out = aligned_empty((rows, outputs)) if out is None else out  # [M,N]
    if rows == 0 or outputs == 0:
        return out
    if panels.shape[1] == 0:
        out[:] = 0.0  # an empty sum; the epilogue still adds
    has_bias, has_residual, has_packed_out = bias is not None, residual is not None, packed_out is not None
    _linear_packed_numba(a_packed, panels, rows, bias if has_bias else out[0], has_bias, ACTIVATIONS[activation],
                         residual if has_residual else out, has_residual, out, KC_PANEL,
                         min(get_num_threads(), panels.shape[0]), packed_out if has_packed_out else a_packed,
                         has_packed_out, scratch("linear_packed rows", (config.NUMBA_NUM_THREADS, NR)))
    return out


def linear_packed_ref(x, weight, bias=None, activation=None, residual=None):
    """NumPy: activation(x @ weight^T + bias) + residual, x [M,in], weight [out,in]."""
    out = x @ weight.T  # [M,in] @ [in,out] -> [M,out]
    if bias is not None:
        out = out + bias
    out = ACTIVATION_REFS[activation](out)
    if residual is not None:
        out = out + residual
    return out


def unpack_rows(a_packed, rows):
    """[M/MR, K, MR] -> x [M,K] (a new array): the inverse of pack_rows."""
    depth = a_packed.shape[1]
    return np.ascontiguousarray(a_packed.transpose(0, 2, 1).reshape(-1, depth)[:rows])  # [M,K]
