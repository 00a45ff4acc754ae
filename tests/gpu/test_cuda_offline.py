"""The CUDA backend's parts that need no GPU: launch and tiling arithmetic, the noise generator's
plan and offsets (against npdiff/rng/philox.py, the CPU emulation of torch's CUDA layout),
argument checks, the dispatch of cupy arrays to the CUDA kernels, and compiling every CUDA source
for float32 and float16 (NVRTC, as cupy does, or nvcc --ptx).

What this cannot show: that the kernels compute the right numbers. tests/gpu's `gpu` tests do that
against torch on a GPU.
"""

import importlib.util
import math

import numpy as np
import pytest
from nvrtc_compile import find_compiler

import npdiff.kernels as kernels
from npdiff.errors import NpdiffError
from npdiff.kernels import cuda
from npdiff.kernels.cuda import attention, conv, elementwise, norm, runtime
from npdiff.rng import PhiloxGenerator
from npdiff.rng import cuda as rng_cuda
from npdiff.rng.cuda import CudaGenerator

HAVE_CUPY = importlib.util.find_spec("cupy") is not None


# ---------------------------------------------------------------------------------------------
# Launch and tiling arithmetic
# ---------------------------------------------------------------------------------------------
def test_grid_covers_every_element(rng):
    for n in [0, 1, 255, 256, 257, *rng.integers(1, 10**9, size=20).tolist()]:
        grid = runtime.grid_for(n)
        assert 1 <= grid <= runtime.MAX_GRID
        assert grid * runtime.THREADS >= n or grid == runtime.MAX_GRID  # the grid-stride loop does the rest
    assert runtime.grid_for(10**12) == runtime.MAX_GRID


def test_group_norm_chunks_cover_each_slab(rng):
    # SD's shapes (batch 2 x 32 groups: UNet 64x64, VAE 512x512) and random ones
    cases = [(10 * 4096, 64), (4 * 512 * 512, 32), (1, 1), (7, 3)]
    cases += [(int(rng.integers(1, 3_000_000)), int(rng.integers(1, 300))) for _ in range(30)]
    for count, slabs in cases:
        chunks, chunk_len = norm.group_norm_chunks(count, slabs)
        assert 1 <= chunks <= norm.MAX_CHUNKS
        assert (chunks - 1) * chunk_len < count <= chunks * chunk_len  # covered, no empty chunk
        if chunks > 1:
            assert chunk_len >= norm.MIN_CHUNK // 2  # pieces stay big enough to be worth a block
        if count >= norm.MIN_CHUNK * norm.TARGET_BLOCKS:
            assert slabs * chunks >= min(norm.TARGET_BLOCKS, slabs * norm.MAX_CHUNKS) * 0.5
    assert norm.group_norm_chunks(4 * 512 * 512, 32)[0] > 1  # the VAE's slabs are split
    assert norm.group_norm_chunks(100, 64) == (1, 100)  # tiny slabs are not


@pytest.mark.parametrize("budget_rows", [0.5, 1, 3, 1000])
def test_im2col_tiles_cover_every_output_row_once(rng, budget_rows):
    batch, h_out = int(rng.integers(1, 5)), int(rng.integers(1, 70))
    bytes_per_row = int(rng.integers(1, 10_000))
    budget = max(1, int(budget_rows * bytes_per_row * (h_out if budget_rows == 1000 else 1)))
    tiles = conv.im2col_tiles(batch, h_out, bytes_per_row, budget)
    seen = np.zeros((batch, h_out), dtype=int)
    for image0, image1, row0, row1 in tiles:
        assert 0 <= image0 < image1 <= batch and 0 <= row0 < row1 <= h_out
        assert (image1 - image0) == 1 or (row0, row1) == (0, h_out)  # several images only when whole
        if (row1 - row0) > 1:
            assert (image1 - image0) * (row1 - row0) * bytes_per_row <= budget
        seen[image0:image1, row0:row1] += 1
    assert (seen == 1).all()


def test_im2col_tiles_at_sd_sizes():
    itemsize = 4
    # VAE decoder's last 3x3 convs at 512x512: 128 channels -> K = 1152; one image is 1.2 GB unfolded
    tiles = conv.im2col_tiles(1, 512, 128 * 9 * 512 * itemsize)
    assert len(tiles) > 1 and all(t[1] - t[0] == 1 for t in tiles)
    # UNet 64x64 latent, 320 channels, batch 2: both images in one tile (2 x 47 MB)
    assert conv.im2col_tiles(2, 64, 320 * 9 * 64 * itemsize) == [(0, 2, 0, 64)]


def test_query_blocks_stay_under_the_budget(rng):
    for _ in range(30):
        lead, n, m = int(rng.integers(1, 33)), int(rng.integers(1, 5000)), int(rng.integers(1, 5000))
        itemsize = int(rng.choice([2, 4]))
        budget = int(rng.integers(1, 64 << 20))
        block = attention.query_block_size(lead, n, m, itemsize, budget)
        assert 1 <= block <= n
        assert block == 1 or lead * block * m * itemsize <= budget
        spans = attention.query_blocks(n, block)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    # SD 1.5's self-attention at 64x64, batch 2: [2,8,4096,4096] float32 is 1 GiB -> two blocks
    assert attention.query_block_size(16, 4096, 4096, 4) == 2048


def test_softmax_rows_per_block():
    assert attention.ROWS_PER_BLOCK == runtime.THREADS // 32
    for rows in [1, 7, 8, 9, 65536]:
        assert attention.blocks_for_rows(rows) * attention.ROWS_PER_BLOCK >= rows


# ---------------------------------------------------------------------------------------------
# The CUDA noise source: plan and offsets as torch's (npdiff/rng/philox.py's layout)
# ---------------------------------------------------------------------------------------------
def test_cuda_generator_plan_matches_torchs_layout(rng):
    num_sms, per_sm = int(rng.integers(1, 200)), 256 * int(rng.integers(1, 9))
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    ours = CudaGenerator(seed, num_sms=num_sms, max_threads_per_sm=per_sm)
    emulated = PhiloxGenerator(seed, num_sms=num_sms, max_threads_per_sm=per_sm)
    capacity = 256 * num_sms * (per_sm // 256)
    for n in [1, 16, 255, 257, 4 * 64 * 64, capacity, capacity + 1, 9 * capacity + 5, int(rng.integers(1, 10**6))]:
        blocks, threads_per_block, calls, next_offset = ours.plan(n)
        threads = blocks * threads_per_block
        assert threads_per_block == 256 and threads == emulated.launch_threads(n)
        assert blocks == min(math.ceil(n / 256), num_sms * (per_sm // 256))
        assert (calls - 1) * 4 * threads < n <= calls * 4 * threads  # every element written once
        emulated.randn(n)  # advances the CPU emulation's offset as torch advances its generator
        ours.offset = next_offset
        assert ours.offset == emulated.offset and ours.offset % 4 == 0
    ours.manual_seed(seed)
    assert ours.offset == 0 and ours.initial_seed() == seed


def test_cuda_generator_checks_arguments_before_touching_the_gpu():
    g = CudaGenerator(1, num_sms=108, max_threads_per_sm=2048)
    with pytest.raises(NpdiffError, match="shape"):
        g.randn((4, -1))
    with pytest.raises(NpdiffError, match="dtype must be one of float32, float16"):
        g.randn((4,), dtype=np.float64)
    with pytest.raises(NpdiffError, match="at most 2147483647 elements"):
        g.randn((2**16, 2**15))
    with pytest.raises(NpdiffError, match="seed"):
        CudaGenerator(1.5, num_sms=108, max_threads_per_sm=2048)
    with pytest.raises(NpdiffError, match="num_sms"):
        CudaGenerator(1, num_sms=0, max_threads_per_sm=2048)
    assert g.offset == 0


@pytest.mark.skipif(HAVE_CUPY, reason="cupy is installed here: the no-cupy message cannot be seen")
def test_cuda_generator_without_cupy_says_how_to_install():
    with pytest.raises(NpdiffError, match=r"pip install -e '\.\[gpu\]'"):
        CudaGenerator(0)  # needs the device's SM count
    with pytest.raises(NpdiffError, match=r"pip install -e '\.\[gpu\]'"):
        CudaGenerator(0, num_sms=108, max_threads_per_sm=2048).randn((1, 4, 8, 8))


def test_cuda_generator_names_missing_curand_headers(monkeypatch):
    monkeypatch.setattr(rng_cuda, "cuda_include_dirs", lambda header="curand_kernel.h": ([], ["/nowhere/include"]))
    with pytest.raises(NpdiffError, match=r"curand_kernel\.h .*/nowhere/include.*nvidia-curand"):
        rng_cuda.curand_include_options()


# ---------------------------------------------------------------------------------------------
# Dispatch: cupy arrays reach the CUDA kernels (a stand-in array; the kernels are replaced)
# ---------------------------------------------------------------------------------------------
class FakeCupyArray:
    """Looks like a cupy array to npdiff's checks and to dispatch.is_cupy; holds no data."""

    __module__ = "cupy"  # dispatch.is_cupy looks at the type's module

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim, self.size = len(self.shape), math.prod(self.shape)


DISPATCH = [
    ("silu", lambda a: kernels.silu(a((2, 3))), "silu"),
    ("quick_gelu", lambda a: kernels.quick_gelu(a((2, 3))), "quick_gelu"),
    ("gelu", lambda a: kernels.gelu(a((2, 3)), approximate="tanh"), "gelu"),
    ("group_norm", lambda a: kernels.group_norm(a((2, 8, 4, 4)), 4, a((8,)), a((8,)), silu=True), "group_norm"),
    ("layer_norm", lambda a: kernels.layer_norm(a((2, 5, 8)), a((8,)), None), "layer_norm"),
    ("softmax", lambda a: kernels.softmax(a((2, 5)), axis=0), "softmax"),
    ("attention", lambda a: kernels.scaled_dot_product_attention(a((2, 3, 5, 8)), a((2, 3, 7, 8)), a((2, 3, 7, 4)),
                                                                 is_causal=True), "scaled_dot_product_attention"),
    ("conv2d", lambda a: kernels.conv2d(a((1, 3, 8, 8)), a((4, 3, 3, 3)), a((4,)), stride=2, padding=1), "conv2d"),
    ("linear", lambda a: kernels.linear(a((2, 5, 8)), a((6, 8)), a((6,))), "linear"),
    ("geglu", lambda a: kernels.geglu(a((2, 5, 8)), a((12, 8)), a((12,))), "geglu"),
    ("upsample", lambda a: kernels.upsample_nearest2x(a((1, 2, 3, 3))), "upsample_nearest2x"),
]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case,call,target", DISPATCH, ids=[d[0] for d in DISPATCH])
def test_cupy_arrays_are_sent_to_the_cuda_kernels(monkeypatch, case, call, target, dtype):
    calls = []
    monkeypatch.setattr(cuda, target, lambda *args, **kwargs: calls.append((args, kwargs)) or "from cuda")
    assert call(lambda shape: FakeCupyArray(shape, dtype)) == "from cuda"
    assert len(calls) == 1


@pytest.mark.parametrize("activation,target", [("quick_gelu", "quick_gelu"), ("gelu_tanh", "gelu"), ("silu", "silu")])
def test_linear_activation_sends_cupy_arrays_to_the_cuda_linear_then_activation(monkeypatch, activation, target):
    calls = []
    monkeypatch.setattr(cuda, "linear", lambda x, w, b: calls.append("linear") or FakeCupyArray((2, 5, 6)))
    monkeypatch.setattr(cuda, target, lambda h, *args: calls.append(target) or "from cuda")
    x, weight, bias = FakeCupyArray((2, 5, 8)), FakeCupyArray((6, 8)), FakeCupyArray((6,))
    assert kernels.linear_activation(x, weight, bias, activation) == "from cuda"
    assert calls == ["linear", target]


def test_float16_is_refused_for_numpy_arrays():
    with pytest.raises(NpdiffError, match="silu: x must be float32, got float16"):
        kernels.silu(np.zeros(3, np.float16))
    with pytest.raises(NpdiffError, match="conv2d: weight must be float32, got float64"):
        kernels.conv2d(FakeCupyArray((1, 3, 8, 8)), FakeCupyArray((4, 3, 3, 3), np.float64))


def test_cuda_conv_gets_checked_stride_and_padding(monkeypatch):
    seen = {}
    monkeypatch.setattr(cuda, "conv2d", lambda x, w, b, stride, padding: seen.update(stride=stride, padding=padding))
    kernels.conv2d(FakeCupyArray((1, 3, 8, 8)), FakeCupyArray((4, 3, 3, 3)), None, stride=(2, 1), padding=1)
    assert seen == {"stride": (2, 1), "padding": (1, 1)}


# ---------------------------------------------------------------------------------------------
# Every CUDA source compiles (for both element types), and defines the kernels the wrappers launch
# ---------------------------------------------------------------------------------------------
COMPILER = find_compiler()
KERNEL_SOURCES = {
    "elementwise": (elementwise.SOURCE, ["activation_kernel", "geglu_gate_kernel", "upsample_nearest2x_kernel"]),
    "norm": (norm.SOURCE, ["group_norm_partial_sums", "group_norm_apply", "layer_norm_rows"]),
    "attention": (attention.SOURCE, ["softmax_rows"]),
    "conv": (conv.SOURCE, ["im2col_rows"]),
}


def toolkit_include_options():
    """-I for cuda_fp16.h (cupy supplies its own copy at run time; a compiler here needs the toolkit's)."""
    found, _ = rng_cuda.cuda_include_dirs("cuda_fp16.h")
    return [f"-I{folder}" for folder in found[:1]]


@pytest.mark.skipif(COMPILER is None, reason="no CUDA compiler here (neither libnvrtc nor nvcc)")
@pytest.mark.parametrize("dtype", runtime.DTYPES)
@pytest.mark.parametrize("family", sorted(KERNEL_SOURCES))
def test_cuda_sources_compile(family, dtype):
    source, names = KERNEL_SOURCES[family]
    ptx = COMPILER.compile(runtime.HEADER + source, [*runtime.compile_options(dtype), *toolkit_include_options()])
    for name in names:
        assert f".entry {name}(" in ptx, f"{family}: no kernel {name} in the PTX of {COMPILER.name}"
    assert ("cvt.f32.f16" in ptx) == (dtype == "float16")  # half -> float conversions only in the half build


@pytest.mark.skipif(COMPILER is None, reason="no CUDA compiler here (neither libnvrtc nor nvcc)")
@pytest.mark.skipif(not rng_cuda.cuda_include_dirs()[0],
                    reason="curand_kernel.h not found (no CUDA toolkit with cuRAND, no nvidia-curand wheel)")
def test_cuda_noise_source_compiles():
    options = ["--std=c++17", *(f"-I{folder}" for folder in rng_cuda.curand_include_options())]
    ptx = COMPILER.compile(rng_cuda.SOURCE, options)
    assert ".entry torch_randn_philox(" in ptx


def test_only_float32_and_float16_kernels_are_built():
    with pytest.raises(NpdiffError, match="float32 or float16 arrays, got float64"):
        runtime.kernel("norm", norm.SOURCE, "float64", "layer_norm_rows")
    assert runtime.compile_options("float16")[-1] == "-DNPDIFF_HALF"
    assert "-DNPDIFF_HALF" not in runtime.compile_options("float32")
