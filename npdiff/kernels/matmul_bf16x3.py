"""bf16x3: float32-class linear layers on the bf16 AMX GEMM, from three bf16 products per product.

Each float32 operand is split into two bf16: hi = bf16(a), lo = bf16(a - hi) (a - hi is exact in
float32, and hi + lo keeps 16 bits of a's 24-bit mantissa). Then

    x W^T  ~  x_lo W_hi^T + x_hi W_lo^T + x_hi W_hi^T        (x_lo W_lo^T, ~2^-16 of the rest, dropped)

with every product of two bf16 exact in float32 and the sums in float32. The three products are one
AMX GEMM of triple depth: each row of x becomes [x_lo | x_hi | x_hi] (bf16_rounding.split_rows, per
call), and the weight is packed once at load as [W_hi ; W_lo] along k (two bf16 = float32's 4 bytes a
weight), which the k loop reads twice over (matmul_amx.amx_gemm_block_cycling: steps 3 Kp, B's 2 Kp):

    A row  [ x_lo          | x_hi          | x_hi          ]    3 Kp bf16
    B      [ W_hi ; W_lo ] [ W_hi ; W_lo ] (first 3 Kp of it) -> x_lo W_hi + x_hi W_lo + x_hi W_hi

The small products come first, so the float32 sums add them before the large ones. Error against the
float32 GEMM: a few 1e-6 relative (tests/kernels/test_matmul_bf16x3.py measures it against torch);
cost: three times the bf16 GEMM's tile products.

Versions:
  1. linear_bf16x3_ref     NumPy: split_bf16 of both operands, the three float32 GEMMs summed.
  2. the AMX GEMM          matmul_bf16.gemm_amx(split=True) on the packed [W_hi ; W_lo].
  CPUs without usable AMX tiles (or NPDIFF_NO_AMX=1 / NPDIFF_NO_BF16=1 at load) keep the float32 weight
  itself and run the float32 GEMM: there bf16x3 is float32 (vdpbf16ps at three times the work would be
  slower than sgemm).
linear_bf16x3, linear_activation_bf16x3, geglu_bf16x3: matmul_bf16's linear layers, which run the
weight's own GEMM (the packed object's layout says which).
"""

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.kernels.bf16_rounding import bf16_kernel, bf16_to_float32, split_bf16
from npdiff.kernels.matmul_bf16 import (
    PackedBf16Weight,
    geglu_bf16,
    linear_activation_bf16,
    linear_bf16,
)
from npdiff.kernels.matmul_dpbf16 import _pack_b, _unpack_b
from npdiff.kernels.validate import shape_text

__all__ = ["PackedBf16x3Weight", "geglu_bf16x3", "linear_activation_bf16x3", "linear_bf16x3", "linear_bf16x3_ref",
           "pack_linear_bf16x3"]


class PackedBf16x3Weight(PackedBf16Weight):
    """A linear weight [out, in] split into bf16 hi and lo once, packed for the AMX GEMM.

    layout "split pairs": `data` is [out/NR, Kp, NR] uint32: _pack_b(W_hi) then _pack_b(W_lo) along the
    pairs axis (Kp/2 pairs each, Kp = in rounded up to 32).
    layout "float32": `data` is the float32 weight [out, in] itself (no usable AMX at load).
    """

    def to_float32(self):
        """The weight [out, in] as the GEMM multiplies it: W_hi + W_lo (the float32 weight itself when
        the layout is "float32")."""
        if self.layout == "float32":
            return self.data
        pairs = self.data.shape[1] // 2
        high = _unpack_b(np.ascontiguousarray(self.data[:, :pairs]), *self.shape)  # [out, in]
        low = _unpack_b(np.ascontiguousarray(self.data[:, pairs:]), *self.shape)  # [out, in]
        return high + low

    def multiplied_x(self, rows):
        """x [R, in] as the float32 fallback multiplies it: itself."""
        return rows


def pack_linear_bf16x3(weight):
    """weight [out, in] float32 -> PackedBf16x3Weight (4 bytes a weight, as float32)."""
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise NpdiffError(f"pack_linear_bf16x3: weight must be float32 [out_features, in_features], got "
                          f"{weight.dtype} with shape {shape_text(weight.shape)}")
    if bf16_kernel() != "amx":
        return PackedBf16x3Weight(np.ascontiguousarray(weight), weight.shape, "float32")
    high, low = split_bf16(weight)  # [out, in] uint16 each
    packed = np.concatenate([_pack_b(high), _pack_b(low)], axis=1)  # [out/NR, Kp/2 + Kp/2, NR] uint32
    return PackedBf16x3Weight(packed, weight.shape, "split pairs")


def linear_bf16x3_ref(x, weight, bias=None):
    """x [..., in] @ weight [out, in]^T (+ bias) as bf16x3 computes it, in NumPy float32."""
    x_high, x_low = (bf16_to_float32(bits) for bits in split_bf16(x))  # [..., in] each
    w_high, w_low = (bf16_to_float32(bits) for bits in split_bf16(weight))  # [out, in] each
    out = np.matmul(x_low, w_high.T) + np.matmul(x_high, w_low.T)  # [..., out]: the small products
    out += np.matmul(x_high, w_high.T)  # [..., out]
    if bias is not None:
        out += bias  # [..., out]
    return out


def _check_bf16x3(kernel, packed):
    if not isinstance(packed, PackedBf16x3Weight):
        raise NpdiffError(f"{kernel}: the weight must be a PackedBf16x3Weight from pack_linear_bf16x3, "
                          f"got {type(packed).__name__}")


def linear_bf16x3(x, packed, bias=None):
    """torch's linear at near float32 accuracy on bf16 AMX: x [..., in] float32 -> [..., out] float32."""
    _check_bf16x3("linear_bf16x3", packed)
    return linear_bf16(x, packed, bias)  # [..., in] -> [..., out]


def linear_activation_bf16x3(x, packed, bias=None, activation="quick_gelu"):
    """activation(linear_bf16x3(x, packed, bias)), the activation on each block of rows in cache."""
    _check_bf16x3("linear_activation_bf16x3", packed)
    return linear_activation_bf16(x, packed, bias, activation)  # [..., in] -> [..., out]


def geglu_bf16x3(x, packed, bias=None, approximate="none"):
    """diffusers' GEGLU with the projection in bf16x3: [..., in] -> [..., out/2]."""
    _check_bf16x3("geglu_bf16x3", packed)
    return geglu_bf16(x, packed, bias, approximate)  # [..., in] -> [..., out/2]
