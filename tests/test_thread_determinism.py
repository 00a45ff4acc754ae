"""The same seed gives the same PNG bytes on one core and on two.

Every fast kernel splits its work over the block-parallel pool (one worker per CPU the process may
use), OpenBLAS and Numba's threads; the splits are chosen so that no element's arithmetic depends on
how many workers there are (each kernel's own test pins that with 1, 2 and 3 workers). This test
checks the whole job: `npdiff generate` on the shipped model at 256x256 (large enough that the UNet's
and the VAE's 3x3 convs take the Winograd path and self-attention the fused version 5), once in a
child pinned to one CPU with one OpenBLAS and one Numba thread, once with every CPU.
"""

import os
import subprocess
import sys

from npdiff.kernels.attention.fused import FUSED_MAX_KEYS
from npdiff.kernels.conv import conv_method

PROMPT = "a red circle on a blue background"
SIZE = 256  # pixels: a 32x32 latent
TIMEOUT_S = 300


def generate(out, one_cpu):
    env = dict(os.environ)
    preexec = None
    if one_cpu:
        env.update(OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        first_cpu = min(os.sched_getaffinity(0))
        preexec = lambda: os.sched_setaffinity(0, {first_cpu})  # noqa: E731  (the pool then has 1 worker)
    command = [sys.executable, "-m", "npdiff.cli", "generate", PROMPT, "--seed", "5", "--steps", "3",
               "--width", str(SIZE), "--height", str(SIZE), "--out", str(out)]
    subprocess.run(command, env=env, preexec_fn=preexec, check=True, timeout=TIMEOUT_S, capture_output=True)
    return out.read_bytes()


def test_same_png_bytes_on_one_and_on_every_cpu(tmp_path):
    # the job reaches the paths whose work is split: Winograd at the shipped UNet's first level
    # (32 channels at 32x32) and the fused attention over its 1024 tokens
    assert conv_method((2, 32, 32, 32), (32, 32, 3, 3), (1, 1), (1, 1)) == "winograd4"
    assert (SIZE // 8) ** 2 <= FUSED_MAX_KEYS
    one = generate(tmp_path / "one.png", one_cpu=True)
    every = generate(tmp_path / "every.png", one_cpu=False)
    assert one == every
