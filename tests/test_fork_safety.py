"""Generation works in a child process, forked or spawned, after the parent has generated.

Forking is multiprocessing's default on Linux. Before npdiff/startup.py chose a fork-safe Numba
threading layer and reset the block-parallel pool in forked children, such a child was killed at its
first parallel kernel ("fork() called from a process already using GNU OpenMP") or waited forever on
the parent's pool threads, which a fork does not copy. Every wait here has a timeout, so a hang fails.
"""

import multiprocessing
import os

import numba
import numpy as np
import pytest

import npdiff
from npdiff import startup

CHILD_TIMEOUT_S = 300  # a spawned child imports npdiff and loads the model again; the machine may be busy
STEPS = 2
METHODS = [method for method in ("fork", "spawn") if method in multiprocessing.get_all_start_methods()]
_pipe = None  # the shipped model, loaded once per process (a forked child inherits the parent's)


def generate(seed):
    """Two steps of the shipped model from `seed`; -> (float pixels [1,H,W,3], process id)."""
    global _pipe
    if _pipe is None:
        _pipe = npdiff.StableDiffusionPipeline.from_pretrained()
    images = _pipe("a red circle on a blue background", num_inference_steps=STEPS, seed=seed,
                   output_type="np").images
    return np.asarray(images), os.getpid()


def to_uint8(images):
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("method", METHODS)
def test_child_generates_the_parents_pixels(seed, method):
    parent_pixels, _ = generate(seed)  # the parent has run every kernel (Numba threads, block pool)
    context = multiprocessing.get_context(method)
    with context.Pool(1) as pool:
        child_pixels, child_pid = pool.apply_async(generate, (seed,)).get(timeout=CHILD_TIMEOUT_S)
    assert child_pid != os.getpid()
    np.testing.assert_array_equal(to_uint8(child_pixels), to_uint8(parent_pixels))
    np.testing.assert_allclose(child_pixels, parent_pixels, rtol=0, atol=1e-5)


def test_numba_runs_a_fork_safe_threading_layer():
    generate(0)  # a parallel kernel has run: the layer is chosen
    if os.environ.get("NUMBA_THREADING_LAYER", startup.NUMBA_LAYER) == startup.NUMBA_LAYER:
        assert numba.threading_layer() in ("workqueue", "tbb"), startup.DECISIONS
    assert "numba_threading_layer" in startup.DECISIONS
