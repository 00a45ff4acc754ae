"""The block-parallel pool: worker threads for kernels that cut their work into independent blocks.

Attention (and conv's tiles) are cut into independent blocks, each a few small GEMMs plus
element-wise work; the right parallelism is one block per core, each block's GEMMs on its own core.
Left alone, every np.matmul a worker makes would fan out onto all of OpenBLAS's threads too: two
workers x two BLAS threads on two cores, with OpenBLAS serialising concurrent callers on its pool.

`BlockParallelPool.run(function, blocks)` calls function(block) for every block on the pool's
workers (one per CPU this process may use) and returns when all are done. Each worker calls
OpenBLAS's `openblas_set_num_threads_local(1)` once, when the pool starts the thread, so that the
worker's matmuls stay on its core. Where the symbol is missing (NumPy on another BLAS, an old
OpenBLAS), the pool has a single worker, so nothing is oversubscribed: correct, only not parallel.

The kernels' element-wise parts are Numba functions compiled with nogil=True, and np.matmul
releases the GIL, so the workers really run at the same time; only the Python glue between calls
takes the GIL.

`shared_pool()` is the one pool every kernel uses (created on first use); `run_blocks(function,
blocks)` runs on it. A forked child starts its own (npdiff/startup.py's fork handler).
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from npdiff import blas

THREAD_PREFIX = "npdiff-blocks"
LOCAL_THREADS_SYMBOL = "openblas_set_num_threads_local"


def worker_count():
    """Threads for block-parallel kernels: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _local_threads_setter():
    """OpenBLAS's openblas_set_num_threads_local, or None where NumPy's BLAS has none."""
    function = blas.openblas_function(LOCAL_THREADS_SYMBOL)
    if function is not None:
        function.argtypes = [ctypes.c_int]
        function.restype = ctypes.c_int
    return function


class BlockParallelPool:
    """Worker threads (one per CPU) that run a kernel's independent blocks, each block's BLAS calls
    on the worker's own core."""

    def __init__(self, workers=None):
        self._set_local_threads = _local_threads_setter()
        self.single_threaded_blas = self._set_local_threads is not None
        self.workers = (workers or worker_count()) if self.single_threaded_blas else 1
        initializer = self._set_local_threads and (lambda: self._set_local_threads(1))
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=THREAD_PREFIX,
                                            initializer=initializer)

    def run(self, function, blocks):
        """function(block) for every block, on the pool's workers; returns when all are done.

        Each worker takes the next block from a shared iterator when it finishes one (dynamic
        scheduling: a worker slowed down by another process on its core simply takes fewer
        blocks). The first exception is re-raised here. Called from one of this pool's workers (a
        kernel inside another kernel's block), the blocks run inline: a worker waiting on its own
        pool could deadlock.
        """
        workers = min(self.workers, len(blocks))
        inside_worker = threading.current_thread().name.startswith(THREAD_PREFIX)
        if workers <= 1 or inside_worker:
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

        futures = [self._executor.submit(work) for _ in range(workers)]
        for future in futures:
            future.result()

    def shutdown(self):
        self._executor.shutdown(wait=True)


_lock = threading.Lock()
_shared = None


def shared_pool():
    """The BlockParallelPool every kernel uses, created on first use."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = BlockParallelPool()
        return _shared


def forget_after_fork():
    """In a forked child (npdiff/startup.py's fork handler): the pool's threads were not copied, so
    drop it (a fresh one starts on first use) and the lock, which another thread may have held."""
    global _shared, _lock
    _lock = threading.Lock()
    _shared = None


def run_blocks(function, blocks):
    """function(block) for every block, on the shared pool (see BlockParallelPool.run)."""
    shared_pool().run(function, blocks)
