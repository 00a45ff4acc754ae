"""The block-parallel pool that blocked kernels (attention, conv tiles) run on."""

import threading

import numpy as np
import pytest

from helpers import KERNEL_TOL, assert_rel_close
from npdiff.kernels import block_pool


def test_run_blocks_runs_every_block_once_on_the_caller_and_workers(rng):
    seen, threads = [], set()
    a = rng.standard_normal((64, 48), dtype=np.float32)
    b = rng.standard_normal((48, 80), dtype=np.float32)
    products = {}

    def work(block):
        seen.append(block)
        threads.add(threading.get_ident())
        products[block] = a[block:] @ b  # BLAS inside a worker

    block_pool.run_blocks(work, list(range(37)))
    assert sorted(seen) == list(range(37))
    assert len(threads) <= block_pool.shared_pool().workers  # the caller and workers - 1 pool threads
    for block, product in products.items():
        assert_rel_close(product, a[block:].astype(np.float64) @ b, KERNEL_TOL)


def test_run_blocks_reraises_a_worker_exception():
    def work(block):
        if block == 5:
            raise RuntimeError("block 5 failed")

    with pytest.raises(RuntimeError, match="block 5 failed"):
        block_pool.run_blocks(work, list(range(10)))


def test_pool_uses_every_cpu_when_openblas_thread_count_can_be_set():
    pool = block_pool.shared_pool()
    if not pool.single_threaded_blas:
        assert pool.workers == 1  # BLAS count not settable: one worker, never oversubscribed
    else:
        assert pool.workers == block_pool.worker_count()


def test_run_blocks_inside_a_worker_runs_inline():
    # A kernel called from inside another kernel's block must not wait on the pool it occupies.
    inner_results = []

    def outer(block):
        block_pool.run_blocks(lambda inner: inner_results.append((block, inner)), [0, 1, 2])

    block_pool.run_blocks(outer, [10, 20, 30])
    assert sorted(inner_results) == [(b, i) for b in (10, 20, 30) for i in (0, 1, 2)]


# ---------------------------------------------------------------------------------------------
# One threading design: the pool's threads run BLAS on one core each; after, the user's count again
# ---------------------------------------------------------------------------------------------
def test_blas_is_single_threaded_in_blocks_and_restored_after(rng):
    from npdiff import blas, kernels

    before = blas.get_num_threads()
    inside = []
    block_pool.run_blocks(lambda block: inside.append(blas.get_num_threads()), list(range(8)))
    if block_pool.shared_pool().single_threaded_blas and block_pool.shared_pool().workers > 1:
        assert set(inside) == {1}  # each worker's GEMMs on its own core
    assert blas.get_num_threads() == before  # the main thread's GEMMs get every core again
    x = rng.standard_normal((2, 8, 16, 16), dtype=np.float32)
    kernels.conv2d(x, rng.standard_normal((32, 8, 3, 3), dtype=np.float32), padding=1)  # tiles on the pool
    kernels.scaled_dot_product_attention(*(rng.standard_normal((2, 4, 300, 16), dtype=np.float32),) * 3)
    assert blas.get_num_threads() == before


def test_blas_count_is_restored_after_a_failure_and_concurrent_callers():
    from npdiff import blas

    before = blas.get_num_threads()

    def fail(block):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        block_pool.run_blocks(fail, list(range(6)))
    assert blas.get_num_threads() == before
    callers = [threading.Thread(target=block_pool.run_blocks, args=(lambda b: sum(range(10000)), list(range(50))))
               for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=60)
    assert blas.get_num_threads() == before


AFTER_KERNELS = """
import numpy as np  # first, as a user's script does
import npdiff
import time
from npdiff import blas, kernels
from npdiff.kernels import block_pool

rng = np.random.default_rng(0)
x = rng.standard_normal((2, 32, 32, 32), dtype=np.float32)
q = rng.standard_normal((2, 4, 256, 32), dtype=np.float32)
rows = rng.standard_normal((2048, 256), dtype=np.float32)
for run in range(2):  # the second time everything is compiled and every pool has started
    kernels.conv2d(x, rng.standard_normal((64, 32, 3, 3), dtype=np.float32), padding=1)  # block pool
    kernels.scaled_dot_product_attention(q, q, q)  # block pool
    kernels.group_norm(x, 8, None, None, silu=True)  # Numba threads
    kernels.linear(rows, rows[:512])  # the block pool too (never OpenBLAS's own threads)
start = time.process_time()  # CPU time of the whole process (all threads) while it sleeps
time.sleep(0.3)
print(blas.get_num_threads(), block_pool.worker_count(), time.process_time() - start, sep="|")
"""


def test_after_the_kernels_the_main_thread_has_every_core_and_no_pool_spins():
    """In a fresh process (numpy imported first, as a user's script does): after the block pool and
    Numba have each run, the main thread's BLAS may use every core, and the idle process uses no
    CPU: no pool busy-waits while another works."""
    import os
    import subprocess
    import sys

    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OPENBLAS_THREAD_TIMEOUT", "NUMBA_THREADING_LAYER", "OPENBLAS_NUM_THREADS",
                                  "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", AFTER_KERNELS], env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    blas_threads, workers, idle_cpu = done.stdout.strip().split("|")
    if blas_threads != "None":  # NumPy on OpenBLAS
        assert int(blas_threads) == int(workers)
    assert float(idle_cpu) < 0.01, f"{float(idle_cpu) * 1e3:.1f} ms of CPU in 0.3 s of sleep: a pool spins"
