"""Worker threads whose BLAS calls run single-threaded, for kernels that split work themselves.

Attention (and conv's tiles) are cut into independent blocks, each a few small GEMMs plus
element-wise work; the right parallelism is one block per core, each block's GEMMs on its own core.
Left alone, every np.matmul a worker makes would fan out onto all of OpenBLAS's threads too: two
workers x two BLAS threads on two cores, with OpenBLAS serialising concurrent callers on its pool.

OpenBLAS (0.3.27+) has `openblas_set_num_threads_local(n)`: a per-thread BLAS thread count. Each
worker of `blas_worker_pool()` sets it to 1 once, when the pool starts the thread, so NumPy's
matmul in that worker runs on the worker's core only; the main thread is never touched. Where the
symbol is missing (NumPy on another BLAS, an old OpenBLAS), the pool has a single worker, so
nothing is oversubscribed: correct, only not parallel.

The kernels' element-wise parts are Numba functions compiled with nogil=True, and np.matmul
releases the GIL, so the workers really run at the same time; only the Python glue between calls
takes the GIL.
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

THREAD_PREFIX = "npdiff-blas"
_lock = threading.Lock()
_pool = None
_set_local_threads = None  # the ctypes function, found once


def _find_set_local_threads():
    """openblas_set_num_threads_local from the OpenBLAS that NumPy loaded, or None."""
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
        function = getattr(library, "openblas_set_num_threads_local", None)
        if function is not None:
            function.argtypes = [ctypes.c_int]
            function.restype = ctypes.c_int
            return function
    return None


def worker_count():
    """Threads for block-parallel kernels: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _single_threaded_blas():
    _set_local_threads(1)


def blas_worker_pool():
    """The shared ThreadPoolExecutor (created on first use) whose workers run BLAS single-threaded."""
    global _pool, _set_local_threads
    with _lock:
        if _pool is None:
            _set_local_threads = _find_set_local_threads()
            if _set_local_threads is None:
                _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_PREFIX)
            else:
                _pool = ThreadPoolExecutor(max_workers=worker_count(), thread_name_prefix=THREAD_PREFIX,
                                           initializer=_single_threaded_blas)
        return _pool


def run_blocks(function, blocks):
    """function(block) for every block, on the pool's workers; returns when all are done.

    Each worker takes the next block from a shared iterator when it finishes one (dynamic
    scheduling: a worker slowed down by another process on its core simply takes fewer blocks).
    The first exception is re-raised here.
    """
    pool = blas_worker_pool()
    workers = min(pool._max_workers, len(blocks))
    inside_worker = threading.current_thread().name.startswith(THREAD_PREFIX)
    if workers <= 1 or inside_worker:  # a worker waiting on its own pool could deadlock: run inline
        for block in blocks:
            function(block)
        return
    pending = iter(blocks)
    take_lock = threading.Lock()

    def work():
        while True:
            with take_lock:
                block = next(pending, None)
            if block is None:
                return
            function(block)

    futures = [pool.submit(work) for _ in range(workers)]
    for future in futures:
        future.result()
