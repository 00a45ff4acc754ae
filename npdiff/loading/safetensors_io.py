"""Reading one .safetensors file: validated, each tensor read straight into its float32 array once.

A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the raw
tensor bytes. Reading it takes two tools:

  1. the `safetensors` package (safe_open, framework="numpy") validates the file: header length,
     JSON, dtype names, shapes against byte counts, offsets that cover the data exactly. A file it
     rejects (truncated, corrupt header, wrong offsets) becomes an NpdiffError naming the file.
  2. a plain read() of each tensor's bytes, at its offset, into a new array. We read the bytes
     ourselves because numpy has no bfloat16: safe_open(framework="numpy").get_tensor raises
     "data type 'bfloat16' not understood" on BF16 tensors. One path serves all three float dtypes:

         F32   bytes read into the float32 array itself     (one copy, no temporary)
         F16   bytes read as float16 -> astype(float32)     (the widening; the float16 buffer is freed)
         BF16  bytes read as uint16 -> uint32 << 16 -> viewed as float32 (bf16 is the top half of a
               float32, so the shift is exact)

     Not a memory map: pages of a mapped file count in the process's resident memory for as long as
     the map is open, so copying out of a map held every weight twice near the end of loading
     (measured on an SD 1.5-size folder: 8.1 GiB peak RSS for 3.8 GiB of float32 weights). read()
     leaves the file in the kernel's page cache, which is not the process's memory.

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

    def read_float32(self, key):
        """The tensor `key` as a new float32 NumPy array of its stored shape (F32/F16/BF16 only)."""
        dtype = self.dtype(key)
        if dtype not in FLOAT_DTYPES:
            raise NpdiffError(f"key '{key}' in {self.path} has dtype {dtype}; npdiff reads float weights "
                              f"stored as {', '.join(FLOAT_DTYPES)} only")
        shape = self.shape(key)
        count = int(np.prod(shape, dtype=np.int64))
        raw = self._read_into(key, np.empty(count, dtype=FLOAT_DTYPES[dtype]))  # [n] as stored
        if dtype == "BF16":
            bits = raw.astype(np.uint32)  # [n] uint16 -> uint32
            bits <<= 16  # bf16 bits are the high half of the float32 bits
            values = bits.view(np.float32)
        else:
            values = raw.astype(np.float32, copy=False)  # F32: the array read (no copy); F16: the widening
        return values.reshape(shape)
