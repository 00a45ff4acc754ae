"""SDXL image-to-image, the refiner, base + refiner ("ensemble of experts") and inpainting against diffusers'
StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline on tiny random SDXLs: same seed -> final
latents within relative 1e-4, 8-bit pictures within 2 levels per pixel."""

import numpy as np
import pytest

from sdxl_compare import PROMPTS, assert_same, load_ours, random_mask, random_picture, run_theirs


def test_img2img_strength(rng, seed):
    picture = random_picture(rng)
    kwargs = dict(prompt=PROMPTS[0], prompt_2=PROMPTS[3], image=picture, strength=float(rng.uniform(0.4, 0.9)),
                  num_inference_steps=5, guidance_scale=6.0, negative_prompt="grey")
    theirs_levels, theirs_latents = run_theirs("base", "img2img", seed, **kwargs)
    ours = load_ours("base").img2img(seed=seed, output_type="np", **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, "img2img")
    assert ours.parameters["mode"] == "img2img" and ours.parameters["strength"] == kwargs["strength"]


def test_refiner_aesthetic_score(rng, seed):
    """A refiner (text_encoder_2 alone, 5 time ids with the aesthetic score, no zeroed negative) on a picture."""
    kwargs = dict(prompt=PROMPTS[1], image=random_picture(rng), strength=0.5, num_inference_steps=4,
                  guidance_scale=5.0, aesthetic_score=float(rng.uniform(4, 9)),
                  negative_aesthetic_score=float(rng.uniform(1, 4)), original_size=(512, 768),
                  crops_coords_top_left=(8, 16))
    theirs_levels, theirs_latents = run_theirs("refiner", "img2img", seed, **kwargs)
    pipe = load_ours("refiner")
    assert pipe.text_encoder is None and pipe.requires_aesthetics_score and not pipe.force_zeros_for_empty_prompt
    ours = pipe.img2img(seed=seed, output_type="np", **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, "refiner")
    assert ours.parameters["aesthetic_score"] == kwargs["aesthetic_score"]


def test_base_and_refiner_ensemble(seed):
    """The base runs the first 70% of the schedule and hands its latents to the refiner, which runs the rest
    (diffusers' denoising_end / denoising_start)."""
    steps, split = 6, 0.7
    base_kwargs = dict(prompt=PROMPTS[2], num_inference_steps=steps, guidance_scale=5.0, denoising_end=split)
    _, theirs_handoff = run_theirs("base", "txt2img", seed, output_type="latent", **base_kwargs)
    ours_handoff = load_ours("base")(seed=seed, output_type="latent", **base_kwargs)
    assert_same(ours_handoff, None, theirs_handoff, "base part")

    import torch

    refine_kwargs = dict(prompt=PROMPTS[2], num_inference_steps=steps, guidance_scale=5.0, denoising_start=split)
    theirs_levels, theirs_latents = run_theirs("refiner", "img2img", seed + 1, image=torch.from_numpy(theirs_handoff),
                                               **refine_kwargs)
    ours = load_ours("refiner").img2img(image=ours_handoff.latents, seed=seed + 1, output_type="np", **refine_kwargs)
    assert_same(ours, theirs_levels, theirs_latents, "refiner part")
    assert ours.parameters["denoising_start"] == split


@pytest.mark.parametrize("kind, strength", [("base", 0.6), ("inpaint", None), ("inpaint", 1.0)])
def test_inpaint(rng, seed, kind, strength):
    """A plain 4-channel SDXL UNet (kept part put back each step) and a 9-channel inpainting UNet, at diffusers'
    default strength 0.9999 (None), at 1 (pure noise) and at a lower one."""
    kwargs = dict(prompt=PROMPTS[3], image=random_picture(rng), mask_image=random_mask(rng), num_inference_steps=3,
                  guidance_scale=6.0)
    if strength is not None:
        kwargs["strength"] = strength
    theirs_levels, theirs_latents = run_theirs(kind, "inpaint", seed, **kwargs)
    ours = load_ours(kind).inpaint(seed=seed, output_type="np", **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, f"inpaint {kind} strength {strength}")
    assert ours.parameters["strength"] == (0.9999 if strength is None else strength)


def test_refiner_text_to_image_is_refused():
    from npdiff.errors import NpdiffError

    with pytest.raises(NpdiffError, match="refiner.*img2img"):
        load_ours("refiner")("a red circle", num_inference_steps=2)


def test_latents_as_image_need_matching_channels(rng):
    from npdiff.errors import NpdiffError

    with pytest.raises(NpdiffError, match=r"latents must have shape \[b,4,h,w\]"):
        load_ours("refiner").img2img("a cat", image=np.zeros((1, 3, 8, 8), np.float32), denoising_start=0.5)
    with pytest.raises(NpdiffError, match="denoising_start 0.8 must be smaller than denoising_end 0.5"):
        load_ours("refiner").img2img("a cat", image=random_picture(rng), denoising_start=0.8, denoising_end=0.5)


@pytest.mark.parametrize("kind", ["base", "inpaint"])
def test_inpaint_base_and_refiner_ensemble(rng, seed, kind):
    """diffusers' inpainting ensemble of experts: the base's StableDiffusionXLInpaintPipeline (a 4-channel UNet, or
    a 9-channel inpainting one) runs to denoising_end with latents out; the refiner's inpaint takes those latents
    as its image (no VAE encoder, no masked picture) and the same mask from denoising_start."""
    import torch

    split = round(float(rng.uniform(0.5, 0.8)), 2)
    shared = dict(prompt=PROMPTS[0], mask_image=random_mask(rng), num_inference_steps=5, guidance_scale=6.0)
    picture = random_picture(rng)
    _, theirs_handoff = run_theirs(kind, "inpaint", seed, output_type="latent", image=picture, denoising_end=split,
                                   **shared)
    ours_handoff = load_ours(kind).inpaint(image=picture, seed=seed, output_type="latent", denoising_end=split,
                                           **shared)
    assert_same(ours_handoff, None, theirs_handoff, f"{kind} inpaint part")
    theirs_levels, theirs_latents = run_theirs("refiner", "inpaint", seed + 1, image=torch.from_numpy(theirs_handoff),
                                               denoising_start=split, aesthetic_score=7.0, **shared)
    ours = load_ours("refiner").inpaint(image=ours_handoff.latents, seed=seed + 1, output_type="np",
                                        denoising_start=split, aesthetic_score=7.0, **shared)
    assert_same(ours, theirs_levels, theirs_latents, f"refiner inpaint after {kind}")
    assert ours.parameters["denoising_start"] == split and ours.parameters["mode"] == "inpaint"


def test_inpaint_latents_need_a_plain_unet_and_their_size(rng):
    from npdiff.errors import NpdiffError

    latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    with pytest.raises(NpdiffError, match="9 input channels.*give it the picture, not latents"):
        load_ours("inpaint").inpaint("a cat", image=latents, mask_image=random_mask(rng), denoising_start=0.5)
    with pytest.raises(NpdiffError, match="latents is 64x64 pixels .* works at 128x64"):
        load_ours("refiner").inpaint("a cat", image=latents, mask_image=random_mask(rng), denoising_start=0.5,
                                     height=64, width=128)
