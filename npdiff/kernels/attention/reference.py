"""Attention versions 1 and 2: the readable ones, NumPy API only (numpy or cupy arrays).

  1. attention_ref          the textbook: the whole score matrix [..., N, M] = q k^T * scale
                            (+ mask), softmax over M, then @ v. Memory grows with N*M:
                            [2,8,4096,4096] scores are 1 GiB (plus temporaries).
  2. attention_chunked_ref  memory-efficient ("flash attention"): keys/values are visited in chunks
                            of key_chunk (default KEY_CHUNK); for each chunk the scores
                            [..., N, key_chunk] are made, and a running row max m, running sum l
                            and running output acc are updated:
                                m_new = max(m, rowmax(s));  p = exp(s - m_new)
                                l = l * exp(m - m_new) + rowsum(p);  acc = acc * exp(m - m_new) + p @ v_chunk
                            and the output is acc / l. Memory is linear in N (and in M).

Both return 0 for a query that may attend to no key, as torch 2.13 does.
"""

import numpy as np

from npdiff import backend
from npdiff.kernels.attention.common import (
    KEY_CHUNK,
    causal_additive,
    default_scale,
    mask_to_additive,
    masked_row_max,
)


def full_scores(q, k, mask, scale, is_causal, xp):
    """q k^T * scale (+ mask, + causal mask): the whole [..., N, M] score matrix."""
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2))  # [...,N,d] @ [...,d,M] -> [...,N,M]
    scores *= np.float32(scale)  # in place: no second [...,N,M] temporary
    if mask is not None:
        scores = scores + mask_to_additive(mask, xp)  # [...,N,M] + broadcast mask
    if is_causal:
        scores += causal_additive(0, q.shape[-2], 0, k.shape[-2], xp)  # [...,N,M] + [N,M]
    return scores


def attention_ref(q, k, v, mask=None, scale=None, is_causal=False):
    """Version 1: softmax(q k^T * scale + mask) v with the whole score matrix."""
    xp = backend.array_module(q)
    scores = full_scores(q, k, mask, default_scale(q, scale), is_causal, xp)  # [...,N,M]
    row_max = masked_row_max(scores, xp)  # [...,N,1]
    probs = xp.exp(scores - row_max)  # [...,N,M]
    row_sum = probs.sum(axis=-1, keepdims=True)  # [...,N,1]
    probs = probs / xp.where(row_sum == 0, np.float32(1.0), row_sum)  # [...,N,M]; masked rows stay 0
    return xp.matmul(probs, v)  # [...,N,M] @ [...,M,dv] -> [...,N,dv]


def attention_chunked_ref(q, k, v, mask=None, scale=None, is_causal=False, key_chunk=KEY_CHUNK):
    """Version 2: the same result as attention_ref, never holding more than [..., N, key_chunk] scores."""
    xp = backend.array_module(q)
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    lead = q.shape[:-2]
    q_scaled = q * np.float32(default_scale(q, scale))  # [...,N,d]
    if mask is not None:
        mask = xp.broadcast_to(mask, lead + (n_queries, n_keys))  # a view [...,N,M]
    running_max = xp.full(lead + (n_queries, 1), -np.inf, dtype=xp.float32)  # [...,N,1]
    running_sum = xp.zeros(lead + (n_queries, 1), dtype=xp.float32)  # [...,N,1]
    acc = xp.zeros(lead + (n_queries, v.shape[-1]), dtype=xp.float32)  # [...,N,dv]
    for start in range(0, n_keys, key_chunk):
        stop = min(start + key_chunk, n_keys)
        if is_causal and start > n_queries - 1:
            break  # every key from here on lies above the diagonal for every query
        # 1. scores of this chunk, masked
        k_chunk = k[..., start:stop, :]  # [...,m,d]
        scores = xp.matmul(q_scaled, xp.swapaxes(k_chunk, -1, -2))  # [...,N,d] @ [...,d,m] -> [...,N,m]
        if mask is not None:
            scores = scores + mask_to_additive(mask[..., start:stop], xp)  # [...,N,m]
        if is_causal:
            scores = scores + causal_additive(0, n_queries, start, stop, xp)  # [...,N,m] + [N,m]
        # 2. new running max; rows still all -inf keep a max of 0 so exp() gives 0, not NaN
        new_max = xp.maximum(running_max, scores.max(axis=-1, keepdims=True))  # [...,N,1]
        new_max = xp.where(new_max == -np.inf, np.float32(0.0), new_max)  # [...,N,1]
        correction = xp.exp(running_max - new_max)  # [...,N,1]; 0 while running_max is -inf
        probs = xp.exp(scores - new_max)  # [...,N,m]
        # 3. rescale what was accumulated, add this chunk
        running_sum = running_sum * correction + probs.sum(axis=-1, keepdims=True)  # [...,N,1]
        acc = acc * correction + xp.matmul(probs, v[..., start:stop, :])  # [...,N,m] @ [...,m,dv]
        running_max = new_max
    return acc / xp.where(running_sum == 0, np.float32(1.0), running_sum)  # [...,N,dv]
