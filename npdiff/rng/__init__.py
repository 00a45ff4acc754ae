"""Every source of noise in npdiff.

    TorchGenerator   npdiff/rng/torch_cpu.py      PyTorch's CPU generator (MT19937 + Box-Muller), bit
                                                  for bit: same seed, same latents as diffusers on CPU.
    PhiloxGenerator  npdiff/rng/philox.py         PyTorch's CUDA generator (Philox4x32-10 and
                                                  curand_normal4's layout), to a few ULP.
    WichmannHill     npdiff/rng/wichmann_hill.py  the 1982 generator of the fast.ai lesson.

Kernels: mt19937.py (the Mersenne Twister and its uniforms), torch_normal.py (Box-Muller blocks),
cephes.py (torch's AVX2 float32 log/sincos); npdiff/intrinsics.py has the exact FMA and bit casts for Numba.
Imported lazily, so `import npdiff.rng` does not import Numba until a generator is used.
"""

import importlib

_WHERE = {
    "TorchGenerator": "npdiff.rng.torch_cpu",
    "PhiloxGenerator": "npdiff.rng.philox",
    "WichmannHill": "npdiff.rng.wichmann_hill",
    "CudaGenerator": "npdiff.rng.cuda",  # torch.randn(device="cuda") on the GPU (cupy), bit for bit
}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'npdiff.rng' has no attribute {name!r}")


__all__ = list(_WHERE)
