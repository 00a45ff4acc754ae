"""What every benchmark shares: timing, the machine's sgemm peak, a table, JSON output.

Method: measure npdiff and the PyTorch anchor in the same process, report the ratio
(the machines are shared and noisy, so absolute seconds drift while ratios hold), the FLOP count, and
the achieved GFLOP/s against the machine's measured sgemm peak.

    from _common import time_call, sgemm_peak_gflops, print_table, write_json
"""

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from npdiff.blas import blas_info

OUT_DIR = Path(__file__).resolve().parent / "out"


def time_call(fn, repeat=5, warmup=1, min_time=0.0):
    """Best wall time of fn() in seconds over `repeat` runs after `warmup` runs (compile, caches)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    runs = 0
    start_all = time.perf_counter()
    while runs < repeat or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def sgemm_peak_gflops(n=2048, repeat=3):
    """The machine's sgemm rate through NumPy's BLAS at n x n (the 'peak' GFLOP/s are quoted against)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    seconds = time_call(lambda: a @ b, repeat=repeat)
    return 2.0 * n**3 / seconds / 1e9


def machine_info():
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "blas": blas_info(),
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format) e.g. ("ratio", "ours/torch", "{:.2f}")."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else (fmt.format(value) if fmt else str(value)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) if i and j else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(topic, payload):
    """benchmarks/out/<topic>.json with the machine description added. Returns the path."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{topic}.json"
    payload = {"topic": topic, "machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
