"""The matmul progression (npdiff/kernels/matmul.py) against torch.mm and np.matmul.

Every version is compared with torch.mm and with NumPy's np.matmul on fresh random float32 inputs,
relative error <= KERNEL_TOL (1e-5). The pure-Python and NumPy-loop versions run on tiny shapes only;
the Numba versions also on odd sizes that are not multiples of their block sizes (MR = 6, NR = 64,
KC = 256, NC = 512, row blocks of <= 120), on strided views, and with 1 and 2 threads.
"""

import re

import numba
import numpy as np
import pytest
import torch

from helpers import KERNEL_TOL, assert_rel_close
from npdiff import NpdiffError
from npdiff.blas import cpu_has_avx512f
from npdiff.kernels import matmul
from npdiff.kernels.matmul_numba import KC, MR, NC, NR, ROW_BLOCK, micro_kernel_asm, row_block_size

SLOW = ["python", "row_dot", "broadcast", "einsum"]
FAST = ["numba_naive", "numba_blocked", "blas"]
ALL = SLOW + FAST

TINY_SHAPES = [(1, 1, 1), (1, 7, 1), (3, 1, 5), (7, 5, 3), (4, 9, 33), (13, 7, 1)]
# (M, K, N): edges of every block: rows not a multiple of MR / row blocks, K across one and two KC
# blocks, N across NR panels and past NC.
ODD_SHAPES = [(1, 33, 127), (7, 1, 7), (33, 127, 1), (127, 65, 33), (6, 256, 64), (130, 257, 70),
              (241, 513, 129), (2, 300, 600), (250, 40, 1100)]


def random_operands(rng, rows, depth, cols):
    a = rng.standard_normal((rows, depth), dtype=np.float32)  # [M,K]
    b = rng.standard_normal((depth, cols), dtype=np.float32)  # [K,N]
    return a, b


def check_against_torch_and_numpy(fn, a, b, what):
    """fn(a, b) vs torch.mm and np.matmul: float32, shape [M,N], relative error <= KERNEL_TOL."""
    c = fn(a, b)
    assert c.dtype == np.float32, f"{what}: dtype {c.dtype}"
    assert c.shape == (a.shape[0], b.shape[1]), f"{what}: shape {c.shape}"
    assert_rel_close(c, torch.mm(torch.from_numpy(a), torch.from_numpy(b)), KERNEL_TOL, f"{what} vs torch.mm")
    assert_rel_close(c, np.matmul(a, b), KERNEL_TOL, f"{what} vs np.matmul")


@pytest.mark.parametrize("shape", TINY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("version", ALL)
def test_every_version_on_tiny_shapes(rng, version, shape):
    a, b = random_operands(rng, *shape)
    check_against_torch_and_numpy(matmul.VERSIONS[version], a, b, version)


@pytest.mark.parametrize("version", ["row_dot", "broadcast", "einsum"])
def test_numpy_loop_versions_on_a_random_shape(rng, version):
    rows, depth, cols = (int(n) for n in rng.integers(1, 48, size=3))
    a, b = random_operands(rng, rows, depth, cols)
    check_against_torch_and_numpy(matmul.VERSIONS[version], a, b, f"{version} {rows}x{depth}x{cols}")


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("version", FAST)
def test_fast_versions_on_odd_shapes(rng, version, shape):
    a, b = random_operands(rng, *shape)
    check_against_torch_and_numpy(matmul.VERSIONS[version], a, b, version)


@pytest.mark.parametrize("case", range(4))
def test_numba_versions_on_random_shapes(rng, case):
    rows, cols = (int(n) for n in rng.integers(1, 400, size=2))
    depth = int(rng.integers(1, 700))
    a, b = random_operands(rng, rows, depth, cols)
    for version in ("numba_naive", "numba_blocked"):
        check_against_torch_and_numpy(matmul.VERSIONS[version], a, b, f"{version} {rows}x{depth}x{cols}")


@pytest.mark.parametrize("version", ["numba_naive", "numba_blocked"])
def test_numba_versions_on_strided_views(rng, version):
    a_t = rng.standard_normal((300, 71), dtype=np.float32)  # [K,M]: a is its transpose
    b_wide = rng.standard_normal((300, 2 * 90), dtype=np.float32)  # [K,2N]: b is every second column
    a, b = a_t.T, b_wide[:, ::2]  # [M,K] with strides (4, 284), [K,N] with stride 8 along N
    check_against_torch_and_numpy(matmul.VERSIONS[version], a, b, f"{version} on views")


@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_with_one_and_two_threads(rng, threads):
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        a, b = random_operands(rng, 2 * ROW_BLOCK + 5, KC + 3, NC + NR + 1)
        check_against_torch_and_numpy(matmul.matmul_numba_blocked, a, b, f"blocked, {threads} threads")
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 25, 119, 120, 121, 250, 1000, 2048])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_blocks_cover_the_rows(rows, threads):
    block = row_block_size(rows, threads)
    tasks = -(-rows // block)
    assert block % MR == 0 and block <= max(MR, ROW_BLOCK)
    assert tasks * block >= rows > (tasks - 1) * block  # every row in exactly one task, none empty
    if rows >= 250:
        assert tasks % threads == 0  # equal shares for Numba's even split of the prange


def test_large_values_keep_relative_accuracy(rng):
    a, b = random_operands(rng, 64, 1000, 96)
    a *= 1e15  # products ~1e30: no overflow in float32 (max 3.4e38), the tile must not lose them
    check_against_torch_and_numpy(matmul.matmul_numba_blocked, a, b, "blocked, large values")


@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 5, 0), (4, 0, 3), (0, 0, 0)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("version", ALL)
def test_zero_sizes_give_empty_or_zero_results(version, shape):
    rows, depth, cols = shape
    a = np.ones((rows, depth), np.float32)
    b = np.ones((depth, cols), np.float32)
    c = matmul.VERSIONS[version](a, b)
    expected = torch.mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()  # K = 0: zeros
    assert c.shape == expected.shape and c.dtype == np.float32
    np.testing.assert_array_equal(c, expected)


@pytest.mark.parametrize("version", ALL)
def test_bad_input_names_the_argument_and_shapes(version):
    fn = matmul.VERSIONS[version]
    name = f"matmul_{version}"
    a = np.ones((3, 4), np.float32)
    b = np.ones((4, 5), np.float32)
    with pytest.raises(NpdiffError, match=rf"{name}: inner sizes differ: a is \[M,K\] = \[3,4\] and "
                                          rf"b is \[K,N\] = \[5,4\]"):
        fn(a, b.T.copy())
    with pytest.raises(NpdiffError, match=rf"{name}: a must be 2-D \[M,K\], got shape \[12\]"):
        fn(a.reshape(-1), b)
    with pytest.raises(NpdiffError, match=rf"{name}: b must be 2-D \[K,N\], got shape \[1,4,5\]"):
        fn(a, b[None])
    with pytest.raises(NpdiffError, match=rf"{name}: a must be float32, got float64 with shape \[3,4\]"):
        fn(a.astype(np.float64), b)
    with pytest.raises(NpdiffError, match=rf"{name}: b must be float32, got int32 with shape \[4,5\]"):
        fn(a, b.astype(np.int32))
    with pytest.raises(NpdiffError, match=rf"{name}: a must be a float32 array, got list"):
        fn(a.tolist(), b)


def test_micro_kernel_inner_loop_is_24_zmm_fmas_in_registers():
    """The k loop of the micro-kernel: 24 FMAs on zmm registers, no gathers, no stack traffic.

    Not a timing: it checks the code LLVM generated, which is what makes step 6 fast (a change that
    breaks the register promotion of the C tile still passes every numeric test but runs ~5x slower).
    """
    if not cpu_has_avx512f():
        pytest.skip("the 6 x 64 micro-kernel is laid out for AVX-512 (zmm) registers")
    lines = micro_kernel_asm().splitlines()
    fma_lines = [i for i, line in enumerate(lines) if re.search(r"vfmadd\d+ps\s.*%zmm", line)]
    assert len(fma_lines) >= MR * NR // 16, f"expected >= {MR * NR // 16} zmm FMAs, found {len(fma_lines)}"
    loop_start = max(i for i in range(fma_lines[0]) if lines[i].startswith("."))  # the loop's label
    loop_end = min(i for i in range(fma_lines[-1], len(lines)) if lines[i].strip().startswith("j"))
    loop = lines[loop_start:loop_end + 1]
    loop_fmas = [line for line in loop if re.search(r"vfmadd\d+ps\s.*%zmm", line)]
    assert len(loop_fmas) == MR * NR // 16, "\n".join(loop)
    assert not [line for line in loop if "%rsp" in line or "gather" in line], "\n".join(loop)
