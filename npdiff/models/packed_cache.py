"""A file of a model's packed bfloat16 weights, so that they are file-backed pages like a float32 file's.

    store = store_for(weights)              # the cache of one Weights (one model's tensors): a reader or a writer
    packed = store.get(key, kind, shape)    # the packed weight, mapped read-only from the cache file, or None
    packed = store.put(key, kind, packed)   # (writer) written into the file; its array soon a view of the file
    store.finish(complete)                  # (Weights.check_all_used) the file renamed into place, or dropped

Why: precision="bf16" packs every Linear and Conv2d weight at load (precision.py). Packed into private
memory, those ~6.7 GB of an SDXL pipeline (UNet and both text encoders) stay resident for the process's
life: release_resident_pages (npdiff/loading/resident.py) can drop only file-backed pages, so the VAE decode
ran with the UNet beside it. Written once into a file and mapped read-only from it, the packed weights are
file-backed: each stage's pages are released after it, as a float32 file's are, and come back from the page
cache on the next use. The second load maps the file instead of packing (packing the SDXL UNet is most of
its 40 s load).

Where: <npdiff's cache folder>/bf16/ (npdiff.cache_folder: $XDG_CACHE_HOME/npdiff or ~/.cache/npdiff), one
file per model (the weight file(s) and the part of a single-file checkpoint it comes from) and per packing
kernel ("amx", "dpbf16" or "float32": the layouts differ): <file stem>-<part>-<kernel>-<16 hex>.bf16pack for a
single file (<component folder>-<file stem>-... for a folder's component), the hex from the resolved weight
path and the part. A changed weight file rebuilds the same cache file, so stale copies do not
pile up; deleting the folder is always safe. NPDIFF_BF16_CACHE=0 switches the cache off (the packed weights
then stay in private memory, as before).

The file: each packed array's bytes at a page-aligned offset, then an index (JSON: the format version, the
kernel and the layout constants it packed with, the source files' identity, and per weight its class, shape,
layout, dtype, offset and CRC-32), its length and a magic word at the very end. It is valid only when all of
that matches: the same PACK_VERSION, kernel and constants, the weight files' size, mtime, ctime, inode and
device as when it was written, every entry inside the file and every CRC-32 right (checked at open:
~1.4 GB/s, about 5 s for SDXL's 6.7 GB, against ~40 s of packing). Anything else (a truncated file, a damaged
byte, an old version) is rebuilt, with a one-line RuntimeWarning; the user never sees an error from it.

Writing: into ".<name>.<pid>.tmp" beside the final name, one weight at a time (its room reserved first with
posix_fallocate, so a full disk is an OSError at write time, never a SIGBUS later); every CHUNK_BYTES
written are mapped back from that file and the weights' private packed arrays swapped for views of the map
(the same values), so the first load holds at most a chunk of packed weights in private memory, and a
model needs a few maps (each holds a file descriptor), not one per weight. finish() appends the index and
renames the file onto its name (readers see the old file or the whole new one). No fsync: a file cut short
by a crash fails the checks above and is rebuilt. Temporary files of processes that no longer exist are
removed when a cache is next written, and so are cache files whose weight files no longer exist (a model
deleted or moved: nothing can read them again; a changed weight file rebuilds its own). A file that cannot
be written (no room, no permission) leaves the remaining weights in private memory, with one warning per
folder. A valid file that lacks a layer asked for
(a model built differently from the same weights) gives that layer a fresh private pack.

Only what the loader packs from the weight files is ever written: a LoRA fused into a layer is re-packed into
private memory (npdiff/lora.py) and never reaches this file; unloading puts the mapped original back.
"""

import errno
import hashlib
import json
import mmap
import os
import re
import stat
import struct
import warnings
import weakref
import zlib
from pathlib import Path

import numpy as np

from npdiff.cache_folder import cache_folder, file_identity
from npdiff.kernels.bf16_rounding import bf16_kernel
from npdiff.kernels.conv_bf16 import BLOCK_DEPTH, PackedBf16Conv
from npdiff.kernels.matmul_amx import BLOCK
from npdiff.kernels.matmul_bf16 import PackedBf16Weight
from npdiff.kernels.matmul_dpbf16 import MR, NR
from npdiff.loading.resident import release_array_pages

PACK_VERSION = 2  # raise when a packed layout changes in a way the constants below do not show (2: 3x3 convs "amx_taps")
MAGIC = b"npdbf16\x01"  # the file's last 8 bytes
ALIGNMENT = mmap.ALLOCATIONGRANULARITY  # each array starts on a page: it can be mapped on its own
DATA_DTYPES = ("uint16", "uint32", "float32")  # what packed arrays hold (bf16 bits, pairs of them, float32)
CLASSES = {"linear": PackedBf16Weight, "conv": PackedBf16Conv}
CHUNK_BYTES = 256 << 20  # writer: weights written are mapped back (and their private arrays freed) per 256 MiB
_stores = weakref.WeakKeyDictionary()  # Weights -> its unfinished store
_unwritable = set()  # cache folders already warned about (a full disk, no permission)


def cache_enabled():
    """False when NPDIFF_BF16_CACHE=0 (packed weights then stay in private memory)."""
    return os.environ.get("NPDIFF_BF16_CACHE", "1") != "0"


def packing_constants():
    """What the packed layouts depend on: a cache packed with other values is rebuilt."""
    return {"version": PACK_VERSION, "kernel": bf16_kernel(), "NR": NR, "MR": MR, "BLOCK": BLOCK,
            "BLOCK_DEPTH": BLOCK_DEPTH}


def cache_path(weights):
    """Where the packed weights of `weights` (one model's Weights) are cached."""
    source = Path(os.path.realpath(weights.source))
    part = weights.part or ""
    digest = hashlib.sha256(f"{source}\n{part}".encode()).hexdigest()[:16]
    # a single file: "<file stem>-<part>"; a folder's component: "<component folder>-<file stem>"
    stem = source.name
    for suffix in (".json", ".index", ".safetensors"):  # "x.safetensors" or a sharded "x.safetensors.index.json"
        stem = stem.removesuffix(suffix)
    name = f"{stem}-{part}" if part else f"{source.parent.name}-{stem}"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
    # another precision that packs only some layers ("mixed") keeps its own file: were it to write the bf16 one,
    # a later bf16 load would find it short of layers and pack those into private memory
    kind = "" if weights.precision == "bf16" else f"-{weights.precision}"
    return cache_folder() / "bf16" / f"{name}{kind}-{bf16_kernel()}-{digest}.bf16pack"


def sources_identity(weights):
    """{resolved weight file: its identity} for every file the tensors of `weights` lie in."""
    return {os.path.realpath(path): file_identity(path) for path in weights.files()}


def store_for(weights):
    """The cache of `weights` for the model being built from it (one per build: finish() ends it), or None
    when the cache is switched off."""
    if not cache_enabled():
        return None
    store = _stores.get(weights)
    if store is None:
        store = PackedCache(cache_path(weights), sources_identity(weights))
        _stores[weights] = store

        def built(complete):  # the model is built: the file goes into place, a next build starts afresh
            store.finish(complete)
            _stores.pop(weights, None)
        weights.when_built.append(built)
    return store


def _warn(text):
    warnings.warn(f"npdiff: {text}", RuntimeWarning, stacklevel=4)


def _aligned(offset):
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _mapped_array(mapping, entry, start=0):
    """The array an index entry describes, a read-only view of `mapping` (which begins at file offset `start`)."""
    count = int(np.prod(entry["data_shape"], dtype=np.int64))
    values = np.frombuffer(mapping, dtype=entry["dtype"], count=count, offset=entry["offset"] - start)
    return values.reshape(entry["data_shape"])


def _packed_from(entry, data):
    """A PackedBf16Weight / PackedBf16Conv over `data` as the index entry describes it."""
    if entry["class"] == "conv":
        return PackedBf16Conv(data, entry["shape"], entry["layout"], entry["channels_per_block"])
    return PackedBf16Weight(data, entry["shape"], entry["layout"])


def _open_regular_file(path):
    """`path` opened for reading; OSError when it is not a regular file. A FIFO put where a cache file goes would
    block open() (and every bf16 load) for ever, a device would never end: O_NONBLOCK opens either at once, and
    they are refused before a byte is read."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # no effect on a regular file's reads
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device, a socket or a folder)")
    return os.fdopen(descriptor, "rb")


def _read_index_json(handle):
    """-> (file size, index length, the index's JSON) of an open cache file; the JSON is None when the file has no
    index at its end (too short, no magic word). ValueError for an index that is not JSON."""
    size = os.fstat(handle.fileno()).st_size
    if size < 16:
        return size, 0, None
    handle.seek(size - 16)
    length, magic = struct.unpack("<Q8s", handle.read(16))
    if magic != MAGIC or length > size - 16:
        return size, length, None
    handle.seek(size - 16 - length)
    return size, length, json.loads(handle.read(length).decode("utf-8"))


def read_index(path, constants, sources):
    """(mmap of the whole file, index entries) of a valid cache file at `path`; (None, reason) otherwise."""
    try:
        with _open_regular_file(path) as handle:
            size, length, index = _read_index_json(handle)
            if index is None:
                return None, f"{size} bytes" if size < 16 else "no index at its end (cut short?)"
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (FileNotFoundError, NotADirectoryError):  # no cache yet (or no folder for one)
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({exc})"
    if not isinstance(index, dict) or index.get("constants") != constants:
        return None, "packed by another npdiff version or kernel"
    if index.get("sources") != sources:
        return None, "the weight file changed"
    entries, data_end = index.get("entries"), size - 16 - length
    if not isinstance(entries, dict):
        return None, "a damaged index"
    for key, entry in entries.items():
        problem = _entry_problem(mapping, entry, data_end)
        if problem:
            return None, f"'{key}': {problem}"
    return mapping, entries


def _entry_problem(mapping, entry, data_end):
    """Why one index entry is unusable (outside the data, an unknown kind, a wrong CRC-32), or None."""
    try:
        if entry["class"] not in CLASSES or entry["dtype"] not in DATA_DTYPES or entry["offset"] % ALIGNMENT:
            return "an unknown kind of entry"
        nbytes = int(np.prod(entry["data_shape"], dtype=np.int64)) * np.dtype(entry["dtype"]).itemsize
        if entry["offset"] < 0 or entry["offset"] + nbytes > data_end:
            return "its bytes lie outside the file's data"
        values = _mapped_array(mapping, entry)
        crc = zlib.crc32(values)
        release_array_pages([values])  # the check paged it in: leave it in the page cache
    except (KeyError, TypeError, ValueError) as exc:
        return f"a damaged entry ({exc})"
    return None if crc == entry["crc32"] else "its bytes changed (CRC-32)"


class PackedCache:
    """The packed bf16 weights of one model: read from a valid cache file, or written into a new one."""

    def __init__(self, path, sources):
        self.path = Path(path)
        self.constants = packing_constants()
        self.sources = sources
        self.entries = {}        # key -> index entry (read: the file's; write: those written so far)
        self.mapping = None      # reader: the whole file's read-only map
        self.handle = None       # writer: the temporary file, None once finished or failed
        self.temporary = None
        self.failed = False      # the file could not be written: the other weights stay private
        self.pending, self.pending_bytes = [], 0  # writer: (weight, entry) written but not yet mapped
        self.chunk_start = 0     # writer: the file offset the next map starts at
        mapping, found = read_index(self.path, self.constants, self.sources)
        if mapping is not None:
            self.mapping, self.entries = mapping, found
            return
        if found is not None:  # a file is there but not usable: say so once, then rebuild it
            _warn(f"the packed bf16 cache {self.path} is not usable ({found}); it is rebuilt")
        self._open_temporary()

    @property
    def reading(self):
        return self.mapping is not None

    def _open_temporary(self):
        """Start the new file: ".<name>.<pid>.tmp" beside it (stale ones of dead processes removed first)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.path.parent)
            remove_orphaned_files(self.path.parent, keep=self.path)
            self.temporary = self.path.parent / f".{self.path.name}.{os.getpid()}.tmp"
            self.handle = open(self.temporary, "w+b")  # noqa: SIM115 (open across put() calls, closed in finish)
        except OSError as exc:
            self._give_up(exc)
            return
        # a build that never reaches finish() (an error in the model's constructor) removes its file
        self._cleanup = weakref.finalize(self, _remove_file, self.temporary, self.handle)

    def get(self, key, kind, shape):
        """The cached packed weight of `key` (a `kind` layer of `shape`), mapped from the file; None on a miss."""
        entry = self.entries.get(key) if self.reading else None
        if entry is None or entry["class"] != kind or tuple(entry["shape"]) != tuple(shape):
            return None
        return _packed_from(entry, _mapped_array(self.mapping, entry))

    def put(self, key, kind, packed):
        """Write a freshly packed weight into the new file; -> `packed`, whose array is swapped for a view of
        the file's map within CHUNK_BYTES of writing (unchanged when reading, or when the file cannot be written)."""
        data = np.ascontiguousarray(packed.data)
        if self.handle is None or data.nbytes == 0:
            return packed
        entry = {"class": kind, "shape": list(packed.shape), "layout": packed.layout,
                 "channels_per_block": getattr(packed, "channels_per_block", None), "dtype": data.dtype.name,
                 "data_shape": list(data.shape), "crc32": zlib.crc32(data)}
        try:
            # reserve the room first (a full disk fails here, not as a SIGBUS when the map is read), then write
            offset = _aligned(self.handle.seek(0, os.SEEK_END))
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self.handle.fileno(), offset, max(data.nbytes, 1))
            self.handle.seek(offset)
            self.handle.write(memoryview(data).cast("B"))
        except OSError as exc:
            self._give_up(exc)
            return packed
        entry["offset"] = offset
        self.entries[key] = entry
        self.pending.append((packed, entry))
        self.pending_bytes += data.nbytes
        if self.pending_bytes >= CHUNK_BYTES:
            self._map_pending()
        return packed

    def _map_pending(self):
        """Map the bytes written since the last map (one map per chunk: a map holds a file descriptor) and
        point the weights written there at it: their private arrays are freed, their pages file-backed."""
        if not self.pending:
            return
        self.handle.flush()
        end = self.handle.seek(0, os.SEEK_END)
        mapping = mmap.mmap(self.handle.fileno(), end - self.chunk_start, offset=self.chunk_start,
                            access=mmap.ACCESS_READ)
        for packed, entry in self.pending:
            packed.data = _mapped_array(mapping, entry, start=self.chunk_start)  # the same values, now mapped
        self.pending, self.pending_bytes, self.chunk_start = [], 0, _aligned(end)

    def finish(self, complete=True):
        """The model is built: append the index and rename the file into place (complete), or remove it."""
        if self.handle is None:
            return
        try:
            if complete:
                self._map_pending()
                index = json.dumps({"constants": self.constants, "sources": self.sources,
                                    "entries": self.entries}).encode("utf-8")
                self.handle.seek(0, os.SEEK_END)
                self.handle.write(index + struct.pack("<Q8s", len(index), MAGIC))
                self.handle.close()
                os.replace(self.temporary, self.path)  # the maps keep reading the same inode
                self._cleanup.detach()
        except OSError as exc:
            self._give_up(exc)
        finally:
            self.handle = None
            if self._cleanup.alive:  # not renamed into place: closed and removed
                self._cleanup()

    def _give_up(self, exc):
        """The file cannot be written: warn once, remove what was written (the maps made so far stay valid)."""
        if self.failed:
            return
        self.failed = True
        reason = "the disk is full" if getattr(exc, "errno", None) == errno.ENOSPC else (exc.strerror or str(exc))
        if str(self.path.parent) not in _unwritable:  # once per folder: not once per network
            _unwritable.add(str(self.path.parent))
            _warn(f"could not write the packed bf16 cache {self.path} ({reason}); packed weights stay in private "
                  "memory while that folder cannot be written (NPDIFF_BF16_CACHE=0: stop trying)")
        if self.handle is not None:
            _remove_file(self.temporary, self.handle)
        self.handle = None


def _remove_file(path, handle):
    """Close `handle` and remove `path` (already gone: fine)."""
    try:
        handle.close()
        os.unlink(path)
    except OSError:
        pass


def _index_sources(path):
    """The weight files a cache file was packed from (its index's "sources"), or None when its index is unreadable."""
    try:
        with _open_regular_file(path) as handle:
            index = _read_index_json(handle)[2]
    except (OSError, ValueError):
        return None
    sources = index.get("sources") if isinstance(index, dict) else None
    return list(sources) if isinstance(sources, dict) and sources else None


def remove_orphaned_files(folder, keep):
    """Remove the cache files in `folder` whose weight files are gone (a deleted or moved model): nothing can ever
    read them again, and an SDXL UNet's is 5 GB. A file whose index cannot be read is left alone (a model that
    loads it rebuilds it); so is `keep`, the file being written."""
    for path in folder.glob("*.bf16pack"):
        if path == keep:
            continue
        sources = _index_sources(path)
        if sources is not None and not all(os.path.exists(source) for source in sources):
            path.unlink(missing_ok=True)


def remove_stale_temporaries(folder):
    """Remove the ".<name>.<pid>.tmp" files in `folder` whose process no longer runs (a killed build)."""
    for path in folder.glob(".*.tmp"):
        match = re.fullmatch(r"\..+\.(\d+)\.tmp", path.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # alive, or another user's process: leave it
