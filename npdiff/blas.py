"""NumPy's BLAS (OpenBLAS): which kernels it runs, and its thread count, in one place.

NumPy's wheels bundle OpenBLAS, which picks its kernels from the CPU model at load time. On AMD CPUs
with AVX-512 (Zen 4 and later) it picks the AVX2 "Haswell"/"Zen" kernels, and sgemm runs at about half
the speed the AVX-512 "SkylakeX" kernels reach (measured here: ~230 vs ~450 GFLOP/s on 2 cores).
OpenBLAS reads the environment variable OPENBLAS_CORETYPE *once, when NumPy is first imported*, so
the choice has to be made before `import numpy`:

  1. `import npdiff` runs npdiff/startup.py, which calls `prefer_avx512_openblas()` before NumPy is
     imported. If the CPU has AVX-512F and the user has not set OPENBLAS_CORETYPE, it sets
     OPENBLAS_CORETYPE=SkylakeX.
  2. If NumPy was already imported (by you, or by another library), it is too late; npdiff changes
     nothing and `blas_info()` says so, with the variable to set.
  3. Set NPDIFF_OPENBLAS_CORETYPE=keep to leave OpenBLAS alone, or set OPENBLAS_CORETYPE yourself.

The library itself is found once (`openblas_library()`: the OpenBLAS mapped into this process once
NumPy is loaded, read from /proc/self/maps), and every call npdiff makes into it goes through this
module: `openblas_corename()` (the core type it actually chose, which `blas_info()` reports so
benchmarks print what they ran on), `get_num_threads()` / `set_num_threads()` (the thread count of
OpenBLAS's own pool, one setting for the whole process: OpenBLAS has no per-thread count, see
npdiff/kernels/block_pool.py).

`prefer_short_openblas_spin()` (also before NumPy loads) shortens the time OpenBLAS's idle threads
spin before they sleep, so they do not take cores from the kernel that runs after a GEMM.

This module must not import NumPy at import time (step 1 runs before NumPy is imported).
"""

import ctypes
import os
import sys
import threading

AVX512_CORETYPE = "SkylakeX"
# How long OpenBLAS's idle threads spin before they sleep, as OPENBLAS_THREAD_TIMEOUT: 2^20 TSC
# ticks, ~0.3 ms at 3 GHz (OpenBLAS's default is 2^28, ~0.1 s). Long enough to stay awake between
# back-to-back GEMMs (q, k, v projections), short enough not to compete with the Numba kernel or the
# block pool that runs next.
THREAD_TIMEOUT_LOG2 = 20
# The same function under the names of the builds NumPy ships (scipy-openblas: prefixed, 64-bit
# integers) and of a plain OpenBLAS.
SYMBOLS = {
    "get_corename": ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename64_", "openblas_get_corename"),
    "get_num_threads": ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                        "openblas_get_num_threads64_", "openblas_get_num_threads"),
    "set_num_threads": ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                        "openblas_set_num_threads64_", "openblas_set_num_threads"),
}

_decision = None  # what prefer_avx512_openblas() decided (npdiff/startup.py calls it once)
_library_lock = threading.Lock()
_library = None  # the ctypes.CDLL of NumPy's OpenBLAS, found once
_library_searched = False


def cpu_has_avx512f():
    """True when /proc/cpuinfo lists avx512f (Linux); False where it can't be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def prefer_avx512_openblas():
    """Ask OpenBLAS for its AVX-512 kernels, if that is still possible. Returns (and keeps, for
    blas_info) what was decided."""
    global _decision
    if os.environ.get("NPDIFF_OPENBLAS_CORETYPE", "").lower() == "keep":
        _decision = "kept (NPDIFF_OPENBLAS_CORETYPE=keep)"
    elif "OPENBLAS_CORETYPE" in os.environ:
        _decision = f"set by user: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}"
    elif "numpy" in sys.modules:
        _decision = "too late: numpy was imported before npdiff"
    elif not cpu_has_avx512f():
        _decision = "CPU has no AVX-512: OpenBLAS default"
    else:
        os.environ["OPENBLAS_CORETYPE"] = AVX512_CORETYPE
        _decision = f"set OPENBLAS_CORETYPE={AVX512_CORETYPE}"
    return _decision


def prefer_short_openblas_spin():
    """Ask OpenBLAS's idle threads to sleep soon (OPENBLAS_THREAD_TIMEOUT), if that is still
    possible: like the core type, OpenBLAS reads it when NumPy loads it. Returns what was decided."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return f"set by user: OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']}"
    if "numpy" in sys.modules:
        return "too late: numpy was imported before npdiff"
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(THREAD_TIMEOUT_LOG2)
    return f"set OPENBLAS_THREAD_TIMEOUT={THREAD_TIMEOUT_LOG2}"


# ---------------------------------------------------------------------------------------------
# The library, found once
# ---------------------------------------------------------------------------------------------
def openblas_library():
    """The OpenBLAS that NumPy loaded, as a ctypes.CDLL (found once; None if NumPy's BLAS is not
    OpenBLAS or /proc/self/maps can't be read). The first OpenBLAS library in the process's memory
    map that has a corename or thread-count function is taken: NumPy's, since NumPy is imported
    here first and torch (whose OpenBLAS, if any, would be a second one) is never imported by npdiff."""
    global _library, _library_searched
    with _library_lock:
        if not _library_searched:
            _library = _find_openblas()
            _library_searched = True
        return _library


def _find_openblas():
    import numpy  # noqa: F401  (the library must be loaded to appear in the maps)

    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        if any(hasattr(library, name) for names in SYMBOLS.values() for name in names):
            return library
    return None


def openblas_function(kind):
    """The ctypes function `kind` (a key of SYMBOLS, or an exact symbol name) of NumPy's OpenBLAS,
    or None where the library or the symbol is missing."""
    library = openblas_library()
    if library is None:
        return None
    for name in SYMBOLS.get(kind, (kind,)):
        function = getattr(library, name, None)
        if function is not None:
            return function
    return None


def openblas_corename():
    """The core type OpenBLAS chose, read from the loaded library (None if not OpenBLAS)."""
    function = openblas_function("get_corename")
    if function is None:
        return None
    function.restype = ctypes.c_char_p
    return function().decode()


def get_num_threads():
    """Threads of OpenBLAS's pool that the next BLAS call may use (None if not OpenBLAS)."""
    function = openblas_function("get_num_threads")
    if function is None:
        return None
    function.restype = ctypes.c_int
    return int(function())


def set_num_threads(threads):
    """Set OpenBLAS's thread count for the whole process (every thread's BLAS calls). Returns the
    symbol used, or None if NumPy's BLAS is not OpenBLAS."""
    function = openblas_function("set_num_threads")
    if function is None:
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = None
    function(int(threads))
    return function.__name__


def blas_info():
    """A dict saying which BLAS kernels NumPy runs on and why."""
    corename = openblas_corename()
    info = {
        "openblas_corename": corename,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "cpu_avx512f": cpu_has_avx512f(),
        "npdiff_decision": _decision,
        "openblas_threads": get_num_threads(),
    }
    if info["cpu_avx512f"] and corename and corename.lower() not in ("skylakex", "cooperlake",
                                                                     "sapphirerapids"):
        info["hint"] = ("OpenBLAS runs AVX2 kernels on this AVX-512 CPU; set "
                        "OPENBLAS_CORETYPE=SkylakeX before numpy is imported for ~2x sgemm")
    return info
