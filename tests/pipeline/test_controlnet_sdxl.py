"""StableDiffusionXLControlNetPipeline against diffusers' on the tiny random SDXL (tests/pipeline/tiny_sdxl.py)
with tiny random SDXL ControlNets (tests/tiny_controlnet.py, zero convolutions randomised): final latents
within relative 1e-4 and 8-bit pictures within 2 levels per pixel, one net and two, guess mode, a window, img2img;
an SD 1.x ControlNet on the SDXL model is refused."""

import numpy as np
import pytest
import torch
from helpers import IMAGE_LEVELS_TOL, NETWORK_TOL, assert_rel_close
from test_controlnet_sd import edge_picture
from tiny_controlnet import tiny_controlnet
from tiny_sd import tiny_sd_folder
from tiny_sdxl import tiny_sdxl_folder

from npdiff import NpdiffError
from npdiff.models import ControlNetModel
from npdiff.pipeline_controlnet_sdxl import StableDiffusionXLControlNetPipeline


def net_folders(count):
    return [tiny_controlnet(tiny_sdxl_folder("base") / "unet", seed=20 + index)[1] for index in range(count)]


def compare(rng, seed, count, mode="txt2img", kind="base", **kwargs):
    import diffusers

    final = {}

    def keep_latents(_pipe, _i, _t, callback_kwargs):
        final["latents"] = callback_kwargs["latents"].detach().numpy().copy()
        return {}

    torch_nets = [diffusers.ControlNetModel.from_pretrained(str(folder)) for folder in net_folders(count)]
    theirs_class = {"txt2img": diffusers.StableDiffusionXLControlNetPipeline,
                    "img2img": diffusers.StableDiffusionXLControlNetImg2ImgPipeline,
                    "inpaint": diffusers.StableDiffusionXLControlNetInpaintPipeline}[mode]
    theirs_pipe = theirs_class.from_pretrained(
        str(tiny_sdxl_folder(kind)), controlnet=torch_nets[0] if count == 1 else torch_nets,
        torch_dtype=torch.float32, local_files_only=True, add_watermarker=False)
    theirs_pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle on a blue square", negative_prompt="blurry", num_inference_steps=4,
                guidance_scale=float(rng.uniform(3.0, 8.0)), **kwargs)
    theirs = theirs_pipe(generator=torch.Generator().manual_seed(seed), output_type="np",
                         callback_on_step_end=keep_latents, **call)
    nets = [ControlNetModel.from_pretrained(folder) for folder in net_folders(count)]
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_folder(kind),
                                                               controlnet=nets[0] if count == 1 else nets)
    pipe.show_progress = False
    ours = {"txt2img": pipe, "img2img": pipe.img2img, "inpaint": pipe.inpaint}[mode](seed=seed, output_type="np",
                                                                                   **call)
    assert_rel_close(ours.latents, final["latents"], tol=NETWORK_TOL, what="SDXL ControlNet latents")
    theirs_levels = np.round(np.asarray(theirs.images) * 255).astype(np.int16)
    worst = int(np.max(np.abs(np.round(ours.images * 255).astype(np.int16) - theirs_levels)))
    assert worst <= IMAGE_LEVELS_TOL, f"8-bit pictures differ by {worst} levels"
    return ours


@pytest.mark.parametrize("guess_mode", [False, True])
def test_one_net_matches_diffusers(rng, seed, guess_mode):
    compare(rng, seed, 1, image=edge_picture(rng), controlnet_conditioning_scale=0.9, guess_mode=guess_mode)


def test_two_nets_matches_diffusers(rng, seed):
    compare(rng, seed, 2, image=[edge_picture(rng), edge_picture(rng)], controlnet_conditioning_scale=[1.1, 0.6],
            control_guidance_end=[1.0, 0.5])


def test_sd_net_on_sdxl_is_refused():
    sd_net = ControlNetModel.from_pretrained(tiny_controlnet(tiny_sd_folder() / "unet", seed=10)[1])
    with pytest.raises(NpdiffError, match="made for another model"):
        StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_folder("base"), controlnet=sd_net)


def test_img2img_matches_diffusers(rng, seed):
    from PIL import Image

    background = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    compare(rng, seed, 1, mode="img2img", image=background, control_image=edge_picture(rng), strength=0.7)


def inpaint_inputs(rng, height, width):
    """A random picture and a mask whose white rectangle is to be repainted, both height x width."""
    from PIL import Image

    background = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), dtype=np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[top:top + height // 2, left:left + width // 2] = 255
    return background, Image.fromarray(mask)


@pytest.mark.parametrize("kind", ["base", "inpaint"])  # a 4-channel UNet (kept part put back) and a 9-channel one
def test_inpaint_matches_diffusers(rng, seed, kind):
    """diffusers' StableDiffusionXLControlNetInpaintPipeline; a 48x64 picture: the call's size is the picture's."""
    background, mask = inpaint_inputs(rng, 48, 64)
    ours = compare(rng, seed, 1, mode="inpaint", kind=kind, image=background, mask_image=mask,
                   control_image=edge_picture(rng, width=64, height=48), strength=float(rng.uniform(0.6, 1.0)),
                   controlnet_conditioning_scale=0.8, guess_mode=kind == "inpaint")
    assert ours.images.shape[1:3] == (48, 64)
