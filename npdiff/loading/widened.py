"""float16/bfloat16 weights widened to float32 into a file-backed memory map, not into private memory.

    widened = WidenedCopy(safetensors_file)      # one per .safetensors file, made on its first half tensor
    values = widened.float32(key)                # read-only float32 view of the widened map (widened once)

Why: npdiff computes in float32. Widening a half-precision file into private memory (what the loader
did before) costs its float32 size in anonymous memory for the model's whole life: 10 GB for an fp16
SDXL UNet, which can never leave RAM (no swap) and which the stage releases of resident.py cannot drop.
Widened into a file instead, the float32 weights are file-backed pages like those of a float32 file:
resident.release_array_pages drops them between stages and the kernel writes them back and evicts them
under pressure; the next use faults them back from the page cache (or the disk). The file is unlinked as
soon as it is made (tempfile.TemporaryFile): it vanishes with the process, and only its pages in use
count in this process's memory.

Where: $NPDIFF_WIDEN_DIR, else the user cache folder ($XDG_CACHE_HOME or ~/.cache)/npdiff. It needs
float32 room on that disk (2x the half-precision tensors), reserved up front with posix_fallocate, so a
full disk is an error at load, never a SIGBUS mid-run; when the folder cannot be made or the room
cannot be reserved, the file's tensors are widened into private memory as before, with one
RuntimeWarning naming the folder and the reason. (On a tmpfs the "file" is memory again: no worse than
private memory, no better.)

Chosen over widening each layer's weights when it runs (the float16 map kept, float32 made into a reused
buffer per use). Measured with benchmarks/widen.py (400 M float16 parameters, 1.49 GiB as float32; the
2-core machine shared with other work, load average ~8, so the times are rough), each way in a fresh process:
    private  load 11.6 s; after it 1546 MiB anonymous memory for the model's life; one pass reading
             every weight 0.24-0.26 s
    file     load 7.9 s, peak RSS 49 MiB while loading, 31 MiB after; one pass 0.39 s resident,
             0.45 s right after the pages were released (they come back from the page cache)
    per use  one pass (widen + read) 2.43 s: ~2 s more per network step for every 400 M parameters,
             ~13 s per step for SDXL's 2.6 B-parameter UNet (its guided step takes ~80 s in torch)
So the file-backed copy costs nothing per step while resident, a fraction of a second per 1.5 GiB when
its pages were released, and no private memory; the per-use widening would cost 5x more on every step.
"""

import mmap
import os
import tempfile
import warnings

import numpy as np

from npdiff.loading.resident import release_array_pages

HALF_DTYPES = {"F16": "<f2", "BF16": "<u2"}  # stored bytes; BF16 as raw bits (numpy has no bfloat16)
ALIGNMENT = 64  # bytes between widened tensors: every view starts on a cache line


def widen_folder():
    """The folder for widened copies: $NPDIFF_WIDEN_DIR, else <user cache>/npdiff."""
    chosen = os.environ.get("NPDIFF_WIDEN_DIR")
    if chosen:
        return chosen
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "npdiff")


def widen_into(raw, out, dtype):
    """Half-precision values `raw` ([n] <f2, or <u2 bits for BF16) -> float32 into `out` [n] (exact)."""
    if dtype == "BF16":
        bits = out.view(np.uint32)                                       # [n] float32 bits
        bits[:] = raw                                                    # [n] uint16 -> uint32
        bits <<= 16                                                      # bf16 bits are the high half of f32
    else:
        out[:] = raw                                                     # [n] float16 -> float32 (exact)


class WidenedCopy:
    """The float32 widening of every F16/BF16 tensor of one SafetensorsFile, in one unlinked temporary file."""

    def __init__(self, source):
        self.source = source
        self._slots = {}  # key -> byte offset of its float32 values in the widened file
        size = 0
        for key in source.keys():
            if source.dtype(key) in HALF_DTYPES:
                self._slots[key] = size
                size += -(-4 * source.count(key) // ALIGNMENT) * ALIGNMENT
        self.size = size
        self._mapping = None   # made on the first float32()
        self._widened = set()  # keys whose values are in the file already
        self.failed = None     # why the file could not be made (then every tensor is widened privately)

    def _map(self):
        if self._mapping is None and self.failed is None:
            folder = widen_folder()
            try:
                os.makedirs(folder, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder, prefix="npdiff-widened-") as handle:
                    if hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(handle.fileno(), 0, self.size)  # ENOSPC now, not SIGBUS later
                    else:
                        os.ftruncate(handle.fileno(), self.size)
                    self._mapping = mmap.mmap(handle.fileno(), self.size, access=mmap.ACCESS_WRITE)  # MAP_SHARED
            except OSError as error:
                self.failed = f"{folder}: {error}"
                warnings.warn(f"npdiff: could not make a file in {self.failed}; the float16/bfloat16 weights of "
                              f"{self.source.path} are widened to float32 in private memory instead (set "
                              "NPDIFF_WIDEN_DIR to a folder with room)", RuntimeWarning, stacklevel=4)
        return self._mapping

    def float32(self, key):
        """The tensor `key` as a read-only float32 view [n] of the widened map, or None when there is no map
        (the caller then widens privately)."""
        mapping = self._map()
        if mapping is None:
            return None
        count = self.source.count(key)
        values = np.frombuffer(mapping, dtype=np.float32, count=count, offset=self._slots[key])  # [n]
        if key not in self._widened:
            raw = self.source.raw_view(key)                              # [n] half bits, a view of the source map
            widen_into(raw, values, self.source.dtype(key))              # [n] -> [n] float32, written into the file
            release_array_pages([raw, values])                           # both stay in the page cache, not in RSS
            self._widened.add(key)
        values = values[:]                                               # a view of its own to mark read-only
        values.flags.writeable = False
        return values
