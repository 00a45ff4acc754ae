"""The block-parallel pool that blocked kernels (attention, conv tiles) run on."""

import threading

import numpy as np
import pytest

from helpers import KERNEL_TOL, assert_rel_close
from npdiff.kernels import block_pool


def test_run_blocks_runs_every_block_once_on_workers(rng):
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
    assert threading.get_ident() not in threads or block_pool.shared_pool().workers == 1
    for block, product in products.items():
        assert_rel_close(product, a[block:].astype(np.float64) @ b, KERNEL_TOL)


def test_run_blocks_reraises_a_worker_exception():
    def work(block):
        if block == 5:
            raise RuntimeError("block 5 failed")

    with pytest.raises(RuntimeError, match="block 5 failed"):
        block_pool.run_blocks(work, list(range(10)))


def test_pool_uses_every_cpu_when_openblas_has_thread_local_counts():
    pool = block_pool.shared_pool()
    if not pool.single_threaded_blas:
        assert pool.workers == 1  # no per-thread BLAS count: one worker, never oversubscribed
    else:
        assert pool.workers == block_pool.worker_count()


def test_run_blocks_inside_a_worker_runs_inline():
    # A kernel called from inside another kernel's block must not wait on the pool it occupies.
    inner_results = []

    def outer(block):
        block_pool.run_blocks(lambda inner: inner_results.append((block, inner)), [0, 1, 2])

    block_pool.run_blocks(outer, [10, 20, 30])
    assert sorted(inner_results) == [(b, i) for b in (10, 20, 30) for i in (0, 1, 2)]
