"""Backward of the layers and blocks of blocks.py: Conv2d, Linear, GroupNorm, ResnetBlock2D,
Downsample2D, Upsample2D, the sinusoidal timestep embedding and TimestepEmbedding.

Every function takes the forward's module object (the same weights, the same checkpoint names) and
the block's INPUT, recomputes what its backward needs from that input (recompute per block: the
caller keeps only block inputs), and returns the gradient with respect to that input. Weights are
frozen here (textual inversion): no weight gradients, except the Linear layers' when the caller
passes a `weight_grads` dict (keyed by the layer's diffusers name; LoRA trains those).

Order of steps: the forward's (blocks.py) numbered steps, walked backwards.
"""

import math

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.kernels.activations import silu
from npdiff.kernels.activations_backward import silu_backward
from npdiff.kernels.block_pool import matmul
from npdiff.kernels.conv_backward import conv2d_input_grad
from npdiff.kernels.linear_backward import linear_backward
from npdiff.kernels.norm_backward import group_norm_backward
from npdiff.kernels.resample import upsample_nearest2x_backward
from npdiff.models import precision


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------
def add_weight_grad(weight_grads, key, grad_weight, grad_bias):
    """Sum a layer's weight/bias gradients into weight_grads[key] (a layer used twice adds up)."""
    entry = weight_grads.setdefault(key, {})
    for name, grad in (("weight", grad_weight), ("bias", grad_bias)):
        if grad is not None:
            entry[name] = entry[name] + grad if name in entry else grad


def linear_layer_backward(layer, x, grad_out, weight_grads=None):
    """Linear layer: x [..., in] (the forward's input), grad_out [..., out] -> dx [..., in]; with
    weight_grads, also d weight [out, in] (and d bias) into weight_grads[layer.key]. weight_grads may
    instead be an object with its own linear_backward(layer, x, grad_out) -> dx, which then takes the
    layer's backward over (LoRA's factor gradients: npdiff/training/lora_grad.py)."""
    if hasattr(weight_grads, "linear_backward"):
        return weight_grads.linear_backward(layer, x, grad_out)
    need = weight_grads is not None
    grad_x, grad_weight, grad_bias = linear_backward(x, layer.weight, grad_out, need)
    if need:
        add_weight_grad(weight_grads, layer.key, grad_weight, grad_bias if layer.bias is not None else None)
    return grad_x


def conv_layer_backward(layer, x_shape, grad_out, input_channels=None):
    """Conv2d layer (weights frozen): dy [B,Cout,H',W'] -> dx [B,Cin,H,W]; only x's shape is needed.
    input_channels: dx of the leading input channels only, [B,input_channels,H,W]."""
    return conv2d_input_grad(x_shape, layer.weight, grad_out, (layer.stride,) * 2, (layer.padding,) * 2, frozen=True,
                             input_channels=input_channels)


def group_norm_layer_backward(layer, x, grad_out, silu_after=False, residual=None):
    """GroupNorm layer (+ the SiLU fused after it): x [B,C,H,W] its input -> dx [B,C,H,W], plus
    residual (a residual branch's gradient [B,C,H,W]) when given, added in the kernel's pass.
    grad_out with fewer channels than x (whole groups: C' = k * C / groups): dx of x's first C'
    channels only (the groups are independent: each one's statistics read its own channels)."""
    channels, weight, bias, groups = x.shape[1], layer.weight, layer.bias, layer.num_groups
    wanted = grad_out.shape[1]
    if wanted != channels:
        per_group = channels // groups
        if wanted % per_group:
            raise NpdiffError(f"group_norm_layer_backward: {wanted} channels of {channels} are not whole groups "
                              f"of {per_group}")
        x = np.ascontiguousarray(x[:, :wanted])                         # [B,C',H,W]
        groups = wanted // per_group
        weight = None if weight is None else weight[:wanted]            # [C']
        bias = None if bias is None else bias[:wanted]                  # [C']
    grad_x, _, _ = group_norm_backward(x, groups, weight, bias, grad_out, layer.eps, silu_after,
                                       need_weight_grad=False, residual=residual)  # frozen
    return grad_x


# ---------------------------------------------------------------------------------------------
# ResnetBlock2D
# ---------------------------------------------------------------------------------------------
def resnet_norm2_input(block, x, temb):
    """ResnetBlock2D's steps 1-2: conv1(norm1+SiLU(x)) plus the projected time embedding, the input of
    norm2 [B,Cout,H,W] (what the backward needs besides x). At batch 1 (training) the time embedding,
    one value per channel, joins conv1's bias (added inside the conv's tiles, in cache), instead of a
    one-thread NumPy add over [1,Cout,H,W] after it."""
    normed = block.norm1(x, silu=True)                                  # [B,Cin,H,W]
    if block.time_emb_proj is None or temb is None:
        return block.conv1(normed)                                      # [B,Cin,H,W] -> [B,Cout,H,W]
    time_bias = block.time_emb_proj(silu(temb))                         # [B,T] -> [B,Cout]
    conv = block.conv1
    if x.shape[0] == 1:
        bias = time_bias[0] if conv.bias is None else conv.bias + time_bias[0]  # [Cout]
        return precision.conv2d(normed, conv.weight, bias, stride=conv.stride, padding=conv.padding)
    h = conv(normed)                                                    # [B,Cin,H,W] -> [B,Cout,H,W]
    h += time_bias[:, :, None, None]                                    # [B,Cout,H,W] + [B,Cout,1,1]
    return h


def resnet_forward_saved(block, x, temb):
    """ResnetBlock2D's forward (blocks.py, the same steps) -> (out [B,Cout,H,W], norm2's input
    [B,Cout,H,W]): the tape keeps the latter so that resnet_backward need not rerun conv1."""
    h = resnet_norm2_input(block, x, temb)                              # steps 1-2
    out = block.conv2(block.norm2(h, silu=True))                        # 3. [B,Cout,H,W]
    if block.conv_shortcut is not None:                                 # 4. [B,Cout,H,W]
        out = shortcut_plus(block.conv_shortcut, x, out)
    else:
        out += x
    if block.output_scale_factor != 1.0:
        out /= block.output_scale_factor
    return out, h


def shortcut_plus(shortcut, x, residual):
    """conv_shortcut(x) + residual [B,Cout,H,W] for a 1x1 Conv2d: with a float32 NumPy weight, W x per
    image on the block pool (block_pool.matmul, as conv.py's 1x1 GEMM), its blocks adding the bias and
    the residual in cache instead of a one-thread add over [B,Cout,H,W] after the conv; else the conv,
    then the add."""
    weight = shortcut.weight
    if not (isinstance(weight, np.ndarray) and isinstance(x, np.ndarray) and weight.shape[2:] == (1, 1)
            and shortcut.stride == 1 and shortcut.padding == 0):
        residual += shortcut(x)
        return residual
    batch, channels, height, width = x.shape
    pixels = np.ascontiguousarray(x).reshape(batch, channels, height * width)  # [B,Cin,H*W]
    weight_2d = weight.reshape(weight.shape[0], channels)              # [Cout,Cin] (a view)
    bias = None if shortcut.bias is None else shortcut.bias[:, None]    # [Cout,1]: one value per row
    summed = np.ascontiguousarray(residual).reshape(batch, weight.shape[0], height * width)  # [B,Cout,H*W]
    out = np.empty_like(summed)                                         # [B,Cout,H*W]
    for image in range(batch):
        matmul(weight_2d, pixels[image], out=out[image], bias=bias, residual=summed[image])  # [Cout,Cin] @ [Cin,H*W]
    return out.reshape(residual.shape)                                  # [B,Cout,H,W]


def resnet_backward(block, x, temb, grad_out, norm2_input=None, input_channels=None):
    """ResnetBlock2D: x [B,Cin,H,W] its input, temb [B,T], grad_out [B,Cout,H,W] -> dx [B,Cin,H,W]
    (the time embedding is not differentiated: it depends on the timestep only). norm2_input: the
    forward's (resnet_forward_saved), else recomputed from x. input_channels: dx of x's leading
    channels only, [B,input_channels,H,W] (whole groups of norm1; the UNet tape's concatenation
    whose skip needs no gradient)."""
    if input_channels is not None and input_channels % (x.shape[1] // block.norm1.num_groups):
        whole = resnet_backward(block, x, temb, grad_out, norm2_input)  # not whole groups: all, then the slice
        return np.ascontiguousarray(whole[:, :input_channels])          # [B,input_channels,H,W]
    # recompute, unless kept: the input of norm2 (conv1's output plus the time embedding)
    h = resnet_norm2_input(block, x, temb) if norm2_input is None else norm2_input  # [B,Cout,H,W]
    # 4. residual sum and output_scale_factor
    if block.output_scale_factor != 1.0:
        grad_out = grad_out / np.float32(block.output_scale_factor)     # [B,Cout,H,W]
    if block.conv_shortcut is not None:
        grad_skip = conv_layer_backward(block.conv_shortcut, x.shape, grad_out, input_channels)  # [B,Cout,H,W] -> [B,Cin,H,W]
    elif input_channels is not None:
        grad_skip = np.ascontiguousarray(grad_out[:, :input_channels])  # [B,c,H,W] (added in step 1)
    else:
        grad_skip = grad_out                                            # [B,C,H,W] (added in step 1)
    # 3. conv2, then norm2 + SiLU
    grad_h = conv_layer_backward(block.conv2, h.shape, grad_out)        # [B,Cout,H,W]
    grad_h = group_norm_layer_backward(block.norm2, h, grad_h, silu_after=True)  # [B,Cout,H,W]
    del h
    # 2. the time embedding is added per channel: nothing flows back to x through it
    # 1. conv1, then norm1 + SiLU
    grad_h = conv_layer_backward(block.conv1, x.shape[:1] + (block.conv1.weight.shape[1],) + x.shape[2:], grad_h,
                                 input_channels)                        # [B,Cin or input_channels,H,W]
    return group_norm_layer_backward(block.norm1, x, grad_h, silu_after=True, residual=grad_skip)  # [B,Cin,H,W]


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------
def downsample_backward(block, x_shape, grad_out):
    """Downsample2D: dy [B,C,H/2,W/2] -> dx [B,C,H,W] (its stride-2 conv; x's shape only)."""
    if block.pad_bottom_right:
        padded_shape = x_shape[:2] + (x_shape[2] + 1, x_shape[3] + 1)   # the VAE's extra bottom/right row
        grad_x = conv_layer_backward(block.conv, padded_shape, grad_out)  # [B,C,H+1,W+1]
        return np.ascontiguousarray(grad_x[:, :, :-1, :-1])             # [B,C,H,W]
    return conv_layer_backward(block.conv, x_shape, grad_out)           # [B,C,H,W]


def upsample_backward(block, x_shape, grad_out):
    """Upsample2D: dy [B,Cout,2H,2W] -> dx [B,C,H,W] (conv, then the nearest 2x copy, backwards)."""
    upsampled_shape = x_shape[:2] + (2 * x_shape[2], 2 * x_shape[3])
    grad_up = conv_layer_backward(block.conv, upsampled_shape, grad_out)  # [B,C,2H,2W]
    return upsample_nearest2x_backward(grad_up)                         # [B,C,2H,2W] -> [B,C,H,W]



# ---------------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------------
def timestep_embedding_backward(timesteps, dim, flip_sin_to_cos, freq_shift, grad_emb, max_period=10000):
    """Gradient of blocks.timestep_embedding with respect to the timesteps [B]: grad_emb [B,dim] -> [B].

    With a = t * f_i: d sin(a)/dt = f_i cos(a), d cos(a)/dt = -f_i sin(a). The frequencies and the
    products a are the forward's float32 ones (torch's autograd differentiates those same roundings)."""
    timesteps = np.asarray(timesteps, dtype=np.float32)                 # [B]
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)  # [half]
    exponent = exponent / np.float32(half - freq_shift)                 # [half]
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)      # [half], as the forward's
    args = (timesteps[:, None] * freqs[None, :]).astype(np.float64)     # [B,half], float32 products
    first, second = grad_emb[:, :half].astype(np.float64), grad_emb[:, half:2 * half].astype(np.float64)
    grad_sin, grad_cos = (second, first) if flip_sin_to_cos else (first, second)  # [B,half] each
    grad_args = grad_sin * np.cos(args) - grad_cos * np.sin(args)       # [B,half]
    return (grad_args * freqs).sum(axis=1).astype(np.float32)           # [B]


def timestep_mlp_backward(module, t_emb, grad_out, weight_grads=None):
    """TimestepEmbedding (linear_1 -> SiLU -> linear_2), without cond_proj: t_emb [B,Cin] its
    input, grad_out [B,T] -> d t_emb [B,Cin] (weight gradients into weight_grads when given)."""
    hidden = module.linear_1(t_emb)                                     # [B,Cin] -> [B,T] (recomputed)
    grad_act = linear_layer_backward(module.linear_2, silu(hidden), grad_out, weight_grads)  # [B,T]
    grad_hidden = silu_backward(hidden, grad_act)                       # [B,T]
    return linear_layer_backward(module.linear_1, t_emb, grad_hidden, weight_grads)  # [B,Cin]
