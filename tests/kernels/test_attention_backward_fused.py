"""Attention backward version 4 (backward_fused.py, and backward_stats.py given the forward's output
and its log-sum-exp, or the output alone) against torch.autograd: self, cross, causal; head sizes
40/64/80/160; N and M that are not multiples of the tiles (6 rows, 64 keys, QUERY_BLOCK); batch 1-2;
split heads."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, assert_rel_close

from npdiff import NpdiffError
from npdiff.kernels.attention import backward, backward_fused, backward_stats
from npdiff.kernels.attention.backward import attention_backward
from npdiff.kernels.attention.backward_fused import attention_backward_fused
from npdiff.kernels.attention.backward_stats import attention_backward_with_stats
from npdiff.models.transformer import merge_heads


def random_inputs(rng, lead, n_queries, n_keys, dim):
    shapes = ((n_queries, dim), (n_keys, dim), (n_keys, dim), (n_queries, dim))
    return [rng.standard_normal(lead + shape).astype(np.float32) for shape in shapes]  # q, k, v, dO


def torch_side(q, k, v, grad_out, scale, is_causal):
    """-> ([dq, dk, dv] by autograd, the forward's output, its log-sum-exp per query)."""
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*tensors, scale=scale, is_causal=is_causal)
    out.backward(torch.from_numpy(np.ascontiguousarray(grad_out)))
    scores = tensors[0].detach() @ tensors[1].detach().transpose(-1, -2) * scale  # [...,N,M]
    if is_causal:
        above = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [...,N]
    return [t.grad for t in tensors], out.detach().numpy(), lse.numpy()


def check_version_4(q, k, v, grad_out, scale, is_causal):
    expected, out, lse = torch_side(q, k, v, grad_out, scale, is_causal)
    results = {
        "v4": attention_backward_fused(q, k, v, grad_out, scale, is_causal),
        "v4 given out and lse": attention_backward_with_stats(q, k, v, grad_out, out, lse, scale, is_causal),
        "v4 given out": attention_backward_with_stats(q, k, v, grad_out, out, None, scale, is_causal),
    }
    for name, grads in results.items():
        for ours, theirs, what in zip(grads, expected, ("dq", "dk", "dv")):
            if what in ("dq", "dk") and k.shape[-2] == 1:
                # one key: P = 1, so dS, dq and dk are 0 but for rounding (dP - rowsum(dO * O) cancels),
                # on both sides: held to KERNEL_TOL of the gradients' scale (dv's largest entry)
                scale_of_grads = float(np.abs(expected[2].numpy()).max())
                np.testing.assert_allclose(ours, theirs.numpy(), atol=KERNEL_TOL * scale_of_grads,
                                           err_msg=f"{name} {what}")
                continue
            assert_rel_close(ours, theirs, KERNEL_TOL, f"{name} {what}")


@pytest.mark.parametrize("dim", [40, 64, 80, 160])
@pytest.mark.parametrize("kind", ["self", "cross", "causal"])
def test_version_4_matches_autograd(rng, kind, dim):
    lead = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    n_queries = int(rng.integers(1, 140))
    n_keys = n_queries if kind != "cross" else int(rng.integers(1, 200))
    q, k, v, grad_out = random_inputs(rng, lead, n_queries, n_keys, dim)
    check_version_4(q, k, v, grad_out, float(rng.uniform(0.5, 1.5)) / math.sqrt(dim), kind == "causal")


@pytest.mark.parametrize("kind", ["self", "cross", "causal"])
def test_version_4_in_many_blocks_and_parts(rng, monkeypatch, kind):
    """Small query blocks and key groups, and more workers than slices, so that a slice's queries (or
    key blocks) are cut into parts whose dk, dv (or dq) are summed, and the causal edge falls inside
    blocks."""
    monkeypatch.setattr(backward_fused, "QUERY_BLOCK", 12)
    monkeypatch.setattr(backward_stats, "QUERY_BLOCK", 12)
    monkeypatch.setattr(backward_stats, "KEY_GROUP", 2)
    monkeypatch.setattr(backward_fused, "worker_count", lambda: 5)
    monkeypatch.setattr(backward_stats, "worker_count", lambda: 5)
    n_queries = int(rng.integers(100, 300))
    n_keys = n_queries if kind != "cross" else int(rng.integers(65, 400))
    q, k, v, grad_out = random_inputs(rng, (1,), n_queries, n_keys, 40)
    check_version_4(q, k, v, grad_out, 1 / math.sqrt(40), kind == "causal")


def test_public_function_on_split_heads(rng, monkeypatch):
    """The UNet's call: q, k, v and dO as split_heads views [B,h,N,d] of [B,N,h*d], through the public
    function, without statistics, with out alone, and with out and lse (version 4 from V4_MIN_KEYS keys,
    lowered here so that it runs)."""
    monkeypatch.setattr(backward, "V4_MIN_KEYS", 1)
    heads, dim = 2, 40
    flat = [rng.standard_normal((2, n, heads * dim)).astype(np.float32) for n in (97, 70, 70, 97)]
    q, k, v, grad_out = [a.reshape(2, a.shape[1], heads, dim).transpose(0, 2, 1, 3) for a in flat]
    expected, out, lse = torch_side(q, k, v, grad_out, 1 / math.sqrt(dim), False)
    for options in ({}, {"out": out}, {"out": out, "lse": lse}):
        for ours, theirs, what in zip(attention_backward(q, k, v, grad_out, **options), expected, ("dq", "dk", "dv")):
            assert_rel_close(ours, theirs, KERNEL_TOL, f"{sorted(options)} {what}")
            # token-major, as the heads they are the gradients of: merge_heads copies nothing
            assert np.shares_memory(merge_heads(ours), ours), f"{sorted(options)} {what} not token-major"


def test_statistics_are_checked(rng):
    q, k, v, grad_out = random_inputs(rng, (1,), 5, 7, 8)
    out, lse = np.zeros((1, 5, 8), np.float32), np.zeros((1, 5), np.float32)
    with pytest.raises(NpdiffError, match="lse .* is used only with out"):
        attention_backward(q, k, v, grad_out, lse=lse)
    with pytest.raises(NpdiffError, match=r"lse must have one value per query \[1,5\], got \[5\]"):
        attention_backward(q, k, v, grad_out, out=out, lse=lse[0])
    with pytest.raises(NpdiffError, match=r"out must be .* \[1,5,8\], got \[1,5,7\]"):
        attention_backward(q, k, v, grad_out, out=out[..., :7], lse=lse)
