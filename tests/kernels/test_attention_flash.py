"""Attention version 8 (npdiff/kernels/attention/flash.py) against torch: SD's shape families and uneven
sizes (queries not a multiple of 64, keys not a multiple of 6 or 64, head sizes not a multiple of 5,
dv != d, a single key), strided heads, the same bytes on any worker count, and the same bytes whether
Numba compiled the kernels fresh or loaded them from its disk cache."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff.kernels import attention, block_pool, scaled_dot_product_attention
from npdiff.kernels.attention import flash
from npdiff.kernels.attention.flash import attention_flash
from npdiff.models.transformer import merge_heads, split_heads

REPO = Path(__file__).resolve().parents[2]


def random_qkv(rng, lead, n_queries, n_keys, dim, value_dim=None):
    q = rng.standard_normal((*lead, n_queries, dim), dtype=np.float32)
    k = rng.standard_normal((*lead, n_keys, dim), dtype=np.float32)
    v = rng.standard_normal((*lead, n_keys, value_dim or dim), dtype=np.float32)
    return q, k, v


def torch_sdpa(q, k, v, scale=None):
    return F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                          scale=scale).numpy()


# SD 1.5's families, smaller (self-attention at d = 40 and 80, cross-attention with 77 keys), then
# uneven ones: N % 64 != 0, M % 6 != 0 and M % 64 != 0, d and dv not multiples of 5, one key, one query.
SHAPES = [(256, 256, 40, 40), (192, 200, 80, 80), (300, 77, 40, 40), (130, 13, 8, 7), (65, 1, 40, 3),
          (1, 70, 64, 64), (97, 131, 17, 23)]


@pytest.mark.parametrize("n_queries,n_keys,dim,value_dim", SHAPES)
def test_flash_matches_torch(rng, n_queries, n_keys, dim, value_dim):
    q, k, v = random_qkv(rng, (2, 2), n_queries, n_keys, dim, value_dim)
    q *= np.float32(rng.uniform(1, 4))  # sharper softmax rows than unit-variance scores give
    scale = float(rng.uniform(0.05, 0.5))
    assert_rel_close(attention_flash(q, k, v), torch_sdpa(q, k, v), KERNEL_TOL, "default scale")
    assert_rel_close(attention_flash(q, k, v, scale), torch_sdpa(q, k, v, scale), KERNEL_TOL, f"scale {scale}")


def test_flash_at_a_full_sd_slice(rng):
    """One head of SD 1.5's 64x64 self-attention (4096 queries and keys, d = 40): sums of 4096 terms."""
    q, k, v = random_qkv(rng, (1, 1), 4096, 4096, 40)
    assert_rel_close(attention_flash(q, k, v), torch_sdpa(q, k, v), KERNEL_TOL, "[1,1,4096,4096,40]")


def test_flash_reads_head_views_and_writes_in_their_order(rng):
    """The heads of transformer.split_heads ([B,h,N,d] views of [B,N,h*d]) give the same bytes as
    contiguous copies, and the output comes back in q's memory order (merge_heads copies nothing)."""
    heads, dim = 4, 40
    tokens = [rng.standard_normal((2, n, heads * dim), dtype=np.float32) for n in (150, 100, 100)]
    q, k, v = (split_heads(x, heads) for x in tokens)  # [B,h,*,d] strided views
    ours = attention_flash(q, k, v)  # [B,h,150,d]
    assert np.array_equal(ours, attention_flash(*(np.ascontiguousarray(x) for x in (q, k, v))))
    assert np.shares_memory(merge_heads(ours), ours)
    assert_rel_close(ours, torch_sdpa(q.copy(), k.copy(), v.copy()), KERNEL_TOL, "strided heads")


def test_flash_gives_the_same_bytes_on_any_worker_count_and_task_size(rng, monkeypatch):
    """Every block of 64 queries computes alone: 1, 2 or 3 workers and any queries per task give the
    same bytes."""
    q, k, v = random_qkv(rng, (2, 3), 200, 180, 40)
    results = []
    for workers, blocks_per_worker in ((1, 16), (2, 16), (3, 1), (2, 1000)):
        monkeypatch.setattr(block_pool, "_shared", block_pool.BlockParallelPool(workers))
        monkeypatch.setattr(flash, "BLOCKS_PER_WORKER", blocks_per_worker)
        results.append(attention_flash(q, k, v))
        block_pool._shared.shutdown()
    assert all(np.array_equal(results[0], other) for other in results[1:])


def test_scaled_dot_product_attention_takes_flash_only_where_it_applies(rng, monkeypatch):
    """Both paths send an unmasked, non-causal call with head sizes <= FLASH_MAX_HEAD_DIM to version 8;
    a larger head size goes to version 5, masks and is_causal too (test_attention_fused.py)."""
    calls = []
    for name in ("attention_fused", "attention_flash"):
        kernel = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _kernel=kernel, _name=name, **kw:
                            calls.append(_name) or _kernel(*a, **kw))
    small_head = random_qkv(rng, (2,), 140, 150, 40)
    large_head = random_qkv(rng, (2,), 140, 150, flash.FLASH_MAX_HEAD_DIM + 1)
    for q, k, v in (small_head, large_head):
        for path in ("full", "chunked"):
            assert_rel_close(scaled_dot_product_attention(q, k, v, path=path), torch_sdpa(q, k, v), KERNEL_TOL, path)
    assert calls == ["attention_flash"] * 2 + ["attention_fused"] * 2


CACHE_SCRIPT = """
import hashlib, sys
import numpy as np
from npdiff.kernels.attention import flash
rng = np.random.default_rng(int(sys.argv[1]))
q, k, v = (rng.standard_normal((2, 2, n, 40), dtype=np.float32) for n in (150, 133, 133))
out = flash.attention_flash(q, k, v)
hits = sum(sum(kernel.stats.cache_hits.values()) for kernel in (flash.attend_query_range, flash._score_tile))
print(hashlib.sha256(out.tobytes()).hexdigest(), hits)
"""


def test_flash_gives_the_same_bytes_compiled_fresh_or_loaded_from_numba_cache(seed, tmp_path):
    """CI's clean clone compiles every kernel fresh; a local rerun loads them from Numba's disk cache.
    Both must give the same bytes: one process compiles into an empty cache folder (NUMBA_CACHE_DIR),
    the next loads from it, and this process (the repository's own cache, or a compile) agrees.
    (Numba has no NUMBA_DISABLE_CACHE variable: an empty cache folder is how to compile fresh.)"""
    env = dict(os.environ, PYTHONPATH=str(REPO), NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))

    def run():
        result = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(seed)], env=env, capture_output=True,
                                text=True, timeout=600, check=True)
        digest, hits = result.stdout.split()
        return digest, int(hits)

    compiled, compiled_hits = run()
    loaded, loaded_hits = run()
    assert compiled_hits == 0 and loaded_hits > 0  # the second process really loaded the kernels from disk
    assert compiled == loaded
    inputs = np.random.default_rng(seed)  # the script's draws, in its order
    q, k, v = (inputs.standard_normal((2, 2, n, 40), dtype=np.float32) for n in (150, 133, 133))
    assert hashlib.sha256(attention_flash(q, k, v).tobytes()).hexdigest() == compiled
