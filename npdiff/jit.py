"""Every Numba flag in one place.

Kernel modules import `njit`/`prange` from here. Numba compiles a function the first time it is
called (never at import), and `cache=True` keeps the machine code in __pycache__ for the next run.

Flags used:
  PARALLEL  parallel=True: the kernel has one `prange` over its outermost independent axis.
  SERIAL    no threads: small kernels, or kernels called from inside a parallel loop.
  error_model="numpy": division by zero gives inf/nan as in NumPy instead of raising, which lets
            Numba drop the zero checks from inner loops.
  FASTMATH_SAFE: fastmath flags that allow reassociation and FMA contraction but do NOT assume
            values are finite ('ninf', 'nnan' are left out), so -inf in masked softmax stays
            correct. No kernel uses a blanket fastmath=True.
  FASTMATH_CONTRACT: only 'contract': a*b + c may become one FMA (one rounding); nothing is
            reordered. For GEMM micro-kernels (npdiff/kernels/matmul_numba.py).
"""

from numba import njit, prange  # noqa: F401  (re-exported for kernel modules)

FASTMATH_SAFE = {"nsz", "arcp", "contract", "reassoc"}
FASTMATH_CONTRACT = {"contract"}

PARALLEL = dict(parallel=True, cache=True, nogil=True, error_model="numpy")
SERIAL = dict(cache=True, nogil=True, error_model="numpy")
