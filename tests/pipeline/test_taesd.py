"""The tiny autoencoder (TAESD) as the pipeline's VAE, against diffusers' pipelines with vae=AutoencoderTiny:
text-to-image and (with LCM, the usual few-step pairing) image-to-image, same seed -> final latents within
relative 1e-4 and 8-bit pictures within 2 levels; and the CLI's --vae."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import NETWORK_TOL, assert_rel_close
from test_pipeline_img2img import random_picture
from test_pipeline_txt2img import PROMPTS, assert_same_pictures, load_ours, to_levels
from tiny_models import tiny_taesd
from tiny_sd import tiny_sd_folder, torch_pipeline

from npdiff import NpdiffError, cli
from npdiff.images import read_png_params
from npdiff.models import AutoencoderTiny


def keep_final_latents(store):
    def callback(_pipe, _i, _t, callback_kwargs):
        store["latents"] = callback_kwargs["latents"].detach().numpy().copy()
        return {}
    return callback


def test_txt2img_with_taesd_like_diffusers(rng, seed):
    folder = tiny_sd_folder()
    torch_taesd, taesd_folder = tiny_taesd("sd", seed=0)
    kwargs = dict(negative_prompt="blurry", num_inference_steps=3, guidance_scale=float(rng.uniform(2.0, 9.0)),
                  height=64, width=32)
    prompt = PROMPTS[int(rng.integers(len(PROMPTS)))]
    theirs_pipe = torch_pipeline(folder, "euler_a")
    theirs_pipe.vae = torch_taesd
    final = {}
    theirs = theirs_pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np",
                         callback_on_step_end=keep_final_latents(final), **kwargs)
    pipe = load_ours(folder, "euler_a")
    pipe.vae = AutoencoderTiny.from_pretrained(taesd_folder)
    assert pipe.vae_scale_factor == 8
    ours = pipe(prompt, seed=seed, output_type="np", **kwargs)
    assert_rel_close(ours.latents, final["latents"], tol=NETWORK_TOL, what="TAESD txt2img latents")
    assert_same_pictures(ours.images, to_levels(theirs.images))
    # the tiny decoder really was used: the model's own VAE gives another picture from the same latents
    own = load_ours(folder, "euler_a").decode_latents(ours.latents)
    assert not np.allclose(own, pipe.decode_latents(ours.latents), atol=0.05)


def test_lcm_img2img_with_taesd_like_diffusers(rng, seed):
    """The few-step pairing: LCM-distilled UNet + LCMScheduler + TAESD; TAESD's encoder draws no noise."""
    folder = tiny_sd_folder(kind="lcm")
    torch_taesd, taesd_folder = tiny_taesd("sd", seed=0)
    picture = random_picture(rng, 64, 64)
    kwargs = dict(prompt="a red circle", strength=float(rng.uniform(0.5, 1.0)), num_inference_steps=4,
                  guidance_scale=float(rng.uniform(1.5, 9.0)))
    theirs_pipe = torch_pipeline(folder, "lcm", img2img=True)
    theirs_pipe.vae = torch_taesd
    final = {}
    theirs = theirs_pipe(image=picture, generator=torch.Generator().manual_seed(seed), output_type="np",
                         callback_on_step_end=keep_final_latents(final), **kwargs)
    pipe = load_ours(folder, "lcm")
    pipe.vae = AutoencoderTiny.from_pretrained(taesd_folder)
    ours = pipe.img2img(image=picture, seed=seed, output_type="np", **kwargs)
    assert_rel_close(ours.latents, final["latents"], tol=NETWORK_TOL, what="LCM + TAESD img2img latents")
    assert_same_pictures(ours.images, to_levels(theirs.images))


def test_vae_scale_factor_follows_the_vae_and_must_fit_the_unet():
    """A TAESD of another scale factor used to be taken, and made pictures of another size silently."""
    pipe = load_ours(tiny_sd_folder(), None)
    assert pipe.vae_scale_factor == 8
    own = pipe.vae
    with pytest.raises(NpdiffError, match=r"this AutoencoderTiny turns 4x4 pixels into one latent cell, but the "
                                          r"model's UNet works on latents of 8x8-pixel cells"):
        pipe.vae = AutoencoderTiny.from_pretrained(tiny_taesd("knobs", seed=0)[1])  # 3 decoder blocks
    assert pipe.vae is own and pipe.vae_scale_factor == 8
    pipe.vae = AutoencoderTiny.from_pretrained(tiny_taesd("sd", seed=0)[1])  # 4 blocks, 4 latent channels
    assert pipe.vae_scale_factor == 8 and type(pipe.vae).__name__ == "AutoencoderTiny"


def test_cli_vae_option(tmp_path, seed, capsys):
    folder = tiny_sd_folder()
    _, taesd_folder = tiny_taesd("sd", seed=0)
    out = tmp_path / "tiny.png"
    args = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "--seed", str(seed),
            "--sampler", "lcm", "--guidance", "1.0", "--vae", str(taesd_folder), "--out", str(out)]
    assert cli.main(args) == 0
    params = read_png_params(out)
    assert params["vae"] == taesd_folder.name and params["sampler"] == "lcm"
    assert str(taesd_folder) not in json.dumps(params)  # the folder's name, never its path
    pipe = load_ours(folder, "lcm")
    pipe.vae = AutoencoderTiny.from_pretrained(taesd_folder)
    library = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, seed=seed)
    with Image.open(out) as picture:
        assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(library.images[0]))
    # --reproduce needs --vae again (only the folder's name is stored): without it, a warning says so
    assert cli.main(["generate", "--reproduce", str(out), "--model", str(folder), "--out",
                     str(tmp_path / "without.png")]) == 0
    assert "--vae" in capsys.readouterr().err
    assert cli.main(["generate", "--reproduce", str(out), "--vae", str(taesd_folder), "--model", str(folder),
                     "--out", str(tmp_path / "again.png")]) == 0


@pytest.mark.parametrize("make_bad", ["missing", "unet"])
def test_cli_bad_vae_folder(tmp_path, capsys, make_bad):
    folder = tiny_sd_folder()
    bad = tmp_path / "nothing-here" if make_bad == "missing" else folder / "unet"
    code = cli.main(["generate", "x", "--model", str(folder), "--steps", "1", "--vae", str(bad),
                     "--out", str(tmp_path / "x.png")])
    assert code == 2
    message = capsys.readouterr().err
    assert "--vae" in message and ("no such folder" in message or "UNet2DConditionModel" in message)
    with pytest.raises(NpdiffError, match="_class_name"):
        cli.load_vae(folder / "text_encoder")
