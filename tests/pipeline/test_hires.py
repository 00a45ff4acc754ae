"""Hires fix against the diffusers calls it composes: txt2img(output_type="latent") -> torch's interpolate with
the same mode (webui's "Latent" modes use no antialias) -> img2img(image=latents) with the same torch.Generator
running on ("lanczos": the decoded picture, PIL's Lanczos, img2img(image=picture)). Pictures within 2 levels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close
from tiny_sd import tiny_sd_folder, torch_pipeline

from npdiff import NpdiffError
from npdiff.hires_names import HIRES_UPSCALERS
from npdiff.pipeline import StableDiffusionPipeline


@pytest.fixture(scope="module")
def folder():
    return tiny_sd_folder()


@pytest.fixture(scope="module")
def ours_pipe(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, scheduler="euler_a")
    pipe.show_progress = False
    return pipe


def diffusers_hires(first_pipe, second_pipe, seed, upscaler, scale, strength, hires_steps, **common):
    """The composed diffusers calls -> the second pass's pictures as 8-bit levels [B,H,W,3]."""
    generator = torch.Generator().manual_seed(seed)
    height, width = common.pop("height"), common.pop("width")
    steps = common.pop("num_inference_steps")
    factor = 2 ** (len(first_pipe.vae.config.block_out_channels) - 1)
    second_size = (int(height * scale) // factor, int(width * scale) // factor)  # latent cells, as webui
    mode = HIRES_UPSCALERS[upscaler][0]
    if mode is None:  # lanczos: pixels
        first = first_pipe(**common, height=height, width=width, num_inference_steps=steps, generator=generator,
                           output_type="pil").images[0]
        image = first.resize((second_size[1] * factor, second_size[0] * factor), Image.LANCZOS)
    else:
        latents = first_pipe(**common, height=height, width=width, num_inference_steps=steps, generator=generator,
                             output_type="latent").images
        image = F.interpolate(latents, size=second_size, mode=mode)  # antialias=False, as webui's "Latent" modes
    second = second_pipe(**common, image=image, strength=strength, num_inference_steps=hires_steps or steps,
                         generator=generator, output_type="np")
    return np.round(np.asarray(second.images) * 255).astype(np.int16)


@pytest.mark.parametrize("upscaler", list(HIRES_UPSCALERS))
def test_hires_matches_composed_diffusers_calls(folder, ours_pipe, rng, seed, upscaler):
    common = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=4, height=32, width=32,
                  guidance_scale=float(rng.uniform(2.0, 9.0)))
    scale, strength = (2.0, float(rng.uniform(0.4, 0.9)))
    hires_steps = int(rng.choice([0, 3, 4, 5]))  # 0: the first pass's 4; each keeps a step at strength >= 0.4
    first_pipe = torch_pipeline(folder, "euler_a")
    second_pipe = torch_pipeline(folder, "euler_a", img2img=True)
    theirs = diffusers_hires(first_pipe, second_pipe, seed, upscaler, scale, strength, hires_steps, **dict(common))
    ours = ours_pipe(**common, seed=seed, output_type="np", hires_scale=scale, hires_strength=strength,
                     hires_steps=hires_steps, hires_upscaler=upscaler)
    levels = np.round(ours.images * 255).astype(np.int16)
    assert levels.shape == theirs.shape == (1, 64, 64, 3)
    worst = int(np.max(np.abs(levels - theirs)))
    assert worst <= IMAGE_LEVELS_TOL, f"{upscaler}: 8-bit pictures differ by {worst} levels"
    # the parameters are the first pass's, with the hires settings (the img2img strength is not one of them)
    params = ours.parameters
    assert (params["height"], params["width"], params["steps"], params["seed"]) == (32, 32, 4, seed)
    assert params["hires_scale"] == scale and params["hires_strength"] == strength
    assert params["hires_steps"] == hires_steps and params["hires_upscaler"] == upscaler
    assert "strength" not in params and params["mode"] == "txt2img"


def test_hires_batch_and_odd_scale(folder, ours_pipe, rng, seed):
    """Two prompts x two pictures, scale 1.5 (64 -> 96 pixels), nearest-exact (where 1.5 makes it differ)."""
    common = dict(prompt=["a red circle", "two blue squares"], num_inference_steps=3, height=64, width=64,
                  guidance_scale=5.0, num_images_per_prompt=2)
    first_pipe = torch_pipeline(folder, "euler_a")
    second_pipe = torch_pipeline(folder, "euler_a", img2img=True)
    theirs = diffusers_hires(first_pipe, second_pipe, seed, "latent-nearest-exact", 1.5, 0.6, 3, **dict(common))
    ours = ours_pipe(**common, seed=seed, output_type="np", hires_scale=1.5, hires_strength=0.6, hires_steps=3,
                     hires_upscaler="latent-nearest-exact")
    levels = np.round(ours.images * 255).astype(np.int16)
    assert levels.shape == theirs.shape == (4, 96, 96, 3)
    assert int(np.max(np.abs(levels - theirs))) <= IMAGE_LEVELS_TOL


def test_img2img_from_latents_matches_diffusers(folder, ours_pipe, rng, seed):
    """img2img's image given as latents [B,4,h,w] is used as is, as diffusers' img2img does."""
    latents = rng.standard_normal((1, 4, 16, 16), dtype=np.float32)
    second_pipe = torch_pipeline(folder, "euler_a", img2img=True)
    final = {}

    def keep(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"].detach().numpy().copy()
        return {}

    second_pipe(prompt="a red circle", image=torch.from_numpy(latents), strength=0.7, num_inference_steps=4,
                generator=torch.Generator().manual_seed(seed), output_type="latent", callback_on_step_end=keep)
    ours = ours_pipe.img2img("a red circle", image=latents, strength=0.7, num_inference_steps=4, seed=seed,
                             output_type="latent")
    assert_rel_close(ours.latents, final["latents"], tol=NETWORK_TOL, what="img2img from latents")


def test_hires_bad_settings_refused_before_work(ours_pipe):
    calls = []
    callback = lambda *args: calls.append(args)  # noqa: E731
    for kwargs, message in [(dict(hires_scale=0.5), "hires_scale must be a number in"),
                            (dict(hires_scale=2, hires_upscaler="esrgan"), "hires_upscaler must be one of"),
                            (dict(hires_scale=2, hires_steps=-1), "hires_steps must be an integer >= 0"),
                            (dict(hires_scale=2, hires_strength=1.5), "strength"),
                            (dict(hires_scale=2, hires_strength=0.4, hires_steps=2), "leaves no denoising step"),
                            (dict(hires_scale=1.3), "hires_scale 1.3 turns 32x32 into 40x40")]:
        with pytest.raises(NpdiffError, match=message):
            ours_pipe("a red circle", height=32, width=32, num_inference_steps=2, callback=callback, **kwargs)
    assert calls == []


def test_sdxl_hires_matches_composed_diffusers_calls(seed):
    """SDXL: the same composition with diffusers' SDXL txt2img and img2img pipelines (bicubic latents)."""
    from sdxl_compare import load_ours, theirs_pipeline

    common = dict(prompt="a red circle", negative_prompt="blurry", num_inference_steps=3, height=64, width=64,
                  guidance_scale=5.0)
    theirs = diffusers_hires(theirs_pipeline("base", "txt2img"), theirs_pipeline("base", "img2img"), seed,
                             "latent-bicubic", 2.0, 0.5, 2, **dict(common))
    ours = load_ours("base")(**common, seed=seed, output_type="np", hires_scale=2.0, hires_strength=0.5,
                             hires_steps=2, hires_upscaler="latent-bicubic")
    levels = np.round(ours.images * 255).astype(np.int16)
    assert levels.shape == theirs.shape == (1, 128, 128, 3)
    assert int(np.max(np.abs(levels - theirs))) <= IMAGE_LEVELS_TOL
