"""CLIP's backward: d(loss)/d(token embeddings) given d(loss)/d(the hidden states the UNet sees), with the
weights frozen. What textual inversion trains through: the new word's rows of the token embedding table.

    hidden, tape = clip_forward_for_backward(text_encoder, token_embeds, clip_skip=None)
    grad_token_embeds = tape.backward(grad_hidden)          # [B,L,D] -> [B,L,D]

token_embeds [B,L,D] are the rows token_embedding[input_ids] (clip_token_embeds), BEFORE the position
embedding is added. Which hidden state comes out (prompt_encoding.encode_ids, the pipeline's choice):
    clip_skip None   final_layer_norm(last layer's output)       diffusers' last_hidden_state (SD 1.x, 2.x)
    clip_skip k      final_layer_norm(output k layers before the last; k = the layer count: the embeddings)
    final_norm=False the layer's output without the final norm    (SDXL's penultimate layer; not trained yet)
Layers after the chosen one are not run at all (they do not reach the output).

Kept between the forward and the backward: each encoder layer's input [B,L,D] and its internals
(encoder_layer_forward_saved: q, k, v, the residual state x1, layer_norm2's output and fc1's output
before the activation [B,L,I]: ~2.2 MB per layer at batch 1 for CLIP-L), so the
backward reruns no forward (recomputing them cost one more CLIP forward per step, ~0.1 s for CLIP-L).
Where a layer's weights are not float32 NumPy arrays (a precision="bf16" model's packed ones), only
its input is kept and its backward recomputes the rest.

The layer (clip.py's CLIPEncoderLayer), forward and the steps its backward walks back:
    1. x1 = h + out_proj(causal_attention(q_proj, k_proj, v_proj of layer_norm1(h)))
    2. x2 = x1 + fc2(act(fc1(layer_norm2(x1))))
"""

import numpy as np

from npdiff.backend import array_module
from npdiff.errors import NpdiffError
from npdiff.kernels.activations_backward import ACTIVATION_BACKWARDS
from npdiff.kernels.attention import scaled_dot_product_attention
from npdiff.kernels.attention.backward import attention_backward
from npdiff.kernels.linear_backward import (
    linear_activation_backward,
    linear_input_grad,
    linear_input_grads_summed,
)
from npdiff.kernels.norm_backward import layer_norm_backward
from npdiff.models.transformer import merge_heads, split_heads


def clip_token_embeds(text_encoder, input_ids):
    """The token embedding rows of input_ids: [B,L] int -> [B,L,D] (a copy: the table is left as it is)."""
    ids = text_encoder.check_input_ids(input_ids)                       # [B,L] int64
    return np.ascontiguousarray(text_encoder.token_embedding[ids], dtype=np.float32)  # [V,D][B,L] -> [B,L,D]


def frozen_linear_backward(layer, grad_out):
    """A frozen Linear's input gradient: [..., out] -> [..., in]."""
    return linear_input_grad(layer.weight, grad_out)                    # [..., out] @ [out, in] -> [..., in]


def layer_norm_input_grad(layer, x, grad_out, residual=None):
    """A frozen LayerNorm's dx [B,L,D], plus residual (the gradient around it) when given."""
    grad_x, _, _ = layer_norm_backward(x, layer.weight, layer.bias, grad_out, layer.eps, need_weight_grad=False,
                                       residual=residual)
    return grad_x                                                       # [B,L,D]


def attention_states(layer, h):
    """CLIPEncoderLayer's step 1 (clip.py), keeping what the backward needs: -> (q, k, v [B,h,L,d], x1
    [B,L,D] the residual state after the attention)."""
    attn = layer.self_attn
    normed1 = layer.layer_norm1(h)                                      # [B,L,D]
    q = split_heads(attn.q_proj(normed1), attn.heads)                   # [B,L,D] -> [B,h,L,d]
    k = split_heads(attn.k_proj(normed1), attn.heads)                   # [B,L,D] -> [B,h,L,d]
    v = split_heads(attn.v_proj(normed1), attn.heads)                   # [B,L,D] -> [B,h,L,d]
    attended = scaled_dot_product_attention(q, k, v, scale=attn.scale, is_causal=True)  # [B,h,L,d]
    x1 = attn.out_proj(merge_heads(attended))                           # [B,L,D]
    x1 += h
    return q, k, v, x1


def keeps_states(layer):
    """Whether the layer's forward can keep its internals: float32 NumPy weights (not packed bf16 ones)."""
    return isinstance(layer.mlp.fc1.weight, np.ndarray) and layer.mlp.fc1.weight.dtype == np.float32


def encoder_layer_forward_saved(layer, h):
    """CLIPEncoderLayer's forward (clip.py's steps) -> (out [B,L,D], states for encoder_layer_backward:
    q, k, v, x1, normed2 and fc1's output before the activation [B,L,I])."""
    mlp = layer.mlp
    q, k, v, x1 = attention_states(layer, h)                            # 1.
    normed2 = layer.layer_norm2(x1)                                     # 2. [B,L,D]
    hidden = mlp.fc1(normed2)                                           # [B,L,D] -> [B,L,I]
    out = mlp.fc2(mlp.activation(hidden))                               # [B,L,I] -> [B,L,D]
    out += x1
    return out, (q, k, v, x1, normed2, hidden)


def encoder_layer_backward(layer, h, grad_out, states=None):
    """CLIPEncoderLayer: h [B,L,D] its input, grad_out d(loss)/d(its output) [B,L,D] -> d(loss)/dh [B,L,D].
    states: encoder_layer_forward_saved's, else recomputed from h (fc1's output inside the MLP's backward)."""
    attn, mlp = layer.self_attn, layer.mlp
    if states is None:
        states = attention_states(layer, h) + (None, None)
    q, k, v, x1, normed2, hidden = states
    if normed2 is None:
        normed2 = layer.layer_norm2(x1)                                 # [B,L,D]

    # 2. MLP with residual: fc2 (frozen), then the activation and fc1 (frozen)
    grad_activated = frozen_linear_backward(mlp.fc2, grad_out)          # [B,L,D] -> [B,L,I]
    if hidden is None:  # fc1's output recomputed inside
        grad_normed2, _, _ = linear_activation_backward(normed2, mlp.fc1.weight, mlp.fc1.bias, grad_activated,
                                                        mlp.activation_name, need_weight_grad=False)  # [B,L,D]
    else:
        grad_hidden = ACTIVATION_BACKWARDS[mlp.activation_name](hidden, grad_activated)  # [B,L,I]
        grad_normed2 = frozen_linear_backward(mlp.fc1, grad_hidden)     # [B,L,I] -> [B,L,D]
    grad_x1 = layer_norm_input_grad(layer.layer_norm2, x1, grad_normed2, residual=grad_out)  # [B,L,D]

    # 1. causal self-attention with residual: out_proj, attention, then q/k/v projections (all from normed1)
    grad_merged = frozen_linear_backward(attn.out_proj, grad_x1)        # [B,L,D]
    grad_heads = split_heads(grad_merged, attn.heads)                   # [B,L,D] -> [B,h,L,d]
    grad_q, grad_k, grad_v = attention_backward(q, k, v, grad_heads, scale=attn.scale, is_causal=True)  # [B,h,L,d]
    projections = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    heads = (merge_heads(grad_q), merge_heads(grad_k), merge_heads(grad_v))  # [B,L,D] each (no copies)
    grad_normed1 = linear_input_grads_summed(projections, heads)        # dq Wq + dk Wk + dv Wv [B,L,D]
    return layer_norm_input_grad(layer.layer_norm1, h, grad_normed1, residual=grad_x1)  # [B,L,D]


class CLIPTape:
    """The layer inputs of one CLIP forward (from the token embeddings), for its backward."""

    def __init__(self, text_encoder, shape, layer_inputs, layer_states, final_input):
        self.text_encoder = text_encoder
        self.shape = shape                # [B,L,D] of the token embeddings and of every hidden state
        self.layer_inputs = layer_inputs  # [B,L,D] per layer run, first to last
        self.layer_states = layer_states  # per layer: encoder_layer_forward_saved's states, or None
        self.final_input = final_input    # [B,L,D] the final norm's input, or None (final_norm=False)

    def backward(self, grad_hidden):
        """d(loss)/d(the hidden state returned) [B,L,D] -> d(loss)/d(token embeddings) [B,L,D]. The tape is
        used up (its layer inputs are released as it goes)."""
        if self.layer_inputs is None:
            raise NpdiffError("this CLIP tape has been used already: run clip_forward_for_backward again")
        grad = np.ascontiguousarray(grad_hidden, dtype=np.float32)      # [B,L,D]
        if grad.shape != self.shape:
            raise NpdiffError(f"CLIP backward: the hidden-state gradient must have shape {self.shape}, got {grad.shape}")
        # 3. the final layer norm
        if self.final_input is not None:
            grad = layer_norm_input_grad(self.text_encoder.final_layer_norm, self.final_input, grad)  # [B,L,D]
        # 2. the encoder layers, last first
        layers = self.text_encoder.layers[:len(self.layer_inputs)]
        for layer in reversed(layers):
            grad = encoder_layer_backward(layer, self.layer_inputs.pop(), grad, self.layer_states.pop())  # [B,L,D]
        self.layer_inputs = self.layer_states = None
        # 1. h0 = token_embeds + position_embedding: the token embeddings get the gradient as it is
        return grad


def clip_forward_for_backward(text_encoder, token_embeds, clip_skip=None, final_norm=True):
    """CLIP from token embeddings [B,L,D] (before the positions are added) -> (hidden [B,L,D], tape).

    clip_skip None: the last layer's output; k: the output k layers before the last (the pipeline's
    clip_skip). final_norm: pass it through final_layer_norm (SD 1.x / 2.x) or not (SDXL's penultimate)."""
    if array_module(token_embeds) is not np:
        raise NpdiffError("the CLIP backward runs on NumPy arrays; got token embeddings on another device")
    depth = len(text_encoder.layers)
    skip = 0 if clip_skip is None else int(clip_skip)
    if not 0 <= skip <= depth:
        raise NpdiffError(f"clip_skip {clip_skip} must be in [0, {depth}] for a text encoder of {depth} layers")
    token_embeds = np.ascontiguousarray(token_embeds, dtype=np.float32)  # [B,L,D]
    dim = text_encoder.token_embedding.shape[1]
    positions = text_encoder.position_embedding.shape[0]
    if token_embeds.ndim != 3 or token_embeds.shape[2] != dim or not 1 <= token_embeds.shape[1] <= positions:
        raise NpdiffError(f"token embeddings must have shape [B,L,{dim}] with 1 <= L <= {positions}; "
                          f"got {token_embeds.shape}")
    # 1. embeddings: tokens + positions
    length = token_embeds.shape[1]
    h = token_embeds + text_encoder.position_embedding[None, :length]   # [B,L,D] + [1,L,D] -> [B,L,D]
    # 2. the layers up to the chosen one, keeping each one's input and internals
    layer_inputs, layer_states = [], []
    for layer in text_encoder.layers[:depth - skip]:
        layer_inputs.append(h)
        if keeps_states(layer):
            h, states = encoder_layer_forward_saved(layer, h)           # [B,L,D] -> [B,L,D]
        else:
            h, states = layer(h), None                                  # (recomputed by the backward)
        layer_states.append(states)
    # 3. the final layer norm
    tape = CLIPTape(text_encoder, token_embeds.shape, layer_inputs, layer_states, h if final_norm else None)
    return (text_encoder.final_layer_norm(h) if final_norm else h), tape  # [B,L,D]


def clip_backward(text_encoder, token_embeds, grad_hidden, clip_skip=None, final_norm=True):
    """-> d(loss)/d(token_embeds) [B,L,D] for d(loss)/d(hidden) grad_hidden [B,L,D]."""
    _, tape = clip_forward_for_backward(text_encoder, token_embeds, clip_skip, final_norm)
    return tape.backward(grad_hidden)
