"""StableDiffusionControlNetPipeline against diffusers' StableDiffusionControlNet(Img2Img/Inpaint)Pipeline on the
tiny random SD (tests/pipeline/tiny_sd.py) with tiny random ControlNets (tests/tiny_controlnet.py, zero
convolutions randomised): the same control pictures, prompt and seed -> final latents within relative 1e-4
and 8-bit pictures within 2 levels per pixel; one net and two, scales, guidance windows, guess mode; and
the control does change the picture."""

import numpy as np
import pytest
import torch
from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close
from PIL import Image
from tiny_controlnet import tiny_controlnet
from tiny_sd import diffusers_scheduler, tiny_sd_folder

from npdiff import NpdiffError
from npdiff.models import ControlNetModel
from npdiff.pipeline import StableDiffusionPipeline
from npdiff.pipeline_controlnet import StableDiffusionControlNetPipeline


def net_folders(kind="test", count=2):
    return [tiny_controlnet(tiny_sd_folder(kind=kind) / "unet", seed=10 + index)[1] for index in range(count)]


def theirs_pipeline(kind, mode, count, sampler):
    import diffusers

    class_name = {"txt2img": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline",
                  "inpaint": "StableDiffusionControlNetInpaintPipeline"}[mode]
    nets = [diffusers.ControlNetModel.from_pretrained(str(folder)) for folder in net_folders(kind, count)]
    pipe = getattr(diffusers, class_name).from_pretrained(
        str(tiny_sd_folder(kind=kind)), controlnet=nets[0] if count == 1 else nets, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, torch_dtype=torch.float32, local_files_only=True)
    pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_pipeline(kind, count, sampler):
    nets = [ControlNetModel.from_pretrained(folder) for folder in net_folders(kind, count)]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_folder(kind=kind),
                                                             controlnet=nets[0] if count == 1 else nets,
                                                             scheduler=sampler)
    pipe.show_progress = False
    return pipe


def edge_picture(rng, width=64, height=64):
    """A drawn control picture: white outlines of a random rectangle and a random disc on black."""
    picture = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = rng.integers(4, height // 2), rng.integers(4, width // 2)
    picture[top, left:left + 20] = picture[top + 20, left:left + 20] = 255
    picture[top:top + 21, left] = picture[top:top + 21, left + 20] = 255
    rows, cols = np.mgrid[:height, :width]
    radius = np.hypot(rows - rng.integers(16, height - 16), cols - rng.integers(16, width - 16))
    picture[np.abs(radius - 10) < 0.8] = 255
    return Image.fromarray(picture)


def compare(mode, rng, seed, count=1, sampler="euler_a", kind="test", **kwargs):
    final = {}

    def keep_latents(_pipe, _i, _t, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().numpy().copy()
        return {}

    call = dict(prompt="a red circle on a blue square", negative_prompt="blurry", num_inference_steps=4,
                guidance_scale=float(rng.uniform(3.0, 8.0)), **kwargs)
    theirs_pipe = theirs_pipeline(kind, mode, count, sampler)
    theirs = theirs_pipe(generator=torch.Generator().manual_seed(seed), output_type="np",
                         callback_on_step_end=keep_latents, **call)
    ours_pipe = ours_pipeline(kind, count, sampler)
    method = {"txt2img": ours_pipe, "img2img": ours_pipe.img2img, "inpaint": ours_pipe.inpaint}[mode]
    ours = method(seed=seed, output_type="np", **call)
    assert_rel_close(ours.latents, final["latents"], tol=NETWORK_TOL, what=f"{mode} ControlNet latents")
    theirs_levels = np.round(np.asarray(theirs.images) * 255).astype(np.int16)
    worst = int(np.max(np.abs(np.round(ours.images * 255).astype(np.int16) - theirs_levels)))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"
    return ours


@pytest.mark.parametrize("scale, guess_mode, window", [(1.0, False, (0.0, 1.0)), (0.7, True, (0.0, 1.0)),
                                                        (1.3, False, (0.25, 0.75))])
def test_one_net_matches_diffusers(rng, seed, scale, guess_mode, window):
    ours = compare("txt2img", rng, seed, image=edge_picture(rng), controlnet_conditioning_scale=scale,
                   guess_mode=guess_mode, control_guidance_start=window[0], control_guidance_end=window[1])
    assert ours.parameters["controlnets"][0]["scale"] == scale
    assert ours.parameters["guess_mode"] is guess_mode


def test_two_nets_matches_diffusers(rng, seed):
    compare("txt2img", rng, seed, count=2, sampler="dpmpp_2m", image=[edge_picture(rng), edge_picture(rng)],
            controlnet_conditioning_scale=[0.8, 1.2], control_guidance_start=[0.0, 0.5],
            control_guidance_end=[0.5, 1.0])


def test_img2img_and_inpaint_match_diffusers(rng, seed):
    picture = edge_picture(rng).convert("RGB").resize((64, 64))
    background = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    compare("img2img", rng, seed, image=background, control_image=picture, strength=0.7)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    compare("inpaint", rng, seed, sampler="ddim", image=background, mask_image=Image.fromarray(mask),
            control_image=picture, strength=0.9)


def test_the_control_changes_the_picture(rng, seed):
    pipe = ours_pipeline("test", 1, "euler")
    plain = StableDiffusionPipeline.from_pretrained(tiny_sd_folder(), scheduler="euler")
    plain.show_progress = False
    call = dict(prompt="a red circle", num_inference_steps=3, seed=seed, output_type="np")
    with_control = pipe(image=edge_picture(rng), **call).images
    without = plain(**call).images
    assert np.abs(with_control - without).max() > 10 / 255
    outside = pipe(image=edge_picture(rng), control_guidance_start=0.0, control_guidance_end=0.1, **call).images
    np.testing.assert_array_equal(outside, without)  # a window with no step: the UNet alone, exactly


def test_refusals(rng, tmp_path):
    pipe = ours_pipeline("test", 1, "euler")
    call = dict(prompt="a red circle", num_inference_steps=2, seed=1)
    with pytest.raises(NpdiffError, match="1 ControlNet"):
        pipe(image=[edge_picture(rng), edge_picture(rng)], **call)
    with pytest.raises(NpdiffError, match="control_guidance_start"):
        pipe(image=edge_picture(rng), control_guidance_start=0.6, control_guidance_end=0.5, **call)
    corrupt = tmp_path / "edges.png"
    edge_picture(rng).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:60])
    with pytest.raises(NpdiffError, match="control picture"):
        pipe(image=str(corrupt), **call)
    with pytest.raises(NpdiffError, match="expected a control picture"):
        pipe(image=np.zeros((8, 8)), **call)
    # a ControlNet made for another model: SD 2.x's text width and channels on the SD 1.x model
    other = ControlNetModel.from_pretrained(tiny_controlnet(tiny_sd_folder(kind="sd2") / "unet", seed=1)[1])
    with pytest.raises(NpdiffError, match="made for another model"):
        StableDiffusionControlNetPipeline.from_pretrained(tiny_sd_folder(), controlnet=other)


def test_resized_control_picture(rng, seed):
    """A control picture of another size than the picture is resized to it (Lanczos), as diffusers does."""
    compare("txt2img", rng, seed, image=edge_picture(rng, 96, 80), height=64, width=64)
