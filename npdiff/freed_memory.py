"""Loop steps reuse the memory the step before freed (glibc's malloc, while a training or sampling loop runs).

    with keep_freed_memory():      # the pipeline's sampling loop
    with keep_freed_memory(heap_only=True):   # textual_inversion's and train_lora's step loops (below)
        for step in ...: ...

One step's UNet tape keeps ~2-3 GiB of activations at SD 1.5 size (64x64 latent) and the backward frees
them as it goes. glibc gives large freed blocks back to the kernel (munmap for blocks above its mmap
threshold; the top of a heap above its trim threshold), so the next step's forward takes them again page
by page: measured at SD 1.5 size, 64x64, batch 1 (benchmarks/training.py's step, load 3-5), 25 000-53 000
minor page faults and 1.0-1.4 s of kernel (sys) CPU time per step, the tape forward's CPU 0.7-0.9 s above
the plain UNet forward's, almost all of it sys. Faulting 1 GiB of fresh pages took 0.3-2.7 s here (2.7 s when the
kernel compacted memory for huge pages). A sampling loop is the same at a smaller scale: each UNet forward
frees its activations and the next takes them again; measured on the SD 1.5 UNet (batch 2, 64x64, one process,
load ~5): 8 000-17 000 minor faults and 0.35-0.72 s of sys CPU per forward, ~1 000 faults and 0.08-0.25 s inside
keep_freed_memory (the forward's ~13.5 CPU s otherwise the same).

keep_freed_memory() sets, for the loop it wraps, glibc's M_MMAP_THRESHOLD to its largest value (32 MiB:
blocks up to that come from the heaps, not from mmap) and M_TRIM_THRESHOLD to 2 GiB (freed memory stays
with the process), so from the third step on the forward writes into pages it already has (measured: 4 000-6 500
minor faults and 0.13-0.24 s sys per step; the whole step's CPU time 19.3-19.9 s -> 17.1-17.2 s together
with GEGLU's kept hidden layer and the batch-1 im2col rule). The peak memory is the same (the same arrays are alive at the peak);
between steps the process keeps its peak. On leaving, the trim threshold goes back to 64 MiB (where glibc's
own dynamic rule ends after freeing a block of 32 MiB or more, as every SD step does) and malloc_trim
gives the free memory back. Both thresholds are process-wide settings of glibc: setting them
explicitly turns off glibc's dynamic rule for the rest of the process (the values then stay where that rule
would have put them). Without glibc (musl, macOS, Windows) it does nothing.
"""

import ctypes
import ctypes.util
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_MAX_DEFAULT = 65536  # glibc's DEFAULT_MMAP_MAX
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_KEEP = 2**31 - 1  # the largest value mallopt's int takes: ~2 GiB
TRIM_THRESHOLD_AFTER = 2 * MMAP_THRESHOLD_MAX  # glibc's dynamic value after freeing a >= 32 MiB block


def _glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError, TypeError):
        return None


@contextmanager
def keep_freed_memory(heap_only=False):
    """While the block runs, memory freed by one training step stays for the next (see the header).

    heap_only (the training loops): no block comes from mmap either (glibc's M_MMAP_MAX 0, back to its
    default on leaving). A block above the 32 MiB threshold is served from a free heap chunk when one is
    large enough, else mmapped, faulted in page by page and unmapped again when freed: near a tape's peak
    no free chunk is left, so SD 1.5's last 64x64 GEGLU hidden layer (40 MiB) was a fresh mmap in every
    step, ~540-1070 minor faults and 0.11-0.13 s of sys time in that one call (98 ms wall against ~30 ms
    for the others; benchmarks/training.py's step 3, load ~2). From the heap, the pages stay for the next
    step (0 faults there). Not for the sampling loop: the VAE's large arrays would stay in the heap."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_KEEP)
    if heap_only:
        libc.mallopt(M_MMAP_MAX, 0)
    try:
        yield
    finally:
        if heap_only:
            libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_AFTER)
        libc.malloc_trim(0)
