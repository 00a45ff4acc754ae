"""npdiff.training.text_embedding_grad against torch.autograd through diffusers' UNet2DConditionModel and
transformers' CLIPTextModel (the same tiny random weights, tests/pipeline/tiny_sd.py): the loss within 1e-5
and d loss/d(token embeddings) within 1e-4, SD 1.x and SD 2.x tiny models, epsilon and v-prediction.

The torch side is diffusers' textual-inversion training step: DDPMScheduler.add_noise with the model's betas,
target noise or get_velocity, F.mse_loss(reduction="mean"); the token embeddings are made a leaf by a forward
hook on text_encoder.embeddings.token_embedding."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_TOL, NETWORK_TOL, assert_rel_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from tiny_sd import tiny_sd_folder, torch_pipeline

from npdiff import StableDiffusionPipeline
from npdiff.errors import NpdiffError
from npdiff.training import text_embedding_grad

CAPTIONS = ["a photo of a cat", "a rendering of the small dog"]


@pytest.fixture(scope="module", params=["test", "sd2"])
def pipes(request):
    folder = tiny_sd_folder(kind=request.param)
    return request.param, torch_pipeline(folder), folder


def torch_loss_and_grad(torch_pipe, ids, latents, noise, timesteps, prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(torch_pipe.scheduler.config, prediction_type=prediction_type)
    text_encoder = torch_pipe.text_encoder
    text_model = text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
    ids_t = torch.from_numpy(ids)
    leaf = text_model.embeddings.token_embedding(ids_t).detach().requires_grad_(True)
    handle = text_model.embeddings.token_embedding.register_forward_hook(lambda module, args, out: leaf)
    try:
        hidden = text_encoder(ids_t)[0]
    finally:
        handle.remove()
    latents_t, noise_t, t = torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(timesteps)
    noisy = scheduler.add_noise(latents_t, noise_t, t)
    target = noise_t if prediction_type == "epsilon" else scheduler.get_velocity(latents_t, noise_t, t)
    prediction = torch_pipe.unet(noisy, t, hidden).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
    loss.backward()
    return loss.item(), leaf.grad


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_text_embedding_grad_matches_autograd(pipes, rng, prediction_type):
    kind, torch_pipe, folder = pipes
    ours = StableDiffusionPipeline.from_pretrained(folder, prediction_type=prediction_type)
    batch = int(rng.integers(1, 3))
    ids = ours.tokenizer(CAPTIONS[:batch])                              # [B,77]
    shape = (batch, ours.unet.config["in_channels"], 8, 8)
    latents = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    timesteps = rng.integers(0, 1000, size=batch).astype(np.int64)
    expected_loss, expected_grad = torch_loss_and_grad(torch_pipe, ids, latents, noise, timesteps, prediction_type)
    loss, grad = text_embedding_grad(ours, ids, latents, noise, timesteps)
    assert grad.shape == (batch, 77, ours.text_encoder.config["hidden_size"]) and grad.dtype == np.float32
    assert abs(loss - expected_loss) <= KERNEL_TOL * abs(expected_loss), (loss, expected_loss)
    assert_rel_close(grad, expected_grad, NETWORK_TOL, f"{kind} {prediction_type} d token embeddings")


def test_text_embedding_grad_refuses_bad_input(pipes, rng):
    _, _, folder = pipes
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ids = ours.tokenizer(CAPTIONS[:1])
    latents = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    with pytest.raises(NpdiffError, match="timesteps must lie in"):
        text_embedding_grad(ours, ids, latents, latents, 1000)
    with pytest.raises(NpdiffError, match="timesteps must be integers"):
        text_embedding_grad(ours, ids, latents, latents, 10.5)
    with pytest.raises(NpdiffError, match="noise must have"):
        text_embedding_grad(ours, ids, latents, latents[:, :3], 10)
    with pytest.raises(NpdiffError, match="input_ids has 2 rows"):
        text_embedding_grad(ours, ours.tokenizer(CAPTIONS), latents, latents, 10)
