"""Run by tests/kernels/test_cache_bits.py (in a child process, or in the test process): every float32 kernel
family, forward and backward, at shapes that take its fast paths, on inputs drawn from a seed; the results
saved to an .npz.   usage: python cache_bits_child.py SEED OUT.npz
"""

import importlib
import sys

import numpy as np

from npdiff.kernels.attention import attention_chunked, scaled_dot_product_attention
from npdiff.kernels.attention.backward import attention_backward
from npdiff.kernels.attention.fused import attention_fused
from npdiff.kernels.linear_packed import linear_packed, pack_panels

# (npdiff.kernels re-exports functions named like their modules: softmax, conv2d, ...; import the modules)
FAMILIES = ("activations", "activations_backward", "conv", "conv_backward", "linear", "linear_backward", "norm",
            "norm_backward", "resample", "softmax")
kernels = {name: importlib.import_module("npdiff.kernels." + name) for name in FAMILIES}


def results_for(seed):
    rng = np.random.default_rng(seed)

    def randn(*shape, scale=1.0):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    conv, linear, norm = kernels["conv"], kernels["linear"], kernels["norm"]
    linear_backward, norm_backward = kernels["linear_backward"], kernels["norm_backward"]
    out = {}
    # 1. forward: norms, softmax, activations, linear, convs (Winograd F(4,3), F(6,3), im2col), upsample
    image, gamma, beta = randn(2, 64, 24, 24), randn(64), randn(64)
    tokens, ln_weight, ln_bias = randn(2, 77, 96), randn(96), randn(96)
    weight, bias = randn(80, 96, scale=0.1), randn(80)
    geglu_weight, geglu_bias = randn(160, 96, scale=0.1), randn(160)
    out["group_norm_silu"] = norm.group_norm(image, 32, gamma, beta, silu=True)
    out["layer_norm"] = norm.layer_norm(tokens, ln_weight, ln_bias)
    out["softmax"] = kernels["softmax"].softmax(randn(300, 77))
    out["silu"] = kernels["activations"].silu(tokens)
    out["quick_gelu"] = kernels["activations"].quick_gelu(tokens)
    out["gelu_tanh"] = kernels["activations"].gelu(tokens, approximate="tanh")
    out["linear"] = linear.linear(tokens, weight, bias)
    out["geglu"] = linear.geglu(tokens, geglu_weight, geglu_bias)
    many_tokens = randn(2, 600, 96)  # 1200 rows: geglu's blocks on the pool, the bias in the gate's pass
    out["geglu_blocks"] = linear.geglu(many_tokens, geglu_weight, geglu_bias)
    out["geglu_blocks_hidden"] = np.empty((1200, 160), np.float32)  # the tape's hidden layer, bias added
    out["geglu_blocks_kept"] = linear.geglu_fast(many_tokens, geglu_weight, geglu_bias,
                                                 hidden_out=out["geglu_blocks_hidden"])
    # CLIP's packed GEMM: full tiles finished on the registers (no activation) and through the tile buffer
    # (quick-GELU; the edge tiles of 154 rows and 160 columns)
    token_rows, packed_weight, residual = tokens.reshape(154, 96), pack_panels(geglu_weight), randn(154, 160)
    out["linear_packed"] = linear_packed(token_rows, packed_weight, 160, geglu_bias, None, residual)
    out["linear_packed_quick_gelu"] = linear_packed(token_rows, packed_weight, 160, geglu_bias, "quick_gelu", residual)
    out["conv_winograd4"] = conv.conv2d(randn(1, 32, 32, 32), randn(40, 32, 3, 3, scale=0.1), randn(40), 1, 1)
    out["conv_winograd6"] = conv.conv2d(randn(1, 128, 64, 64), randn(16, 128, 3, 3, scale=0.05), randn(16), 1, 1)
    out["conv_stride2"] = conv.conv2d(randn(1, 16, 20, 20), randn(24, 16, 3, 3), randn(24), 2, 1)
    out["upsample"] = kernels["resample"].upsample_nearest2x(randn(1, 8, 9, 9))
    # 2. attention: self, cross (77 keys), masked, causal, key chunks, with the log-sum-exp for training
    q, k, v = randn(2, 2, 300, 40), randn(2, 2, 300, 40), randn(2, 2, 300, 40)
    out["attention_self"] = scaled_dot_product_attention(q, k, v)
    out["attention_cross"] = scaled_dot_product_attention(q, randn(2, 2, 77, 40), randn(2, 2, 77, 40))
    out["attention_masked"] = scaled_dot_product_attention(q, k, v, mask=rng.random((300, 300)) > 0.3)
    out["attention_causal"] = scaled_dot_product_attention(q, k, v, is_causal=True)
    out["attention_key_chunks"] = attention_chunked(q, k, v, key_chunk=64)
    lse = np.empty((2, 2, 300), np.float32)
    out["attention_with_lse"] = attention_fused(q, k, v, lse_out=lse)
    out["attention_lse"] = lse
    # 3. backward: attention (plain and from the forward's statistics), linear, GEGLU, norms, activations, conv
    grad = randn(2, 2, 300, 40)
    grads = {"attention_backward": attention_backward(q, k, v, grad),
             "attention_backward_stats": attention_backward(q, k, v, grad, out=out["attention_with_lse"], lse=lse),
             "linear_backward": linear_backward.linear_backward(tokens, weight, randn(2, 77, 80)),
             "geglu_backward": linear_backward.geglu_backward(tokens, geglu_weight, geglu_bias, randn(2, 77, 80)),
             "group_norm_backward": norm_backward.group_norm_backward(image, 32, gamma, beta, randn(2, 64, 24, 24),
                                                                       silu=True),
             "layer_norm_backward": norm_backward.layer_norm_backward(tokens, ln_weight, ln_bias, randn(2, 77, 96)),
             "conv_backward": kernels["conv_backward"].conv2d_backward(
                 randn(1, 32, 32, 32), randn(24, 32, 3, 3, scale=0.1), randn(1, 24, 32, 32), 1, 1)}
    for name, parts in grads.items():
        for i, part in enumerate(parts):
            if part is not None:
                out[f"{name}_{i}"] = part
    out["gelu_backward"] = kernels["activations_backward"].gelu_backward(tokens, randn(2, 77, 96))
    out["silu_backward"] = kernels["activations_backward"].silu_backward(tokens, randn(2, 77, 96))
    return out


if __name__ == "__main__":
    np.savez(sys.argv[2], **results_for(int(sys.argv[1])))
