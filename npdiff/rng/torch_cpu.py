"""TorchGenerator: PyTorch's CPU random generator, bit for bit, in NumPy + Numba.

    g = TorchGenerator(seed)                 # == torch.Generator().manual_seed(seed)
    g.randn((1, 4, 64, 64))                  # == torch.randn((1, 4, 64, 64), generator=g_torch)
    g.randn(shape, dtype=np.float32)         # the call diffusers' schedulers and VAE make
    g.rand(shape, dtype)                     # == torch.rand
    g.manual_seed(s) -> g;  g.initial_seed();  g.seed();  g.get_state();  g.set_state(state)

A SEQUENCE of calls matches torch's sequence on a generator seeded alike: sizes, dtypes and call
order all matter, because torch consumes the stream differently per path (see below).

How torch draws (ATen: MT19937RNGEngine.h, CPUGeneratorImpl.cpp, cpu/DistributionTemplates.h):
 1. Seed: any int in [-2**63, 2**64 - 1]; negatives wrap to uint64 (initial_seed() reports that
    value). MT19937 is seeded from the low 32 bits only, so seeds s and s + 2**32 draw alike.
    Seeding also drops the cached normal of step 4.
 2. Uniforms: float32 u = (draw & 0xFFFFFF) * 2^-24; float64 u = 53 bits from two draws
    (npdiff/rng/mt19937.py).
 3. randn with n >= 16 elements: draw n uniforms, Box-Muller on each block of 16 (8 pairs: first
    half with second half); if n % 16 != 0, draw 16 FRESH uniforms for out[n-16:n] and transform
    them (overwriting the ends of the last full block). n + 16 draws in all.
    float32 uses torch's AVX2 kernel (Cephes float32 log/sincos with FMAs) unless math="default"
    (libm logf/sinf/cosf, what torch runs with ATEN_CPU_CAPABILITY=default or on non-x86 CPUs);
    float64 uses libm in double (npdiff/rng/torch_normal.py).
    float16 / bfloat16: computed in float32 by the same float32 kernel, in blocks of 16 fresh
    uniforms each, the last (partial) block written to out[n-16:n], then rounded to nearest even.
    Only ceil(n/16)*16 draws, so fp16 is NOT "float32 randn, then cast" when n % 16 != 0.
 4. randn with n < 16 (any dtype, also shape ()): torch's serial path: double-precision Box-Muller
    on two 53-bit uniforms, returning r*cos and CACHING r*sin for the next normal drawn on this path;
    the value is then cast (double -> float32 -> float16/bfloat16, as C++'s casts do).
 5. rand: one uniform per element; float16/bfloat16 are the float32 uniform rounded to the type,
    with a value that rounds up to 1.0 replaced by 0.0 (as torch does).

bfloat16 results are returned as float32 arrays holding bfloat16 values exactly (NumPy has no
bfloat16). Their bits: `(a.view(np.uint32) >> 16).astype(np.uint16)` == torch's `t.view(torch.int16)`.

Threads: one generator must not be used from two threads at once (torch holds a mutex; we don't).
"""

import math
import os

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.rng import mt19937
from npdiff.rng import torch_normal as kernels
from npdiff.rng.validate import (
    UINT64_MOD,
    check_choice,
    check_dtype,
    check_seed,
    check_shape,
)

DEFAULT_SEED = 67280421310721  # c10::detail::default_rng_seed_val: a fresh torch.Generator()'s seed
MATH_PATHS = ("avx2", "default")  # named after ATEN_CPU_CAPABILITY's values
RANDN_DTYPES = ("float32", "float64", "float16", "bfloat16")
BLOCK = kernels.BLOCK

# torch.get_rng_state()'s bytes: CPUGeneratorImplState = THGeneratorState (the "legacy pod") + the
# float normal cache. Native little-endian C layout with its padding (5056 bytes).
STATE_DTYPE = np.dtype([
    ("the_initial_seed", "<u8"), ("left", "<i4"), ("seeded", "<i4"), ("next", "<u8"),
    ("state", "<u8", (mt19937.N,)),
    ("normal_x", "<f8"), ("normal_y", "<f8"), ("normal_rho", "<f8"), ("normal_is_valid", "<i4"),
    ("_pad0", "V4"),
    ("next_float_normal_sample", "<f4"), ("is_next_float_normal_sample_valid", "u1"), ("_pad1", "V3"),
])
LEGACY_STATE_BYTES = 5048  # THGeneratorState alone: torch.set_rng_state accepts it too


def round_to_bfloat16(values):
    """float32 array -> float32 array holding the nearest bfloat16 (ties to even), as c10::BFloat16."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)  # [n] (uint64: no overflow)
    rounding_bias = ((bits >> 16) & 1) + 0x7FFF
    high = ((bits + rounding_bias) >> 16) << 16
    rounded = high.astype(np.uint32).view(np.float32)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = np.uint32(0x7FC00000).view(np.float32)
    return rounded


def cast_from_float32(values, dtype_name):
    """float32 normals/uniforms -> the requested dtype, rounding as torch's static_cast does."""
    if dtype_name == "float32":
        return values
    if dtype_name == "float16":
        return values.astype(np.float16)
    return round_to_bfloat16(values)


class TorchGenerator:
    """PyTorch's CPU generator (torch.Generator() / torch.manual_seed) reproduced bit for bit.

    seed: int in [-2**63, 2**64-1], or None for a fresh torch.Generator()'s default seed.
    math: "avx2" (default): float32 normals as torch computes them on x86 CPUs with AVX2/AVX-512;
          "default": as torch computes them with ATEN_CPU_CAPABILITY=default and on other CPUs.
    """

    def __init__(self, seed=None, math="avx2"):
        self.math = check_choice("TorchGenerator", "math", math, MATH_PATHS)
        self._mt = np.zeros(mt19937.N, dtype=np.uint32)  # MT19937 words
        self._counters = np.zeros(2, dtype=np.int64)  # torch's (left, next)
        self._normal_cache = np.zeros(2, dtype=np.float64)  # (valid, value): next_double_normal_sample
        self._float_normal_cache = (0.0, False)  # next_float_normal_sample: unused by randn; kept for state
        self.manual_seed(DEFAULT_SEED if seed is None else seed)

    def __repr__(self):
        return f"TorchGenerator(seed={self._initial_seed}, math={self.math!r})"

    # ---- seeding --------------------------------------------------------------------------
    def manual_seed(self, seed):
        """Reseed as torch.Generator.manual_seed(seed) does; returns self."""
        seed = check_seed("TorchGenerator.manual_seed", seed, -(2**63), UINT64_MOD - 1)
        self._initial_seed = seed % UINT64_MOD  # two's complement wrap of negative seeds
        mt19937.seed_mt(np.uint64(self._initial_seed), self._mt, self._counters)
        self._normal_cache[:] = 0.0
        self._float_normal_cache = (0.0, False)
        return self

    def initial_seed(self):
        """The seed as torch reports it: an int in [0, 2**64)."""
        return self._initial_seed

    def seed(self):
        """Reseed from the OS's entropy (as torch.Generator.seed()); returns the new seed."""
        new_seed = int.from_bytes(os.urandom(8), "little")
        self.manual_seed(new_seed)
        return new_seed

    # ---- drawing --------------------------------------------------------------------------
    def randn(self, shape, dtype=np.float32):
        """Standard normals of `shape`, equal to torch.randn(shape, dtype=..., generator=g)."""
        shape = check_shape("TorchGenerator.randn", shape)
        dtype_name = check_dtype("TorchGenerator.randn", dtype, RANDN_DTYPES)
        n = math.prod(shape)
        if n < BLOCK:
            normals = self._serial_normals(n)  # [n] float64
            if dtype_name == "float64":
                return normals.reshape(shape)
            return cast_from_float32(normals.astype(np.float32), dtype_name).reshape(shape)
        if dtype_name == "float64":
            return self._block_normals_f64(n).reshape(shape)
        if dtype_name == "float32":
            return self._block_normals_f32(n).reshape(shape)
        return cast_from_float32(self._block_normals_reduced(n), dtype_name).reshape(shape)

    def rand(self, shape, dtype=np.float32):
        """Uniforms in [0, 1) of `shape`, equal to torch.rand(shape, dtype=..., generator=g)."""
        shape = check_shape("TorchGenerator.rand", shape)
        dtype_name = check_dtype("TorchGenerator.rand", dtype, RANDN_DTYPES)
        n = math.prod(shape)
        if dtype_name == "float64":
            out = np.empty(n, dtype=np.float64)  # [n]
            mt19937.fill_uniform_f64(self._mt, self._counters, out)
            return out.reshape(shape)
        uniforms = np.empty(n, dtype=np.float32)  # [n]
        mt19937.fill_uniform_f32(self._mt, self._counters, uniforms)
        if dtype_name == "float32":
            return uniforms.reshape(shape)
        rounded = cast_from_float32(uniforms, dtype_name)
        rounded[rounded == 1.0] = 0.0  # torch: a value that rounds up to `to` becomes `from`
        return rounded.reshape(shape)

    def _transform_f32(self, data, n_blocks):
        kernels.transform_blocks_f32(data, n_blocks, self.math == "avx2")

    def _block_normals_f32(self, n):
        """n >= 16 float32 normals: n uniforms, full blocks, then a fresh tail block if n % 16."""
        out = np.empty(n, dtype=np.float32)  # [n]
        mt19937.fill_uniform_f32(self._mt, self._counters, out)
        self._transform_f32(out, n // BLOCK)
        if n % BLOCK:
            tail = out[n - BLOCK:]  # [16] view: overwrites the ends of the last full block
            mt19937.fill_uniform_f32(self._mt, self._counters, tail)
            self._transform_f32(tail, 1)
        return out

    def _block_normals_f64(self, n):
        out = np.empty(n, dtype=np.float64)  # [n]
        mt19937.fill_uniform_f64(self._mt, self._counters, out)
        kernels.transform_blocks_f64(out, n // BLOCK)
        if n % BLOCK:
            tail = out[n - BLOCK:]  # [16]
            mt19937.fill_uniform_f64(self._mt, self._counters, tail)
            kernels.transform_blocks_f64(tail, 1)
        return out

    def _block_normals_reduced(self, n):
        """float32 normals for a float16/bfloat16 result: ceil(n/16) blocks of 16 fresh uniforms;
        full blocks land in order, the partial last block lands on out[n-16:n]."""
        n_blocks = -(-n // BLOCK)
        buffer = np.empty(n_blocks * BLOCK, dtype=np.float32)  # [ceil(n/16)*16]
        mt19937.fill_uniform_f32(self._mt, self._counters, buffer)
        self._transform_f32(buffer, n_blocks)
        if n % BLOCK == 0:
            return buffer
        out = np.empty(n, dtype=np.float32)  # [n]
        full = (n // BLOCK) * BLOCK
        out[:full] = buffer[:full]
        out[n - BLOCK:] = buffer[full:]  # the last block, written over the ends of the one before
        return out

    def _serial_normals(self, n):
        out = np.empty(n, dtype=np.float64)  # [n]
        kernels.serial_normals(self._mt, self._counters, self._normal_cache, out)
        return out

    # ---- state ----------------------------------------------------------------------------
    def get_state(self):
        """The state as torch.get_rng_state() lays it out: uint8 [5056]. torch.set_rng_state(
        torch.from_numpy(g.get_state())) continues this generator's stream in torch."""
        state = np.zeros((), dtype=STATE_DTYPE)
        state["the_initial_seed"] = self._initial_seed
        state["left"] = self._counters[mt19937.LEFT]
        state["seeded"] = 1
        state["next"] = self._counters[mt19937.NEXT]
        state["state"] = self._mt
        if self._normal_cache[0] != 0.0:
            state["normal_is_valid"] = 1
            state["normal_y"] = self._normal_cache[1]
        value, valid = self._float_normal_cache
        if valid:
            state["next_float_normal_sample"] = value
            state["is_next_float_normal_sample_valid"] = 1
        return np.frombuffer(state.tobytes(), dtype=np.uint8).copy()

    def set_state(self, state):
        """Restore a state from get_state() or torch.get_rng_state() (uint8 array or bytes)."""
        raw = bytes(np.ascontiguousarray(np.asarray(state, dtype=np.uint8)).tobytes())
        if len(raw) not in (STATE_DTYPE.itemsize, LEGACY_STATE_BYTES):
            raise NpdiffError(f"TorchGenerator.set_state: state must have {STATE_DTYPE.itemsize} bytes "
                              f"(or {LEGACY_STATE_BYTES}, torch's legacy layout), got {len(raw)}")
        padded = raw + bytes(STATE_DTYPE.itemsize - len(raw))
        fields = np.frombuffer(padded, dtype=STATE_DTYPE)[0]
        left, nxt = int(fields["left"]), int(fields["next"])
        if not (1 <= left <= mt19937.N and 0 <= nxt <= mt19937.N and fields["seeded"]):
            raise NpdiffError(f"TorchGenerator.set_state: invalid MT19937 state: left={left} (expected "
                              f"1..624), next={nxt} (expected 0..624), seeded={int(fields['seeded'])}")
        self._initial_seed = int(fields["the_initial_seed"])
        self._mt[:] = fields["state"].astype(np.uint32)
        self._counters[:] = (left, nxt)
        self._normal_cache[:] = (1.0, fields["normal_y"]) if fields["normal_is_valid"] else (0.0, 0.0)
        if len(raw) == STATE_DTYPE.itemsize and fields["is_next_float_normal_sample_valid"]:
            self._float_normal_cache = (float(fields["next_float_normal_sample"]), True)
        else:
            self._float_normal_cache = (0.0, False)
        return self
