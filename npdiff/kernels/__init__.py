"""The kernels of Stable Diffusion, float32, NCHW like torch. One file per op family:

    conv.py         conv2d (1x1 GEMM; im2col / implicit GEMM through OpenBLAS sgemm)
    norm.py         group_norm (optionally fused with SiLU), layer_norm
    attention.py    softmax, scaled_dot_product_attention (full and memory-efficient paths)
    activations.py  silu, gelu (erf or tanh), quick_gelu
    linear.py       linear (torch weight layout [out, in]), geglu (diffusers' GEGLU)
    resample.py     upsample_nearest2x

Each file holds the NumPy-API reference (`*_ref`, also runs on cupy arrays) beside the fast version
(Numba, or BLAS through NumPy) and a header saying how they differ. Every kernel checks its inputs
and raises npdiff.NpdiffError naming the argument and the expected vs actual shape/dtype.
Importing this package imports numba, but nothing is compiled until a kernel is first called.
"""

from npdiff.kernels.activations import gelu, quick_gelu, silu
from npdiff.kernels.attention import (attention_batched, attention_chunked, attention_chunked_ref, attention_full,
                                      attention_ref, scaled_dot_product_attention, softmax)
from npdiff.kernels.conv import conv2d, conv2d_ref
from npdiff.kernels.linear import geglu, linear
from npdiff.kernels.norm import group_norm, layer_norm
from npdiff.kernels.resample import upsample_nearest2x

__all__ = [
    "attention_batched", "attention_chunked", "attention_chunked_ref", "attention_full", "attention_ref", "conv2d",
    "conv2d_ref", "geglu", "gelu",
    "group_norm", "layer_norm", "linear", "quick_gelu", "scaled_dot_product_attention", "silu",
    "softmax", "upsample_nearest2x",
]
