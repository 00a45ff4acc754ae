"""The whole pipeline and the CUDA noise source on the GPU (marked gpu: skipped without CuPy + CUDA +
torch CUDA).

Pipeline: the tiny Stable Diffusion of tests/pipeline/tiny_sd.py run by npdiff on the GPU (cupy,
float32) gives the same picture as npdiff on the CPU for the same seed (TorchGenerator noise, drawn
on the CPU either way): 8-bit images differ by at most IMAGE_LEVELS_TOL per pixel. With the cuda
noise source (CudaGenerator) it gives diffusers' picture on the same GPU with
torch.Generator("cuda") — the noise is equal bit for bit, the rest within float32 rounding.

Noise: CudaGenerator(seed).randn(shape) equals torch.randn(shape, device="cuda",
generator=torch.Generator("cuda").manual_seed(seed)) bit for bit, over sequences of calls (the
offsets), sizes past one wave of threads (where the SM count enters), and float16.
"""

import numpy as np
import pytest
import torch
from gpu_helpers import host
from helpers import IMAGE_LEVELS_TOL
from tiny_sd import tiny_sd_folder, torch_pipeline

from npdiff import backend
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.rng import CudaGenerator, PhiloxGenerator

pytestmark = pytest.mark.gpu


# ---------------------------------------------------------------------------------------------
# CudaGenerator == torch.randn(device="cuda")
# ---------------------------------------------------------------------------------------------
def torch_cuda_generator(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def test_cuda_noise_equals_torch_randn_on_the_gpu(cp, rng):
    seed = int(rng.integers(0, 2**63))
    ours, theirs = CudaGenerator(seed), torch_cuda_generator(seed)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    one_wave = 256 * sm_count * (torch.cuda.get_device_properties(0).max_threads_per_multi_processor // 256)
    shapes = [(1, 4, 64, 64), (2, 4, 96, 64), (7,), (1,), (3, 5, 17), (one_wave + 3,), (10_000_019,)]
    for shape in shapes:  # one sequence: every call must start at torch's offset
        values = ours.randn(shape)
        expected = torch.randn(shape, device="cuda", generator=theirs)
        assert type(values).__module__.startswith("cupy") and values.dtype == np.float32
        np.testing.assert_array_equal(host(values), expected.cpu().numpy(), err_msg=f"shape {shape}")
    assert ours.offset == theirs.get_offset()


def test_cuda_noise_float16_and_reseeding(cp, rng):
    seed = int(rng.integers(0, 2**63))
    ours, theirs = CudaGenerator(seed), torch_cuda_generator(seed)
    half = ours.randn((2, 4, 32, 32), dtype=np.float16)
    expected = torch.randn((2, 4, 32, 32), device="cuda", dtype=torch.float16, generator=theirs)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(host(half), expected.cpu().numpy())
    first = host(ours.manual_seed(seed).randn(1000))
    np.testing.assert_array_equal(first, torch.randn(1000, device="cuda", generator=theirs.manual_seed(seed)).cpu())


def test_cuda_noise_agrees_with_the_cpu_emulation(cp, rng):
    """PhiloxGenerator computes the same layout on the CPU with glibc's logf/sinf/cosf: a few ulp apart."""
    seed = int(rng.integers(0, 2**63))
    ours = CudaGenerator(seed)
    emulated = PhiloxGenerator(seed, num_sms=ours.num_sms, max_threads_per_sm=ours.max_threads_per_sm)
    for n in (16384, 3 * 256 * ours.num_sms * 8 + 11):
        np.testing.assert_allclose(host(ours.randn(n)), emulated.randn(n), rtol=0, atol=4e-6)
    assert ours.offset == emulated.offset


# ---------------------------------------------------------------------------------------------
# The pipeline on the GPU
# ---------------------------------------------------------------------------------------------
def picture(pipe, seed, sampler, **kwargs):
    pipe.set_scheduler(sampler)
    out = pipe("a red circle on a blue square", num_inference_steps=6, guidance_scale=7.0, seed=seed,
               output_type="np", progress=False, **kwargs)
    return np.round(np.asarray(out.images) * 255.0).astype(np.int16)


@pytest.mark.parametrize("sampler", ["pndm", "euler_a", "dpmpp_2m"])
def test_pipeline_on_gpu_gives_the_cpu_picture(cp, rng, sampler):
    folder = tiny_sd_folder()
    seed = int(rng.integers(0, 2**31))
    on_cpu = picture(StableDiffusionPipeline.from_pretrained(folder), seed, sampler)
    backend.use("cupy")
    try:
        on_gpu = picture(StableDiffusionPipeline.from_pretrained(folder), seed, sampler)
    finally:
        backend.use("numpy")
    assert on_gpu.shape == on_cpu.shape
    assert np.abs(on_gpu - on_cpu).max() <= IMAGE_LEVELS_TOL, f"{sampler}: GPU and CPU pictures differ"


def test_pipeline_with_cuda_noise_gives_diffusers_cuda_picture(cp, rng):
    folder = tiny_sd_folder()
    seed = int(rng.integers(0, 2**31))
    reference = torch_pipeline(folder, "euler_a").to("cuda")
    with torch.no_grad():
        expected = reference("a red circle on a blue square", num_inference_steps=6, guidance_scale=7.0,
                             generator=torch_cuda_generator(seed), output_type="np").images
    backend.use("cupy")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler_a")
        pipe.show_progress = False
        ours = pipe("a red circle on a blue square", num_inference_steps=6, guidance_scale=7.0,
                    generator=CudaGenerator(seed), output_type="np").images
    finally:
        backend.use("numpy")
    difference = np.abs(np.round(np.asarray(ours) * 255.0) - np.round(np.asarray(expected) * 255.0))
    assert difference.max() <= IMAGE_LEVELS_TOL
