"""Which BLAS kernels NumPy uses, and how npdiff gets the fast ones.

NumPy's wheels bundle OpenBLAS, which picks its kernels from the CPU model at load time. On AMD CPUs
with AVX-512 (Zen 4 and later) it picks the AVX2 "Haswell"/"Zen" kernels, and sgemm runs at about half
the speed the AVX-512 "SkylakeX" kernels reach (measured here: ~230 vs ~450 GFLOP/s on 2 cores).
OpenBLAS reads the environment variable OPENBLAS_CORETYPE *once, when NumPy is first imported*, so
the choice has to be made before `import numpy`:

  1. `import npdiff` calls `prefer_avx512_openblas()` before it imports NumPy. If the CPU has
     AVX-512F and the user has not set OPENBLAS_CORETYPE, it sets OPENBLAS_CORETYPE=SkylakeX.
  2. If NumPy was already imported (by you, or by another library), it is too late; npdiff changes
     nothing and `blas_info()` says so, with the variable to set.
  3. Set NPDIFF_OPENBLAS_CORETYPE=keep to leave OpenBLAS alone, or set OPENBLAS_CORETYPE yourself.

`blas_info()` reports the core type OpenBLAS actually chose (asked from the library itself), so
benchmarks can print which kernels they ran on.
"""

import ctypes
import os
import sys

AVX512_CORETYPE = "SkylakeX"


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
    """Ask OpenBLAS for its AVX-512 kernels, if that is still possible. Returns what was decided."""
    if os.environ.get("NPDIFF_OPENBLAS_CORETYPE", "").lower() == "keep":
        return "kept (NPDIFF_OPENBLAS_CORETYPE=keep)"
    if "OPENBLAS_CORETYPE" in os.environ:
        return f"set by user: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}"
    if "numpy" in sys.modules:
        return "too late: numpy was imported before npdiff"
    if not cpu_has_avx512f():
        return "CPU has no AVX-512: OpenBLAS default"
    os.environ["OPENBLAS_CORETYPE"] = AVX512_CORETYPE
    return f"set OPENBLAS_CORETYPE={AVX512_CORETYPE}"


_DECISION = None  # filled by npdiff/__init__.py


def _openblas_corename():
    """The core type OpenBLAS chose, read from the loaded library (None if not OpenBLAS)."""
    import numpy  # noqa: F401  (make sure the library is loaded)

    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                       "openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return None


def blas_info():
    """A dict saying which BLAS kernels NumPy runs on and why."""
    corename = _openblas_corename()
    info = {
        "openblas_corename": corename,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "cpu_avx512f": cpu_has_avx512f(),
        "npdiff_decision": _DECISION,
    }
    if info["cpu_avx512f"] and corename and corename.lower() not in ("skylakex", "cooperlake",
                                                                     "sapphirerapids"):
        info["hint"] = ("OpenBLAS runs AVX2 kernels on this AVX-512 CPU; set "
                        "OPENBLAS_CORETYPE=SkylakeX before numpy is imported for ~2x sgemm")
    return info
