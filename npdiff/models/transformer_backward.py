"""Backward of transformer.py's UNet pieces: Attention, FeedForward (GEGLU), BasicTransformerBlock,
Transformer2DModel. Gradients flow to the block's input and to the context (the text embeddings
of cross-attention: what textual inversion trains through).

What the backward needs of a block: its input, its three residual-stream states, its
attentions' q, k, v and its GEGLU's hidden layer [B,N,8D] (else recomputed: one GEMM). Kept by the forward (transformer_2d_forward_saved: the UNet tape's default),
or recomputed from the Transformer2DModel's input (saved=None): its backward reruns the forward
once, keeping each BasicTransformerBlock's input [B,N,D], and each block's backward reruns that
block (basic_block_states) before walking back. Attention probabilities [B,h,N,M] are never kept: attention_backward recomputes them per query
block. Where the backward's version 4 takes them (backward.V4_MIN_KEYS keys or more: the 64x64
self-attentions of SD 1.5), the attention's output [B,h,N,d] and log-sum-exp [B,h,N] are kept too
(attention_forward_saved); the output is to_out's input anyway, so only lse is extra (128 KiB). Weight gradients only for the attention projections (to_q, to_k, to_v, to_out.0 of attn1
and attn2: what LoRA trains), and only when the caller passes a `weight_grads` dict.
"""

import numpy as np

from npdiff.kernels.attention import (
    FUSED_MAX_KEYS,
    attention_fused,
    scaled_dot_product_attention,
)
from npdiff.kernels.attention import backward as attention_backward_versions
from npdiff.kernels.attention.backward import attention_backward
from npdiff.kernels.block_pool import matmul
from npdiff.kernels.linear_backward import (
    geglu_backward,
    geglu_forward_saved,
    geglu_input_grad,
    linear_input_grad,
    linear_input_grads_summed,
)
from npdiff.kernels.norm_backward import layer_norm_backward
from npdiff.models.blocks_backward import (
    group_norm_layer_backward,
    linear_layer_backward,
)
from npdiff.models.transformer import merge_heads, split_heads


# ---------------------------------------------------------------------------------------------
# Attention and feed-forward
# ---------------------------------------------------------------------------------------------
def attention_forward_saved(q, k, v, scale):
    """softmax(q k^T * scale) v -> (out [B,h,N,d], lse [B,h,N] or None): the forward's log-sum-exp
    (fused.py's lse_out) where the backward takes version 4 with it (from V4_MIN_KEYS keys, up to
    version 5's FUSED_MAX_KEYS: the same kernel the default path runs there), else the default path."""
    n_keys = k.shape[-2]
    if isinstance(q, np.ndarray) and q.size and attention_backward_versions.V4_MIN_KEYS <= n_keys <= FUSED_MAX_KEYS:
        lse = np.empty(q.shape[:-1], np.float32)                        # [B,h,N]
        return attention_fused(q, k, v, scale=scale, lse_out=lse), lse  # [B,h,N,d], [B,h,N]
    return scaled_dot_product_attention(q, k, v, scale=scale), None     # [B,h,N,d]


def linear_plus_residual(layer, x, residual):
    """layer(x) + residual [..., out] (a Linear layer): for a float32 NumPy weight one block_pool.matmul
    whose blocks add the bias and the residual while their rows are in cache (the same sums as
    `residual + layer(x)`, without a one-thread pass over the whole output); else the layer, then the add."""
    if not (isinstance(layer.weight, np.ndarray) and isinstance(x, np.ndarray) and x.flags.c_contiguous
            and residual.flags.c_contiguous and residual.dtype == np.float32):
        return residual + layer(x)                                      # [..., out]
    rows = x.reshape(-1, x.shape[-1])                                   # [..., in] -> [R, in]
    out = matmul(rows, layer.weight.T, bias=layer.bias, residual=residual.reshape(rows.shape[0], -1))  # [R, out]
    return out.reshape(residual.shape)                                  # [R, out] -> [..., out]


def attention_with_qkv(attn, x, context, residual=None):
    """Attention's forward that also returns what the backward needs: (q, k, v [B,h,N|M,d], out
    [B,h,N,d], lse [B,h,N] or None). residual [B,N,D]: returned added to the attention's output
    (in to_out's blocks)."""
    q = split_heads(attn.to_q(x), attn.heads)                           # [B,N,D] -> [B,h,N,d]
    k = split_heads(attn.to_k(context), attn.heads)                     # [B,M,Dc] -> [B,h,M,d]
    v = split_heads(attn.to_v(context), attn.heads)                     # [B,M,Dc] -> [B,h,M,d]
    out, lse = attention_forward_saved(q, k, v, attn.scale)             # [B,h,N,d], [B,h,N]
    if residual is None:
        return attn.to_out(merge_heads(out)), (q, k, v, out, lse)       # [B,N,D]
    return linear_plus_residual(attn.to_out, merge_heads(out), residual), (q, k, v, out, lse)  # [B,N,D]


def attention_backward_pass(attn, x, context, saved, grad_out, weight_grads=None, need_x_grad=True):
    """Attention: grad_out [B,N,D] -> (dx [B,N,D], dcontext [B,M,Dc]); for self-attention (context
    is x) the caller adds the two, unless dcontext is None: with frozen weights (weight_grads None) a
    self-attention's dx is the whole sum. saved: attention_with_qkv's (q, k, v, out, lse).
    need_x_grad=False (a cross-attention, weights frozen): dx is None, to_q's input gradient not made."""
    q, k, v, out, lse = saved
    # 3. to_out (its input is the merged heads of the kept output)
    if weight_grads is not None:
        grad_merged = linear_layer_backward(attn.to_out, merge_heads(out), grad_out, weight_grads)  # [B,N,h*d]
    else:
        grad_merged = linear_input_grad(attn.to_out.weight, grad_out)   # [B,N,D] @ [D,h*d] -> [B,N,h*d]
    # 2. softmax(q k^T * scale) v (version 4 given out and lse, when lse was kept)
    grad_heads = split_heads(grad_merged, attn.heads)                   # [B,N,h*d] -> [B,h,N,d]
    stats = {"out": out, "lse": lse} if lse is not None else {}
    grad_q, grad_k, grad_v = attention_backward(q, k, v, grad_heads, scale=attn.scale, **stats)  # [B,h,N|M,d]
    # 1. the projections (frozen: their input gradients summed per block of rows, in cache)
    if weight_grads is None:
        projections = (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)
        heads = (merge_heads(grad_q), merge_heads(grad_k), merge_heads(grad_v))  # [B,N|M,h*d] (no copies)
        if context is x:  # self-attention: dq Wq + dk Wk + dv Wv
            return linear_input_grads_summed(projections, heads), None  # [B,N,D]
        grad_context = linear_input_grads_summed(projections[1:], heads[1:])  # [B,M,Dc]
        if not need_x_grad:
            return None, grad_context                                   # [B,M,Dc]
        return linear_input_grad(projections[0], heads[0]), grad_context  # [B,N,D], [B,M,Dc]
    grad_x = linear_layer_backward(attn.to_q, x, merge_heads(grad_q), weight_grads)     # [B,N,D]
    grad_context = linear_layer_backward(attn.to_k, context, merge_heads(grad_k), weight_grads)  # [B,M,Dc]
    grad_context += linear_layer_backward(attn.to_v, context, merge_heads(grad_v), weight_grads)
    return grad_x, grad_context


def feed_forward_saved(ff, x, residual):
    """FeedForward's forward plus residual -> (out [B,N,D], its GEGLU's hidden layer [B,N,2*4D] for the
    backward); (out, None) when the projection's weight is not a float32 NumPy array (a packed bf16 one)."""
    if not isinstance(ff.proj.weight, np.ndarray):
        return residual + ff(x), None
    gated, hidden = geglu_forward_saved(x, ff.proj.weight, ff.proj.bias)  # [B,N,D] -> [B,N,4D], [B,N,8D]
    return linear_plus_residual(ff.out, gated, residual), hidden        # [B,N,4D] -> [B,N,D]


def feed_forward_backward(ff, x, grad_out, hidden=None):
    """FeedForward (GEGLU, then ff.net.2; weights frozen): x [B,N,D] its input -> dx [B,N,D].
    hidden: feed_forward_saved's (then x is not read), else GEGLU's hidden layer is recomputed from x."""
    grad_gated = linear_input_grad(ff.out.weight, grad_out)             # [B,N,D] @ [D,4D] -> [B,N,4D]
    if hidden is not None:
        return geglu_input_grad(hidden, ff.proj.weight, grad_gated)     # [B,N,4D] -> [B,N,D]
    grad_x, _, _ = geglu_backward(x, ff.proj.weight, ff.proj.bias, grad_gated, need_weight_grad=False)
    return grad_x                                                       # [B,N,D]


def layer_norm_layer_backward(layer, x, grad_out, residual):
    """LayerNorm (frozen) inside a residual branch: -> its dx [B,N,D] plus residual (the gradient that
    goes around it), summed in the kernel's parallel pass."""
    grad_x, _, _ = layer_norm_backward(x, layer.weight, layer.bias, grad_out, layer.eps, need_weight_grad=False,
                                       residual=residual)
    return grad_x


# ---------------------------------------------------------------------------------------------
# BasicTransformerBlock and Transformer2DModel
# ---------------------------------------------------------------------------------------------
def basic_block_states(block, x, context):
    """BasicTransformerBlock's steps 1-2, keeping what the backward needs: -> (normed1, qkv1, x1,
    normed2, qkv2, x2), the residual stream [B,N,D] and the attentions' saved tensors (q, k, v
    [B,h,N|M,d], out, lse: attention_with_qkv)."""
    normed1 = block.norm1(x)                                            # [B,N,D]
    x1, qkv1 = attention_with_qkv(block.attn1, normed1, normed1, residual=x)  # x + attn1 [B,N,D]
    normed2 = block.norm2(x1)                                           # [B,N,D]
    x2, qkv2 = attention_with_qkv(block.attn2, normed2, context, residual=x1)  # x1 + attn2 [B,N,D]
    return normed1, qkv1, x1, normed2, qkv2, x2


def basic_block_forward_saved(block, x, context):
    """BasicTransformerBlock's forward -> (out [B,N,D], states): basic_block_states, then step 3,
    whose GEGLU hidden layer [B,N,8D] is kept too (the last of the states)."""
    states = basic_block_states(block, x, context)
    x2 = states[-1]                                                     # [B,N,D]
    out, ff_hidden = feed_forward_saved(block.ff, block.norm3(x2), x2)  # 3. x2 + ff [B,N,D], [B,N,8D]
    return out, states + (ff_hidden,)


def basic_block_backward(block, x, context, grad_out, weight_grads=None, states=None, need_input_grad=True):
    """BasicTransformerBlock: x [B,N,D] its input, context [B,M,Dc], grad_out [B,N,D] ->
    (dx [B,N,D], dcontext [B,M,Dc]). states: basic_block_forward_saved's, else recomputed from x.
    need_input_grad=False with frozen weights: dx is None, and the backward stops after the
    cross-attention (what comes before it, norm2 and the self-attention, reads no context)."""
    if states is None:
        states = basic_block_states(block, x, context) + (None,)        # GEGLU's hidden layer: recomputed
    normed1, qkv1, x1, normed2, qkv2, x2, ff_hidden = states
    # 3. feed-forward with residual (its input only when GEGLU's hidden layer is to be recomputed)
    ff_input = block.norm3(x2) if ff_hidden is None else None           # [B,N,D]
    grad_ff = feed_forward_backward(block.ff, ff_input, grad_out, ff_hidden)  # [B,N,D]
    grad_x2 = layer_norm_layer_backward(block.norm3, x2, grad_ff, residual=grad_out)  # [B,N,D]
    # 2. cross-attention over the context, with residual
    stop_after_cross = not need_input_grad and weight_grads is None
    grad_normed2, grad_context = attention_backward_pass(block.attn2, normed2, context, qkv2, grad_x2, weight_grads,
                                                         need_x_grad=not stop_after_cross)
    if stop_after_cross:
        return None, grad_context                                       # [B,M,Dc]
    grad_x1 = layer_norm_layer_backward(block.norm2, x1, grad_normed2, residual=grad_x2)  # [B,N,D]
    # 1. self-attention with residual (normed1 is both the queries' and the keys' input)
    grad_q_side, grad_kv_side = attention_backward_pass(block.attn1, normed1, normed1, qkv1, grad_x1, weight_grads)
    if grad_kv_side is not None:
        grad_q_side += grad_kv_side                                     # [B,N,D]
    grad_x = layer_norm_layer_backward(block.norm1, x, grad_q_side, residual=grad_x1)  # [B,N,D]
    return grad_x, grad_context


def transformer_2d_forward_saved(model, x, context):
    """Transformer2DModel's forward (transformer.py's steps) -> (out [B,C,H,W], saved): each block's
    input [B,H*W,D] and states, so that transformer_2d_backward reruns nothing."""
    batch, channels, height, width = x.shape
    # 1. group norm, then to tokens and proj_in
    tokens = model.norm(x).reshape(batch, channels, height * width).transpose(0, 2, 1)  # [B,H*W,C] (view)
    h = model.proj_in(tokens)                                           # [B,H*W,D]
    # 2. the transformer blocks, each one's input and states kept
    saved = []
    for block in model.transformer_blocks:
        out, states = basic_block_forward_saved(block, h, context)      # [B,H*W,D]
        saved.append((h, states))
        h = out
    # 3. proj_out, back to NCHW, residual
    return proj_out_to_nchw_plus_input(model.proj_out, h, x), saved     # [B,H*W,D] -> [B,C,H,W]


def proj_out_to_nchw_plus_input(proj_out, h, x):
    """Transformer2DModel's step 3: proj_out(h) [B,H*W,C] back to NCHW, plus the input x [B,C,H,W].
    For a float32 NumPy weight, as W h^T per image straight into NCHW, its blocks adding the bias and
    x in cache (no transposing copy, no one-thread add over [B,C,H,W]); else as the forward does it."""
    batch, channels, height, width = x.shape
    if not (isinstance(proj_out.weight, np.ndarray) and isinstance(h, np.ndarray)):
        h = proj_out(h)                                                 # [B,H*W,D] -> [B,H*W,C]
        out = np.ascontiguousarray(h.transpose(0, 2, 1)).reshape(x.shape)  # [B,C,H,W]
        out += x
        return out
    inputs = np.ascontiguousarray(x).reshape(batch, channels, height * width)  # [B,C,H*W]
    bias = None if proj_out.bias is None else proj_out.bias[:, None]    # [C,1]: one value per row of W h^T
    out = np.empty((batch, channels, height * width), np.float32)       # [B,C,H*W]
    for image in range(batch):
        matmul(proj_out.weight, h[image].T, out=out[image], bias=bias, residual=inputs[image])  # [C,D] @ [D,H*W] -> [C,H*W]
    return out.reshape(x.shape)                                         # [B,C,H,W]


def transformer_2d_backward(model, x, context, grad_out, weight_grads=None, saved=None, need_input_grad=True):
    """Transformer2DModel: x [B,C,H,W] its input, context [B,M,Dc], grad_out [B,C,H,W] ->
    (dx [B,C,H,W], dcontext [B,M,Dc]). saved: transformer_2d_forward_saved's, else every block's
    input is recomputed (and each block recomputes its states). need_input_grad=False (x does not
    depend on the context, and weights frozen): dx is None, and the first block stops after its
    cross-attention (basic_block_backward): the UNet's first transformer in textual inversion."""
    batch, channels, height, width = x.shape
    if saved is None:
        tokens = model.norm(x).reshape(batch, channels, height * width).transpose(0, 2, 1)  # [B,H*W,C] (view)
        block_inputs = [model.proj_in(tokens)]                          # [B,H*W,D]
        for block in model.transformer_blocks[:-1]:
            block_inputs.append(block(block_inputs[-1], context))       # [B,H*W,D]
        saved = [(block_input, None) for block_input in block_inputs]
    # 3. residual, NCHW -> tokens, proj_out (frozen)
    grad_tokens = grad_out.reshape(batch, channels, height * width).transpose(0, 2, 1)  # [B,H*W,C] (view)
    grad_h = linear_input_grad(model.proj_out.weight, grad_tokens)      # [B,H*W,C] @ [C,D] -> [B,H*W,D]
    # 2. the transformer blocks, last first (each one's saved states released once used)
    grad_context = np.zeros(context.shape, np.float32)                  # [B,M,Dc]
    for index in reversed(range(len(model.transformer_blocks))):
        block_input, states = saved.pop()
        block_needs_input_grad = need_input_grad or index > 0           # a later block's input reads the context
        grad_h, grad_ctx_block = basic_block_backward(model.transformer_blocks[index], block_input, context, grad_h,
                                                      weight_grads, states, block_needs_input_grad)
        grad_context += grad_ctx_block
        del block_input, states
    if grad_h is None:
        return None, grad_context                                       # (need_input_grad=False, frozen)
    # 1. proj_in (frozen) as its transpose, W^T dh^T, straight into NCHW (no transposing copy), group norm
    grad_normed = np.empty((batch, channels, height * width), np.float32)  # [B,C,H*W]
    for image in range(batch):
        matmul(model.proj_in.weight.T, grad_h[image].T, out=grad_normed[image])  # [C,D] @ [D,H*W] -> [C,H*W]
    grad_normed = grad_normed.reshape(batch, channels, height, width)   # [B,C,H,W]
    grad_x = group_norm_layer_backward(model.norm, x, grad_normed, residual=grad_out)  # [B,C,H,W]
    return grad_x, grad_context
