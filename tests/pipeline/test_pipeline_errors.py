"""Bad input to the pipeline raises NpdiffError naming the argument, the expected and the actual value;
finding the model (default_model_path, empty or wrong folders, unknown samplers)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


from tiny_sd import tiny_sd_folder  # noqa: E402

from npdiff import NpdiffError, cli, pipeline_utils  # noqa: E402
from npdiff.pipeline import StableDiffusionPipeline  # noqa: E402
from npdiff.rng import TorchGenerator  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    loaded = StableDiffusionPipeline.from_pretrained(tiny_sd_folder())
    loaded.show_progress = False
    return loaded


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=60), r"height must be a multiple of 32 pixels \(the VAE works in 8-pixel cells and the UNet "
                      r"halves them 2 times\), got 60; try 32 or 64"),
    (dict(width=100), r"width must be a multiple of 32 pixels .*, got 100; try 96 or 128"),
    (dict(height=8), r"height must be a multiple of 32 pixels .*, got 8; try 32$"),
    (dict(height=0), "height must be a positive integer, got 0"),
    (dict(width=64.0), "width must be a positive integer, got 64.0"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1, got 2.5"),
    (dict(guidance_scale=-0.5), "guidance_scale must be finite and >= 0, got -0.5"),
    (dict(guidance_scale=math.nan), "guidance_scale must be finite and >= 0, got nan"),
    (dict(guidance_scale=math.inf), "guidance_scale must be finite and >= 0, got inf"),
    (dict(guidance_scale="7"), "guidance_scale must be a number >= 0, got '7'"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has batch size 2 but prompt has batch size 1"),
    (dict(negative_prompt=3), "negative_prompt must be a string or a list of strings"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an integer >= 1, got 0"),
    (dict(callback_steps=0), "callback_steps must be an integer >= 1, got 0"),
    (dict(latents=np.zeros((1, 4, 8, 7), np.float32)), r"latents must have shape \(1, 4, 8, 8\) .* got \(1, 4, 8, 7\)"),
    (dict(seed=1, generator=TorchGenerator(1)), "pass seed= or generator=, not both"),
    (dict(seed="one"), "seed must be an integer, got 'one'"),
    (dict(output_type="jpg"), "output_type must be 'pil', 'np' or 'latent', got 'jpg'"),
    # wrong types used to escape as raw Python errors (TypeError, AttributeError) in the middle of sampling
    (dict(callback=42), r"callback must be a function \(step, timestep, latents\) or None, got 42"),
    (dict(callback="print"), "callback must be a function"),
    (dict(callback_steps="2"), "callback_steps must be an integer >= 1, got '2'"),
    (dict(eta="x"), r"eta must be a number in \[0, 1\], got 'x'"),
    (dict(eta=math.nan), r"eta must be in \[0, 1\], got nan"),
    (dict(eta=-0.5), r"eta must be in \[0, 1\], got -0.5"),
    (dict(eta=None), "eta must be a number"),
    (dict(generator=object()), "generator must be an npdiff.rng generator .*got object"),
    (dict(generator=42), "generator must be an npdiff.rng generator .*got int"),
    (dict(seed="a"), "seed must be an integer, got 'a'"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(seed=2**64), r"seed must be in \[-9223372036854775808, 18446744073709551615\]"),
])
def test_bad_call_arguments(pipe, kwargs, message):
    call = dict(num_inference_steps=1)
    call.update(kwargs)
    with pytest.raises(NpdiffError, match=message):
        pipe("a cat", **call)


@pytest.mark.parametrize("prompt", [None, [], 5, ["ok", 7]])
def test_bad_prompt(pipe, prompt):
    with pytest.raises(NpdiffError, match="prompt must be a string or a non-empty list of strings"):
        pipe(prompt, num_inference_steps=1)


def test_bad_img2img_arguments(pipe):
    picture = Image.new("RGB", (64, 64))
    with pytest.raises(NpdiffError, match=r"strength must be in \(0, 1\], got 2"):
        pipe.img2img("a cat", picture, strength=2)
    with pytest.raises(NpdiffError, match="image: expected a PIL image or a numpy array, got list"):
        pipe.img2img("a cat", [picture], num_inference_steps=2)  # (1 step x 0.8 strength is refused first)
    with pytest.raises(NpdiffError, match="negative_prompt has batch size 3 but prompt has batch size 2"):
        pipe.img2img(["a", "b"], picture, negative_prompt=["x", "y", "z"])


def test_wrong_argument_types_in_img2img_and_inpaint(pipe):
    picture = Image.new("RGB", (64, 64))
    with pytest.raises(NpdiffError, match="callback must be a function"):
        pipe.img2img("a cat", picture, num_inference_steps=1, callback=42)
    with pytest.raises(NpdiffError, match="generator must be an npdiff.rng generator"):
        pipe.inpaint("a cat", picture, picture.convert("L"), num_inference_steps=1, generator=object())


def test_a_vae_for_other_latents_is_refused_when_set(pipe):
    """Checked when set on the pipeline (pipe.vae = ..., --vae), not as a picture of another size later."""
    own = pipe.vae
    other_cells = SimpleNamespace(config={"block_out_channels": [4, 4], "latent_channels": 4}, decode=None)
    with pytest.raises(NpdiffError, match=r"turns 2x2 pixels into one latent cell, .* 8x8-pixel cells .* 4 times "
                                          r"too small"):
        pipe.vae = other_cells
    other_channels = SimpleNamespace(config={"block_out_channels": [4] * 4, "latent_channels": 3}, decode=None)
    with pytest.raises(NpdiffError, match="has 3 latent channels, but the model's UNet makes 4"):
        pipe.vae = other_channels
    with pytest.raises(NpdiffError, match="vae must be an npdiff AutoencoderKL or AutoencoderTiny, got str"):
        pipe.vae = "taesd"
    assert pipe.vae is own and pipe("a cat", num_inference_steps=1, seed=1).images[0].size == (64, 64)


def test_cli_vae_of_another_scale_factor_is_one_line(tmp_path, capsys):
    from tiny_models import tiny_taesd

    out = tmp_path / "x.png"
    code = cli.main(["generate", "a cat", "--model", str(tiny_sd_folder()), "--steps", "1",
                     "--vae", str(tiny_taesd("knobs", seed=0)[1]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "turns 4x4 pixels into one latent cell" in err and "Traceback" not in err
    assert not out.exists()


def test_unknown_scheduler_lists_the_known_ones(pipe):
    with pytest.raises(NpdiffError, match=r"unknown scheduler 'dpmpp_sde'; known: .*dpmpp_2m_karras.*euler_a.*pndm"):
        StableDiffusionPipeline.from_pretrained(tiny_sd_folder(), scheduler="dpmpp_sde")
    with pytest.raises(NpdiffError, match="scheduler must be a name"):
        pipe.set_scheduler(42)
    pipe.set_scheduler("lms")
    assert pipe.scheduler_name == "lms" and type(pipe.scheduler).__name__ == "LMSDiscreteScheduler"
    pipe.set_scheduler("pndm")


def test_empty_missing_and_partial_model_folders(tmp_path):
    with pytest.raises(NpdiffError, match="expected a diffusers folder"):
        StableDiffusionPipeline.from_pretrained(tmp_path)  # empty
    with pytest.raises(NpdiffError, match="no such file or folder"):
        StableDiffusionPipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "unet").mkdir()
    with pytest.raises(NpdiffError, match="unet/config.json"):
        StableDiffusionPipeline.from_pretrained(tmp_path)


def test_default_model_path_order_and_absence(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_utils, "PACKAGE_DIR", tmp_path / "site" / "npdiff")
    monkeypatch.delenv("NPDIFF_MODEL", raising=False)
    with pytest.raises(NpdiffError, match=r"no shipped model found .*NPDIFF_MODEL"):
        pipeline_utils.default_model_path()

    installed = tmp_path / "site" / "npdiff" / pipeline_utils.INSTALLED_MODEL_DIR
    (installed / "unet").mkdir(parents=True)
    assert pipeline_utils.default_model_path() == installed
    checkout = tmp_path / "site" / "weights" / "tiny-shapes"
    (checkout / "unet").mkdir(parents=True)
    assert pipeline_utils.default_model_path() == checkout
    monkeypatch.setenv("NPDIFF_MODEL", str(tiny_sd_folder()))
    assert pipeline_utils.default_model_path() == tiny_sd_folder()
