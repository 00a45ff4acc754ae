"""Linear layers with few rows (CLIP's 2 x 77 tokens) on weights packed once, at load.

    panels = pack_panels(weight)                               # [out,in] -> [out/NR, in, NR], once
    normed = layer_norm_rows(h, gamma, beta, eps, out=scratch) # [M,in]: the layer norm before q/k/v and fc1
    y = linear_packed(x, panels, out_features, bias, "quick_gelu", residual)  # [M,in] -> [M,out]

Versions:
  1. linear_packed_ref    NumPy: x @ W^T + bias, the activation, + residual.
  2. linear_packed        Numba: the register-blocked 6 x 64 micro-kernel of matmul_numba.py (step 6 of
                          the lesson's matmul chapter), copied into linear_packed_tile.py and changed there
                          to read x's rows as they lie (no packing of x per call) and to finish each tile
                          (bias, activation, residual) as it is written, after its last depth block.
                          Session 11's version packed x into MR-row panels per call (with the layer norm),
                          ran the epilogue as a pass over each finished column panel and packed fc1's
                          output for fc2 there: those passes were ~25% of fc1's time (one thread).

Why: with M = 154 rows a GEMM is short, and a BLAS that packs its B operand (here the weight: 2.4-9.4 MB
for CLIP-L) on every call spends a large part of the call reading and rewriting it. Here the weight is
packed once, when the model is loaded, into column panels of NR = 64 outputs, each panel contiguous
[in, NR], so each weight value is read from memory once per call and used M times. x is small (154 x 768
floats: 473 KB) and read as it lies: each tile's six rows are six streams of consecutive floats.

Threads: one task per thread, each a contiguous run of the weight's column panels (12 panels for a
[768,768] weight, 48 for [3072,768]), computing whole columns of y for all rows (gemm_panels, the serial
body, which clip_layer_rows.py also calls for all the columns of one prompt's rows on one thread); within a
task, depth blocks of KC_PANEL steps of k outermost, so x's [M, KC_PANEL] block (473 KB) stays in L2 while the
task's panels pass under it. While one weight block is used, the next is prefetched into L2, a cache line every
2 steps of k inside the micro-kernel (the weights of a CLIP call, 340 MB, come from memory every call). Rows of
y past M and columns past `out` are never written (the panels' spare columns are zero; the tile's rows past
M read x's last row and are dropped). Every packed array and CLIP's scratch starts on a 64-byte boundary
(aligned_view).

Same bits in every process and for any thread count: no kernel here carries a fastmath flag (the micro-kernel's
FMAs are explicit; the layer norm's statistics are summed in lanes in an order written out, norm.mean_and_rstd),
so the copies of them Numba compiles into each caller round alike (matmul_numba.py's header), and each element
of y is made by one thread, in one order of k, whichever thread it is.

Layout of the packed weight: panels[p, k, j] = weight[p*NR + j, k] (zero where p*NR + j >= out): the
[in, out] transpose, cut into NR-wide column panels, each panel's rows consecutive, so the micro-kernel's
B stream of a panel is one contiguous run. Same bytes as the weight when `out` is a multiple of NR.

Measured (one thread, CPU time, loaded 2-core Xeon; the practical peak, OpenBLAS sgemm 2048^2 on one
thread, is 152-161 GFLOP/s): a hot [154,768] x [768,768] 144-150 GFLOP/s, with bias and residual 136
(session 11's panel pass: 133); [154,768] x [768,3072] with bias and quick-GELU 127 (session 11, with fc2's
packed operand: 112-117). Weights that fit the L3 (up to ~9 MB) run at the hot rate; CLIP-L's 72, streamed
from memory, 130-140 (77 or 154 rows), whatever the prefetch distance or spacing tried (every 2, 3, 4 or 8
steps of k, 1, 2 or 4 lines apart, the panel after next).
"""

import math

import numpy as np
from numba import get_num_threads

from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.kernels.activations import ACTIVATION_CODES, gelu_ref, quick_gelu_ref
from npdiff.kernels.linear_packed_tile import NO_ACTIVATION, row_tile
from npdiff.kernels.matmul_numba import CACHE_LINE_FLOATS, MR, NR
from npdiff.kernels.norm import _layer_norm_numba
from npdiff.kernels.scratch import scratch

# steps of k per depth block. Measured (one thread, [154,768] x [768,768]): KC 128 122 GFLOP/s, 256 123,
# 384 130, 768 137-139 (fewer loads and stores of the C tile, whose cost outweighs keeping the weight's block
# in L1); for [154,3072] x [3072,768] 768 and 1536 within noise (159-166)
KC_PANEL = 768
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
    size = math.prod(shape)
    skip = (-flat.ctypes.data % (4 * ALIGN_FLOATS)) // 4
    return flat[skip:skip + size].reshape(shape)


def aligned_empty(shape):
    """np.empty(shape, float32), starting on a 64-byte boundary."""
    return aligned_view(np.empty(math.prod(shape) + ALIGN_FLOATS, np.float32), shape)


def aligned_scratch(name, shape):
    """This thread's scratch buffer `name` (kernels/scratch.py) as a float32 array of `shape` starting on a
    64-byte boundary."""
    return aligned_view(scratch(name, math.prod(shape) + ALIGN_FLOATS), shape)


HUGE_PAGE_FLOATS = (2 << 20) // 4  # one 2 MiB page (x86-64 Linux's transparent huge pages)


def huge_page_empty(floats):
    """np.empty(floats, float32), starting on a 2 MiB boundary, for weights read whole every call (CLIP's packed
    panels, all of them in one block: models/packed_linear.py). NumPy advises its allocations of 4 MiB and more
    MADV_HUGEPAGE on Linux (numpy's _set_madvise_hugepage, on by default), so where transparent huge pages are
    enabled ("madvise" or "always") the block's pages are 2 MiB ones: 170 TLB entries for CLIP-L's 340 MB
    instead of 83,000. Elsewhere it is an ordinary array."""
    raw = np.empty(floats + HUGE_PAGE_FLOATS, np.float32)
    skip = (-raw.ctypes.data % (4 * HUGE_PAGE_FLOATS)) // 4
    return raw[skip:skip + floats]


PACK_DEPTH = 256  # steps of k per block of pack_panels: a [NR, 256] block of the weight and its image, 64 KiB each


def packed_shape(weight_shape):
    """The shape of pack_panels' result for a weight [out,in]: [ceil(out/NR), in, NR]."""
    outputs, depth = weight_shape
    return ((outputs + NR - 1) // NR, depth, NR)


def pack_panels(weight, out=None):
    """A Linear's weight [out,in] (any strides) -> its column panels [ceil(out/NR), in, NR], float32 (written into
    `out` when given: a C-contiguous float32 array of packed_shape(weight.shape)).

    NumPy, one [NR, PACK_DEPTH] block at a time (both sides in L1/L2): as fast as a parallel Numba loop
    (measured 31 vs 32 ms for 8 CLIP-L fc weights, 75 MB) and it runs at load, where a first Numba call would
    add loading the compiled kernel and starting the threads (~0.3-0.6 s) to the model's load time."""
    outputs, depth = weight.shape
    panels = aligned_empty(packed_shape(weight.shape)) if out is None else out  # [out/NR, in, NR]
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


def layer_norm_rows(x, gamma, beta, eps, out=None):
    """layer_norm(x, gamma, beta, eps) [M,K] (torch's, over the last axis) -> [M,K] float32 rows (into `out` when
    given: a C-contiguous scratch array, no fresh pages per call): norm.py's parallel rows. (norm.py runs inputs
    this small on the calling thread, measured when OpenBLAS's pool ran CLIP's GEMMs beside Numba's; between the
    packed GEMMs, on the same pool, the two threads take 0.05 ms of CLIP-L's 0.1.)"""
    out = aligned_empty(x.shape) if out is None else out  # [M,K]
    _layer_norm_numba(x, gamma, beta, float(eps), out)
    return out


# ---------------------------------------------------------------------------------------------
# The GEMM and its epilogue
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL)
def gemm_panels(x, panels, first, stop, bias, has_bias, which, residual, has_residual, out):
    """out[:, first*NR : stop*NR] = activation(x @ W^T + bias) + residual for the column panels first..stop-1 of
    W's panels [N/NR, K, NR]; x [M,K] rows. row_tile's buffers are allocated here, an array of this thread's own
    (3 KB: allocating it per call costs less than the reference counts of views into an array both threads use).
    KC_PANEL steps of k at a time: x's [M, KC_PANEL] block stays in L2 while the panels pass under it (depth 0:
    one empty block, whose tiles are the epilogue of zero sums)."""
    depth = panels.shape[1]
    rows, cols = out.shape
    row_panels = (rows + MR - 1) // MR
    tile = np.empty((2, MR, NR), np.float32)  # row_tile's buffers
    for k0 in range(0, max(depth, 1), KC_PANEL):
        block_depth = min(KC_PANEL, depth - k0)
        last_block = k0 + KC_PANEL >= depth
        for panel in range(first, stop):
            col0 = panel * NR
            b_block = panels[panel, k0:k0 + block_depth]  # [KC, NR]
            # the weight block read next (the next panel, or the first one at the next k0), fetched into L2
            # while this one is used: a slice of it in each row panel's micro-kernel
            next_panel, next_k0 = (panel + 1, k0) if panel + 1 < stop else (first, k0 + KC_PANEL)
            next_floats = max(0, min(KC_PANEL, depth - next_k0)) * NR
            next_start = (next_panel * depth + next_k0) * NR  # a flat element of panels
            slice_floats = -(-next_floats // (row_panels * CACHE_LINE_FLOATS)) * CACHE_LINE_FLOATS
            for row_panel in range(row_panels):
                row0 = row_panel * MR
                sliced = row_panel * slice_floats
                # the tile's sums over this block (+ the earlier blocks'), finished after the last block
                row_tile(block_depth, x, k0, row0, min(MR, rows - row0), b_block, out, col0, min(NR, cols - col0),
                         k0 > 0, last_block, bias, has_bias, which, residual, has_residual, tile,
                         panels, next_start + sliced, max(0, min(slice_floats, next_floats - sliced)))


@njit(**PARALLEL)
def _linear_packed_numba(x, panels, bias, has_bias, which, residual, has_residual, out, tasks):
    """out [M,N] = activation(x @ W^T + bias) + residual; x [M,K] rows, W's panels [N/NR, K, NR].
    One task per thread, each a contiguous run of column panels."""
    n_panels = panels.shape[0]
    for task in prange(tasks):
        gemm_panels(x, panels, task * n_panels // tasks, (task + 1) * n_panels // tasks, bias, has_bias, which,
                    residual, has_residual, out)


def linear_packed(x, panels, outputs, bias=None, activation=None, residual=None, out=None):
    """activation(x @ W^T + bias) + residual -> [rows, outputs] float32.

    x [rows, in] float32 C-contiguous; panels: W [outputs, in] as pack_panels packs it; bias [outputs] or None;
    activation None, "quick_gelu", "gelu" (erf) or "gelu_tanh"; residual [rows, outputs] C-contiguous or None
    (added after the activation); out: None (a new array) or a C-contiguous float32 [rows, outputs] array to
    write, neither x nor the residual."""
    rows = x.shape[0]
    out = aligned_empty((rows, outputs)) if out is None else out  # [M,N]
    if rows == 0 or outputs == 0:
        return out
    has_bias, has_residual = bias is not None, residual is not None
    _linear_packed_numba(x, panels, bias if has_bias else out[0], has_bias, ACTIVATIONS[activation],
                         residual if has_residual else out, has_residual, out, min(get_num_threads(), panels.shape[0]))
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
