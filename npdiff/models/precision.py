"""The precisions a model's layers run in (fp32, bf16, bf16x3, mixed), and the one place that tells them apart.

    weight = take_layer_weight(weights, "conv_in.weight", (320, 4, 3, 3), "conv")  # float32, or packed bf16
    y = conv2d(x, weight, bias, stride=1, padding=1)    # the float32 kernel, or the bfloat16 one
    y = linear(x, weight, bias)                         # the same for a Linear ([out,in] weight)

precision="fp32" (the default): a layer's weight is the float32 array Weights.take returns (a read-only view
of the file's memory map) and npdiff.kernels runs it.

precision="bf16" (`from_pretrained(..., precision="bf16")`, which sets Weights.precision): every Linear and
Conv2d weight is packed into bfloat16 at load (npdiff.kernels.matmul_bf16 / conv_bf16: about half of
float32's bytes), one tensor at a time, straight from the file's values (a float16 or bfloat16 file's tensor widened
to float32 alone, then packed: the whole model is never widened). Their GEMMs and convolutions multiply
bfloat16 inputs and weights and sum in float32 (AMX tiles, else AVX-512 BF16's VDPBF16PS). Everything
else stays float32: biases, norms, softmax, the embeddings, the scheduler. The attention of the UNet's and the
VAE's blocks (npdiff/models/transformer.py: attend) runs in bf16 too where AMX tiles run (q, k, v and the
probabilities rounded to bf16, float32 sums: kernels/attention/amx.py), in float32 elsewhere. A CPU without AVX512_BF16 runs the kernels' NumPy
reference instead (the same rounding; the products summed by NumPy's float32 GEMM, slowly, and the weights
kept as rounded float32, so without the memory saving) after a one-line note.

The packed weights are written once into a cache file and mapped read-only from it (packed_cache.py): file-
backed pages that a pipeline releases after each stage like a float32 file's, and a second load that maps
instead of packing. NPDIFF_BF16_CACHE=0 keeps them in private memory instead.

precision="bf16x3": every Linear weight (and the 1x1 convolutions read as Linear) is split at load into bf16
hi + lo and packed for the AMX tiles (npdiff.kernels.matmul_bf16x3: float32's 4 bytes a weight); each GEMM
multiplies x_lo W_hi + x_hi W_lo + x_hi W_hi in one AMX GEMM of triple depth, within a few 1e-6 of float32.
Conv2d weights stay float32 and run float32's kernels (Winograd), as does everything that is not a Linear.
A CPU without usable AMX tiles keeps the float32 Linear weights and runs float32 (after a one-line note).

precision="mixed": float32's picture class at most of bf16's speed. Each layer belongs to an op family
(layer_family, from its weight's name; FAMILIES below): a UNet's or ControlNet's layers of the families in
BF16_FAMILIES["mixed"] are packed and run as at "bf16" (and its attention too when "attention" is one of them),
every other layer stays float32 as at "fp32", and so does every layer of the text encoders and the VAE (family
"other"). At "mixed": the transformer blocks' Linear layers, GEGLU and attention in bf16; convolutions, the
small layers, the text encoders and the VAE float32 (BF16_FAMILIES says why: measured).

Which kernel runs follows the weight's type, not a flag: a LoRA fused into a bf16 layer re-packs the fused
weight (npdiff/lora.py), and unloading puts the packed original back, so a layer never holds the other kind.
"""

import warnings

import numpy as np

from npdiff import backend, kernels
from npdiff.backend import array_module
from npdiff.errors import NpdiffError
from npdiff.kernels.bf16_rounding import PackedBf16, bf16_kernel, cpu_has_avx512_bf16
from npdiff.kernels.conv_bf16 import PackedBf16Conv, conv2d_bf16, pack_conv_bf16
from npdiff.kernels.matmul_bf16 import (
    PackedBf16Weight,
    geglu_bf16,
    linear_activation_bf16,
    linear_bf16,
    pack_linear_bf16,
)
from npdiff.kernels.matmul_bf16x3 import PackedBf16x3Weight, pack_linear_bf16x3
from npdiff.loading.resident import release_array_pages
from npdiff.models import packed_cache

_noted_slow_cpu = []  # one entry once the note about a CPU without AVX512_BF16 was given
_noted_no_amx = []  # one entry once the note about bf16x3 without AMX was given

# The op families of a network, as layer_family() and attention_family() name them:
#   conv       the UNet's (and ControlNet's) resnets' 3x3 convolutions and the down/upsamplers' convolutions
#   attention  softmax(q k^T) v of the UNet's transformer blocks (bf16: q, k, v and the probabilities rounded)
#   linear     the transformer blocks' to_q/to_k/to_v/to_out.0 and ff.net.2
#   geglu      the transformer blocks' ff.net.0.proj with its gate (x * gelu(gate))
#   small      the rest of a UNet/ControlNet: conv_in, conv_out, conv_shortcut, proj_in/out, time_emb_proj,
#              time_embedding, add_embedding, the ControlNet's conditioning embedding and zero convolutions
#   other      every layer of a network that is not a UNet or a ControlNet: the text encoders, the VAE
FAMILIES = ("conv", "attention", "linear", "geglu", "small", "other")
# which families each precision runs in bfloat16 (every other family float32); bf16x3 is its own scheme
BF16_FAMILIES = {
    "fp32": frozenset(),
    "bf16": frozenset(FAMILIES),
    "bf16x3": frozenset(),
    # measured on the 1024x1024 SDXL job against diffusers float32 (benchmarks/sdxl_precision_mix.py, RESULTS.md
    # "SDXL", text encoders and VAE float32): the whole UNet bf16 left the picture 3 levels away (135 values > 2);
    # float32 convolutions alone 3 (1 value), float32 "small" layers alone 3 (4 values), both together 1 level (0
    # values > 2; latents 2.1e-3 from diffusers', bf16's 7.7e-3). They are the cheap ones (convolutions: 7.5 s of
    # the float32 SDXL UNet call's 56 s); the transformer matmuls and the attention, most of it, keep bf16's speed.
    "mixed": frozenset({"attention", "linear", "geglu"}),
}
# the first part of a UNet's or ControlNet's weight names (a VAE's start with encoder./decoder./quant_conv,
# a text encoder's with text_model. or encoder.layers: none of these)
UNET_KEY_STARTS = ("conv_in.", "time_embedding.", "add_embedding.", "class_embedding.", "encoder_hid_proj.",
                   "down_blocks.", "mid_block.", "up_blocks.", "conv_norm_out.", "conv_out.", "controlnet_")


def is_packed(weight):
    """True for a bfloat16-packed layer weight (PackedBf16Weight or PackedBf16Conv)."""
    return isinstance(weight, PackedBf16)


def note_cpu_without_bf16():
    """Once per process: a one-line RuntimeWarning when this CPU lacks AVX512_BF16 (the reference path runs)."""
    if not _noted_slow_cpu and not cpu_has_avx512_bf16():
        _noted_slow_cpu.append(True)
        warnings.warn("npdiff: this CPU has no AVX512_BF16; precision='bf16' runs the NumPy reference kernels "
                      "(the same results, much slower than precision='fp32')", RuntimeWarning, stacklevel=3)


def note_cpu_without_amx():
    """Once per process: a one-line RuntimeWarning when precision='bf16x3' finds no usable AMX tiles."""
    if not _noted_no_amx and bf16_kernel() != "amx":
        _noted_no_amx.append(True)
        warnings.warn("npdiff: no usable AMX tiles on this CPU; precision='bf16x3' runs float32's kernels "
                      "(the same accuracy, float32's speed)", RuntimeWarning, stacklevel=3)


def pack_like(weight, values):
    """float32 `values` in the kind of `weight`: packed bf16 again (a LoRA-fused weight of a bf16 layer),
    or the float32 array itself."""
    if isinstance(weight, PackedBf16Conv):
        return pack_conv_bf16(values)                               # [out,in,k,k] float32 -> packed bf16
    if isinstance(weight, PackedBf16x3Weight):
        return pack_linear_bf16x3(values)                           # [out,in] float32 -> packed bf16 hi + lo
    if isinstance(weight, PackedBf16Weight):
        return pack_linear_bf16(values)                             # [out,in] float32 -> packed bf16
    return values


def float32_values(weight):
    """A layer weight as float32 values of its shape: a packed weight's bf16 values exactly (which may be
    the packed object's own array: read it, never write into it), or the float32 array itself."""
    return weight.to_float32() if is_packed(weight) else weight


def take_layer_weight(weights, key, shape, kind, stored_shape=None):
    """The weight of a Linear (kind "linear", [out,in]) or Conv2d ("conv", [out,in,k,k]) layer, in the
    precision of `weights`: the float32 array Weights.take returns, or at "bf16" that array packed (from the
    packed-weight cache file when it holds it, packed_cache.py; else packed now and written there); at
    "bf16x3" a Linear's packed as bf16 hi + lo (not cached), a Conv2d's kept float32.

    stored_shape: the shape to check against the file when it differs from `shape` (a 1x1 convolution's
    [out,in,1,1] read as a Linear's [out,in])."""
    stored_shape = shape if stored_shape is None else stored_shape
    in_bf16 = runs_bf16(weights, layer_family(key, kind))
    store = packed_cache.store_for(weights) if in_bf16 and backend.name() == "numpy" else None
    if store is not None and store.reading:
        weights.claim(key, stored_shape)  # the shape checked and the key counted as used, nothing read
        cached = store.get(key, kind, shape)  # packed from these very file bytes (checked for NaN/Inf then)
        if cached is not None:
            return cached
    values = weights.take(key, stored_shape).reshape(shape)           # float32 (one tensor only)
    if weights.precision == "bf16x3" and kind == "linear":
        return _take_bf16x3(key, values)                            # [out,in] float32 -> packed bf16 hi + lo
    if not in_bf16:
        return values
    if array_module(values) is not np:
        raise NpdiffError(f"precision={weights.precision!r} runs on the CPU (NumPy backend) only; key '{key}' is "
                          "on the GPU")
    note_cpu_without_bf16()
    packed = pack_linear_bf16(values) if kind == "linear" else pack_conv_bf16(values)  # float32 -> bf16, packed
    # packing paged the file's float32 tensor in again: drop those pages now, not when the whole model is built
    # (check_all_used), so loading an SDXL UNet at bf16 peaks at the packed weights plus one tensor, not plus the
    # 10 GB float32 file (a no-op for widened half files and other private arrays)
    release_array_pages([values])
    return packed if store is None else store.put(key, kind, packed)  # into the cache file: file-backed pages


def _take_bf16x3(key, values):
    """A Linear's float32 weight [out,in] split and packed for bf16x3 (take_layer_weight at "bf16x3")."""
    if array_module(values) is not np:
        raise NpdiffError(f"precision='bf16x3' runs on the CPU (NumPy backend) only; key '{key}' is on the GPU")
    note_cpu_without_amx()
    packed = pack_linear_bf16x3(values)                             # [out,in] float32 -> [W_hi ; W_lo] packed
    if packed.layout != "float32":  # the float32 layout keeps `values` itself: its pages stay in use
        release_array_pages([values])                               # as at bf16: the file's pages go now
    return packed


def layer_family(key, kind):
    """The op family (FAMILIES) of the Linear ("linear") or Conv2d ("conv") layer whose weight is `key`."""
    if not key.startswith(UNET_KEY_STARTS):
        return "other"
    module = key.removesuffix(".weight")
    if module.endswith(".ff.net.0.proj"):
        return "geglu"
    in_attention = ".attn1." in module or ".attn2." in module
    if module.endswith(".ff.net.2") or (in_attention and module.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))):
        return "linear"
    resnet_conv = ".resnets." in module and module.endswith((".conv1", ".conv2"))
    resample_conv = module.endswith((".downsamplers.0.conv", ".upsamplers.0.conv"))
    if kind == "conv" and (resnet_conv or resample_conv):
        return "conv"
    return "small"


def attention_family(prefix):
    """The op family of the attention (softmax(q k^T) v) of the attention module named `prefix`."""
    return "attention" if prefix.startswith(UNET_KEY_STARTS) else "other"


def runs_bf16(weights, family):
    """True when the model built from `weights` runs op family `family` in bfloat16 (its precision's choice)."""
    return family in BF16_FAMILIES[weights.precision]


def keeps_float32(weights, family):
    """True when the layers of `family` hold plain float32 arrays in the model built from `weights` (neither
    packed bf16 nor, at "bf16x3", a Linear's packed hi + lo pair)."""
    return weights.precision != "bf16x3" and not runs_bf16(weights, family)


def linear(x, weight, bias=None):
    """x [..., in] -> [..., out] with weight [out,in]: float32 or packed bf16."""
    if isinstance(weight, PackedBf16Weight):
        return linear_bf16(x, weight, bias)                         # [..., in] -> [..., out]
    return kernels.linear(x, weight, bias)                          # [..., in] -> [..., out]


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """x [B,Cin,H,W] -> [B,Cout,H',W'] with weight [Cout,Cin,k,k]: float32 or packed bf16."""
    if isinstance(weight, PackedBf16Conv):
        return conv2d_bf16(x, weight, bias, stride, padding)        # [B,Cin,H,W] -> [B,Cout,H',W']
    return kernels.conv2d(x, weight, bias, stride=stride, padding=padding)


def geglu(x, weight, bias=None):
    """GEGLU: [..., D] -> [..., I] with weight [2I, D] (the value half first, then the gate)."""
    if isinstance(weight, PackedBf16Weight):
        return geglu_bf16(x, weight, bias)                          # [..., D] -> [..., I]
    return kernels.geglu(x, weight, bias)                           # [..., D] -> [..., I]


def linear_activation(x, weight, bias, activation):
    """activation(x @ weight^T + bias): [..., in] -> [..., out]; activation named as kernels.linear_activation
    names it ("quick_gelu", "gelu", "gelu_tanh")."""
    if isinstance(weight, PackedBf16Weight):
        return linear_activation_bf16(x, weight, bias, activation)  # [..., in] -> [..., out]
    return kernels.linear_activation(x, weight, bias, activation)   # [..., in] -> [..., out]
