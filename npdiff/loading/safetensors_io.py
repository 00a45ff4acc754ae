"""Reading one .safetensors file: validated; float32 tensors memory-mapped, the others widened once.

A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the raw
tensor bytes. Reading it takes two tools:

  1. the `safetensors` package (safe_open, framework="numpy") validates the file: header length,
     JSON, dtype names, shapes against byte counts, offsets that cover the data exactly. A file it
     rejects (truncated, corrupt header, wrong offsets) becomes an NpdiffError naming the file.
  2. the tensor bytes, at their offsets, taken ourselves (numpy has no bfloat16: safe_open(framework=
     "numpy").get_tensor raises "data type 'bfloat16' not understood" on BF16 tensors):

         F32   a READ-ONLY float32 view of a read-only memory map of the file: no copy at all. The
               pages come in from the kernel's page cache on first use and are shared with it (file-
               backed, RssFile), not private memory, so the kernel can drop them again under pressure
               or when told to (npdiff.loading.resident.release_resident_pages) and fault them back
               from the page cache. Needs the little-endian host byte order and a data offset that
               is a multiple of 4 (safetensors writers align it; a misaligned tensor is copied as below).
         F16   float16 -> float32, widened once. For a model's weights (read_float32(key, file_backed=
               True), what Weights.take asks for) into a file-backed map of an unlinked temporary file
               (widened.py: releasable like a float32 file's pages); otherwise (LoRA factors, or when
               that file cannot be made) bytes read() and widened into private memory
         BF16  uint16 bits -> uint32 << 16 -> viewed as float32 (bf16 is the top half of a float32, so
               the shift is exact); file-backed or private as F16

     Why a map for float32 (measured on an SD 1.5-size folder of float32 weights, 4.0 GB; see
     benchmarks/memory.py): read() into private arrays left 4.0 GiB resident after loading, all of it
     anonymous, for the whole run; mapped views leave it to the page cache, and a stage that is done
     with a model can release that model's pages. (An earlier loader copied OUT of a map into new
     arrays, which held each weight twice near the end of loading: 8.1 GiB peak.)

     What a map costs: the array is read-only (a LoRA or anything else must build a new array, never
     write into a weight; a write raises ValueError instead of corrupting the file's pages), the map and
     its file descriptor stay open for as long as any array views them (numpy's .base chain holds the
     mmap object: nothing to close by hand), and a file truncated or rewritten in place while it is
     mapped changes what the arrays read, or kills the process with SIGBUS when a page past the new
     end is touched. Replacing a file (write a new one, rename over the old) is safe: the map keeps
     the old inode.

Other dtypes (int8, float8, int64 buffers...) are refused by name when a model asks for them; a key
nobody takes (e.g. CLIP's int64 `position_ids`) is never read.

Pickle checkpoints (.ckpt, .pt, .pth, .bin) are refused before opening: unpickling runs arbitrary
code from the file. The message says how to convert one to safetensors.
"""

import json
import mmap
import os
import struct
import sys

import numpy as np

from npdiff.cache_folder import file_identity
from npdiff.errors import NpdiffError
from npdiff.loading.widened import HALF_DTYPES, WidenedCopy
from npdiff.paths import path_kind

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

# safetensors dtype name -> (numpy dtype of the stored bytes, how they become float32)
FLOAT_DTYPES = {
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",  # raw bits: numpy has no bfloat16
}

CONVERT_HINT = """Convert it once to safetensors, in an environment that has torch:

    import torch
    from safetensors.torch import save_file
    state = torch.load("{name}", map_location="cpu", weights_only=True)  # weights_only: no code runs
    state = state.get("state_dict", state)
    save_file({{k: v.clone().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}},
              "{stem}.safetensors")"""


def refuse_pickle(path):
    """NpdiffError if `path` names a pickle checkpoint (.ckpt/.pt/.pth/.bin/.pkl)."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix in PICKLE_SUFFIXES:
        name = os.path.basename(str(path))
        raise NpdiffError(
            f"{path}: refusing to read a '{suffix}' checkpoint. PyTorch {', '.join(PICKLE_SUFFIXES)} files "
            "are Python pickles, and unpickling a file can run arbitrary code from it; npdiff reads only "
            ".safetensors files, which hold nothing but tensors.\n"
            + CONVERT_HINT.format(name=name, stem=os.path.splitext(name)[0]))


def _describe_non_safetensors(path):
    """A hint for a file that safetensors rejects: is it a pickle or zip checkpoint renamed?"""
    with open(path, "rb") as handle:
        start = handle.read(4)
    if start.startswith(b"PK\x03\x04"):
        return " (it starts like a PyTorch zip checkpoint, i.e. a pickle, renamed: convert it, don't rename it)"
    if start[:1] == b"\x80":
        return " (it starts like a Python pickle, renamed: convert it, don't rename it)"
    return ""


class SafetensorsFile:
    """One validated .safetensors file; each tensor is mapped (F32) or read and widened on demand."""

    def __init__(self, path):
        path = os.fspath(path)
        refuse_pickle(path)
        kind = path_kind(path, "safetensors file")  # a FIFO, device or symlink loop: NpdiffError by name
        if kind == "folder":
            raise NpdiffError(f"{path} is a folder; expected a .safetensors file "
                              "(for a model folder use load_component_weights)")
        if kind == "missing":
            raise NpdiffError(f"no such file: {path}")
        self.path = path
        self.real_path = os.path.realpath(path)  # symlinks followed: the name the finite-check record uses
        self.identity = file_identity(self.real_path)  # None once the mapped file turns out to be another
        self._validate_with_safetensors()
        self._header, self._data_start = self._read_header()
        self._mapping = None  # the read-only mmap of the whole file, made on the first mapped take
        self._widened = None  # WidenedCopy of the F16/BF16 tensors, made on the first file-backed widening

    def _validate_with_safetensors(self):
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="numpy") as handle:
                handle.keys()
        except Exception as exc:  # SafetensorError (and OSError) for truncated/corrupt files
            raise NpdiffError(
                f"{self.path} is not a readable safetensors file: {exc}"
                f"{_describe_non_safetensors(self.path)}") from exc

    def _read_header(self):
        """The header JSON (safe_open already checked it) and where the data section starts."""
        with open(self.path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
        header.pop("__metadata__", None)
        data_start = 8 + header_length
        data_length = os.path.getsize(self.path) - data_start
        for key, entry in header.items():  # safe_open checked this too; never read past the end
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end <= data_length:
                raise NpdiffError(f"{self.path}: key '{key}' has data offsets {begin}..{end} outside the "
                                  f"{data_length}-byte data section (file truncated or corrupt)")
        return header, data_start

    def keys(self):
        return list(self._header)

    def dtype(self, key):
        """The stored dtype name as safetensors writes it: 'F32', 'F16', 'BF16', 'I64', ..."""
        return self._header[key]["dtype"]

    def shape(self, key):
        return tuple(self._header[key]["shape"])

    def count(self, key):
        """Number of values of `key`."""
        return int(np.prod(self.shape(key), dtype=np.int64))

    def raw_view(self, key):
        """[n] read-only view of the stored values of an F16/BF16 tensor in the file's map (BF16 as uint16 bits)."""
        begin, end = self._header[key]["data_offsets"]
        mapping = self._map()
        if self._data_start + end > len(mapping):  # the file shrank after it was validated
            raise NpdiffError(f"key '{key}' in {self.path}: its bytes end at {self._data_start + end} but the file "
                              f"has {len(mapping)} (file truncated)")
        return np.frombuffer(mapping, dtype=HALF_DTYPES[self.dtype(key)], count=self.count(key),
                             offset=self._data_start + begin)

    def _read_into(self, key, array):
        """Fill `array` (C-contiguous, of the tensor's byte size) with the stored bytes of `key`."""
        begin, end = self._header[key]["data_offsets"]
        buffer = memoryview(array).cast("B")  # [nbytes] uint8 view of the array: read() writes into it
        if buffer.nbytes != end - begin:
            raise NpdiffError(f"key '{key}' in {self.path}: shape {self.shape(key)} and dtype {self.dtype(key)} "
                              f"need {buffer.nbytes} bytes, the header gives {end - begin}")
        with open(self.path, "rb") as handle:
            handle.seek(self._data_start + begin)
            got = handle.readinto(buffer)
        if got != buffer.nbytes:  # the file shrank after it was validated
            raise NpdiffError(f"key '{key}' in {self.path}: read {got} of {buffer.nbytes} bytes (file truncated)")
        return array

    def _map(self):
        """The read-only memory map of the whole file (one per file, made once, never closed by hand:
        the arrays viewing it keep it alive through their .base chain)."""
        if self._mapping is None:
            with open(self.path, "rb") as handle:
                if file_identity(os.fstat(handle.fileno())) != self.identity:  # replaced since it was opened
                    self.identity = None  # its finite checks are not remembered (finite_cache.py)
                self._mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)  # MAP_SHARED, PROT_READ
        return self._mapping

    def can_map(self, key):
        """True when take(key) is a zero-copy view: F32, a 4-byte aligned offset, a little-endian host."""
        begin = self._header[key]["data_offsets"][0]
        return self.dtype(key) == "F32" and (self._data_start + begin) % 4 == 0 and sys.byteorder == "little"

    def _mapped_float32(self, key, count):
        """[count] read-only float32 view of the mapped bytes of `key` (no copy)."""
        begin, end = self._header[key]["data_offsets"]
        mapping = self._map()
        if end - begin != 4 * count:
            raise NpdiffError(f"key '{key}' in {self.path}: shape {self.shape(key)} and dtype F32 need {4 * count} "
                              f"bytes, the header gives {end - begin}")
        if self._data_start + end > len(mapping):  # the file shrank after it was validated
            raise NpdiffError(f"key '{key}' in {self.path}: its bytes end at {self._data_start + end} but the file "
                              f"has {len(mapping)} (file truncated)")
        return np.frombuffer(mapping, dtype=np.float32, count=count, offset=self._data_start + begin)

    def read_float32(self, key, file_backed=False):
        """The tensor `key` as float32 of its stored shape (F32/F16/BF16 only): a read-only view of the
        file's memory map when can_map(key); F16/BF16 with file_backed=True: a read-only view of the
        widened copy's map (widened.py); else a new array (the widening, or a misaligned copy)."""
        dtype = self.dtype(key)
        if dtype not in FLOAT_DTYPES:
            raise NpdiffError(f"key '{key}' in {self.path} has dtype {dtype}; npdiff reads float weights "
                              f"stored as {', '.join(FLOAT_DTYPES)} only")
        shape = self.shape(key)
        count = int(np.prod(shape, dtype=np.int64))
        if self.can_map(key):
            return self._mapped_float32(key, count).reshape(shape)  # [n] -> stored shape, still a view
        if file_backed and dtype in HALF_DTYPES and sys.byteorder == "little":
            if self._widened is None:
                self._widened = WidenedCopy(self)
            values = self._widened.float32(key)  # [n] read-only view, or None: no file could be made
            if values is not None:
                return values.reshape(shape)
        raw = self._read_into(key, np.empty(count, dtype=FLOAT_DTYPES[dtype]))  # [n] as stored
        if dtype == "BF16":
            bits = raw.astype(np.uint32)  # [n] uint16 -> uint32
            bits <<= 16  # bf16 bits are the high half of the float32 bits
            values = bits.view(np.float32)
        else:
            values = raw.astype(np.float32, copy=False)  # misaligned F32: the array read; F16: the widening
        return values.reshape(shape)
