"""The CUDA versions of npdiff's kernels, for cupy arrays (npdiff.backend.use("cupy")).

The kernels in npdiff/kernels/*.py check their inputs, then send NumPy arrays to Numba/BLAS and
cupy arrays here (the rule is in npdiff/kernels/dispatch.py). One file per op family; each holds its
CUDA C source (compiled by NVRTC through cupy.RawModule on first use, for float32 and for float16)
beside its Python wrapper, and a header saying how it differs from the NumPy-API reference and how
its threads are laid out:

    runtime.py      the shared C header (scalar_t, load/store, warp and block reductions), compiling,
                    launch arithmetic
    elementwise.py  silu, quick_gelu, gelu, the GEGLU gate, nearest 2x upsampling
    norm.py         group_norm (+ SiLU) over (slab, chunk) blocks, layer_norm one block per row
    attention.py    softmax (one warp per row, attention's masks fused in) and scaled dot-product
                    attention: cuBLAS GEMM, the fused masked softmax, cuBLAS GEMM
    conv.py         conv2d: im2col tiles + cuBLAS GEMMs (1x1: one GEMM); linear

Matrix products are cupy.matmul, i.e. cuBLAS. float32 arrays are computed in float32 (no TF32
unless CUPY_TF32=1 is set); float16 arrays (backend.use("cupy", dtype="float16")) are read as half,
computed in float (sums in double where noted), and rounded once on the store; cuBLAS accumulates
half products in float. A kernel with weights computes in the weights' dtype and casts its input
to it, so float32 latents from a scheduler meet float16 weights without a float32 copy of them.

Importing this package does not import cupy (nor compile anything); it is imported by the kernel
dispatchers on every machine.
"""

from npdiff.kernels.cuda.attention import scaled_dot_product_attention, softmax
from npdiff.kernels.cuda.conv import conv2d, linear
from npdiff.kernels.cuda.elementwise import (
    geglu_gate,
    gelu,
    quick_gelu,
    silu,
    upsample_nearest2x,
)
from npdiff.kernels.cuda.norm import group_norm, layer_norm


def geglu(x, weight, bias=None, approximate="none"):
    """diffusers GEGLU: h = linear(x) [..., 2D] by cuBLAS, then the gate kernel -> [..., D]."""
    return geglu_gate(linear(x, weight, bias), approximate)


def group_norm_silu_conv2d(x, num_groups, norm_weight, norm_bias, eps, weight, bias, padding):
    """conv2d(silu(group_norm(x))): the group_norm kernel (SiLU fused), then conv2d (not folded on the GPU)."""
    return conv2d(group_norm(x, num_groups, norm_weight, norm_bias, eps, silu=True), weight, bias, (1, 1), padding)


def upsample_nearest2x_conv2d(x, weight, bias, padding):
    """conv2d(upsample_nearest2x(x)): the upsampling kernel, then conv2d (not folded on the GPU)."""
    return conv2d(upsample_nearest2x(x), weight, bias, (1, 1), padding)


__all__ = ["conv2d", "geglu", "geglu_gate", "gelu", "group_norm", "group_norm_silu_conv2d", "layer_norm", "linear",
           "quick_gelu", "scaled_dot_product_attention", "silu", "softmax", "upsample_nearest2x",
           "upsample_nearest2x_conv2d"]
