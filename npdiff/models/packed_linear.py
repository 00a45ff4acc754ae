"""PackedLinear: a float32 Linear that also holds its weight packed for npdiff.kernels.linear_packed (column
panels of 64 outputs, in the GEMM micro-kernel's reading order), for GEMMs with few rows: CLIP's 2 x 77 tokens.

    layer = PackedLinear(weights, "encoder.layers.0.mlp.fc1", 768, 3072)
    y = layer(x)                                         # [..., in] -> [..., out], as Linear
    y = layer.rows(x_rows, activation="quick_gelu", residual=h)    # [M,in] -> [M,out]: the epilogue fused

Memory: the panels are one private copy of the weight (the same bytes when `out` is a multiple of 64; CLIP-L's
72 projections: 340 MB), made at load, as TransposedLinear's [in,out] copy was, in ~0.1 s for CLIP-L; a model's layers
pack into one block of 2 MiB pages (PanelBlock, below). `weight`
stays the array the loader gave (a read-only view of the file's map, whose pages are released after load): it
is what LoRA, the training backward and verify read, and assigning one (a fused LoRA, its unload) packs it
again, into the same panels, and keeps the very object assigned (the LoRA tests check the unload puts back the original by identity).
A forward never reads `weight`, so its mapped pages stay released.
"""

import math

import numpy as np

from npdiff.kernels.linear_packed import ALIGN_FLOATS, huge_page_empty, linear_packed, pack_panels, packed_shape
from npdiff.models.blocks import Linear


class PackedLinear(Linear):
    """nn.Linear over float32 NumPy weights, computed by linear_packed on panels packed at load (into `block`'s
    next panels when given: a PanelBlock the model's layers share; else an array of their own)."""

    def __init__(self, *args, block=None, **kwargs):
        self._block = block  # used only by the first packing, in Linear's __init__ (not held: one owner, the views)
        super().__init__(*args, **kwargs)
        self._block = None

    @property
    def weight(self):
        return self._weight  # [out,in]: the loader's array, or the last one assigned

    @weight.setter
    def weight(self, value):
        self._weight = value
        panels = getattr(self, "panels", None)
        if panels is not None and panels.shape == packed_shape(value.shape):
            pack_panels(value, out=panels)  # in place: the panels keep their memory (a PanelBlock's)
        elif panels is None and self._block is not None:
            self.panels = pack_panels(value, out=self._block.take(packed_shape(value.shape)))  # [out/64, in, 64]
        else:
            self.panels = pack_panels(value)  # [out,in] -> [out/64, in, 64]

    def rows(self, x_rows, activation=None, residual=None, out=None):
        """activation(x @ W^T + bias) + residual -> [M, out] for C-contiguous float32 rows x [M, in]
        (kernels.linear_packed); written into `out` when given."""
        return linear_packed(x_rows, self.panels, self._weight.shape[0], self.bias, activation, residual, out)

    def __call__(self, x):
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])  # [..., in] -> [M,in]
        out = self.rows(rows)                                           # [M,in] -> [M,out]
        return out.reshape(x.shape[:-1] + (out.shape[1],))              # [M,out] -> [..., out]



class PanelBlock:
    """One block of 2 MiB pages (kernels/linear_packed.huge_page_empty) that PackedLinear layers pack their panels
    into, one after another in the order the layers are made, each on a 64-byte boundary.

    Why: a forward streams every panel from memory (CLIP-L: 340 MB a call, every call), and on 4 KiB pages each
    2.4 MB q/k/v/o panel set is ~600 pages, each a TLB miss and a page walk (NumPy gives huge pages only to
    arrays of 4 MiB and more, so fc1/fc2 had them and q/k/v/o not). Measured on CLIP-L against the panels in an
    array a layer, the same bytes out (benchmarks/RESULTS.md, "CLIP on 2 MiB pages"): under load 2x faster on
    one thread; with nothing else in the guest (session 13, a busy host) 17% less per call at two threads, and
    ~1.1 s more per load in that VM (the first touch of fresh 2 MiB pages). Packing straight into the block
    touches each page once, as an array a layer did."""

    def __init__(self, floats):
        self.floats = huge_page_empty(floats)  # [floats]
        self.used = 0

    @staticmethod
    def floats_for(shapes):
        """The block's size for panels of these shapes (each rounded up to whole cache lines)."""
        return sum(-(-math.prod(shape) // ALIGN_FLOATS) * ALIGN_FLOATS for shape in shapes)

    def take(self, shape):
        """The next C-contiguous float32 array of `shape` in the block (a view)."""
        size = math.prod(shape)
        if self.used + size > self.floats.size:
            raise ValueError(f"PanelBlock: {size} more floats do not fit ({self.used} of {self.floats.size} used)")
        view = self.floats[self.used:self.used + size].reshape(shape)
        self.used += -(-size // ALIGN_FLOATS) * ALIGN_FLOATS
        return view
