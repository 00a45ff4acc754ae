"""Resident memory of this process from /proc/self/status, with no import beyond the standard library,
so a benchmark worker can read it before its clock runs (benchmarks/pipeline.py, benchmarks/models.py)."""

from pathlib import Path


def proc_status_gib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) from /proc/self/status; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None
