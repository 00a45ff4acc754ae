"""Attention version 6 (bf16 on AMX tiles, npdiff/kernels/attention/amx.py) against torch doing the same
rounding, and which models take it.

The reference (torch, float32 arithmetic): q, k, v rounded to bf16; s = q k^T * scale (+ mask);
p = exp(s - row max); out = (bf16(p) @ v) / sum(p). What torch's CPU attention computes for bf16 inputs.

Why not one plain 1e-5 bound: p is rounded to bf16 on both sides, but each side computes its own exp
(npdiff a 2^x polynomial on log2-unit scores, torch its exp), which agree to ~1e-6 relative. A p within
that of a bf16 rounding tie may round up on one side and down on the other: one bf16 step (2^-8..2^-7
relative) in that probability, the same thing that separates two bf16 GEMMs whose float32 inputs differ
in the last bits. So each output element may differ by 1e-5 of the output plus, for each probability of
its row within TIE_WINDOW of a tie, that probability's bf16 step times |v| / row sum (flip_allowance).
Measured: 0.1-1 % of probabilities lie in the window; outputs with no such probability in their row
agree within 1e-5 like any kernel.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, rel_err

from npdiff.kernels import attention, block_pool
from npdiff.kernels.amx_intrinsics import amx_usable
from npdiff.kernels.bf16_rounding import rounded_to_bf16
from npdiff.kernels.attention import (
    attention_amx,
    attention_bf16_ref,
    attention_fused,
    scaled_dot_product_attention,
    scaled_dot_product_attention_bf16,
)

needs_amx = pytest.mark.skipif(not amx_usable(), reason="AMX-BF16 tiles only exist on AMX CPUs whose OS grants them")
TIE_WINDOW = 1e-5  # relative distance of a probability to a bf16 rounding tie within which it may round either way


@pytest.fixture
def amx_on(monkeypatch):
    monkeypatch.delenv("NPDIFF_NO_AMX", raising=False)
    monkeypatch.delenv("NPDIFF_NO_BF16", raising=False)


def bf16(t):
    return t.bfloat16().float()


def torch_bf16_attention(q, k, v, mask=None, is_causal=False):
    """-> (out, p, row_sum, v rounded) as torch computes the bf16 recipe (float32 arithmetic)."""
    q, k, v = (bf16(torch.from_numpy(np.ascontiguousarray(a))) for a in (q, k, v))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # [...,N,M]
    if mask is not None:
        mask = torch.from_numpy(np.array(mask))  # a writable copy of a broadcast view
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), -torch.inf)
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(row_max == -torch.inf, 0.0, row_max)
    p = torch.exp(scores - row_max)  # [...,N,M]
    row_sum = p.sum(-1, keepdim=True)  # [...,N,1]
    out = (bf16(p) @ v) / torch.where(row_sum == 0, 1.0, row_sum)  # [...,N,dv]
    return out.numpy(), p.numpy(), row_sum.numpy(), v.numpy()


def flip_allowance(p, row_sum, v):
    """[...,N,dv]: for each output element, the sum over its row's probabilities within TIE_WINDOW of a
    bf16 rounding tie of (that probability's bf16 step) * |v| / row sum."""
    bits = p.view(np.uint32)
    below = (bits & np.uint32(0xFFFF0000)).view(np.float32)  # p truncated to bf16
    step = ((bits & np.uint32(0x7F800000)).view(np.float32) * np.float32(2.0 ** -7))  # one bf16 step at p
    near_tie = np.abs(p - (below + step / 2)) < TIE_WINDOW * p
    return np.matmul(np.where(near_tie, step, 0), np.abs(v)) / np.where(row_sum == 0, 1, row_sum), near_tie.mean()


def assert_matches_torch_bf16(ours, q, k, v, mask=None, is_causal=False, what=""):
    expected, p, row_sum, v_rounded = torch_bf16_attention(q, k, v, mask, is_causal)
    allowance, tie_fraction = flip_allowance(p, row_sum, v_rounded)
    excess = np.abs(ours - expected) - allowance  # what the rounding flips cannot explain
    worst = float(excess.max()) / float(np.abs(expected).max())
    assert np.isfinite(ours).all() and worst <= KERNEL_TOL, f"{what}: error beyond the flips {worst:.2e}"
    assert tie_fraction < 0.02, f"{what}: {tie_fraction:.1%} of probabilities near a tie: the window is too wide"
    clean_rows = (allowance == 0).all(axis=-1)  # [...,N]: rows with no probability near a tie
    if clean_rows.any():
        assert rel_err(ours[clean_rows], expected[clean_rows]) <= KERNEL_TOL, what
    return rel_err(ours, expected)


def heads_view(rng, batch, heads, tokens, dim, spread=1.0):
    """[B,h,N,d] as transformer.split_heads makes it: a strided view of [B,N,h*d]."""
    x = rng.standard_normal((batch, tokens, heads * dim), dtype=np.float32) * np.float32(spread)
    return x.reshape(batch, tokens, heads, dim).transpose(0, 2, 1, 3)


# SD 1.5 / 2.x / SDXL head sizes, self- and cross-attention (77 text tokens), odd counts, many keys, the VAE
SHAPES = [(256, 256, 40), (300, 77, 40), (130, 129, 64), (129, 130, 80), (200, 77, 160), (64, 4100, 40),
          (100, 1000, 64), (70, 90, 512)]  # the last: the VAE's single head (d = channels)


@needs_amx
@pytest.mark.parametrize("n_queries,n_keys,dim", SHAPES)
def test_amx_attention_matches_torch_bf16(rng, amx_on, n_queries, n_keys, dim):
    q = heads_view(rng, 2, 2, n_queries, dim, spread=rng.uniform(1, 3))  # sharper rows than unit scores
    k = heads_view(rng, 2, 2, n_keys, dim)
    v = heads_view(rng, 2, 2, n_keys, dim)
    for query_block in (None, 32, 96):
        ours = attention_amx(q, k, v, query_block=query_block)
        assert ours.shape == (2, 2, n_queries, dim)
        assert_matches_torch_bf16(ours, q, k, v, what=f"{n_queries}x{n_keys} d={dim} block={query_block}")
    # the public entry takes it; the NumPy reference is the same recipe
    assert np.array_equal(scaled_dot_product_attention_bf16(q, k, v), attention_amx(q, k, v))
    assert_matches_torch_bf16(attention_bf16_ref(q, k, v), q, k, v, what="attention_bf16_ref")
    # and it is bf16: against float32 attention the error is bf16's, not float32's
    error = rel_err(attention_amx(q, k, v), F.scaled_dot_product_attention(
        *(torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v))))
    assert 1e-4 < error < 3e-2


def test_the_check_tells_rounded_probabilities_from_unrounded_ones(rng):
    """The flip allowance is no blanket: float32 attention on the same rounded q, k, v (probabilities not
    rounded) is 50-80x past the bound at every shape measured."""
    q, k, v = (heads_view(rng, 2, 2, 128, 40, spread=2.0) for _ in range(3))
    unrounded = attention_fused(*(rounded_to_bf16(np.ascontiguousarray(a)) for a in (q, k, v)))
    with pytest.raises(AssertionError, match="error beyond the flips"):
        assert_matches_torch_bf16(unrounded, q, k, v)


@needs_amx
@pytest.mark.parametrize("kind", ["bool", "float", "causal", "causal+bool"])
def test_amx_attention_masks(rng, amx_on, kind):
    q, k, v = (rng.standard_normal((2, 2, 150, 40), dtype=np.float32) for _ in range(3))
    mask = None
    if kind != "causal":
        allowed = rng.random((2, 1, 150, 150)) < 0.5  # broadcast over heads
        allowed[..., 7, :] = False  # query 7 may attend to no key: 0, as torch
        mask = allowed if "bool" in kind else np.where(allowed, rng.standard_normal(allowed.shape) * 3,
                                                       -np.inf).astype(np.float32)
    is_causal = kind.startswith("causal")
    for query_block in (None, 32):
        ours = attention_amx(q, k, v, mask=mask, is_causal=is_causal, query_block=query_block)
        if mask is not None:
            assert (ours[..., 7, :] == 0).all()
        assert_matches_torch_bf16(ours, q, k, v, np.broadcast_to(mask, (2, 2, 150, 150)) if mask is not None
                                  else None, is_causal, what=f"{kind} block={query_block}")


@needs_amx
def test_amx_attention_gives_the_same_bytes_on_one_two_and_three_workers(rng, amx_on, monkeypatch):
    q, k, v = (heads_view(rng, 2, 3, 200, 40) for _ in range(3))
    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(block_pool, "_shared", block_pool.BlockParallelPool(workers))
        results.append(attention_amx(q, k, v, query_block=64))
        block_pool._shared.shutdown()
    assert all(np.array_equal(results[0], other) for other in results[1:])


@pytest.mark.parametrize("switch", ["NPDIFF_NO_AMX", "NPDIFF_NO_BF16"])
def test_without_amx_bf16_attention_is_the_float32_one(rng, monkeypatch, switch):
    """Where AMX cannot run (or is switched off), a bf16 model's attention is float32 attention, bit for bit."""
    monkeypatch.setenv(switch, "1")
    q, k, v = (rng.standard_normal((2, 2, 70, 40), dtype=np.float32) for _ in range(3))
    assert np.array_equal(scaled_dot_product_attention_bf16(q, k, v, is_causal=True),
                          scaled_dot_product_attention(q, k, v, is_causal=True))


def test_bf16_attention_checks_its_inputs_like_the_float32_one(rng):
    q = rng.standard_normal((1, 2, 8, 40), dtype=np.float32)
    with pytest.raises(ValueError, match="k must have shape"):
        scaled_dot_product_attention_bf16(q, q[..., :39], q)
    with pytest.raises(ValueError, match="mask must broadcast"):
        scaled_dot_product_attention_bf16(q, q, q, mask=np.ones((3, 8), bool))


def test_no_query_or_no_key_gives_zeros_as_torch():
    no_queries = np.zeros((1, 2, 0, 40), np.float32)
    assert attention.ATTENTION_BF16.pick(no_queries) is attention_bf16_ref  # empty: dispatch's rule
    assert scaled_dot_product_attention_bf16(no_queries, no_queries, no_queries).shape == (1, 2, 0, 40)
    q, no_keys = np.ones((1, 2, 3, 40), np.float32), np.zeros((1, 2, 0, 40), np.float32)
    expected = F.scaled_dot_product_attention(torch.from_numpy(q), torch.from_numpy(no_keys), torch.from_numpy(no_keys))
    np.testing.assert_array_equal(scaled_dot_product_attention_bf16(q, no_keys, no_keys), expected.numpy())


# ---------------------------------------------------------------------------------------------
# Which models take it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_amx)])
def test_unet_and_vae_attention_is_bf16_only_at_bf16(rng, monkeypatch, amx_on, precision):
    """A bf16 UNet's and VAE's every attention runs version 6; a float32 model's never does."""
    from tiny_models import tiny_unet, tiny_vae

    from npdiff import kernels
    from npdiff.models import AutoencoderKL, UNet2DConditionModel

    calls = {"bf16": [], "fp32": []}

    def spy(kind, function):
        def call(q, k, v, *args, **kwargs):
            calls[kind].append(q.shape)
            return function(q, k, v, *args, **kwargs)
        return call

    monkeypatch.setattr(attention, "attention_amx", spy("bf16", attention_amx))
    monkeypatch.setattr(kernels, "scaled_dot_product_attention", spy("fp32", scaled_dot_product_attention))
    _, unet_folder = tiny_unet("sd1", seed=0)
    unet = UNet2DConditionModel.from_pretrained(unet_folder, precision=precision)
    sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    context = rng.standard_normal((2, 7, unet.config["cross_attention_dim"]), dtype=np.float32)
    unet(sample, 10, context)
    _, vae_folder = tiny_vae("sd", seed=0)
    AutoencoderKL.from_pretrained(vae_folder, precision=precision).decode(
        rng.standard_normal((1, 4, 4, 4), dtype=np.float32))
    # the tiny sd1 UNet: 2 x 2 down-block + 1 mid + 2 x 3 up-block transformers, each with self- and
    # cross-attention (22); the VAE's mid block: one single-head attention
    other = "fp32" if precision == "bf16" else "bf16"
    assert len(calls[precision]) == 23 and calls[other] == []
    assert calls[precision][-1][1] == 1
