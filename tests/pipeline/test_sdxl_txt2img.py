"""SDXL text-to-image against diffusers' StableDiffusionXLPipeline on a tiny random SDXL (tests/pipeline/tiny_sdxl.py):
same arguments and seed (a CPU torch.Generator on their side) -> final latents within relative 1e-4, 8-bit pictures
within 2 levels per pixel."""

import numpy as np
import pytest

from sdxl_compare import PROMPTS, assert_same, load_ours, run_theirs


def test_prompt_2_and_negatives(rng, seed):
    """Both prompts and both negative prompts, a random guidance and step count (Euler, SDXL's own scheduler)."""
    kwargs = dict(prompt=PROMPTS[int(rng.integers(4))], prompt_2=PROMPTS[int(rng.integers(4))],
                  negative_prompt="blurry, low quality", negative_prompt_2="text, watermark",
                  num_inference_steps=int(rng.integers(2, 5)), guidance_scale=float(rng.uniform(2.0, 9.0)))
    theirs_levels, theirs_latents = run_theirs("base", "txt2img", seed, **kwargs)
    ours = load_ours("base")(seed=seed, output_type="np", **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, "prompt_2 + negatives")
    assert ours.parameters["prompt_2"] == kwargs["prompt_2"]
    assert ours.parameters["negative_prompt_2"] == kwargs["negative_prompt_2"]
    assert ours.parameters["sampler"] == "euler" and ours.images.shape == (1, 64, 64, 3)


def test_micro_conditioning_batch(rng, seed):
    """original_size, crops_coords_top_left, target_size and the negative ones, two prompts x two pictures
    (diffusers' text-to-image lines its [negative, positive] time ids up pairwise: followed exactly)."""
    def pair(low, high):
        return (int(rng.integers(low, high)), int(rng.integers(low, high)))

    kwargs = dict(prompt=PROMPTS[:2], negative_prompt=["dark", "bright"], num_inference_steps=2, guidance_scale=5.0,
                  num_images_per_prompt=2, height=64, width=32, original_size=pair(256, 2048),
                  crops_coords_top_left=pair(0, 300), target_size=pair(256, 2048),
                  negative_original_size=pair(256, 2048), negative_crops_coords_top_left=pair(0, 300),
                  negative_target_size=pair(256, 2048))
    theirs_levels, theirs_latents = run_theirs("base", "txt2img", seed, **kwargs)
    ours = load_ours("base")(seed=seed, output_type="np", **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, "micro-conditioning")
    assert ours.images.shape == (4, 64, 32, 3)
    assert ours.parameters["original_size"] == list(kwargs["original_size"])
    assert ours.parameters["crops_coords_top_left"] == list(kwargs["crops_coords_top_left"])


@pytest.mark.parametrize("negative_prompt", [None, ""])
def test_empty_negative_prompt(seed, negative_prompt):
    """No negative prompt: force_zeros_for_empty_prompt (True for a base) guides against zeros; an explicit ""
    is encoded. Both as diffusers, and they differ."""
    kwargs = dict(prompt=PROMPTS[3], num_inference_steps=2, guidance_scale=7.0, negative_prompt=negative_prompt)
    theirs_levels, theirs_latents = run_theirs("base", "txt2img", seed, **kwargs)
    pipe = load_ours("base")
    assert pipe.force_zeros_for_empty_prompt is True
    ours = pipe(seed=seed, output_type="np", **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, f"negative_prompt={negative_prompt!r}")
    other = pipe(seed=seed, output_type="latent", **dict(kwargs, negative_prompt="" if negative_prompt is None else None))
    assert not np.allclose(other.latents, ours.latents)


def test_turbo_trailing_no_guidance(seed):
    """SDXL-Turbo's way: Euler ancestral with timestep_spacing "trailing", 1 step, guidance 0 (no unconditional pass)."""
    from diffusers import EulerAncestralDiscreteScheduler

    from npdiff.schedulers import EulerAncestralDiscreteScheduler as OurEulerA

    for steps in (1, 2):
        theirs_scheduler = EulerAncestralDiscreteScheduler.from_config(
            dict(load_ours("base").scheduler_config, timestep_spacing="trailing"))
        kwargs = dict(prompt=PROMPTS[0], num_inference_steps=steps, guidance_scale=0.0)
        theirs_levels, theirs_latents = run_theirs("base", "txt2img", seed, scheduler=theirs_scheduler, **kwargs)
        pipe = load_ours("base")
        pipe.set_scheduler(OurEulerA.from_config(dict(pipe.scheduler_config, timestep_spacing="trailing")))
        calls = []
        unet = pipe.unet
        pipe.unet = lambda sample, *args, **kw: calls.append(sample.shape[0]) or unet(sample, *args, **kw)
        pipe.unet.config = unet.config
        ours = pipe(seed=seed, output_type="np", **kwargs)
        assert calls == [1] * steps
        assert_same(ours, theirs_levels, theirs_latents, f"turbo {steps} step(s)")


def test_denoising_end_latents(seed):
    """denoising_end stops part-way; output_type="latent" gives the (noisy) latents a refiner takes."""
    kwargs = dict(prompt=PROMPTS[1], num_inference_steps=6, guidance_scale=5.0, denoising_end=0.6)
    _, theirs_latents = run_theirs("base", "txt2img", seed, output_type="latent", **kwargs)
    ours = load_ours("base")(seed=seed, output_type="latent", **kwargs)
    assert ours.images is None
    assert_same(ours, None, theirs_latents, "denoising_end")
    assert ours.parameters["denoising_end"] == 0.6


@pytest.mark.parametrize("sampler", ["pndm", "ddim", "ddpm", "lms", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "tcd"])
def test_every_sampler(seed, sampler):
    """set_scheduler(name) builds the sampler from SDXL's scheduler config, as diffusers' from_config does."""
    from tiny_sd import diffusers_scheduler

    pipe = load_ours("base", scheduler=sampler)
    kwargs = dict(prompt=PROMPTS[2], num_inference_steps=2, guidance_scale=4.0)
    theirs_levels, theirs_latents = run_theirs("base", "txt2img", seed,
                                               scheduler=diffusers_scheduler(sampler, pipe.scheduler_config), **kwargs)
    ours = pipe(seed=seed, output_type="np", **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, sampler)
