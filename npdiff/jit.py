"""Every Numba flag in one place.

Kernel modules import `njit`/`prange` from here. Numba compiles a function the first time it is
called (never at import), and `cache=True` keeps the machine code in __pycache__ for the next run.

Flags used:
  PARALLEL  parallel=True: the kernel has one `prange` over its outermost independent axis.
  SERIAL    no threads: small kernels, or kernels called from inside a parallel loop.
  error_model="numpy": division by zero gives inf/nan as in NumPy instead of raising, which lets
            Numba drop the zero checks from inner loops.
  FASTMATH_CONTRACT: only 'contract': a*b + c may become one FMA (one rounding); nothing is
            reordered. For element-wise loops. No kernel carries 'reassoc' (or a blanket
            fastmath=True): with it, LLVM picks the order of a sum, and may pick another in each compiled
            copy of a function (Numba links a copy of every callee into each caller and optimises it
            there), so a process that compiled a kernel and one that loaded it from the disk cache gave
            different bits. Sums that need vectors are written as lanes added in a fixed order
            (kernels/lane_sums.py, matmul_numba.sum_lanes_in_tree).
  (no fastmath option): njit below passes fastmath=False, so a kernel's flags are its own and never
            inherited from whichever caller Numba compiled it for first.

One parallel kernel at a time: njit(parallel=True) returns the kernel wrapped so that a call holds one
process-wide lock while it runs. Numba's "workqueue" threading layer (the one npdiff/startup.py picks
where TBB is not installed) may be entered by one thread at a time: a second Python thread launching a
parallel kernel meanwhile (two threads calling one pipeline, or two models) made Numba print "Concurrent
access has been detected" and abort the whole process. With the lock the second thread waits for the
kernel, not the whole call; nothing else runs under it, so it cannot deadlock (no parallel kernel calls
another, and the block pool's workers run serial kernels only).
"""

import os
import sys
import threading


def use_512_bit_vectors():
    """On an AVX-512 CPU, let LLVM use 512-bit (zmm) vectors in every Numba kernel.

    LLVM tunes some AVX-512 CPUs (Intel's cores from Skylake-X on) with "prefer-256-bit": it then
    vectorises with 256-bit ymm registers only, and the packed GEMM micro-kernel of matmul_numba.py,
    laid out for 24 zmm accumulators, runs at half width (measured on a cloud Xeon: 48 ymm FMAs
    instead of 24 zmm in its inner loop). Numba takes the CPU from NUMBA_CPU_NAME / NUMBA_CPU_FEATURES
    when set, so this sets the features to the host's own plus "-prefer-256-bit": the same
    instructions are allowed, only that tuning is off (a no-op on CPUs tuned for 512 bits, such as
    AMD Zen 4). It also corrects one misdetection: virtual Xeons with AMX are named "rocketlake" (a
    desktop chip that has no AMX) by LLVM's host detection, whose instruction scheduling for that
    chip spills one of the micro-kernel's 32 zmm registers to the stack in every k step; a CPU with
    AMX tiles is at least a Sapphire Rapids, and is named so. Values the user set are kept.
    Runs before Numba is imported below (Numba reads the variables then); if Numba was imported
    already, its configuration is reloaded, which holds for every kernel not yet compiled.
    Returns what was decided."""
    if os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("NUMBA_CPU_NAME"):
        return "set by user"
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    if not features.get("avx512f"):
        return "no AVX-512: LLVM's choice kept"
    os.environ["NUMBA_CPU_FEATURES"] = features.flatten() + ",-prefer-256-bit"
    decided = "NUMBA_CPU_FEATURES = the host's features + -prefer-256-bit"
    if llvm.get_host_cpu_name() == "rocketlake" and features.get("amx-tile"):
        os.environ["NUMBA_CPU_NAME"] = "sapphirerapids"
        decided += "; NUMBA_CPU_NAME = sapphirerapids (LLVM named this AMX CPU rocketlake)"
    if "numba.core.config" in sys.modules:
        sys.modules["numba.core.config"].reload_config()
    return decided


VECTOR_WIDTH_DECISION = use_512_bit_vectors()

from numba import njit as numba_njit  # noqa: E402  (after the step above)
from numba import prange  # noqa: E402, F401  (re-exported for kernel modules)

from npdiff.numba_cache import install_package_locators  # noqa: E402  (imports Numba: after the step above)

# A cached kernel is stale when ANY jitted module of npdiff changed, not only its own file (numba_cache.py)
PACKAGE_LOCATORS_INSTALLED = install_package_locators()


def njit(*args, **options):
    """numba.njit, with fastmath=False unless the kernel names its own flags.

    Why it matters: Numba compiles a jitted callee the first time a caller is compiled, and a callee
    with no fastmath option of its own INHERITS the flags of that first caller (numba/core/cpu.py:
    `flags.inherit_if_not_set("fastmath")`). That one compiled version is kept (and cached on disk) for
    every later caller. So a sum written with no flag (norm.mean_and_rstd, the lane sums) ran with
    'reassoc' when a FASTMATH caller happened to be compiled first, and in its written order when
    not: its bits hung on which kernels a process compiled before it. Saying fastmath=False here
    makes every function's flags its own."""
    options.setdefault("fastmath", False)
    if not options.get("parallel"):
        return numba_njit(*args, **options)
    if args:  # njit(function, parallel=True)
        return OneLaunchAtATime(numba_njit(*args, **options))
    return lambda function: OneLaunchAtATime(numba_njit(**options)(function))


PARALLEL_LAUNCH_LOCK = threading.RLock()  # held while a parallel kernel runs (the module docstring)


class OneLaunchAtATime:
    """A parallel Numba kernel that takes PARALLEL_LAUNCH_LOCK while it runs; its other attributes
    (py_func, signatures, ...) are the Numba dispatcher's."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.__wrapped__ = dispatcher
        self.__name__, self.__doc__ = dispatcher.__name__, dispatcher.__doc__

    def __call__(self, *args, **kwargs):
        with PARALLEL_LAUNCH_LOCK:
            return self.dispatcher(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.dispatcher, name)


FASTMATH_CONTRACT = {"contract"}

PARALLEL = dict(parallel=True, cache=True, nogil=True, error_model="numpy")
SERIAL = dict(cache=True, nogil=True, error_model="numpy")
