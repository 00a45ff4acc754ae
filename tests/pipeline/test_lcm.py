"""Few-step sampling through the pipeline against diffusers' StableDiffusionPipeline / Img2ImgPipeline:
an LCM-distilled tiny UNet (time_cond_proj_dim: the guidance scale goes in as timestep_cond, no
classifier-free guidance) with LCMScheduler, and TCD with a plain UNet. Same seed (a CPU torch.Generator
on their side) -> final latents within relative 1e-4 and 8-bit pictures within 2 levels."""

import numpy as np
import pytest
import torch
from helpers import NETWORK_TOL, assert_rel_close
from test_pipeline_img2img import random_picture
from test_pipeline_txt2img import PROMPTS, assert_same_pictures, load_ours, run_theirs
from tiny_sd import tiny_sd_folder, torch_pipeline


@pytest.fixture(scope="module")
def lcm_folder():
    return tiny_sd_folder(kind="lcm")


class RecordingUNet:
    """Wraps the UNet; records each call's batch size and timestep_cond."""

    def __init__(self, unet):
        self.unet, self.config, self.calls = unet, unet.config, []

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        self.calls.append((sample.shape[0], kwargs.get("timestep_cond")))
        return self.unet(sample, timestep, encoder_hidden_states, **kwargs)


def test_lcm_unet_and_scheduler_like_diffusers(lcm_folder, rng, seed):
    guidance = float(rng.uniform(1.5, 9.0))
    kwargs = dict(num_inference_steps=4, guidance_scale=guidance, height=64, width=32)
    prompt = PROMPTS[int(rng.integers(len(PROMPTS)))]
    theirs_pictures, theirs_latents = run_theirs(lcm_folder, "lcm", prompt, seed, **kwargs)
    pipe = load_ours(lcm_folder, "lcm")
    pipe.unet = RecordingUNet(pipe.unet)
    ours = pipe(prompt, seed=seed, output_type="np", **kwargs)
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what="LCM final latents")
    assert_same_pictures(ours.images, theirs_pictures)
    assert ours.parameters["sampler"] == "lcm"
    # no classifier-free guidance: one batch of 1 per step, each with the guidance embedding [1,24]
    assert [batch for batch, _ in pipe.unet.calls] == [1, 1, 1, 1]
    assert all(cond is not None and cond.shape == (1, 24) for _, cond in pipe.unet.calls)


def test_lcm_batch_and_guidance_changes_the_picture(lcm_folder, seed):
    """Two prompts x two pictures: timestep_cond has the whole batch; another guidance value -> other latents."""
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, num_images_per_prompt=2)
    theirs_pictures, theirs_latents = run_theirs(lcm_folder, "lcm", PROMPTS[:2], seed, **kwargs)
    pipe = load_ours(lcm_folder, "lcm")
    ours = pipe(PROMPTS[:2], seed=seed, output_type="np", **kwargs)
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what="LCM batch final latents")
    assert_same_pictures(ours.images, theirs_pictures)
    other = pipe(PROMPTS[:2], seed=seed, output_type="latent", **dict(kwargs, guidance_scale=8.0))
    assert not np.allclose(other.latents, ours.latents)


def test_lcm_img2img_like_diffusers(lcm_folder, rng, seed):
    picture = random_picture(rng, 64, 64)
    kwargs = dict(prompt="a red circle", strength=float(rng.uniform(0.5, 1.0)), num_inference_steps=4,
                  guidance_scale=float(rng.uniform(1.5, 9.0)))
    final = {}

    def keep_latents(_pipe, _i, _t, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().numpy().copy()
        return {}

    theirs = torch_pipeline(lcm_folder, "lcm", img2img=True)(
        image=picture, generator=torch.Generator().manual_seed(seed), output_type="np",
        callback_on_step_end=keep_latents, **kwargs)
    ours = load_ours(lcm_folder, "lcm").img2img(image=picture, seed=seed, output_type="np", **kwargs)
    assert_rel_close(ours.latents, final["latents"], tol=NETWORK_TOL, what="LCM img2img latents")
    assert_same_pictures(ours.images, np.round(np.asarray(theirs.images) * 255).astype(np.int16))


@pytest.mark.parametrize("eta", [0.0, 0.3, "random"])
def test_tcd_with_a_plain_unet_like_diffusers(rng, seed, eta):
    """TCD with classifier-free guidance; the pipeline's eta is TCD's gamma (diffusers passes it to step)."""
    folder = tiny_sd_folder()
    eta = float(rng.uniform(0.05, 1.0)) if eta == "random" else eta
    kwargs = dict(num_inference_steps=4, guidance_scale=float(rng.uniform(2.0, 9.0)), negative_prompt="blurry",
                  eta=eta)
    theirs_pictures, theirs_latents = run_theirs(folder, "tcd", PROMPTS[0], seed, **kwargs)
    ours = load_ours(folder, "tcd")(PROMPTS[0], seed=seed, output_type="np", **kwargs)
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what=f"TCD eta={eta} final latents")
    assert_same_pictures(ours.images, theirs_pictures)


def test_set_scheduler_lcm_from_the_model_config(lcm_folder):
    pipe = load_ours(lcm_folder, None)
    pipe.set_scheduler("lcm")
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.scheduler_name == "lcm"
    assert pipe.scheduler.config["steps_offset"] == 1 and pipe.scheduler.config["set_alpha_to_one"] is False
