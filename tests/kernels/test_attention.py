"""softmax and scaled_dot_product_attention (full and chunked paths) against torch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close
from npdiff import NpdiffError
from npdiff.kernels import (attention, attention_batched, attention_blocked, attention_chunked, attention_chunked_ref,
                            attention_full, attention_ref, scaled_dot_product_attention, softmax)
from npdiff.kernels.attention import attention_fused
from npdiff.kernels.softmax import softmax_ref

PATHS = ["full", "chunked"]


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [-1, 0, 1, -2])
def test_softmax_matches_torch(rng, axis):
    shape = tuple(int(s) for s in rng.integers(1, 30, size=3))
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 30)).astype(np.float32)
    expected = torch.softmax(torch.from_numpy(x), dim=axis)
    assert_rel_close(softmax(x, axis), expected, KERNEL_TOL, "softmax")
    assert_rel_close(softmax_ref(x, axis), expected, KERNEL_TOL, "softmax_ref")


@pytest.mark.parametrize("width", [77, 300])
def test_softmax_narrow_and_wide_rows(rng, width):
    # Both ways of taking the row max (a Numba loop below WIDE_ROW, NumPy's reduction above), with
    # some -inf entries.
    x = (rng.standard_normal((int(rng.integers(1, 200)), width)) * 5).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = -np.inf
    x[:, 0] = 0.0
    expected = torch.softmax(torch.from_numpy(x), dim=-1)
    assert_rel_close(softmax(x), expected, KERNEL_TOL, "softmax")


def test_softmax_masked_rows(rng):
    # -inf entries give exactly 0; a row with one finite entry gives 1 there; an all -inf row is
    # NaN in torch, and in ours.
    x = rng.standard_normal((6, 11), dtype=np.float32)
    x[0, rng.choice(11, 5, replace=False)] = -np.inf
    x[1, :] = -np.inf
    x[1, 4] = 0.3
    x[2] = np.triu(np.full((11, 11), -np.inf, np.float32), 1)[5]  # a causal row
    x[3, :] = -np.inf
    expected = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
    for ours in (softmax(x), softmax_ref(x)):
        assert np.array_equal(np.isnan(ours), np.isnan(expected))
        assert np.isnan(ours[3]).all() and not np.isnan(ours[:3]).any()
        assert (ours[0][x[0] == -np.inf] == 0).all() and ours[1, 4] == 1.0
        finite_rows = [0, 1, 2, 4, 5]
        assert_rel_close(ours[finite_rows], expected[finite_rows], KERNEL_TOL)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def random_qkv(rng, lead, n_queries, n_keys, dim, value_dim=None):
    q = rng.standard_normal((*lead, n_queries, dim), dtype=np.float32)
    k = rng.standard_normal((*lead, n_keys, dim), dtype=np.float32)
    v = rng.standard_normal((*lead, n_keys, value_dim or dim), dtype=np.float32)
    return q, k, v


def torch_sdpa(q, k, v, mask=None, scale=None, is_causal=False):
    mask_t = None if mask is None else torch.from_numpy(mask)
    return F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                          attn_mask=mask_t, is_causal=is_causal, scale=scale)


def check_every_path(q, k, v, expected, **kwargs):
    """Every attention version against torch, and the chunked ones against attention_ref, with
    chunk and block sizes that divide neither N nor M."""
    for path in PATHS:
        ours = scaled_dot_product_attention(q, k, v, path=path, **kwargs)
        assert_rel_close(ours, expected, KERNEL_TOL, f"attention path={path}")
    reference = attention_ref(q, k, v, **kwargs)
    assert_rel_close(reference, expected, KERNEL_TOL, "attention_ref")
    assert_rel_close(attention_batched(q, k, v, **kwargs), expected, KERNEL_TOL, "attention_batched")
    chunked_ref = attention_chunked_ref(q, k, v, key_chunk=7, **kwargs)
    assert_rel_close(chunked_ref, expected, KERNEL_TOL, "attention_chunked_ref key_chunk=7")
    scale = kwargs.pop("scale", None) or 1 / math.sqrt(q.shape[-1])
    blocked = attention_blocked(q, k, v, scale=scale, key_chunk=7, query_block=5, **kwargs)
    assert_rel_close(blocked, expected, KERNEL_TOL, "attention_blocked key_chunk=7 query_block=5")
    assert_rel_close(blocked, reference, KERNEL_TOL, "attention_blocked vs attention_ref")
    for query_block in (None, 5):
        fused = attention_fused(q, k, v, scale=scale, query_block=query_block, **kwargs)
        assert_rel_close(fused, expected, KERNEL_TOL, f"attention_fused query_block={query_block}")


@pytest.mark.parametrize("lead", [(), (3,), (2, 4)])
def test_attention_matches_torch(rng, lead):
    n_queries, n_keys = int(rng.integers(1, 70)), int(rng.integers(1, 90))
    dim, value_dim = int(rng.integers(1, 48)), int(rng.integers(1, 48))
    q, k, v = random_qkv(rng, lead, n_queries, n_keys, dim, value_dim)
    scale = None if rng.random() < 0.5 else float(rng.uniform(0.05, 1.0))
    check_every_path(q, k, v, torch_sdpa(q, k, v, scale=scale), scale=scale)


def test_attention_chunked_across_several_default_chunks(rng):
    # N, M not multiples of the default chunk and block sizes, more than one of each: as SD's
    # self-attention [2,8,4096,40], smaller.
    n_keys = attention.KEY_CHUNK * 2 + int(rng.integers(1, attention.KEY_CHUNK))
    n_queries = attention.QUERY_BLOCK + int(rng.integers(1, attention.QUERY_BLOCK))
    q, k, v = random_qkv(rng, (2, 2), n_queries, n_keys, 40)
    expected = torch_sdpa(q, k, v)
    assert_rel_close(attention_chunked(q, k, v), expected, KERNEL_TOL, "attention_chunked")
    assert_rel_close(attention_chunked_ref(q, k, v), expected, KERNEL_TOL, "attention_chunked_ref")


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_with_mask(rng, kind):
    q, k, v = random_qkv(rng, (2, 3), int(rng.integers(2, 40)), int(rng.integers(2, 50)), 16)
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    allowed = rng.random((2, 1, n_queries, n_keys)) < 0.6  # broadcast over heads
    allowed[..., 0] = True  # every query sees at least one key here
    if kind == "bool":
        mask = allowed
    else:
        mask = np.where(allowed, rng.standard_normal(allowed.shape), -np.inf).astype(np.float32)
    check_every_path(q, k, v, torch_sdpa(q, k, v, mask), mask=mask)


@pytest.mark.parametrize("n_queries,n_keys", [(13, 13), (9, 20), (20, 9)])
def test_attention_causal(rng, n_queries, n_keys):
    q, k, v = random_qkv(rng, (2, 2), n_queries, n_keys, 8)
    check_every_path(q, k, v, torch_sdpa(q, k, v, is_causal=True), is_causal=True)
    # causal together with a mask: torch 2.13 applies both
    mask = rng.random((n_queries, n_keys)) < 0.7
    mask[:, 0] = True
    check_every_path(q, k, v, torch_sdpa(q, k, v, mask, is_causal=True), mask=mask, is_causal=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_fully_masked_rows_give_zero_like_torch(rng, kind):
    q, k, v = random_qkv(rng, (2,), 10, 23, 8)
    allowed = rng.random((10, 23)) < 0.5
    allowed[:, 1] = True
    allowed[3] = False  # query 3 may attend to nothing
    mask = allowed if kind == "bool" else np.where(allowed, 0.0, -np.inf).astype(np.float32)
    expected = torch_sdpa(q, k, v, mask)
    assert (expected.numpy()[:, 3] == 0).all()
    for path in PATHS:
        ours = scaled_dot_product_attention(q, k, v, mask=mask, path=path)
        assert not np.isnan(ours).any() and (ours[:, 3] == 0).all()
        assert_rel_close(ours, expected, KERNEL_TOL, f"attention path={path}")
    for ours in (attention_ref(q, k, v, mask=mask), attention_batched(q, k, v, mask=mask),
                 attention_chunked_ref(q, k, v, mask=mask, key_chunk=5),
                 attention_blocked(q, k, v, mask=mask, scale=1 / math.sqrt(8), key_chunk=5, query_block=3),
                 attention_fused(q, k, v, mask=mask, query_block=3)):
        assert not np.isnan(ours).any() and (ours[:, 3] == 0).all()
        assert_rel_close(ours, expected, KERNEL_TOL)


@pytest.mark.parametrize("n_queries,n_keys", [(0, 5), (5, 0), (0, 0)])
@pytest.mark.parametrize("masked,causal", [(False, False), (True, False), (False, True)])
def test_attention_without_queries_or_keys_is_zeros_like_torch(rng, n_queries, n_keys, masked, causal):
    q, k, v = random_qkv(rng, (2, 3), n_queries, n_keys, 8)
    mask = np.ones((n_queries, n_keys), bool) if masked else None
    expected = F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                              attn_mask=None if mask is None else torch.from_numpy(mask),
                                              is_causal=causal).numpy()
    for path in ["auto"] + PATHS:
        ours = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=causal, path=path)
        assert ours.shape == expected.shape == (2, 3, n_queries, 8) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(attention_ref(q, k, v, mask=mask, is_causal=causal), expected)


@pytest.mark.parametrize("slice_scores", ["small", "large"])
def test_attention_full_batches_small_slices_and_spreads_large_ones(rng, monkeypatch, slice_scores):
    """attention_full's two ways: small slices all at once (attention_batched), large ones in query
    blocks (attention_fused); the threshold is moved so that both run on small random inputs."""
    q, k, v = random_qkv(rng, (2, 3), int(rng.integers(2, 40)), int(rng.integers(2, 50)), 16)
    calls = []
    monkeypatch.setattr(attention, "BATCHED_MAX_SLICE_SCORES", 10**9 if slice_scores == "small" else 0)
    for name in ("attention_batched", "attention_blocked", "attention_fused"):
        kernel = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _kernel=kernel, _name=name, **kw:
                            calls.append(_name) or _kernel(*a, **kw))
    allowed = rng.random((2, 1, q.shape[-2], k.shape[-2])) < 0.6
    allowed[..., 0, :] = False  # query 0 may attend to no key: 0 out, as torch
    is_causal = bool(rng.random() < 0.5)
    ours = attention_full(q, k, v, mask=allowed, is_causal=is_causal)
    assert calls == ["attention_batched" if slice_scores == "small" else "attention_fused"]
    assert not np.isnan(ours).any() and (ours[..., 0, :] == 0).all()
    assert_rel_close(ours, torch_sdpa(q, k, v, allowed, is_causal=is_causal), KERNEL_TOL, slice_scores)

    q, k, v = random_qkv(rng, (2,), 30, 40, 8)
    calls = []
    monkeypatch.setattr(attention, "attention_chunked", lambda *a, **kw: calls.append("chunked"))
    monkeypatch.setattr(attention, "attention_full", lambda *a, **kw: calls.append("full"))
    monkeypatch.setattr(attention, "MEMORY_EFFICIENT_MIN_SCORES", 2 * 30 * 40)
    scaled_dot_product_attention(q, k, v)
    monkeypatch.setattr(attention, "MEMORY_EFFICIENT_MIN_SCORES", 2 * 30 * 40 - 1)
    scaled_dot_product_attention(q, k, v)
    assert calls == ["full", "chunked"]


def test_attention_default_scale_is_inverse_sqrt_dim(rng):
    q, k, v = random_qkv(rng, (), 5, 6, 9)
    assert_rel_close(scaled_dot_product_attention(q, k, v), attention_full(q, k, v, scale=1 / math.sqrt(9)))


def test_attention_rejects_bad_input(rng):
    q, k, v = random_qkv(rng, (2, 3), 5, 7, 8)
    with pytest.raises(NpdiffError,
                       match=r"scaled_dot_product_attention: k must have shape \[2,3,M,8\].*got \[2,3,7,6\]"):
        scaled_dot_product_attention(q, k[..., :6], v)
    with pytest.raises(NpdiffError,
                       match=r"scaled_dot_product_attention: v must have shape \[2,3,7,dv\].*got \[2,3,6,8\]"):
        scaled_dot_product_attention(q, k, v[..., :6, :])
    with pytest.raises(NpdiffError, match=r"scaled_dot_product_attention: q must be float32, got float64"):
        scaled_dot_product_attention(q.astype(np.float64), k, v)
    with pytest.raises(NpdiffError, match=r"mask must broadcast to \[..., N, M\] = \[2,3,5,7\], got \[5,6\]"):
        scaled_dot_product_attention(q, k, v, mask=np.ones((5, 6), bool))
    with pytest.raises(NpdiffError, match=r"mask must be bool .* or float32, got int64"):
        scaled_dot_product_attention(q, k, v, mask=np.ones((5, 7), np.int64))
    with pytest.raises(NpdiffError, match=r"path must be one of"):
        scaled_dot_product_attention(q, k, v, path="flash")
    with pytest.raises(NpdiffError, match=r"softmax: axis must be in \[-2, 2\)"):
        softmax(q[0, 0], axis=2)
