"""Weights: the lazy view of named tensors that every model is built from.

A model's constructor asks for each parameter by its diffusers/transformers name and the shape its
config implies (`weights.take("conv_in.weight", (320, 4, 3, 3))`), then calls `check_all_used()`.
Behind a name sits a TensorRef: which file, the key stored there (the same name for a diffusers
folder; the original CompVis name for a single-file checkpoint) and the shape `take` returns (the
stored shape, or a reshape of it that the key map asked for, e.g. a 1x1 conv [C,C,1,1] read as a
linear [C,C]) and, for a tensor stored fused (OpenCLIP's q/k/v), which rows of it. Nothing is read
until `take`. A float32 tensor is a read-only view of the file's memory map (no copy; safetensors_io.py
says why and what that costs); F16/BF16 are widened to float32 once, into a file-backed map (widened.py)
that is released like a float32 file's.

take() checks every value for NaN/Inf (issue: a damaged file must be refused before a long job starts,
naming file, key and position). The check reads every page of every weight once at load: measured
over the 4.0 GB SD 1.5-size folder with the files in the page cache (benchmarks/memory.py load, 2-core
machine shared with other work, load average 1.5-2.4), from_pretrained took 0.9-1.8 s with it and
0.30-0.37 s without: the check is most of the load time. (A cold page cache adds reading the files from
disk here, which without the check the first call would pay instead.) Checking lazily, on a weight's first use, would refuse a
damaged UNet only after the text encoder ran, and a damaged VAE after every UNet step: too late. So
it stays at load, and the pages it brought in are released right after (resident.release_array_pages),
each tensor's after its check (so loading never holds more than about one tensor resident), and all the
model's mapped tensors once more in check_all_used(), the end of every model's constructor (the kernel
maps up to 64 KiB around each page fault, so checking one tensor brings in bits of its neighbours):
loading leaves the weights in the page cache, not resident, and the first call faults them back in.
A mapped float32 tensor found finite is remembered on disk per file (finite_cache.py: while the file's
size, times, inode and device are unchanged), so the next process loading the same file skips its check.

precision: "fp32" (the default), "bf16", "bf16x3" or "mixed", set by the models' from_pretrained(...,
precision=...) before the model is built (set_precision). The Linear and Conv2d layers read it
(npdiff/models/precision.py): at "bf16" they take their weight as float32 one tensor at a time and pack it
into bfloat16 at once, so no float32 copy of the whole model is ever made. Everything else (norms, biases,
embeddings) stays float32.
"bf16x3" packs the Linear weights the same way (as a bf16 hi + lo pair, float32's bytes) and keeps Conv2d
weights float32 as "fp32" does (file-backed). "mixed" packs the layers of some of a UNet's op families as
"bf16" does and keeps the rest float32, and the text encoders' and the VAE's all float32 (precision.py's
BF16_FAMILIES says which).
At "bf16", F16/BF16 tensors are widened into private memory per tensor (file_backed=False) rather than into
widened.py's file, whose float32 room for every half tensor of the file would be reserved on disk for the
few small tensors kept in float32.

A TensorRef may also be stored transposed (transpose=True): OpenCLIP's text_projection [D,P] in SDXL
files, which transformers holds as a Linear weight [P,D]. take() transposes the view; backend.to_device
then makes it contiguous, one private copy of that tensor (bigG's: 6.5 MB).
"""

import difflib
from dataclasses import dataclass

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.loading.finite_cache import known_finite, remember_finite
from npdiff.loading.resident import mapping_of, release_array_pages

# Non-finite check, in chunks so the temporary bool array stays at 1 MiB. Measured (2-core shared
# machine): 18-25 ms per 100 MB of float32 (a random 25M-value tensor), about half the cost of the
# widening copy itself (32-48 ms); loading the shipped model (22 MB as float32, 1.6 s in all) spends
# 4 ms in it. A Numba loop (sum of v * 0) was slower (64 ms), min()+max() no faster (19 ms).
FINITE_CHUNK = 1 << 20  # values per isfinite call
PRECISIONS = ("fp32", "bf16", "bf16x3", "mixed")  # what from_pretrained(..., precision=...) accepts


def check_precision(precision):
    """"fp32", "bf16", "bf16x3" or "mixed" as given; NpdiffError naming the value otherwise."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise NpdiffError(f"precision must be one of {', '.join(repr(name) for name in PRECISIONS)}; "
                          f"got {precision!r}")
    return precision


def first_non_finite(values):
    """Flat index of the first NaN/Inf in a float32 array, or None when every value is finite."""
    flat = values.reshape(-1)
    for start in range(0, flat.size, FINITE_CHUNK):
        chunk = np.isfinite(flat[start:start + FINITE_CHUNK])  # [<=FINITE_CHUNK] bool
        if not chunk.all():
            return start + int(np.argmin(chunk))
    return None


@dataclass(frozen=True)
class TensorRef:
    file: object  # a SafetensorsFile
    stored_key: str  # the key inside that file
    shape: tuple  # the shape take() returns (same number of elements as the stored rows)
    rows: tuple = None  # (start, stop) along the first axis, or None for the whole tensor (fused q/k/v)
    transpose: bool = False  # stored [a,b] taken as [b,a] (OpenCLIP's text_projection; see take())


def _shape_text(shape):
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


class Weights:
    """Named tensors from one source (a file, a sharded set, or one component of a single file)."""

    def __init__(self, source, refs, part=None):
        self.source = str(source)  # file path, for messages
        self.part = part  # e.g. "unet" for one component of a single-file checkpoint
        self._refs = dict(refs)  # name -> TensorRef
        self._used = set()
        self._mapped = []  # the memory-mapped arrays take() returned, released again by check_all_used()
        self._found_finite = {}  # SafetensorsFile -> stored keys checked finite here, remembered by check_all_used()
        self.precision = "fp32"  # "bf16": the Linear/Conv2d layers pack their weights (see set_precision)
        self.when_built = []  # callables finish(complete) that check_all_used runs (the packed bf16 cache's)

    def set_precision(self, precision):
        """Build the model's Linear/Conv2d weights in `precision` (one of PRECISIONS); -> self."""
        self.precision = check_precision(precision)
        return self

    @classmethod
    def from_file(cls, safetensors_file):
        """Every tensor of one SafetensorsFile under its own name and shape."""
        refs = {key: TensorRef(safetensors_file, key, safetensors_file.shape(key))
                for key in safetensors_file.keys()}
        return cls(safetensors_file.path, refs)

    def _where(self, key=None):
        """'<file>' or '<file> (unet part)'; with the stored name when it differs from `key`."""
        text = self.source if self.part is None else f"{self.source} ({self.part} part)"
        if key is not None and key in self._refs and self._refs[key].stored_key != key:
            text += f", stored as '{self._refs[key].stored_key}'"
            rows = self._refs[key].rows
            text += f" rows {rows[0]}:{rows[1]}" if rows is not None else ""
            text += " transposed" if self._refs[key].transpose else ""
        return text

    def __repr__(self):
        return f"Weights({self._where()}, {len(self._refs)} tensors)"

    def __len__(self):
        return len(self._refs)

    def __contains__(self, key):
        return key in self._refs

    def keys(self):
        return sorted(self._refs)

    def has(self, key):
        return key in self._refs

    def shape(self, key):
        """The shape take(key) returns, without reading the tensor."""
        return self._ref(key).shape

    def dtype(self, key):
        """The stored dtype name ('F32', 'F16', 'BF16', ...)."""
        ref = self._ref(key)
        return ref.file.dtype(ref.stored_key)

    def _ref(self, key):
        if key not in self._refs:
            close = difflib.get_close_matches(key, list(self._refs), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise NpdiffError(f"missing key '{key}' in {self._where()}{hint}")
        return self._refs[key]

    def files(self):
        """The paths of the files the tensors lie in (one, or a sharded set's shards)."""
        return sorted({ref.file.path for ref in self._refs.values()})

    def _checked_ref(self, key, shape):
        """The TensorRef of `key` when its shape is the config's `shape`; NpdiffError naming both otherwise."""
        ref = self._ref(key)
        expected = tuple(int(n) for n in shape)
        if tuple(ref.shape) != expected:
            raise NpdiffError(f"key '{key}' in {self._where(key)} has shape {_shape_text(ref.shape)}; "
                              f"the config expects {_shape_text(expected)}")
        return ref

    def claim(self, key, shape):
        """Check `key` against the config's `shape` and count it as used, reading nothing: for a weight whose
        values come from elsewhere (the packed bf16 cache, npdiff/models/packed_cache.py)."""
        self._checked_ref(key, shape)
        self._used.add(key)

    def take(self, key, shape, finite=True):
        """The tensor `key` as float32 on the active backend, checked against the config's `shape`.

        finite: refuse a tensor holding NaN or Inf (NpdiffError naming file, key and position): such a
        weight makes every picture black. finite=False reads the values as stored.
        """
        ref = self._checked_ref(key, shape)
        expected = tuple(int(n) for n in shape)
        file_backed = self.precision != "bf16"  # bf16: half tensors widened one at a time, privately
        values = ref.file.read_float32(ref.stored_key, file_backed=file_backed)  # F32: a view of the file's map
        mapped = mapping_of(values) is not None
        if ref.rows is not None:  # [3D,...] -> [D,...]: one of fused q/k/v (a widened one copied so the rest can go)
            values = values[ref.rows[0]:ref.rows[1]]
            values = values if mapped else values.copy()
        if ref.transpose:  # [a,b] -> [b,a]: a view here; to_device below makes it one contiguous private copy
            values = values.T
        values = values.reshape(expected)  # stored shape -> config shape (a view: the rows are contiguous)
        record_key = f"{ref.stored_key}[{ref.rows[0]}:{ref.rows[1]}]" if ref.rows is not None else ref.stored_key
        remembered = mapped and finite and ref.file.identity is not None and \
            record_key in known_finite(ref.file.real_path, ref.file.identity)  # checked by an earlier load
        bad = first_non_finite(values) if finite and not remembered else None
        if mapped and finite:
            # released again by check_all_used() whether or not it was checked here: a model's own
            # preparation (TransposedLinear's copy) pages it in too
            self._mapped.append(values)
            if not remembered:
                release_array_pages([values])  # the check paged the tensor in; leave it in the page cache
                if bad is None:
                    self._found_finite.setdefault(ref.file, set()).add(record_key)
        if bad is not None:
            position = tuple(int(i) for i in np.unravel_index(bad, expected))
            raise NpdiffError(f"key '{key}' in {self._where(key)} holds {values.reshape(-1)[bad]} at index "
                              f"{position}: the weights are damaged (NaN/Inf would make every picture black)")
        self._used.add(key)
        return backend.to_device(values)  # numpy: no copy (already float32, contiguous)

    def ignore(self, key):
        """Mark `key` as deliberately unused (e.g. CLIP's position_ids buffer); absent keys are fine."""
        if key in self._refs:
            self._used.add(key)

    def check_all_used(self):
        """NpdiffError listing every key that no take()/ignore() asked for. Releases the resident pages of
        every mapped tensor taken so far (the NaN/Inf checks paged them in), and runs when_built (complete:
        no key was left unused)."""
        release_array_pages(self._mapped)
        self._mapped = []
        for file, keys in self._found_finite.items():
            if file.identity is not None:
                remember_finite(file.real_path, file.identity, keys)
        self._found_finite = {}
        unused = sorted(set(self._refs) - self._used)
        finishing, self.when_built = self.when_built, []
        for finish in finishing:
            finish(complete=not unused)
        if unused:
            shown = ", ".join(f"'{key}'" for key in unused[:10])
            more = f" ... ({len(unused)} in all)" if len(unused) > 10 else ""
            raise NpdiffError(f"unexpected key{'s' if len(unused) > 1 else ''} in {self._where()}, not used "
                              f"by the model: {shown}{more}")
