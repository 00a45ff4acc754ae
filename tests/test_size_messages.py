"""A picture too large for the model (its self-attention limit, the free memory, a hires second pass) is refused
naming what the caller used: the Python API its keywords (height=/width=, image=, hires_scale=,
num_images_per_prompt=), the CLI its flags (--height/--width, --image, --hires-scale). No pipeline call's
message names a CLI flag. On the shipped model (16-pixel sides, attention up to 1024x1024) and its ControlNet,
and a tiny random SDXL."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "pipeline"))
from shipped import MODEL_DIR  # noqa: E402
from tiny_sdxl import tiny_sdxl_folder  # noqa: E402

from npdiff import cli, memory_estimate  # noqa: E402
from npdiff.errors import NpdiffError  # noqa: E402
from npdiff.memory_estimate import MAX_ATTENTION_TOKENS, largest_attention_tokens  # noqa: E402
from npdiff.models import ControlNetModel  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.pipeline_controlnet import StableDiffusionControlNetPipeline  # noqa: E402
from npdiff.pipeline_sdxl import StableDiffusionXLPipeline  # noqa: E402
from npdiff.picture_size import size_rule  # noqa: E402

pytestmark = pytest.mark.usefixtures("hash_cache")  # model hashes cached in a test's own folder (conftest)


def too_wide(pipe, height):
    """The narrowest width past the model's attention limit at `height`, a multiple of its size rule."""
    multiple, _ = size_rule(pipe.unet.config, pipe.vae_scale_factor)
    width = multiple
    while largest_attention_tokens(pipe.unet.config, pipe.vae_scale_factor, height, width)[0] <= MAX_ATTENTION_TOKENS:
        width += multiple
    return width


def picture(rng, height, width):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def refusal(call):
    with pytest.raises(NpdiffError) as caught:
        call()
    message = str(caught.value)
    assert "--" not in message, message  # no CLI flag in a Python call's message
    return message


@pytest.fixture(scope="module")
def pipe():
    loaded = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    loaded.show_progress = False
    return loaded


def test_generate_inpaint_and_hires_name_their_keywords(pipe, rng):
    width = too_wide(pipe, 1024)
    message = refusal(lambda: pipe("a circle", num_inference_steps=1, height=1024, width=width))
    assert "self-attention" in message and message.endswith("lower height=/width=")
    small = picture(rng, 32, 32)
    message = refusal(lambda: pipe.inpaint("a circle", image=small, mask_image=small, num_inference_steps=1,
                                           height=1024, width=width))
    assert message.endswith("lower height=/width=")
    message = refusal(lambda: pipe("a circle", num_inference_steps=1, height=768, width=768, hires_scale=2))
    assert "hires_scale 2 turns 768x768 into 1536x1536" in message
    assert message.endswith("lower hires_scale= or lower height=/width=")


def test_img2img_names_its_picture(pipe, rng):
    width = too_wide(pipe, 1024)
    message = refusal(lambda: pipe.img2img("a circle", image=picture(rng, 1024, width), num_inference_steps=2))
    assert f"{width}x1024 pixels is too large" in message
    assert message.endswith("pass a smaller image= (img2img works at its size)")


def test_a_memory_refusal_names_the_keywords(pipe, monkeypatch):
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda: 1 << 20)  # a machine with 1 MiB free
    message = refusal(lambda: pipe("a circle", num_inference_steps=1, height=64, width=128))
    assert "128x64 pixels x 1 picture(s) needs about" in message  # width x height, as the attention refusal
    assert message.endswith("lower height=/width= or pass fewer prompts or a lower num_images_per_prompt=")


def test_controlnet_names_its_keywords(rng):
    net = ControlNetModel.from_pretrained(MODEL_DIR / "controlnet-edges")
    control_pipe = StableDiffusionControlNetPipeline.from_pretrained(MODEL_DIR, controlnet=net)
    width = too_wide(control_pipe, 1024)
    message = refusal(lambda: control_pipe("a circle", image=picture(rng, 32, 32), num_inference_steps=1,
                                           height=1024, width=width))
    assert message.endswith("lower height=/width=")


def test_sdxl_names_its_keywords():
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder())
    height = size_rule(sdxl.unet.config, sdxl.vae_scale_factor)[0]
    while largest_attention_tokens(sdxl.unet.config, sdxl.vae_scale_factor, height, height)[0] * 4 \
            <= MAX_ATTENTION_TOKENS:
        height *= 2  # a height at which the narrowest refused width stays within 8192 pixels
    message = refusal(lambda: sdxl("a circle", num_inference_steps=1, height=height, width=too_wide(sdxl, height)))
    assert "self-attention" in message and message.endswith("lower height=/width=")


def test_the_cli_names_its_flags(tmp_path, capsys, rng):
    picture(rng, 1024, 1040).save(tmp_path / "wide.png")
    runs = [
        (["generate", "a circle", "--height", "1024", "--width", "1040"], "lower --height/--width"),
        (["img2img", "a circle", "--image", str(tmp_path / "wide.png")],
         "give a smaller --image (img2img works at its size)"),
        (["generate", "a circle", "--height", "768", "--width", "768", "--hires-scale", "2"],
         "lower --hires-scale or lower --height/--width"),
    ]
    for args, hint in runs:
        code = cli.main(args + ["--model", str(MODEL_DIR), "--steps", "2", "--out", str(tmp_path / "out.png")])
        error = capsys.readouterr().err
        assert code == 2 and "self-attention" in error and error.rstrip().endswith(hint), error
        assert "height=" not in error and "image=" not in error
    assert not (tmp_path / "out.png").exists()
