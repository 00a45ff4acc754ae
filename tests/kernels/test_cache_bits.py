"""Every float32 kernel family gives the same bits in a process that compiled it, in one that loaded it from
Numba's disk cache, with one Numba thread, and in this (long-lived) test process.

Why this can fail: Numba links a copy of every jitted callee (and every prange body) into each caller's machine
code and optimises it again there; a process that compiled the caller reaches the callee's own library, one that
loaded the caller from the cache reaches the caller's copy. Code compiled with fastmath 'reassoc' may vectorise a
sum differently in each copy. It happened once (a causal softmax's sum, 1 ulp in 14 rows, then one level in one
pixel of a picture on CI only, where the clean clone compiles everything fresh). A kernel whose bits depend on
which copy runs, or on the number of threads, fails here.

"Cold" is a fresh NUMBA_CACHE_DIR (the first child compiles and writes it), "warm" the same folder again.
The kernels and shapes are in cache_bits_child.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = Path(__file__).with_name("cache_bits_child.py")
TIMEOUT_S = 300


def run_child(tmp_path, name, seed, cache_dir, threads=None):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    if threads is not None:
        env["NUMBA_NUM_THREADS"] = str(threads)
    out = tmp_path / f"{name}.npz"
    subprocess.run([sys.executable, str(CHILD), str(seed), str(out)], env=env, check=True, timeout=TIMEOUT_S,
                   capture_output=True)
    with np.load(out) as saved:
        return {key: saved[key] for key in saved.files}


def assert_same_bytes(ours, reference, what):
    assert ours.keys() == reference.keys()
    differing = {key: f"{int(np.sum(ours[key] != reference[key]))} of {reference[key].size} values"
                 for key in reference if ours[key].tobytes() != reference[key].tobytes()}
    assert not differing, f"{what}: differ in {differing}"


def test_kernels_same_bits_compiled_cached_one_thread_and_here(tmp_path, seed):
    cache_dir = tmp_path / "numba-cache"
    compiled = run_child(tmp_path, "compiled", seed, cache_dir)  # compiles every kernel, writes the cache
    assert any(cache_dir.rglob("*.nbi")), "the first child wrote no cache"
    assert len(compiled) > 40, sorted(compiled)  # every family made its results
    assert_same_bytes(run_child(tmp_path, "cached", seed, cache_dir), compiled, "loaded from the cache vs compiled")
    assert_same_bytes(run_child(tmp_path, "one_thread", seed, cache_dir, threads=1), compiled,
                      "one Numba thread vs two")
    sys.path.insert(0, str(CHILD.parent))
    try:
        import cache_bits_child  # (the child's module, imported here to run in this process)
    finally:
        sys.path.remove(str(CHILD.parent))
    assert_same_bytes(cache_bits_child.results_for(seed), compiled, "this test process vs a fresh one")
