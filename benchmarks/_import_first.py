"""Import this module before any other: it imports what a user's script would import first.

    python benchmarks/models.py ... --import-first numpy|torch|npdiff

OpenBLAS settles its choices when NumPy loads it, so a benchmark run in another import order than a
user's script measures another program. A benchmark that imports this module first, before its
other imports, gets the module named by --import-first on its command line loaded first, and numpy
when none is named: nearly every user's script starts with `import numpy as np`.

Each of those imports NumPy, which starts OpenBLAS's threads as it loads it; the threads alive right
after it, other than the main one, are OpenBLAS's (`OPENBLAS_THREAD_IDS`). `cpu_seconds(ids)` reads
their CPU time (Linux /proc; 0 elsewhere), so a benchmark can say how much CPU OpenBLAS's own threads
took during a call, whether computing or busy-waiting, beside its wall time.
"""

import importlib
import os
import sys
import threading

IMPORTED_FIRST = sys.argv[sys.argv.index("--import-first") + 1] if "--import-first" in sys.argv else "numpy"
importlib.import_module(IMPORTED_FIRST)


def thread_ids():
    """The kernel's ids of this process's threads other than the calling one (empty without /proc)."""
    try:
        return {int(name) for name in os.listdir("/proc/self/task")} - {threading.get_native_id()}
    except OSError:
        return set()


def cpu_seconds(ids):
    """CPU seconds the threads `ids` have used so far (schedstat: ns on a CPU; threads gone count 0)."""
    total = 0.0
    for tid in ids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
        except OSError:
            pass
    return total


OPENBLAS_THREAD_IDS = thread_ids()
