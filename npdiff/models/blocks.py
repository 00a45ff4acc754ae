"""Pieces the UNet and the VAE share: thin layers over named weights, ResnetBlock2D, Downsample2D,
Upsample2D and the sinusoidal timestep embedding.

Every class takes `(weights, prefix, ...sizes from the config)` and pulls its parameters with
`weights.take(prefix + ".name", expected_shape)`, so the checkpoint tree is the call tree: the object
built for "down_blocks.0.resnets.1" reads exactly the keys diffusers' module of that name holds.
The arithmetic itself lives in npdiff.kernels (reached through npdiff/models/precision.py, which runs a
layer's float32 weight or its bfloat16-packed one, precision="bf16"); this file only decides which op runs in which order
(the order is diffusers' own: models/resnet.py, downsampling.py, upsampling.py, embeddings.py).

Arrays are float32 NCHW like torch; `xp` (numpy or cupy) follows the input array.
"""

import math

import numpy as np

from npdiff import kernels
from npdiff.backend import array_module
from npdiff.errors import NpdiffError
from npdiff.models import precision


def child(prefix, name):
    """'down_blocks.0' + 'resnets' -> 'down_blocks.0.resnets' (an empty prefix adds nothing)."""
    return f"{prefix}.{name}" if prefix else name


# ---------------------------------------------------------------------------------------------
# Layers: one object per torch.nn module, holding its weights, calling one kernel.
# ---------------------------------------------------------------------------------------------
class Conv2d:
    """nn.Conv2d: weight [out,in,k,k], bias [out]; square kernel, same stride/padding on both axes."""

    def __init__(self, weights, prefix, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.key = prefix  # the module's diffusers name, e.g. "down_blocks.0.resnets.1.conv1" (LoRA finds it by it)
        self.weight = precision.take_layer_weight(weights, child(prefix, "weight"), shape, "conv")  # float32 or bf16
        self.bias = weights.take(child(prefix, "bias"), (out_channels,)) if bias else None
        self.stride = stride
        self.padding = padding

    def __call__(self, x):
        # [B,Cin,H,W] -> [B,Cout,H',W']
        return precision.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)


class Linear:
    """nn.Linear: weight [out,in], bias [out]; applied over the last axis.

    A 1x1 nn.Conv2d can be read as a Linear too (`from_conv1x1=True`): its weight [out,in,1,1] is
    reshaped once, here at load, to [out,in] (a view: no copy)."""

    def __init__(self, weights, prefix, in_features, out_features, bias=True, from_conv1x1=False):
        self.key = prefix  # the module's diffusers/transformers name (LoRA finds the layer by it)
        shape = (out_features, in_features)
        stored_shape = (out_features, in_features, 1, 1) if from_conv1x1 else shape
        self.weight = precision.take_layer_weight(weights, child(prefix, "weight"), shape, "linear",
                                                  stored_shape)  # [out,in] float32, or packed bf16
        self.bias = weights.take(child(prefix, "bias"), (out_features,)) if bias else None

    def __call__(self, x):
        # [..., in] -> [..., out]
        return precision.linear(x, self.weight, self.bias)


class GroupNorm:
    """nn.GroupNorm with affine weight/bias [C]; `silu=True` fuses the SiLU that follows it."""

    def __init__(self, weights, prefix, num_groups, num_channels, eps):
        if num_channels % num_groups != 0:
            raise NpdiffError(
                f"{prefix}: num_channels {num_channels} is not divisible by norm_num_groups {num_groups}")
        self.weight = weights.take(child(prefix, "weight"), (num_channels,))
        self.bias = weights.take(child(prefix, "bias"), (num_channels,))
        self.num_groups = num_groups
        self.eps = float(eps)

    def __call__(self, x, silu=False):
        # [B,C,H,W] -> [B,C,H,W]
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps, silu=silu)


class LayerNorm:
    """nn.LayerNorm over the last axis, weight/bias [D]."""

    def __init__(self, weights, prefix, dim, eps):
        self.weight = weights.take(child(prefix, "weight"), (dim,))
        self.bias = weights.take(child(prefix, "bias"), (dim,))
        self.eps = float(eps)

    def __call__(self, x):
        # [..., D] -> [..., D]
        return kernels.layer_norm(x, self.weight, self.bias, eps=self.eps)


def norm_silu_conv(norm, conv, x):
    """conv(SiLU(norm(x))) for a GroupNorm and the stride-1 Conv2d after it, as one kernel
    (kernels.group_norm_silu_conv2d: the normalised tensor is never written whole); with bf16-packed
    conv weights or a strided conv, the two steps."""
    if precision.is_packed(conv.weight) or conv.stride != 1:
        return conv(norm(x, silu=True))                                 # [B,Cin,H,W] -> [B,Cout,H',W']
    return kernels.group_norm_silu_conv2d(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                          conv.weight, conv.bias, conv.padding)  # [B,Cin,H,W] -> [B,Cout,H,W]


# ---------------------------------------------------------------------------------------------
# ResnetBlock2D (diffusers models/resnet.py, time_embedding_norm="default", pre-norm, SiLU)
# ---------------------------------------------------------------------------------------------
class ResnetBlock2D:
    """norm1 -> SiLU -> conv1 (+ time embedding) -> norm2 -> SiLU -> conv2, plus a shortcut.

    temb_channels=None builds the VAE's variant (no time_emb_proj). The shortcut is a 1x1
    conv_shortcut when the channel count changes, else the identity."""

    def __init__(self, weights, prefix, in_channels, out_channels, temb_channels, groups, eps,
                 output_scale_factor=1.0, groups_out=None):
        groups_out = groups if groups_out is None else groups_out
        self.norm1 = GroupNorm(weights, child(prefix, "norm1"), groups, in_channels, eps)
        self.conv1 = Conv2d(weights, child(prefix, "conv1"), in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            self.time_emb_proj = Linear(weights, child(prefix, "time_emb_proj"), temb_channels, out_channels)
        self.norm2 = GroupNorm(weights, child(prefix, "norm2"), groups_out, out_channels, eps)
        self.conv2 = Conv2d(weights, child(prefix, "conv2"), out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(weights, child(prefix, "conv_shortcut"), in_channels, out_channels, 1)
        self.output_scale_factor = float(output_scale_factor)

    def __call__(self, x, temb=None):
        # 1. norm1 + SiLU, then conv1 (one kernel: norm_silu_conv)
        h = norm_silu_conv(self.norm1, self.conv1, x)                   # [B,Cin,H,W] -> [B,Cout,H,W]
        # 2. add the projected time embedding, one value per (batch, channel)
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(kernels.silu(temb))                  # [B,T] -> [B,Cout]
            h += t[:, :, None, None]                                    # [B,Cout,H,W] + [B,Cout,1,1]
            del t
        # 3. norm2 + SiLU (dropout is the identity at inference), then conv2
        h = norm_silu_conv(self.norm2, self.conv2, h)                   # [B,Cout,H,W]
        # 4. shortcut and residual sum, divided by output_scale_factor as diffusers does
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x  # [B,Cout,H,W]
        h += shortcut                                                   # [B,Cout,H,W]
        if self.output_scale_factor != 1.0:
            h /= self.output_scale_factor
        return h


# ---------------------------------------------------------------------------------------------
# Resampling (diffusers models/downsampling.py Downsample2D, upsampling.py Upsample2D; use_conv=True)
# ---------------------------------------------------------------------------------------------
class Downsample2D:
    """3x3 conv with stride 2, key "<prefix>.conv".

    padding=1 (the UNet) pads each side by one; padding=0 (the VAE encoder) pads only the bottom
    and right edges by one, then convolves without padding, as diffusers does."""

    def __init__(self, weights, prefix, channels, out_channels=None, padding=1):
        out_channels = channels if out_channels is None else out_channels
        self.conv = Conv2d(weights, child(prefix, "conv"), channels, out_channels, 3, stride=2, padding=padding)
        self.pad_bottom_right = padding == 0

    def __call__(self, x):
        if self.pad_bottom_right:
            xp = array_module(x)
            x = xp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))             # [B,C,H,W] -> [B,C,H+1,W+1]
        return self.conv(x)                                             # [B,C,H,W] -> [B,Cout,H/2,W/2]


class Upsample2D:
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (key "<prefix>.conv")."""

    def __init__(self, weights, prefix, channels, out_channels=None):
        out_channels = channels if out_channels is None else out_channels
        self.conv = Conv2d(weights, child(prefix, "conv"), channels, out_channels, 3, padding=1)

    def __call__(self, x):
        if precision.is_packed(self.conv.weight):  # bf16: the two steps
            h = kernels.upsample_nearest2x(x)                           # [B,C,H,W] -> [B,C,2H,2W]
            return self.conv(h)                                         # [B,C,2H,2W] -> [B,Cout,2H,2W]
        # one kernel: the conv reads the upsampled picture from x, never made whole
        return kernels.upsample_nearest2x_conv2d(x, self.conv.weight, self.conv.bias, self.conv.padding)


# ---------------------------------------------------------------------------------------------
# Timestep embedding (diffusers embeddings.py get_timestep_embedding, Timesteps, TimestepEmbedding)
# ---------------------------------------------------------------------------------------------
def timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """Sinusoidal embedding of timesteps [B] -> [B,dim], in float32 in torch's order of operations.

    freqs[i] = exp(-ln(max_period) * i / (dim/2 - freq_shift)); the embedding is
    [sin(t*freqs), cos(t*freqs)], or [cos, sin] with flip_sin_to_cos. The exponent and t*freqs are
    float32 products as in torch; exp, sin and cos are evaluated in float64 and rounded to float32
    (correctly rounded, which is what torch's float32 versions give almost always; NumPy's own
    float32 exp differs from torch's in the last bit for about a third of the frequencies, and at
    t ~ 1000 one bit of a frequency moves sin by ~1e-4). Computed with NumPy on the host (it is
    [B,dim], tiny) and moved to the input's backend by the caller."""
    timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1:
        raise NpdiffError(f"timesteps must be a 1-d array [B]; got shape {timesteps.shape}")
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)   # [half]
    exponent = exponent / np.float32(half - freq_shift)                                 # [half]
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)                      # [half]
    args = timesteps.astype(np.float32)[:, None] * freqs[None, :]                       # [B,1]*[1,half] -> [B,half]
    sin = np.sin(args.astype(np.float64)).astype(np.float32)                            # [B,half]
    cos = np.cos(args.astype(np.float64)).astype(np.float32)                            # [B,half]
    if flip_sin_to_cos:
        emb = np.concatenate([cos, sin], axis=-1)                                       # [B,2*half]
    else:
        emb = np.concatenate([sin, cos], axis=-1)                                       # [B,2*half]
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))                                             # [B,dim]
    return emb.astype(np.float32)


def guidance_scale_embedding(w, embedding_dim):
    """Sinusoidal embedding of guidance values w [B] -> [B,embedding_dim] (diffusers' pipelines'
    get_guidance_scale_embedding, for LCM-distilled UNets: w = guidance_scale - 1).

    [sin(1000 w f_i), cos(1000 w f_i)] with f_i = exp(-i ln(10000) / (half - 1)), float32 products as in
    torch; exp/sin/cos evaluated in float64 and rounded, as timestep_embedding does. torch's float32 exp
    is one ulp off that for a few f_i, and 1000 w (~1e4) scales it up: ~1e-4 relative at w ~ 15."""
    w = np.asarray(w, dtype=np.float32).reshape(-1) * np.float32(1000.0)                 # [B]
    half = embedding_dim // 2
    step = np.float32(np.float32(math.log(10000.0)) / np.float32(half - 1))
    freqs = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(np.float32)  # [half]
    args = w[:, None] * freqs[None, :]                                                  # [B,1]*[1,half] -> [B,half]
    emb = np.concatenate([np.sin(args.astype(np.float64)), np.cos(args.astype(np.float64))], axis=1)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))                                             # [B,dim]
    return emb.astype(np.float32)                                                       # [B,dim]


class TimestepEmbedding:
    """linear_1 -> SiLU -> linear_2 (keys "<prefix>.linear_1", "<prefix>.linear_2").

    With cond_proj_dim (LCM-distilled UNets) a bias-free "<prefix>.cond_proj" [in_channels, cond_proj_dim]
    adds a projected condition (the guidance embedding) to the sinusoidal features first."""

    def __init__(self, weights, prefix, in_channels, time_embed_dim, cond_proj_dim=None):
        self.linear_1 = Linear(weights, child(prefix, "linear_1"), in_channels, time_embed_dim)
        self.linear_2 = Linear(weights, child(prefix, "linear_2"), time_embed_dim, time_embed_dim)
        self.cond_proj = None
        if cond_proj_dim is not None:
            self.cond_proj = Linear(weights, child(prefix, "cond_proj"), cond_proj_dim, in_channels, bias=False)

    def __call__(self, t_emb, condition=None):
        if condition is not None:
            t_emb = t_emb + self.cond_proj(condition)                   # [B,Cin] + ([B,Dc] -> [B,Cin])
        h = self.linear_1(t_emb)                                        # [B,Cin] -> [B,T]
        h = kernels.silu(h)                                             # [B,T]
        return self.linear_2(h)                                         # [B,T] -> [B,T]
