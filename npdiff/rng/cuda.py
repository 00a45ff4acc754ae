"""CudaGenerator: torch's CUDA generator on the GPU, bit for bit, with curand's own Philox code.

    g = CudaGenerator(seed)                       # like torch.Generator("cuda").manual_seed(seed)
    g.randn((1, 4, 64, 64))                       # == torch.randn(..., device="cuda", generator=g_torch)
                                                  #    as a cupy array on the current device

torch.randn on a CUDA device (ATen cuda/DistributionTemplates.h, normal_kernel ->
distribution_nullary_kernel with curand_normal4) launches blocks of 256 threads,
grid = min(ceil(N/256), SMs * (max threads per SM // 256)); thread t calls
curand_init(seed, subsequence=t, offset=generator offset, &state) and then, in a grid-stride loop,
one curand_normal4 per iteration, writing its 4 normals (* std + mean, in float) to elements
it*4T + t + ii*T (ii = 0..3, those < N). Afterwards the generator's offset grows by
((N-1) // (4T) + 1) * 4. npdiff/rng/philox.py has that layout and offset arithmetic (and the Philox
block function) on the CPU; this class reuses them for the launch geometry and the offsets, and
runs the draw itself on the GPU with the kernel below, which is torch's kernel written out: the
same curand_init / curand_normal4 from curand_kernel.h (Philox4x32-10, logf and the fast __sincosf
of the GPU), the same `value * std + mean` with std = 1 and mean = 0 passed at run time (so the FMA
turns -0 into +0 as torch's does). The result is torch's, bit for bit, on the same GPU (the SM
count enters the layout when N exceeds one wave of threads). PhiloxGenerator (CPU) agrees with it
to a few ulp: it uses glibc's logf/sinf/cosf, not the GPU's.

float16: torch computes in float and rounds each value to half; so does randn(dtype=float16).
Sizes of 2^31 elements and more are refused: torch splits such tensors into 32-bit-indexable
pieces with their own launches, which this class does not reproduce.

Compiling needs curand_kernel.h: it is looked for in $CUDA_PATH, cupy's CUDA path, the nvidia-curand
pip wheel and /usr/local/cuda (cuda_include_dirs below); a clear NpdiffError says where it looked.
"""

import glob
import math
import os

import numpy as np

from npdiff import backend
from npdiff.errors import NpdiffError
from npdiff.rng.philox import BLOCK_SIZE, NORMALS_PER_CALL, PhiloxGenerator
from npdiff.rng.validate import check_dtype, check_shape

MAX_ELEMENTS = 2**31 - 1  # torch's 32-bit indexing limit for one launch

SOURCE = r"""
#include <curand_kernel.h>

// torch's distribution_elementwise_grid_stride_kernel<float, 4> with curand_normal4 and
// normal's transform (rand * std + mean). One thread = one Philox subsequence.
extern "C" __global__ void torch_randn_philox(float* out, long long n, unsigned long long seed,
                                              unsigned long long offset, float mean, float std) {
    const long long thread = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long threads = (long long)blockDim.x * gridDim.x;
    curandStatePhilox4_32_10_t state;
    curand_init(seed, thread, offset, &state);
    const long long rounded = ((n - 1) / (threads * 4) + 1) * threads * 4;
    for (long long linear = thread; linear < rounded; linear += threads * 4) {
        const float4 normals = curand_normal4(&state);
        const float values[4] = {normals.x, normals.y, normals.z, normals.w};
        for (int ii = 0; ii < 4; ii++) {
            const long long index = linear + threads * ii;
            if (index < n) out[index] = values[ii] * std + mean;
        }
    }
}
"""


def cuda_include_dirs(header="curand_kernel.h"):
    """Folders holding `header`, in the order searched: $CUDA_PATH/$CUDA_HOME, cupy's CUDA path,
    the include folders of NVIDIA's pip wheels (nvidia/*/include, nvidia/cu*/include), /usr/local/cuda."""
    bases = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
    try:
        import cupy

        bases.append(cupy.cuda.get_cuda_path())
    except Exception:  # no cupy, or cupy without a toolkit path: look elsewhere
        pass
    candidates = [os.path.join(base, "include") for base in bases if base]
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    candidates.append("/usr/local/cuda/include")
    found = []
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, header)) and folder not in found:
            found.append(folder)
    return found, candidates


def curand_include_options():
    """-I folders for NVRTC: the first with curand_kernel.h, and the first with CCCL's libcu++
    (<nv/target> and <cuda/std/type_traits>, which curand_kernel.h includes under NVRTC; in a
    CUDA 13 toolkit they live in include/cccl)."""
    found, looked = cuda_include_dirs()
    if not found:
        raise NpdiffError("CudaGenerator needs curand_kernel.h to compile its kernel and found it in none of "
                          f"{looked}; install the CUDA toolkit or `pip install nvidia-curand` (CUDA 13) / "
                          "`nvidia-curand-cu12` (CUDA 12), or set CUDA_PATH")
    folders = [found[0]]
    for folder in looked:
        for candidate in (folder, os.path.join(folder, "cccl")):
            if os.path.isfile(os.path.join(candidate, "cuda", "std", "type_traits")) and candidate not in folders:
                folders.append(candidate)
                return folders
    return folders  # no CCCL found: cupy's own CCCL headers may still serve


class CudaGenerator(PhiloxGenerator):
    """torch.Generator("cuda") reproduced on the current cupy device: same seed, same offsets, same
    numbers as torch.randn(..., device="cuda", generator=g).

    seed: int in [-2**63, 2**64 - 1] (negatives wrap), None for torch's default seed.
    num_sms, max_threads_per_sm: default to the current cupy device's properties; give them to plan
    launches without a GPU (the draw itself always needs one).
    """

    def __init__(self, seed=None, num_sms=None, max_threads_per_sm=None):
        if num_sms is None or max_threads_per_sm is None:
            properties = _device_properties()
            num_sms = properties["multiProcessorCount"] if num_sms is None else num_sms
            max_threads_per_sm = properties["maxThreadsPerMultiProcessor"] if max_threads_per_sm is None \
                else max_threads_per_sm
        super().__init__(seed, num_sms=num_sms, max_threads_per_sm=max_threads_per_sm)
        self._kernel = None

    def __repr__(self):
        return (f"CudaGenerator(seed={self._seed}, num_sms={self.num_sms}, "
                f"max_threads_per_sm={self.max_threads_per_sm}) at offset {self.offset}")

    def plan(self, n):
        """(blocks, threads per block, curand_normal4 calls per thread, offset after the draw) for n elements."""
        threads = self.launch_threads(n)
        calls = (n - 1) // (NORMALS_PER_CALL * threads) + 1
        return threads // BLOCK_SIZE, BLOCK_SIZE, calls, self.offset + calls * NORMALS_PER_CALL

    def randn(self, shape, dtype=np.float32):
        """Standard normals of `shape` as a cupy array (float32, or float16 rounded from them)."""
        shape = check_shape("CudaGenerator.randn", shape)
        dtype_name = check_dtype("CudaGenerator.randn", dtype, ("float32", "float16"))
        n = math.prod(shape)
        if n > MAX_ELEMENTS:
            raise NpdiffError(f"CudaGenerator.randn: at most {MAX_ELEMENTS} elements per call (torch splits "
                              f"larger tensors into several launches), got shape {shape} = {n} elements")
        cupy = _import_cupy()
        out = cupy.empty(n, dtype=np.float32)  # [N]
        if n > 0:
            blocks, threads_per_block, _, next_offset = self.plan(n)
            self._compiled()((blocks,), (threads_per_block,),
                             (out, np.int64(n), np.uint64(self._seed), np.uint64(self.offset),
                              np.float32(0.0), np.float32(1.0)))
            self.offset = next_offset
        out = out.reshape(shape)
        return out if dtype_name == "float32" else out.astype(np.float16)

    def _compiled(self):
        if self._kernel is None:
            cupy = _import_cupy()
            options = ("--std=c++17",) + tuple(f"-I{folder}" for folder in curand_include_options())
            self._kernel = cupy.RawModule(code=SOURCE, options=options).get_function("torch_randn_philox")
        return self._kernel


def _import_cupy():
    return backend._import_cupy()


def _device_properties():
    cupy = _import_cupy()
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
