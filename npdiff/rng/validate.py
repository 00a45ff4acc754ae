"""Argument checks shared by the generators: each raises NpdiffError naming the argument, what was
expected and what was given."""

import numbers

import numpy as np

from npdiff.errors import NpdiffError

UINT64_MOD = 2**64


def check_int(owner, argument, value, low, high):
    """An integer in [low, high] (bool, float, str, None are refused) -> Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise NpdiffError(f"{owner}: {argument} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise NpdiffError(f"{owner}: {argument} must be in [{low}, {high}], got {value}")
    return value


def check_seed(owner, seed, low, high):
    return check_int(owner, "seed", seed, low, high)


def check_shape(owner, shape):
    """An int or a sequence of ints >= 0 -> tuple of Python ints (torch's `size` argument)."""
    if isinstance(shape, (numbers.Integral, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)):
        raise NpdiffError(f"{owner}: shape must be an int or a tuple of ints, got {type(shape).__name__} "
                          f"{shape!r}")
    dims = []
    for axis, size in enumerate(shape):
        if isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Integral):
            raise NpdiffError(f"{owner}: shape[{axis}] must be an int, got {type(size).__name__} {size!r} "
                              f"in shape {tuple(shape)!r}")
        if size < 0:
            raise NpdiffError(f"{owner}: shape[{axis}] must be >= 0, got {size} in shape {tuple(shape)!r}")
        dims.append(int(size))
    return tuple(dims)


def check_dtype(owner, dtype, allowed):
    """dtype (a NumPy dtype, type, or name; 'bfloat16' is a name only) -> one of `allowed` (names)."""
    name = None
    if isinstance(dtype, str) and dtype.lower() in ("bfloat16", "bf16"):
        name = "bfloat16"
    elif dtype is not None:  # np.dtype(None) would mean float64
        try:
            name = np.dtype(dtype).name
        except (TypeError, ValueError):
            name = None
    if name not in allowed:
        raise NpdiffError(f"{owner}: dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return name


def check_choice(owner, argument, value, allowed):
    if value not in allowed:
        raise NpdiffError(f"{owner}: {argument} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value
