"""PackedLinear: a float32 Linear that also holds its weight packed for npdiff.kernels.linear_packed (column
panels of 64 outputs, in the GEMM micro-kernel's reading order), for GEMMs with few rows: CLIP's 2 x 77 tokens.
RowsLinear (at the end): the same panels for kernels.linear_rows, GEMMs with many rows: the UNet's transformers
(switched off, UNET_PACKS_ROWS: measured no faster in the UNet).

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
import weakref

import numpy as np

from npdiff.kernels.linear_packed import ALIGN_FLOATS, huge_page_empty, linear_packed, pack_panels, packed_shape
from npdiff.kernels.linear_rows import linear_rows
from npdiff.models import precision
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


# The UNet's transformer projections on packed panels (RowsLinear): OFF. Measured on SD 1.5's UNet (batch 2,
# 64x64 latent; benchmarks/RESULTS.md, "The UNet's linear layers on packed weights"; a loaded 2-core host): the
# whole call 7.53 / 7.53 s packed against 7.37 / 7.37 s on kernels.linear's sgemm (alternated, load ~1.9), and
# its packed layers' GEMMs, each timed in the forward beside the sgemm path on the same input, 1.45 against
# 1.43 s; at a cost of +0.51 GiB private memory (peak RSS 1.46 -> 1.77-1.85 GiB) and +0.8 s a load. Alone
# (benchmarks/unet_packed_linear.py, best of 11) the packed GEMM was 7-13% faster at most shapes: it does not
# carry into the network. True turns it on (the tests do, tests/models/test_rows_linear.py).
UNET_PACKS_ROWS = False
# When on, for a model whose packed copies total at
# most this: SD 1.x/2.x's 0.51 GiB, not SDXL's several GB (whose UNet's mapped weights are released block by
# block while it runs: private panels would stay resident beside them). A ControlNet's are not packed (its
# weights are counted as file-backed by memory_estimate.controlnet_bytes; not measured for speed)
ROWS_PACK_LIMIT_BYTES = 768 * 2**20
# the layers RowsLinear packs, by the end of their module name: self-attention's four projections, the
# cross-attention's query and output (its keys and values project the 77-token text: few rows, not packed),
# the feed-forward's output and proj_out (proj_in reads the NCHW input as a strided view: not packed)
ROWS_PACKED_MODULES = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0", ".attn2.to_q",
                       ".attn2.to_out.0", ".ff.net.2", ".proj_out")
_rows_pack_decisions = weakref.WeakKeyDictionary()  # Weights -> bool


def packs_rows(weights):
    """True when the model built from `weights` holds its transformer projections on packed panels: with
    UNET_PACKS_ROWS on, a UNet (not
    a ControlNet: no "controlnet_" key) with float32 Linear weights (not precision "bf16x3"/"bf16", and not
    "mixed"'s bf16 linear family), whose packed copies (every ROWS_PACKED_MODULES weight of the file) total at most
    ROWS_PACK_LIMIT_BYTES."""
    if not UNET_PACKS_ROWS:
        return False
    decided = _rows_pack_decisions.get(weights)
    if decided is None:
        keys = list(weights.keys())
        total = sum(4 * math.prod(weights.shape(key)) for key in keys
                    if key.endswith(".weight") and key.startswith(precision.UNET_KEY_STARTS)
                    and key.removesuffix(".weight").endswith(ROWS_PACKED_MODULES))
        controlnet = any(key.startswith("controlnet_") for key in keys)
        decided = total <= ROWS_PACK_LIMIT_BYTES and not controlnet and precision.keeps_float32(weights, "linear")
        _rows_pack_decisions[weights] = decided
    return decided


class RowsLinear(Linear):
    """nn.Linear over float32 NumPy weights, computed by kernels.linear_rows (GEMMs with many rows: the UNet's
    thousands of tokens) on panels packed at load, when packs_rows(weights) says so (not by default:
    UNET_PACKS_ROWS); else a plain Linear.

    Memory: the panels are one private copy of the weight (~0.5 GB for SD 1.5's UNet, packed in ~0.3 s), held for
    the model's life; `weight` stays the loader's array (a view of the file's map, whose pages are released after
    load and are not read by a forward on the panels). Assigning another weight (a fused LoRA, the training's
    LoRA steps) runs the layer on that array by the plain path (kernels.linear) until the packed one is assigned
    back (a LoRA's unload puts back the very object): nothing is packed again, the panels never go stale.
    An input whose rows are not C-contiguous also takes the plain path (no copy)."""

    def __init__(self, weights, prefix, in_features, out_features, bias=True, from_conv1x1=False):
        super().__init__(weights, prefix, in_features, out_features, bias, from_conv1x1)
        packable = (isinstance(self.weight, np.ndarray) and self.weight.dtype == np.float32
                    and (self.bias is None or isinstance(self.bias, np.ndarray)) and packs_rows(weights))
        self.panels = pack_panels(self.weight) if packable else None  # [out/64, in, 64] or None
        self.packed_weight = self.weight if packable else None  # the array the panels hold

    def __call__(self, x):
        runs_packed = (self.panels is not None and self.weight is self.packed_weight and isinstance(x, np.ndarray)
                       and x.dtype == np.float32 and x.size > 0)
        rows = x.reshape(-1, x.shape[-1]) if runs_packed else None  # [..., in] -> [M,in] (a view where it can be)
        if not runs_packed or not rows.flags.c_contiguous:
            return super().__call__(x)                                  # [..., in] -> [..., out]
        out = linear_rows(rows, self.panels, self.weight.shape[0], self.bias)  # [M,in] -> [M,out]
        return out.reshape(x.shape[:-1] + (out.shape[1],))              # [M,out] -> [..., out]
