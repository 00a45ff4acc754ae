"""Scaled dot-product attention: one op family, eight versions, two public entries (float32, bf16).

Versions (each tested against torch and against version 1):
  1. attention_ref          reference.py  the textbook, NumPy API (numpy or cupy): the whole score
                                          matrix, softmax, @ v.
  2. attention_chunked_ref  reference.py  memory-efficient ("flash attention"), NumPy API: key
                                          chunks with a running max and sum; memory linear in N.
  3. attention_blocked      threaded.py   version 2 made fast for NumPy arrays: query blocks on the
                                          block-parallel pool, cache-sized score tiles, a fused
                                          Numba update.
  4. attention_batched      threaded.py   many small slices at once: groups of slices on the pool,
                                          batched matmuls, a serial Numba softmax.
  5. attention_fused        fused.py      one block of queries against ALL keys per task (the score
                                          tile, transposed, stays in cache): BLAS, one fused Numba
                                          softmax pass, BLAS; no running max. Up to FUSED_MAX_KEYS
                                          keys (every attention of SD at 512x512).
  6. attention_amx          amx.py        bf16 on AMX tiles, for models loaded at precision="bf16": q, k,
                                          v and the probabilities rounded to bf16, float32 sums and
                                          softmax; version 5's layout. Reference: attention_bf16_ref
                                          (version 1 on the rounded operands).
  7. causal_attention_rows  causal_rows.py  CLIP's causal self-attention of a few tokens on the
                                          projections' token rows [B*L, heads*d] as they are, both
                                          products on matmul_numba's micro-kernel; called by CLIP's
                                          packed layers directly (not through the entries below).
  8. attention_flash        flash.py      version 5's tile with both products on register-blocked
                                          Numba micro-kernels (64 queries along the vector lanes, the
                                          max fused into the first product, exp and the second product
                                          per 64-key chunk in L1): no BLAS; no mask, no is_causal.
  cupy arrays: cuBLAS + a fused masked softmax (npdiff/kernels/cuda/attention.py).
Shared by all: common.py (KEY_CHUNK and QUERY_BLOCK, the one pair of tile sizes of versions 2 and
3; masks as numbers).

Which runs (the array rule is npdiff/kernels/dispatch.py's: cupy -> CUDA, NumPy -> fast, else the
reference):
  scaled_dot_product_attention  cupy -> CUDA; otherwise path "auto" picks "chunked" when the full
                                score matrix would hold more than MEMORY_EFFICIENT_MIN_SCORES
                                floats, "full" otherwise; path="full"|"chunked" forces one.
  attention_full       NumPy: version 4 for slices of at most BATCHED_MAX_SLICE_SCORES scores,
                       else version 8 where flash_applies (no mask, no is_causal, head sizes d and
                       dv <= FLASH_MAX_HEAD_DIM, up to FUSED_MAX_KEYS keys), else version 5 up to
                       FUSED_MAX_KEYS keys, else version 3 with one block of all N queries
                       and one chunk of all M keys (a plain softmax of each slice's full score
                       matrix); else version 1.
  attention_chunked    NumPy: version 8 where flash_applies, else version 5 up to FUSED_MAX_KEYS
                       keys (the memory of both is one tile per worker, whatever N is), else
                       version 3 with KEY_CHUNK x QUERY_BLOCK tiles;
                       a key_chunk given by the caller always takes version 3 with that chunk.
                       Else version 2.

  scaled_dot_product_attention_bf16   what a precision="bf16" model calls: version 6 where
                       bf16_kernel() says "amx" (NPDIFF_NO_AMX=1 / NPDIFF_NO_BF16=1 rule it out) and
                       0 < M <= AMX_MAX_KEYS; the float32 scaled_dot_product_attention otherwise
                       (without AMX, bf16 products would run on vdpbf16ps, which reaches 0.2-0.65x
                       of sgemm's GFLOP/s: benchmarks/RESULTS.md, "bfloat16 kernels").
                       float32 models never take it.

Masks follow torch.nn.functional.scaled_dot_product_attention: a bool mask says True = may attend,
a float mask is added to the scores, either broadcasts to [..., N, M]; is_causal keeps key j <= query
i (top-left aligned, as torch) and is combined with a mask if both are given (as torch 2.13 does).
The attention of a query that may attend to no key gives 0, as torch 2.13's
scaled_dot_product_attention does (its fused CPU kernel returns zeros there); every version does so.
"""

import math

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.kernels import dispatch
from npdiff.kernels.attention.amx import AMX_MAX_KEYS, attention_amx, attention_bf16_ref
from npdiff.kernels.attention.common import KEY_CHUNK, QUERY_BLOCK, default_scale
from npdiff.kernels.attention.flash import FLASH_MAX_HEAD_DIM, attention_flash
from npdiff.kernels.attention.fused import FUSED_MAX_KEYS, attention_fused
from npdiff.kernels.attention.reference import attention_chunked_ref, attention_ref
from npdiff.kernels.attention.threaded import attention_batched, attention_blocked
from npdiff.kernels.bf16_rounding import bf16_kernel
from npdiff.kernels.validate import require_min_ndim, shape_text

MEMORY_EFFICIENT_MIN_SCORES = 1 << 23  # full score matrix above this many floats (32 MiB) -> chunked
BATCHED_MAX_SLICE_SCORES = 128 * 128  # attention_full: slices of at most this many scores -> version 4
PATHS = ("auto", "full", "chunked")


# ---------------------------------------------------------------------------------------------
# The two paths, for NumPy arrays
# ---------------------------------------------------------------------------------------------
def flash_applies(q, k, v, mask, is_causal):
    """Whether version 8 takes this call: no mask, no is_causal, head sizes up to FLASH_MAX_HEAD_DIM,
    up to FUSED_MAX_KEYS keys (its score tile, 64 queries x M keys, as version 5's)."""
    return (mask is None and not is_causal and k.shape[-2] <= FUSED_MAX_KEYS
            and q.shape[-1] <= FLASH_MAX_HEAD_DIM and v.shape[-1] <= FLASH_MAX_HEAD_DIM)


def attention_full_fast(q, k, v, mask=None, scale=None, is_causal=False):
    """Each (batch, head) slice's full score matrix: small slices in groups (version 4), larger ones
    in query blocks against all keys (version 8 where flash_applies, else version 5), or one slice
    per worker (version 3 with a single block and a single key chunk) above FUSED_MAX_KEYS keys."""
    scale = default_scale(q, scale)
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    if n_queries * n_keys <= BATCHED_MAX_SLICE_SCORES:
        return attention_batched(q, k, v, mask, scale, is_causal)
    if flash_applies(q, k, v, mask, is_causal):
        return attention_flash(q, k, v, scale)
    if n_keys <= FUSED_MAX_KEYS:
        return attention_fused(q, k, v, mask, scale, is_causal)
    return attention_blocked(q, k, v, mask, scale, is_causal, key_chunk=max(1, n_keys),
                             query_block=max(1, n_queries))


def attention_chunked_fast(q, k, v, mask=None, scale=None, is_causal=False, key_chunk=None):
    """Version 8 where flash_applies, else version 5 up to FUSED_MAX_KEYS keys, else version 3 with
    KEY_CHUNK x QUERY_BLOCK tiles; key_chunk given: version 3 with key_chunk x QUERY_BLOCK tiles."""
    scale = default_scale(q, scale)
    if key_chunk is None and flash_applies(q, k, v, mask, is_causal):
        return attention_flash(q, k, v, scale)
    if key_chunk is None and k.shape[-2] <= FUSED_MAX_KEYS:
        return attention_fused(q, k, v, mask, scale, is_causal)
    return attention_blocked(q, k, v, mask, scale, is_causal, key_chunk or KEY_CHUNK)


ATTENTION_FULL = dispatch.register("attention_full", fast=attention_full_fast, reference=attention_ref)
ATTENTION_CHUNKED = dispatch.register("attention_chunked", fast=attention_chunked_fast,
                                      reference=attention_chunked_ref)


def attention_full(q, k, v, mask=None, scale=None, is_causal=False):
    """The "full" path: every (batch, head) slice's whole score matrix at once."""
    return ATTENTION_FULL(q, k, v, mask, scale, is_causal)


def attention_chunked(q, k, v, mask=None, scale=None, is_causal=False, key_chunk=None):
    """The "chunked" (memory-efficient) path. key_chunk: keys per step of a running softmax (None:
    the version's own choice; KEY_CHUNK for the reference)."""
    if key_chunk is None:
        return ATTENTION_CHUNKED(q, k, v, mask, scale, is_causal)
    return ATTENTION_CHUNKED(q, k, v, mask, scale, is_causal, key_chunk)


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------
def check_attention_inputs(q, k, v, mask, is_causal, path):
    kernel = "scaled_dot_product_attention"
    require_min_ndim(kernel, "q", q, 2, "[..., N, d]")
    require_min_ndim(kernel, "k", k, 2, "[..., M, d]")
    require_min_ndim(kernel, "v", v, 2, "[..., M, dv]")
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise NpdiffError(f"{kernel}: k must have shape [{','.join(map(str, q.shape[:-2] + ('M',)))},"
                          f"{q.shape[-1]}] to match q {shape_text(q.shape)}, got {shape_text(k.shape)}")
    if v.shape[:-1] != k.shape[:-1]:
        raise NpdiffError(f"{kernel}: v must have shape {shape_text(k.shape[:-1] + ('dv',))} to match "
                          f"k {shape_text(k.shape)}, got {shape_text(v.shape)}")
    if mask is not None:
        if mask.dtype != bool and mask.dtype != np.float32:
            raise NpdiffError(f"{kernel}: mask must be bool (True = attend) or float32, got {mask.dtype}")
        target = q.shape[:-2] + (q.shape[-2], k.shape[-2])
        try:
            np.broadcast_shapes(mask.shape, target)
            ok = len(mask.shape) <= len(target)
        except ValueError:
            ok = False
        if not ok or np.broadcast_shapes(mask.shape, target) != target:
            raise NpdiffError(f"{kernel}: mask must broadcast to [..., N, M] = {shape_text(target)}, "
                              f"got {shape_text(mask.shape)}")
    if path not in PATHS:
        raise NpdiffError(f"{kernel}: path must be one of {PATHS}, got {path!r}")


def attention_by_path(q, k, v, mask=None, scale=None, is_causal=False, path="auto"):
    """Non-cupy arrays: "auto" -> "chunked" above MEMORY_EFFICIENT_MIN_SCORES scores, else "full";
    each path then picks its version for the array."""
    if path == "auto":
        n_scores = math.prod(q.shape[:-1]) * k.shape[-2]
        path = "chunked" if n_scores > MEMORY_EFFICIENT_MIN_SCORES else "full"
    if path == "chunked":
        return attention_chunked(q, k, v, mask, scale, is_causal)
    return attention_full(q, k, v, mask, scale, is_causal)


# The path choice is the same for NumPy and other arrays; attention_full/attention_chunked then
# apply the array rule again to pick versions 1-5 and 8.
ATTENTION = dispatch.register("scaled_dot_product_attention", fast=attention_by_path,
                              reference=attention_by_path, cuda="scaled_dot_product_attention")


def scaled_dot_product_attention(q, k, v, mask=None, scale=None, is_causal=False, path="auto"):
    """torch.nn.functional.scaled_dot_product_attention. q [..., N, d], k [..., M, d], v [..., M, dv].

    mask: bool (True = may attend) or float (added to the scores), broadcastable to [..., N, M].
    scale: default 1/sqrt(d). path: "auto" (chunked above MEMORY_EFFICIENT_MIN_SCORES score
    entries), "full" or "chunked". Returns [..., N, dv].
    """
    check_attention_inputs(q, k, v, mask, is_causal, path)
    if q.shape[-2] == 0 or k.shape[-2] == 0:  # no query, or no key to attend to: 0 (as torch), from version 1
        return attention_ref(q, k, v, mask, scale, is_causal)  # [...,N,dv]
    return ATTENTION(q, k, v, mask, scale, is_causal, path)


def attention_bf16_fast(q, k, v, mask=None, scale=None, is_causal=False):
    """Version 6 on AMX tiles where it can run, else the float32 attention (path "auto"); no key at
    all: zeros from the reference."""
    n_keys = k.shape[-2]
    if n_keys == 0 or v.shape[-1] == 0:
        return attention_bf16_ref(q, k, v, mask, scale, is_causal)
    if bf16_kernel() == "amx" and n_keys <= AMX_MAX_KEYS and q.shape[-1] > 0:
        return attention_amx(q, k, v, mask, scale, is_causal)
    return attention_by_path(q, k, v, mask, scale, is_causal)


ATTENTION_BF16 = dispatch.register("scaled_dot_product_attention_bf16", fast=attention_bf16_fast,
                                   reference=attention_bf16_ref)


def scaled_dot_product_attention_bf16(q, k, v, mask=None, scale=None, is_causal=False):
    """scaled_dot_product_attention for a model loaded at precision="bf16": on AMX tiles, q, k, v
    and the softmax's probabilities rounded to bf16 with float32 sums (version 6); where AMX cannot
    run, the float32 attention. Same arguments and result shape as scaled_dot_product_attention."""
    check_attention_inputs(q, k, v, mask, is_causal, "auto")
    return ATTENTION_BF16(q, k, v, mask, scale, is_causal)


__all__ = ["AMX_MAX_KEYS", "BATCHED_MAX_SLICE_SCORES", "FLASH_MAX_HEAD_DIM", "FUSED_MAX_KEYS", "KEY_CHUNK",
           "MEMORY_EFFICIENT_MIN_SCORES", "QUERY_BLOCK", "attention_batched", "attention_blocked", "attention_chunked",
           "attention_amx", "attention_bf16_ref", "attention_chunked_ref", "attention_full",
           "attention_flash", "attention_fused", "attention_ref", "scaled_dot_product_attention",
           "scaled_dot_product_attention_bf16"]
