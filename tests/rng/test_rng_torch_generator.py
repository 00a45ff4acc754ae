"""TorchGenerator against torch's CPU generator: identical bits on fresh random seeds, shapes, dtypes
and call sequences.

Every comparison is np.array_equal on raw bits (uint views), never a tolerance. Seeds and shapes are
drawn per run from the `rng`/`seed` fixtures (re-run a failure with NPDIFF_TEST_SEED=<seed>).
"""

import math

import numpy as np
import pytest
import torch
from rng_testing import TORCH_DTYPES, assert_same_bits, torch_math_path, torch_state_drawing

from npdiff.errors import NpdiffError
from npdiff.rng import TorchGenerator
from npdiff.rng import torch_normal

MATH = torch_math_path()  # "avx2" on x86 with AVX2/AVX-512, else "default"


def random_shape(rng, numel):
    """A shape of 1 to 4 axes whose sizes multiply to numel (numel >= 1)."""
    dims = []
    rest = numel
    for _ in range(int(rng.integers(0, 3))):
        divisors = [d for d in range(1, min(rest, 64) + 1) if rest % d == 0]
        d = int(rng.choice(divisors))
        dims.append(d)
        rest //= d
    dims.append(rest)
    rng.shuffle(dims)
    return tuple(dims)


def numel_of_kind(rng, kind):
    if kind == "fewer_than_16":
        return int(rng.integers(1, 16))
    if kind == "exactly_16":
        return 16
    if kind == "multiple_of_16":
        return 16 * int(rng.integers(2, 200))
    if kind == "ragged":  # >= 16 and n % 16 != 0: the fresh tail block
        return 16 * int(rng.integers(1, 200)) + int(rng.integers(1, 16))
    if kind == "big":  # ~1e5, crosses the parallel threshold
        return int(rng.integers(90_000, 160_000))
    raise AssertionError(kind)


def random_seed(rng):
    return int(rng.integers(0, 2**63)) * int(rng.choice([1, 2])) + int(rng.integers(0, 2))


def draw_both(generator, torch_generator, op, shape, dtype_name):
    ours = getattr(generator, op)(shape, dtype=dtype_name)
    theirs = getattr(torch, op)(shape, dtype=TORCH_DTYPES[dtype_name], generator=torch_generator)
    return ours, theirs


# ---------------------------------------------------------------------------------------------
# randn, one call, every size class and dtype
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fewer_than_16", "exactly_16", "multiple_of_16", "ragged", "big"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64", "float16", "bfloat16"])
def test_randn_matches_torch(rng, kind, dtype_name):
    seed = random_seed(rng)
    shape = random_shape(rng, numel_of_kind(rng, kind))
    ours = TorchGenerator(seed, math=MATH).randn(shape, dtype=dtype_name)
    theirs = torch.randn(shape, dtype=TORCH_DTYPES[dtype_name], generator=torch.Generator().manual_seed(seed))
    assert_same_bits(ours, theirs, dtype_name, f"randn{shape} {dtype_name} seed={seed}")
    assert ours.flags.c_contiguous


def test_randn_matches_global_manual_seed(rng):
    """The pipeline's call: TorchGenerator(s).randn((B,4,H/8,W/8)) == torch.manual_seed(s); torch.randn."""
    seed = random_seed(rng)
    shape = (int(rng.integers(1, 3)), 4, 8 * int(rng.integers(1, 9)), 8 * int(rng.integers(1, 9)))
    torch.manual_seed(seed)
    theirs = torch.randn(shape)
    assert_same_bits(TorchGenerator(seed).randn(shape), theirs, "float32", f"latents {shape} seed={seed}")


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 5), (1,), 7, (16,), [2, 8]])
def test_randn_special_shapes(rng, shape):
    seed = random_seed(rng)
    g, tg = TorchGenerator(seed, math=MATH), torch.Generator().manual_seed(seed)
    for dtype_name in ("float32", "float64"):
        ours, theirs = draw_both(g, tg, "randn", shape, dtype_name)
        assert_same_bits(ours, theirs, dtype_name, f"randn({shape!r}) {dtype_name}")
    # a 0-size draw must not consume anything: the next draws still agree
    ours, theirs = draw_both(g, tg, "randn", (5,), "float32")
    assert_same_bits(ours, theirs, "float32", f"draw after randn({shape!r})")


# ---------------------------------------------------------------------------------------------
# sequences: the serial path's cached normal, and the stream position across paths
# ---------------------------------------------------------------------------------------------
def test_random_call_sequence_matches_torch(rng):
    seed = random_seed(rng)
    g, tg = TorchGenerator(seed, math=MATH), torch.Generator().manual_seed(seed)
    kinds = ["fewer_than_16", "fewer_than_16", "exactly_16", "multiple_of_16", "ragged"]
    for call in range(60):
        op = "randn" if rng.random() < 0.75 else "rand"
        dtype_name = str(rng.choice(list(TORCH_DTYPES)))
        shape = random_shape(rng, numel_of_kind(rng, str(rng.choice(kinds))))
        ours, theirs = draw_both(g, tg, op, shape, dtype_name)
        assert_same_bits(ours, theirs, dtype_name, f"call {call}: {op}{shape} {dtype_name} (seed={seed})")
    assert np.array_equal(g.get_state(), tg.get_state().numpy()), "state after the sequence differs"


def test_cached_normal_survives_other_draws_and_dies_on_reseed(rng):
    seed = random_seed(rng)
    g, tg = TorchGenerator(seed, math=MATH), torch.Generator().manual_seed(seed)
    steps = [("randn", (3,), "float32"),  # leaves a cached sine
             ("randn", (40,), "float32"),  # block path: does not use the cache
             ("rand", (5,), "float64"),
             ("randn", (1,), "float64")]  # returns the cached value
    for op, shape, dtype_name in steps:
        ours, theirs = draw_both(g, tg, op, shape, dtype_name)
        assert_same_bits(ours, theirs, dtype_name, f"{op}{shape} {dtype_name}")
    ours, theirs = draw_both(g, tg, "randn", (1,), "float32")  # both now hold a cached normal
    assert_same_bits(ours, theirs, "float32", "randn(1) leaving a cached normal")
    g.manual_seed(seed)
    tg.manual_seed(seed)
    assert_same_bits(g.randn((1,)), torch.randn((1,), generator=tg), "float32", "after reseed")


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------
def special_seeds(rng):
    k = int(rng.integers(0, 2**31))
    return [0, 1, k, 2**32 + k, 2**32 - 1, 2**63 - 1, 2**63 + k, 2**64 - 1,
            -1, -k - 1, -(2**63), -int(rng.integers(1, 2**63))]


def test_special_seeds_match_torch(rng):
    for seed in special_seeds(rng):
        g = TorchGenerator(seed, math=MATH)
        tg = torch.Generator().manual_seed(seed)
        assert g.initial_seed() == tg.initial_seed(), f"initial_seed for {seed}"
        for shape in [(7,), (37,)]:
            ours, theirs = draw_both(g, tg, "randn", shape, "float32")
            assert_same_bits(ours, theirs, "float32", f"seed {seed} randn{shape}")


def test_seed_uses_low_32_bits_only(rng):
    low = int(rng.integers(0, 2**32))
    high = int(rng.integers(1, 2**32))
    a = TorchGenerator(low).randn(100)
    b = TorchGenerator(low + (high << 32)).randn(100)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert_same_bits(b, torch.randn(100, generator=torch.Generator().manual_seed(low + (high << 32))),
                     "float32", "high seed bits")


def test_default_seed_and_manual_seed_return_self(rng):
    g = TorchGenerator()
    assert g.initial_seed() == torch.Generator().initial_seed()
    assert_same_bits(g.randn(20), torch.randn(20, generator=torch.Generator()), "float32", "default seed")
    assert g.manual_seed(5) is g
    new_seed = g.seed()
    assert g.initial_seed() == new_seed and 0 <= new_seed < 2**64


# ---------------------------------------------------------------------------------------------
# rand
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", ["float32", "float64", "float16", "bfloat16"])
def test_rand_matches_torch(rng, dtype_name):
    seed = random_seed(rng)
    g, tg = TorchGenerator(seed), torch.Generator().manual_seed(seed)
    for kind in ["fewer_than_16", "ragged", "big"]:
        shape = random_shape(rng, numel_of_kind(rng, kind))
        ours, theirs = draw_both(g, tg, "rand", shape, dtype_name)
        assert_same_bits(ours, theirs, dtype_name, f"rand{shape} {dtype_name} seed={seed}")


def test_rand_half_precision_never_returns_one():
    """Uniforms within half an fp16 ulp of 1 round up to 1.0; torch replaces those with 0.0."""
    words = np.arange(2**24 - 600, 2**24, dtype=np.uint32)  # the largest float32 uniforms
    torch.set_rng_state(torch_state_drawing(words))
    theirs = torch.rand(len(words), dtype=torch.float16)
    g = TorchGenerator().set_state(torch_state_drawing(words).numpy())
    ours = g.rand(len(words), dtype=np.float16)
    assert_same_bits(ours, theirs, "float16", "rand fp16 near 1")
    assert (ours < 1).all() and (ours == 0).any()


# ---------------------------------------------------------------------------------------------
# chosen uniforms: boundaries of the Cephes code and zeros, fed to torch through its state
# ---------------------------------------------------------------------------------------------
def chosen_words(rng):
    """24-bit uniforms d (as draws) at the edges: 0, 1 - 2^-24, log's sqrt(1/2) switch, theta at
    multiples of pi/4 (the octant switches of sincos), and random ones; 16*k of them."""
    edges = [0, 1, 2**24 - 1, 2**24 - 2, 2**23, 2**23 - 1, 2**23 + 1]
    sqrt_half = int((1 - math.sqrt(0.5)) * 2**24)  # u1 = 1 - d near sqrt(1/2)
    edges += [sqrt_half + k for k in range(-3, 4)]
    for octant in range(1, 8):  # theta = 2 pi d near octant * pi/4  <=>  d near octant/8
        edges += [octant * 2**21 + k for k in (-2, -1, 0, 1, 2)]
    edges += [int(w) for w in rng.integers(0, 2**24, 16 * 12)]
    words = np.array(edges[: 16 * (len(edges) // 16)], dtype=np.uint32)
    high_bits = rng.integers(0, 256, len(words)).astype(np.uint32) << 24  # ignored by the conversion
    words = words | high_bits
    rng.shuffle(words)
    return words


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_edge_uniforms_match_torch(rng, dtype_name):
    words = chosen_words(rng)
    torch.set_rng_state(torch_state_drawing(words))
    theirs = torch.randn(len(words), dtype=TORCH_DTYPES[dtype_name])
    g = TorchGenerator(math=MATH).set_state(torch_state_drawing(words).numpy())
    ours = g.randn(len(words), dtype=dtype_name)
    assert_same_bits(ours, theirs, dtype_name, "randn on chosen uniforms")
    if dtype_name == "float32":  # d = 0 gives radius -0.0; torch's `* std + mean` makes it +0.0
        assert (ours == 0).any() and not np.signbit(ours[ours == 0]).any(), "zeros must be +0.0"


@pytest.mark.parametrize("cephes", [True, False])
def test_fast_kernel_equals_reference(rng, cephes):
    n_blocks = int(rng.integers(8192, 9000))  # crosses the parallel threshold
    uniforms = (rng.integers(0, 2**24, 16 * n_blocks) * 2.0**-24).astype(np.float32)
    uniforms[:16] = np.array([0, 2**-24, 1 - 2**-24, 0.5, 0.125, 0.25, 0.375, 0.625,
                              0.75, 0.875, 0.29289323, 1e-7, 0.9999999, 0.3, 0.7, 0.1], np.float32)
    fast, reference = uniforms.copy(), uniforms.copy()
    torch_normal.transform_blocks_f32(fast, n_blocks, cephes)
    torch_normal.transform_blocks_reference(reference, n_blocks, cephes)
    assert np.array_equal(fast.view(np.uint32), reference.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------------
def test_state_round_trips_with_torch(rng):
    seed = random_seed(rng)
    g, tg = TorchGenerator(seed, math=MATH), torch.Generator().manual_seed(seed)
    assert np.array_equal(g.get_state(), tg.get_state().numpy()), "fresh state bytes"
    n = int(rng.integers(1, 16))  # leaves a cached normal when n is odd
    g.randn(n), torch.randn(n, generator=tg)
    g.randn(624 - 2 * n)
    torch.randn(624 - 2 * n, generator=tg)
    assert np.array_equal(g.get_state(), tg.get_state().numpy()), "state bytes after draws"
    # torch -> ours
    other = TorchGenerator(math=MATH).set_state(tg.get_state().numpy())
    assert_same_bits(other.randn(33), torch.randn(33, generator=tg), "float32", "after set_state(torch's)")
    # ours -> torch
    tg.set_state(torch.from_numpy(g.get_state()))
    assert_same_bits(g.randn(5, dtype=np.float64), torch.randn(5, dtype=torch.float64, generator=tg),
                     "float64", "torch after set_state(ours)")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1.5, "3", None, True, 2**64, -(2**63) - 1, np.float32(2)])
def test_bad_seed_raises(seed):
    with pytest.raises(NpdiffError, match="seed"):
        TorchGenerator(0).manual_seed(seed)


@pytest.mark.parametrize("shape", [(-1,), (2, -3), (2.0, 3), "16", None, (True, 2)])
def test_bad_shape_raises(shape):
    with pytest.raises(NpdiffError, match="shape"):
        TorchGenerator(0).randn(shape)
    with pytest.raises(NpdiffError, match="shape"):
        TorchGenerator(0).rand(shape)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, None, "float8", object])
def test_bad_dtype_raises(dtype):
    with pytest.raises(NpdiffError, match="dtype"):
        TorchGenerator(0).randn((4,), dtype=dtype)


def test_bad_math_and_state_raise():
    with pytest.raises(NpdiffError, match="math"):
        TorchGenerator(0, math="sse")
    with pytest.raises(NpdiffError, match="5056"):
        TorchGenerator(0).set_state(np.zeros(100, np.uint8))
    state = TorchGenerator(0).get_state()
    state[8:12] = 0  # left = 0 is not a state torch can be in
    with pytest.raises(NpdiffError, match="left"):
        TorchGenerator(0).set_state(state)
