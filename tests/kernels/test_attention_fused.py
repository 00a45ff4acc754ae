"""Attention version 5 (npdiff/kernels/attention/fused.py) at Stable Diffusion's shape families,
its independence of the worker count, and which version each path takes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff.kernels import attention, block_pool, scaled_dot_product_attention
from npdiff.kernels.attention import attention_fused, fused


def random_qkv(rng, lead, n_queries, n_keys, dim):
    q = rng.standard_normal((*lead, n_queries, dim), dtype=np.float32)
    k = rng.standard_normal((*lead, n_keys, dim), dtype=np.float32)
    v = rng.standard_normal((*lead, n_keys, dim), dtype=np.float32)
    return q, k, v


def torch_sdpa(q, k, v, mask=None, is_causal=False):
    mask_t = None if mask is None else torch.from_numpy(mask)
    return F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                          attn_mask=mask_t, is_causal=is_causal)


# SD 1.5's families, smaller: self-attention (M = N) at head sizes 40, 80, 160; cross-attention with
# 77 text tokens; N not a multiple of the query block.
SD_SHAPES = [(256, 256, 40), (256, 256, 80), (256, 256, 160), (300, 77, 40), (200, 77, 160)]


@pytest.mark.parametrize("n_queries,n_keys,dim", SD_SHAPES)
def test_fused_matches_torch_at_sd_shapes(rng, n_queries, n_keys, dim):
    q, k, v = random_qkv(rng, (2, 2), n_queries, n_keys, dim)
    q *= np.float32(rng.uniform(1, 4))  # sharper softmax rows than unit-variance scores give
    expected = torch_sdpa(q, k, v)
    for query_block in (None, 48, 37):
        assert_rel_close(attention_fused(q, k, v, query_block=query_block), expected, KERNEL_TOL,
                         f"attention_fused query_block={query_block}")
    for path in ("auto", "full", "chunked"):
        assert_rel_close(scaled_dot_product_attention(q, k, v, path=path), expected, KERNEL_TOL, path)


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_fused_masks_across_several_blocks(rng, kind):
    q, k, v = random_qkv(rng, (2, 2), 150, 130, 40)
    mask, is_causal = None, kind == "causal"
    if kind != "causal":
        allowed = rng.random((2, 1, 150, 130)) < 0.5  # broadcast over heads
        allowed[..., 7, :] = False  # query 7 may attend to no key: 0, as torch
        mask = allowed if kind == "bool" else np.where(allowed, rng.standard_normal(allowed.shape) * 3,
                                                       -np.inf).astype(np.float32)
    expected = torch_sdpa(q, k, v, mask, is_causal)
    ours = attention_fused(q, k, v, mask=mask, is_causal=is_causal, query_block=32)
    assert not np.isnan(ours).any()
    if mask is not None:
        assert (ours[..., 7, :] == 0).all() and (expected.numpy()[..., 7, :] == 0).all()
    assert_rel_close(ours, expected, KERNEL_TOL, kind)


@pytest.mark.parametrize("kind", ["plain", "causal", "bool", "split heads"])
def test_fused_log_sum_exp_matches_torch(rng, kind):
    """lse_out: each query's log-sum-exp of its scaled (masked) scores, natural log, as
    torch.logsumexp gives it (what the training backward's version 4 takes); -inf where a query may
    attend to no key. The output is the same bytes with or without lse_out."""
    n_queries, n_keys, dim, scale = 150, 130, 40, float(rng.uniform(0.1, 0.5))
    q, k, v = random_qkv(rng, (2, 2), n_queries, n_keys, dim)
    mask, is_causal = None, kind == "causal"
    if kind == "bool":
        mask = rng.random((2, 1, n_queries, n_keys)) < 0.5
        mask[..., 7, :] = False  # query 7 attends to no key: lse -inf
    if kind == "split heads":  # the UNet's views [B,h,N,d] of [B,N,h*d]
        q, k, v = (a.transpose(0, 2, 1, 3).copy().transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = torch.from_numpy(np.ascontiguousarray(q)) @ torch.from_numpy(np.ascontiguousarray(k)).transpose(-1, -2)
    scores = scores * scale  # [2,2,N,M]
    if is_causal:
        scores = scores.masked_fill(torch.ones(n_queries, n_keys, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~torch.from_numpy(mask), float("-inf"))
    expected = torch.logsumexp(scores, dim=-1).numpy()  # [2,2,N]
    lse = np.full((2, 2, n_queries), np.nan, np.float32)
    out = attention_fused(q, k, v, mask=mask, scale=scale, is_causal=is_causal, query_block=32, lse_out=lse)
    assert np.array_equal(out, attention_fused(q, k, v, mask=mask, scale=scale, is_causal=is_causal, query_block=32))
    seen = np.isfinite(expected)
    assert (np.isneginf(lse) == ~seen).all()
    assert_rel_close(lse[seen], expected[seen], KERNEL_TOL, f"lse {kind}")


def test_fused_gives_the_same_bytes_on_one_and_two_workers(rng, monkeypatch):
    """Blocks are cut by the query block alone, so the arithmetic of every output element is the
    same whichever worker runs it and however many there are."""
    q, k, v = random_qkv(rng, (2, 3), 200, 180, 40)
    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(block_pool, "_shared", block_pool.BlockParallelPool(workers))
        with block_pool.SingleThreadedBlas():  # one worker runs inline: BLAS on one core there too
            results.append(attention_fused(q, k, v, query_block=32))
        block_pool._shared.shutdown()
    assert all(np.array_equal(results[0], other) for other in results[1:])


def test_query_block_follows_the_number_of_keys():
    assert fused.fused_query_block(4096) == 256  # SD's 64x64 latent: 4 MiB tile
    assert fused.fused_query_block(77) == fused.MAX_QUERY_BLOCK
    assert fused.fused_query_block(fused.FUSED_MAX_KEYS) == fused.MIN_QUERY_BLOCK
    assert all(fused.fused_query_block(m) % fused.ALIGN == 0 for m in (1, 77, 1000, 4096, 10**6))


def test_paths_take_version_8_or_5_up_to_fused_max_keys(rng, monkeypatch):
    """No mask, no is_causal: version 8 (flash.py); a mask or is_causal: version 5; more keys than
    FUSED_MAX_KEYS, or a key_chunk given: version 3."""
    calls = []
    for name in ("attention_blocked", "attention_fused", "attention_flash"):
        kernel = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _kernel=kernel, _name=name, **kw:
                            calls.append(_name) or _kernel(*a, **kw))
    monkeypatch.setattr(attention, "BATCHED_MAX_SLICE_SCORES", 0)
    q, k, v = random_qkv(rng, (2,), 40, 30, 8)
    allowed = rng.random((40, 30)) < 0.7
    expected = torch_sdpa(q, k, v)
    expected_masked, expected_causal = torch_sdpa(q, k, v, allowed), torch_sdpa(q, k, v, is_causal=True)
    for path in ("full", "chunked"):
        assert_rel_close(scaled_dot_product_attention(q, k, v, path=path), expected, KERNEL_TOL, path)
        assert_rel_close(scaled_dot_product_attention(q, k, v, allowed, path=path), expected_masked, KERNEL_TOL, path)
        assert_rel_close(scaled_dot_product_attention(q, k, v, is_causal=True, path=path), expected_causal,
                         KERNEL_TOL, path)
    assert_rel_close(attention.attention_chunked(q, k, v, key_chunk=7), expected, KERNEL_TOL, "key_chunk=7")
    assert calls == ["attention_flash", "attention_fused", "attention_fused"] * 2 + ["attention_blocked"]
    calls.clear()
    monkeypatch.setattr(attention, "FUSED_MAX_KEYS", 29)  # 30 keys: more than versions 5 and 8 take
    for path in ("full", "chunked"):
        assert_rel_close(scaled_dot_product_attention(q, k, v, path=path), expected, KERNEL_TOL, path)
    assert calls == ["attention_blocked", "attention_blocked"]


@pytest.mark.parametrize("n_keys", [77, 180])
def test_fused_reads_head_views_and_writes_in_their_order(rng, n_keys):
    """The heads of transformer.split_heads are strided views [B,h,N,d] of [B,N,h*d]: version 5
    reads them in place, gives the same bytes as on contiguous copies, and returns its output in
    q's memory order, so merge_heads needs no copy."""
    from npdiff.models.transformer import merge_heads, split_heads
    heads, dim = 4, 40
    q_tokens = rng.standard_normal((2, 150, heads * dim), dtype=np.float32)  # [B,N,h*d]
    k_tokens = rng.standard_normal((2, n_keys, heads * dim), dtype=np.float32)  # [B,M,h*d]
    v_tokens = rng.standard_normal((2, n_keys, heads * dim), dtype=np.float32)
    q, k, v = (split_heads(x, heads) for x in (q_tokens, k_tokens, v_tokens))  # [B,h,*,d] views
    assert not q.flags.c_contiguous
    ours = attention_fused(q, k, v, query_block=32)  # [B,h,N,d]
    on_copies = attention_fused(*(np.ascontiguousarray(x) for x in (q, k, v)), query_block=32)
    assert np.array_equal(ours, on_copies)
    assert ours.transpose(0, 2, 1, 3).flags.c_contiguous  # token-major, as q's storage
    merged = merge_heads(ours)  # [B,N,h*d]
    assert np.shares_memory(merged, ours)
    assert_rel_close(ours, torch_sdpa(q.copy(), k.copy(), v.copy()), KERNEL_TOL, "strided heads")


def test_batched_on_head_views_copies_into_reused_buffers(rng):
    """Version 4 (small slices: CLIP, the UNet's 8x8 mid block) copies strided heads into buffers it
    reuses from call to call: results match torch and the contiguous inputs' bytes, and a later call
    leaves an earlier result alone."""
    from npdiff.models.transformer import split_heads
    heads, dim = 12, 64
    results = []
    for _ in range(2):
        q, k, v = (split_heads(rng.standard_normal((2, 77, heads * dim), dtype=np.float32), heads)
                   for _ in range(3))  # [B,h,77,d] strided views
        ours = attention.attention_batched(q, k, v, is_causal=True)
        on_copies = attention.attention_batched(*(np.ascontiguousarray(x) for x in (q, k, v)), is_causal=True)
        assert np.array_equal(ours, on_copies)
        assert_rel_close(ours, torch_sdpa(q.copy(), k.copy(), v.copy(), is_causal=True), KERNEL_TOL, "batched")
        results.append((ours, ours.copy()))
    assert np.array_equal(results[0][0], results[0][1])
