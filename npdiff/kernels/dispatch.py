"""Which version of a kernel runs on which array: decided here, once, for every kernel.

Every public kernel has up to three versions, and the words mean the same thing in every file:
  reference  `<name>_ref`: the plain, readable version in the NumPy API only (so it runs on numpy
             and cupy arrays alike): the formula as torch documents it, what the other versions
             are tested against.
  fast       `<name>_fast`: the version for NumPy arrays made fast on the CPU (Numba loops, OpenBLAS
             sgemm through np.matmul, threads).
  cuda       the CUDA version for cupy arrays: a function of npdiff/kernels/cuda/, named here and
             looked up there on every call (so a test can stand in for it); a kernel without one
             runs its reference on cupy arrays (cuBLAS does its matmuls).

The rule, applied to the kernel's first array argument (x, or q for attention):
  a cupy array                         -> cuda (the reference where there is none)
  a NumPy array with at least one value -> fast
  anything else                        -> reference (an empty NumPy array: nothing to be fast about,
                                          and the Numba loops assume at least one element)

A family file declares its versions once, next to its public function, which checks the inputs
and then hands over:

    SOFTMAX = dispatch.register("softmax", fast=softmax_fast, reference=softmax_ref, cuda="softmax")

    def softmax(x, axis=-1):
        ...checks...
        return SOFTMAX(x, axis)

`KERNELS` lists every registered kernel by name (tests check the rule on each of them).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from npdiff.kernels import cuda  # imports no cupy: its kernels compile on first use

KERNELS = {}  # name -> Versions, in registration order


def is_cupy(x):
    """True for cupy arrays (decided by the type's module, so cupy is never imported here)."""
    return type(x).__module__.startswith("cupy")


@dataclass(frozen=True)
class Versions:
    """The versions of one kernel; calling it runs the one `pick` chooses for the first argument."""

    name: str
    fast: Callable
    reference: Callable
    cuda: Optional[str] = None  # a function of npdiff.kernels.cuda, by name

    def pick(self, x):
        """The version that runs on array x (the rule in this file's header)."""
        if is_cupy(x):
            if self.cuda is None:
                return self.reference
            return getattr(cuda, self.cuda)
        if isinstance(x, np.ndarray) and x.size > 0:
            return self.fast
        return self.reference

    def __call__(self, x, *args, **kwargs):
        return self.pick(x)(x, *args, **kwargs)


def register(name, *, fast, reference, cuda=None):
    """Declare a kernel's versions; returns the Versions to call."""
    versions = Versions(name, fast, reference, cuda)
    KERNELS[name] = versions
    return versions
