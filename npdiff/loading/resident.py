"""Releasing the resident pages of memory-mapped weights once a stage is done with them.

    release_resident_pages(pipe.unet)      # -> bytes released; the UNet still works, bit for bit
    release_array_pages([array, ...])      # the same for given arrays

float32 weights are read-only views of a memory map of their .safetensors file (safetensors_io.py).
Reading them brings the file's pages into this process (they count in VmRSS as RssFile) and they stay
there while the map is open, even when no stage will touch them for a long while: after the text
encoder has encoded the prompt, after the last UNet step. Telling the kernel so, madvise(MADV_DONTNEED)
over the bytes of those weights, drops the pages from this process; they stay in the page cache (the map
is MAP_SHARED and read-only: nothing is written back and nothing is lost), and the next read faults each
back in from the page cache (measured in benchmarks/memory.py: a fraction of a second for the whole
SD 1.5 UNet) or, if the kernel has meanwhile evicted it, from the file. This is what lets the VAE decode
at 512x512 run without the UNet's 3.2 GiB resident beside its activations.

How the weights are found: a walk over the model object (its attributes, lists, tuples and dicts, npdiff
objects only) collects every NumPy array whose .base chain ends in an mmap, so it covers whatever the
model holds now (a LoRA-fused weight is a private array and is skipped; the original it replaced, kept
for unloading, is still a mapped view and is released too). In each map the span from the first of
those arrays' bytes to the last one's is released, rounded INWARD to whole pages (madvise works on pages;
a page shared with a tensor outside the span is never dropped, which would be harmless anyway): the
span also covers the pages the kernel's fault-around maps beside touched ones, and the originals of
weights a model keeps as private copies (TransposedLinear), which the walk no longer reaches.

The packed bfloat16 weights of precision="bf16" are views of their cache file's map (npdiff/models/
packed_cache.py; a PackedBf16 object holds the array): the walk finds and releases them like a float32
file's. Arrays copied into private memory (F16/BF16 widened, CuPy device arrays) are not file-backed: nothing
to release. Where mmap.madvise or MADV_DONTNEED is missing (not Linux/BSD/macOS) every call is a no-op
returning 0.
"""

import mmap

import numpy as np

_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


def mapping_of(array):
    """The mmap object a NumPy array is a view of (following .base and memoryview.obj), or None."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def reachable(obj):
    """Every object reachable from `obj` through npdiff objects' attributes, lists, tuples and dicts
    (each once, `obj` included): the models' layers and the arrays they hold."""
    seen, stack = set(), [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif type(item).__module__.startswith("npdiff") and hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())


def mapped_arrays(obj):
    """Every memory-mapped NumPy array reachable from `obj` (see reachable)."""
    return [item for item in reachable(obj) if isinstance(item, np.ndarray) and mapping_of(item) is not None]


def _page_runs(ranges):
    """Byte ranges [(start, end)] -> merged runs rounded inward to whole pages: [(start, length)]."""
    runs, page = [], mmap.PAGESIZE
    for start, end in sorted(ranges):
        if runs and start <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([start, end])
    aligned = []
    for start, end in runs:
        first, last = -(-start // page) * page, end // page * page  # start rounded up, end down
        if last > first:
            aligned.append((first, last - first))
    return aligned


def _byte_span(array, origin):
    """(start, end) of the bytes an array view spans, as offsets from `origin` (a strided view: its
    whole extent, gaps included)."""
    low = high = array.ctypes.data - origin
    for size, stride in zip(array.shape, array.strides):
        if stride < 0:
            low += stride * (size - 1)
        else:
            high += stride * (size - 1)
    return low, high + array.itemsize


def release_array_pages(arrays):
    """madvise(MADV_DONTNEED) over the pages of these memory-mapped arrays; -> bytes advised (0 if none).

    Arrays that are not views of an mmap are skipped. The arrays stay valid: the next read faults the
    pages back in (from the page cache), with the same bytes."""
    if not _MADVISE:
        return 0
    by_mapping = {}  # id(mmap) -> (mmap, [(start, end)])
    for array in arrays:
        mapping = mapping_of(array)
        if mapping is None or array.nbytes == 0:
            continue
        entry = by_mapping.setdefault(id(mapping), (mapping, []))
        origin = np.frombuffer(mapping, np.uint8, count=1).ctypes.data  # the map's first byte
        entry[1].append(_byte_span(array, origin))
    released = 0
    for mapping, ranges in by_mapping.values():
        # one span per map, from the first tensor's bytes to the last one's: a component's tensors lie
        # together in its file (a folder model: its own file; a single-file checkpoint: its key prefix,
        # sorted together), so the span also drops the pages the kernel's fault-around mapped beside
        # them and those of weights a model replaced by a private copy (TransposedLinear's originals)
        span = (min(start for start, _ in ranges), max(end for _, end in ranges))
        for start, length in _page_runs([span]):
            mapping.madvise(mmap.MADV_DONTNEED, start, length)
            released += length
    return released


def release_resident_pages(model):
    """Release the resident pages of every memory-mapped weight of `model` (any npdiff model, a pipeline
    or a list of them); -> bytes advised. The model's output afterwards is bit-identical: the pages come
    back from the page cache on the next call."""
    return release_array_pages(mapped_arrays(model))
