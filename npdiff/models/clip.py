"""The CLIP text encoders of Stable Diffusion (transformers' CLIPTextModel and
CLIPTextModelWithProjection), over their own weight names.

    text_encoder = CLIPTextModel.from_pretrained("sd15", subfolder="text_encoder")
    last = text_encoder(input_ids)                                   # [B,L] int -> [B,L,D]
    last, hidden_states = text_encoder(input_ids, output_hidden_states=True)
    penultimate = text_encoder.final_layer_norm(hidden_states[-2])   # "clip skip" / SD 2.x style

    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained("sdxl", subfolder="text_encoder_2")
    out = text_encoder_2(input_ids, output_hidden_states=True)       # SDXL's OpenCLIP ViT-bigG
    out.text_embeds            [B,P]  pooled: text_projection(last_hidden_state at each row's end token)
    out.hidden_states[-2]      [B,L,D] the penultimate layer's output, no final norm (what SDXL conditions on)

The network (transformers models/clip/modeling_clip.py, CLIPTextTransformer):
    embeddings   token_embedding[ids] + position_embedding[0..L-1]
    layers       pre-LN transformer layers: h += attn(layer_norm1(h)) with a causal mask,
                 h += mlp(layer_norm2(h)), mlp = fc2(act(fc1(.))), act from config "hidden_act":
                 "quick_gelu" (SD 1.x, OpenAI CLIP) or "gelu" (SD 2.x, OpenCLIP)
    final norm   final_layer_norm, giving last_hidden_state
hidden_states, as transformers returns them: the embeddings, then every layer's output (before the
final norm): num_hidden_layers + 1 arrays.

CLIPTextModelWithProjection adds the pooled output (transformers' CLIPTextTransformer: the final-normed
hidden state at each row's end-of-text position) through "text_projection" [projection_dim, D], no
bias. Which position: with the config's eos_token_id == 2 (the legacy value, which SDXL's
text_encoder_2 config carries) transformers takes the argmax of each row's ids (the end token
49407 is the largest id of CLIP's vocabulary); with any other eos_token_id, the first position
holding it (0 when none does). Both are followed here.

Weight names: "text_model.embeddings.token_embedding.weight", ... (transformers 4.x files and every
SD checkpoint) or the same without "text_model." (transformers 5.x saves); both are accepted. Older
files also carry the int64 buffer "embeddings.position_ids" (positions 0..P-1): it is ignored.
No attention mask is taken: Stable Diffusion runs the text encoder on padded sequences without one,
so pad tokens are attended to (causally), exactly as diffusers does.
"""

from functools import partial

import numpy as np

from npdiff import backend, kernels
from npdiff.errors import NpdiffError
from npdiff.kernels.attention.causal_rows import causal_attention_rows
from npdiff.kernels.clip_layer_rows import clip_layer_by_prompt, clip_layers_by_prompt, runs_by_prompt
from npdiff.kernels.linear_packed import aligned_empty, aligned_scratch, layer_norm_rows, packed_shape
from npdiff.loading.config_checks import full_config
from npdiff.loading.configs import load_component
from npdiff.models import precision
from npdiff.models.blocks import LayerNorm, Linear, child
from npdiff.models.packed_linear import PackedLinear, PanelBlock
from npdiff.models.transformer import TransposedLinear, merge_heads, split_heads

# The layers' private copies of their weights (on the CPU PackedLinear's packed panels, the GEMMs of
# kernels/linear_packed.py; on the GPU TransposedLinear's [in,out] copies) are held for the model's life: 340 MB
# for CLIP-L, but 2.5 GB for SDXL's bigG, where the UNet's 10 GB already exceed a 24 GiB machine's comfort.
# Above this size the layers keep the mapped [out,in] weights (plain Linear).
TRANSPOSED_COPY_LIMIT = 512 * 2**20  # bytes
# CLIPTextModel packs its layers' panels into one block of 2 MiB pages (packed_linear.PanelBlock; False: an array
# a layer, as before; benchmarks/clip_steps.py compares the two)
PANELS_IN_ONE_BLOCK = True
LEGACY_EOS_TOKEN_ID = 2  # transformers: "pool at the argmax of the ids" (configs from before its PR #24773)


def _gelu_erf(x):
    return kernels.gelu(x, approximate="none")


def _gelu_tanh(x):
    return kernels.gelu(x, approximate="tanh")


ACTIVATIONS = {  # transformers ACT2FN names -> (kernel, its name for kernels.linear_activation)
    "quick_gelu": (kernels.quick_gelu, "quick_gelu"),
    "gelu": (_gelu_erf, "gelu"),
    "gelu_new": (_gelu_tanh, "gelu_tanh"),
    "gelu_pytorch_tanh": (_gelu_tanh, "gelu_tanh"),
}


class CLIPAttention:
    """Multi-head self-attention with biases: q_proj, k_proj, v_proj, out_proj, causal mask.

    Every projection is a `linear` (CLIPTextModel picks PackedLinear, weights packed for GEMMs with 2 x 77
    rows, when those copies are small, see TRANSPOSED_COPY_LIMIT; then CLIPEncoderLayer.packed_forward runs).
    q, k and v stay three GEMMs: one GEMM with the three weights side by side ([768, 2304]) runs at
    the same GFLOP/s as each [768, 768] one (measured 184 vs 180 GFLOP/s, within noise), so the
    concatenated copy (CLIP-L: 12 x 3 x 768 x 768 x 4 B = 85 MB) would buy nothing."""

    def __init__(self, weights, prefix, dim, heads, linear=TransposedLinear):
        if dim % heads:
            raise NpdiffError(f"config: hidden_size {dim} is not divisible by num_attention_heads {heads}")
        self.q_proj = linear(weights, child(prefix, "q_proj"), dim, dim)
        self.k_proj = linear(weights, child(prefix, "k_proj"), dim, dim)
        self.v_proj = linear(weights, child(prefix, "v_proj"), dim, dim)
        self.out_proj = linear(weights, child(prefix, "out_proj"), dim, dim)
        self.heads = heads
        self.scale = (dim // heads) ** -0.5

    def __call__(self, x):
        # 1. project to queries, keys, values and split the heads
        q = split_heads(self.q_proj(x), self.heads)                     # [B,L,D] -> [B,h,L,d]
        k = split_heads(self.k_proj(x), self.heads)                     # [B,L,D] -> [B,h,L,d]
        v = split_heads(self.v_proj(x), self.heads)                     # [B,L,D] -> [B,h,L,d]
        # 2. softmax(q k^T * scale) v, token i attending to tokens 0..i only
        out = kernels.scaled_dot_product_attention(q, k, v, scale=self.scale, is_causal=True)  # [B,h,L,d]
        # 3. merge the heads and project out
        out = merge_heads(out)                                          # [B,h,L,d] -> [B,L,D]
        return self.out_proj(out)                                       # [B,L,D] -> [B,L,D]


class CLIPMLP:
    """fc1 [I,D] -> activation -> fc2 [D,I]; fc1, its bias and the activation in one kernel call
    (kernels.linear_activation: the GEMM, then one in-place pass)."""

    def __init__(self, weights, prefix, dim, intermediate, activation, linear=TransposedLinear):
        self.fc1 = linear(weights, child(prefix, "fc1"), dim, intermediate)
        self.fc2 = linear(weights, child(prefix, "fc2"), intermediate, dim)
        self.activation, self.activation_name = activation  # the kernel alone, and its linear_activation name

    def __call__(self, x):
        h = precision.linear_activation(x, self.fc1.weight, self.fc1.bias, self.activation_name)  # [B,L,D] -> [B,L,I]
        return self.fc2(h)                                              # [B,L,I] -> [B,L,D]


class CLIPEncoderLayer:
    """Pre-LN transformer layer: attention and MLP, each behind a layer norm and a residual."""

    def __init__(self, weights, prefix, config, activation, linear=TransposedLinear):
        dim, eps = config["hidden_size"], config["layer_norm_eps"]
        self.layer_norm1 = LayerNorm(weights, child(prefix, "layer_norm1"), dim, eps)
        self.self_attn = CLIPAttention(weights, child(prefix, "self_attn"), dim, config["num_attention_heads"], linear)
        self.layer_norm2 = LayerNorm(weights, child(prefix, "layer_norm2"), dim, eps)
        self.mlp = CLIPMLP(weights, child(prefix, "mlp"), dim, config["intermediate_size"], activation, linear)

    def __call__(self, h, out=None):
        """h [B,L,D] -> [B,L,D]; out: None (a new array) or, on PackedLinear layers, a C-contiguous [B*L,D]
        float32 array to write the result into (it may be h itself: h is read before out is written)."""
        if isinstance(self.mlp.fc2, PackedLinear):
            return self.packed_forward(h, out)
        # 1. causal self-attention, residual (added into the fresh output: h itself is left as it
        #    was, since the model returns every layer's h in hidden_states)
        out = self.self_attn(self.layer_norm1(h))                       # [B,L,D]
        out += h
        h = out
        # 2. MLP, residual
        out = self.mlp(self.layer_norm2(h))                             # [B,L,D]
        out += h
        return out

    def has_every_bias(self):
        """Whether every projection and norm has its bias and weight (CLIP's all do; clip_layer_by_prompt needs
        them)."""
        norms = (self.layer_norm1, self.layer_norm2)
        return all(layer.bias is not None for layer in self.projections()) and all(
            norm.weight is not None and norm.bias is not None for norm in norms)

    def projections(self):
        """The layer's six Linears, in the order its forward runs them: q, k, v, out_proj, fc1, fc2."""
        attn, mlp = self.self_attn, self.mlp
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2

    def packed_weights(self):
        """The layer's weights as clip_layer_rows takes them: (norm1, q, k, v, o, norm2, fc1, fc2), each norm
        (weight, bias, eps), each projection (panels, bias)."""
        norm1, norm2 = self.layer_norm1, self.layer_norm2
        q, k, v, o, fc1, fc2 = ((layer.panels, layer.bias) for layer in self.projections())
        return ((norm1.weight, norm1.bias, norm1.eps), q, k, v, o, (norm2.weight, norm2.bias, norm2.eps), fc1, fc2)

    def packed_forward(self, h, out=None):
        """The same steps on PackedLinear layers: each layer norm written into a scratch of rows that its GEMMs
        read, and the bias, activation and residual added to each GEMM's tiles as they are made. When the batch
        divides among Numba's threads (CLIP-L's 2 prompts on 2 threads), the whole layer runs in one parallel call,
        each thread on its own prompts (kernels/clip_layer_rows.py); otherwise step by step, each step split
        among the threads by columns. Both give the same bytes. Every temporary is one of this thread's scratch buffers (kernels/scratch.py), reused from layer to
        layer and call to call: fresh arrays of 0.5-2 MB came from mmap each time (measured on CLIP-L: 18.5k
        page faults and ~40 ms of system time per call)."""
        attn, mlp, norm1, norm2 = self.self_attn, self.mlp, self.layer_norm1, self.layer_norm2
        batch, length, dim = h.shape
        rows, inner = batch * length, mlp.fc1.weight.shape[0]
        h_rows = np.ascontiguousarray(h).reshape(rows, dim)                # [B,L,D] -> [M,D]
        if runs_by_prompt(batch) and self.has_every_bias():
            # the whole layer in one parallel call, each prompt on one thread (kernels/clip_layer_rows.py)
            out = aligned_empty((rows, dim)) if out is None else out      # [M,D]
            norm1_weights, q, k, v, o, norm2_weights, fc1, fc2 = self.packed_weights()
            clip_layer_by_prompt(h_rows, out, batch, norm1_weights, q, k, v, o, norm2_weights, fc1,
                                 mlp.activation_name, fc2, attn.heads, attn.scale)  # [M,D] -> [M,D]
            return out.reshape(batch, length, dim)                            # [M,D] -> [B,L,D]
        normed = aligned_scratch("clip normed rows", (rows, dim))          # [M,D]
        # 1. causal self-attention, residual (into scratch: h itself is left as it was)
        layer_norm_rows(h_rows, norm1.weight, norm1.bias, norm1.eps, out=normed)              # [M,D]
        q = attn.q_proj.rows(normed, out=aligned_scratch("clip q", (rows, dim)))               # [M,D]
        k = attn.k_proj.rows(normed, out=aligned_scratch("clip k", (rows, dim)))               # [M,D]
        v = attn.v_proj.rows(normed, out=aligned_scratch("clip v", (rows, dim)))               # [M,D]
        attended = causal_attention_rows(q, k, v, batch, attn.heads, attn.scale,
                                         out=aligned_scratch("clip attended", (rows, dim)))   # [M,D], heads merged
        h_rows = attn.out_proj.rows(attended, residual=h_rows,
                                    out=aligned_scratch("clip attention out", (rows, dim)))    # [M,D] + h
        # 2. MLP (fc1 + activation in one pass), residual
        layer_norm_rows(h_rows, norm2.weight, norm2.bias, norm2.eps, out=normed)              # [M,D]
        hidden = mlp.fc1.rows(normed, activation=mlp.activation_name,
                              out=aligned_scratch("clip hidden", (rows, inner)))               # [M,D] -> [M,I]
        out = mlp.fc2.rows(hidden, residual=h_rows, out=out)                                  # [M,I] -> [M,D] + h
        return out.reshape(batch, length, dim)                                                 # [M,D] -> [B,L,D]


class CLIPTextModel:
    """CLIP text transformer: input_ids [B,L] -> last_hidden_state [B,L,D] (and every hidden state)."""

    def __init__(self, config, weights):
        self.config = full_config("text_encoder", config)  # defaults filled in; checked unless the loader did
        c = self.config
        vocab, dim, positions = c["vocab_size"], c["hidden_size"], c["max_position_embeddings"]
        # transformers 4.x names start with "text_model.", 5.x saves drop it
        prefix = "text_model" if weights.has("text_model.embeddings.token_embedding.weight") else ""
        weights.ignore(child(prefix, "embeddings.position_ids"))  # int64 buffer 0..P-1, not a weight

        token_key = child(prefix, "embeddings.token_embedding.weight")
        position_key = child(prefix, "embeddings.position_embedding.weight")
        self.token_embedding = weights.take(token_key, (vocab, dim))                # [V,D]
        self.position_embedding = weights.take(position_key, (positions, dim))      # [P,D]
        activation = ACTIVATIONS[c["hidden_act"]]
        copy_bytes = 4 * c["num_hidden_layers"] * (4 * dim * dim + 2 * dim * c["intermediate_size"])
        small = copy_bytes <= TRANSPOSED_COPY_LIMIT and precision.keeps_float32(weights, "other")  # else packed
        on_cpu = backend.array_module(self.token_embedding) is np
        self.linear = (PackedLinear if on_cpu else TransposedLinear) if small else Linear
        linear = self.linear
        if self.linear is PackedLinear and PANELS_IN_ONE_BLOCK:  # every layer's panels in one block of 2 MiB pages,
            inner = c["intermediate_size"]                      # in the order a forward reads them
            per_layer = [packed_shape((dim, dim))] * 4 + [packed_shape((inner, dim)), packed_shape((dim, inner))]
            block = PanelBlock(PanelBlock.floats_for(per_layer * c["num_hidden_layers"]))
            linear = partial(PackedLinear, block=block)
        self.layers = [CLIPEncoderLayer(weights, child(prefix, f"encoder.layers.{i}"), c, activation, linear)
                       for i in range(c["num_hidden_layers"])]
        self.final_layer_norm = LayerNorm(weights, child(prefix, "final_layer_norm"), dim, c["layer_norm_eps"])
        self.take_head_weights(weights)
        weights.check_all_used()
        self.precision = weights.precision  # "fp32" or "bf16": what the Linear/Conv2d layers hold

    def take_head_weights(self, weights):
        """Weights outside the text transformer (none here; CLIPTextModelWithProjection's projection)."""

    @classmethod
    def from_pretrained(cls, folder, subfolder=None, variant=None, precision="fp32"):
        """precision "bf16": Linear and Conv2d weights packed in bfloat16 (npdiff/models/precision.py)."""
        return cls(*load_component(folder, subfolder, variant, precision))

    def check_input_ids(self, input_ids):
        """input_ids -> an int64 NumPy array [B,L]; NpdiffError naming what is wrong."""
        ids = backend.to_numpy(input_ids) if hasattr(input_ids, "shape") else np.asarray(input_ids)  # [B,L]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise NpdiffError(f"input_ids must have shape [B,L] with L >= 1; got shape {tuple(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise NpdiffError(f"input_ids must be integers; got dtype {ids.dtype}")
        positions = self.config["max_position_embeddings"]
        if ids.shape[1] > positions:
            raise NpdiffError(f"input_ids has length {ids.shape[1]}; the text encoder has "
                              f"max_position_embeddings {positions}")
        vocab = self.token_embedding.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise NpdiffError(f"input_ids must lie in [0, {vocab}); got values in [{ids.min()}, {ids.max()}]")
        return ids.astype(np.int64)                                     # [B,L] int64

    def embed(self, input_ids):
        """Token plus position embeddings: [B,L] int -> [B,L,D]."""
        ids = self.check_input_ids(input_ids)                           # [B,L]
        xp = backend.array_module(self.token_embedding)
        length = ids.shape[1]
        tokens = self.token_embedding[xp.asarray(ids)]                  # [V,D][B,L] -> [B,L,D]
        return tokens + self.position_embedding[None, :length]          # + [1,L,D] -> [B,L,D]

    def __call__(self, input_ids, output_hidden_states=False):
        # 1. embeddings
        h = self.embed(input_ids)                                       # [B,L] -> [B,L,D]
        hidden_states = [h]
        # 2. the transformer layers (causal self-attention + MLP); when only the last state is wanted, packed
        #    layers write each state into one scratch buffer of this thread (no fresh pages per layer)
        #    (or, one prompt per thread, all of them in one parallel call: kernels/clip_layer_rows.py)
        if self.runs_all_layers_by_prompt(h.shape[0]):
            states = self.layers_by_prompt(h, fresh=output_hidden_states)  # [B,L,D] -> [layers,B,L,D]
            hidden_states += list(states)
            h = states[-1]                                              # [B,L,D]
        else:
            reuse = not output_hidden_states and self.linear is PackedLinear
            state = aligned_scratch("clip hidden state", (h.shape[0] * h.shape[1], h.shape[2])) if reuse else None
            for layer in self.layers:
                h = layer(h, out=state)                                 # [B,L,D] -> [B,L,D]
                hidden_states.append(h)
        # 3. final layer norm
        last_hidden_state = self.final_layer_norm(h)                    # [B,L,D] -> [B,L,D]
        if output_hidden_states:
            return last_hidden_state, tuple(hidden_states)
        return last_hidden_state

    def runs_all_layers_by_prompt(self, batch):
        """Whether every layer runs in one parallel call, one prompt per thread (kernels/clip_layer_rows.py): packed
        layers with every bias, on a batch that divides among the threads."""
        return (self.linear is PackedLinear and len(self.layers) > 0 and runs_by_prompt(batch)
                and all(layer.has_every_bias() for layer in self.layers))

    def layers_by_prompt(self, h, fresh):
        """Every layer on h [B,L,D] in one parallel call -> their outputs [layers,B,L,D]: a new array when `fresh`
        (hidden states the caller keeps), else this thread's scratch (reused by the next call)."""
        batch, length, dim = h.shape
        shape = (len(self.layers), batch * length, dim)
        states = aligned_empty(shape) if fresh else aligned_scratch("clip hidden states", shape)  # [layers,M,D]
        first = self.layers[0]
        clip_layers_by_prompt(np.ascontiguousarray(h, dtype=np.float32).reshape(batch * length, dim), states, batch,
                              [layer.packed_weights() for layer in self.layers], first.mlp.activation_name,
                              first.self_attn.heads, first.self_attn.scale)  # [M,D] -> [layers,M,D]
        return states.reshape(len(self.layers), batch, length, dim)             # -> [layers,B,L,D]

    def add_token_embeddings(self, vectors):
        """Append rows [n,D] to the token embedding table (textual inversion) -> their new ids."""
        xp = backend.array_module(self.token_embedding)
        dim = self.token_embedding.shape[1]
        if getattr(vectors, "ndim", None) != 2 or vectors.shape[1] != dim or vectors.shape[0] == 0:
            raise NpdiffError(f"vectors must have shape [n,{dim}] with n >= 1; got "
                              f"{tuple(getattr(vectors, 'shape', ()))}")
        first_new_id = self.token_embedding.shape[0]
        rows = backend.to_device(vectors)                               # [n,D] float32, beside the table
        self.token_embedding = xp.concatenate([self.token_embedding, rows], axis=0)  # [V,D] -> [V+n,D]
        self.config["vocab_size"] = self.token_embedding.shape[0]
        return list(range(first_new_id, self.token_embedding.shape[0]))


class CLIPTextModelOutput:
    """What CLIPTextModelWithProjection returns, under transformers' names."""

    def __init__(self, text_embeds, last_hidden_state, hidden_states=None):
        self.text_embeds = text_embeds                  # [B,P]
        self.last_hidden_state = last_hidden_state      # [B,L,D]
        self.hidden_states = hidden_states              # num_hidden_layers + 1 arrays [B,L,D], or None


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIPTextModel plus the pooled, projected text embedding (SDXL's text_encoder_2, OpenCLIP ViT-bigG).

    input_ids [B,L] -> CLIPTextModelOutput(text_embeds [B,P], last_hidden_state [B,L,D],
    hidden_states: the embeddings and every layer's output, when output_hidden_states=True)."""

    def take_head_weights(self, weights):
        c = self.config
        if not isinstance(c["eos_token_id"], (int, np.integer)) or isinstance(c["eos_token_id"], bool):
            raise NpdiffError(f"config: eos_token_id must be one integer; got {c['eos_token_id']!r}")
        self.text_projection = self.linear(weights, "text_projection", c["hidden_size"], c["projection_dim"],
                                           bias=False)

    def end_positions(self, input_ids):
        """Each row's end-of-text position, found as transformers finds it: [B,L] -> [B]."""
        ids = self.check_input_ids(input_ids)                           # [B,L] int64
        if self.config["eos_token_id"] == LEGACY_EOS_TOKEN_ID:
            return np.argmax(ids, axis=1)                               # [B,L] -> [B] (first largest id)
        return np.argmax(ids == self.config["eos_token_id"], axis=1)    # [B,L] -> [B] (first end token, or 0)

    def __call__(self, input_ids, output_hidden_states=False):
        # 1. the text transformer (embeddings, layers, final layer norm)
        last_hidden_state, hidden_states = super().__call__(input_ids, output_hidden_states=True)  # [B,L,D]
        # 2. pool: the final-normed state at each row's end token
        xp = backend.array_module(last_hidden_state)
        rows = np.arange(last_hidden_state.shape[0])                    # [B]
        positions = self.end_positions(input_ids)                       # [B]
        pooled = last_hidden_state[xp.asarray(rows), xp.asarray(positions)]  # [B,L,D] -> [B,D]
        # 3. project
        text_embeds = self.text_projection(pooled)                      # [B,D] -> [B,P]
        return CLIPTextModelOutput(text_embeds, last_hidden_state, hidden_states if output_hidden_states else None)
