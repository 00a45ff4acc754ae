"""Scratch arrays per thread, reused from call to call: the one mechanism every kernel uses for its
temporary tiles (attention's score tiles and copies of strided inputs, conv's im2col tiles, Winograd's
transformed tiles).

    scratch(name, shape) -> float32 array       this thread's buffer `name` as a C-contiguous array of
                                                `shape`, grown when a call needs more; valid until this
                                                thread asks for `name` again
    contiguous_in_scratch(x, name)              x itself when it is C-contiguous float32, else a copy of
                                                it in scratch(name, x.shape)

Why reuse: a fresh array of a few hundred KiB or more comes from mmap and goes back with munmap, whose
page faults and cross-core TLB flushes cost more than a small attention. Each thread (the block pool's
workers, the main thread) has its own buffers, so no two threads ever write the same one. Each kernel
names its buffers ("conv cols", "winograd input", "fused_k", ...): two kernels never share a name.
"""

import math
import threading

import numpy as np


class ThreadScratch(threading.local):
    """Float32 scratch arrays of the calling thread, by name, kept between calls."""

    def __init__(self):
        self.flat = {}  # name -> 1-D float32 array, as large as the largest request so far

    def get(self, name, shape):
        size = math.prod(shape)
        flat = self.flat.get(name)
        if flat is None or flat.size < size:
            flat = np.empty(size, np.float32)
            self.flat[name] = flat
        return flat[:size].reshape(shape)  # C-contiguous view


_SCRATCH = ThreadScratch()


def scratch(name, shape):
    """This thread's float32 buffer `name` as a C-contiguous array of `shape` (an int or a tuple)."""
    return _SCRATCH.get(name, (shape,) if isinstance(shape, int) else tuple(shape))


def contiguous_in_scratch(x, name):
    """x as a C-contiguous float32 array: x itself when it is one, else a copy into this thread's
    buffer `name` (valid until the thread's next call that uses that name)."""
    if x.flags.c_contiguous and x.dtype == np.float32:
        return x
    copy = scratch(name, x.shape)  # contiguous
    np.copyto(copy, x)
    return copy
