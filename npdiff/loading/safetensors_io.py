"""Reading one .safetensors file: validated, memory-mapped, widened to float32 once.

A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the raw
tensor bytes. Reading it takes two tools:

  1. the `safetensors` package (safe_open, framework="numpy") validates the file: header length,
     JSON, dtype names, shapes against byte counts, offsets that cover the data exactly. A file it
     rejects (truncated, corrupt header, wrong offsets) becomes an NpdiffError naming the file.
  2. np.memmap of the validated file gives each tensor's raw bytes without reading the rest. We read
     the bytes ourselves because numpy has no bfloat16: safe_open(framework="numpy").get_tensor raises
     "data type 'bfloat16' not understood" on BF16 tensors. One path serves all three float dtypes:

         F32   bytes -> float32 copy                       (one copy)
         F16   bytes viewed as float16 -> astype(float32)  (one copy, the widening)
         BF16  bytes viewed as uint16 -> uint32 << 16 -> viewed as float32 (one copy: bf16 is the top
               half of a float32, so the shift is exact)

Other dtypes (int8, float8, int64 buffers...) are refused by name when a model asks for them; a key
nobody takes (e.g. CLIP's int64 `position_ids`) is never read.

Pickle checkpoints (.ckpt, .pt, .pth, .bin) are refused before opening: unpickling runs arbitrary
code from the file. The message says how to convert one to safetensors.
"""

import json
import os
import struct

import numpy as np

from npdiff.errors import NpdiffError

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
    """One validated .safetensors file; tensors are read on demand through a memory map."""

    def __init__(self, path):
        path = os.fspath(path)
        refuse_pickle(path)
        if os.path.isdir(path):
            raise NpdiffError(f"{path} is a folder; expected a .safetensors file "
                              "(for a model folder use load_component_weights)")
        if not os.path.isfile(path):
            raise NpdiffError(f"no such file: {path}")
        self.path = path
        self._validate_with_safetensors()
        self._header, self._data_start = self._read_header()
        self._memmap = None  # opened on the first read

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
        for key, entry in header.items():  # safe_open checked this too; memmap must never read past the end
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

    def _raw_bytes(self, key):
        if self._memmap is None:
            self._memmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = self._header[key]["data_offsets"]
        return self._memmap[self._data_start + begin:self._data_start + end]  # [nbytes] uint8, no copy

    def read_float32(self, key):
        """The tensor `key` as a new float32 NumPy array of its stored shape (F32/F16/BF16 only)."""
        dtype = self.dtype(key)
        if dtype not in FLOAT_DTYPES:
            raise NpdiffError(f"key '{key}' in {self.path} has dtype {dtype}; npdiff reads float weights "
                              f"stored as {', '.join(FLOAT_DTYPES)} only")
        shape = self.shape(key)
        raw = self._raw_bytes(key).view(FLOAT_DTYPES[dtype])  # [n] stored dtype, still in the map
        if dtype == "BF16":
            bits = raw.astype(np.uint32)  # [n] uint16 -> uint32: the one copy
            bits <<= 16  # bf16 bits are the high half of the float32 bits
            values = bits.view(np.float32)
        else:
            values = raw.astype(np.float32)  # [n] -> float32: the one copy (F32: a plain copy)
        return values.reshape(shape)
