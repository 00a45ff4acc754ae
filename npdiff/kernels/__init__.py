"""The kernels of Stable Diffusion, float32, NCHW like torch. One op family per file:

    conv.py         conv2d (1x1 GEMM; im2col tiles through OpenBLAS sgemm; direct loops)
    conv_fused.py   group_norm_silu_conv2d, upsample_nearest2x_conv2d: the step before a 3x3 conv folded
                    into its Winograd input transform (the tensor in between never made)
    conv_winograd.py  Winograd F(2x2,3x3) / F(4x4,3x3) / F(6x6,3x3) for conv2d's 3x3 stride-1 convs
                      (F(4,3)'s and F(6,3)'s transforms written out: conv_winograd4.py, conv_winograd6.py)
    norm.py         group_norm (optionally fused with SiLU), layer_norm
    softmax.py      softmax (and the Numba row pieces attention's passes use)
    attention/      scaled_dot_product_attention: four versions, listed in attention/__init__.py
    activations.py  silu, gelu (erf or tanh), quick_gelu
    linear.py       linear (torch weight layout [out, in]), linear_activation, geglu (diffusers' GEGLU)
    resample.py     upsample_nearest2x, resize (torch's interpolate to a size)
    matmul.py       the matrix-multiplication progression (teaching; models use np.matmul)
    matmul_bf16.py  bfloat16 linear / linear_activation / geglu: operands rounded to bf16, float32 sums,
                    on AMX tiles (matmul_amx.py, amx_intrinsics.py) or AVX-512 BF16's vdpbf16ps
                    (matmul_dpbf16.py, bf16_intrinsics.py); weights packed once at load (bf16_rounding.py: rounding,
                    which kernel runs here)
    conv_bf16.py    conv2d in bfloat16: the image unfolded by tiles into the same bf16 GEMMs, or on AMX
                    an implicit GEMM straight from the image's bf16 pair words (conv_bf16_amx.py)
    matmul_bf16x3.py  linear layers at float32's accuracy as three bf16 products (x and W split into
                    bf16 hi + lo) in one AMX GEMM of triple depth (precision="bf16x3")

Backward (training): beside each forward, `<family>_backward.py` (attention/backward.py), each with
a `*_backward_ref` and a fast version, checked against torch.autograd:
    linear_backward.py  linear, linear_activation, geglu    activations_backward.py  silu, gelu, quick_gelu
    norm_backward.py    layer_norm, group_norm (+ SiLU)     attention/backward.py    attention (recomputes P)
    conv_backward.py    conv2d (dx through conv2d's own paths, Winograd included; dW by im2col tiles)
    resample.py         upsample_nearest2x_backward (its Backward section)

And what they share:
    dispatch.py     which version runs on which array (cupy -> CUDA, NumPy -> fast, else reference)
    block_pool.py   the block-parallel pool: worker threads for kernels that split their own work
    scratch.py      scratch arrays per thread, reused from call to call (tiles, copies of strided inputs)
    validate.py     input checks; vecmath.py: vectorisable exp/sigmoid/erfc for Numba loops
    cuda/           the CUDA versions, for cupy arrays

Each family file holds the NumPy-API reference (`*_ref`, also runs on cupy arrays) beside the fast
version (`*_fast`: Numba, or BLAS through NumPy), with versions numbered in its header. Every kernel
checks its inputs and raises npdiff.NpdiffError naming the argument and the expected vs actual
shape/dtype. Importing this package imports numba, but nothing is compiled until a kernel is first
called.
"""

from npdiff.kernels.activations import gelu, quick_gelu, silu

# the backward kernels
from npdiff.kernels.activations_backward import (
                                      gelu_backward,
                                      quick_gelu_backward,
                                      silu_backward,
)
from npdiff.kernels.attention import (
                                      attention_batched,
                                      attention_blocked,
                                      attention_chunked,
                                      attention_chunked_ref,
                                      attention_full,
                                      attention_ref,
                                      scaled_dot_product_attention,
)
from npdiff.kernels.attention.backward import attention_backward
from npdiff.kernels.conv import conv2d, conv2d_ref
from npdiff.kernels.conv_backward import conv2d_backward
from npdiff.kernels.conv_bf16 import PackedBf16Conv, conv2d_bf16, pack_conv_bf16
from npdiff.kernels.conv_fused import group_norm_silu_conv2d, upsample_nearest2x_conv2d
from npdiff.kernels.linear import geglu, linear, linear_activation
from npdiff.kernels.linear_backward import (
                                      geglu_backward,
                                      linear_activation_backward,
                                      linear_backward,
)
from npdiff.kernels.bf16_rounding import (
                                      bf16_kernel,
                                      bf16_to_float32,
                                      cpu_has_avx512_bf16,
                                      float32_to_bf16,
)
from npdiff.kernels.matmul_bf16 import (
                                      PackedBf16Weight,
                                      geglu_bf16,
                                      linear_activation_bf16,
                                      linear_bf16,
                                      pack_linear_bf16,
)
from npdiff.kernels.norm import group_norm, layer_norm
from npdiff.kernels.norm_backward import group_norm_backward, layer_norm_backward
from npdiff.kernels.resample import (
                                      resize,
                                      upsample_nearest2x,
                                      upsample_nearest2x_backward,
)
from npdiff.kernels.softmax import softmax

__all__ = [
    "attention_batched", "attention_blocked", "attention_chunked", "attention_chunked_ref", "attention_full",
    "attention_ref", "conv2d", "conv2d_ref", "geglu", "gelu", "group_norm", "layer_norm", "linear", "linear_activation",
    "quick_gelu", "resize", "scaled_dot_product_attention", "silu", "softmax", "upsample_nearest2x",
    "upsample_nearest2x_conv2d", "group_norm_silu_conv2d",
    "attention_backward", "conv2d_backward", "geglu_backward", "gelu_backward", "group_norm_backward",
    "layer_norm_backward", "linear_activation_backward", "linear_backward", "quick_gelu_backward",
    "silu_backward", "upsample_nearest2x_backward",
    "PackedBf16Conv", "PackedBf16Weight", "bf16_kernel", "bf16_to_float32", "conv2d_bf16", "cpu_has_avx512_bf16",
    "float32_to_bf16", "geglu_bf16", "linear_activation_bf16", "linear_bf16", "pack_conv_bf16",
    "pack_linear_bf16",
]
