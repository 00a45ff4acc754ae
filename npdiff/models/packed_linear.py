"""PackedLinear: a float32 Linear that also holds its weight packed for npdiff.kernels.linear_packed (column
panels of 64 outputs, in the GEMM micro-kernel's reading order), for GEMMs with few rows: CLIP's 2 x 77 tokens.

    layer = PackedLinear(weights, "encoder.layers.0.mlp.fc1", 768, 3072)
    y = layer(x)                                         # [..., in] -> [..., out], as Linear
    y = layer.rows(x_rows, activation="quick_gelu", residual=h)    # [M,in] -> [M,out]: the epilogue fused

Memory: the panels are one private copy of the weight (the same bytes when `out` is a multiple of 64; CLIP-L's
72 projections: 340 MB), made at load, as TransposedLinear's [in,out] copy was, in ~0.1 s for CLIP-L. `weight`
stays the array the loader gave (a read-only view of the file's map, whose pages are released after load): it
is what LoRA, the training backward and verify read, and assigning one (a fused LoRA, its unload) packs it
again and keeps the very object assigned (the LoRA tests check the unload puts back the original by identity).
A forward never reads `weight`, so its mapped pages stay released.
"""

import numpy as np

from npdiff.kernels.linear_packed import linear_packed, pack_panels
from npdiff.models.blocks import Linear


class PackedLinear(Linear):
    """nn.Linear over float32 NumPy weights, computed by linear_packed on panels packed at load."""

    @property
    def weight(self):
        return self._weight  # [out,in]: the loader's array, or the last one assigned

    @weight.setter
    def weight(self, value):
        self._weight = value
        self.panels = pack_panels(value)  # [out,in] -> [out/64, in, 64]

    def rows(self, x_rows, activation=None, residual=None, out=None):
        """activation(x @ W^T + bias) + residual -> [M, out] for C-contiguous float32 rows x [M, in]
        (kernels.linear_packed); written into `out` when given."""
        return linear_packed(x_rows, self.panels, self._weight.shape[0], self.bias, activation, residual, out)

    def __call__(self, x):
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])  # [..., in] -> [M,in]
        out = self.rows(rows)                                           # [M,in] -> [M,out]
        return out.reshape(x.shape[:-1] + (out.shape[1],))              # [M,out] -> [..., out]
