"""MT19937 (the Mersenne Twister) as PyTorch's CPU generator runs it, and its uniform floats.

State, exactly torch's `mt19937_data_pod`: 624 uint32 words `mt`, and `counters` = int64 [2] holding
torch's `left` and `next`. A draw does `left -= 1; if left == 0: twist (left = 624, next = 0)`, then
returns tempered mt[next] and `next += 1`. Seeding sets left = 1, next = 0, so the first draw
twists. Keeping torch's two counters (rather than one index) makes get_state()/set_state() a plain
copy of torch's byte layout. Both arrays are owned by the generator; the kernels update them in place.

  seed_mt(seed64, mt, counters)  Knuth's initialisation from the low 32 bits of the seed
                                 (torch keeps the full 64-bit value only to report initial_seed()).
  twist(mt)                      regenerate all 624 words (torch's "next_state").
  fill_uint32(mt, counters, out) out[i] = tempered next word, i = 0..n-1.
  fill_uniform_f32(...)          out[i] = (word & 0xFFFFFF) * 2^-24      (torch's float uniform)
  fill_uniform_f64(...)          out[i] = ((a << 32 | b) & (2^53-1)) * 2^-53, two words a, b per value.

Speed: the draws are inherently serial, so these kernels are SERIAL; they work 624 words at a time
(the twist, then one tempering loop over the fresh words) so that both loops are straight-line
and LLVM vectorises them. Contiguous axis: the 624 state words, read in order.

Integer arithmetic is done in uint64 (Numba widens uint32 operands anyway) and masked to 32 bits.
"""

import numpy as np

from npdiff.jit import SERIAL, njit

N = 624
M = 397
MATRIX_A = 0x9908B0DF
UPPER_MASK = 0x80000000
LOWER_MASK = 0x7FFFFFFF
MASK32 = 0xFFFFFFFF

FLOAT_MASK = 0xFFFFFF  # 24 bits: float32 mantissa + 1
FLOAT_SCALE = np.float32(2.0**-24)
DOUBLE_HIGH_MASK = 0x1FFFFF  # 21 high bits + 32 low bits = 53 bits: float64 mantissa + 1
DOUBLE_SCALE = 2.0**-53


LEFT = 0  # counters[LEFT]: torch's `left`  (draws until the next twist, plus one)
NEXT = 1  # counters[NEXT]: torch's `next`  (index of the next word to temper)


@njit(**SERIAL)
def seed_mt(seed64, mt, counters):
    """mt[0] = low 32 bits of the seed, mt[j] = 1812433253 * (mt[j-1] ^ (mt[j-1] >> 30)) + j."""
    previous = np.uint64(seed64) & np.uint64(MASK32)
    mt[0] = np.uint32(previous)
    for j in range(1, N):
        previous = (np.uint64(1812433253) * (previous ^ (previous >> np.uint64(30))) + np.uint64(j))
        previous = previous & np.uint64(MASK32)
        mt[j] = np.uint32(previous)
    counters[LEFT] = 1
    counters[NEXT] = 0


@njit(**SERIAL)
def _twist_word(upper_word, lower_word, far_word):
    """One MT19937 step: far ^ ((upper's top bit | lower's low 31 bits) >> 1) ^ (odd ? A : 0)."""
    y = (np.uint64(upper_word) & np.uint64(UPPER_MASK)) | (np.uint64(lower_word) & np.uint64(LOWER_MASK))
    mag = np.uint64(MATRIX_A) if (y & np.uint64(1)) else np.uint64(0)
    return np.uint32(np.uint64(far_word) ^ (y >> np.uint64(1)) ^ mag)


@njit(**SERIAL)
def twist(mt):
    """Regenerate the 624 words in place. Word k reads words k, k+1 (old) and k+397 (mod 624):
    old for k < 227, already regenerated for k >= 227, exactly as the in-place C loops do."""
    for k in range(N - M):
        mt[k] = _twist_word(mt[k], mt[k + 1], mt[k + M])
    for k in range(N - M, N - 1):
        mt[k] = _twist_word(mt[k], mt[k + 1], mt[k + M - N])
    mt[N - 1] = _twist_word(mt[N - 1], mt[0], mt[M - 1])


@njit(**SERIAL)
def _temper(word):
    y = np.uint64(word)
    y = y ^ (y >> np.uint64(11))
    y = y ^ ((y << np.uint64(7)) & np.uint64(0x9D2C5680))
    y = y ^ ((y << np.uint64(15)) & np.uint64(0xEFC60000))
    y = y ^ (y >> np.uint64(18))
    return y & np.uint64(MASK32)


@njit(**SERIAL)
def _words_ready(mt, counters):
    """Twist if the next draw needs it; return how many words can be drawn before the next twist.
    (torch twists when `--left == 0`; we twist one step early and set left to 625 so that, after
    the decrement that follows, the counters are exactly torch's.)"""
    if counters[LEFT] == 1:
        twist(mt)
        counters[LEFT] = N + 1
        counters[NEXT] = 0
    return counters[LEFT] - 1


@njit(**SERIAL)
def fill_uint32(mt, counters, out):
    """out[i] = the next tempered 32-bit draws (out: uint32 [n])."""
    n = out.shape[0]
    i = 0
    while i < n:
        count = min(_words_ready(mt, counters), n - i)
        words = mt[counters[NEXT]:counters[NEXT] + count]  # views: the loop index k is >= 0,
        dest = out[i:i + count]                            # which lets LLVM vectorise it
        for k in range(count):
            dest[k] = np.uint32(_temper(words[k]))
        counters[LEFT] -= count
        counters[NEXT] += count
        i += count


@njit(**SERIAL)
def fill_uniform_f32(mt, counters, out):
    """out[i] = (draw & 0xFFFFFF) * 2^-24 in [0, 1) (out: float32 [n])."""
    n = out.shape[0]
    i = 0
    while i < n:
        count = min(_words_ready(mt, counters), n - i)
        words = mt[counters[NEXT]:counters[NEXT] + count]
        dest = out[i:i + count]
        for k in range(count):
            mantissa = _temper(words[k]) & np.uint64(FLOAT_MASK)
            dest[k] = np.float32(mantissa) * FLOAT_SCALE
        counters[LEFT] -= count
        counters[NEXT] += count
        i += count


@njit(**SERIAL)
def next_uint32(mt, counters):
    """One draw (for the serial paths)."""
    _words_ready(mt, counters)
    word = mt[counters[NEXT]]
    counters[LEFT] -= 1
    counters[NEXT] += 1
    return _temper(word)


@njit(**SERIAL)
def next_uniform_f64(mt, counters):
    """One 53-bit uniform in [0, 1) from two draws: the first gives the high bits."""
    high = next_uint32(mt, counters)
    low = next_uint32(mt, counters)
    bits53 = ((high & np.uint64(DOUBLE_HIGH_MASK)) << np.uint64(32)) | low
    return np.float64(bits53) * DOUBLE_SCALE


@njit(**SERIAL)
def fill_uniform_f64(mt, counters, out):
    """out[i] = next 53-bit uniform (out: float64 [n]); 2 draws per value."""
    for i in range(out.shape[0]):
        out[i] = next_uniform_f64(mt, counters)
