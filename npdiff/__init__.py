"""npdiff: Stable Diffusion in pure NumPy/Numba, written to be read, measured and trusted.

Importing npdiff imports only NumPy; what else happens at import is listed in npdiff/startup.py.
Numba compiles kernels lazily on first use; torch is never imported by the package; CuPy only when
the cupy backend is asked for (`npdiff.backend.use("cupy")` or NPDIFF_BACKEND=cupy).
"""

from npdiff import startup as _startup

_startup.run()  # first: it must see NumPy not yet imported (see npdiff/startup.py)

from npdiff.errors import NpdiffError  # noqa: E402

__version__ = "0.1.0"

# Heavy parts load on first use, so `import npdiff` stays light.
_LAZY = {
    "StableDiffusionPipeline": "npdiff.pipeline",
    "StableDiffusionXLPipeline": "npdiff.pipeline_sdxl",
    "StableDiffusionControlNetPipeline": "npdiff.pipeline_controlnet",
    "StableDiffusionXLControlNetPipeline": "npdiff.pipeline_controlnet_sdxl",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'npdiff' has no attribute {name!r}")


__all__ = ["NpdiffError", "StableDiffusionControlNetPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline",
           "StableDiffusionXLControlNetPipeline", "__version__"]
