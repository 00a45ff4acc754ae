"""The block-parallel pool: worker threads for kernels that cut their work into independent blocks.

Attention (and conv's tiles) are cut into independent blocks, each a few small GEMMs plus
element-wise work; the right parallelism is one block per core, each block's GEMMs on its own core.
Left alone, every np.matmul a worker makes would fan out onto all of OpenBLAS's threads too: two
workers x two BLAS threads on two cores, with OpenBLAS serialising concurrent callers on its pool.

`BlockParallelPool.run(function, blocks)` calls function(block) for every block on the pool's
workers (one per CPU this process may use) and returns when all are done. While the blocks run,
OpenBLAS's thread count is 1, so each worker's matmuls stay on its core; when the last block is
done the count is set back to what it was, so the caller's own matmuls (linear, geglu, the next
GEMM on the main thread) get every core again. The count is one setting for the whole process:
OpenBLAS has no per-thread count in the builds NumPy ships. (Its `openblas_set_num_threads_local`
sets the same global count and returns the old one: called once in each worker, as npdiff once
did, it left the main thread's BLAS on one core for the rest of the process, measured: linear
[8192,320]x[1280,320]^T at 194 GFLOP/s in a fresh process, 101 after one conv2d.) Concurrent
callers of run() are counted, so the count is set to 1 by the first and restored by the last.
Where OpenBLAS's thread count can't be set (NumPy on another BLAS), the pool has a single worker,
so nothing is oversubscribed: correct, only not parallel.

The kernels' element-wise parts are Numba functions compiled with nogil=True, and np.matmul
releases the GIL, so the workers really run at the same time; only the Python glue between calls
takes the GIL. Idle workers wait on a queue (no spinning), as do Numba's threads (npdiff/startup.py
picks its workqueue/TBB layer) and OpenBLAS's (npdiff/startup.py: OPENBLAS_THREAD_TIMEOUT).

`shared_pool()` is the one pool every kernel uses (created on first use); `run_blocks(function,
blocks)` runs on it; `split_evenly(total, max_part, images, workers)` cuts a range into equal blocks.
A forked child starts its own pool (npdiff/startup.py's fork handler).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from npdiff import blas

THREAD_PREFIX = "npdiff-blocks"


def worker_count():
    """Threads for block-parallel kernels: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class SingleThreadedBlas:
    """A context: OpenBLAS's thread count is 1 inside, what it was before outside. Nested and
    concurrent uses are counted: the first entry saves and sets, the last exit restores."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = None

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                self._saved = blas.get_num_threads()
                blas.set_num_threads(1)
            self._users += 1

    def active(self):
        return self._users > 0

    @property
    def saved(self):
        return self._saved

    def __exit__(self, *exc):
        with self._lock:
            self._users -= 1
            if self._users == 0:
                blas.set_num_threads(self._saved)


class BlockParallelPool:
    """Worker threads (one per CPU) that run a kernel's independent blocks, each block's BLAS calls
    on the worker's own core."""

    def __init__(self, workers=None):
        self.single_threaded_blas = (blas.openblas_function("get_num_threads") is not None
                                     and blas.openblas_function("set_num_threads") is not None)
        self.workers = (workers or worker_count()) if self.single_threaded_blas else 1
        self._blas_on_one_core = SingleThreadedBlas()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=THREAD_PREFIX)

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

        with self._blas_on_one_core:  # 1 OpenBLAS thread while the workers run, then as before
            futures = [self._executor.submit(work) for _ in range(workers)]
            for future in futures:
                future.exception()  # wait for every worker, failed or not
        for future in futures:
            future.result()  # re-raise the first failure

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
    drop it (a fresh one starts on first use) and the lock, which another thread may have held. If a
    thread of the parent was inside run() at the fork, the child gets OpenBLAS's thread count back."""
    global _shared, _lock
    if _shared is not None and _shared._blas_on_one_core.active():
        blas.set_num_threads(_shared._blas_on_one_core.saved)
    _lock = threading.Lock()
    _shared = None


def run_blocks(function, blocks):
    """function(block) for every block, on the shared pool (see BlockParallelPool.run)."""
    shared_pool().run(function, blocks)


def split_evenly(total, max_part, images=1, workers=1):
    """[(start, stop), ...] covering range(total) in equal-as-possible parts of at most max_part.

    With `images` images each cut this way and `workers` threads, the number of parts is raised
    (while parts stay non-empty) until images * parts is a multiple of workers, so every worker
    gets the same number of equal tiles: 5 tiles on 2 workers would leave one idle for a fifth.
    """
    parts = -(-total // max(1, max_part))
    while (images * parts) % workers and parts < total:
        parts += 1
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for p in range(parts):
        stop = start + base + (1 if p < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
