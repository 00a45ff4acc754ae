"""Backward of scaled_dot_product_attention (self, cross, causal; bool or float masks).

For one slice, S = q k^T * scale + mask, P = softmax(S) over keys, O = P v:
    dv = P^T dO                     [M,N] @ [N,dv] -> [M,dv]
    dP = dO v^T                     [N,dv] @ [dv,M] -> [N,M]
    dS = P * (dP - rowsum(dO * O))  [N,M]   (softmax's backward; rowsum(dO * O) = rowsum(P * dP))
    dq = dS k * scale               [N,M] @ [M,d] -> [N,d]
    dk = dS^T q * scale             [M,N] @ [N,d] -> [M,d]
A query that may attend to no key has P = 0 (as the forward), so it passes no gradient.

Versions:
  1. attention_backward_ref   NumPy API: the whole [..., N, M] score matrix, as written above.
  2. attention_backward_fast  query blocks: for each block of queries the scores S and P are
                              RECOMPUTED from q and k (flash-attention's backward), and dk, dv
                              are accumulated over the blocks. Nothing of size
                              [N, M] is stored by the forward or made here: at most [..., block, M]
                              (BACKWARD_BLOCK_SCORES floats). Why recompute: at SD 1.5's 64x64
                              level ([1,8,4096,40], 5 self-attentions in the UNet) a stored P is
                              [1,8,4096,4096] = 512 MiB each, 2.5 GiB for the five; the recompute
                              costs one more q k^T GEMM and softmax (5 GEMMs of 10.7 GFLOP
                              instead of 4: dP's softmax backward uses rowsum(P * dP), so O is
                              never formed). Measured on [1,8,4096,40] (2 cores shared, load ~12,
                              so only the ratio means much): recompute 9.1 s, from a stored P
                              7.0-7.2 s: 1.3x the time, for two 64 MiB tiles at a time instead
                              of 512 MiB kept per attention. Memory wins: training must fit
                              24 GiB beside the weights.
                              dS is one Numba pass over dP, in place (softmax_grad_row); the
                              softmax is softmax.py's (a numpy one when a mask may empty a row).
                              Every matmul is np.matmul over the leading axes (OpenBLAS sgemm
                              per slice, on OpenBLAS's own threads). Now taken with a mask only.
  3. attention_backward_slices  no mask (self, cross, causal): one task per [N,d] slice (batch,
                              head) on the block pool (kernels/block_pool.py), each task's GEMMs
                              one-thread sgemm on its own core, its Numba passes serial, so
                              OpenBLAS's threads (and their busy-wait after each call) never meet
                              the Numba passes, as in the forward (fused.py). Inside a task, query
                              blocks of SLICE_TILE_FLOATS scores (4 MiB, in the caches),
                              each version 2's steps on transposed tiles [M,Q] (slice_backward); dk and dv of the slice are summed over its
                              blocks by its own task (no two tasks write the same rows). k, v and
                              dO's slice are copied contiguous once per task. Parallel over
                              slices: SD's 8 heads (CLIP's 12) keep both cores busy at batch 1.
                              The softmax is left unnormalised: 1 / column sum is folded into
                              dO's rows (dv) and dS's per-column factor. Measured at
                              [1,8,4096,40] (benchmarks/training_kernels.py, load 3.6-5):
                              version 2 4.81 s, version 3 1.21 s, torch's SDPA backward 0.82 s.
  4. attention_backward_with_stats  no mask, given the forward's output O and log-sum-exp lse
                              (backward_stats.py; taken from V4_MIN_KEYS keys on): key blocks
                              of 64 outermost, every tile in L1, all five GEMMs on one Numba
                              register tile (backward_tiles.py) instead of one-thread sgemm, no
                              pass over whole rows (P = exp(S - lse), Dr = rowsum(dO * O)):
                              flash-attention-2's backward. Given O alone it recomputes lse in one
                              more sweep of q k^T tiles. attention_backward_fused (backward_fused.py)
                              is the same tile without statistics: version 3's query blocks with
                              [Q, M] tiles stored by 64-key blocks. Measured at [1,8,4096,40]
                              (benchmarks/training_kernels.py, load 2.5, process CPU per call):
                              version 3 0.705 s, 4 given O and lse 0.604 s (torch 0.564 s), 4
                              without statistics 0.720 s, given O alone 0.771 s; under load 4.5
                              the last two ran at 0.88-0.97x and 0.85x version 3, but they are not
                              taken: on the quieter machine they are not faster. At M <= 1024
                              version 3 is ahead of every version 4 (64-key padding, e.g. M = 77
                              computed as 128). Figures and the whole step: benchmarks/RESULTS.md.
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.jit import FASTMATH_CONTRACT, PARALLEL, SERIAL, njit, prange
from npdiff.kernels import dispatch
from npdiff.kernels.attention import check_attention_inputs
from npdiff.kernels.attention.backward_fused import outputs_and_slices
from npdiff.kernels.attention.backward_stats import attention_backward_with_stats
from npdiff.kernels.attention.common import (
    causal_additive,
    default_scale,
    mask_to_additive,
    masked_row_max,
)
from npdiff.kernels.attention.fused import softmax_keys_in_place
from npdiff.kernels.attention.reference import full_scores
from npdiff.kernels.block_pool import run_blocks
from npdiff.kernels.lane_sums import dot_f64
from npdiff.kernels.scratch import contiguous_in_scratch, scratch
from npdiff.kernels.softmax import softmax
from npdiff.kernels.validate import shape_text
from npdiff.kernels.vecmath import LOG2E

# floats of one block's score tile [..., block, M] (64 MiB; the dS tile beside it is as big). Measured on
# [1,8,4096,40] (load ~12): 1 << 22 (128 queries per block) 16-21 s, 1 << 24 (512 queries) 9.1 s.
BACKWARD_BLOCK_SCORES = 1 << 24
# version 3: scores per query block of one slice [Q, M] (4 MiB; the dP tile beside it is as big)
SLICE_TILE_FLOATS = 1 << 20
# version 4 given out and lse from this many keys on (benchmarks/training_kernels.py, load 2.5, process
# CPU time against version 3: 0.86x at M = 4096; 1.13x at 1024, 1.22x at 256, 1.30x at 77)
V4_MIN_KEYS = 2048


def softmax_probs(scores, xp):
    """softmax over the last axis; rows that may attend to nothing give 0, as the forward."""
    row_max = masked_row_max(scores, xp)  # [...,n,1]
    probs = xp.exp(scores - row_max)  # [...,n,M]
    row_sum = probs.sum(axis=-1, keepdims=True)  # [...,n,1]
    return probs / xp.where(row_sum == 0, np.float32(1.0), row_sum)  # [...,n,M]


def block_grads(q, k, v, grad_out, probs, scale, xp):
    """One block of queries: -> (dq [...,n,d], dk [...,M,d], dv [...,M,dv]) from P [...,n,M]."""
    grad_v = xp.matmul(xp.swapaxes(probs, -1, -2), grad_out)  # [...,M,n] @ [...,n,dv] -> [...,M,dv]
    grad_probs = xp.matmul(grad_out, xp.swapaxes(v, -1, -2))  # [...,n,dv] @ [...,dv,M] -> [...,n,M]
    # rowsum(dO * O) written as rowsum(P * dP), summed in float64: the same number, but taken from the
    # very dP it is subtracted from, so a row whose probability sits on one key gets dS = 0 exactly
    # (with O = P @ V formed apart, float32 rounding left ~1e-7 * |dP| there: 3e-5 of a 2-query dq).
    row_dot = (probs * grad_probs).sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)  # [...,n,1]
    grad_scores = probs * (grad_probs - row_dot)  # [...,n,M]
    grad_scores *= np.float32(scale)
    grad_q = xp.matmul(grad_scores, k)  # [...,n,M] @ [...,M,d] -> [...,n,d]
    grad_k = xp.matmul(xp.swapaxes(grad_scores, -1, -2), q)  # [...,M,n] @ [...,n,d] -> [...,M,d]
    return grad_q, grad_k, grad_v


# ---------------------------------------------------------------------------------------------
# 1. Reference
# ---------------------------------------------------------------------------------------------
def attention_backward_ref(q, k, v, grad_out, mask=None, scale=None, is_causal=False, out=None, lse=None):
    """The formulas on the whole score matrix (out and lse, the forward's statistics, are not needed)."""
    xp = backend.array_module(q)
    scale = default_scale(q, scale)
    probs = softmax_probs(full_scores(q, k, mask, scale, is_causal, xp), xp)  # [...,N,M]
    return block_grads(q, k, v, grad_out, probs, scale, xp)


# ---------------------------------------------------------------------------------------------
# 2. Query blocks, scores recomputed
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def softmax_grad_row(probs, grad, scale):
    """grad <- scale * P * (dP - rowsum(P * dP)) over one contiguous row, in place (the sum in
    float64 in a fixed order, lane_sums.dot_f64; it equals rowsum(dO * O), so O itself is never formed)."""
    row_dot = np.float32(dot_f64(probs, grad))
    for j in range(probs.size):
        grad[j] = probs[j] * (grad[j] - row_dot) * scale


@njit(**PARALLEL)
def _softmax_grad_rows(probs, grad, scale):
    """probs, grad: [R, M] contiguous rows; grad is overwritten with dS."""
    for r in prange(probs.shape[0]):
        softmax_grad_row(probs[r], grad[r], scale)


def block_grads_fast(q, k, v, grad_out, probs, scale):
    """block_grads for NumPy arrays: dS in one Numba pass over dP, in place (no O, no temporaries)."""
    grad_v = np.matmul(np.swapaxes(probs, -1, -2), grad_out)  # [...,M,n] @ [...,n,dv] -> [...,M,dv]
    grad_scores = np.matmul(grad_out, np.swapaxes(v, -1, -2))  # [...,n,dv] @ [...,dv,M] -> [...,n,M] (dP)
    n_keys = grad_scores.shape[-1]
    _softmax_grad_rows(probs.reshape(-1, n_keys), grad_scores.reshape(-1, n_keys), np.float32(scale))  # dP -> dS
    grad_q = np.matmul(grad_scores, k)  # [...,n,M] @ [...,M,d] -> [...,n,d]
    grad_k = np.matmul(np.swapaxes(grad_scores, -1, -2), q)  # [...,M,n] @ [...,n,d] -> [...,M,d]
    return grad_q, grad_k, grad_v


def attention_backward_fast(q, k, v, grad_out, mask=None, scale=None, is_causal=False):
    scale = default_scale(q, scale)
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    lead = q.shape[:-2]
    slices = int(np.prod(lead)) if lead else 1
    block = max(1, min(n_queries, BACKWARD_BLOCK_SCORES // max(1, slices * n_keys)))
    additive = None
    if mask is not None:
        additive = np.broadcast_to(mask_to_additive(mask), lead + (n_queries, n_keys))  # [...,N,M] (a view)
    grad_q = np.empty(q.shape, np.float32)  # [...,N,d]
    grad_k = np.zeros(k.shape, np.float32)  # [...,M,d], accumulated over blocks
    grad_v = np.zeros(v.shape, np.float32)  # [...,M,dv]
    k_t = np.swapaxes(k, -1, -2)  # [...,d,M] (a view)
    for start in range(0, n_queries, block):
        stop = min(n_queries, start + block)
        # 1. recompute this block's scores and probabilities
        q_block = q[..., start:stop, :]  # [...,n,d]
        scores = np.matmul(q_block, k_t)  # [...,n,d] @ [...,d,M] -> [...,n,M]
        scores *= np.float32(scale)
        if additive is not None:
            scores += additive[..., start:stop, :]
        if is_causal:
            scores += causal_additive(start, stop, 0, n_keys)  # [...,n,M] + [n,M]
        # (without a mask every row has a key: the Numba softmax; with one, rows may have none)
        probs = softmax(scores) if additive is None else softmax_probs(scores, np)  # [...,n,M]
        del scores
        # 2. the block's gradients; dk and dv sum over all query blocks
        block_q, block_k, block_v = block_grads_fast(q_block, k, v, grad_out[..., start:stop, :], probs, scale)
        grad_q[..., start:stop, :] = block_q
        grad_k += block_k
        grad_v += block_v
    return grad_q, grad_k, grad_v


# ---------------------------------------------------------------------------------------------
# 3. One task per slice on the block pool (no mask)
# ---------------------------------------------------------------------------------------------
@njit(**SERIAL, fastmath=FASTMATH_CONTRACT)
def softmax_grad_columns(exps_t, grad_t, inverse_sum, scale):
    """grad_t <- scale * P^T * (dP^T - colsum(P^T * dP^T)) for [M, Q] contiguous tiles (a query per
    column), in place, from the UNNORMALISED exps_t = 2^(s - max) and inverse_sum [Q] = 1 / the
    column sums (P^T = exps_t * inverse_sum, never written): softmax_grad_row's step, the column
    sums in float64, vectorised along Q."""
    n_keys, cols = exps_t.shape
    col_dot = np.zeros(cols, np.float64)
    for r in range(n_keys):
        for c in range(cols):
            col_dot[c] += exps_t[r, c] * grad_t[r, c]
    dots = np.empty(cols, np.float32)
    factors = np.empty(cols, np.float32)
    for c in range(cols):
        dots[c] = np.float32(col_dot[c] * inverse_sum[c])               # colsum(P^T * dP^T)
        factors[c] = inverse_sum[c] * scale
    for r in range(n_keys):
        for c in range(cols):
            grad_t[r, c] = exps_t[r, c] * (grad_t[r, c] - dots[c]) * factors[c]


def slice_backward(q, k, v, grad_out, grad_q, grad_k, grad_v, scale, is_causal):
    """One [N,d] slice: q [N,d], k [M,d], v [M,dv], dO [N,dv] (views) -> writes dq [N,d], dk [M,d],
    dv [M,dv] (views of the outputs), query block by query block. The tiles are transposed, keys
    along rows ([M,Q], as the forward's fused.py): k @ q^T and v @ dO^T ran 1.3-1.6x faster than
    q @ k^T and dO @ v^T on one core (M = 4096, Q = 256, d = 40), and the softmax and its backward
    then work down the columns (per-lane sums, no horizontal reduction per query)."""
    n_queries, n_keys = q.shape[0], k.shape[0]
    block = max(1, min(n_queries, SLICE_TILE_FLOATS // max(1, n_keys)))
    keys = contiguous_in_scratch(k, "attn_bwd_k")                       # [M,d]
    values = contiguous_in_scratch(v, "attn_bwd_v")                     # [M,dv]
    grad_rows = contiguous_in_scratch(grad_out, "attn_bwd_do")          # [N,dv]
    part_k = scratch("attn_bwd_part_k", grad_k.shape)                   # [M,d]
    part_v = scratch("attn_bwd_part_v", grad_v.shape)                   # [M,dv]
    if n_queries == 0:
        grad_k[:], grad_v[:] = 0.0, 0.0                                 # no query: no gradient
    log2_scale = np.float32(scale * float(LOG2E))
    for start in range(0, n_queries, block):
        stop = min(n_queries, start + block)
        rows = stop - start
        # 1. recompute this block's scores and softmax (log2 units: fused.py's column softmax), left
        #    unnormalised: the column sums are folded into dO's rows (step 2) and dS's factor (step 3)
        q_block = scratch("attn_bwd_q", (rows, q.shape[1]))             # [Q,d]
        np.multiply(q[start:stop], log2_scale, out=q_block)
        probs_t = scratch("attn_bwd_probs", (n_keys, rows))             # [M,Q]
        np.matmul(keys, q_block.T, out=probs_t)                         # [M,d] @ [d,Q] -> [M,Q]
        if is_causal:
            probs_t += causal_additive(start, stop, 0, n_keys).T        # [M,Q] + [Q,M]^T
        col_sum = scratch("attn_bwd_col_sum", (rows,))                  # [Q]
        softmax_keys_in_place(probs_t, col_sum)                         # exps 2^(s - max) [M,Q], sums [Q]
        inverse_sum = np.float32(1.0) / col_sum                         # [Q] (P^T = exps * inverse_sum)
        # 2. dv = P^T dO (summed over blocks) as exps @ (dO's rows / their sums), and dP^T
        first = start == 0
        grad_block = scratch("attn_bwd_do_scaled", (rows, grad_rows.shape[1]))  # [Q,dv]
        np.multiply(grad_rows[start:stop], inverse_sum[:, None], out=grad_block)
        np.matmul(probs_t, grad_block, out=grad_v if first else part_v)  # [M,Q] @ [Q,dv] -> [M,dv]
        if not first:
            grad_v += part_v
        grad_t = scratch("attn_bwd_dp", (n_keys, rows))                 # [M,Q]
        np.matmul(values, grad_rows[start:stop].T, out=grad_t)          # [M,dv] @ [dv,Q] -> [M,Q]
        # 3. dS^T (times the scale) in place of dP^T, then dq and dk (summed over blocks)
        softmax_grad_columns(probs_t, grad_t, inverse_sum, np.float32(scale))
        np.matmul(grad_t.T, keys, out=grad_q[start:stop])               # [Q,M] @ [M,d] -> [Q,d]
        np.matmul(grad_t, q[start:stop], out=grad_k if first else part_k)  # [M,Q] @ [Q,d] -> [M,d]
        if not first:
            grad_k += part_k


def attention_backward_slices(q, k, v, grad_out, scale=None, is_causal=False):
    scale = default_scale(q, scale)
    grad_q, grad_k, grad_v, slices = outputs_and_slices(q, k, v)       # in q, k, v's memory order

    def run_slice(index):
        at = slices[index]
        slice_backward(q[at], k[at], v[at], grad_out[at], grad_q[at], grad_k[at], grad_v[at], scale, is_causal)

    run_blocks(run_slice, list(range(len(slices))))
    return grad_q, grad_k, grad_v


def attention_backward_by_mask(q, k, v, grad_out, mask=None, scale=None, is_causal=False, out=None, lse=None):
    """Version 2 with a mask (rows a mask may empty); without one, version 4 given the forward's output
    and log-sum-exp from V4_MIN_KEYS keys on, else version 3 (version 4 without both statistics was
    measured no faster than 3: see the header)."""
    if mask is not None:
        return attention_backward_fast(q, k, v, grad_out, mask, scale, is_causal)
    if out is not None and lse is not None and k.shape[-2] >= V4_MIN_KEYS and q.shape[-2] > 0:
        return attention_backward_with_stats(q, k, v, grad_out, out, lse, scale, is_causal)
    return attention_backward_slices(q, k, v, grad_out, scale, is_causal)


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
ATTENTION_BACKWARD = dispatch.register("attention_backward", fast=attention_backward_by_mask,
                                       reference=attention_backward_ref)


def attention_backward(q, k, v, grad_out, mask=None, scale=None, is_causal=False, out=None, lse=None):
    """Gradients of O = scaled_dot_product_attention(q, k, v, mask, scale, is_causal) given dO
    [..., N, dv] -> (dq [..., N, d], dk [..., M, d], dv [..., M, dv]). q, k, v: the forward's inputs.
    out [..., N, dv] and lse [..., N] (optional; lse only with out): the forward's output and its
    per-query log-sum-exp, log(sum over keys of exp(scale * q.k)) in natural log as torch's flash
    attention returns it; with both and no mask, version 4 runs key block by key block, every tile in
    L1 (out alone is accepted, and version 3 runs: recomputing lse was measured no faster)."""
    from_forward = "scaled_dot_product_attention"
    check_attention_inputs(q, k, v, mask, is_causal, "auto")
    expected = q.shape[:-1] + (v.shape[-1],)
    if tuple(grad_out.shape) != tuple(expected):
        raise NpdiffError(f"attention_backward: grad_out must have the shape of {from_forward}'s output "
                          f"{shape_text(expected)}, got {shape_text(grad_out.shape)}")
    if lse is not None and out is None:
        raise NpdiffError("attention_backward: lse (the forward's log-sum-exp) is used only with out (its output)")
    if out is not None and tuple(out.shape) != tuple(expected):
        raise NpdiffError(f"attention_backward: out must be {from_forward}'s output {shape_text(expected)}, "
                          f"got {shape_text(out.shape)}")
    if lse is not None and tuple(lse.shape) != tuple(q.shape[:-1]):
        raise NpdiffError(f"attention_backward: lse must have one value per query {shape_text(q.shape[:-1])}, "
                          f"got {shape_text(lse.shape)}")
    return ATTENTION_BACKWARD(q, k, v, grad_out, mask, scale, is_causal, out, lse)
