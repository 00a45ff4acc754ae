"""Everything `import npdiff` does, in one place, in this order.

npdiff/__init__.py calls `run()` before anything else. Python imports a package's __init__ before
any of its modules, so whichever npdiff module you import first (npdiff, npdiff.kernels,
npdiff.backend, ...), these steps have run, once, before it: results do not depend on import order.

  1. OpenBLAS's kernels (npdiff/blas.py): on a CPU with AVX-512, set OPENBLAS_CORETYPE=SkylakeX
     unless the user chose (or NumPy is already loaded, when it is too late: blas_info() says so).
     Must come before NumPy is imported, because OpenBLAS reads the variable when it loads: so this
     step imports nothing but the standard library and npdiff/blas.py.
  2. The array backend (npdiff/backend.py): NPDIFF_BACKEND=cupy (or numpy) in the environment
     selects it, as npdiff.backend.use() would. Nothing is read from the environment later.

Nothing here compiles a kernel, starts a thread or imports torch.
"""

import os

_done = False


def run():
    """The steps above, once per process."""
    global _done
    if _done:
        return
    _done = True
    # 1. before NumPy is imported
    from npdiff import blas

    blas.prefer_avx512_openblas()
    # 2. imports NumPy (and CuPy, if NPDIFF_BACKEND asks for it)
    from npdiff import backend

    if os.environ.get("NPDIFF_BACKEND"):
        backend.use(os.environ["NPDIFF_BACKEND"])
