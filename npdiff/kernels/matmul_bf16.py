"""The bfloat16 GEMM: linear layers (and, through conv_bf16.py, convolutions) with both operands
rounded to bfloat16 and the products summed in float32, on AVX-512 BF16's vdpbf16ps.

What is computed: x and the weight are rounded to bf16 (round to nearest even, as torch's
`.to(torch.bfloat16)`), and C = x_bf16 @ W_bf16^T is summed in float32; the bias is added in float32.
Every product of two bf16 is exact in float32, so the result differs from the float32 GEMM of the
rounded operands (the reference) only in the order of the float32 additions.

Versions:
  1. linear_bf16_ref       NumPy: float32_to_bf16 of both operands, widened back to float32, then
                           np.matmul. Also what runs where the CPU has no AVX512_BF16 (or with
                           NPDIFF_NO_BF16=1): the packed weight is then the rounded float32 weight.
  2. the dpbf16 GEMM       a Numba micro-kernel on vdpbf16ps (bf16_intrinsics.py), register-blocked
                           like the float32 lesson kernel (matmul_numba.py), laid out below.
  3. the AMX GEMM          the same packed weight read by AMX tiles (matmul_amx.py): 16 x 16 x 32
                           products per instruction. Runs where bf16_kernel() says "amx" (an AMX
                           CPU whose OS grants the tiles); version 2 where it says "dpbf16".
  linear_bf16, geglu_bf16, linear_activation_bf16: the GEMM, then linear.py's own passes (bias +
                           activation in place; geglu's gate) on the float32 result.

Where each lives: the packed layout and version 2 in matmul_dpbf16.py, version 3 in matmul_amx.py;
here the packed weight, the AMX driver and the linear layers.
"""

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.jit import SERIAL, njit
from npdiff.kernels.activations import ACTIVATION_CODES, check_approximate
from npdiff.kernels.bf16_intrinsics import NR
from npdiff.kernels.bf16_rounding import (  # also what callers import from here (interface of issue 26)
    PackedBf16,
    bf16_kernel,
    bf16_to_float32,
    cpu_has_avx512_bf16,
    float32_to_bf16,
    round_rows,
    rounded_to_bf16,
    split_rows,
)
from npdiff.kernels.block_pool import run_blocks, worker_count
from npdiff.kernels.linear import (  # linear.py's element-wise passes after the GEMM
    LINEAR_ACTIVATIONS,
    _bias_activation_numba,
    _bias_activation_row,
    _geglu_gate_numba,
    _geglu_gate_serial,
)
from npdiff.kernels.matmul_amx import (
    BLOCK,
    START_FROM_INIT,
    START_ZERO,
    TILE,
    TILE_CONFIG,
    amx_gemm_block_cycling,
)
from npdiff.kernels.matmul_dpbf16 import _pack_b, _unpack_b, gemm_dpbf16, row_blocks
from npdiff.kernels.scratch import scratch
from npdiff.kernels.validate import require_float32, shape_text

__all__ = ["PackedBf16Weight", "bf16_kernel", "bf16_to_float32", "cpu_has_avx512_bf16", "float32_to_bf16",
           "geglu_bf16", "linear_activation_bf16", "linear_bf16", "linear_bf16_ref", "pack_linear_bf16"]

AMX_ROW_BLOCK = 256  # most rows per task on AMX (a multiple of 32): its rounded A block stays in L2


# ---------------------------------------------------------------------------------------------
# The packed weight
# ---------------------------------------------------------------------------------------------
class PackedBf16Weight(PackedBf16):
    """A linear weight [out, in] rounded to bf16 once, kept in the layout its GEMM reads.

    layout "pairs": `data` is b_packed [out/NR, in/2, NR] uint32 (matmul_dpbf16.py), which both
    the vdpbf16ps micro-kernel and the AMX tiles read.
    layout "float32": `data` is the rounded weight as float32 [out, in] (CPUs without AVX512_BF16).
    """

    def to_float32(self):
        """The bf16-rounded weight [out, in] as float32 (for references and LoRA)."""
        if self.layout == "float32":
            return self.data
        return _unpack_b(self.data, *self.shape)

    def multiplied_x(self, rows):
        """x [R, in] as the float32 fallback GEMM multiplies it with to_float32(): rounded to bf16."""
        return rounded_to_bf16(rows)


def _weight_bits(weight, what):
    """weight as uint16 bf16 bits: float32 is rounded, uint16 is taken as bf16 bits already."""
    weight = np.asarray(weight)
    if weight.dtype == np.uint16:
        return weight
    if weight.dtype != np.float32:
        raise NpdiffError(f"{what}: weight must be float32 or uint16 (bfloat16 bits), got {weight.dtype} "
                          f"with shape {shape_text(weight.shape)}")
    return float32_to_bf16(weight)


def pack_linear_bf16(weight):
    """weight [out, in] (float32, or uint16 bf16 bits from a file) -> PackedBf16Weight."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise NpdiffError(f"pack_linear_bf16: weight must be 2-D [out_features, in_features], "
                          f"got shape {shape_text(weight.shape)}")
    bits = _weight_bits(weight, "pack_linear_bf16")  # [out, in] uint16
    if bf16_kernel() == "float32":
        return PackedBf16Weight(bf16_to_float32(bits), weight.shape, "float32")
    return PackedBf16Weight(_pack_b(np.ascontiguousarray(bits)), weight.shape, "pairs")



def gemm_amx(a, b_packed, cols, bias=None, finish_block=None, split=False, keep_c=True):
    """a [M, K] float32 (C-contiguous) @ B (packed by _pack_b) (+ bias) -> C [M, cols] on AMX tiles.

    Per task: its rows of a rounded to bf16 rows (zero-padded to 32 rows and 32 k), then every
    32 x 32 block of C over all of K in the tiles, each block starting from the bias (loaded into
    the tiles: no pass over C to add it). finish_block(row0, c_rows), if given, runs on each task's
    rows of C right after (while they are in cache): linear_activation's and geglu's element-wise
    pass. Few rows (CLIP's 77 tokens): the columns are split too, so every core has work, and
    finish_block runs once at the end on all rows.
    split (bf16x3, matmul_bf16x3.py): b_packed is [B_hi ; B_lo] along the pairs and each row of a
    becomes [a_lo | a_hi | a_hi] (split_rows): one GEMM of depth 3 Kp, B's 2 Kp read over again.
    keep_c=False (geglu: only finish_block's output is wanted): where finish_block runs per task, each
    task's rows of C go to a scratch block of that thread instead of a whole [M, cols] array (SD 1.5's
    GEGLU at 64x64: 84 MB less to page in and write per call); returns None then."""
    rows, depth = a.shape
    k_padded = -(-depth // BLOCK) * BLOCK
    b_steps = b_packed.shape[1] // TILE  # steps of 32 k stored in B (pairs / 16)
    a_width = 3 * k_padded if split else k_padded  # [lo | hi | hi] or the rounded row
    panel_stride = b_packed.shape[1] * NR  # words between column panels of B
    workers = worker_count()
    spans = row_blocks(rows, workers, AMX_ROW_BLOCK, BLOCK)
    column_parts = workers if len(spans) < 2 * workers else 1
    in_scratch = finish_block is not None and column_parts == 1 and not keep_c
    c = None if in_scratch else np.empty((rows, cols), np.float32)  # [M, N]
    part = -(-cols // (column_parts * NR)) * NR  # columns per part, whole panels
    if bias is None:
        start, init = START_ZERO, np.zeros((1, 1), np.float32)
    else:
        start, init = START_FROM_INIT, np.zeros((1, b_packed.shape[0] * NR), np.float32)  # [1, N padded]
        init[0, :cols] = bias  # each C tile's 16 rows are loaded from here with row stride 0

    def run_block(block):
        (row0, block_rows), col0 = block
        a_bits = scratch("amx a rows", (-(-block_rows // BLOCK) * BLOCK, a_width // 2)).view(np.uint16)
        if split:
            split_rows(a, row0, block_rows, a_bits)  # [rows32, 3 * K32] bf16 bits: lo | hi | hi
        else:
            round_rows(a, row0, block_rows, a_bits)  # [rows32, K32] bf16 bits
        edge = scratch("amx edge", (BLOCK, BLOCK))
        c_rows, c_row0 = (scratch("amx c rows", (block_rows, cols)), 0) if in_scratch else (c, row0)
        amx_gemm_block_cycling(TILE_CONFIG, a_bits, 0, a_width // BLOCK, b_steps, b_packed, panel_stride, col0,
                               c_rows, c_row0, block_rows, col0, min(part, cols - col0), start, init, (0, 1), edge)
        if finish_block is not None and column_parts == 1:
            finish_block(row0, c_rows[c_row0:c_row0 + block_rows])

    run_blocks(run_block, [(span, col0) for span in spans for col0 in range(0, cols, part)])
    if finish_block is not None and column_parts > 1:
        finish_block(0, c)  # few rows: one serial pass on the calling thread
    return c


# ---------------------------------------------------------------------------------------------
# linear, linear_activation, geglu
# ---------------------------------------------------------------------------------------------
def linear_bf16_ref(x, weight, bias=None):
    """Both operands rounded to bf16, then the float32 GEMM: x [..., in], weight [out, in] float32."""
    out = np.matmul(rounded_to_bf16(x), rounded_to_bf16(weight).T)  # [..., in] @ [in, out] -> [..., out]
    if bias is not None:
        out = out + bias  # [..., out]
    return out


def _check_linear_bf16(kernel, x, packed, bias):
    if not isinstance(packed, PackedBf16Weight):
        raise NpdiffError(f"{kernel}: the weight must be a PackedBf16Weight from pack_linear_bf16, "
                          f"got {type(packed).__name__}")
    require_float32(kernel, "x", x)
    if x.ndim < 1 or x.shape[-1] != packed.shape[1]:
        raise NpdiffError(f"{kernel}: x must have shape [..., in_features={packed.shape[1]}] to match "
                          f"weight {shape_text(packed.shape)}, got {shape_text(x.shape)}")
    if bias is not None:
        require_float32(kernel, "bias", bias)
        if bias.shape != (packed.shape[0],):
            raise NpdiffError(f"{kernel}: bias must have shape [{packed.shape[0]}], got {shape_text(bias.shape)}")


def _gemm_rows(x, packed, bias=None, finish_block=None, finish_all=None, keep_c=True):
    """x [..., in] -> [R, out] float32 = x @ W^T + bias, on the kernel bf16_kernel() names (the
    rounded float32 GEMM for a "float32" weight). An element-wise pass after the GEMM runs as
    finish_block(row0, rows of C) on each AMX task's rows while they are in cache (serial: it runs
    on a pool worker), or as finish_all(C) once after the other kernels (parallel). keep_c=False: the
    caller wants only what the finishing pass writes (gemm_amx may then return None)."""
    rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [R, in]
    cols = packed.shape[0]
    split = packed.layout == "split pairs"  # bf16x3 (matmul_bf16x3.py): AMX reads it, else its float32 GEMM
    kernel = bf16_kernel() if packed.layout in ("pairs", "split pairs") else "float32"
    if split and kernel != "amx":
        kernel = "float32"
    if kernel == "amx" and rows.shape[0] and rows.shape[1]:
        # [R, in] @ [in, out] + bias -> [R, out], finish_block on each task's rows
        return gemm_amx(np.ascontiguousarray(rows), packed.data, cols, bias, finish_block, split, keep_c)
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        out = np.zeros((rows.shape[0], cols), np.float32)  # [R, out]: an empty sum is 0
    elif kernel == "dpbf16":
        out = gemm_dpbf16(np.ascontiguousarray(rows), packed.data, cols)  # [R, in] @ [in, out] -> [R, out]
    else:
        out = np.matmul(packed.multiplied_x(rows), packed.to_float32().T)  # [R, in] @ [in, out] -> [R, out]
    if bias is not None:
        out += bias  # [R, out], in place
    if finish_all is not None and out.size:
        finish_all(out)
    return out


def linear_bf16(x, packed, bias=None):
    """torch's linear in bf16: x [..., in] float32 and the packed weight rounded to bf16, products
    summed in float32, bias added in float32 -> float32 [..., out]."""
    _check_linear_bf16("linear_bf16", x, packed, bias)
    out = _gemm_rows(x, packed, bias)  # [R, out]
    return out.reshape(x.shape[:-1] + (packed.shape[0],))  # [R, out] -> [..., out]


@njit(**SERIAL)
def _activation_rows(hidden, which):
    """hidden [rows, D] = activation(hidden), in place, on the calling thread (linear.py's row pass)."""
    for r in range(hidden.shape[0]):
        _bias_activation_row(hidden[r], hidden[r], False, which)


def linear_activation_bf16(x, packed, bias=None, activation="quick_gelu"):
    """activation(linear_bf16(x, packed, bias)): linear.py's activation pass on each block of rows
    of the GEMM's result while it is in cache (AMX), or once after it."""
    _check_linear_bf16("linear_activation_bf16", x, packed, bias)
    if activation not in LINEAR_ACTIVATIONS:
        raise NpdiffError(f"linear_activation_bf16: activation must be one of "
                          f"{tuple(LINEAR_ACTIVATIONS)}, got {activation!r}")
    which = LINEAR_ACTIVATIONS[activation][1]

    def finish_block(row0, rows):
        _activation_rows(rows, which)  # [block, out], in place

    def finish_all(hidden):
        _bias_activation_numba(hidden, hidden[0], False, which)  # [R, out], in place, parallel over rows

    hidden = _gemm_rows(x, packed, bias, finish_block, finish_all)  # [R, out]
    return hidden.reshape(x.shape[:-1] + (packed.shape[0],))  # [R, out] -> [..., out]


def geglu_bf16(x, packed, bias=None, approximate="none"):
    """diffusers' GEGLU in bf16: h = linear_bf16(x, packed, bias) [..., 2D]; h[..., :D] * gelu(h[..., D:]),
    the gate computed on each block of rows of h while it is in cache (AMX), or once after the GEMM."""
    _check_linear_bf16("geglu_bf16", x, packed, bias)
    check_approximate("geglu_bf16", approximate)
    if packed.shape[0] % 2:
        raise NpdiffError(f"geglu_bf16: weight must have an even number of rows [2*D, in], "
                          f"got {shape_text(packed.shape)}")
    which = ACTIVATION_CODES[approximate]
    out = np.empty((x.size // x.shape[-1], packed.shape[0] // 2), np.float32)  # [R, D]

    def finish_block(row0, hidden_rows):
        _geglu_gate_serial(hidden_rows, which, out[row0:row0 + hidden_rows.shape[0]])  # [block, 2D] -> [block, D]

    def finish_all(hidden):
        _geglu_gate_numba(hidden, which, out)  # [R, 2D] -> [R, D], parallel over rows

    _gemm_rows(x, packed, bias, finish_block, finish_all, keep_c=False)  # [R, 2D], or only blocks of it
    return out.reshape(x.shape[:-1] + (out.shape[1],))  # [R, D] -> [..., D]
