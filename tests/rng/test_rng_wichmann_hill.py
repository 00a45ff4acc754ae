"""WichmannHill: the vectorised sequence is the scalar one, bit for bit; the lesson's code agrees;
and the fork pitfall, demonstrated for WichmannHill, torch's global generator and TorchGenerator.
"""

import math
import os

import numpy as np
import pytest
import torch

from npdiff.errors import NpdiffError
from npdiff.rng import TorchGenerator, WichmannHill

# ---------------------------------------------------------------------------------------------
# The fast.ai lesson's version, verbatim in spirit: module-level state, seed() and rand().
# ---------------------------------------------------------------------------------------------
lesson_state = None


def lesson_seed(a):
    global lesson_state
    a, x = divmod(a, 30268)
    a, y = divmod(a, 30306)
    a, z = divmod(a, 30322)
    lesson_state = int(x) + 1, int(y) + 1, int(z) + 1


def lesson_rand():
    global lesson_state
    x, y, z = lesson_state
    x = (171 * x) % 30269
    y = (172 * y) % 30307
    z = (170 * z) % 30323
    lesson_state = x, y, z
    return (x / 30269 + y / 30307 + z / 30323) % 1.0


def test_scalar_matches_the_lesson(rng):
    seed = int(rng.integers(0, 2**62))
    lesson_seed(seed)
    g = WichmannHill(seed)
    assert g.state == lesson_state
    for _ in range(1000):
        assert g.random() == lesson_rand()


@pytest.mark.parametrize("n_kind", ["zero", "one", "small", "power_of_two", "big"])
def test_vectorised_equals_scalar(rng, n_kind):
    n = {"zero": 0, "one": 1, "small": int(rng.integers(2, 100)), "power_of_two": 2 ** int(rng.integers(5, 12)),
         "big": int(rng.integers(50_000, 120_000))}[n_kind]
    seed = int(rng.integers(0, 2**62))
    scalar = WichmannHill(seed)
    vector = WichmannHill(seed)
    expected = np.array([scalar.random() for _ in range(n)], dtype=np.float64)
    got = vector.random(n)
    assert got.dtype == np.float64 and got.shape == (n,)
    assert np.array_equal(got.view(np.uint64), expected.view(np.uint64))
    assert vector.state == scalar.state


def test_mixed_scalar_and_vector_calls_continue_one_stream(rng):
    seed = int(rng.integers(0, 2**62))
    reference = WichmannHill(seed)
    mixed = WichmannHill(seed)
    for _ in range(20):
        n = int(rng.integers(0, 300))
        if rng.random() < 0.5:
            got = mixed.random(n)
        else:
            got = np.array([mixed.random() for _ in range(n)])
        expected = np.array([reference.random() for _ in range(n)])
        assert np.array_equal(got, expected)


def test_randn_is_box_muller_of_consecutive_pairs(rng):
    seed = int(rng.integers(0, 2**62))
    shape = (int(rng.integers(1, 20)), int(rng.integers(1, 20)), 3)
    normals = WichmannHill(seed).randn(shape)
    g = WichmannHill(seed)
    expected = []
    while len(expected) < math.prod(shape):
        u1, u2 = g.random(), g.random()
        radius = math.sqrt(-2.0 * math.log(1.0 - u1))
        expected += [radius * math.cos(2.0 * math.pi * u2), radius * math.sin(2.0 * math.pi * u2)]
    expected = np.array(expected[: math.prod(shape)]).reshape(shape)
    assert normals.shape == shape
    assert np.abs(normals - expected).max() < 1e-12  # NumPy's vs libm's double sin/cos/log


def test_randn_statistics(rng):
    values = WichmannHill(int(rng.integers(0, 2**62))).randn(400_000)
    n = values.size
    assert abs(values.mean()) < 5 / math.sqrt(n)
    assert abs(values.var() - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize("bad", [1.5, "7", None, True])
def test_bad_seed_and_sizes_raise(bad):
    with pytest.raises(NpdiffError, match="seed"):
        WichmannHill(bad)
    with pytest.raises(NpdiffError, match="n must be"):
        WichmannHill(1).random(-1 if bad is None else bad)
    with pytest.raises(NpdiffError, match="shape"):
        WichmannHill(1).randn((2, -2))


# ---------------------------------------------------------------------------------------------
# The fork pitfall.
#
# os.fork copies the whole process, generator state included. A parent and a child that go on
# drawing from a generator seeded before the fork print the SAME "random" numbers, for
# Wichmann-Hill and for torch alike (DataLoader workers hit this with NumPy's global generator).
# The fix is to reseed in the child (torch reseeds its DataLoader workers for this reason).
# ---------------------------------------------------------------------------------------------
def draw_in_parent_and_child(draw, reseed_child=None):
    """Fork; both processes call draw(); the child sends its numbers through a pipe and leaves with
    os._exit (never returning into pytest). Returns (parent_numbers, child_numbers)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        status = 1
        try:
            os.close(read_end)
            if reseed_child is not None:
                reseed_child()
            numbers = np.asarray(draw(), dtype=np.float64)
            print("child: ", numbers)
            payload = numbers.tobytes()
            while payload:
                payload = payload[os.write(write_end, payload):]
            os.close(write_end)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    parent = np.asarray(draw(), dtype=np.float64)
    print("parent:", parent)
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child failed: status {status}"
    return parent, np.frombuffer(b"".join(chunks), dtype=np.float64)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork does not exist on this platform")
def test_fork_pitfall(rng):
    seed = int(rng.integers(0, 2**62))

    wh = WichmannHill(seed)
    parent, child = draw_in_parent_and_child(lambda: [wh.random() for _ in range(5)])
    assert np.array_equal(parent, child), "Wichmann-Hill: parent and child share the state"
    parent, child = draw_in_parent_and_child(lambda: [wh.random() for _ in range(5)],
                                             reseed_child=lambda: wh.seed(seed + 1))
    assert not np.array_equal(parent, child), "Wichmann-Hill: reseeding the child separates them"

    torch.manual_seed(seed)  # torch's global CPU generator
    parent, child = draw_in_parent_and_child(lambda: torch.rand(5, dtype=torch.float64).numpy())
    assert np.array_equal(parent, child), "torch: parent and child share the global generator"
    parent, child = draw_in_parent_and_child(lambda: torch.rand(5, dtype=torch.float64).numpy(),
                                             reseed_child=torch.seed)
    assert not np.array_equal(parent, child), "torch: torch.seed() in the child separates them"

    g = TorchGenerator(seed)
    parent, child = draw_in_parent_and_child(lambda: g.randn(5, dtype=np.float64))
    assert np.array_equal(parent, child), "TorchGenerator: parent and child share the state"
    parent, child = draw_in_parent_and_child(lambda: g.randn(5, dtype=np.float64), reseed_child=g.seed)
    assert not np.array_equal(parent, child), "TorchGenerator: reseeding the child separates them"
