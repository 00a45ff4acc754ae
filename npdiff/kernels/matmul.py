"""Matrix multiplication from scratch: the fast.ai lesson's progression, as seven real functions.

Every version takes float32 a [M,K] and b [K,N] and returns a new float32 c [M,N] with
c[i, j] = sum over k of a[i, k] * b[k, j]: 2*M*N*K floating-point operations (FLOP). Each step
changes one thing, and the comment says why that makes it faster. GFLOP/s measured at N = 1024-2048
on the 2-core AVX-512 development machine are in benchmarks/RESULTS.md ("Matrix multiplication").

  1. matmul_python         three Python loops, one multiply-add per interpreted step. Every a[i, k]
                           is a Python object built from the array: ~0.01 GFLOP/s. Only for tiny
                           sizes (N = 64 takes ~0.06 s; N = 256 would take ~4 s).
  2. matmul_row_dot        the k loop moves into NumPy: c[i, j] = (a[i, :] * b[:, j]).sum(). One
                           Python step now does K multiply-adds in C, so the interpreter cost is paid
                           M*N times instead of M*N*K times. b[:, j] is a column, read with stride N.
  3. matmul_broadcast      the j loop moves into NumPy as well: row i of C is
                           (a[i, :, None] * b).sum(axis=0), one [K,N] temporary per row. M Python
                           steps, each streaming all of B with stride 1, but writing and re-reading
                           a K x N temporary costs more memory traffic than the arithmetic.
  4. matmul_einsum         np.einsum("ik,kj->ij"): all three loops in C, no temporaries; NumPy's
                           einsum loops (optimize=False, no BLAS) multiply-add with SIMD but without
                           blocking, so B is re-read from memory for every row.
  5. matmul_numba_naive    Numba compiles the three loops to machine code, in (i, k, j) order: the
                           inner loop over j reads b[k, :] and writes c[i, :] contiguously with
                           a[i, k] fixed, so LLVM vectorises it (16 float32 per AVX-512 register),
                           and prange spreads the rows i over the threads. Limited by memory: every
                           step of k reloads and stores a whole row of C.
  6. matmul_numba_blocked  the BLIS/GotoBLAS scheme (npdiff/kernels/matmul_numba.py):
                           - register blocking: a 6 x 64 tile of C is kept in 24 zmm registers for
                             K/256 steps; each step is 6 broadcasts, 4 vector loads and 24 FMAs,
                             instead of a load and a store of C per FMA;
                           - packing: the B panel and A block are copied once into the exact order
                             the micro-kernel reads them, so its loads are contiguous, aligned to
                             the loop, and never collide in the cache (no stride-N walks);
                           - cache blocking: KC = 256 steps of k at a time keeps the A micro-panel
                             (6 KiB) in L1 and the 512 KiB B block and 120 KiB A block in L2, so
                             data is fetched from memory once per block, not once per row;
                           - threads: prange over blocks of rows of C, one per task, equal shares.
  7. matmul_blas           a @ b: NumPy calls OpenBLAS sgemm, the same scheme with hand-written
                           assembly micro-kernels (npdiff picks its AVX-512 ones; npdiff/blas.py).

The reference, `matmul_ref`, is step 4: the formula c[i, j] = sum over k of a[i, k] * b[k, j] as
NumPy writes it, einsum("ik,kj->ij") (NumPy API, so it runs on cupy arrays too). Every version is
tested against torch.mm and np.matmul.

Numba versions (5, 6) run on C-contiguous NumPy arrays (other strides are copied first: O(MK + KN)
against the O(MNK) product, and one compiled version instead of one per layout); other arrays (cupy:
no CUDA version here) run the reference, by npdiff/kernels/dispatch.py's rule. Bad input raises
NpdiffError naming the argument and the shapes.
"""

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.kernels import dispatch
from npdiff.kernels.matmul_numba import blocked_gemm, naive_gemm
from npdiff.kernels.validate import require_ndim, shape_text


def check_operands(kernel, a, b):
    """a [M,K] and b [K,N], both float32, inner sizes equal; else NpdiffError naming the argument."""
    require_ndim(kernel, "a", a, 2, "[M,K]")
    require_ndim(kernel, "b", b, 2, "[K,N]")
    if a.shape[1] != b.shape[0]:
        raise NpdiffError(
            f"{kernel}: inner sizes differ: a is [M,K] = {shape_text(a.shape)} and b is [K,N] = "
            f"{shape_text(b.shape)}; a.shape[1] = {a.shape[1]} must equal b.shape[0] = {b.shape[0]}")


# ---------------------------------------------------------------------------------------------
# 1-4: loops in Python, then NumPy
# ---------------------------------------------------------------------------------------------
def matmul_python(a, b):
    """Step 1: three Python loops (i, j, k). Only for tiny sizes."""
    check_operands("matmul_python", a, b)
    rows, depth = a.shape
    cols = b.shape[1]
    xp = backend.array_module(a)
    c = xp.zeros((rows, cols), dtype=np.float32)  # [M,N]
    for i in range(rows):
        for j in range(cols):
            total = 0.0  # a Python float (double precision): rounded to float32 once, when stored
            for k in range(depth):
                total += float(a[i, k]) * float(b[k, j])
            c[i, j] = total
    return c


def matmul_row_dot(a, b):
    """Step 2: one Python step per element of C; the k loop is NumPy's elementwise product + sum."""
    check_operands("matmul_row_dot", a, b)
    rows = a.shape[0]
    cols = b.shape[1]
    xp = backend.array_module(a)
    c = xp.zeros((rows, cols), dtype=np.float32)  # [M,N]
    for i in range(rows):
        for j in range(cols):
            c[i, j] = (a[i, :] * b[:, j]).sum()  # [K] * [K] -> [] (b[:, j] strided by N)
    return c


def matmul_broadcast(a, b):
    """Step 3: one Python step per row of C; the j and k loops are a broadcast product + sum."""
    check_operands("matmul_broadcast", a, b)
    rows = a.shape[0]
    cols = b.shape[1]
    xp = backend.array_module(a)
    c = xp.zeros((rows, cols), dtype=np.float32)  # [M,N]
    for i in range(rows):
        products = a[i, :, None] * b  # [K,1] * [K,N] -> [K,N]
        c[i] = products.sum(axis=0)  # [K,N] -> [N]
    return c


def matmul_einsum(a, b):
    """Step 4: einsum's compiled loops (no BLAS: optimize=False)."""
    check_operands("matmul_einsum", a, b)
    xp = backend.array_module(a)
    return xp.einsum("ik,kj->ij", a, b)  # [M,K], [K,N] -> [M,N]


matmul_ref = matmul_einsum  # the reference: the formula itself, in the NumPy API


# ---------------------------------------------------------------------------------------------
# 5-6: Numba (npdiff/kernels/matmul_numba.py)
# ---------------------------------------------------------------------------------------------
def naive_gemm_fast(a, b):
    a = np.ascontiguousarray(a)  # [M,K]: views are copied, so one compiled version serves all
    b = np.ascontiguousarray(b)  # [K,N]
    return naive_gemm(a, b)  # [M,K] @ [K,N] -> [M,N]


def blocked_gemm_fast(a, b):
    a = np.ascontiguousarray(a)  # [M,K]: views are copied, so one compiled version serves all
    b = np.ascontiguousarray(b)  # [K,N]
    return blocked_gemm(a, b)  # [M,K] @ [K,N] -> [M,N]


NUMBA_NAIVE = dispatch.register("matmul_numba_naive", fast=naive_gemm_fast, reference=matmul_ref)
NUMBA_BLOCKED = dispatch.register("matmul_numba_blocked", fast=blocked_gemm_fast, reference=matmul_ref)


def matmul_numba_naive(a, b):
    """Step 5: Numba loops in (i, k, j) order, vectorised over j, prange over rows."""
    check_operands("matmul_numba_naive", a, b)
    return NUMBA_NAIVE(a, b)


def matmul_numba_blocked(a, b):
    """Step 6: packed, cache-blocked, register-blocked (6 x 64 zmm tile), prange over row blocks."""
    check_operands("matmul_numba_blocked", a, b)
    return NUMBA_BLOCKED(a, b)


# ---------------------------------------------------------------------------------------------
# 7: BLAS
# ---------------------------------------------------------------------------------------------
def matmul_blas(a, b):
    """Step 7: NumPy's matmul, i.e. OpenBLAS sgemm (cupy: cuBLAS)."""
    check_operands("matmul_blas", a, b)
    xp = backend.array_module(a)
    return xp.matmul(a, b)  # [M,K] @ [K,N] -> [M,N]

# The progression in order, for tests and benchmarks: name -> function.
VERSIONS = {
    "python": matmul_python,
    "row_dot": matmul_row_dot,
    "broadcast": matmul_broadcast,
    "einsum": matmul_einsum,
    "numba_naive": matmul_numba_naive,
    "numba_blocked": matmul_numba_blocked,
    "blas": matmul_blas,
}
