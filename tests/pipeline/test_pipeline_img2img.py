"""Image-to-image against diffusers' StableDiffusionImg2ImgPipeline on the tiny random model: the same picture,
prompt, strength and seed -> final latents within relative 1e-4 and 8-bit pictures within 2 levels."""

import numpy as np
import pytest
from PIL import Image

from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close

import torch

from tiny_sd import tiny_sd_folder, torch_pipeline  # noqa: E402

from npdiff import NpdiffError  # noqa: E402
from npdiff.sampling_starts import get_timesteps  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.schedulers import make_scheduler  # noqa: E402


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


def random_picture(rng, width, height):
    """A smooth random RGB picture (a few blurred blobs), like a real input more than white noise is."""
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), resample=Image.BILINEAR)


def run_both(folder, sampler, picture, seed, **kwargs):
    final = {}

    def keep_latents(_pipe, _i, _t, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().numpy().copy()
        return {}

    theirs = torch_pipeline(folder, sampler, img2img=True)(
        image=picture, generator=torch.Generator().manual_seed(seed), output_type="np",
        callback_on_step_end=keep_latents, **kwargs)
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler=sampler)
    pipe.show_progress = False
    ours = pipe.img2img(image=picture, seed=seed, output_type="np", **kwargs)
    return ours, np.round(np.asarray(theirs.images) * 255).astype(np.int16), final["latents"]


@pytest.mark.parametrize("sampler", ["pndm", "euler_a", "heun", "dpm2_a", "dpmpp_2m_sde", "unipc"])
def test_same_picture_as_diffusers(folder, rng, seed, sampler):
    picture = random_picture(rng, 64, 64)
    strength = float(rng.uniform(0.35, 1.0))
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", strength=strength, num_inference_steps=5,
                  guidance_scale=float(rng.uniform(2.0, 9.0)))
    ours, theirs_levels, theirs_latents = run_both(folder, sampler, picture, seed, **kwargs)
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what=f"{sampler} img2img latents")
    worst = int(np.max(np.abs(np.round(ours.images * 255).astype(np.int16) - theirs_levels)))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"
    assert ours.parameters["strength"] == strength


def test_batch_odd_size_and_no_guidance(folder, rng, seed):
    """Two prompts x two pictures each from one input of a size that is no multiple of 8 (resized down)."""
    picture = random_picture(rng, 70, 37)
    kwargs = dict(prompt=["a red circle", "two blue squares"], strength=0.6, num_inference_steps=4,
                  guidance_scale=1.0, num_images_per_prompt=2)
    ours, theirs_levels, theirs_latents = run_both(folder, "euler_a", picture, seed, **kwargs)
    assert ours.images.shape == (4, 32, 64, 3)
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what="batched img2img latents")
    assert int(np.max(np.abs(np.round(ours.images * 255).astype(np.int16) - theirs_levels))) <= IMAGE_LEVELS_TOL


@pytest.mark.parametrize("sampler", ["pndm", "dpmpp_2m", "euler", "heun", "dpm2", "unipc", "deis"])
def test_timesteps_from_strength_like_diffusers(rng, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline
    from tiny_sd import SCHEDULER_CONFIG, diffusers_scheduler

    steps = int(rng.integers(1, 30))
    strength = float(rng.uniform(1.0 / steps, 1.0))
    theirs_scheduler = diffusers_scheduler(sampler, SCHEDULER_CONFIG)
    theirs_scheduler.set_timesteps(steps)
    holder = type("Holder", (), {"scheduler": theirs_scheduler})()
    theirs, theirs_count = StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
    ours_scheduler = make_scheduler(sampler, SCHEDULER_CONFIG)
    ours_scheduler.set_timesteps(steps)
    ours, ours_count = get_timesteps(ours_scheduler, steps, strength)
    assert ours_count == theirs_count
    np.testing.assert_allclose(np.asarray(ours, dtype=np.float64), theirs.numpy().astype(np.float64), rtol=1e-6)


def test_strength_leaving_no_step_is_refused(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    picture = Image.new("RGB", (64, 64))
    with pytest.raises(NpdiffError, match="leaves no denoising step"):
        pipe.img2img("x", picture, strength=0.1, num_inference_steps=5)
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(NpdiffError, match=r"strength must be in \(0, 1\]"):
            pipe.img2img("x", picture, strength=strength)
