"""Inpainting against diffusers' StableDiffusionInpaintPipeline on tiny random models: a 9-channel inpainting
UNet (from a folder and from a single file) and an ordinary 4-channel UNet (the kept part blended back after
each step). Fresh random pictures, masks, strengths and seeds -> final latents within relative 1e-4 and 8-bit
pictures within 2 levels. Masks are prepared as diffusers' mask_processor does; bad input is refused."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close
from tiny_sd import tiny_sd_folder, torch_pipeline, write_as_single_file

from npdiff import NpdiffError, cli
from npdiff.images import mask_to_model_input, read_png_params
from npdiff.pipeline import StableDiffusionPipeline


def random_picture(rng, width, height):
    """A smooth random RGB picture (a few blurred blobs)."""
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), resample=Image.BILINEAR)


def random_mask(rng, width, height, mode="L"):
    """A random blobby mask (white = repaint) in PIL mode `mode`, with soft edges to binarize."""
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2), dtype=np.uint8)
    grey = Image.fromarray(coarse).resize((width, height), resample=Image.BICUBIC)
    return grey.convert(mode)


def npdiff_pipe(model):
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.show_progress = False
    return pipe


def run_both(folder, sampler, seed, ours_model=None, **kwargs):
    """-> (npdiff's output, diffusers' 8-bit pictures, diffusers' final latents)."""
    final = {}

    def keep_latents(_pipe, _i, _t, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().numpy().copy()
        return {}

    theirs = torch_pipeline(folder, sampler, inpaint=True)(
        generator=torch.Generator().manual_seed(seed), output_type="np", callback_on_step_end=keep_latents, **kwargs)
    pipe = npdiff_pipe(ours_model or folder)
    pipe.set_scheduler(sampler)
    ours = pipe.inpaint(seed=seed, output_type="np", **kwargs)
    return ours, np.round(np.asarray(theirs.images) * 255).astype(np.int16), final["latents"]


def assert_same(ours, theirs_levels, theirs_latents, what):
    assert_rel_close(ours.latents, theirs_latents, tol=NETWORK_TOL, what=f"{what} latents")
    worst = int(np.max(np.abs(np.round(ours.images * 255).astype(np.int16) - theirs_levels)))
    assert worst <= IMAGE_LEVELS_TOL, f"{what}: 8-bit pictures differ by {worst} levels"


@pytest.mark.parametrize("kind,sampler,strength", [("inpaint", "pndm", 1.0), ("inpaint", "euler_a", None),
                                                   ("test", "euler_a", 1.0), ("test", "dpmpp_2m", None)])
def test_same_picture_as_diffusers(rng, seed, kind, sampler, strength):
    """kind "inpaint": 9-channel UNet; "test": 4-channel UNet. The picture is resized to the model's 64x64."""
    width, height = (int(v) for v in rng.integers(5, 12, size=2) * 8)
    mode = str(rng.choice(["L", "RGB", "1", "RGBA"]))
    strength = float(rng.uniform(0.4, 1.0)) if strength is None else strength
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", image=random_picture(rng, width, height),
                  mask_image=random_mask(rng, width, height, mode), strength=strength, num_inference_steps=3,
                  guidance_scale=float(rng.uniform(2.0, 9.0)))
    ours, theirs_levels, theirs_latents = run_both(tiny_sd_folder(kind=kind), sampler, seed, **kwargs)
    assert ours.images.shape == (1, 64, 64, 3)
    assert_same(ours, theirs_levels, theirs_latents, f"{kind} {sampler} mask {mode} strength {strength:.2f}")
    assert ours.parameters["mode"] == "inpaint" and ours.parameters["strength"] == strength


@pytest.mark.parametrize("kind", ["inpaint", "test"])
def test_batch_array_mask_and_size_without_guidance(rng, seed, kind):
    """Two prompts x two pictures, a float array mask, 32x64 asked for a 40x56 picture, no guidance."""
    picture = random_picture(rng, 40, 56)
    mask = np.asarray(random_mask(rng, 40, 56), dtype=np.float32) / 255  # [56,40] in [0,1]
    kwargs = dict(prompt=["a red circle", "two blue squares"], image=picture, mask_image=mask, height=64, width=32,
                  num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2, strength=0.7)
    ours, theirs_levels, theirs_latents = run_both(tiny_sd_folder(kind=kind), "euler", seed, **kwargs)
    assert ours.images.shape == (4, 64, 32, 3)
    assert_same(ours, theirs_levels, theirs_latents, f"{kind} batched")


@pytest.mark.parametrize("fill", [0, 255])
def test_empty_and_all_white_masks_like_diffusers(rng, seed, fill):
    picture = random_picture(rng, 64, 64)
    mask = Image.new("L", (64, 64), fill)
    ours, theirs_levels, theirs_latents = run_both(tiny_sd_folder(), "ddim", seed, prompt="x", image=picture,
                                                   mask_image=mask, num_inference_steps=3, strength=0.9)
    assert_same(ours, theirs_levels, theirs_latents, f"mask all {fill}")


def test_single_file_inpainting_unet(tmp_path, seed):
    """in_channels = 9 is read from the weights (conv_in) of a CompVis-layout file."""
    folder = tiny_sd_folder(kind="inpaint_sd_constants")
    checkpoint = write_as_single_file(folder, tmp_path / "tiny-inpaint.safetensors")
    rng = np.random.default_rng(seed)
    kwargs = dict(prompt="a red circle", image=random_picture(rng, 64, 64), mask_image=random_mask(rng, 64, 64),
                  num_inference_steps=3, strength=0.8, height=64, width=64)  # a single file says no size: 512
    ours, theirs_levels, theirs_latents = run_both(folder, "pndm", seed, ours_model=checkpoint, **kwargs)
    assert_same(ours, theirs_levels, theirs_latents, "single-file inpainting UNet")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1", "P", "LA", "F", "float-array", "float-array-1"])
def test_masks_prepared_as_diffusers(rng, mode):
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    size = tuple(int(v) for v in rng.integers(20, 90, size=2))
    target = tuple(int(v) for v in rng.integers(2, 9, size=2) * 8)
    mask = random_mask(rng, *size, mode="L")
    if mode.startswith("float-array"):
        mask = np.asarray(mask, dtype=np.float32) / 255
        mask = mask[..., None] if mode.endswith("-1") else mask
    elif mode != "L":
        mask = mask.convert(mode)
    theirs = processor.preprocess(mask, height=target[0], width=target[1]).numpy()
    ours = mask_to_model_input(mask, *target)
    assert ours.shape == (1, 1) + target and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def test_bad_input(rng):
    pipe = npdiff_pipe(tiny_sd_folder(kind="inpaint"))
    picture, mask = random_picture(rng, 64, 64), random_mask(rng, 64, 64)
    for call in (lambda: pipe("x", num_inference_steps=1), lambda: pipe.img2img("x", picture)):
        with pytest.raises(NpdiffError, match=r"takes 9 input channels .*use pipe\.inpaint"):
            call()
    with pytest.raises(NpdiffError, match="image is 64x64 pixels but mask_image is 48x40"):
        pipe.inpaint("x", picture, random_mask(rng, 48, 40))
    for strength in (0.0, 1.5, -1):
        with pytest.raises(NpdiffError, match=rf"strength must be in \(0, 1\], got {strength}"):
            pipe.inpaint("x", picture, mask, strength=strength)
    for bad, message in [("mask.png", "not a path"), ([mask], "expected a PIL image or a numpy array, got list"),
                         (np.zeros((64, 64, 2)), r"shape \(64, 64, 2\)"), (np.full((64, 64), 2.0), r"in \[0, 1\]"),
                         (np.zeros((64, 64), np.int32), "got int32")]:
        with pytest.raises(NpdiffError, match=message):
            pipe.inpaint("x", picture, bad)
    # the size rule (picture_size.size_rule): 8-pixel VAE cells x 2 UNet halvings = 32 for this model
    with pytest.raises(NpdiffError, match=r"height must be a multiple of 32 pixels .*got 60"):
        pipe.inpaint("x", picture, mask, height=60)


def test_cli_inpaint_and_reproduce(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(5)
    random_picture(rng, 64, 64).save("source.png")
    random_mask(rng, 64, 64).save("holes.png")
    folder = tiny_sd_folder(kind="inpaint")
    assert cli.main(["inpaint", "two squares", "--image", "source.png", "--mask", str(tmp_path / "holes.png"),
                     "--strength", "0.75", "--steps", "3", "--seed", "4", "--model", str(folder),
                     "--out", "out.png"]) == 0
    params = read_png_params("out.png")
    assert params["mode"] == "inpaint" and params["command"] == "inpaint" and params["strength"] == 0.75
    assert "image" not in params and "mask" not in params  # a PNG names no input file
    with Image.open("source.png") as picture, Image.open("holes.png") as mask:
        library = npdiff_pipe(folder).inpaint("two squares", picture, mask, strength=0.75, num_inference_steps=3,
                                              guidance_scale=7.5, seed=4)
    with Image.open("out.png") as written:
        assert np.array_equal(np.asarray(written), np.asarray(library.images[0]))
    assert cli.main(["inpaint", "--reproduce", "out.png", "--model", str(folder), "--out", "again.png"]) == 2
    assert cli.main(["inpaint", "--reproduce", "out.png", "--image", "source.png", "--mask", "holes.png",
                     "--model", str(folder), "--out", "again.png"]) == 0
    with Image.open("out.png") as first, Image.open("again.png") as again:
        assert np.array_equal(np.asarray(first), np.asarray(again))
    assert cli.main(["inpaint", "x", "--image", "source.png", "--model", str(folder)]) == 2
