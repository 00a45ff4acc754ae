"""Everything `import npdiff` does, in one place, in this order.

npdiff/__init__.py calls `run()` before anything else. Python imports a package's __init__ before
any of its modules, so whichever npdiff module you import first (npdiff, npdiff.kernels,
npdiff.backend, ...), these steps have run, once, before it: results do not depend on import order.
`DECISIONS` records what each step decided (npdiff.blas.blas_info() reports the first).

  1. OpenBLAS (npdiff/blas.py): on an AMD CPU with AVX-512, set OPENBLAS_CORETYPE=SkylakeX (its
     fast kernels, which OpenBLAS before 0.3.21 did not pick there), unless the user chose. Must
     come before NumPy is imported, because OpenBLAS reads the variable when it loads: so this
     step imports nothing but the standard library and npdiff/blas.py. If NumPy is already loaded
     it is too late, and a RuntimeWarning says so only where it costs: an AVX-512 CPU whose
     OpenBLAS runs other kernels. Nothing else about OpenBLAS depends on import order: npdiff runs
     its GEMMs on its own threads (npdiff/kernels/block_pool.py), so OpenBLAS's idle threads,
     which busy-wait ~0.1 s after each call they serve, serve none of npdiff's.
  2. Numba's threading layer: a fork-safe one. Numba's default on Linux is GNU OpenMP ("omp"),
     which cannot survive fork(): a process forked after a parallel kernel has run (what
     multiprocessing does by default on Linux) is killed at its first parallel kernel ("fork()
     called from a process already using GNU OpenMP"). NUMBA_THREADING_LAYER=forksafe makes Numba
     take TBB if it is installed (fork- and thread-safe) and otherwise its own "workqueue" layer
     (fork-safe; one thread may launch parallel kernels at a time, which npdiff keeps to: the
     block pool's workers run serial Numba functions only). Set here in the environment, before
     Numba is imported (Numba reads it then, and children started by spawn inherit it); if Numba
     was imported already, numba.config is set instead, which holds until its first parallel
     kernel. A layer the user chose (NUMBA_THREADING_LAYER) is kept.
  3. A fork handler: in a forked child the block-parallel pool's threads no longer exist, so the
     child forgets the pool (npdiff/kernels/block_pool.py) and starts a fresh one on first use.
  4. The array backend (npdiff/backend.py): NPDIFF_BACKEND=cupy (or numpy) in the environment
     selects it, as npdiff.backend.use() would. Nothing is read from the environment later.

Nothing here compiles a kernel, starts a thread or imports torch.
"""

import os
import sys
import warnings

from npdiff import blas  # the standard library only: NumPy is not imported by it

NUMBA_LAYER = "forksafe"
AVX2_KERNELS_WARNING = (
    "numpy was imported before npdiff, and its OpenBLAS runs its {corename} kernels on this AVX-512 "
    "CPU: sgemm at about half the speed of its AVX-512 (SkylakeX) ones. Set "
    "OPENBLAS_CORETYPE=SkylakeX in the environment, or import npdiff before numpy.")
DECISIONS = {}
_done = False


def run():
    """The steps above, once per process."""
    global _done
    if _done:
        return
    _done = True
    # 1. before NumPy is imported
    DECISIONS["openblas_coretype"] = choose_openblas_kernels()
    # 2. before Numba is imported
    DECISIONS["numba_threading_layer"] = choose_numba_threading_layer()
    # 3.
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=after_fork_in_child)
    # 4. imports NumPy (and CuPy, if NPDIFF_BACKEND asks for it): imported here, not at the top of this
    #    file, because NumPy must load after steps 1 and 2
    from npdiff import backend

    if os.environ.get("NPDIFF_BACKEND"):
        backend.use(os.environ["NPDIFF_BACKEND"])


def choose_openblas_kernels():
    """Step 1. Returns what was decided; warns when numpy came first and it cost the fast kernels."""
    decided = blas.prefer_avx512_openblas()
    if decided.startswith("too late") and blas.avx512_kernels_missed():
        warning = AVX2_KERNELS_WARNING.format(corename=blas.openblas_corename())
        warnings.warn(warning, RuntimeWarning, stacklevel=3)  # the one case npdiff can't fix
    return decided


def choose_numba_threading_layer():
    """Step 2. Returns what was decided."""
    chosen = os.environ.get("NUMBA_THREADING_LAYER")
    if chosen:
        return f"set by user: NUMBA_THREADING_LAYER={chosen}"
    if "numba" not in sys.modules:
        os.environ["NUMBA_THREADING_LAYER"] = NUMBA_LAYER
        return f"set NUMBA_THREADING_LAYER={NUMBA_LAYER}"
    import numba
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        return f"too late: numba already runs its {numba.threading_layer()!r} layer"
    numba.config.THREADING_LAYER = NUMBA_LAYER
    return f"set numba.config.THREADING_LAYER={NUMBA_LAYER}"


def after_fork_in_child():
    """Step 3, run by os.fork() in the child."""
    block_pool = sys.modules.get("npdiff.kernels.block_pool")
    if block_pool is not None:
        block_pool.forget_after_fork()
