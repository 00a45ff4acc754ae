"""Attention pieces: Attention, FeedForward (GEGLU), BasicTransformerBlock, Transformer2DModel (the
UNet's spatial transformer), the VAE's single-head AttentionBlock, and TransposedLinear (a Linear
whose weight lies in memory as [in, out], for GEMMs with few rows: CLIP's).

Order of operations as in diffusers (models/attention.py, attention_processor.py AttnProcessor2_0,
transformers/transformer_2d.py). Keys are diffusers' module names: "attn1.to_q", "ff.net.0.proj",
"proj_in", ...

About `upcast_attention` (SD 2.x configs): in diffusers it makes the attention scores
(q @ k^T and the softmax) run in float32 when the model runs in float16. npdiff computes everything
in float32, the scores included, so the flag changes nothing here; it is accepted and noted. At
precision="bf16" (attend) q k^T multiplies bf16-rounded q and k but sums in float32, and the softmax
is float32: bf16 has float32's range, so the overflow that upcast_attention guards against in
float16 cannot happen.

proj_in / proj_out: SD 1.x stores them as 1x1 convolutions ([C_out,C_in,1,1]), SD 2.x
(use_linear_projection) as nn.Linear ([C_out,C_in]). Both are the same matrix product over the
channel axis, so both run as a Linear on tokens [B,H*W,C]; the 1x1 conv weight is viewed as
[C_out,C_in] once at load.
"""

import numpy as np

from npdiff import kernels
from npdiff.backend import array_module
from npdiff.errors import NpdiffError
from npdiff.kernels.attention import scaled_dot_product_attention_bf16
from npdiff.models import precision
from npdiff.models.blocks import GroupNorm, LayerNorm, Linear, child


class TransposedLinear(Linear):
    """A Linear whose weight [out, in] lies in memory as weight^T [in, out], C-contiguous.

    Why: np.matmul(x, weight.T) on a C-contiguous [out, in] weight hands OpenBLAS's sgemm a B with
    its transpose flag, and OpenBLAS packs a transposed B more slowly than a plain one; with few
    rows (CLIP's 2 x 77 tokens) that packing is a large part of each GEMM. Measured in one process,
    quiet machine, 2 threads, [out, in] vs [in, out] memory: [154,768] @ [768,768] 180 -> 201
    GFLOP/s, [154,768] @ [768,3072] 176 -> 182, [154,3072] @ [3072,768] 176 -> 194 (torch's
    F.linear: 189, 179, 179). With thousands of rows (the UNet's self-attention and feed-forward)
    both layouts run at the same speed, so only CLIP uses this class, and since CLIP's CPU layers run
    on packed weights (npdiff/models/packed_linear.py) only on the GPU backend. In the whole CLIP-L forward
    (2 x 77 tokens, same process, alternated): 13-28 ms less per call (~7-12%). Cost: one transposed
    copy per weight at load, 340 MB for CLIP-L, measured 0.23-0.36 s (so it pays for itself after
    ~10-20 text encodings). The copy is private memory, resident for the pipeline's whole life (the
    pipeline's release of the text encoder's mapped pages between stages cannot drop it); the
    memory-mapped original is dropped and its pages released with the rest of the model's.

    `weight` is still the torch-layout [out, in] array for every reader and writer (a view of the
    [in, out] memory, so weight.T is C-contiguous). Assigning one (a fused LoRA, its unload) copies
    it into that layout, unless it already is: then the very array assigned is kept (an unload puts
    back the original object itself, which the LoRA tests check by identity).
    """

    @property
    def weight(self):
        return self._weight  # [out,in], F-ordered: its .T [in,out] is C-contiguous

    @weight.setter
    def weight(self, value):
        if value.T.flags.c_contiguous:
            self._weight = value
        else:
            self._weight = transposed_copy(value)  # [out,in] -> [in,out] memory


TRANSPOSE_TILE = 64  # rows and columns of one tile of transposed_copy: source and target tile, 16 KiB each


def transposed_copy(value):
    """[out,in] -> the same values lying in memory as [in,out], returned as the [out,in] view of that memory.

    NumPy's own transposed copy (ascontiguousarray(value.T)) reads or writes a whole row apart at every
    step; copied in 64x64 tiles both sides stay in the L1 cache. Measured on CLIP-L's 72 weights (226 MB,
    the same process, a loaded 2-core machine): 0.52-0.60 s -> 0.10-0.20 s; it is most of what loading
    SD 1.5's pipeline costs once the weights' NaN/Inf check is remembered. The same bytes either way."""
    xp = array_module(value)
    if xp is not np or value.ndim != 2:
        return xp.ascontiguousarray(value.T).T  # CuPy: one kernel on the device
    rows, cols = value.shape
    memory = np.empty((cols, rows), dtype=value.dtype)  # [in,out]
    for row in range(0, rows, TRANSPOSE_TILE):
        for col in range(0, cols, TRANSPOSE_TILE):
            memory[col:col + TRANSPOSE_TILE, row:row + TRANSPOSE_TILE] = \
                value[row:row + TRANSPOSE_TILE, col:col + TRANSPOSE_TILE].T  # [t,t] tile -> [t,t]^T
    return memory.T  # [in,out] memory seen as [out,in]


def attend(q, k, v, scale, bf16):
    """softmax(q k^T * scale) v, [B,h,N,d] -> [B,h,N,dv]: for a model loaded at precision="bf16" the bf16
    attention (AMX tiles where they run: q, k, v and the probabilities rounded to bf16, float32 sums), else
    the float32 one."""
    if bf16:
        return scaled_dot_product_attention_bf16(q, k, v, scale=scale)  # [B,h,N,d]
    return kernels.scaled_dot_product_attention(q, k, v, scale=scale)   # [B,h,N,d]


def split_heads(x, heads):
    """[B,N,heads*d] -> [B,heads,N,d] (a view: no copy)."""
    batch, tokens, inner = x.shape
    return x.reshape(batch, tokens, heads, inner // heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B,heads,N,d] -> [B,N,heads*d] (one copy, into token-major order)."""
    batch, heads, tokens, head_dim = x.shape
    xp = array_module(x)
    return xp.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(batch, tokens, heads * head_dim)


class Attention:
    """Multi-head attention: to_q / to_k / to_v (bias optional), softmax(q k^T / sqrt(d)) v, to_out.0.

    Self-attention when called without `context`; cross-attention over `context` [B,M,context_dim]
    otherwise (context_dim = cross_attention_dim)."""

    def __init__(self, weights, prefix, query_dim, heads, dim_head, context_dim=None, qkv_bias=False,
                 out_bias=True):
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.to_q = Linear(weights, child(prefix, "to_q"), query_dim, inner_dim, bias=qkv_bias)
        self.to_k = Linear(weights, child(prefix, "to_k"), context_dim, inner_dim, bias=qkv_bias)
        self.to_v = Linear(weights, child(prefix, "to_v"), context_dim, inner_dim, bias=qkv_bias)
        self.to_out = Linear(weights, child(prefix, "to_out.0"), inner_dim, query_dim, bias=out_bias)
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.bf16 = precision.runs_bf16(weights, precision.attention_family(prefix))  # attend in bf16 too

    def __call__(self, x, context=None):
        context = x if context is None else context
        # 1. project to queries, keys, values and split the heads
        q = split_heads(self.to_q(x), self.heads)                       # [B,N,D] -> [B,h,N,d]
        k = split_heads(self.to_k(context), self.heads)                 # [B,M,Dc] -> [B,h,M,d]
        v = split_heads(self.to_v(context), self.heads)                 # [B,M,Dc] -> [B,h,M,d]
        # 2. softmax(q k^T * scale) v (the kernel picks the memory-efficient version for long N)
        out = attend(q, k, v, self.scale, self.bf16)                     # [B,h,N,d]
        del q, k, v
        # 3. merge the heads and project out (dropout is the identity at inference)
        out = merge_heads(out)                                          # [B,h,N,d] -> [B,N,h*d]
        return self.to_out(out)                                         # [B,N,h*d] -> [B,N,D]


class FeedForward:
    """GEGLU feed-forward: ff.net.0.proj [2*4D, D] -> x * gelu(gate) -> ff.net.2 [D, 4D]."""

    def __init__(self, weights, prefix, dim, mult=4):
        inner_dim = dim * mult
        self.proj = Linear(weights, child(prefix, "net.0.proj"), dim, 2 * inner_dim)  # [2*inner, D]
        self.out = Linear(weights, child(prefix, "net.2"), inner_dim, dim)

    def __call__(self, x):
        # the weight is read at each call, never kept aside: a fused LoRA replaces proj.weight
        h = precision.geglu(x, self.proj.weight, self.proj.bias)        # [B,N,D] -> [B,N,4D]
        return self.out(h)                                              # [B,N,4D] -> [B,N,D]


class BasicTransformerBlock:
    """norm1 -> self-attention (attn1) -> norm2 -> cross-attention (attn2) -> norm3 -> GEGLU FF,
    each with a residual (diffusers norm_type="layer_norm", the SD 1.x/2.x block)."""

    def __init__(self, weights, prefix, dim, heads, dim_head, cross_attention_dim, norm_eps=1e-5):
        self.norm1 = LayerNorm(weights, child(prefix, "norm1"), dim, norm_eps)
        self.attn1 = Attention(weights, child(prefix, "attn1"), dim, heads, dim_head)
        self.norm2 = LayerNorm(weights, child(prefix, "norm2"), dim, norm_eps)
        self.attn2 = Attention(weights, child(prefix, "attn2"), dim, heads, dim_head,
                               context_dim=cross_attention_dim)
        self.norm3 = LayerNorm(weights, child(prefix, "norm3"), dim, norm_eps)
        self.ff = FeedForward(weights, child(prefix, "ff"), dim)

    def __call__(self, x, context):
        # 1. self-attention with residual
        h = self.attn1(self.norm1(x))                                   # [B,N,D]
        h += x                                                          # [B,N,D]
        x = h
        # 2. cross-attention over the text embeddings, with residual
        h = self.attn2(self.norm2(x), context)                          # [B,N,D], context [B,M,Dc]
        h += x                                                          # [B,N,D]
        x = h
        # 3. feed-forward with residual
        h = self.ff(self.norm3(x))                                      # [B,N,D]
        h += x                                                          # [B,N,D]
        return h


class Transformer2DModel:
    """GroupNorm -> proj_in -> BasicTransformerBlock x num_layers -> proj_out -> + input.

    Runs on tokens [B,H*W,C] between proj_in and proj_out. GroupNorm eps is 1e-6 as in diffusers."""

    def __init__(self, weights, prefix, in_channels, heads, dim_head, cross_attention_dim, norm_num_groups,
                 use_linear_projection, num_layers=1, norm_eps=1e-5):
        inner_dim = heads * dim_head
        from_conv = not use_linear_projection
        self.norm = GroupNorm(weights, child(prefix, "norm"), norm_num_groups, in_channels, 1e-6)
        self.proj_in = Linear(weights, child(prefix, "proj_in"), in_channels, inner_dim, from_conv1x1=from_conv)
        self.transformer_blocks = [
            BasicTransformerBlock(weights, child(prefix, f"transformer_blocks.{i}"), inner_dim, heads, dim_head,
                                  cross_attention_dim, norm_eps)
            for i in range(num_layers)
        ]
        self.proj_out = Linear(weights, child(prefix, "proj_out"), inner_dim, in_channels, from_conv1x1=from_conv)
        self.cross_attention_dim = cross_attention_dim

    def __call__(self, x, context):
        if context.shape[-1] != self.cross_attention_dim:
            raise NpdiffError(
                f"encoder_hidden_states has feature size {context.shape[-1]}; the model expects "
                f"cross_attention_dim {self.cross_attention_dim}")
        batch, channels, height, width = x.shape
        xp = array_module(x)
        # 1. group norm, then to tokens and proj_in
        h = self.norm(x)                                                # [B,C,H,W]
        h = h.reshape(batch, channels, height * width).transpose(0, 2, 1)  # [B,C,H,W] -> [B,H*W,C] (view)
        h = self.proj_in(h)                                             # [B,H*W,C] -> [B,H*W,D]
        # 2. the transformer blocks
        for block in self.transformer_blocks:
            h = block(h, context)                                       # [B,H*W,D]
        # 3. proj_out, back to NCHW, residual
        h = self.proj_out(h)                                            # [B,H*W,D] -> [B,H*W,C]
        out = xp.ascontiguousarray(h.transpose(0, 2, 1)).reshape(batch, channels, height, width)  # [B,C,H,W]
        del h
        out += x                                                        # [B,C,H,W]
        return out


class AttentionBlock:
    """The VAE mid-block attention (diffusers Attention with residual_connection, group_norm, 1 head).

    group_norm -> tokens -> to_q/to_k/to_v (with bias) -> softmax(q k^T / sqrt(C)) v -> to_out.0 ->
    NCHW -> + input -> / rescale_output_factor. Older diffusers folders name the projections
    query/key/value/proj_attn; diffusers renames them on load, and so does this class."""

    LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def __init__(self, weights, prefix, channels, norm_num_groups, eps, rescale_output_factor=1.0):
        self.group_norm = GroupNorm(weights, child(prefix, "group_norm"), norm_num_groups, channels, eps)
        names = {}
        for name, legacy in self.LEGACY_NAMES.items():
            has_new = weights.has(child(prefix, f"{name}.weight"))
            has_legacy = weights.has(child(prefix, f"{legacy}.weight"))
            names[name] = legacy if has_legacy and not has_new else name
        self.to_q = Linear(weights, child(prefix, names["to_q"]), channels, channels)
        self.to_k = Linear(weights, child(prefix, names["to_k"]), channels, channels)
        self.to_v = Linear(weights, child(prefix, names["to_v"]), channels, channels)
        self.to_out = Linear(weights, child(prefix, names["to_out.0"]), channels, channels)
        self.scale = channels ** -0.5
        self.bf16 = precision.runs_bf16(weights, precision.attention_family(prefix))  # attend in bf16 too
        self.rescale_output_factor = float(rescale_output_factor)

    def __call__(self, x):
        batch, channels, height, width = x.shape
        xp = array_module(x)
        # 1. group norm, then to tokens
        h = self.group_norm(x)                                          # [B,C,H,W]
        h = h.reshape(batch, channels, height * width).transpose(0, 2, 1)  # [B,C,H,W] -> [B,H*W,C] (view)
        # 2. single-head attention over all H*W positions
        q = self.to_q(h)[:, None]                                       # [B,H*W,C] -> [B,1,H*W,C]
        k = self.to_k(h)[:, None]                                       # [B,1,H*W,C]
        v = self.to_v(h)[:, None]                                       # [B,1,H*W,C]
        del h
        out = attend(q, k, v, self.scale, self.bf16)                     # [B,1,H*W,C]
        del q, k, v
        out = self.to_out(out[:, 0])                                    # [B,H*W,C]
        # 3. back to NCHW, residual, rescale
        out = xp.ascontiguousarray(out.transpose(0, 2, 1)).reshape(batch, channels, height, width)  # [B,C,H,W]
        out += x
        if self.rescale_output_factor != 1.0:
            out /= self.rescale_output_factor
        return out
