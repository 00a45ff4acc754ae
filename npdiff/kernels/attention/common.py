"""What every attention version shares: the block sizes, the default scale, masks as numbers.

KEY_CHUNK and QUERY_BLOCK are the one pair of tile sizes of the memory-efficient versions (2, the
readable one, and 3, the threaded one): keys per step of the running softmax, queries per task.
The score tile [QUERY_BLOCK, KEY_CHUNK] (1 MiB at 256 x 1024) stays in a core's L2 cache.

The mask helpers take the array module (numpy or cupy) as xp, so the reference versions run on
either; the threaded versions call them with NumPy.
"""

import math

import numpy as np

KEY_CHUNK = 1024  # keys per step of the running softmax (versions 2 and 3)
QUERY_BLOCK = 256  # queries per task of the threaded version 3


def default_scale(q, scale):
    """torch's default: 1/sqrt(d) for q [..., N, d]."""
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def mask_to_additive(mask, xp=np):
    """A bool mask (True = attend) -> 0 / -inf floats; a float mask is already additive."""
    if mask.dtype == bool:
        return xp.where(mask, np.float32(0.0), np.float32(-np.inf)).astype(xp.float32)
    return mask


def causal_additive(query_start, query_stop, key_start, key_stop, xp=np):
    """[n, m] of 0 where key j <= query i, -inf above the diagonal (torch's top-left alignment)."""
    query_index = xp.arange(query_start, query_stop)[:, None]  # [n,1]
    key_index = xp.arange(key_start, key_stop)[None, :]  # [1,m]
    return xp.where(key_index <= query_index, np.float32(0.0), np.float32(-np.inf)).astype(xp.float32)


def masked_row_max(scores, xp=np):
    """Row max over the last axis, with rows that are all -inf given 0, so exp(s - max) stays 0 (and 0 for
    every row when there is no key at all: a max over nothing)."""
    if scores.shape[-1] == 0:
        return xp.zeros(scores.shape[:-1] + (1,), dtype=xp.float32)  # [..., N, 1]
    row_max = scores.max(axis=-1, keepdims=True)  # [..., N, 1]
    return xp.where(row_max == -np.inf, np.float32(0.0), row_max)  # [..., N, 1]
