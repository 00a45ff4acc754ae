"""npdiff: Stable Diffusion in pure NumPy/Numba, written to be read, measured and trusted.

Importing npdiff imports only NumPy. Numba compiles kernels lazily on first use; torch is never
imported by the package; CuPy only when `npdiff.backend.use("cupy")` asks for it.
"""

from npdiff import blas as _blas

# Must run before NumPy is imported anywhere: see npdiff/blas.py.
_blas._DECISION = _blas.prefer_avx512_openblas()

import numpy as _np  # noqa: E402,F401

from npdiff.errors import NpdiffError  # noqa: E402

__version__ = "0.1.0"

# Heavy parts load on first use, so `import npdiff` stays light.
_LAZY = {
    "StableDiffusionPipeline": "npdiff.pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'npdiff' has no attribute {name!r}")


__all__ = ["NpdiffError", "StableDiffusionPipeline", "__version__"]
