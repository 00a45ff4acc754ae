"""NumPy's BLAS (OpenBLAS): which kernels it runs, and its thread count, in one place.

NumPy's wheels bundle OpenBLAS ("scipy-openblas", 64-bit integers, its symbols prefixed), which
picks its kernels from the CPU when NumPy is first imported. On Intel CPUs with AVX-512 it picks its
AVX-512 "SkylakeX" kernels itself (checked here on an AVX-512/AMX Xeon: NumPy 2 with OpenBLAS
0.3.31, imported before or after npdiff, reports SkylakeX, since the Sapphire Rapids and Cooper
Lake entries map to it in NumPy's build). On AMD's AVX-512 CPUs (Zen 4 and later) OpenBLAS before
0.3.21 picked its AVX2 "Zen"/"Haswell" kernels, about half the sgemm speed; 0.3.21 and later pick
SkylakeX there too. OpenBLAS reads OPENBLAS_CORETYPE *once, when NumPy is first imported*, so:

  1. `import npdiff` runs npdiff/startup.py, which calls `prefer_avx512_openblas()` before it
     imports NumPy. On an AMD CPU with AVX-512F, unless the user chose (OPENBLAS_CORETYPE, or
     NPDIFF_OPENBLAS_CORETYPE=keep), it sets OPENBLAS_CORETYPE=SkylakeX: harmless where OpenBLAS
     would pick it anyway, the fast kernels where it would not. Other CPUs are left alone.
  2. If NumPy was imported first it is too late to choose; `avx512_kernels_missed()` then says
     whether it mattered (an AVX-512 CPU running other kernels: only an old OpenBLAS on AMD), and
     npdiff/startup.py warns only then, with the variable to set. `blas_info()` reports it all.

The library itself is found once (`openblas_library()`: the OpenBLAS mapped into this process once
NumPy is loaded, read from /proc/self/maps), and every call npdiff makes into it goes through this
module: `openblas_corename()` (the core type it actually chose, which `blas_info()` reports so
benchmarks print what they ran on), `get_num_threads()` / `set_num_threads()` (the thread count of
OpenBLAS's own pool, one setting for the whole process: OpenBLAS has no per-thread count, see
npdiff/kernels/block_pool.py, which runs every npdiff GEMM on npdiff's own threads with the count
at 1 and puts it back after, so OpenBLAS's pool, and its busy-wait, never meets npdiff's kernels).

This module must not import NumPy at import time (step 1 runs before NumPy is imported).
"""

import ctypes
import os
import sys
import threading

AVX512_CORETYPE = "SkylakeX"
# OpenBLAS's core types whose sgemm is its AVX-512 one (lower case, as openblas_get_corename says)
AVX512_CORENAMES = ("skylakex", "cooperlake", "sapphirerapids")
AMD_VENDORS = ("AuthenticAMD", "HygonGenuine")
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


def _cpuinfo_field(name):
    """The first value of `name` in /proc/cpuinfo (Linux), split on spaces; [] where it can't be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.split()
    except OSError:
        pass
    return []


def cpu_has_avx512f():
    """True when /proc/cpuinfo lists avx512f (Linux); False where it can't be read."""
    return "avx512f" in _cpuinfo_field("flags")


def cpu_is_amd():
    """True on AMD (and Hygon) CPUs, by /proc/cpuinfo's vendor_id."""
    return any(vendor in AMD_VENDORS for vendor in _cpuinfo_field("vendor_id"))


def prefer_avx512_openblas():
    """Ask OpenBLAS for its AVX-512 kernels where it might not pick them itself (AMD), if that is
    still possible. Returns (and keeps, for blas_info) what was decided."""
    global _decision
    if os.environ.get("NPDIFF_OPENBLAS_CORETYPE", "").lower() == "keep":
        _decision = "kept (NPDIFF_OPENBLAS_CORETYPE=keep)"
    elif "OPENBLAS_CORETYPE" in os.environ:
        _decision = f"set by user: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}"
    elif not cpu_has_avx512f():
        _decision = "CPU has no AVX-512: OpenBLAS default"
    elif not cpu_is_amd():
        _decision = "not needed: OpenBLAS picks its AVX-512 kernels on this CPU itself"
    elif "numpy" in sys.modules:
        _decision = "too late: numpy was imported before npdiff"
    else:
        os.environ["OPENBLAS_CORETYPE"] = AVX512_CORETYPE
        _decision = f"set OPENBLAS_CORETYPE={AVX512_CORETYPE}"
    return _decision


def avx512_kernels_missed():
    """True when the CPU has AVX-512F but the loaded OpenBLAS runs other sgemm kernels (imports
    NumPy: call it once NumPy is loaded)."""
    corename = openblas_corename()
    return bool(cpu_has_avx512f() and corename and corename.lower() not in AVX512_CORENAMES)


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
    info = {
        "openblas_corename": openblas_corename(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "cpu_avx512f": cpu_has_avx512f(),
        "npdiff_decision": _decision,
        "openblas_threads": get_num_threads(),
    }
    if avx512_kernels_missed():
        info["hint"] = ("OpenBLAS runs AVX2 kernels on this AVX-512 CPU; set "
                        "OPENBLAS_CORETYPE=SkylakeX before numpy is imported for ~2x sgemm")
    return info
