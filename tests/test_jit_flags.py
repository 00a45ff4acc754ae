"""npdiff.jit.njit: a kernel's fastmath flags are its own, never inherited from the caller Numba
compiled it for first (numba/core/cpu.py inherits 'fastmath' into callees that do not set it, and
keeps, and caches, that one compiled version for every later caller).

The check: in a fresh process with an empty Numba cache, a caller carrying fastmath 'reassoc' is
compiled first and calls lane_sums.dot_centred_f64; then dot_centred_f64, called directly, must still
add in the order its source states (bit for bit, the NumPy rendering of test_lane_sums). With numba's
own njit (flags inherited) this child found 28 of 200 runs of 33 values differing, 106 of 200 of 65."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from npdiff.jit import SERIAL, njit
    from npdiff.kernels.lane_sums import dot_centred_f64
    from test_lane_sums import sum_in_stated_order

    @njit(**SERIAL, fastmath={{"nsz", "arcp", "contract", "reassoc"}})
    def reassociating_caller(a, b, centre):
        return dot_centred_f64(a, b, centre) * 2.0

    rng = np.random.default_rng({seed})
    reassociating_caller(np.ones(40, np.float32), np.ones(40, np.float32), 0.5)  # compiles the callee first
    differing = 0
    for size in (33, 65, 1000):
        for _ in range(100):
            a = rng.standard_normal(size).astype(np.float32)
            b = (rng.standard_normal(size) + 5.0).astype(np.float32)
            centre = float(rng.standard_normal())
            expected = sum_in_stated_order(a.astype(np.float64) * (b.astype(np.float64) - centre))
            differing += dot_centred_f64(a, b, centre) != expected
    print(differing)
""")


def test_callee_flags_are_not_inherited_from_the_first_caller(tmp_path, seed):
    tests = str(Path(__file__).parent / "kernels")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=tests, seed=seed))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0", f"{done.stdout.strip()} of 300 sums left their stated order"
