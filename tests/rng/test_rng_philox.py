"""PhiloxGenerator: Random123's known-answer vectors, curand_normal4's layout and offsets, statistics.

No CUDA device is needed (or used): the Philox block function is checked against Random123's KATs
(kat_vectors: "philox4x32 R ctr[4] key[2] -> out[4]", public constants of the algorithm), and the
layout against an independent NumPy formulation written from the other direction (element ->
(thread, call, lane)), straight from torch's grid-stride loop.
"""

import math

import numpy as np
import pytest

from npdiff.errors import NpdiffError
from npdiff.rng import PhiloxGenerator
from npdiff.rng.philox import philox4x32_block

# Random123 kat_vectors, philox4x32 lines: rounds, counter, key, expected output.
KNOWN_ANSWERS = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("rounds,counter,key,expected", KNOWN_ANSWERS)
def test_random123_known_answers(rounds, counter, key, expected):
    assert philox4x32_block(counter, key, rounds) == expected


# ---------------------------------------------------------------------------------------------
# An independent NumPy formulation of torch.randn on CUDA, element by element.
# ---------------------------------------------------------------------------------------------
def philox_numpy(c0, c1, c2, c3, k0, k1, rounds=10):
    """Vectorised Philox4x32 over uint64 arrays holding 32-bit words (key bumped BEFORE rounds 2..R)."""
    mask = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return c


def fma_f32(a, b, c):
    """a*b + c for float32 arrays, computed in float64 and rounded to float32 (within an ulp of an
    exact fma: enough for the tolerance below)."""
    return (a.astype(np.float64) * np.float64(b) + np.float64(c)).astype(np.float32)


def torch_cuda_randn_reference(n, seed, offset, threads):
    """Element e of torch.randn(n) on CUDA: it = e // 4T, lane ii = (e % 4T) // T, thread t = e % T."""
    e = np.arange(n, dtype=np.int64)
    it, rest = np.divmod(e, 4 * threads)
    lane, thread = np.divmod(rest, threads)
    counter = np.uint64(offset // 4) + it.astype(np.uint64)
    words = philox_numpy(counter & np.uint64(0xFFFFFFFF), counter >> np.uint64(32), thread.astype(np.uint64),
                         np.zeros(n, np.uint64), seed & 0xFFFFFFFF, seed >> 32)
    pair = lane // 2  # lanes 0,1 from words (x, y); lanes 2,3 from (z, w)
    first = np.where(pair == 0, words[0], words[2]).astype(np.uint32)
    second = np.where(pair == 0, words[1], words[3]).astype(np.uint32)
    two_pi_inv = np.float32(2.0**-32) * np.float32(6.2831855)
    u = fma_f32(first.astype(np.float32), np.float32(2.0**-32), np.float32(2.0**-33))
    v = fma_f32(second.astype(np.float32), two_pi_inv, two_pi_inv / np.float32(2))
    s = np.sqrt(np.float32(-2) * np.log(u))  # float32 ufuncs: logf, sqrtf
    value = np.where(lane % 2 == 0, np.sin(v) * s, np.cos(v) * s)
    return value.astype(np.float32) + np.float32(0)


@pytest.mark.parametrize("n_kind", ["small", "one_wave", "many_waves"])
def test_layout_matches_grid_stride_formula(rng, n_kind):
    num_sms = int(rng.integers(2, 8))
    max_threads = 256 * int(rng.integers(1, 5))
    capacity = 256 * num_sms * (max_threads // 256)
    n = {"small": int(rng.integers(1, 3000)),
         "one_wave": int(rng.integers(capacity // 2, capacity)),
         "many_waves": int(rng.integers(4 * capacity + 1, 11 * capacity))}[n_kind]
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    g = PhiloxGenerator(seed, num_sms=num_sms, max_threads_per_sm=max_threads)
    first = g.randn(int(rng.integers(1, 5000)))  # move the offset first
    offset = g.offset
    ours = g.randn(n)
    threads = g.launch_threads(n)
    assert threads == 256 * min(-(-n // 256), num_sms * (max_threads // 256))
    reference = torch_cuda_randn_reference(n, seed, offset, threads)
    # NumPy's float32 log/sin/cos loops are SIMD code a few ulp away from glibc's logf/sinf/cosf,
    # so values agree to ~1e-6; an element from the wrong thread, call or lane would be off by O(1).
    assert np.abs(ours - reference).max() <= 4e-6
    assert g.offset == offset + ((n - 1) // (4 * threads) + 1) * 4
    assert first.dtype == np.float32


def test_offsets_and_reseeding(rng):
    seed = int(rng.integers(0, 2**63))
    g = PhiloxGenerator(seed)
    a = g.randn((1, 4, 64, 64))
    assert g.offset == 4  # 16384 elements: 16384 threads, one curand_normal4 call each
    b = g.randn((1, 4, 64, 64))
    assert not np.array_equal(a, b)
    g.manual_seed(seed)
    assert g.offset == 0 and np.array_equal(g.randn((1, 4, 64, 64)), a)


def test_all_64_seed_bits_matter(rng):
    low = int(rng.integers(0, 2**32))
    a = PhiloxGenerator(low).randn(64)
    b = PhiloxGenerator(low + 2**32).randn(64)
    assert not np.array_equal(a, b)
    assert np.array_equal(PhiloxGenerator(-1).randn(64), PhiloxGenerator(2**64 - 1).randn(64))


def test_layout_depends_on_sm_count_only_for_big_tensors(rng):
    seed = int(rng.integers(0, 2**63))
    small = int(rng.integers(1, 256 * 80 * 6))  # fits in one wave on both GPUs below
    assert np.array_equal(PhiloxGenerator(seed, num_sms=108).randn(small),
                          PhiloxGenerator(seed, num_sms=80, max_threads_per_sm=1536).randn(small))
    big = 10 * 256 * 108 * 8
    assert not np.array_equal(PhiloxGenerator(seed, num_sms=108).randn(big),
                              PhiloxGenerator(seed, num_sms=132).randn(big))


def test_statistics(rng):
    values = PhiloxGenerator(int(rng.integers(0, 2**63))).randn(1_000_000)
    n = values.size
    assert abs(values.mean()) < 5 / math.sqrt(n)
    assert abs(values.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(np.abs(values) < 1) - 0.6826894921) < 0.003
    assert np.isfinite(values).all()


def test_bad_input_raises():
    with pytest.raises(NpdiffError, match="seed"):
        PhiloxGenerator(1.0)
    with pytest.raises(NpdiffError, match="num_sms"):
        PhiloxGenerator(0, num_sms=0)
    with pytest.raises(NpdiffError, match="max_threads_per_sm"):
        PhiloxGenerator(0, max_threads_per_sm=100)
    with pytest.raises(NpdiffError, match="shape"):
        PhiloxGenerator(0).randn((4, -1))
    with pytest.raises(NpdiffError, match="dtype"):
        PhiloxGenerator(0).randn((4,), dtype=np.float64)
