"""The array module in one place: NumPy by default, CuPy when asked for.

Models and reference kernels are written against the NumPy API and ask this module which array
library to use, so the same code runs on cupy arrays on an NVIDIA GPU:

    xp = backend.array_module(x)      # numpy or cupy, whichever x belongs to
    y = xp.exp(x)

Choosing the backend:
    npdiff.backend.use("cupy")        # or NPDIFF_BACKEND=cupy in the environment (read once, by
                                      # npdiff/startup.py when npdiff is imported)
    npdiff.backend.use("cupy", dtype="float16")   # GPU in half precision (weights and activations)
    npdiff.backend.use("numpy")       # the default (always float32)

Numba kernels are the CPU fast path; npdiff/kernels/dispatch.py sends NumPy arrays to them and cupy
arrays to the CUDA kernels of npdiff/kernels/cuda/. Weights are moved to the device once,
at load, with `to_device`; activations then stay on the device until `to_numpy`.
"""

import numpy as np

from npdiff.errors import NpdiffError

KNOWN = ("numpy", "cupy")
_ALIASES = {"numpy": "numpy", "cpu": "numpy", "cupy": "cupy", "cuda": "cupy", "gpu": "cupy"}
DEVICE_DTYPES = ("float32", "float16")
_active = "numpy"
_device_dtype = "float32"  # what to_device makes floats into on the cupy backend


def _import_cupy():
    try:
        import cupy
    except ImportError as exc:  # the message says how to get it
        raise NpdiffError(
            "the cupy backend needs CuPy and an NVIDIA GPU: pip install -e '.[gpu]' "
            f"(import failed: {exc})") from exc
    return cupy


def use(name, dtype="float32"):
    """Select the array backend for new arrays and loaded weights: 'numpy' (or 'cpu'), 'cupy' (or 'cuda').

    dtype: 'float32' (default) or, with cupy only, 'float16': then to_device (and so every weight at
    load) makes float16 arrays, and the CUDA kernels compute in half precision (sums in float)."""
    global _active, _device_dtype
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise NpdiffError(f"unknown backend {name!r}; known: {', '.join(KNOWN)}")
    try:
        dtype_name = np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        dtype_name = None
    if dtype_name not in DEVICE_DTYPES:
        raise NpdiffError(f"backend.use: dtype must be one of {', '.join(DEVICE_DTYPES)}, got {dtype!r}")
    if key == "numpy" and dtype_name != "float32":
        raise NpdiffError(f"backend.use: dtype {dtype_name} needs the cupy backend; numpy computes in float32")
    if key == "cupy":
        _import_cupy()
    _active = key
    _device_dtype = dtype_name
    return key


def compute_dtype():
    """The float dtype to_device makes: 'float32', or 'float16' after use("cupy", dtype="float16")."""
    return _device_dtype


def name():
    """The active backend's name: 'numpy' or 'cupy'."""
    return _active


def xp():
    """The active array module (numpy or cupy)."""
    return _import_cupy() if _active == "cupy" else np


def is_numpy(x):
    """True for NumPy arrays (and memmaps): the arrays Numba kernels can take."""
    return isinstance(x, np.ndarray)


def array_module(x):
    """numpy or cupy, whichever the array x belongs to (without importing cupy for numpy arrays)."""
    if isinstance(x, np.ndarray) or not type(x).__module__.startswith("cupy"):
        return np
    import cupy

    return cupy


def to_device(a, dtype=None):
    """Array-like -> an array of the active backend with `dtype` (default: compute_dtype(), which
    is float32 unless use("cupy", dtype="float16") chose half). Copies at most once."""
    dtype = _device_dtype if dtype is None else dtype
    if _active == "cupy":
        cupy = _import_cupy()
        return cupy.asarray(a, dtype=dtype)
    if array_module(a) is not np:
        a = a.get()
    return np.ascontiguousarray(a, dtype=dtype)


def to_numpy(a):
    """Any array (numpy or cupy) -> a NumPy array."""
    if array_module(a) is np:
        return np.asarray(a)
    return a.get()
