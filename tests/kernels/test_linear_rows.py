"""linear_rows (npdiff/kernels/linear_rows.py: the UNet's GEMMs with many rows on weights packed at load, both
drivers) against torch, its bits at one and two threads and in a process that compiled it against one that loaded
it from Numba's disk cache, and RowsLinear (npdiff/models/packed_linear.py), the layer that runs it."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_TOL, assert_rel_close
from test_cache_bits import assert_same_bytes

from npdiff.kernels.linear_packed import pack_panels
from npdiff.kernels.linear_rows import BLOCK_ROWS, DEPTH_BLOCK, DRIVERS, linear_rows, linear_rows_ref, pick_driver
from npdiff.kernels.matmul_numba import MR, NR

TIMEOUT_S = 300
# rows: within one block, several blocks per thread (the next block's prefetch, a short last block); depths: one
# depth block, several (each driver blocks k differently: DEPTH_BLOCK, linear_packed.KC_PANEL)
ROWS = {"few": (1, 2 * MR + 1), "several blocks": (2 * BLOCK_ROWS + 1, 5 * BLOCK_ROWS)}
DEPTHS = {"short": (1, 100), "several blocks": (DEPTH_BLOCK + 1, 2 * DEPTH_BLOCK + 60)}


def draw(rng, rows, n_in, n_out, with_bias=True, with_residual=False):
    x = rng.standard_normal((rows, n_in), dtype=np.float32)
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(n_in ** -0.5)
    bias = rng.standard_normal(n_out, dtype=np.float32) if with_bias else None
    residual = rng.standard_normal((rows, n_out), dtype=np.float32) if with_residual else None
    return x, weight, bias, residual


def torch_linear(x, weight, bias, residual):
    out = F.linear(torch.from_numpy(x), torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias))
    return out if residual is None else out + torch.from_numpy(residual)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("depth", list(DEPTHS))
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (True, False), (False, True), (False, False)])
def test_linear_rows_matches_torch(rng, driver, rows, depth, with_bias, with_residual):
    """Odd shapes: rows not a multiple of MR, outputs not of NR (edge tiles on both sides)."""
    n_rows, n_in, n_out = int(rng.integers(*ROWS[rows])), int(rng.integers(*DEPTHS[depth])), int(rng.integers(1, 200))
    x, weight, bias, residual = draw(rng, n_rows, n_in, n_out, with_bias, with_residual)
    expected = torch_linear(x, weight, bias, residual)
    out = np.full((n_rows, n_out), np.nan, np.float32)  # every element written once, finished once
    ours = linear_rows(x, pack_panels(weight), n_out, bias, residual, out=out, driver=driver)
    assert ours is out and ours.dtype == np.float32
    assert_rel_close(ours, expected, KERNEL_TOL, f"linear_rows ({driver})")
    assert_rel_close(linear_rows_ref(x, weight, bias, residual), expected, KERNEL_TOL, "reference")


@pytest.mark.parametrize("rows,n_in,n_out", [(2 * 4096, 320, 320), (2048, 640, 640), (512, 5120, 1280)])
def test_unet_shapes_match_torch(rng, rows, n_in, n_out):
    """SD 1.5's C x C and ff.net.2 shapes at batch 2, 64x64 latent, each on the driver its rule picks."""
    x, weight, bias, _ = draw(rng, rows, n_in, n_out)
    ours = linear_rows(x, pack_panels(weight), n_out, bias)
    assert_rel_close(ours, torch_linear(x, weight, bias, None), KERNEL_TOL, f"[{rows},{n_in}] x [{n_in},{n_out}]")


def test_driver_rule():
    """The rule picks "rows" for the weights that stay in L2 (SD 1.5's 320 and 640 channels), "panels" above."""
    assert pick_driver(pack_panels(np.zeros((320, 320), np.float32))) == "rows"
    assert pick_driver(pack_panels(np.zeros((640, 640), np.float32))) == "rows"
    assert pick_driver(pack_panels(np.zeros((1280, 1280), np.float32))) == "panels"


@pytest.mark.parametrize("driver", DRIVERS)
def test_same_bytes_at_one_and_two_threads(rng, driver):
    """Each element is made by one tile whichever thread holds its rows: the bytes do not depend on the split."""
    rows, n_in, n_out = int(rng.integers(3 * BLOCK_ROWS, 6 * BLOCK_ROWS)), int(rng.integers(1, 1500)), int(
        rng.integers(1, 300))
    x, weight, bias, residual = draw(rng, rows, n_in, n_out, with_residual=True)
    panels = pack_panels(weight)
    threads = numba.get_num_threads()
    try:
        results = []
        for count in sorted({1, threads}):
            numba.set_num_threads(count)
            results.append(linear_rows(x, panels, n_out, bias, residual, driver=driver))
    finally:
        numba.set_num_threads(threads)
    assert all(result.tobytes() == results[0].tobytes() for result in results)


# Runs in a child: both drivers on inputs drawn from the seed (edge tiles, several row and depth blocks)
CHILD = r"""
import sys
import numpy as np
from npdiff.kernels.linear_packed import pack_panels
from npdiff.kernels.linear_rows import DRIVERS, linear_rows

seed, out_path = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(seed)
results = {}
for rows, n_in, n_out in ((409, 300, 190), (250, 2700, 70)):
    x = rng.standard_normal((rows, n_in), dtype=np.float32)
    panels = pack_panels(rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(n_in ** -0.5))
    bias = rng.standard_normal(n_out, dtype=np.float32)
    residual = rng.standard_normal((rows, n_out), dtype=np.float32)
    for driver in DRIVERS:
        results[f"{driver}_{rows}_{n_in}_{n_out}"] = linear_rows(x, panels, n_out, bias, residual, driver=driver)
np.savez(out_path, **results)
"""


def run_child(tmp_path, name, seed, cache_dir, threads=None):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    if threads is not None:
        env["NUMBA_NUM_THREADS"] = str(threads)
    out = tmp_path / f"{name}.npz"
    subprocess.run([sys.executable, "-c", CHILD, str(seed), str(out)], env=env, check=True, timeout=TIMEOUT_S,
                   capture_output=True)
    with np.load(out) as saved:
        return {key: saved[key] for key in saved.files}


def in_this_process(tmp_path, seed):
    out = str(tmp_path / "here.npz")
    argv = sys.argv
    sys.argv = ["child", str(seed), out]
    try:
        exec(compile(CHILD, "linear_rows_child", "exec"), {})
    finally:
        sys.argv = argv
    with np.load(out) as saved:
        return {key: saved[key] for key in saved.files}


def test_same_bits_compiled_cached_one_thread_and_here(tmp_path, seed):
    cache_dir = tmp_path / "numba-cache"
    compiled = run_child(tmp_path, "compiled", seed, cache_dir)  # compiles, writes the cache
    assert any(cache_dir.rglob("*linear_rows*.nbi")), "the first child wrote no cache"
    assert_same_bytes(run_child(tmp_path, "cached", seed, cache_dir), compiled, "loaded from the cache vs compiled")
    assert_same_bytes(run_child(tmp_path, "one_thread", seed, cache_dir, threads=1), compiled, "one thread vs two")
    assert_same_bytes(in_this_process(tmp_path, seed), compiled, "this test process vs a fresh one")
