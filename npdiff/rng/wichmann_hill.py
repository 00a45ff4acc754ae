"""WichmannHill: the 1982 generator (Applied Statistics algorithm AS 183), as the fast.ai lesson
builds it from scratch, plus a vectorised version that returns the same sequence.

Three small linear congruential generators run side by side; their scaled sum, mod 1, is the output:

    s1 = 171 * s1 mod 30269,   s2 = 172 * s2 mod 30307,   s3 = 170 * s3 mod 30323
    u  = (s1/30269 + s2/30307 + s3/30323) mod 1

Seeding (the lesson's): seed, s1 = divmod(seed, 30268); seed, s2 = divmod(seed, 30306);
seed, s3 = divmod(seed, 30322); each state word plus 1 (so none is 0, a fixed point of an LCG).

    g = WichmannHill(42)
    g.random()          one float, pure Python: the lesson's code
    g.random(n)         n floats at once, the SAME numbers n calls of g.random() would give
    g.randn(shape)      normals by Box-Muller from g.random(2 * ceil(n/2))
    g.seed(s)           reseed

Vectorising a sequential recurrence: after k steps s = a^k * s0 mod m, so the whole sequence is
s0 * (a^1, a^2, ..., a^n) mod m. The powers are built by doubling: knowing a^1..a^L, the next L are
a^(L+j) = a^j * a^L mod m, so log2(n) array operations give all n powers. Every intermediate is
below 30323^2 < 2^30: exact in int32 (half the memory of int64 and a faster `%`). The float
arithmetic is the scalar version's, elementwise, so the outputs are bit-identical.

The fork pitfall (shown in tests/rng/test_wichmann_hill.py): a process forked after seeding
inherits the generator's state, so parent and child draw the same "random" numbers unless the
child reseeds; torch's global generator behaves the same way.
"""

import math
import numbers

import numpy as np

from npdiff.errors import NpdiffError
from npdiff.rng.validate import check_shape

MULTIPLIERS = (171, 172, 170)
MODULI = (30269, 30307, 30323)
SEED_DIVISORS = (30268, 30306, 30322)


def lcg_sequence(multiplier, modulus, state, n):
    """(state * multiplier^k mod modulus for k = 1..n) as int32 [n]: n steps of an LCG at once.
    multiplier, modulus, state < 2^15, so every product is < 2^30 and fits int32."""
    powers = np.empty(n, dtype=np.int32)  # [n]: powers[i] = multiplier^(i+1) mod modulus
    if n == 0:
        return powers
    powers[0] = multiplier % modulus
    filled = 1
    while filled < n:
        take = min(filled, n - filled)
        # multiplier^(filled+j+1) = multiplier^(j+1) * multiplier^filled
        powers[filled:filled + take] = powers[:take] * powers[filled - 1] % np.int32(modulus)
        filled += take
    return powers * np.int32(state) % np.int32(modulus)


class WichmannHill:
    """The Wichmann-Hill (1982) generator with the fast.ai lesson's seeding."""

    def __init__(self, seed):
        self.seed(seed)

    def __repr__(self):
        return f"WichmannHill(state={self.state})"

    def seed(self, seed):
        """Set the state from an int: successive divmods by 30268, 30306, 30322, each plus 1."""
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
            raise NpdiffError(f"WichmannHill.seed: seed must be an int, got {type(seed).__name__} {seed!r}")
        rest = int(seed)
        words = []
        for divisor in SEED_DIVISORS:
            rest, word = divmod(rest, divisor)
            words.append(word + 1)
        self.state = tuple(words)
        return self

    def random(self, n=None):
        """One uniform in [0, 1) (pure Python) if n is None, else a float64 array of the next n."""
        if n is None:
            return self._random_scalar()
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or n < 0:
            raise NpdiffError(f"WichmannHill.random: n must be an int >= 0 or None, got {n!r}")
        return self._random_vector(int(n))

    def _random_scalar(self):
        x, y, z = self.state
        x = (171 * x) % 30269
        y = (172 * y) % 30307
        z = (170 * z) % 30323
        self.state = (x, y, z)
        return (x / 30269 + y / 30307 + z / 30323) % 1.0

    def _random_vector(self, n):
        x, y, z = (lcg_sequence(a, m, s, n) for a, m, s in zip(MULTIPLIERS, MODULI, self.state))  # [n] each
        if n:
            self.state = (int(x[-1]), int(y[-1]), int(z[-1]))
        # Same float operations as the scalar version, in the same order: (x/m1 + y/m2) + z/m3, mod 1.
        total = x / MODULI[0] + y / MODULI[1] + z / MODULI[2]  # [n] float64
        return np.fmod(total, 1.0)  # exact; equals Python's % for positive numbers

    def randn(self, shape):
        """Standard normals (float64) of `shape` by Box-Muller on consecutive pairs of uniforms
        (u1, u2): sqrt(-2 log(1 - u1)) * (cos 2pi u2, sin 2pi u2). An odd count drops the last sine."""
        shape = check_shape("WichmannHill.randn", shape)
        n = math.prod(shape)
        pairs = -(-n // 2)
        uniforms = self._random_vector(2 * pairs).reshape(pairs, 2)  # [pairs, 2]
        radius = np.sqrt(-2.0 * np.log(1.0 - uniforms[:, 0]))  # [pairs]; 1 - u in (0, 1]
        theta = 2.0 * np.pi * uniforms[:, 1]  # [pairs]
        normals = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)  # [pairs, 2]
        return normals.reshape(-1)[:n].reshape(shape)
