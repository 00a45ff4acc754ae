"""npdiff generate/img2img/inpaint --control with an SDXL model: the picture is diffusers' StableDiffusionXLControlNet(Img2Img/Inpaint)
Pipeline's from the same seed on the tiny random SDXL and a tiny random SDXL ControlNet (within 2 levels per
pixel), the PNG names the net as for SD; an SD 1.x net on an SDXL model (and the reverse) is refused by name
before the model loads."""

import numpy as np
import pytest
import torch
from helpers import IMAGE_LEVELS_TOL, pixels
from PIL import Image
from test_controlnet_sd import edge_picture
from test_controlnet_sd import net_folders as sd_net_folders
from test_controlnet_sdxl import net_folders
from tiny_sd import tiny_sd_folder
from tiny_sdxl import tiny_sdxl_folder

from npdiff import cli
from npdiff.images import png_text_chunks, read_png_params

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


def theirs_pipeline(mode):
    """diffusers' SDXL ControlNet pipeline of `mode` ("txt2img", "img2img", "inpaint") with one tiny net."""
    import diffusers

    class_name = {"txt2img": "StableDiffusionXLControlNetPipeline",
                  "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
                  "inpaint": "StableDiffusionXLControlNetInpaintPipeline"}[mode]
    net = diffusers.ControlNetModel.from_pretrained(str(net_folders(1)[0]))
    pipe = getattr(diffusers, class_name).from_pretrained(str(tiny_sdxl_folder("base")), controlnet=net,
                                                         torch_dtype=torch.float32, local_files_only=True,
                                                         add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_like_diffusers(out, theirs):
    theirs_levels = np.round(np.asarray(theirs.images[0]) * 255).astype(np.int16)
    worst = int(np.abs(pixels(out).astype(np.int16) - theirs_levels).max())
    assert worst <= IMAGE_LEVELS_TOL, f"npdiff --control on SDXL differs from diffusers by {worst} levels"


def test_generate_with_control_like_diffusers(tmp_path, rng, seed):
    net_folder = net_folders(1)[0]
    edges = tmp_path / "edges.png"
    edge_picture(rng).save(edges)
    out = tmp_path / "out.png"
    scale = float(np.round(rng.uniform(0.5, 1.5), 2))
    assert cli.main(["generate", "a red circle", "--model", str(tiny_sdxl_folder("base")), "--steps", "3", "--seed",
                     str(seed), "--control", f"{net_folder}:{edges}:{scale}", "--control-end", "0.7",
                     "--out", str(out)]) == 0
    theirs = theirs_pipeline("txt2img")("a red circle", image=Image.open(edges), num_inference_steps=3,
                                        guidance_scale=7.5, controlnet_conditioning_scale=scale,
                                        control_guidance_end=0.7, generator=torch.Generator().manual_seed(seed),
                                        output_type="np")
    assert_like_diffusers(out, theirs)
    params = read_png_params(out)
    (net,) = params["controlnets"]
    assert net["name"] == net_folder.name and net["scale"] == scale and net["end"] == 0.7
    assert f'ControlNet 0: "Module: none, Model: {net_folder.name} [{net["sha256"][:8]}]' in \
        png_text_chunks(out)["parameters"]


def test_img2img_with_control_like_diffusers(tmp_path, rng, seed):
    net_folder = net_folders(1)[0]
    edges, source = tmp_path / "edges.png", tmp_path / "source.png"
    edge_picture(rng).save(edges)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    out = tmp_path / "out.png"
    assert cli.main(["img2img", "a blue square", "--model", str(tiny_sdxl_folder("base")), "--image", str(source),
                     "--strength", "0.6", "--steps", "4", "--seed", str(seed), "--guess-mode",
                     "--control", f"{net_folder}:{edges}:0.8", "--out", str(out)]) == 0
    theirs = theirs_pipeline("img2img")("a blue square", image=Image.open(source), control_image=Image.open(edges),
                                        strength=0.6, num_inference_steps=4, guidance_scale=7.5,
                                        controlnet_conditioning_scale=0.8, guess_mode=True,
                                        generator=torch.Generator().manual_seed(seed), output_type="np")
    assert_like_diffusers(out, theirs)
    assert read_png_params(out)["guess_mode"] is True


@pytest.mark.parametrize("model_kind, net_kind, message", [
    ("sdxl", "sd", "an SD 1.x/2.x ControlNet .* but the model .* is SDXL"),
    ("sd", "sdxl", "an SDXL ControlNet .* but the model .* is SD 1.x/2.x")])
def test_net_of_the_other_family_is_refused(tmp_path, rng, capsys, monkeypatch, model_kind, net_kind, message):
    import re

    from npdiff import pipeline_sdxl

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the ControlNet was refused")

    monkeypatch.setattr(pipeline_sdxl.StableDiffusionXLPipeline, "from_pretrained", must_not_load)
    monkeypatch.setattr(pipeline_sdxl.StableDiffusionPipeline, "from_pretrained", must_not_load)
    model = tiny_sdxl_folder("base") if model_kind == "sdxl" else tiny_sd_folder()
    net_folder = (net_folders(1) if net_kind == "sdxl" else sd_net_folders(count=1))[0]
    edges = tmp_path / "edges.png"
    edge_picture(rng).save(edges)
    code = cli.main(["generate", "x", "--model", str(model), "--control", f"{net_folder}:{edges}",
                     "--out", str(tmp_path / "o.png")])
    assert code != 0
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o.png").exists()


def test_inpaint_with_control_like_diffusers(tmp_path, rng, seed):
    """npdiff inpaint --control on SDXL: diffusers' StableDiffusionXLControlNetInpaintPipeline (strength 1, the
    command's default)."""
    net_folder = net_folders(1)[0]
    edges, source, mask = tmp_path / "edges.png", tmp_path / "source.png", tmp_path / "mask.png"
    edge_picture(rng).save(edges)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    mask_pixels = np.zeros((64, 64), dtype=np.uint8)
    mask_pixels[16:48, rng.integers(0, 32):][:, :32] = 255
    Image.fromarray(mask_pixels).save(mask)
    out = tmp_path / "out.png"
    assert cli.main(["inpaint", "a green square", "--model", str(tiny_sdxl_folder("base")), "--image", str(source),
                     "--mask", str(mask), "--steps", "3", "--seed", str(seed), "--control", f"{net_folder}:{edges}:0.9",
                     "--out", str(out)]) == 0
    theirs = theirs_pipeline("inpaint")("a green square", image=Image.open(source), mask_image=Image.open(mask),
                                        control_image=Image.open(edges), strength=1.0, num_inference_steps=3,
                                        guidance_scale=7.5, controlnet_conditioning_scale=0.9,
                                        generator=torch.Generator().manual_seed(seed), output_type="np")
    assert_like_diffusers(out, theirs)
    assert read_png_params(out)["command"] == "inpaint"
