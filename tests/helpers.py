"""Helpers shared by the tests: relative error, torch <-> numpy, a PNG's pixels, a time limit, a mapped file's
resident bytes."""

import mmap
import os
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

# The project's numerics policy (README.md), float32, relative error ||ours - torch|| / ||torch||: a single
# kernel <= 1e-5, a whole network forward <= 1e-4; a whole sampling loop: 8-bit pictures within 2 levels.
KERNEL_TOL = 1e-5
NETWORK_TOL = 1e-4
IMAGE_LEVELS_TOL = 2


def rel_err(ours, ref):
    """||ours - ref|| / ||ref|| in float64 (ours/ref: numpy arrays or torch tensors)."""
    ours = to_numpy(ours).astype(np.float64)
    ref = to_numpy(ref).astype(np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference shape {ref.shape}"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(ours - ref) / (denom if denom > 0 else 1.0))


def assert_rel_close(ours, ref, tol=KERNEL_TOL, what="output"):
    err = rel_err(ours, ref)
    assert np.isfinite(err) and err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    return err


def to_numpy(a):
    if hasattr(a, "detach"):  # torch tensor
        return a.detach().cpu().numpy()
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def pixels(path):
    """A picture file's pixels, [H,W,3] uint8 RGB."""
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def write_png(path, chunks, size=(8, 8)):
    """A PNG with the given text chunks {keyword: text}, written as another tool would (PIL's add_text)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", size, (200, 30, 30)).save(path, pnginfo=info)
    return path


@contextmanager
def time_limit(what, seconds=10):
    """Fail with AssertionError naming `what` when the block runs longer than `seconds` (a hang: a FIFO
    opened, an endless loop), instead of hanging the test session."""
    def fail(signum, frame):
        raise AssertionError(f"{what}: no answer within {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mapped_rss_bytes(path):
    """Resident bytes of this process's mappings of the file `path`, from /proc/self/smaps (Linux)."""
    target, total, inside = os.path.realpath(path), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5] == target  # a mapping's first line: range perms ... path
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def unreleasable_bytes(path):
    """What release may leave resident of a file's map: the header's pages (the kernel's fault-around maps
    pages next to a touched one, header included) and a partial page at each end of the data."""
    page = mmap.PAGESIZE
    with open(path, "rb") as handle:
        data_start = 8 + struct.unpack("<Q", handle.read(8))[0]
    return -(-data_start // page) * page + 2 * page
