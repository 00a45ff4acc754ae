"""The block-parallel pool: the threads every npdiff GEMM runs on, and kernels cut into blocks.

Attention (and conv's tiles) are cut into independent blocks, each a few small GEMMs plus
element-wise work; the right parallelism is one block per core, each block's GEMMs on its own core.
Left alone, every np.matmul a worker makes would fan out onto all of OpenBLAS's threads too: two
workers x two BLAS threads on two cores, with OpenBLAS serialising concurrent callers on its pool.

`BlockParallelPool.run(function, blocks)` calls function(block) for every block on as many threads
as this process may use CPUs (the calling thread and pool workers) and returns when all are done.
While the blocks run, OpenBLAS's thread count is 1, so each thread's matmuls stay on its core; when
the last block is done the count is set back to what it was, so the user's own matmuls after npdiff
returns get every core again. The count is one setting for the whole process: OpenBLAS has no
per-thread count in the builds NumPy ships. (Its `openblas_set_num_threads_local` sets the same
global count and returns the old one: called once in each worker, as npdiff once did, it left the
main thread's BLAS on one core for the rest of the process, measured: linear [8192,320]x[1280,320]^T
at 194 GFLOP/s in a fresh process, 101 after one conv2d.) Concurrent callers of run() are counted,
so the count is set to 1 by the first and restored by the last; a numpy call another thread of the
user's makes *while* npdiff's blocks run gets one thread too (the price of a process-wide count).
Where OpenBLAS's thread count can't be set (NumPy on another BLAS), the pool has a single worker,
so nothing is oversubscribed: correct, only not parallel.

npdiff owns the threads of every GEMM it issues: `matmul(a, b)` is np.matmul cut into one block
per worker (rows, or columns when there are fewer rows than columns), each a one-thread sgemm on
the pool. So npdiff never wakes OpenBLAS's own threads, and their busy-wait after a call (OpenBLAS
spins its idle threads for 2^28 TSC ticks, ~0.1 s, before they sleep: a compile-time default that
only the environment variable OPENBLAS_THREAD_TIMEOUT, read when NumPy loads OpenBLAS, can change)
never takes a core from the Numba kernel or the blocks that run next. This holds whichever of
numpy, torch or npdiff a script imports first; before it, npdiff's linear layers ran on OpenBLAS's
pool from the main thread and the SD 1.5 UNet lost ~20% when numpy was imported first.

The kernels' element-wise parts are Numba functions compiled with nogil=True, and np.matmul
releases the GIL, so the workers really run at the same time; only the Python glue between calls
takes the GIL. Idle workers wait on a queue (no spinning), as do Numba's threads (npdiff/startup.py
picks its workqueue/TBB layer).

`shared_pool()` is the one pool every kernel uses (created on first use); `run_blocks(function,
blocks)` runs on it; `matmul(a, b, out)` is its GEMM; `split_evenly(total, max_part, images,
workers)` cuts a range into equal blocks. A forked child starts its own pool (npdiff/startup.py's
fork handler).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from npdiff import blas

THREAD_PREFIX = "npdiff-blocks"


class _InBlock(threading.local):
    """Whether this thread is running a block of BlockParallelPool.run (a worker, or the caller)."""
    active = False


_in_block = _InBlock()


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
        """function(block) for every block, on the pool's workers and the calling thread; returns
        when all are done.

        The caller takes blocks too, beside workers - 1 of the pool's threads: the first block starts
        at once, and a worker slow to wake (a busy machine) delays nothing, since whoever finishes
        first takes the next block from a shared iterator (dynamic scheduling: a thread slowed down
        by another process on its core simply takes fewer blocks). The first exception is re-raised
        here, after every thread has stopped. Called from inside a block (a kernel inside another
        kernel's block), the blocks run inline: a block waiting on its own pool could deadlock.
        """
        workers = min(self.workers, len(blocks))
        if workers <= 1 or _in_block.active:
            with self._blas_on_one_core:  # inline, but still never on OpenBLAS's own threads
                for block in blocks:
                    function(block)
            return
        pending = iter(blocks)
        take_lock = threading.Lock()

        def work():
            _in_block.active = True
            try:
                while True:
                    with take_lock:
                        block = next(pending, None)
                    if block is None:
                        return
                    function(block)
            finally:
                _in_block.active = False

        caller_error = None
        with self._blas_on_one_core:  # 1 OpenBLAS thread while the blocks run, then as before
            futures = [self._executor.submit(work) for _ in range(workers - 1)]
            try:
                work()  # the caller's share
            except Exception as error:  # the workers' blocks still finish before it is re-raised
                caller_error = error
            finally:
                for future in futures:
                    future.exception()  # wait for every worker, failed or not
        if caller_error is not None:
            raise caller_error
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


# ---------------------------------------------------------------------------------------------
# The pool's GEMM: np.matmul with npdiff's threads
# ---------------------------------------------------------------------------------------------
# Below this many multiply-adds (M*N*K over the whole call) a GEMM runs as one block on the calling
# thread (still with one OpenBLAS thread): waking the workers costs ~30-50 us, as long as a
# 2^21-multiply-add sgemm takes on one core. OpenBLAS itself keeps GEMMs under 2^18 on one thread.
MATMUL_PARALLEL_MIN = 2**21
# Block edges fall on multiples of this many rows or columns: the sgemm micro-kernel's 16 rows
# (AVX-512, float32), and a whole 64-byte cache line of each output row per column block.
MATMUL_ALIGN = 16


def _aligned_spans(total, per_image, images, workers, align=MATMUL_ALIGN):
    """[(start, stop), ...]: range(total) in about `per_image` near-equal spans whose inner edges are
    multiples of `align`; as split_evenly, more spans when images * spans would leave a worker idle."""
    units = -(-total // align)
    spans = []
    for first_unit, stop_unit in split_evenly(units, -(-units // max(1, per_image)), images, workers):
        spans.append((first_unit * align, min(total, stop_unit * align)))
    return spans


def matmul(a, b, out=None, bias=None, residual=None):
    """np.matmul(a, b) for float32 a [M, K] or [B, M, K] and b [K, N] (views BLAS reads as they lie,
    a transposed weight included), each block a one-thread sgemm on the shared pool's workers:
    npdiff's GEMMs never run on OpenBLAS's own threads (see the module's header). `out` (optional,
    [..., M, N]) receives the product, as np.matmul's out=; the product is returned.

    bias (optional, broadcastable to [M, N]: [N] per column, [M, 1] per row) and then residual
    (optional, [..., M, N] as out) are added by each block to its own part of the product, on the
    worker and while the part is in cache: the same float32 sums, in the same order, as
    `out += bias; out += residual` after the call, without those two one-thread passes over the
    whole product.

    Blocks: one per worker, of rows when the call has at least as many rows (B*M) as columns (each
    block then packs all of b once), else of columns (each block packs all of its image's a once;
    CLIP's [154, 768] @ [768, 3072]). Batched a is cut per image.
    """
    if out is None:
        out = np.empty(a.shape[:-1] + (b.shape[1],), np.float32)  # [..., M, N]
    if out.size == 0:
        return out  # no rows or no columns: nothing to compute
    images = a[None] if a.ndim == 2 else a  # [M,K] or [B,M,K] -> [B,M,K]
    products = out[None] if out.ndim == 2 else out  # [M,N] or [B,M,N] -> [B,M,N]
    batch, rows, depth = images.shape
    columns = b.shape[1]
    pool = shared_pool()
    parts = 1 if batch * rows * columns * depth < MATMUL_PARALLEL_MIN else pool.workers
    per_image = -(-parts // batch)  # blocks per image, so that every worker gets one
    if batch * rows >= columns:
        blocks = [(index, (start, stop), (0, columns)) for index in range(batch)
                  for start, stop in _aligned_spans(rows, per_image, batch, parts)]
    else:
        blocks = [(index, (0, rows), (start, stop)) for index in range(batch)
                  for start, stop in _aligned_spans(columns, per_image, batch, parts)]

    bias_2d = None if bias is None else np.broadcast_to(bias, (rows, columns))  # [M,N] (a view)
    residuals = None if residual is None else residual.reshape(products.shape)  # [B,M,N] (a view)

    def run_block(block):
        index, (row0, row1), (col0, col1) = block
        block_out = products[index, row0:row1, col0:col1]  # [m, n] view of the product
        np.matmul(images[index, row0:row1], b[:, col0:col1], out=block_out)  # [m,K] @ [K,n] -> [m,n]
        if bias_2d is not None:
            block_out += bias_2d[row0:row1, col0:col1]  # [m,n] + [m,n] (broadcast view)
        if residuals is not None:
            block_out += residuals[index, row0:row1, col0:col1]  # [m,n] + [m,n]

    pool.run(run_block, blocks)
    return out
