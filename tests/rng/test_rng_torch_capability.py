"""TorchGenerator's two float32 math paths against torch run with ATEN_CPU_CAPABILITY forced.

torch picks its CPU kernels once, at import, from ATEN_CPU_CAPABILITY (or the CPU): so each check
runs torch in a subprocess with the variable set, replays a random sequence of calls there, and
compares the bits with TorchGenerator(seed, math=<the path that capability runs>).
  default -> the portable kernel: libm logf/cosf/sinf    (TorchGenerator(..., math="default"))
  avx2    -> the AVX2 kernel: Cephes float32 with FMAs   (TorchGenerator(..., math="avx2"))
The subprocess reports the capability torch actually used; the test asserts it is the one asked for
(on a CPU without AVX2, torch falls back to DEFAULT for "avx2", and the avx2 case says so).
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from rng_testing import math_path_for

from npdiff.rng import TorchGenerator

# Runs in the subprocess: argv[1] = JSON {"seed": s, "calls": [[op, shape, dtype], ...]};
# writes an .npz of the results' raw bytes (bfloat16 as int16 bits) and prints the capability.
REPLAY = r"""
import io, json, sys
import numpy as np
import torch
spec = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(spec["seed"])
out = {}
for i, (op, shape, dtype) in enumerate(spec["calls"]):
    t = getattr(torch, op)(tuple(shape), dtype=getattr(torch, dtype), generator=g)
    out[f"call{i}"] = t.view(torch.int16).numpy() if dtype == "bfloat16" else t.numpy()
buffer = io.BytesIO()
np.savez(buffer, capability=np.array(torch.backends.cpu.get_cpu_capability()), **out)
sys.stdout.buffer.write(buffer.getvalue())
"""


def replay_in_torch(capability, spec):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", REPLAY, json.dumps(spec)], capture_output=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    return np.load(io.BytesIO(result.stdout))


def random_calls(rng):
    calls = []
    for _ in range(12):
        n = int(rng.choice([int(rng.integers(1, 16)), 16 * int(rng.integers(1, 50)),
                            16 * int(rng.integers(1, 50)) + int(rng.integers(1, 16))]))
        dtype = str(rng.choice(["float32", "float32", "float32", "float64", "float16", "bfloat16"]))
        calls.append(["randn" if rng.random() < 0.8 else "rand", [n], dtype])
    calls.append(["randn", [int(rng.integers(150_000, 200_000))], "float32"])  # threaded kernel
    return calls


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_math_path_matches_torch_with_capability(rng, capability):
    spec = {"seed": int(rng.integers(0, 2**63)), "calls": random_calls(rng)}
    results = replay_in_torch(capability, spec)
    reported = str(results["capability"])
    expected = ("DEFAULT",) if capability == "default" else ("AVX2", "DEFAULT")  # DEFAULT: no AVX2 CPU
    assert reported in expected, f"ATEN_CPU_CAPABILITY={capability}: torch reports {reported}"
    math = math_path_for(reported)
    g = TorchGenerator(spec["seed"], math=math)
    for i, (op, shape, dtype) in enumerate(spec["calls"]):
        ours = getattr(g, op)(tuple(shape), dtype=dtype)
        theirs = results[f"call{i}"]
        if dtype == "bfloat16":
            ours_bits, their_bits = (ours.view(np.uint32) >> 16).astype(np.uint16), theirs.view(np.uint16)
        else:
            width = {"float32": np.uint32, "float64": np.uint64, "float16": np.uint16}[dtype]
            ours_bits, their_bits = ours.view(width), theirs.view(width)
        differ = int(np.count_nonzero(ours_bits != their_bits))
        assert differ == 0, (f"ATEN_CPU_CAPABILITY={capability} ({reported}), math={math}: call {i} "
                             f"{op}{tuple(shape)} {dtype}: {differ} values differ (seed {spec['seed']})")


def test_the_two_paths_differ_slightly(rng):
    """The two kernels are different functions: most values agree, some differ by a few ulp."""
    seed = int(rng.integers(0, 2**63))
    a = TorchGenerator(seed, math="avx2").randn(100_000)
    b = TorchGenerator(seed, math="default").randn(100_000)
    differ = a != b
    assert 0 < differ.mean() < 0.6
    assert np.abs(a - b).max() < 1e-5
