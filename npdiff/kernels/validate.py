"""Input checks shared by the kernels: each raises NpdiffError naming the kernel, the argument, and
the expected vs the actual dtype/shape. Works for numpy and cupy arrays (only .dtype/.shape/.ndim).
Also the convolution's argument arithmetic (pair, output_size), shared by conv.py, conv_winograd.py
and cuda/conv.py.
"""

import numpy as np

from npdiff.errors import NpdiffError


def shape_text(shape):
    return "[" + ",".join(str(s) for s in shape) + "]"


def require_array(kernel, name, a):
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise NpdiffError(f"{kernel}: {name} must be a float32 array, got {type(a).__name__}")


def require_float32(kernel, name, a):
    """a is a numpy/cupy array of dtype float32 (a cupy array may also be float16: the GPU's fp16 option)."""
    require_array(kernel, name, a)
    if a.dtype != np.float32 and not (a.dtype == np.float16 and not isinstance(a, np.ndarray)):
        raise NpdiffError(f"{kernel}: {name} must be float32, got {a.dtype} with shape {shape_text(a.shape)}")


def require_ndim(kernel, name, a, ndim, layout):
    """a has exactly `ndim` axes; `layout` (e.g. "[B,C,H,W]") says what they are."""
    require_float32(kernel, name, a)
    if a.ndim != ndim:
        raise NpdiffError(f"{kernel}: {name} must be {ndim}-D {layout}, got shape {shape_text(a.shape)}")


def require_min_ndim(kernel, name, a, ndim, layout):
    require_float32(kernel, name, a)
    if a.ndim < ndim:
        raise NpdiffError(f"{kernel}: {name} must have at least {ndim} axes {layout}, "
                          f"got shape {shape_text(a.shape)}")


def require_shape(kernel, name, a, expected, layout=None):
    """a has shape `expected` (a tuple; None entries match any size)."""
    require_float32(kernel, name, a)
    ok = a.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, a.shape))
    if not ok:
        wanted = shape_text("?" if e is None else e for e in expected)
        if layout:
            wanted = f"{layout} = {wanted}"
        raise NpdiffError(f"{kernel}: {name} must have shape {wanted}, got {shape_text(a.shape)}")


def require_optional_vector(kernel, name, a, length):
    """None, or a float32 vector of `length` entries (a bias, a norm's weight)."""
    if a is None:
        return
    require_shape(kernel, name, a, (length,))


def pair(kernel, name, value):
    """An int or a pair of ints (as torch's stride/padding) -> (int, int), checked >= 0."""
    if isinstance(value, (int, np.integer)):
        result = (int(value), int(value))
    else:
        try:
            result = tuple(int(v) for v in value)
        except TypeError:
            result = ()
        if len(result) != 2:
            raise NpdiffError(f"{kernel}: {name} must be an int or a pair of ints, got {value!r}")
    if min(result) < 0:
        raise NpdiffError(f"{kernel}: {name} must be >= 0, got {value!r}")
    return result


def output_size(size, kernel_size, stride, padding):
    """A convolution's output length along one axis (torch's formula, dilation 1)."""
    return (size + 2 * padding - kernel_size) // stride + 1
