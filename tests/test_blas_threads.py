"""npdiff owns the threads of every GEMM it issues, whatever the script imported first.

OpenBLAS's idle threads busy-wait ~0.1 s after each call they serve (its compile-time default; only
OPENBLAS_THREAD_TIMEOUT, read when NumPy loads OpenBLAS, changes it), so a GEMM npdiff left to them
took a core from the Numba kernel or the block pool that ran next: the SD 1.5 UNet lost ~20% when
numpy was imported before npdiff. Here: in a fresh process, importing numpy first (as nearly every
script does), torch first or npdiff first, OpenBLAS's own threads get no CPU while npdiff's kernels and a whole
(tiny) txt2img run, and no thread of the process uses CPU while it sleeps after them; the pool's GEMM
(npdiff.kernels.block_pool.matmul) equals torch.matmul; OpenBLAS's thread count is 1 only while
npdiff's blocks run and is the user's again after; nothing about OpenBLAS is warned about on a CPU
whose OpenBLAS already runs its fast kernels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))

from helpers import KERNEL_TOL, assert_rel_close  # noqa: E402
from npdiff import blas  # noqa: E402
from npdiff.kernels import block_pool  # noqa: E402
from tiny_sd import tiny_sd_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Run in a fresh process: {first} is "numpy", "torch" or "npdiff". The threads alive right after that
# import (other than the main one) are OpenBLAS's: NumPy starts its pool when it loads it (torch imports
# NumPy; its own OpenMP threads start at its first parallel op), npdiff starts none.
IN_A_FRESH_PROCESS = """
import {first}
import json, os, sys, threading, time

def thread_ids():
    return {{int(name) for name in os.listdir("/proc/self/task")}} - {{threading.get_native_id()}}

def cpu_seconds(tids):
    total = 0.0
    for tid in tids:
        try:  # schedstat's first field: ns on a CPU; else utime + stime in clock ticks
            with open(f"/proc/self/task/{{tid}}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        except OSError:
            try:
                with open(f"/proc/self/task/{{tid}}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:  # the thread is gone
                pass
    return total

openblas_threads = thread_ids()
import numpy as np
import npdiff
from npdiff import kernels

rng = np.random.default_rng(0)
rows = rng.standard_normal((2048, 256), dtype=np.float32)
x = rng.standard_normal((2, 32, 32, 32), dtype=np.float32)
q = rng.standard_normal((2, 4, 256, 32), dtype=np.float32)
pipe = npdiff.StableDiffusionPipeline.from_pretrained(sys.argv[1])

def npdiff_work():
    kernels.linear(rows, rows[:512])  # [2048,256] @ [256,512]: OpenBLAS would thread it
    kernels.linear_activation(rows, rows[:512], activation="silu")
    kernels.geglu(rows[:300], rows[:512])
    kernels.conv2d(x, rng.standard_normal((64, 32, 3, 3), dtype=np.float32), padding=1)
    kernels.conv2d(x, rng.standard_normal((64, 32, 1, 1), dtype=np.float32))
    kernels.scaled_dot_product_attention(q, q, q)
    kernels.group_norm(x, 8, None, None, silu=True)
    pipe("a red cube", num_inference_steps=2, height=64, width=64, seed=1)  # CLIP, UNet, VAE, sampler

npdiff_work()  # compiles (or loads) the Numba kernels and starts every pool
time.sleep(0.3)  # OpenBLAS's threads, woken by numpy's own start-up, sleep by now
before = cpu_seconds(openblas_threads)
npdiff_work()
during = cpu_seconds(openblas_threads) - before
kernels.linear(rows, rows[:512])
others = thread_ids()
start = cpu_seconds(others)
time.sleep(0.3)
print(json.dumps({{"openblas_threads": len(openblas_threads), "openblas_cpu_during": during,
                  "idle_cpu_after_linear": cpu_seconds(others) - start}}))
"""


@pytest.mark.parametrize("first", ["numpy", "torch", "npdiff"])
def test_openblas_threads_never_run_for_npdiff_whichever_is_imported_first(first):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux's /proc to read each thread's CPU time")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", IN_A_FRESH_PROCESS.format(first=first), str(tiny_sd_folder())],
                          env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr or blas.avx512_kernels_missed(), done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    # OpenBLAS's own threads (one fewer than the CPUs, when NumPy's BLAS is OpenBLAS) took no CPU
    # while npdiff's kernels and a txt2img ran: before npdiff ran its GEMMs on its own threads, its
    # linear layers woke them, and each busy-waited ~0.1 s after every such call (tens to hundreds
    # of ms here).
    assert measured["openblas_cpu_during"] < 0.005, (
        f"OpenBLAS's {measured['openblas_threads']} threads used {measured['openblas_cpu_during'] * 1e3:.1f} ms "
        "of CPU while npdiff ran: some npdiff GEMM ran on OpenBLAS's own pool")
    # ...and after an npdiff GEMM, nothing spins beside the sleeping main thread
    assert measured["idle_cpu_after_linear"] < 0.01, (
        f"{measured['idle_cpu_after_linear'] * 1e3:.1f} ms of CPU in 0.3 s of sleep after linear(): a thread spins")


# ---------------------------------------------------------------------------------------------
# The pool's GEMM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [
    (1, 1000, 96, 88),   # rows split (more rows than columns), edges not multiples of 16
    (1, 77, 64, 900),    # columns split (CLIP's few rows)
    (2, 300, 40, 50),    # batched: blocks per image
    (3, 100, 64, 70),    # 3 images on the workers: more blocks, so none idles
    (1, 5, 3, 7),        # below MATMUL_PARALLEL_MIN: one block on the caller
    (1, 0, 8, 9),        # no rows, no columns, nothing to sum: as np.matmul
    (2, 0, 8, 0),
    (1, 4, 8, 0),
    (1, 40, 0, 60),
])
def test_pool_matmul_equals_torch(shape, rng):
    batch, rows, depth, columns = shape
    a = rng.standard_normal((batch, rows, depth) if batch > 1 else (rows, depth), dtype=np.float32)
    weight = rng.standard_normal((columns, depth), dtype=np.float32)
    got = block_pool.matmul(a, weight.T)  # the transposed weight, a view, as linear passes it
    expected = torch.matmul(torch.from_numpy(a), torch.from_numpy(weight).T).numpy()
    assert got.shape == expected.shape and got.dtype == np.float32
    if depth == 0:
        np.testing.assert_array_equal(got, expected)  # an empty sum is 0
    elif got.size:
        assert_rel_close(got, expected, KERNEL_TOL)


def test_pool_matmul_reads_strided_views_and_writes_into_out(rng):
    # the UNet's proj_in: NCHW seen as [B, H*W, C] (a strided view), and an out= array
    channels_first = rng.standard_normal((2, 48, 700), dtype=np.float32)  # [B,C,H*W]
    tokens = channels_first.transpose(0, 2, 1)  # [B,H*W,C], not contiguous
    weight = rng.standard_normal((48, 80), dtype=np.float32)
    out = np.full((2, 700, 80), np.nan, np.float32)
    returned = block_pool.matmul(tokens, weight, out=out)
    assert returned is out
    expected = torch.matmul(torch.from_numpy(np.ascontiguousarray(tokens)), torch.from_numpy(weight)).numpy()
    assert_rel_close(out, expected, KERNEL_TOL)


@pytest.mark.parametrize("shape", [
    (1, 1000, 96, 88),   # rows split
    (1, 77, 64, 900),    # columns split
    (3, 100, 64, 70),    # batched
    (1, 5, 3, 7),        # one block on the caller
])
@pytest.mark.parametrize("bias_kind", ["columns", "rows", None])
def test_pool_matmul_adds_bias_and_residual_in_its_blocks(shape, bias_kind, rng):
    """bias ([N] or [M,1]) and residual added by each block: torch's mm + bias + residual, and bit for
    bit the sums of adding them after the GEMM (what linear and the tape did before)."""
    batch, rows, depth, columns = shape
    a = rng.standard_normal((batch, rows, depth) if batch > 1 else (rows, depth), dtype=np.float32)
    weight = rng.standard_normal((columns, depth), dtype=np.float32)
    bias = {"columns": rng.standard_normal(columns, dtype=np.float32),
            "rows": rng.standard_normal((rows, 1), dtype=np.float32), None: None}[bias_kind]
    residual = rng.standard_normal(a.shape[:-1] + (columns,), dtype=np.float32)
    got = block_pool.matmul(a, weight.T, bias=bias, residual=residual)
    expected = torch.matmul(torch.from_numpy(a), torch.from_numpy(weight).T) + torch.from_numpy(residual)
    if bias is not None:
        expected += torch.from_numpy(bias)
    assert_rel_close(got, expected.numpy(), KERNEL_TOL)
    after = block_pool.matmul(a, weight.T)
    if bias is not None:
        after += bias
    after += residual
    np.testing.assert_array_equal(got, after)


def test_blas_count_is_one_inside_the_pools_gemms_and_the_users_after(rng):
    before = blas.get_num_threads()
    seen = []
    original = np.matmul

    def spy(*args, **kwargs):
        seen.append(blas.get_num_threads())
        return original(*args, **kwargs)

    a = rng.standard_normal((512, 256), dtype=np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(block_pool.np, "matmul", spy)
        block_pool.matmul(a, a.T)  # parallel blocks
        block_pool.matmul(a[:4], a[:4].T)  # one small block on the caller
    if before is not None:  # NumPy on OpenBLAS
        assert seen and set(seen) == {1}
        assert blas.get_num_threads() == before


# ---------------------------------------------------------------------------------------------
# Start-up: no warning where nothing is lost; the one case npdiff cannot fix is named
# ---------------------------------------------------------------------------------------------
def run_python(code, **env):
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OPENBLAS_CORETYPE", "NPDIFF_OPENBLAS_CORETYPE", "OPENBLAS_THREAD_TIMEOUT")}
    environment.update(env, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout.strip(), done.stderr


def test_importing_numpy_first_decides_the_same_and_warns_only_when_kernels_are_missed():
    report = "import npdiff.blas as b, npdiff.startup as s; print(b.blas_info())"
    results = [run_python(f"import {first}, {second}; {report}")
               for first, second in (("numpy", "npdiff"), ("npdiff", "numpy"))]
    for code, out, err in results:
        assert code == 0, err
        assert ("RuntimeWarning" in err) == blas.avx512_kernels_missed(), err
    if not blas.cpu_is_amd():  # elsewhere npdiff chooses nothing, so the import order changes nothing
        assert results[0][1] == results[1][1]
        assert "too late" not in results[0][1]


def test_a_missed_avx512_kernel_choice_is_warned_about_with_the_fix():
    # As on an AMD AVX-512 CPU with an OpenBLAS older than 0.3.21, after `import numpy`: OpenBLAS
    # loaded with other kernels (forced here with OPENBLAS_CORETYPE=Haswell, then the variable
    # removed so that it is not the user's choice), too late for npdiff to choose.
    code = ("import os, warnings, numpy; del os.environ['OPENBLAS_CORETYPE']; import npdiff.blas as b; "
            "import npdiff.startup as s; b.cpu_is_amd = lambda: True; b.cpu_has_avx512f = lambda: True; "
            "print(s.choose_openblas_kernels())")
    returncode, out, err = run_python(code, OPENBLAS_CORETYPE="Haswell")
    assert returncode == 0, err
    if blas.openblas_library() is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS")
    assert out == "too late: numpy was imported before npdiff"
    assert err.count("RuntimeWarning") == 1 and "runs its Haswell kernels" in err
    assert "OPENBLAS_CORETYPE=SkylakeX" in err
