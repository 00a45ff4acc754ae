"""Backward of scaled_dot_product_attention (self, cross, causal, masks) against torch.autograd."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close
from npdiff import NpdiffError
from npdiff.kernels.attention import backward
from npdiff.kernels.attention.backward import attention_backward, attention_backward_ref


def autograd(q, k, v, grad_out, mask=None, scale=None, is_causal=False):
    tensors = [torch.from_numpy(a).requires_grad_(True) for a in (q, k, v)]
    torch_mask = None if mask is None else torch.from_numpy(mask)
    out = F.scaled_dot_product_attention(*tensors, attn_mask=torch_mask, scale=scale, is_causal=is_causal)
    out.backward(torch.from_numpy(grad_out))
    return [t.grad for t in tensors]


def random_qkv(rng, lead, n_queries, n_keys, dim, dim_v):
    q = rng.standard_normal(lead + (n_queries, dim)).astype(np.float32)
    k = rng.standard_normal(lead + (n_keys, dim)).astype(np.float32)
    v = rng.standard_normal(lead + (n_keys, dim_v)).astype(np.float32)
    grad_out = rng.standard_normal(lead + (n_queries, dim_v)).astype(np.float32)
    return q, k, v, grad_out


def check_all_versions(q, k, v, grad_out, **options):
    expected = autograd(q, k, v, grad_out, **options)
    versions = [attention_backward, attention_backward_ref, backward.attention_backward_fast]
    if options.get("mask") is None:
        versions.append(backward.attention_backward_slices)  # version 3 takes no mask
    one_key = k.shape[-2] == 1
    for version in versions:
        for ours, theirs, what in zip(version(q, k, v, grad_out, **options), expected, ("dq", "dk", "dv")):
            if one_key and what != "dv":
                # softmax over a single key is constant 1: dq and dk are zero by the maths, and torch's
                # float32 rounding leaves ~1e-6 there, so a relative error would compare two roundings;
                # held to KERNEL_TOL of the gradients' scale (dv's largest entry) instead
                scale_of_grads = float(np.abs(expected[2].numpy()).max())
                np.testing.assert_allclose(ours, theirs.numpy(), atol=KERNEL_TOL * scale_of_grads,
                                           err_msg=f"{version.__name__} {what}")
            else:
                assert_rel_close(ours, theirs, KERNEL_TOL, f"{version.__name__} {what}")


@pytest.mark.parametrize("kind", ["self", "cross", "causal"])
def test_attention_backward_matches_autograd(rng, kind):
    lead = (int(rng.integers(1, 3)), int(rng.integers(1, 4)))
    n_queries = int(rng.integers(1, 80))
    n_keys = n_queries if kind != "cross" else int(rng.integers(1, 80))
    q, k, v, grad_out = random_qkv(rng, lead, n_queries, n_keys, int(rng.integers(1, 40)), int(rng.integers(1, 40)))
    check_all_versions(q, k, v, grad_out, is_causal=kind == "causal", scale=float(rng.uniform(0.05, 0.5)))


def test_attention_backward_in_several_query_blocks(rng, monkeypatch):
    """Small blocks so that dk, dv are summed over many blocks and the causal mask is cut in pieces."""
    monkeypatch.setattr(backward, "BACKWARD_BLOCK_SCORES", 64 * 5)
    monkeypatch.setattr(backward, "SLICE_TILE_FLOATS", 64 * 3)
    q, k, v, grad_out = random_qkv(rng, (2, 3), 61, 61, 16, 8)
    check_all_versions(q, k, v, grad_out, is_causal=True)
    q, k, v, grad_out = random_qkv(rng, (1, 2), 45, 23, 8, 8)
    check_all_versions(q, k, v, grad_out)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_attention_backward_with_a_mask(rng, mask_kind):
    q, k, v, grad_out = random_qkv(rng, (2, 2), 17, 13, 8, 6)
    if mask_kind == "bool":
        mask = rng.random((2, 1, 17, 13)) > 0.3
        mask[..., 0] = True  # every query may attend to at least one key (torch's backward is NaN otherwise)
    else:
        mask = rng.standard_normal((17, 13)).astype(np.float32)
    check_all_versions(q, k, v, grad_out, mask=mask)


def test_attention_backward_on_strided_heads_and_one_slice(rng):
    """The UNet's call: q, k, v and dO as split_heads views [B,h,N,d] of [B,N,h*d]; and 2-D inputs."""
    heads, dim = 4, 8
    q, k, v, grad_out = (rng.standard_normal((2, n, heads * dim)).astype(np.float32) for n in (33, 21, 21, 33))
    views = [a.reshape(2, a.shape[1], heads, dim).transpose(0, 2, 1, 3) for a in (q, k, v, grad_out)]
    check_all_versions(*views)
    check_all_versions(*(view[1, 2] for view in views))


def test_attention_backward_refuses_a_wrong_grad_shape(rng):
    q, k, v, _ = random_qkv(rng, (1,), 4, 5, 3, 2)
    with pytest.raises(NpdiffError, match=r"grad_out must have the shape .* \[1,4,2\]"):
        attention_backward(q, k, v, np.zeros((1, 4, 3), np.float32))
