"""PhiloxGenerator: PyTorch's CUDA generator (Philox4x32-10 + curand_normal4), emulated on the CPU.

    g = PhiloxGenerator(seed, num_sms=108)       # like torch.Generator("cuda").manual_seed(seed)
    g.randn((1, 4, 64, 64))                      # like torch.randn(..., device="cuda", generator=g)

How torch.randn draws on a CUDA device (ATen cuda/DistributionTemplates.h, curand_kernel.h):
 1. Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") maps a
    128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four 32-bit outputs by 10 rounds of
        (hi0, lo0) = 0xD2511F53 * c0,   (hi1, lo1) = 0xCD9E8D57 * c2      (64-bit products)
        c = (hi1 ^ c1 ^ k0,  lo1,  hi0 ^ c3 ^ k1,  lo0)
    with the key bumped by (0x9E3779B9, 0xBB67AE85) between rounds. Key = the seed's low and high
    32 bits, so (unlike the CPU generator) all 64 bits of the seed matter.
 2. Launch: blocks of 256 threads, grid = min(ceil(N/256), num_sms * (max_threads_per_sm // 256)),
    T = 256 * grid threads. Thread t calls curand_init(seed, subsequence=t, offset): its k-th Philox
    block uses the counter (offset/4 + k as 64 bits in c0,c1;  t in c2,c3).
 3. Each call of curand_normal4 uses one block (x, y, z, w) and makes two Box-Muller pairs:
        u = x * 2^-32 + 2^-33,  v = y * (2pi * 2^-32) + pi * 2^-32      (FMAs on the GPU)
        s = sqrtf(-2 logf(u));  normals (sin(v) s, cos(v) s), then the same with (z, w).
 4. Grid-stride layout: at iteration `it` thread t writes its 4 normals to elements
        it*4T + t + ii*T,  ii = 0..3  (those < N).
    Afterwards the generator's offset grows by ((N-1) // (4T) + 1) * 4.
    So for N <= 256 * num_sms * (max_threads_per_sm // 256) (about 221k on an A100) the layout does
    not depend on the GPU; above that it depends on its SM count: pass your GPU's numbers
    (torch.cuda.get_device_properties(0).multi_processor_count / .max_threads_per_multi_processor).

Exactness: the Philox stream, the layout and the offsets are exact. The GPU then uses its own
logf (<= 1 ulp) and the FAST __sincosf intrinsic (absolute error ~2^-21.4 on [-pi, pi]); here they
are glibc's float32 logf/sinf/cosf. Expect most values to differ from a GPU's in the last bit or
two: absolute differences up to ~1e-6, a relative error ||cpu - gpu|| / ||gpu|| around 1e-7. For
bit-identical CUDA noise, run curand itself (curand_init + curand_normal4 with the same seed,
subsequence and offset) on the GPU. Only float32 output is provided (half precision on CUDA is
this float32 value rounded).
"""

import math

import numpy as np

from npdiff.intrinsics import fma32, sqrt32
from npdiff.jit import PARALLEL, SERIAL, njit, prange
from npdiff.rng.validate import (
    UINT64_MOD,
    check_dtype,
    check_int,
    check_seed,
    check_shape,
)

DEFAULT_SEED = 67280421310721  # c10::detail::default_rng_seed_val, as for the CPU generator
BLOCK_SIZE = 256  # threads per block in torch's distribution kernels
NORMALS_PER_CALL = 4  # curand_normal4

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
MASK32 = 0xFFFFFFFF

TWO_POW_M32 = np.float32(2.0**-32)  # CURAND_2POW32_INV
TWO_POW_M33 = np.float32(2.0**-33)  # CURAND_2POW32_INV / 2
TWO_PI_TWO_POW_M32 = np.float32(2.0**-32) * np.float32(6.2831855)  # CURAND_2POW32_INV_2PI (float product)
PI_TWO_POW_M32 = TWO_PI_TWO_POW_M32 / np.float32(2.0)
MINUS_TWO_F32 = np.float32(-2.0)
ZERO_F32 = np.float32(0.0)
ONE_F32 = np.float32(1.0)


@njit(**SERIAL)
def philox4x32(c0, c1, c2, c3, k0, k1, rounds):
    """The Philox4x32 block function: counter (c0..c3) and key (k0, k1) -> 4 words (uint64 holding
    32-bit values)."""
    mask = np.uint64(MASK32)
    c0, c1, c2, c3 = np.uint64(c0), np.uint64(c1), np.uint64(c2), np.uint64(c3)
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for r in range(rounds):
        if r > 0:  # bump the key between rounds
            k0 = (k0 + np.uint64(PHILOX_W0)) & mask
            k1 = (k1 + np.uint64(PHILOX_W1)) & mask
        product0 = np.uint64(PHILOX_M0) * c0
        product1 = np.uint64(PHILOX_M1) * c2
        hi0, lo0 = product0 >> np.uint64(32), product0 & mask
        hi1, lo1 = product1 >> np.uint64(32), product1 & mask
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32_block(counter, key, rounds=10):
    """Python entry point: counter (4 ints), key (2 ints) -> tuple of 4 ints (Random123's KATs)."""
    words = philox4x32(*[np.uint64(c) for c in counter], *[np.uint64(k) for k in key], rounds)
    return tuple(int(w) for w in words)


@njit(**SERIAL)
def _box_muller_pair(x, y):
    """curand's _curand_box_muller on two words -> (sin(v) * s, cos(v) * s), float32."""
    u = fma32(np.float32(x), TWO_POW_M32, TWO_POW_M33)  # in (0, 1]
    v = fma32(np.float32(y), TWO_PI_TWO_POW_M32, PI_TWO_POW_M32)  # in (0, 2pi)
    s = sqrt32(MINUS_TWO_F32 * math.log(u))  # logf
    # torch's transform: rand * std + mean with std = 1, mean = +0 (turns -0.0 into +0.0)
    return fma32(math.sin(v) * s, ONE_F32, ZERO_F32), fma32(math.cos(v) * s, ONE_F32, ZERO_F32)


@njit(**SERIAL)
def _thread_normals(out, t, threads, calls, first_call, k0, k1):
    """What CUDA thread t of `threads` writes: at grid-stride iteration `it` one curand_normal4
    (Philox counter first_call + it in words c0/c1, t in c2) to out[it*4T + t + ii*T], ii = 0..3."""
    n = out.shape[0]
    stride = NORMALS_PER_CALL * threads
    for it in range(calls):
        counter = np.uint64(first_call + it)
        x, y, z, w = philox4x32(counter & np.uint64(MASK32), counter >> np.uint64(32),
                                np.uint64(t), np.uint64(0), k0, k1, 10)
        n0, n1 = _box_muller_pair(x, y)
        n2, n3 = _box_muller_pair(z, w)
        base = it * stride + t
        if base < n:
            out[base] = n0
        if base + threads < n:
            out[base + threads] = n1
        if base + 2 * threads < n:
            out[base + 2 * threads] = n2
        if base + 3 * threads < n:
            out[base + 3 * threads] = n3


@njit(**PARALLEL)
def _randn_parallel(out, threads, calls, first_call, k0, k1):
    """One prange over the emulated CUDA threads (independent streams); thread t writes elements
    t + ii*T + it*4T, so neighbouring t write neighbouring elements."""
    for t in prange(threads):
        _thread_normals(out, t, threads, calls, first_call, k0, k1)


@njit(**SERIAL)
def _randn_serial(out, threads, calls, first_call, k0, k1):
    for t in range(threads):
        _thread_normals(out, t, threads, calls, first_call, k0, k1)


PARALLEL_MIN_ELEMENTS = 65536  # below this one CPU thread beats waking the pool


class PhiloxGenerator:
    """torch's CUDA generator (Philox4x32-10, curand_normal4 layout), float32 normals on the CPU.

    seed: int in [-2**63, 2**64 - 1] (negatives wrap), None for torch's default seed.
    num_sms, max_threads_per_sm: the GPU whose layout to reproduce (default: A100, 108 and 2048).
    """

    def __init__(self, seed=None, num_sms=108, max_threads_per_sm=2048):
        self.num_sms = check_int("PhiloxGenerator", "num_sms", num_sms, 1, 2**20)
        self.max_threads_per_sm = check_int("PhiloxGenerator", "max_threads_per_sm", max_threads_per_sm,
                                            BLOCK_SIZE, 2**20)
        self.manual_seed(DEFAULT_SEED if seed is None else seed)

    def __repr__(self):
        return (f"PhiloxGenerator(seed={self._seed}, num_sms={self.num_sms}, "
                f"max_threads_per_sm={self.max_threads_per_sm}) at offset {self.offset}")

    def manual_seed(self, seed):
        """Reseed (offset back to 0); returns self."""
        seed = check_seed("PhiloxGenerator.manual_seed", seed, -(2**63), UINT64_MOD - 1)
        self._seed = seed % UINT64_MOD
        self.offset = 0  # torch's philox_offset_per_thread: always a multiple of 4
        return self

    def initial_seed(self):
        return self._seed

    def launch_threads(self, n):
        """T, the number of threads torch launches for n elements on this GPU."""
        blocks = -(-n // BLOCK_SIZE)
        max_blocks = self.num_sms * (self.max_threads_per_sm // BLOCK_SIZE)
        return BLOCK_SIZE * min(blocks, max_blocks)

    def randn(self, shape, dtype=np.float32):
        """float32 standard normals of `shape`, laid out as torch.randn on a CUDA device."""
        shape = check_shape("PhiloxGenerator.randn", shape)
        check_dtype("PhiloxGenerator.randn", dtype, ("float32",))
        n = math.prod(shape)
        out = np.empty(n, dtype=np.float32)  # [N]
        if n == 0:
            return out.reshape(shape)
        threads = self.launch_threads(n)
        calls = (n - 1) // (NORMALS_PER_CALL * threads) + 1  # curand_normal4 calls per thread
        key_low, key_high = np.uint64(self._seed & MASK32), np.uint64(self._seed >> 32)
        kernel = _randn_parallel if n >= PARALLEL_MIN_ELEMENTS else _randn_serial
        kernel(out, threads, calls, self.offset // 4, key_low, key_high)
        self.offset += calls * NORMALS_PER_CALL
        return out.reshape(shape)
