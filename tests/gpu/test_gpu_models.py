"""The networks on the GPU: npdiff with the cupy backend against diffusers/transformers on the same GPU
(marked gpu: skipped without CuPy + CUDA + torch CUDA).

Tiny random models (tests/tiny_models.py, tests/tiny_clip.py) are loaded by npdiff after
backend.use("cupy") — so every weight is a cupy array, moved once at load — and called on cupy
inputs; the torch models run on CUDA in float32 (TF32 off). float32: relative error <= NETWORK_TOL.
float16 (backend.use("cupy", dtype="float16")): against the float32 torch model whose weights were
rounded to half, relative error <= HALF_NETWORK_TOL (half activations through a whole network).
"""

import copy

import numpy as np
import pytest
import torch
from gpu_helpers import host, to_torch_cuda
from helpers import NETWORK_TOL, assert_rel_close
from tiny_clip import padded_ids, save_clip, tiny_clip
from tiny_models import tiny_unet, tiny_vae

from npdiff import backend
from npdiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

pytestmark = pytest.mark.gpu

HALF_NETWORK_TOL = 2e-2
DTYPES = ["float32", "float16"]


@pytest.fixture(params=DTYPES)
def device_dtype(request, cp):
    """The cupy backend in float32 or float16 for one test; numpy afterwards."""
    backend.use("cupy", dtype=request.param)
    yield request.param
    backend.use("numpy")


def torch_on_cuda(model, dtype):
    """A CUDA copy of a torch model (the cached CPU one stays as it is); for float16 its weights are
    rounded to half and back, so both sides start from the same numbers."""
    model = copy.deepcopy(model).cuda().eval()
    if dtype == "float16":
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.half().float())
    return model


def tolerance(dtype):
    return NETWORK_TOL if dtype == "float32" else HALF_NETWORK_TOL


def assert_weights_on_gpu(array, dtype):
    assert type(array).__module__.startswith("cupy") and array.dtype == np.dtype(dtype)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_unet_on_gpu(cp, rng, device_dtype, kind):
    torch_model, folder = tiny_unet(kind, seed=0)
    ours = UNet2DConditionModel.from_pretrained(folder)
    assert_weights_on_gpu(ours.conv_in.weight, device_dtype)
    reference = torch_on_cuda(torch_model, device_dtype)
    batch, height, width = 2, 16, 24
    sample = rng.standard_normal((batch, 4, height, width), dtype=np.float32)
    context = rng.standard_normal((batch, 7, reference.config.cross_attention_dim), dtype=np.float32)
    timestep = int(rng.integers(0, 1000))
    out = ours(backend.to_device(sample), timestep, backend.to_device(context))
    assert type(out).__module__.startswith("cupy") and out.shape == (batch, 4, height, width)
    with torch.no_grad():
        expected = reference(to_torch_cuda(host(backend.to_device(sample)).astype(np.float32)), timestep,
                             to_torch_cuda(host(backend.to_device(context)).astype(np.float32))).sample
    assert_rel_close(out, expected, tolerance(device_dtype), f"unet {kind} {device_dtype}")


@pytest.mark.parametrize("kind", ["sd", "deep"])
def test_vae_on_gpu(cp, rng, device_dtype, kind):
    torch_model, folder = tiny_vae(kind, seed=0)
    ours = AutoencoderKL.from_pretrained(folder)
    reference = torch_on_cuda(torch_model, device_dtype)
    factor = ours.downscale
    latents = rng.standard_normal((2, 4, 8, 6), dtype=np.float32)
    image = rng.uniform(-1, 1, size=(1, 3, 8 * factor, 4 * factor)).astype(np.float32)
    decoded = ours.decode(backend.to_device(latents))
    mean = ours.encode(backend.to_device(image)).mean
    latents_t = to_torch_cuda(host(backend.to_device(latents)).astype(np.float32))  # the values npdiff got
    image_t = to_torch_cuda(host(backend.to_device(image)).astype(np.float32))
    with torch.no_grad():
        expected_decoded = reference.decode(latents_t).sample
        expected_mean = reference.encode(image_t).latent_dist.mean
    assert_rel_close(decoded, expected_decoded, tolerance(device_dtype), f"vae {kind} decode {device_dtype}")
    assert_rel_close(mean, expected_mean, tolerance(device_dtype), f"vae {kind} encode {device_dtype}")


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_clip_on_gpu(cp, rng, tmp_path, device_dtype, kind):
    torch_model = tiny_clip(kind, seed=3)
    ours = CLIPTextModel.from_pretrained(save_clip(torch_model, tmp_path / "text_encoder"))
    assert_weights_on_gpu(ours.token_embedding, device_dtype)
    reference = torch_on_cuda(torch_model, device_dtype)
    ids = padded_ids(rng, 2, 77)
    out = ours(ids)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).cuda()).last_hidden_state
    assert_rel_close(out, expected, tolerance(device_dtype), f"clip {kind} {device_dtype}")


def test_float32_latents_meet_float16_weights(cp, rng):
    """The pipeline's scheduler hands float32 latents to a float16 UNet: each kernel computes in its
    weights' dtype, so the call works and returns half."""
    torch_model, folder = tiny_unet("sd1", seed=0)
    backend.use("cupy", dtype="float16")
    try:
        ours = UNet2DConditionModel.from_pretrained(folder)
        sample = cp.asarray(rng.standard_normal((1, 4, 8, 8), dtype=np.float32))  # float32 on purpose
        context = backend.to_device(rng.standard_normal((1, 7, 24), dtype=np.float32))
        out = ours(sample, 10, context)
    finally:
        backend.use("numpy")
    assert out.dtype == np.float16
    reference = torch_on_cuda(torch_model, "float16")
    with torch.no_grad():
        expected = reference(to_torch_cuda(host(sample).astype(np.float16).astype(np.float32)), 10,
                             to_torch_cuda(host(context).astype(np.float32))).sample
    assert_rel_close(out, expected, HALF_NETWORK_TOL, "float16 unet on float32 latents")
